"""Mandt, Hoffman & Blei 2017: constant-rate SGD near a minimum samples a stationary distribution whose
covariance solves a Lyapunov equation in the Hessian H and the gradient-noise covariance. The prediction (the
exact discrete-time equation, with and without heavy-ball momentum, and its small-η limit) on a small subspace,
and the measurement: SGD continued from a trained model, its iterates projected on the same subspace."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg
import torch
from torch import nn

from landscape.hessian import hessian_operator
from landscape.noise import per_example_gradient_rows
from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, flat_parameters, functional_loss, gaussian, prepare,
                                resolve_loss, select_parameters, split_flat)
from landscape.spectrum import hessian_eigenpairs


# ----------------------------------------------------------------------------- the prediction


def minibatch_noise_covariance(c: np.ndarray, *, batch_size: int, n: int | None = None) -> np.ndarray:
    """Cov of one step's gradient noise g_B − G: (1/B − 1/N)·C for B examples drawn without replacement from N,
    C = 1/(N−1) Σ (g_i − G)(g_i − G)ᵀ (the finite-population correction; n=None: C/B, the infinite-data limit)."""
    if batch_size < 1 or (n is not None and not batch_size <= n):
        raise ValueError(f"need 1 <= batch_size <= n, got batch_size {batch_size} and n {n}")
    return np.asarray(c, dtype=np.float64) * (1 / batch_size - (0.0 if n is None else 1 / n))


def _check_step(h: np.ndarray, noise: np.ndarray, lr: float, momentum: float) -> tuple[np.ndarray, np.ndarray]:
    h, noise = np.atleast_2d(np.asarray(h, dtype=np.float64)), np.atleast_2d(np.asarray(noise, dtype=np.float64))
    if h.shape != noise.shape or h.shape[0] != h.shape[1]:
        raise ValueError(f"H and the noise covariance must be square and of one shape, got {h.shape} and {noise.shape}")
    if lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr {lr} and momentum {momentum}")
    return (h + h.T) / 2, (noise + noise.T) / 2


def sgd_stationary_covariance(h: np.ndarray, noise: np.ndarray, *, lr: float, momentum: float = 0.0) -> np.ndarray:
    """Σ of θ under θ ← θ − η·v, v ← m·v + Hθ + ξ, Cov ξ = `noise` (Mandt et al. 2017, exact in discrete time).
    m = 0: Σ = (I − ηH)Σ(I − ηH)ᵀ + η²·noise. m > 0 (PyTorch's heavy ball): z = (θ, v) follows
    z ← A z + b ξ, A = [[I − ηH, −ηm·I], [H, m·I]], b = [−η·I; I], and Σ is the θ block of the solution of
    S = A S Aᵀ + b·noise·bᵀ (scipy.linalg.solve_discrete_lyapunov). Unstable dynamics (a spectral radius ≥ 1,
    e.g. ηλ ≥ 2(1+m) or λ ≤ 0) have no stationary distribution: ValueError."""
    h, noise = _check_step(h, noise, lr, momentum)
    k, eye = h.shape[0], np.eye(h.shape[0])
    a = np.block([[eye - lr * h, -lr * momentum * eye], [h, momentum * eye]])
    radius = float(np.abs(np.linalg.eigvals(a)).max())
    if radius >= 1:
        raise ValueError(f"SGD with lr {lr} and momentum {momentum} is unstable on this H (spectral radius "
                         f"{radius:.4g} >= 1): it has no stationary distribution; lower the learning rate")
    b = np.vstack([-lr * eye, eye])
    s = scipy.linalg.solve_discrete_lyapunov(a, b @ noise @ b.T)
    return (s[:k, :k] + s[:k, :k].T) / 2


def continuous_stationary_covariance(h: np.ndarray, noise: np.ndarray, *, lr: float,
                                     momentum: float = 0.0) -> np.ndarray:
    """Mandt et al. 2017's small-η limit: HΣ + ΣH = η/(1−m)·noise (the Ornstein-Uhlenbeck process of SGD with
    effective rate η/(1−m)); equal to `sgd_stationary_covariance` to first order in η."""
    h, noise = _check_step(h, noise, lr, momentum)
    sigma = scipy.linalg.solve_continuous_lyapunov(h, lr / (1 - momentum) * noise)
    return (sigma + sigma.T) / 2


# ----------------------------------------------------------------------------- the measurement


def batch_means_variance(samples: np.ndarray, *, batches: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Per column of samples (T, k): the variance about the column mean, (1/T) Σ_t (p_t − p̄)², and its standard
    error by batch means: the T squared deviations cut into `batches` consecutive blocks, stderr = std of the
    block means / √batches, which stays honest under autocorrelation shorter than a block (Flegal & Jones 2010)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2 or batches < 2 or samples.shape[0] < 2 * batches:
        raise ValueError(f"need samples of shape (T, k) with T >= 2·batches and batches >= 2, got "
                         f"{samples.shape} and {batches}")
    squares = (samples - samples.mean(axis=0)) ** 2
    length = samples.shape[0] // batches
    means = squares[: length * batches].reshape(batches, length, -1).mean(axis=1)
    return squares.mean(axis=0), means.std(axis=0, ddof=1) / math.sqrt(batches)


@dataclass
class SGDTrajectory:
    """Constant-rate SGD's iterates projected, `projections` (steps, k) = U·θ_t after each step, and where it
    ended: θ and the momentum buffer v, to go on from."""

    projections: np.ndarray
    theta: torch.Tensor
    velocity: torch.Tensor


def projected_sgd(gradient: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, basis: torch.Tensor, *,
                  lr: float, momentum: float = 0.0, steps: int,
                  velocity: torch.Tensor | None = None) -> SGDTrajectory:
    """`steps` steps of SGD from θ with PyTorch's heavy ball (v ← m·v + g, θ ← θ − η·v; v = 0 unless given) on
    the stochastic gradient g = gradient(θ), recording U·θ_t (basis U (k, D)) after each step, in float64 as
    U·θ_0 + U·(θ_t − θ_0): the start's projection in float64 once, the small displacement's in θ's precision,
    whose rounding (~1e-7·‖θ_t − θ_0‖) is far below the spread it measures and which skips a float64 copy of θ
    per step."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    start = theta.detach().clone()
    theta, velocity = start, torch.zeros_like(start) if velocity is None else velocity.detach().clone()
    basis = basis.detach().to(device=theta.device, dtype=torch.float64)
    offset = (basis @ start.double()).cpu().numpy()
    basis = basis.to(theta.dtype)
    out = np.empty((steps, basis.shape[0]))
    for t in range(steps):
        g = gradient(theta)
        velocity = momentum * velocity + g if momentum else g
        theta = theta - lr * velocity
        if basis.shape[0]:
            out[t] = offset + (basis @ (theta - start)).double().cpu().numpy()
    return SGDTrajectory(out, theta, velocity)


# ----------------------------------------------------------------------------- a model


@dataclass
class StationaryResult:
    """Predicted (discrete Lyapunov equation) against measured variance of SGD's iterates along each direction;
    `continuous` is the small-η prediction HΣ + ΣH = η/(1−m)·C_B. Variances are per unit direction."""

    labels: list[str]  # "eigen 1" ... (top Hessian eigenvectors, largest first), "random 1" ... (controls)
    curvature: list[float]  # uᵀHu per direction (the eigenvalue for an eigenvector)
    predicted: list[float]
    continuous: list[float]
    measured: list[float]
    measured_stderr: list[float]  # batch means over the measured steps
    ratio: list[float]  # measured / predicted
    relaxation_steps: list[float]  # (1 − m)/(η·uᵀHu): the steps the mean takes to forget (inf where uᵀHu ≤ 0)
    mean_shift: list[float]  # (mean of the second half − mean of the first) / measured std: 0 when stationary
    loss_start: float  # the mean loss over (x, y) after the burn-in (where H and C are taken), and at the end
    loss_end: float
    norm_start: float  # ‖θ‖ after the burn-in, and after the last step
    norm_end: float
    lr: float
    batch_size: int
    momentum: float
    steps: int
    burn_in: int
    eigen_residuals: list[float]  # ‖Hu − λu‖ of each eigenvector
    stable: bool  # whether SGD on H_U has a stationary distribution (else `predicted` is NaN)


def _orthonormal_directions(eigenvectors: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """The eigenvectors (k, D) followed by `count` Gaussian directions orthogonalised against them and one
    another, all of unit norm, in float64."""
    eigen = eigenvectors.double()
    randoms = gaussian((count, eigen.shape[1]), generator, eigen)
    for _ in range(2):  # Gram-Schmidt twice ("twice is enough")
        randoms = randoms - (randoms @ eigen.T) @ eigen
    q, _ = torch.linalg.qr(randoms.T)
    return torch.cat([eigen, q.T]) if count else eigen


def _minibatch_gradient(model, x, y, loss_fn, batch_size, generator):
    """g(θ): the gradient of the mean loss over B examples drawn afresh without replacement at each step, at
    the flat point θ, through functional_call (the model itself is never touched)."""
    n, selection = x.shape[0], select_parameters(model)

    def gradient(theta: torch.Tensor) -> torch.Tensor:
        idx = torch.randperm(n, generator=generator)[:batch_size].to(x.device)
        leaf = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = functional_loss(model, selection, split_flat(leaf, selection), x[idx], y[idx], loss_fn)
            return torch.autograd.grad(loss, leaf)[0]

    return gradient


def _mean_loss(model, theta, x, y, loss_fn) -> float:
    selection = select_parameters(model)
    with torch.no_grad():
        return float(functional_loss(model, selection, split_flat(theta, selection), x, y, loss_fn))


def stationary_distribution(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    batch_size: int,
    momentum: float = 0.0,
    steps: int = 1500,
    burn_in: int = 300,
    top_k: int = 5,
    random_directions: int = 3,
    batches: int = 20,
    eigen_tol: float = 1e-3,
    seed: int = 0,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> StationaryResult:
    """Mandt et al. 2017's stationary covariance of constant-rate SGD, predicted against measured, along the top_k
    Hessian eigenvectors u (largest first) and `random_directions` random unit controls orthogonal to them.

    Prediction: on the subspace U of those directions, H_U = UHUᵀ and C_U = UCUᵀ, C the per-example gradient
    covariance (1/(N−1), exact per-example gradients), the noise of a batch of B drawn without replacement
    (1/B − 1/N)·C_U, and Σ_U from the discrete Lyapunov equation (`sgd_stationary_covariance`; with momentum m its
    exact counterpart); the subspace ignores coupling to the other directions, exact only for eigenvectors of a
    quadratic. Measurement: SGD from the model's θ at constant η, B, m, each batch drawn afresh, `burn_in` steps
    then `steps` steps whose projections give the variance per direction (stderr by `batches` batch means); the
    directions, H_U and C_U are those at the point the burn-in reached. The model is not changed: the iterates
    are flat vectors evaluated through functional_call, the prediction uses a copy."""
    x, y = prepare(model, x, y)
    loss_fn = resolve_loss(loss_fn)
    if not 1 <= batch_size <= x.shape[0] or top_k < 1 or random_directions < 0:
        raise ValueError(f"need 1 <= batch_size <= N = {x.shape[0]}, top_k >= 1 and random_directions >= 0, got "
                         f"{batch_size}, {top_k} and {random_directions}")
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    gradient = _minibatch_gradient(model, x, y, loss_fn, batch_size, generator)
    like = flat_parameters(model)
    # cross-entropy has no minimum: the loss and the gradient noise keep falling, so H and C are taken where
    # the measurement starts, after the burn-in, not at the trained point
    warm = projected_sgd(gradient, like, like.new_zeros((0, like.numel())), lr=lr, momentum=momentum, steps=burn_in)
    at_start = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(warm.theta, at_start.parameters())
    pairs = hessian_eigenpairs(at_start, x, y, k=top_k, tol=eigen_tol, seed=seed, loss_fn=loss_fn,
                               memory_budget=memory_budget)
    basis = _orthonormal_directions(pairs.eigenvectors, random_directions, generator)  # (k, D) float64
    h = _projected_hessian(at_start, x, y, basis, loss_fn, memory_budget)
    c = np.atleast_2d(np.cov(per_example_gradient_rows(at_start, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
                             .dots(basis.to(like)).cpu().numpy()))
    predicted, continuous = _predictions(h, minibatch_noise_covariance(c, batch_size=batch_size, n=x.shape[0]),
                                         lr, momentum)
    run = projected_sgd(gradient, warm.theta, basis, lr=lr, momentum=momentum, steps=steps, velocity=warm.velocity)
    measured, stderr = batch_means_variance(run.projections, batches=batches)
    p, half = run.projections, steps // 2
    shift = (p[half:].mean(axis=0) - p[:half].mean(axis=0)) / np.sqrt(np.maximum(measured, 1e-300))
    curvature = np.diag(h)
    relax = np.where(curvature > 0, (1 - momentum) / (lr * np.maximum(curvature, 1e-300)), math.inf)
    labels = [f"eigen {i + 1}" for i in range(top_k)] + [f"random {i + 1}" for i in range(random_directions)]
    return StationaryResult(
        labels, curvature.tolist(), predicted.tolist(), continuous.tolist(), measured.tolist(), stderr.tolist(),
        (measured / predicted).tolist(), relax.tolist(), shift.tolist(),
        _mean_loss(model, warm.theta, x, y, loss_fn), _mean_loss(model, run.theta, x, y, loss_fn),
        float(warm.theta.double().norm()), float(run.theta.double().norm()), lr, batch_size, momentum,
        steps, burn_in, pairs.residuals, bool(np.all(np.isfinite(predicted))))


def _projected_hessian(model, x, y, basis, loss_fn, memory_budget) -> np.ndarray:
    """U·H·Uᵀ (k, k) in float64 from k exact Hessian products."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    products = op.matmat(basis.to(flat_parameters(model))).double()
    h = (basis @ products.T).cpu().numpy()
    return (h + h.T) / 2


def _predictions(h, noise, lr, momentum) -> tuple[np.ndarray, np.ndarray]:
    """The diagonals of the discrete and the continuous predictions; NaN where SGD on H_U has no stationary
    distribution (unstable, or a direction of non-positive curvature)."""
    nan = np.full(h.shape[0], math.nan)
    try:
        discrete = np.diag(sgd_stationary_covariance(h, noise, lr=lr, momentum=momentum))
    except ValueError:
        discrete = nan
    if np.linalg.eigvalsh(h).min() <= 0:
        return discrete, nan
    return discrete, np.diag(continuous_stationary_covariance(h, noise, lr=lr, momentum=momentum))
