"""Chaudhari et al. 2017's local entropy: how much low loss lies within a scope γ of θ.

Convention. With temperature T and scope γ,
    F(θ; γ) = log ∫ exp(−[L(θ′) + (γ/2)‖θ′ − θ‖²]/T) dθ′,
and we report it relative to a flat loss equal to L(θ) everywhere:
    ΔF(θ; γ) = F(θ; γ) − F_flat = log E_{θ′ ~ N(θ, (T/γ)·I)} exp(−[L(θ′) − L(θ)]/T) ≤ 0 near a minimum.
T = 1 is the formula as Chaudhari et al. write it; T = 1/N (the default here) makes exp(−N·L) the likelihood of
the N examples and N(θ, 1/(Nγ)·I) a prior, so ΔF is a log evidence ratio. For a quadratic L with Hessian H and
zero gradient at θ, ΔF = −½ Σ_i log(1 + λ_i/γ) at every T: the Laplace approximation, from the spectrum.

Estimator (Langevin, as Entropy-SGD's inner loop): thermodynamic integration over the loss's coupling β,
    ΔF = −(1/T) ∫_0^1 ⟨L(θ′) − L(θ)⟩_β dβ,   ⟨·⟩_β under p_β(θ′) ∝ exp(−[β(L(θ′) − L(θ)) + (γ/2)‖θ′ − θ‖²]/T),
the integral by Gauss-Legendre nodes β_j, each ⟨·⟩_β by a Langevin chain annealed from an exact draw of
p_0 = N(θ, (T/γ)·I) through the nodes in order. The chain is Leimkuhler & Matthews 2013's scheme,
θ′ ← θ′ − η∇U(θ′) + √(ηT/2)·(ξ_t + ξ_{t+1}), whose stationary distribution is exact for a Gaussian target
(Euler-Maruyama's, Entropy-SGD's, has variance T/(a(1 − ηa/2)) instead of T/a), so for a quadratic the only
error is the quadrature's and the chains' sampling error; the standard error is across independent chains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, flat_parameters, functional_loss, gaussian, prepare,
                                resolve_loss, select_parameters, split_flat)
from landscape.hessian import hessian_operator
from landscape.spectrum import SpectralDensity, _lanczos_runs, top_hessian_eigenvalue


def gauss_legendre_unit(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre points and weights on [0, 1] (weights sum to 1): exact for polynomials of degree 2n − 1."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    points, weights = np.polynomial.legendre.leggauss(nodes)
    return (points + 1) / 2, weights / 2


def coupling_nodes(nodes: int, stiffness: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes β_j and weights on [0, 1] for ∫_0^1 ⟨L − L(θ)⟩_β dβ: Gauss-Legendre in s with β = ((1+κ)^s − 1)/κ,
    κ = λ_max/γ (`stiffness`), so that a quadratic's term λ/(βλ + γ), steep near β = 0 when λ ≫ γ, becomes
    constant in s for λ = λ_max and smooth below it (κ = 0: plain Gauss-Legendre)."""
    s, w = gauss_legendre_unit(nodes)
    if stiffness <= 1e-12:
        return s, w
    grow = (1 + stiffness) ** s
    return (grow - 1) / stiffness, w * math.log1p(stiffness) * grow / stiffness


def _check_scopes(scopes) -> np.ndarray:
    scopes = np.atleast_1d(np.asarray(scopes, dtype=np.float64))
    if scopes.size == 0 or not np.all(scopes > 0):
        raise ValueError(f"scopes must be positive numbers, got {scopes.tolist()}")
    return scopes


def laplace_local_entropy(eigenvalues, *, scopes, nodes: int | None = None,
                          lambda_max: float | None = None) -> np.ndarray:
    """−½ Σ_i log(1 + λ_i/γ) for each scope γ: ΔF of the quadratic with these Hessian eigenvalues (Chaudhari et
    al. 2017); +inf where some λ_i ≤ −γ (the integral diverges). With `nodes`, the value the thermodynamic
    integral gives on that quadratic with so many `coupling_nodes` (graded for `lambda_max`, by default the largest
    eigenvalue), −½ Σ_i Σ_j w_j λ_i/(β_j λ_i + γ), whose difference from the exact value is the quadrature error."""
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    top = float(lam.max()) if lambda_max is None else lambda_max
    return np.array([_quadratic_entropy(lam, np.ones_like(lam), gamma, nodes, top) for gamma in _check_scopes(scopes)])


def _quadratic_entropy(lam: np.ndarray, weights: np.ndarray, gamma: float, nodes: int | None,
                       lambda_max: float = 0.0) -> float:
    """−½ Σ_i weights_i·log(1 + λ_i/γ) (or its quadrature), +inf where a weighted λ_i ≤ −γ."""
    if np.any((lam <= -gamma) & (weights > 0)):
        return math.inf
    if nodes is None:
        return float(-0.5 * np.sum(weights * np.log1p(lam / gamma)))
    beta, w = coupling_nodes(nodes, max(lambda_max, 0.0) / gamma)
    return float(-0.5 * np.sum(weights[:, None] * w * lam[:, None] / (beta * lam[:, None] + gamma)))


def laplace_local_entropy_from_density(density: SpectralDensity, dim: int, *, scopes, nodes: int | None = None,
                                       lambda_max: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The Laplace ΔF from stochastic Lanczos quadrature: Σ_i f(λ_i) = tr f(H) ≈ D·mean_r Σ_j w_rj f(θ_rj) over
    the runs r (Ritz values θ, weights w), f(λ) = −½ log(1 + λ/γ); returns (ΔF, its standard error across runs)
    per scope. `nodes` and `lambda_max` as in `laplace_local_entropy`."""
    scopes = _check_scopes(scopes)
    runs = density.nodes.shape[0]
    per_run = np.array([[dim * _quadratic_entropy(density.nodes[r], density.weights[r], gamma, nodes, lambda_max)
                         for gamma in scopes] for r in range(runs)])  # (runs, scopes)
    stderr = per_run.std(axis=0, ddof=1) / math.sqrt(runs) if runs > 1 else np.full(scopes.size, math.nan)
    return per_run.mean(axis=0), stderr


def gradient_local_entropy(matmat, gradient: torch.Tensor, *, scopes, temperature: float,
                           lanczos_steps: int = 30) -> np.ndarray:
    """The gradient's share of the quadratic model's ΔF, gᵀ(H + γI)⁻¹g/(2T) per scope γ (zero at a minimum; the
    Laplace term −½ Σ log(1 + λ_i/γ) assumes it), by Gauss quadrature from `lanczos_steps` Lanczos steps started
    at g: ‖g‖²·Σ_j U_1j²/(θ_j + γ) (Golub & Meurant 2010); +inf where a Ritz value θ_j ≤ −γ."""
    scopes = _check_scopes(scopes)
    norm_sq = float(gradient.double() @ gradient.double())
    if norm_sq == 0:
        return np.zeros(scopes.size)
    run = _lanczos_runs(matmat, gradient[None], max_steps=lanczos_steps)[0]
    ritz, vectors = np.linalg.eigh(np.diag(run.alphas) + np.diag(run.betas, 1) + np.diag(run.betas, -1))
    weights = vectors[0] ** 2
    return np.array([math.inf if ritz.min() <= -gamma else norm_sq * float(np.sum(weights / (ritz + gamma)))
                     / (2 * temperature) for gamma in scopes])


# ----------------------------------------------------------------------------- the Langevin estimate


@dataclass
class LangevinEntropy:
    """ΔF at one scope by thermodynamic integration over Langevin chains: the mean over chains, its standard error."""

    value: float
    stderr: float
    per_chain: list[float]
    mean_excess_loss: list[float]  # ⟨L(θ′) − L(θ)⟩_β at each node β_j, averaged over the chains
    betas: list[float]


def langevin_local_entropy(loss_and_gradient: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                           theta: torch.Tensor, *, scope: float, temperature: float, step: float, chains: int = 4,
                           nodes: int = 4, burn_in: int = 5, samples: int = 15, lambda_max: float = 0.0,
                           generator: torch.Generator) -> LangevinEntropy:
    """ΔF(θ; γ) = −(1/T) ∫_0^1 ⟨L(θ′) − L(θ)⟩_β dβ (see the module docstring), `chains` independent chains each
    annealed through `coupling_nodes` (graded for `lambda_max`), `burn_in` then `samples` Leimkuhler-Matthews steps
    of size η at each;
    loss_and_gradient(θ′s (K, D)) returns (L (K,), ∇L (K, D)) for K points at once. Stable while η·(λ_max + γ) < 2."""
    if not (scope > 0 and temperature > 0 and step > 0) or chains < 2 or samples < 1 or burn_in < 0:
        raise ValueError(f"need scope, temperature and step > 0, chains >= 2, samples >= 1 and burn_in >= 0, got "
                         f"{scope}, {temperature}, {step}, {chains}, {samples} and {burn_in}")
    theta = theta.detach()
    base = float(loss_and_gradient(theta[None])[0][0])
    betas, weights = coupling_nodes(nodes, max(lambda_max, 0.0) / scope)
    width = math.sqrt(temperature / scope)
    u = width * gaussian((chains, theta.numel()), generator, theta)  # θ′ − θ, an exact draw of p_0
    noise = gaussian((chains, theta.numel()), generator, theta)
    kick = math.sqrt(step * temperature / 2)
    excess = np.zeros((chains, nodes))
    for j, beta in enumerate(betas):
        for t in range(burn_in + samples):
            losses, grads = loss_and_gradient(theta + u)
            if t >= burn_in:
                excess[:, j] += (losses.double().cpu().numpy() - base) / samples
            fresh = gaussian((chains, theta.numel()), generator, theta)
            u = u - step * (beta * grads + scope * u) + kick * (noise + fresh)
            noise = fresh
    per_chain = -(excess @ weights) / temperature
    return LangevinEntropy(float(per_chain.mean()), float(per_chain.std(ddof=1) / math.sqrt(chains)),
                           per_chain.tolist(), excess.mean(axis=0).tolist(), betas.tolist())


# ----------------------------------------------------------------------------- a model


@dataclass
class LocalEntropyResult:
    """ΔF(θ; γ) per scope γ: the Langevin estimate (thermodynamic integration, stderr across chains) beside the
    Laplace approximation −½ Σ log(1 + λ_i/γ) (NaN when no spectrum was given)."""

    scopes: list[float]
    temperature: float
    langevin: list[float]
    langevin_stderr: list[float]
    laplace: list[float]
    laplace_stderr: list[float]  # 0 from exact eigenvalues; across SLQ runs from a density
    laplace_quadrature: list[float]  # the Laplace quadratic's ΔF by the same quadrature as the Langevin estimate
    gradient_term: list[float]  # gᵀ(H + γI)⁻¹g/(2T): the quadratic model's ΔF is laplace + gradient_term
    mean_excess_loss: list[list[float]]  # per scope, ⟨L(θ′) − L(θ)⟩_β at each node
    betas: list[list[float]]  # per scope, the coupling nodes
    step: list[float]  # the Langevin step η per scope
    lambda_max: float
    chains: int
    burn_in: int
    samples: int


def _model_loss_and_gradient(model, x, y, loss_fn):
    """(L, ∇L) of the mean loss over all of (x, y) at each row of θ′s (K, D), one autograd pass per row through
    functional_call (torch.func's vmap over grad would import torch._dynamo, 2 s, for K = 4 rows)."""
    selection = select_parameters(model)

    def loss_and_gradient(thetas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        losses, grads = [], []
        for theta in thetas.detach():
            leaf = theta.clone().requires_grad_(True)
            with torch.enable_grad():
                loss = functional_loss(model, selection, split_flat(leaf, selection), x, y, loss_fn)
                grads.append(torch.autograd.grad(loss, leaf)[0])
            losses.append(loss.detach())
        return torch.stack(losses), torch.stack(grads)

    return loss_and_gradient


def local_entropy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scopes=(1.0, 10.0, 100.0),
    temperature: float | None = None,
    chains: int = 4,
    nodes: int = 3,
    burn_in: int = 2,
    samples: int = 6,
    step_fraction: float = 1.0,
    lambda_max: float | None = None,
    eigenvalues=None,
    density: SpectralDensity | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> LocalEntropyResult:
    """Chaudhari et al. 2017's local entropy relative to a flat loss, ΔF(θ; γ) = log E_{θ′~N(θ,(T/γ)I)}
    exp(−[L(θ′) − L(θ)]/T), per scope γ, by Langevin chains (`langevin_local_entropy`, full-batch gradients of the
    mean loss over all of (x, y)), beside the Laplace approximation −½ Σ log(1 + λ_i/γ) from `eigenvalues` (all D
    of them: exact) or an SLQ `density` (`hessian_spectral_density`). Temperature T defaults to 1/N. The Langevin
    step is step_fraction/(λ_max + γ), λ_max given or computed (Lanczos, tol 1e-3). The defaults (4 chains, 3 nodes,
    2 + 6 steps at each: 24 batched full-batch gradients of 4 points per scope) keep it to seconds on 2 cores. Away
    from a minimum the quadratic model adds `gradient_term` (`gradient_local_entropy`) to the Laplace value. The
    model is not changed."""
    x, y = prepare(model, x, y)
    loss_fn = resolve_loss(loss_fn)
    scopes = _check_scopes(scopes)
    temperature = 1 / x.shape[0] if temperature is None else temperature
    if not 0 < step_fraction < 2:
        raise ValueError(f"step_fraction must lie in (0, 2), where the chain is stable; got {step_fraction}")
    if lambda_max is None:
        lambda_max = top_hessian_eigenvalue(model, x, y, tol=1e-3, seed=seed, loss_fn=loss_fn,
                                            memory_budget=memory_budget).eigenvalue
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    theta = flat_parameters(model)
    dim = theta.numel()
    laplace, laplace_stderr, quadrature = _laplace(eigenvalues, density, dim, scopes, nodes, float(lambda_max))
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    gradient_term = gradient_local_entropy(op.matmat, op.gradient(), scopes=scopes, temperature=temperature)
    runs, steps = [], []
    for gamma in scopes:
        steps.append(step_fraction / (max(float(lambda_max), 0.0) + float(gamma)))
        runs.append(langevin_local_entropy(_model_loss_and_gradient(model, x, y, loss_fn), theta, scope=float(gamma),
                                           temperature=temperature, step=steps[-1], chains=chains, nodes=nodes,
                                           burn_in=burn_in, samples=samples, lambda_max=float(lambda_max),
                                           generator=generator))
    return LocalEntropyResult(scopes.tolist(), temperature, [r.value for r in runs], [r.stderr for r in runs],
                              laplace, laplace_stderr, quadrature, gradient_term.tolist(),
                              [r.mean_excess_loss for r in runs], [r.betas for r in runs], steps, float(lambda_max),
                              chains, burn_in, samples)


def _laplace(eigenvalues, density, dim, scopes, nodes, lambda_max) -> tuple[list[float], list[float], list[float]]:
    """(Laplace ΔF, its stderr, its quadrature by `nodes` nodes) per scope, from exact eigenvalues or a density."""
    if eigenvalues is not None:
        if len(eigenvalues) != dim:
            raise ValueError(f"eigenvalues must hold all {dim} eigenvalues of the Hessian, got {len(eigenvalues)}; "
                             "pass a spectral density (hessian_spectral_density) instead")
        return (laplace_local_entropy(eigenvalues, scopes=scopes).tolist(), [0.0] * scopes.size,
                laplace_local_entropy(eigenvalues, scopes=scopes, nodes=nodes, lambda_max=lambda_max).tolist())
    if density is not None:
        value, stderr = laplace_local_entropy_from_density(density, dim, scopes=scopes)
        quadrature, _ = laplace_local_entropy_from_density(density, dim, scopes=scopes, nodes=nodes,
                                                           lambda_max=lambda_max)
        return value.tolist(), stderr.tolist(), quadrature.tolist()
    return [math.nan] * scopes.size, [math.nan] * scopes.size, [math.nan] * scopes.size
