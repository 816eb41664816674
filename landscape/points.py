"""The loss at many parameter points θ_p = base + Σ_k c[p, k]·d_k: one interface (`PointEvaluator`), the
reference (`FunctionalPoints`, one functional forward per point), the MLP fast path (`MLPPoints`) and one
dispatch point (`point_evaluator`). Surfaces, interpolation, curves and every flatness measure use it."""

from __future__ import annotations

import copy as copying
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from landscape.distributed import DataShard, PointShare
from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, ParamSpec, Selection, fast_path_layers,
                                functional_forward, graph_bytes_per_example, is_integer_labels, linear_parts, prepare,
                                resolve_loss, row_chunks, select_parameters, split_flat)

# Working set of one batch of MLP points (activations of p points × n examples): small enough to stay in
# cache-friendly sizes, large enough that each batched product is a real GEMM (bench/RESULTS.md).
POINT_BATCH_BYTES = 16 << 20
BN_POLICIES = ("keep", "recompute")
_IN_PLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_}


@dataclass
class PointLosses:
    """Mean loss and accuracy at each parameter point of a batch."""

    losses: torch.Tensor  # (P,) float64
    accuracies: torch.Tensor  # (P,) float64, NaN when the targets are not class labels


class PointEvaluator(ABC):
    """coefficients (P, K) -> `PointLosses` at θ_p = base + Σ_k coefficients[p, k]·directions[k], for one model,
    data set, base (D,) and directions (K, D) over the selected parameters, called as often as a search needs.
    The model's own selected parameters are not used, only its architecture (and the unselected ones).
    Subclasses sum the loss and count correct predictions per point."""

    def __init__(self, model, x, y, base, directions, *, loss_fn=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                 accuracy=True, copy=True, selection: Selection | None = None):
        self.model = model
        self.bn_copy = None  # FunctionalPoints with bn="recompute": a private copy whose statistics it recomputes
        self.selection = selection or select_parameters(model)
        self.x, self.y = prepare(model, x, y, loss_fn, self.selection)
        self.count_correct = accuracy and is_integer_labels(self.y)
        p0 = self.selection.tensors[0]
        # private copies: what an evaluator keeps must not go stale if the caller changes its tensors later
        # (copy=False: called once, at once, as by `losses_at_points`)
        self.base = base.detach().to(p0, copy=copy)
        self.directions = directions.detach().to(p0, copy=copy).reshape(-1, self.base.numel())
        self.loss_fn = resolve_loss(loss_fn)
        self.budget = memory_budget

    @abstractmethod
    def _sums(self, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of correct predictions) per point, float64 (P,); NaN counts without labels."""

    def totals(self, coefficients) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(summed loss, correct count, examples) per point: what adds up over slices of the data."""
        coefficients = torch.as_tensor(coefficients).to(self.base).reshape(-1, self.directions.shape[0])
        with torch.no_grad():
            sums, correct = self._sums(coefficients)
        return sums, correct, self.x.shape[0]

    def __call__(self, coefficients) -> PointLosses:
        sums, correct, n = self.totals(coefficients)
        return PointLosses(losses=(sums / n).cpu(), accuracies=(correct / n).cpu())  # P numbers: on the CPU


class FunctionalPoints(PointEvaluator):
    """The reference: one functional forward per point (and per row chunk), for any model. With
    bn="recompute", each point's BatchNorm statistics are first recomputed from (x, y)'s inputs
    (`recompute_batchnorm`) in a private copy of the model."""

    def __init__(self, model, x, y, base, directions, *, bn: str = "keep", **kwargs):
        super().__init__(model, x, y, base, directions, **kwargs)
        self.bn_copy = batchnorm_copy(model, bn)

    def _sums(self, coefficients):
        rows = self.budget // max(1.0, graph_bytes_per_example(self.model, self.x, self.y, self.loss_fn, self.selection))
        sums = torch.zeros(coefficients.shape[0], dtype=torch.float64, device=self.x.device)
        correct = torch.zeros_like(sums)
        model = self.model if self.bn_copy is None else self.bn_copy
        for i, c in enumerate(coefficients):
            params = split_flat(self.base + self._step(c), self.selection)
            if self.bn_copy is not None:
                recompute_batchnorm(self.bn_copy, self.selection, params, self.x)
            for part in row_chunks(self.x.shape[0], rows):
                logits = functional_forward(model, self.selection, params, self.x[part])
                sums[i] += (self.loss_fn(logits, self.y[part]) * (part.stop - part.start)).double()
                if self.count_correct:
                    correct[i] += (logits.argmax(dim=-1) == self.y[part]).sum()
        return sums, correct if self.count_correct else torch.full_like(sums, math.nan)

    def _step(self, c: torch.Tensor) -> torch.Tensor:
        """c @ D over the directions the point moves along only: a flatness or PAC-Bayes point uses one of its K,
        and reading all K for each point took as long as ResNet-18's forward pass (0.16 s of 11.2 M × 20). One
        direction's c_k·d_k is c @ D bit for bit; more are summed by the same product."""
        used = c.nonzero().flatten()
        if used.numel() == 1:
            return c[used[0]] * self.directions[used[0]]
        return c @ self.directions if used.numel() == c.numel() else c[used] @ self.directions[used]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_bn_policy(bn: str) -> None:
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be 'keep' or 'recompute', got {bn!r}")


def batchnorm_copy(model: nn.Module, bn: str) -> nn.Module | None:
    """Under bn="recompute", a private copy of a model with BatchNorm, whose statistics `recompute_batchnorm` may
    overwrite at each point; None when the model's own statistics serve (bn="keep", or no BatchNorm)."""
    check_bn_policy(bn)
    return copying.deepcopy(model) if bn == "recompute" and has_batchnorm(model) else None


def recompute_batchnorm(model: nn.Module, selection: Selection, params: dict, x: torch.Tensor) -> None:
    """Garipov et al. 2018's update_bn at the parameter point `params`, into `model` (a private copy): every
    BatchNorm layer's running mean and unbiased variance reset and recomputed from the inputs it sees on x,
    layer after layer (each later layer normalised by the earlier layers' batch statistics, as in training), then
    eval mode. torch.optim.swa_utils.update_bn's rule (momentum None: a cumulative average over batches), in
    one batch of all of x, so the statistics are exactly those of every example."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            functional_forward(model, selection, params, x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
            m.eval()


class MLPPoints(PointEvaluator):
    """The MLP fast path. The first layer is linear in its weights,
        (W + Σ_k c_k·D_k)·Xᵀ + (b + Σ_k c_k·e_k) = (W·Xᵀ + b) + Σ_k c_k·(D_k·Xᵀ + e_k),
    so the first layer's outputs for θ and for each direction (the largest GEMMs: h × d × N each) are computed
    once and kept, and every point's first-layer output is a mixture of them: one small GEMM per batch of points.
    The later layers run as one batched product per batch, each point with its own weights, features first,
    (p, features, n). Equal to `FunctionalPoints`:
    tests/test_points.py::test_fast_and_general_paths_give_the_same_losses."""

    def __init__(self, model, layers, x, y, base, directions, **kwargs):
        super().__init__(model, x, y, base, directions, **kwargs)
        self.layers = layers
        self.rest = linear_parts(layers, self.base)[1:]
        self.rest_directions = linear_parts(layers, self.directions)[1:]
        self.classes = [m for m in layers if type(m) is nn.Linear][-1].out_features
        self.width = max(m.out_features for m in layers if type(m) is nn.Linear)
        # θ's own first-layer block is left out when base = 0 (points written as mixtures of endpoints)
        self.with_base = bool(self.base.any())
        (w0, b0), (dw0, db0) = linear_parts(layers, self.base)[0], linear_parts(layers, self.directions)[0]
        self.h0 = w0.shape[0]
        weights = torch.cat([*([w0[None]] if self.with_base else []), dw0]).reshape(-1, w0.shape[1])  # (R·h, d)
        biases = None if b0 is None else torch.cat([*([b0[None]] if self.with_base else []), db0]).reshape(-1, 1)
        self.first = (weights, biases)
        self.rows = weights.shape[0] // self.h0  # R: row blocks, θ's (if kept) and one per direction
        n = self.x.shape[0]
        self.chunks = row_chunks(n, self.budget // (2 * self.base.element_size() * self.h0 * max(1, self.rows)))
        self._kept = None
        if len(self.chunks) == 1:
            with torch.no_grad():
                self._kept = self._first_layer(self.chunks[0])

    def _first_layer(self, part: slice) -> torch.Tensor:
        """(R, h·n): the first layer's outputs of each row block for the examples `part`, features first."""
        if self._kept is not None:  # there is one chunk, so `part` is it
            return self._kept
        weights, biases = self.first
        z = weights @ self.x[part].flatten(1).T  # (R·h, n)
        if biases is not None:
            z += biases
        return z.view(self.rows, -1)

    def _sums(self, coefficients):
        sums = torch.zeros(coefficients.shape[0], dtype=torch.float64, device=self.x.device)
        correct = torch.zeros_like(sums)
        for part in self.chunks:
            n = part.stop - part.start
            blocks, y = self._first_layer(part), self.y[part]
            per_batch = max(1, min(self.budget, POINT_BATCH_BYTES) // (2 * self.base.element_size() * n * self.width))
            for start in range(0, coefficients.shape[0], per_batch):
                batch = slice(start, min(start + per_batch, coefficients.shape[0]))
                z = self._mix(coefficients[batch], blocks).view(-1, self.h0, n)  # (p, h, n)
                logits = self._tail(z, coefficients[batch])  # (p, C, n)
                s, r = self._loss_and_correct(logits, y)
                sums[batch] += s
                correct[batch] += r
        return sums, correct

    def _mix(self, c: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """θ's block plus c·(the directions' blocks), reading only the span of directions the batch uses: a view,
        so a probe of one direction reads its block and θ's, not all K (a copy of the used blocks would move as
        many bytes as the GEMM reads)."""
        used = torch.nonzero(c.ne(0).any(dim=0)).flatten().tolist()
        directions = blocks[1:] if self.with_base else blocks
        if not used:
            return (blocks[:1] if self.with_base else directions[:1] * 0).expand(c.shape[0], -1).clone()
        span = slice(used[0], used[-1] + 1)
        if self.with_base:
            return torch.addmm(blocks[:1], c[:, span], directions[span])
        return c[:, span] @ directions[span]

    def _tail(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The layers after the first Linear on a batch of points (p, features, n), each with its own weights."""
        index = 0
        for m in self.layers[1:]:
            if type(m) is not nn.Linear:
                z = _IN_PLACE[type(m)](z) if type(m) in _IN_PLACE else m(z)  # z is this batch's own array
                continue
            (w, b), (dw, db) = self.rest[index], self.rest_directions[index]
            index += 1
            w_p = torch.addmm(w.reshape(1, -1), c, dw.reshape(dw.shape[0], -1)).view(-1, *w.shape)  # (p, out, in)
            z = torch.bmm(w_p, z) if b is None else torch.baddbmm((b + c @ db)[:, :, None], w_p, z)  # (p, out, n)
        return z

    def _loss_and_correct(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and correct count per point for features-first logits (p, C, n)."""
        p, _, n = logits.shape
        if self.loss_fn is F.cross_entropy:
            sums = F.cross_entropy(logits, y.expand(p, n), reduction="none").sum(dim=1).double()
        else:
            sums = torch.stack([self.loss_fn(logits[i].T, y) for i in range(p)]).double() * n
        if not self.count_correct:
            return sums, torch.full((p,), math.nan, dtype=torch.float64, device=logits.device)
        # argmax over the classes of a class-last copy: over the middle axis in place it took 6x as long
        return sums, (logits.transpose(1, 2).contiguous().argmax(dim=2) == y).sum(dim=1).double()


class ShardedPoints:
    """A point evaluator over the whole data set from this rank's evaluator `local` over its slice: every point's
    summed loss and correct count, all-reduced, over N. Called as a `PointEvaluator` is."""

    def __init__(self, local, shard: DataShard) -> None:
        self.local, self.shard = local, shard

    def __call__(self, coefficients) -> PointLosses:
        sums, correct, _ = self.local.totals(coefficients)
        n = self.shard.examples
        if not self.local.count_correct:  # the accuracies are NaN: nothing to add up
            return PointLosses(losses=(self.shard.sum_(sums) / n).cpu(), accuracies=correct.cpu())
        both = self.shard.sum_(torch.stack([sums, correct]))  # one all-reduce for both
        return PointLosses(losses=(both[0] / n).cpu(), accuracies=(both[1] / n).cpu())


class SplitPoints:
    """A point evaluator whose points are spread over the ranks (`PointShare`): rank r evaluates the rows
    r, r + world, … of the coefficients with `local`, and the results are gathered back in order, the very
    numbers one process gets (each point is computed whole by one rank). Every rank must hold the same data
    and call it with the same coefficients. The points are split, not the directions: with each rank holding
    only its own directions, the first-layer mixture would sum fewer terms and round differently (last-bit
    differences in float64, measured), so the results would no longer be one process's."""

    def __init__(self, local, share: PointShare) -> None:
        self.local, self.group = local, share.group

    def __call__(self, coefficients) -> PointLosses:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        coefficients = torch.as_tensor(coefficients)
        mine = coefficients[rank::world]
        found = self.local(mine) if mine.shape[0] else None
        parts = [None] * world
        dist.all_gather_object(parts, None if found is None else (found.losses, found.accuracies), group=self.group)
        losses = torch.empty(coefficients.shape[0], dtype=torch.float64)
        accuracies = torch.empty_like(losses)
        for r, part in enumerate(parts):
            if part is not None:
                losses[r::world], accuracies[r::world] = part
        return PointLosses(losses=losses, accuracies=accuracies)


def point_evaluator(model: nn.Module, x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, directions: torch.Tensor,
                    *, loss_fn: LossFn | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET, path: str = "auto",
                    accuracy: bool = True, copy: bool = True, shard: DataShard | PointShare | None = None,
                    params: ParamSpec = None, bn: str = "keep") -> PointEvaluator | ShardedPoints | SplitPoints:
    """A callable coefficients (P, K) -> `PointLosses`, as `losses_at_points` with everything else fixed: the one
    dispatch point, `MLPPoints` for a plain MLP (path "auto" or "fast"), `FunctionalPoints` otherwise; with a
    `shard` (landscape.distributed) it sees the whole data set spread over the ranks (`DataShard`: (x, y) is
    this rank's slice) or spreads the points over them (`PointShare`: every rank holds all of (x, y)). Points
    lie in the space of the parameters `params` chooses (default: the trainable ones); the others stay fixed.
    `bn`: "keep" evaluates every point with the model's own BatchNorm running statistics, "recompute"
    recomputes them at each point from x (Garipov et al. 2018's update_bn, for the points between two models)."""
    check_bn_policy(bn)
    if bn == "recompute" and isinstance(shard, DataShard) and has_batchnorm(model):
        raise ValueError("bn='recompute' needs every example on each process; use a PointShare, not a DataShard")
    selection = select_parameters(model, params)
    layers = fast_path_layers(model, path, selection)
    kwargs = dict(loss_fn=loss_fn, memory_budget=memory_budget, accuracy=accuracy, copy=copy, selection=selection)
    if layers is not None:  # a plain MLP has no BatchNorm: both policies are the same
        evaluator = MLPPoints(model, layers, x, y, base, directions, **kwargs)
    else:
        evaluator = FunctionalPoints(model, x, y, base, directions, bn=bn, **kwargs)
    if isinstance(shard, DataShard):
        return ShardedPoints(evaluator, shard)
    if isinstance(shard, PointShare):
        return SplitPoints(evaluator, shard)
    return evaluator


def losses_at_points(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    base: torch.Tensor,
    directions: torch.Tensor,
    coefficients: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
    accuracy: bool = True,
    shard: DataShard | PointShare | None = None,
    params: ParamSpec = None,
    bn: str = "keep",
) -> PointLosses:
    """Loss and accuracy at θ_p = base + Σ_k coefficients[p, k]·directions[k] for every p, in batched passes.

    Shapes: base (D,), directions (K, D), coefficients (P, K). `path` is "auto" (fast when
    the model is a plain MLP), "fast" or "general"; both give the same numbers. With accuracy=False
    (or targets that are not class labels) the accuracies are NaN and cost nothing. `shard`
    (landscape.distributed): a `DataShard` when (x, y) is this rank's slice of a data set spread over
    processes, a `PointShare` to spread the points instead. `params` chooses the parameters the points move
    (default: those with requires_grad=True); `bn` keeps the model's BatchNorm statistics ("keep", default) or
    recomputes them at each point from x ("recompute", `point_evaluator`).
    """
    return point_evaluator(model, x, y, base, directions, loss_fn=loss_fn, memory_budget=memory_budget, path=path,
                           accuracy=accuracy, copy=False, shard=shard, params=params, bn=bn)(coefficients)
