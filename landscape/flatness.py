"""Flatness: how much the loss rises when the parameters move, on average, at worst and in the PAC-Bayes sense.

Sizes are relative where the measure says so (filter-normalised or |θ|-scaled), so that rescaling the
weights without changing the function leaves them alone (Dinh et al. 2017; `rescaled_copy` tests it).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from landscape.distributed import DataShard, PointShare
from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, ParamSpec, Selection, flat_parameters, functional_loss,
                                gaussian, graph_bytes_per_example, is_integer_labels, mlp_layers, prepare,
                                resolve_loss, row_chunks, select_parameters, split_flat)
from landscape.points import batchnorm_copy, losses_at_points, point_evaluator, recompute_batchnorm


def filter_normalize(direction: torch.Tensor, model: nn.Module, *, params: ParamSpec = None) -> torch.Tensor:
    """Li et al. 2018 filter normalisation of a flat direction (D,), or of each row of a batch (K, D), over the
    measured parameters (`params`; default the trainable ones): every row / conv filter of each weight tensor
    rescaled to the norm of the same row of θ; 1-D tensors (biases) set to zero."""
    params = list(select_parameters(model, params).tensors)
    total = sum(p.numel() for p in params)
    if direction.shape[-1] != total:
        raise ValueError(f"vector has {direction.shape[-1]} entries but the model has {total} parameters")
    direction = direction.contiguous()  # each row then gives the bits it gives alone
    dtype = direction.dtype
    for p in params:  # as arithmetic with θ's norms promotes it: float32 rows of a float64 model give float64
        dtype = torch.promote_types(dtype, p.dtype)
    out = torch.empty(direction.shape, dtype=dtype, device=direction.device)
    lead, offset = direction.shape[:-1], 0
    for p in params:
        n, part, target = p.numel(), direction[..., offset : offset + p.numel()], out[..., offset : offset + p.numel()]
        offset += n
        if p.dim() <= 1:
            target.zero_()
            continue
        d_rows = part.reshape(*lead, p.shape[0], n // p.shape[0])
        d_norms = d_rows.norm(dim=-1, keepdim=True)
        w_norms = p.detach().reshape(p.shape[0], -1).norm(dim=1, keepdim=True)
        # exact rescaling (Li et al.'s code adds 1e-10 to the norm, which is wrong for small directions);
        # an all-zero row has no direction to rescale and stays zero
        scale = torch.where(d_norms > 0, w_norms / d_norms.clamp_min(torch.finfo(direction.dtype).tiny), 0.0)
        torch.mul(d_rows, scale, out=target.view(d_rows.shape))
    return out


def random_directions(model: nn.Module, generator: torch.Generator, count: int, *,
                      normalization: str = "filter", params: ParamSpec = None) -> torch.Tensor:
    """`count` Gaussian directions (count, D) in parameter space, one after another from `generator` (the
    numbers of `count` calls of `random_direction`): "filter"-normalised (Li et al. 2018), "adaptive" (each
    entry scaled by |θ|, Kwon et al. 2021) or "none"."""
    if normalization not in ("filter", "adaptive", "none"):
        raise ValueError(f"normalization must be 'filter', 'adaptive' or 'none', got {normalization!r}")
    theta = flat_parameters(model, params)
    drawn = torch.empty((count, theta.numel()), dtype=torch.float32)  # `gaussian`'s float32 draws, row by row
    for row in drawn:
        torch.randn(theta.numel(), generator=generator, out=row)
    d = drawn.to(theta)
    if normalization == "filter":
        return filter_normalize(d, model, params=params)
    if normalization == "adaptive":
        return d.mul_(theta.abs())
    return d


def random_direction(model: nn.Module, generator: torch.Generator, *, normalization: str = "filter",
                     params: ParamSpec = None) -> torch.Tensor:
    """A Gaussian direction in parameter space: "filter"-normalised (Li et al. 2018), "adaptive"
    (each entry scaled by |θ|, Kwon et al. 2021) or "none"."""
    return random_directions(model, generator, 1, normalization=normalization, params=params)[0]


@dataclass
class FlatnessResult:
    """Loss increase L(θ + σ·d) − L(θ) over random normalised directions d, per σ."""

    sigmas: list[float]
    mean_increase: list[float]
    std_increase: list[float]  # sample standard deviation over directions
    increases: np.ndarray  # (samples, len(sigmas))
    base_loss: float
    adaptive: bool = False


def perturbation_flatness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sigmas: Sequence[float],
    *,
    samples: int = 20,
    seed: int = 0,
    adaptive: bool = False,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    shard: DataShard | PointShare | None = None,
    params: ParamSpec = None,
    bn: str = "keep",
) -> FlatnessResult:
    """Average-case flatness: E_d[L(θ + σd) − L(θ)] for Gaussian d, filter-normalised (Li et al. 2018)
    or, with adaptive=True, scaled entry-wise by |θ| (Kwon et al. 2021). All σ and directions in one batch.
    `shard` spreads the data or the points over processes (`losses_at_points`); `bn` keeps the BatchNorm running
    statistics (default) or recomputes them at each point from x ("recompute", Garipov et al. 2018)."""
    sigmas = [float(s) for s in sigmas]
    generator = torch.Generator().manual_seed(seed)
    normalization = "adaptive" if adaptive else "filter"
    directions = random_directions(model, generator, samples, normalization=normalization, params=params)
    # point 0 is θ itself; then, direction by direction, every σ
    coefficients = torch.zeros(1 + samples * len(sigmas), samples, dtype=torch.float64)
    for k in range(samples):
        coefficients[1 + k * len(sigmas) : 1 + (k + 1) * len(sigmas), k] = torch.tensor(sigmas, dtype=torch.float64)
    result = losses_at_points(model, x, y, flat_parameters(model, params), directions, coefficients,
                              loss_fn=loss_fn, memory_budget=memory_budget, accuracy=False, shard=shard, params=params,
                              bn=bn)
    base = result.losses[0]
    increases = (result.losses[1:] - base).reshape(samples, len(sigmas)).numpy()
    std = increases.std(axis=0, ddof=1) if samples > 1 else np.zeros(len(sigmas))
    return FlatnessResult(sigmas, increases.mean(axis=0).tolist(), std.tolist(), increases, float(base), adaptive)


@dataclass
class WorstCaseResult:
    """The largest loss increase found within a ρ-ball around θ, and where."""

    sharpness: float  # max found of L(θ + ε) − L(θ)
    rho: float
    adaptive: bool
    perturbation: torch.Tensor  # ε, flat
    increases: list[float]  # best increase after each ascent step


def _loss_and_gradient(model, selection: Selection, params_flat, x, y, loss_fn, rows, *,
                       gradient: bool = True) -> tuple[float, torch.Tensor | None]:
    """Mean loss and its gradient (None with gradient=False: a forward pass only) at a flat parameter vector,
    summed over row chunks. The loss is the same number either way."""
    theta = params_flat.detach().requires_grad_(gradient)
    total, grad = 0.0, torch.zeros_like(theta) if gradient else None
    with torch.set_grad_enabled(gradient):
        for rs in row_chunks(x.shape[0], rows):
            weight = (rs.stop - rs.start) / x.shape[0]
            loss = weight * functional_loss(model, selection, split_flat(theta, selection), x[rs], y[rs], loss_fn)
            if gradient:
                grad += torch.autograd.grad(loss, theta)[0]
            total += float(loss.detach())
    return total, grad


def worst_case_sharpness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rho: float,
    adaptive: bool = False,
    steps: int = 20,
    seed: int = 0,
    starts: int = 3,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    params: ParamSpec = None,
    bn: str = "keep",
) -> WorstCaseResult:
    """max_{‖T⁻¹ε‖₂ ≤ ρ} L(θ + ε) − L(θ) by projected, normalised gradient ascent (Keskar et al. 2017;
    Andriushchenko et al. 2023), T = I (absolute) or T = diag(|θ|) (adaptive, Kwon et al. 2021).

    Ascent runs in u = T⁻¹ε: u ← Π_ρ(u + η·∇_u/‖∇_u‖) with ∇_u = T·∇L(θ + Tu); it starts from the best
    of `starts` random points on the sphere ‖u‖ = ρ, and η starts at ρ and halves whenever a step does not
    improve. The best point seen is returned, so the result is a lower bound on the true maximum and
    at least the increase at any random point of the sphere it tried. `bn` keeps the BatchNorm running statistics
    (default) or recomputes them from x at every point it evaluates, θ included ("recompute", Garipov et al.
    2018's update_bn, in a private copy); the ascent's gradient then holds the recomputed statistics fixed, as
    buffers, while every loss compared is the policy's exact loss, so the result stays a lower bound.
    """
    if not rho > 0 or steps < 1:
        raise ValueError(f"rho must be > 0 and steps >= 1, got rho={rho}, steps={steps}")
    selection = select_parameters(model, params)
    x, y = prepare(model, x, y, loss_fn, selection)
    loss_fn = resolve_loss(loss_fn)
    theta = flat_parameters(model, selection)
    scale = theta.abs() if adaptive else torch.ones_like(theta)
    rows = memory_budget // max(1.0, 2 * graph_bytes_per_example(model, x, y, loss_fn, selection))
    recomputed = batchnorm_copy(model, bn)

    def loss_and_gradient(point: torch.Tensor, gradient: bool = True):
        if recomputed is None:
            return _loss_and_gradient(model, selection, point, x, y, loss_fn, rows, gradient=gradient)
        recompute_batchnorm(recomputed, selection, split_flat(point, selection), x)
        return _loss_and_gradient(recomputed, selection, point, x, y, loss_fn, rows, gradient=gradient)

    base = loss_and_gradient(theta, gradient=False)[0]
    generator = torch.Generator().manual_seed(seed)
    candidates = []  # the starts' losses by forward passes; a gradient only at the best
    for _ in range(max(1, starts)):
        u = gaussian(theta.numel(), generator, theta)
        u = u * (rho / u.norm())
        candidates.append((loss_and_gradient(theta + scale * u, gradient=False)[0], u))
    _, u = max(candidates, key=lambda c: c[0])
    best_loss, grad = loss_and_gradient(theta + scale * u)
    best_u, step, history = u, rho, []
    for _ in range(steps):
        direction = scale * grad
        norm = direction.norm()
        if norm == 0:
            break
        trial = u + step * direction / norm
        trial = trial * min(1.0, rho / float(trial.norm()))  # projection onto the ρ-ball
        loss, trial_grad = loss_and_gradient(theta + scale * trial)
        if loss > best_loss:
            best_loss, best_u, u, grad = loss, trial, trial, trial_grad
        else:
            step /= 2
        history.append(best_loss - base)
    return WorstCaseResult(best_loss - base, rho, adaptive, scale * best_u, history)


@dataclass
class PacBayesResult:
    """The largest Gaussian weight-noise level that raises the training error (or loss) by at most a target."""

    sigma: float
    flatness: float  # 1/σ²
    base_error: float  # NaN under criterion="loss"
    error_increase: float  # mean error increase at σ; NaN under criterion="loss"
    magnitude_aware: bool
    criterion: str = "error"
    base_loss: float = math.nan  # under criterion="loss"
    loss_increase: float = math.nan  # mean loss increase at σ, under criterion="loss"


PAC_BAYES_CRITERIA = ("error", "loss")


def _pac_bayes_criterion(criterion: str, y: torch.Tensor, max_error_increase: float,
                         max_loss_increase: float | None) -> float:
    """The target of the chosen criterion; ValueError for a criterion these targets or settings cannot serve."""
    if criterion not in PAC_BAYES_CRITERIA:
        raise ValueError(f"criterion must be 'error' or 'loss', got {criterion!r}")
    if criterion == "loss":
        if max_loss_increase is None or not max_loss_increase > 0:
            raise ValueError("criterion='loss' needs max_loss_increase > 0, the mean loss increase that defines σ")
        return float(max_loss_increase)
    if not is_integer_labels(y):
        raise ValueError(f"criterion='error' counts misclassified examples and needs class labels (integer y of shape "
                         f"(N,)), but y has dtype {y.dtype} and shape {tuple(y.shape)}; pass criterion='loss' with "
                         "max_loss_increase for regression or sequence targets")
    if not 0 < max_error_increase < 1:
        raise ValueError("max_error_increase must be in (0, 1)")
    return float(max_error_increase)


def pac_bayes_flatness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    magnitude_aware: bool = False,
    criterion: str = "error",
    max_error_increase: float = 0.1,
    max_loss_increase: float | None = None,
    samples: int = 10,
    seed: int = 0,
    rounds: int = 12,
    sigma_min: float = 1e-4,
    sigma_max: float = 2.0,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    params: ParamSpec = None,
    bn: str = "keep",
) -> PacBayesResult:
    """PAC-Bayes flatness (Jiang et al. 2020; Dziugaite et al. 2020): the largest σ such that the mean training
    error of θ + σ·ε over `samples` Gaussian draws ε rises by at most `max_error_increase` (criterion="error",
    class labels only) or the mean loss by at most `max_loss_increase` (criterion="loss", any loss, chosen
    explicitly); flatness = 1/σ². Magnitude-aware: the noise on each weight is σ·(|w| + 1e-3)·ε (Dziugaite et
    al.'s magnitude_eps). `bn`: BatchNorm statistics kept (default) or recomputed at each noisy point from x.

    The same draws ε serve every σ (common random numbers), so the search runs on one fixed curve, which
    it assumes grows with σ: a bisection in log σ of the bracket [σ_ok, σ_too_big], starting from [sigma_min,
    sigma_max], one σ per round, for a relative precision of (sigma_max/sigma_min)^(2^−rounds), 0.24% at the
    defaults. Each σ costs `samples` network evaluations: 15 σ in all here, where 4 rounds of 7 σ (the same
    precision) took 31 and twice the time.
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    target = _pac_bayes_criterion(criterion, y, max_error_increase, max_loss_increase)
    selection = select_parameters(model, params)
    theta = flat_parameters(model, selection)
    generator = torch.Generator().manual_seed(seed)
    noise = gaussian((samples, theta.numel()), generator, theta)
    if magnitude_aware:
        noise = noise * (theta.abs() + 1e-3)

    known: dict[float, float] = {}
    evaluate = point_evaluator(model, x, y, theta, noise, loss_fn=loss_fn, memory_budget=memory_budget,
                               accuracy=criterion == "error", params=list(selection.names), bn=bn)

    def mean_values(sigmas: list[float]) -> list[float]:
        new = [s for s in sigmas if s not in known]
        if new:
            result = evaluate(torch.cat([torch.eye(samples, dtype=torch.float64) * s for s in new]))
            if criterion == "error":
                means = 1.0 - result.accuracies.reshape(len(new), samples).mean(dim=1)
            else:
                means = result.losses.reshape(len(new), samples).mean(dim=1)
            known.update(zip(new, means.tolist()))
        return [known[s] for s in sigmas]

    base, low_value, high_value = mean_values([0.0, sigma_min, sigma_max])
    low, high = sigma_min, sigma_max
    if high_value - base <= target:
        low = high  # even the largest σ searched stays within the target
    elif low_value - base > target:
        low = 0.0  # even the smallest σ searched exceeds it
    else:
        for _ in range(rounds):
            middle = math.sqrt(low * high)
            if mean_values([middle])[0] - base <= target:
                low = middle
            else:
                high = middle
    increase = mean_values([low])[0] - base if low > 0 else 0.0
    flatness = 1 / low**2 if low > 0 else math.inf
    if criterion == "error":
        return PacBayesResult(low, flatness, base, increase, magnitude_aware)
    return PacBayesResult(low, flatness, math.nan, math.nan, magnitude_aware, "loss", base, increase)


def rescaled_copy(model: nn.Module, alpha: float) -> nn.Module:
    """A copy of a ReLU MLP computing exactly the same function: the first Linear layer (weights and bias)
    multiplied by α > 0 and the second layer's weights divided by α, which ReLU's positive homogeneity,
    ReLU(αz) = α·ReLU(z), leaves unchanged (Dinh et al. 2017). Sharpness changes; the function does not."""
    layers = mlp_layers(model)
    if layers is None or not alpha > 0:
        raise ValueError("rescaled_copy needs a plain MLP (nn.Sequential of Linear and ReLU layers) and alpha > 0")
    linear_positions = [i for i, m in enumerate(layers) if type(m) is nn.Linear]
    if len(linear_positions) < 2 or not all(type(m) in (nn.ReLU, nn.Identity)
                                            for m in layers[linear_positions[0] + 1 : linear_positions[1]]):
        raise ValueError("rescaled_copy needs two Linear layers with only ReLU between them (positive homogeneity)")
    out = copy.deepcopy(model)
    first, second = [m for m in mlp_layers(out) if type(m) is nn.Linear][:2]
    with torch.no_grad():
        first.weight.mul_(alpha)
        if first.bias is not None:
            first.bias.mul_(alpha)
        second.weight.div_(alpha)
    return out
