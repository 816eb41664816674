"""Connectivity: is there a low-loss path between two solutions? Straight lines, after aligning hidden
units, and along a trained curve."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.sgd import sgd

from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, ParamSpec, Selection, check_measurable, flat_parameters,
                                functional_loss, mlp_layers, prepare, resolve_loss, select_parameters, split_flat)
from landscape.points import PointLosses, losses_at_points, point_evaluator


def barrier_height(alphas: Sequence[float], losses: Sequence[float], loss_a: float, loss_b: float) -> float:
    """max_α [L(θ(α)) − ((1−α)·L(θ_a) + α·L(θ_b))]: height above the straight line between the endpoint
    losses (Entezari et al. 2022). Frankle et al. 2020 subtract the endpoint mean instead."""
    a = np.asarray(alphas, dtype=np.float64)
    return float(np.max(np.asarray(losses, dtype=np.float64) - ((1 - a) * loss_a + a * loss_b)))


def barrier_definitions(alphas, losses, errors, loss_ends, error_ends) -> dict[str, float]:
    """The common barrier definitions, for loss and for error (1 − accuracy):
    *_linear: max_α value(α) − ((1−α)·value(0) + α·value(1)) (Entezari et al. 2022);
    *_mean: max_α value(α) − (value(0) + value(1))/2 (Frankle et al. 2020)."""
    out = {}
    for name, values, (a, b) in (("loss", losses, loss_ends), ("error", errors, error_ends)):
        out[f"{name}_linear"] = barrier_height(alphas, values, a, b)
        out[f"{name}_mean"] = float(np.max(values)) - (a + b) / 2
    return out


@dataclass
class InterpolationResult:
    """Loss and accuracy along θ(α) = (1−α)·θ_a + α·θ_b."""

    alphas: list[float]
    losses: list[float]
    accuracies: list[float]
    barrier: float  # over the given α, against the line between the endpoint losses
    endpoint_losses: tuple[float, float]
    barriers: dict = field(default_factory=dict)  # every definition, with α refined near the peaks
    refined_alphas: list[float] = field(default_factory=list)  # the given α and the refinements, sorted
    refined_losses: list[float] = field(default_factory=list)
    refined_accuracies: list[float] = field(default_factory=list)


def _same_architecture(model_a: nn.Module, model_b: nn.Module, params: ParamSpec = None) -> tuple[Selection, Selection]:
    """The measured parameters of both models (model_b's chosen by model_a's names); ValueError unless they
    have the same names and shapes."""
    selection_a = select_parameters(model_a, params)
    try:
        selection_b = select_parameters(model_b, list(selection_a.names))
    except ValueError:
        selection_b = None
    if selection_b is None or selection_a.shapes != selection_b.shapes:
        raise ValueError("the two models must have the same parameter names and shapes to be interpolated")
    return selection_a, selection_b


def linear_interpolation(
    model_a: nn.Module,
    model_b: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    alphas: Sequence[float],
    *,
    refine: int = 2,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    params: ParamSpec = None,
    bn: str = "keep",
) -> InterpolationResult:
    """Linear mode connectivity: L and accuracy at θ(α) = (1−α)·θ_a + α·θ_b for each α, the loss barrier
    `barrier_height` over the given α (Entezari et al. 2022), and `.barriers`, every common definition for loss
    and error (`barrier_definitions`) after `refine` rounds that evaluate 8 more α between the neighbours of
    the current loss and error peaks. The endpoints are evaluated exactly (α = 0 and 1). `bn`: "keep" (default)
    evaluates every point with model_a's BatchNorm running statistics; "recompute" recomputes them at each point
    from x (Garipov et al. 2018's update_bn; interpolated statistics give misleading barriers)."""
    selection_a, selection_b = _same_architecture(model_a, model_b, params)
    check_measurable(model_b)
    theta_a = flat_parameters(model_a, selection_a)
    endpoints = torch.stack([theta_a, flat_parameters(model_b, selection_b).to(theta_a)])

    mixtures = point_evaluator(model_a, x, y, torch.zeros_like(theta_a), endpoints, loss_fn=loss_fn,
                               memory_budget=memory_budget, params=list(selection_a.names), bn=bn)

    def evaluate(points: list[float]) -> PointLosses:
        a = torch.tensor(points, dtype=torch.float64)[:, None]
        return mixtures(torch.cat([1 - a, a], dim=1))

    alphas = [float(a) for a in alphas]
    result = evaluate([0.0, 1.0, *alphas])
    loss_a, loss_b = float(result.losses[0]), float(result.losses[1])
    acc_a, acc_b = float(result.accuracies[0]), float(result.accuracies[1])
    losses, accuracies = result.losses[2:].tolist(), result.accuracies[2:].tolist()
    table = dict(zip([0.0, 1.0, *alphas], zip(result.losses.tolist(), result.accuracies.tolist())))
    for _ in range(refine):
        grid = sorted(table)
        new = []
        for values in ([v[0] for v in table.values()], [-v[1] for v in table.values()]):
            peak = grid.index(list(table)[int(np.nanargmax(values))]) if not np.all(np.isnan(values)) else None
            if peak is not None:
                low, high = grid[max(peak - 1, 0)], grid[min(peak + 1, len(grid) - 1)]
                new += [a for a in np.linspace(low, high, 10)[1:-1].tolist() if a not in table]
        if not new:
            break
        extra = evaluate(new)
        table.update(zip(new, zip(extra.losses.tolist(), extra.accuracies.tolist())))
    refined = sorted(table)
    r_losses = [table[a][0] for a in refined]
    r_acc = [table[a][1] for a in refined]
    barriers = barrier_definitions(refined, r_losses, [1 - a for a in r_acc], (loss_a, loss_b), (1 - acc_a, 1 - acc_b))
    return InterpolationResult(alphas, losses, accuracies, barrier_height(alphas, losses, loss_a, loss_b),
                               (loss_a, loss_b), barriers, refined, r_losses, r_acc)


@dataclass
class WeightMatchingResult:
    """model_b with its hidden units permuted to match model_a; it computes exactly model_b's function."""

    model: nn.Module
    permutations: list[torch.Tensor]  # per hidden layer: unit i of the result is unit permutations[l][i] of model_b
    sweeps: int


def _mlp_linears(model: nn.Module) -> list[nn.Linear]:
    layers = mlp_layers(model)
    if layers is None:
        raise ValueError("weight matching needs a plain MLP (nn.Sequential of Linear and element-wise layers)")
    return [m for m in layers if type(m) is nn.Linear]


def permute_hidden_units(model: nn.Module, permutations: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of a plain MLP whose hidden layer l has its units reordered by permutations[l]: unit i of the copy is
    unit permutations[l][i] of the original. Rows of Linear l and columns of Linear l+1 move together, and
    element-wise activations commute with the reordering, so the function is unchanged."""
    out = copy.deepcopy(model)
    linears = _mlp_linears(out)
    if len(permutations) != len(linears) - 1:
        raise ValueError(f"need one permutation per hidden layer ({len(linears) - 1}), got {len(permutations)}")
    with torch.no_grad():
        for layer, perm in enumerate(permutations):
            current, following = linears[layer], linears[layer + 1]
            perm = torch.as_tensor(perm, device=current.weight.device)
            current.weight.copy_(current.weight[perm])
            if current.bias is not None:
                current.bias.copy_(current.bias[perm])
            following.weight.copy_(following.weight[:, perm])
    return out


def weight_matching(model_a: nn.Module, model_b: nn.Module, *, max_sweeps: int = 100, seed: int = 0
                    ) -> WeightMatchingResult:
    """Weight matching (Ainsworth et al. 2022): permutations P_l of model_b's hidden units maximising
    Σ_l ⟨W_a^l, P_l W_b^l P_{l−1}ᵀ⟩ (+ the biases), by coordinate descent over layers in random order, each
    step an exact linear assignment (scipy.optimize.linear_sum_assignment), until a sweep changes nothing."""
    from scipy.optimize import linear_sum_assignment

    _same_architecture(model_a, model_b)
    la, lb = _mlp_linears(model_a), _mlp_linears(model_b)
    # on the CPU in float64 wherever the models live: the assignment solver (scipy) reads numpy arrays
    wa = [m.weight.detach().double().cpu() for m in la]
    wb = [m.weight.detach().double().cpu() for m in lb]
    ba = [None if m.bias is None else m.bias.detach().double().cpu() for m in la]
    bb = [None if m.bias is None else m.bias.detach().double().cpu() for m in lb]
    perms = [torch.arange(m.out_features) for m in la[:-1]]
    generator = torch.Generator().manual_seed(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for layer in torch.randperm(len(perms), generator=generator).tolist():
            incoming = wb[layer] if layer == 0 else wb[layer][:, perms[layer - 1]]  # columns follow P_{l−1}
            score = wa[layer] @ incoming.T  # score[i, j]: unit i of a against unit j of b
            if ba[layer] is not None:
                score = score + torch.outer(ba[layer], bb[layer])
            outgoing = wb[layer + 1] if layer + 1 == len(perms) else wb[layer + 1][perms[layer + 1]]
            score = score + wa[layer + 1].T @ outgoing
            _, columns = linear_sum_assignment(score.numpy(), maximize=True)
            new = torch.as_tensor(columns)
            if not torch.equal(new, perms[layer]):
                perms[layer], changed = new, True
        if not changed:
            break
    return WeightMatchingResult(permute_hidden_units(model_b, perms), perms, sweeps)


@dataclass
class BezierResult:
    """A quadratic Bézier curve θ(t) = (1−t)²θ_a + 2t(1−t)θ_c + t²θ_b with a trained middle point θ_c."""

    control: torch.Tensor  # θ_c, flat
    ts: list[float]
    losses: list[float]
    accuracies: list[float]
    train_losses: list[float]  # per epoch, mean loss at the sampled t


def bezier_points(theta_a: torch.Tensor, control: torch.Tensor, theta_b: torch.Tensor, ts) -> torch.Tensor:
    """Rows θ(t) of the quadratic Bézier curve for each t."""
    t = torch.as_tensor(ts, dtype=theta_a.dtype, device=theta_a.device)[:, None]
    return (1 - t) ** 2 * theta_a + 2 * t * (1 - t) * control + t**2 * theta_b


def bezier_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int = 0,
    momentum: float = 0.9,
    batch_size: int = 128,
    points: int = 21,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    params: ParamSpec = None,
    bn: str = "keep",
) -> BezierResult:
    """A low-loss quadratic Bézier curve between two models (Garipov et al. 2018): θ_c starts at the midpoint
    and is trained by SGD on E_{t~U(0,1)} L(θ(t)), one t per mini-batch; the curve's loss and accuracy are
    then evaluated exactly at `points` values of t (t = 0 and 1 are the two models), with `bn` as in
    `linear_interpolation` (the training steps use model_a's statistics either way)."""
    selection_a, selection_b = _same_architecture(model_a, model_b, params)
    check_measurable(model_b)
    x, y = prepare(model_a, x, y, loss_fn, selection_a)
    loss_fn = resolve_loss(loss_fn)
    theta_a = flat_parameters(model_a, selection_a)
    theta_b = flat_parameters(model_b, selection_b).to(theta_a)
    control = ((theta_a + theta_b) / 2).requires_grad_(True)
    momentum_buffer: list[torch.Tensor | None] = [None]
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator).to(x.device)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                idx = order[start : start + batch_size]
                t = float(torch.rand((), generator=generator, dtype=torch.float64))
                theta = (1 - t) ** 2 * theta_a + 2 * t * (1 - t) * control + t**2 * theta_b
                loss = functional_loss(model_a, selection_a, split_flat(theta, selection_a), x[idx], y[idx], loss_fn)
                grad = torch.autograd.grad(loss, control)[0]  # the curve's own point, never a model's
                with torch.no_grad():  # torch.optim.SGD's own update (its constructor would import torch._dynamo)
                    sgd([control], [grad], momentum_buffer, weight_decay=0.0, momentum=momentum, lr=lr,
                        dampening=0.0, nesterov=False, maximize=False)
                total += float(loss.detach()) * idx.numel()
            epoch_losses.append(total / x.shape[0])
    control = control.detach()
    ts = np.linspace(0.0, 1.0, points).tolist()
    result = bezier_losses(model_a, x, y, (theta_a, control, theta_b), ts, loss_fn=loss_fn, memory_budget=memory_budget,
                           params=list(selection_a.names), bn=bn)
    return BezierResult(control, ts, result.losses.tolist(), result.accuracies.tolist(), epoch_losses)


def bezier_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  curve: tuple[torch.Tensor, torch.Tensor, torch.Tensor], ts: Sequence[float], *,
                  loss_fn: LossFn | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                  params: ParamSpec = None, bn: str = "keep") -> PointLosses:
    """Loss and accuracy at θ(t) for each t on the quadratic Bézier curve through `curve` = (θ_a, θ_c, θ_b):
    each point is the mixture (1−t)²·θ_a + 2t(1−t)·θ_c + t²·θ_b, all of them in one batched evaluation.
    `model` gives the architecture; its own parameters are not used."""
    like = flat_parameters(model, params)
    theta_a, control, theta_b = (p.detach().to(like) for p in curve)
    coefficients = torch.tensor([[(1 - t) ** 2, 2 * t * (1 - t), t**2] for t in ts], dtype=torch.float64)
    return losses_at_points(model, x, y, torch.zeros_like(theta_a), torch.stack([theta_a, control, theta_b]),
                            coefficients, loss_fn=loss_fn, memory_budget=memory_budget, params=params, bn=bn)
