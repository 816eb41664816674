"""Loss-landscape measurements: pure functions of a model and in-memory data.

Every function takes a model and tensors `x, y`, measures the mean loss over all
examples (cross-entropy unless a `loss_fn(outputs, targets)` returning a mean over
examples is given), works in the model's dtype and device, leaves the model exactly
as it found it (parameters, `.grad`, train/eval mode) and returns a small dataclass.
Randomness comes from a `torch.Generator` built from the `seed` argument.

Contents
1. Plumbing: flat parameter vectors, functional loss, memory-bounded chunking,
   the batched evaluation of many parameter points (`losses_at_points`).
2. Curvature: `hessian_operator`, `hessian_vector_product`, `exact_hessian`, Lanczos with full
   reorthogonalisation (`top_hessian_eigenvalue`, also by power iteration; `hessian_eigenpairs`),
   stochastic traces (`trace_estimate`, `hessian_trace`: Hutchinson, Hutch++), the spectral density
   (`hessian_spectral_density`, stochastic Lanczos quadrature) and per-layer blocks (`layer_curvature`).
3. Flatness: `filter_normalize`, `random_direction(s)`, `perturbation_flatness` (filter-normalised or
   adaptive), `worst_case_sharpness`, `pac_bayes_flatness`, `rescaled_copy` (Dinh et al.'s rescaling).
4. Gradient noise: `per_example_gradient_norms_sq`, `gradient_noise_scale` (B_simple, B_noise),
   `two_batch_noise_scale`, `noise_temperature`.
5. Connectivity: `barrier_height`, `barrier_definitions`, `linear_interpolation`, `weight_matching`
   (`permute_hidden_units`), `bezier_curve` (`bezier_points`).
6. Surfaces: `symmetric_grid`, `loss_surface_2d`, `loss_plane` (through three points).

Fast paths: for a plain MLP (an `nn.Sequential` of Linear layers and element-wise
activations, such as `models.SmallMLP`) the batched evaluation uses the linearity
of the first layer in its weights, and per-example gradient norms come from one
backward pass in closed form. Every other model takes the general path; tests check
that both paths agree.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import nn
from torch.func import functional_call

from training import sgd_step

__all__ = [
    "BezierResult",
    "DEFAULT_MEMORY_BUDGET",
    "EigenResult",
    "EigenpairsResult",
    "FlatnessResult",
    "HessianSpectrum",
    "InterpolationResult",
    "LayerCurvature",
    "NoiseScaleResult",
    "PacBayesResult",
    "PlaneResult",
    "PointEvaluator",
    "PointLosses",
    "SpectralDensity",
    "SurfaceResult",
    "TraceResult",
    "TwoBatchNoiseResult",
    "WeightMatchingResult",
    "WorstCaseResult",
    "barrier_definitions",
    "barrier_height",
    "bezier_curve",
    "bezier_points",
    "check_measurable",
    "exact_hessian",
    "filter_normalize",
    "flat_parameters",
    "gradient_noise_scale",
    "hessian_diagonal",
    "hessian_eigenpairs",
    "hessian_operator",
    "hessian_spectral_density",
    "hessian_spectrum",
    "hessian_spectrum_ends",
    "hessian_trace",
    "hessian_vector_product",
    "layer_curvature",
    "linear_interpolation",
    "loss_plane",
    "loss_surface_2d",
    "losses_at_points",
    "noise_temperature",
    "numpy_blas_single_threaded",
    "pac_bayes_flatness",
    "point_evaluator",
    "per_example_gradient_norms_sq",
    "per_example_gradients",
    "permute_hidden_units",
    "perturbation_flatness",
    "random_direction",
    "random_directions",
    "rescaled_copy",
    "symmetric_grid",
    "top_hessian_eigenvalue",
    "trace_estimate",
    "two_batch_noise_scale",
    "weight_matching",
    "worst_case_sharpness",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of scratch memory a measurement may use at once
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.Identity)
_STOCHASTIC_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


# ============================================================================ 1. plumbing


def check_measurable(model: nn.Module) -> None:
    """Raise ValueError when the loss is not a deterministic, finite function of the parameters."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} has non-finite values; the model cannot be measured "
                             "(did training diverge? lower the learning rate)")
    if model.training:
        for name, m in model.named_modules():
            if isinstance(m, _STOCHASTIC_IN_TRAINING):
                raise ValueError(f"module {name} ({type(m).__name__}) is in training mode, so the loss is not a "
                                 "fixed function of the parameters; call model.eval() before measuring")


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached flat vector, in `model.parameters()` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(name, p.shape) for name, p in model.named_parameters()]


def _split(flat: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    """A flat vector as a name -> tensor dict shaped like the model's parameters (views, no copy)."""
    out, offset = {}, 0
    for name, shape in _shapes(model):
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"vector has {flat.numel()} entries but the model has {offset} parameters")
    return out


_BUNDLED_BLAS_DIRS = ("numpy.libs", "scipy.libs")  # where the wheels keep their own OpenBLAS copies


def numpy_blas_single_threaded():
    """A context manager: the BLAS libraries bundled in numpy's and scipy's wheels run one thread meanwhile.
    Their OpenBLAS workers spin for a while after each call and take the cores from torch's products (a run's
    stages took 27 s instead of 21.5 s); a BLAS that torch may share (a system or conda library) is left alone."""
    controller = ThreadpoolController()
    bundled = [lib.filepath for lib in controller.lib_controllers
               if lib.user_api == "blas" and lib.filepath and Path(lib.filepath).parent.name in _BUNDLED_BLAS_DIRS]
    return controller.select(filepath=bundled).limit(limits=1)


def _loss_fn(loss_fn: LossFn | None) -> LossFn:
    return F.cross_entropy if loss_fn is None else loss_fn


def _prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the model and move the data to its device (and its dtype, for floating inputs)."""
    check_measurable(model)
    p = next(model.parameters())
    x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same, non-zero number of examples, got {x.shape[0]} and {y.shape[0]}")
    return x, y.to(p.device)


def _functional_loss(model, params, x, y, loss_fn) -> torch.Tensor:
    return loss_fn(functional_call(model, params, (x,)), y)


def _row_chunks(n: int, rows: int) -> list[slice]:
    rows = max(1, min(n, int(rows)))
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def _graph_bytes_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> float:
    """Bytes that autograd saves per example for a gradient built with create_graph (measured on 2 tiny batches)."""
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}

    def saved_bytes(n: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = _functional_loss(model, params, x[:n], y[:n], loss_fn)
            torch.autograd.grad(loss, list(params.values()), create_graph=True, materialize_grads=True)
        return total

    small, large = min(2, x.shape[0]), min(6, x.shape[0])
    if large == small:
        return float(saved_bytes(small))
    return max(1.0, (saved_bytes(large) - saved_bytes(small)) / (large - small))


def _is_integer_labels(y: torch.Tensor) -> bool:
    return not y.is_floating_point() and y.dim() == 1


def _loss_and_correct(logits, y, loss_fn, count_correct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and number of correct argmax predictions of a (n, C) logit block."""
    loss = loss_fn(logits, y) * y.shape[0]
    correct = (logits.argmax(dim=-1) == y).sum() if count_correct else torch.tensor(float("nan"))
    return loss, correct


@dataclass
class PointLosses:
    """Mean loss and accuracy at each parameter point of a batch."""

    losses: torch.Tensor  # (P,) float64
    accuracies: torch.Tensor  # (P,) float64, NaN when the targets are not class labels


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
) -> PointLosses:
    """Loss and accuracy at θ_p = base + Σ_k coefficients[p, k]·directions[k] for every p, in batched passes.

    Shapes: base (D,), directions (K, D), coefficients (P, K). `path` is "auto" (fast when
    the model is a plain MLP), "fast" or "general"; both give the same numbers. With accuracy=False
    (or targets that are not class labels) the accuracies are NaN and cost nothing.
    """
    return PointEvaluator(model, x, y, base, directions, loss_fn=loss_fn, memory_budget=memory_budget, path=path,
                          accuracy=accuracy, copy=False)(coefficients)


class PointEvaluator:
    """`losses_at_points` for one model, data, base and set of directions, called with many coefficient
    batches: on the MLP fast path the first layer's outputs for θ and every direction, the largest GEMM,
    are computed once and kept (when they fit the memory budget), so a search that asks for a few points at
    a time (PAC-Bayes σ, refined interpolation) pays for them once."""

    def __init__(self, model, x, y, base, directions, *, loss_fn=None, memory_budget=DEFAULT_MEMORY_BUDGET,
                 path="auto", accuracy=True, copy=True):
        self.model = model
        self.x, self.y = _prepare(model, x, y)
        self.count_correct = accuracy and _is_integer_labels(self.y)
        p0 = next(model.parameters())
        # private copies: the kept first layer must not go stale if the caller changes its tensors later
        # (copy=False: called once, at once, as by `losses_at_points`)
        self.base = base.detach().to(p0, copy=copy)
        self.directions = directions.detach().to(p0, copy=copy).reshape(-1, self.base.numel())
        self.loss_fn = _loss_fn(loss_fn)
        self.budget = memory_budget
        self.layers = _fast_path_layers(model, path)
        self._first = None
        if self.layers is not None:
            with torch.no_grad():
                self._first = _MLPFirstLayer(self.layers, self.x, self.base, self.directions, memory_budget)

    def __call__(self, coefficients) -> PointLosses:
        coefficients = torch.as_tensor(coefficients).to(self.base).reshape(-1, self.directions.shape[0])
        with torch.no_grad():
            if self._first is not None:
                sums, correct = _mlp_points(self._first, self.layers, self.y, self.base, self.directions,
                                            coefficients, self.loss_fn, self.budget, self.count_correct)
            else:
                sums, correct = _general_points(self.model, self.x, self.y, self.base, self.directions, coefficients,
                                                self.loss_fn, self.budget, self.count_correct)
        n = self.x.shape[0]
        return PointLosses(losses=sums / n, accuracies=correct / n)


def point_evaluator(model: nn.Module, x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, directions: torch.Tensor,
                    *, loss_fn: LossFn | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET, path: str = "auto",
                    accuracy: bool = True) -> PointEvaluator:
    """A callable coefficients (P, K) -> `PointLosses`, as `losses_at_points` with everything else fixed."""
    return PointEvaluator(model, x, y, base, directions, loss_fn=loss_fn, memory_budget=memory_budget, path=path,
                          accuracy=accuracy)


def _general_points(model, x, y, base, directions, coefficients, loss_fn, budget, count_correct):
    """One functional forward per point (and per row chunk): works for any model."""
    rows = budget // max(1.0, _graph_bytes_per_example(model, x, y, loss_fn))
    sums = torch.zeros(coefficients.shape[0], dtype=torch.float64)
    correct = torch.zeros_like(sums)
    for i, c in enumerate(coefficients):
        params = _split(base + c @ directions, model)
        for rows_slice in _row_chunks(x.shape[0], rows):
            out = functional_call(model, params, (x[rows_slice],))
            loss, right = _loss_and_correct(out, y[rows_slice], loss_fn, count_correct)
            sums[i] += loss.double().item()
            correct[i] += float(right)
    return sums, correct


# ----------------------------------------------------------------------------- MLP fast path


def _mlp_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers of a plain MLP (Sequential of [Flatten], Linear and element-wise modules), else None."""
    if type(model).forward is not nn.Sequential.forward or not isinstance(model, nn.Sequential):
        return None
    layers = list(model.children())
    while layers and type(layers[0]) is nn.Flatten:
        layers = layers[1:]
    if not layers or type(layers[0]) is not nn.Linear:
        return None
    if not all(type(m) is nn.Linear or type(m) in _ELEMENTWISE for m in layers):
        return None
    if any(getattr(m, "inplace", False) for m in layers):
        return None
    if sum(1 for _ in model.buffers()):
        return None
    return layers


def _fast_path_layers(model: nn.Module, path: str) -> list[nn.Module] | None:
    """The plain MLP's layers when `path` ("auto", "fast" or "general") takes the closed-form fast path, else None."""
    if path not in ("auto", "fast", "general"):
        raise ValueError(f"path must be 'auto', 'fast' or 'general', got {path!r}")
    layers = None if path == "general" else _mlp_layers(model)
    if path == "fast" and layers is None:
        raise ValueError("the fast path needs a plain MLP (nn.Sequential of Linear and element-wise layers)")
    return layers


def _linear_parts(layers, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Split a flat parameter vector (..., D) into (weight, bias) per Linear layer, batched over leading dims."""
    parts, offset, lead = [], 0, flat.shape[:-1]
    for m in layers:
        if type(m) is not nn.Linear:
            continue
        w_n = m.weight.numel()
        w = flat[..., offset : offset + w_n].reshape(*lead, *m.weight.shape)
        offset += w_n
        b = None
        if m.bias is not None:
            b = flat[..., offset : offset + m.out_features]
            offset += m.out_features
        parts.append((w, b))
    return parts


_DEFER_BIAS_MAX = 8.0  # see _mlp_tail: at |b| ≤ 10 the float32 loss matched the general path's error (7e-8)
_INPLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_, nn.Identity: lambda z: z}
# working set per batch of points (4 MLP points of 4,000 examples): with batches mixed by one GEMM that reads
# each direction's rows once, a 41×41 surface took 1.57 s at 16 MiB against 1.84 s at 8 (flatness: the same)
_CACHE_BYTES = 16 << 20


# when dropping X's constant columns pays (see _InputColumns.split): once, constant columns × weight rows ≥
# 160·d; per Hessian product, rows × constant columns × first-layer width ≥ 2**25
_SPLIT_PAYS, _SPLIT_PAYS_PER_PRODUCT = 160, 1 << 25


class _InputColumns:
    """A first layer's inputs X (N, d) kept as [X_v | 1]: the columns that vary over the rows, then one column
    of ones standing for the constant columns and for the bias. Products with X then skip the constant
    columns (MNIST's border pixels: 125 of 784 on the 4,000 training digits, 16% of the largest GEMMs), exactly:
        X·Wᵀ + b = [X_v | 1]·[W_v | W·c + b]ᵀ,   Gᵀ·X = Gᵀ·X_v on the varying columns and (Gᵀ·1)·cᵀ on the others,
    c (d,) the constant columns' values and zero elsewhere. Any rows of `x` may be used: a column constant on
    all is constant on each. Columns are moved as runs of neighbours (24 on MNIST), not gathered one by one:
    index_select took 11 ms for 20 directions' weights, the runs 1.3 ms."""

    def __init__(self, x: torch.Tensor, varies: torch.Tensor):
        varying = torch.nonzero(varies).flatten().cpu().numpy()
        self.runs = [(int(run[0]), int(run[-1]) + 1)
                     for run in np.split(varying, np.flatnonzero(np.diff(varying) != 1) + 1) if len(run)]
        self.varying = len(varying)
        self.values = torch.where(varies, 0.0, x[0])  # c
        self.x = self._narrow(x)
        self.x[:, -1] = 1

    @staticmethod
    def split(x: torch.Tensor, pays: Callable[[int], bool]) -> "_InputColumns | None":
        """The split of x (N, d), or None when no column is constant or `pays(number of constant columns)` is
        false. Measured here: finding the columns and copying X cost about 1.3 ns per entry of X, a GEMM
        multiply-add 8 ps, so multiplying X once with R weight rows pays when constant columns × R ≥ 160·d (20
        flatness directions of 128 rows: yes; a surface's 3: no); moving one Hessian product's columns costs
        about 0.5 ms (48 slices), so per product it pays when N × constant columns × width ≥ 2**25 (the 4,000
        training digits: 11.65 ms a product against 12.1; 1,000 or fewer: slower)."""
        if not pays(x.shape[1]):  # not even with every column constant: no need to look
            return None
        varies = x.amax(dim=0) != x.amin(dim=0)  # a NaN column counts as varying
        constant = x.shape[1] - int(varies.sum())
        return _InputColumns(x, varies) if constant and pays(constant) else None

    def _narrow(self, t: torch.Tensor) -> torch.Tensor:
        """t (..., d) -> (..., d_v + 1): the varying columns, then one column left for the caller to fill."""
        out = t.new_empty(*t.shape[:-1], self.varying + 1)
        at = 0
        for start, stop in self.runs:
            out[..., at : at + stop - start] = t[..., start:stop]
            at += stop - start
        return out

    def weights(self, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """w (..., d) [and b (...)] -> (..., d_v + 1), with X·wᵀ + b = self.x·weights(w, b)ᵀ."""
        out = self._narrow(w)
        out[..., -1] = w @ self.values if b is None else torch.add(w @ self.values, b)
        return out

    def spread(self, g: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
        """g (..., d_v + 1) = Gᵀ·self.x (of self.x² with squared=True) -> Gᵀ·X (..., d) (Gᵀ·X²)."""
        out = g[..., -1:] * (self.values.square() if squared else self.values)  # right on the constant columns
        at = 0
        for start, stop in self.runs:
            out[..., start:stop] = g[..., at : at + stop - start]
            at += stop - start
        return out


class _MLPFirstLayer:
    """(W + Σ_k c_k D_k)·Xᵀ = W·Xᵀ + Σ_k c_k D_k·Xᵀ: θ's first-layer output is row block 0 of one array and the
    directions' the blocks after it (θ's is skipped when base = 0, as for points written as mixtures of
    endpoints); every point is then a mixture of these row blocks. Kept when all rows fit the budget in one
    chunk, else recomputed per chunk."""

    def __init__(self, layers, x, base, directions, budget):
        (w0, b0), (dw0, db0) = _linear_parts(layers, base)[0], _linear_parts(layers, directions)[0]
        self.h0 = w0.shape[0]
        self.with_base = bool(base.any())
        self.rows_k = directions.shape[0] + int(self.with_base)
        # the row blocks' weights and biases: θ's, then the directions' as one (K·h0, d0) matrix (no concatenation
        # with θ's). On the inputs' varying columns and a column of ones when that pays (the ones carry the
        # constant columns' share and the biases); else on X itself, a bias block that is all zeros
        # (as filter-normalised directions have) not added
        blocks = [*([(w0, b0)] if self.with_base else []), (dw0, db0)]
        inputs = _InputColumns.split(x.flatten(1), lambda constant: constant * self.rows_k * self.h0
                                     >= _SPLIT_PAYS * math.prod(x.shape[1:]))
        self.split = inputs is not None
        if inputs is None:
            self.x = x.flatten(1)
            self.blocks = [(w.reshape(-1, self.x.shape[1]),
                            None if b is None or not bool(b.any()) else b.reshape(-1, 1)) for w, b in blocks]
        else:
            self.x = inputs.x
            self.blocks = [(inputs.weights(w, b).reshape(-1, self.x.shape[1]), None) for w, b in blocks]
        self.chunks = _row_chunks(self.x.shape[0], budget // (2 * base.element_size() * self.h0 * max(1, self.rows_k)))
        self._kept = None
        if len(self.chunks) == 1:
            self._kept = self.outputs(self.chunks[0])
            self.x = self.blocks = None  # not read again: the copy of X and the narrowed weights are freed

    def outputs(self, rows: slice) -> torch.Tensor:
        """(1 [+ K], h0·n) for the rows of one of `chunks`."""
        if self._kept is not None:  # there is one chunk, so `rows` is it
            return self._kept
        nr = rows.stop - rows.start
        z_all = torch.empty((self.rows_k * self.h0, nr), dtype=self.x.dtype, device=self.x.device)  # (rows·h, n)
        start = 0
        for w, b in self.blocks:  # each block's GEMM written in place: no concatenated weights, no copied output
            block = z_all[start : start + w.shape[0]]
            torch.mm(w, self.x[rows].T, out=block)
            if b is not None:
                block += b
            start += w.shape[0]
        return z_all.view(self.rows_k, self.h0 * nr)


def _mlp_points(first: _MLPFirstLayer, layers, y, base, directions, coefficients, loss_fn, budget, count_correct):
    """Batched MLP evaluation: the first (largest) layer from `first`, shared by all P points; later layers run
    as one `bmm` per batch of points.

    Activations are feature-major, (p, features, n), and live in buffers reused across batches
    (fresh multi-MB allocations cost more in page faults than the arithmetic).
    """
    rest = _linear_parts(layers, base)[1:]
    rest_dirs = _linear_parts(layers, directions)[1:]
    h0, with_base = first.h0, first.with_base
    coefficients_aug = torch.cat([torch.ones_like(coefficients[:, :1]), coefficients], 1) if with_base else coefficients
    used_rows = coefficients_aug.ne(0).cpu().numpy()
    n_classes = [m for m in layers if type(m) is nn.Linear][-1].out_features
    width = max(m.out_features for m in layers if type(m) is nn.Linear)
    bytes_per = base.element_size()
    sums = torch.zeros(coefficients.shape[0], dtype=torch.float64)
    correct = torch.zeros_like(sums)
    for rs in first.chunks:
        yr, nr = y[rs], rs.stop - rs.start
        z_all = first.outputs(rs)
        per_batch = max(1, min(budget, _CACHE_BYTES) // (2 * bytes_per * nr * width))
        buffers, classes = {}, _Classes(yr, n_classes, count_correct)
        for ps in _point_batches(used_rows, per_batch):
            c = coefficients[ps]  # (p, K)
            z = _buffer(buffers, "first", (c.shape[0], h0, nr), base)
            _mix_rows(coefficients_aug[ps], used_rows[ps], z_all, out=z.view(c.shape[0], -1))  # (p, h, n)
            logits = _mlp_tail(layers, z, c, used_rows[ps][:, 1:] if with_base else used_rows[ps], rest, rest_dirs,
                               buffers)  # (p, C, n)
            s, r = _batched_loss_and_correct(logits, classes, loss_fn)
            sums[ps] += s
            correct[ps] += r
    return sums, correct


def _evenly_spaced(columns) -> bool:
    """Whether sorted indices are an arithmetic progression (so rows[columns] is a strided view)."""
    return len(columns) < 3 or len(set(np.diff(columns).tolist())) == 1


def _mixable(columns) -> bool:
    """Whether `_mix_rows` mixes these rows with one GEMM over a view: evenly spaced but perhaps for the first
    (θ's row beside a block of directions, added as a rank-one update)."""
    return _evenly_spaced(columns) or _evenly_spaced(columns[1:])


def _point_batches(used: np.ndarray, most: int) -> list[slice]:
    """Consecutive points in batches of at most `most`; a batch whose rows in use are `_mixable` ends early
    rather than take a point that would break that, so that its mixture stays one GEMM (noise draws that are
    not filter-normalised, or directions some way apart). Walks runs of points with the same rows, not points:
    a 41×41 surface has 123 runs."""
    points = used.shape[0]
    starts = [0, *(np.flatnonzero((used[1:] != used[:-1]).any(axis=1)) + 1).tolist()] if points else []
    batches, first, rows = [], 0, None
    for run, stop in zip(starts, [*starts[1:], points]):
        if rows is not None:
            joined = rows | used[run]
            if _mixable(np.flatnonzero(rows)) and not _mixable(np.flatnonzero(joined)):
                batches.append(slice(first, run))
                first, joined = run, used[run]
            rows = joined
        else:
            rows = used[run]
        while stop - first >= most:  # full batches within the run; the rest joins the next run's points
            batches.append(slice(first, first + most))
            first, rows = first + most, (used[first + most] if first + most < stop else None)
    if first < points:
        batches.append(slice(first, points))
    return batches


def _mix_rows(c: torch.Tensor, used: np.ndarray, rows: torch.Tensor, *, out: torch.Tensor,
              base: torch.Tensor | None = None) -> None:
    """out = [base +] c·rows (rows may be strided), reading only the rows that some point uses (`used`, the
    pattern c ≠ 0 as a NumPy array: a flatness probe uses θ's row and one direction's). When those rows are
    evenly spaced it is one GEMM over a view of them, which reads each row once for all p points (a GEMM with
    K = 2 mixed 6 flatness points in half the time of 6 additions), plus a rank-one update for a first row
    apart from the others; else a pass per point and row."""
    columns = np.flatnonzero(used.any(axis=0))
    if len(columns) == 0:
        if base is None:
            out.zero_()
        else:
            out.copy_(base.expand_as(out))
        return
    if _mixable(columns):
        lone = None if _evenly_spaced(columns) else int(columns[0])
        block = columns if lone is None else columns[1:]
        step = int(block[1] - block[0]) if len(block) > 1 else 1
        picked = slice(int(block[0]), int(block[-1]) + 1, step)
        if base is None:
            torch.mm(c[:, picked], rows[picked], out=out)
        else:
            torch.addmm(base, c[:, picked], rows[picked], out=out)
        if lone is not None:
            out.addr_(c[:, lone], rows[lone])
        return
    values = c.tolist()
    for i in range(c.shape[0]):
        first, *others = [j for j in columns if used[i, j]] or [None]
        target = out[i]
        if first is None:
            if base is None:
                target.zero_()
            else:
                target.copy_(base[0])
            continue
        if base is not None:
            torch.add(base[0], rows[first], alpha=values[i][first], out=target)
        else:
            torch.mul(rows[first], values[i][first], out=target)
        for j in others:
            target.add_(rows[j], alpha=values[i][j])


def _buffer(buffers: dict, key, shape, like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of `shape`, reused while the shape fits (the last batch may be smaller)."""
    size = math.prod(shape)
    if key not in buffers or buffers[key].numel() < size:
        buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
    return buffers[key][:size].view(shape)


def _mlp_tail(layers, z, c, used, rest, rest_dirs, buffers):
    """The layers after the first Linear, on a batch of points (p, features, n), each with its own weights.

    A hidden Linear followed by ReLU and another Linear defers its bias b: ReLU(o + b) = max(o, −b) + b, so
    max(o, −b) is one pass where adding b and the ReLU were two, and the next Linear adds W·b to its own bias.
    Where a unit is off, W·(−b) and W·b cancel, which costs float32 digits when |b| is large (1e-5 of the loss
    at |b| = 10⁴): biases beyond `_DEFER_BIAS_MAX` are added the plain way."""
    modules = layers[1:]
    carried = None  # (p, features): the bias deferred past a ReLU
    linear_index = 0
    for i, m in enumerate(modules):
        if type(m) is not nn.Linear:
            if carried is not None:  # the ReLU after a deferred bias
                z = torch.maximum(z, carried.neg()[:, :, None], out=z)
            else:
                z = _INPLACE[type(m)](z) if type(m) in _INPLACE else m(z)
            continue
        (w, b), (dw, db) = rest[linear_index], rest_dirs[linear_index]
        linear_index += 1
        w_p = _buffer(buffers, ("w", i), (c.shape[0], w.numel()), w)
        _mix_rows(c, used, dw.reshape(dw.shape[0], -1), base=w.reshape(1, -1), out=w_p)
        w_p = w_p.view(-1, *w.shape)  # (p, out, in): this layer's weights at each point
        bias = None if b is None else b + c @ db  # (p, out)
        if carried is not None:
            moved = torch.bmm(w_p, carried[:, :, None])[:, :, 0]
            bias = moved if bias is None else bias.add_(moved)
        defer = (bias is not None and i + 2 < len(modules) and type(modules[i + 1]) is nn.ReLU
                 and type(modules[i + 2]) is nn.Linear and float(bias.abs().max()) <= _DEFER_BIAS_MAX)
        carried = bias if defer else None
        out = _buffer(buffers, i, (z.shape[0], w.shape[0], z.shape[2]), z)
        if bias is None or defer:
            z = torch.bmm(w_p, z, out=out)  # (p, out, n)
        else:
            z = torch.baddbmm(bias[:, :, None], w_p, z, out=out)
    return z


class _Classes:
    """Integer targets of one row chunk, laid out for counting correct predictions in feature-major logits."""

    def __init__(self, y: torch.Tensor, n_classes: int, count_correct: bool):
        self.y, self.count = y, count_correct
        if count_correct:
            self.index = y.view(1, 1, -1)
            # earlier[j, i]: class j comes before example i's label (argmax returns the first maximum)
            self.earlier = torch.arange(n_classes, device=y.device)[:, None] < y[None, :]


def _batched_loss_and_correct(logits, classes: _Classes, loss_fn):
    """Summed loss and correct count per point for feature-major logits (p, C, n). A prediction is right when
    the label's logit is the maximum and no earlier class ties it: argmax's rule, without the transposed copy
    that argmax over the class axis needs."""
    p, _, n = logits.shape
    y = classes.y
    if loss_fn is F.cross_entropy:
        sums = F.cross_entropy(logits, y.expand(p, n), reduction="none").sum(dim=1).double()
    else:
        sums = torch.stack([loss_fn(logits[i].T, y) for i in range(p)]).double() * n
    if not classes.count:
        return sums, torch.full((p,), float("nan"), dtype=torch.float64)
    is_max = logits == logits.amax(dim=1, keepdim=True)  # (p, C, n)
    hit = is_max.gather(1, classes.index.expand(p, 1, n)).squeeze(1)
    tied_before = (is_max & classes.earlier).any(dim=1)
    return sums, (hit & ~tied_before).sum(dim=1).double()


# ============================================================================ 2. curvature


class HessianOperator:
    """V -> H·V for the mean loss over (x, y), H the Hessian w.r.t. all parameters (rows of V flat, in
    `parameters()` order), by autograd's double backward, which every loss and model supports.

    When the double-backward graph fits in the memory budget it is built once and every
    product is one backward pass through it (about 1.25x a forward+backward); otherwise
    each product recomputes the graph chunk by chunk, weighting chunk n_c by n_c/N.
    """

    def __init__(self, model, x, y, loss_fn, memory_budget):
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
        self.dim = sum(p.numel() for p in self.params.values())
        self.matvecs = 0
        per_example = _graph_bytes_per_example(model, x, y, loss_fn)
        self.chunks = _row_chunks(x.shape[0], memory_budget // per_example)
        self._grads = self._gradient_graph(self.chunks[0]) if len(self.chunks) == 1 else None

    def _gradient_graph(self, rows: slice) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            loss = _functional_loss(self.model, self.params, self.x[rows], self.y[rows], self.loss_fn)
            return torch.autograd.grad(loss, list(self.params.values()), create_graph=True, materialize_grads=True)

    def _products(self, grads, vs: torch.Tensor) -> torch.Tensor:
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # a gradient that is constant has no Hessian
        parts = [_split_rows(vs, self.model)[i] for i in live]
        params = list(self.params.values())
        outputs = [grads[i] for i in live]
        # one backward per vector: vmap (is_grads_batched) falls back to a slower loop for common losses
        rows = [torch.autograd.grad(outputs, params, [p[b] for p in parts], retain_graph=True, allow_unused=True)
                for b in range(vs.shape[0])]
        hv = [None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(params))]
        return torch.cat([(h if h is not None else torch.zeros((vs.shape[0], *p.shape), dtype=p.dtype)
                           ).reshape(vs.shape[0], -1) for h, p in zip(hv, params)], dim=1)

    def gradient(self) -> torch.Tensor:
        """∇L, flat (from the kept gradient graph, or chunk by chunk)."""
        if self._grads is not None:
            return torch.cat([g.detach().reshape(-1) for g in self._grads])
        n = self.x.shape[0]
        return sum((rows.stop - rows.start) / n * torch.cat([g.detach().reshape(-1) for g in self._gradient_graph(rows)])
                   for rows in self.chunks)

    def matmat(self, vs: torch.Tensor, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """H·vᵢ for every row vᵢ of vs (b, D); with `outputs` (b, D) of zeros and ones, (H·vᵢ)⊙outputsᵢ."""
        self.matvecs += vs.shape[0]
        vs = vs.detach()
        if self._grads is not None:
            total = self._products(self._grads, vs).detach()
        else:
            total = torch.zeros_like(vs)
            for rows in self.chunks:
                total += (rows.stop - rows.start) / self.x.shape[0] * self._products(self._gradient_graph(rows), vs).detach()
        return total if outputs is None else total * outputs.to(total)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[None])[0]


def _split_rows(vs: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """Rows of flat vectors (b, D) as per-parameter tensors (b, *shape)."""
    out, offset = [], 0
    for _, shape in _shapes(model):
        n = math.prod(shape)
        out.append(vs[:, offset : offset + n].reshape(vs.shape[0], *shape))
        offset += n
    return out


class MLPHessianOperator:
    """Closed-form V -> H·V for a plain MLP: Pearlmutter's R-operator, a forward then a backward pass.

    For Linear layers z_l = a_l·W_lᵀ + b_l with a_{l+1} = φ_l(z_l) element-wise, the direction
    v = (V_l, c_l) gives Rz_l = Ra_l·W_lᵀ + a_l·V_lᵀ + c_l and Ra_{l+1} = φ_l'(z_l)⊙Rz_l; backwards,
    Rδ_last = ∇²_z L·Rz_last (the loss Hessian in the logits, by autograd on an (N, C) graph),
    Rδ_{l−1} = φ'⊙(Rδ_l·W_l + δ_l·V_l) + φ''⊙Rz_{l−1}⊙(δ_l·W_l), and H·v = (Rδ_lᵀ·a_l + δ_lᵀ·Ra_l, ΣRδ_l).
    The activations, φ', φ'' and δ are computed once; b directions at a time share every GEMM.
    """

    def __init__(self, model, layers, x, y, loss_fn, memory_budget):
        self.x, self.y, self.loss_fn = x, y, loss_fn
        self.linears = [m for m in layers if type(m) is nn.Linear]
        groups, current = [], []
        for m in layers[1:]:
            if type(m) is nn.Linear:
                groups.append(current)
                current = []
            else:
                current.append(m)
        self.between, self.tail = groups, current  # element-wise maps after each hidden Linear, after the last
        self.weights = [(m.weight.detach(), None if m.bias is None else m.bias.detach()) for m in self.linears]
        # plain cross-entropy on class labels: the logits' gradient and Hessian in closed form
        self.cross_entropy = loss_fn is F.cross_entropy and not self.tail and _is_integer_labels(y)
        self.dim = sum(p.numel() for p in model.parameters())
        self.matvecs = 0
        self.budget = memory_budget
        # per row, the cache holds about five vectors per hidden layer and three per output (the input is a view;
        # the split's copy of it, below, is kept whole and only made when it takes at most a quarter of the budget)
        per_row = (5 * sum(m.out_features for m in self.linears[:-1]) + 3 * self.linears[-1].out_features)
        self.chunks = _row_chunks(x.shape[0], memory_budget // (per_row * x.element_size()))
        # the first layer's inputs without their constant columns: every product multiplies them twice
        rows, width = max((c.stop - c.start for c in self.chunks), default=0), self.linears[0].out_features
        self.inputs = _InputColumns.split(x.flatten(1), lambda constant: rows * constant * width
                                          >= _SPLIT_PAYS_PER_PRODUCT and 4 * x.numel() * x.element_size()
                                          <= memory_budget)
        self.first = None if self.inputs is None else self.inputs.weights(*self.weights[0])
        self._caches = [self._cache(rows) for rows in self.chunks] if len(self.chunks) == 1 else None

    @staticmethod
    def _compose(modules, z):
        for m in modules:
            z = m(z)
        return z

    def _cache(self, rows: slice) -> dict:
        """Activations, φ', φ'', δ and the logits' gradient graph for one chunk of rows (loss weighted by n_c/N)."""
        weight = (rows.stop - rows.start) / self.x.shape[0]
        a, zs, d1s, d2s = [self.x[rows].flatten(1)], [], [], []
        with torch.enable_grad():
            for l, (w, b) in enumerate(self.weights):
                z = F.linear(a[-1], w, b) if l or self.inputs is None else self.inputs.x[rows] @ self.first.T
                z = z.detach().requires_grad_(True)
                zs.append(z)
                if l == len(self.weights) - 1:
                    break
                if [type(m) for m in self.between[l]] == [nn.ReLU]:  # φ' = [z > 0] (autograd's rule at 0), φ'' = 0
                    out = torch.relu(z.detach())
                    d1s.append(torch.sign(out))  # [z > 0] in one pass: out ≥ 0
                    d2s.append(None)
                    a.append(out)
                    continue
                out = self._compose(self.between[l], z)
                d1 = torch.autograd.grad(out.sum(), z, create_graph=True)[0] if out.requires_grad else torch.ones_like(z)
                d2 = torch.autograd.grad(d1.sum(), z)[0] if d1.requires_grad else None
                d1s.append(d1.detach())
                d2s.append(d2 if d2 is not None and bool(d2.any()) else None)  # φ'' = 0 almost everywhere: skipped
                a.append(out.detach())
            logits = zs[-1]
            probabilities = torch.softmax(logits.detach(), dim=1)
            if self.cross_entropy:  # ∂L/∂z = (p − onehot(y))/N in closed form: no graph to build
                grad_logits = probabilities.clone()
                grad_logits[torch.arange(logits.shape[0], device=logits.device), self.y[rows]] -= 1
                grad_logits *= weight / logits.shape[0]
            else:
                grad_logits = torch.autograd.grad(weight * self.loss_fn(self._compose(self.tail, logits),
                                                                        self.y[rows]), logits, create_graph=True)[0]
        deltas = [None] * len(self.weights)
        deltas[-1] = grad_logits.detach()
        grad_inputs = [None] * len(self.weights)
        for l in range(len(self.weights) - 1, 0, -1):
            grad_inputs[l] = deltas[l] @ self.weights[l][0]  # ∂L/∂a_l
            deltas[l - 1] = d1s[l - 1] * grad_inputs[l]
        return {"a": a, "inputs": None if self.inputs is None else self.inputs.x[rows], "d1": d1s, "d2": d2s,
                "deltas": deltas, "grad_inputs": grad_inputs, "logits": logits, "grad_logits": grad_logits,
                "probabilities": probabilities[:, None, :]}

    def _r_forward(self, cache: dict, directions, b: int, first_in) -> tuple[list, list]:
        """Rz_l and Ra_l for b directions at once, laid out (n, b, features); a_0·V_0ᵀ, the largest GEMM, only
        for the directions `first_in` (the others have V_0 = 0). A hidden Rz_l is kept only where φ'' ≠ 0 needs
        it again (None elsewhere): for ReLU, Ra_l = φ'⊙Rz_l overwrites it in place, which spares a fresh
        (n, b, width) array per layer."""
        a, d1, d2 = cache["a"], cache["d1"], cache["d2"]
        n = a[0].shape[0]
        rz, ra = [], [None]
        for l, ((w, _), (dw, db)) in enumerate(zip(self.weights, directions)):
            if l == 0:
                z = _some_columns(lambda cols: self._times_inputs(cache, dw[cols].reshape(-1, w.shape[1])),
                                  first_in, b, (n, b, w.shape[0]), dim=1, like=a[0])
            else:  # a_l·V_lᵀ + Ra_l·W_lᵀ, the second GEMM accumulating into the first's output
                z = (a[l] @ dw.reshape(-1, w.shape[1]).T).view(n, b, w.shape[0])
                z.view(n * b, -1).addmm_(ra[l].reshape(n * b, -1), w.T)
            if db is not None:
                z += db
            if l == len(self.weights) - 1:
                rz.append(z)
            elif d2[l] is None:
                rz.append(None)
                ra.append(z.mul_(d1[l][:, None, :]))
            else:
                rz.append(z)
                ra.append(d1[l][:, None, :] * z)
        return rz, ra

    def _product(self, cache: dict, directions, b: int, first_in, first_out) -> torch.Tensor:
        a, d1, d2, deltas = cache["a"], cache["d1"], cache["d2"], cache["deltas"]
        n = a[0].shape[0]
        rz, ra = self._r_forward(cache, directions, b, first_in)
        r_delta = self._logit_hessian_product(cache, rz[-1])  # (n, b, C)
        grads = []
        for l in range(len(self.weights) - 1, -1, -1):
            (w, bias), dw = self.weights[l], directions[l][0]
            out_f, in_f = w.shape
            if l == 0:  # Rδ_0ᵀ·a_0, the other large GEMM, only for the products whose V_0 block is wanted
                grad_w = _some_columns(lambda cols: self._inputs_times(cache, r_delta[:, cols].reshape(n, -1)),
                                       first_out, b, (b, out_f, in_f), dim=0, like=a[0])
            else:
                grad_w = (r_delta.reshape(n, b * out_f).T @ a[l]).view(b, out_f, in_f)
            if l > 0:
                grad_w += (deltas[l].T @ ra[l].reshape(n, b * in_f)).view(out_f, b, in_f).transpose(0, 1)
            grads = [grad_w.reshape(b, -1), *([] if bias is None else [r_delta.sum(dim=0)]), *grads]
            if l > 0:
                r_prev = (deltas[l] @ dw.transpose(0, 1).reshape(out_f, b * in_f)).view(n, b, in_f)
                r_prev.view(n * b, in_f).addmm_(r_delta.reshape(n * b, out_f), w)  # + Rδ_l·W_l
                r_prev *= d1[l - 1][:, None, :]
                if d2[l - 1] is not None:
                    r_prev += d2[l - 1][:, None, :] * rz[l - 1] * cache["grad_inputs"][l][:, None, :]
                r_delta = r_prev
        return torch.cat(grads, dim=1)

    def _times_inputs(self, cache: dict, w: torch.Tensor) -> torch.Tensor:
        """X·wᵀ (n, R) for the chunk's inputs X and w (R, d)."""
        if self.inputs is None:
            return cache["a"][0] @ w.T
        return cache["inputs"] @ self.inputs.weights(w).T

    def _inputs_times(self, cache: dict, g: torch.Tensor, sub: slice = slice(None), *,
                      squared: bool = False) -> torch.Tensor:
        """gᵀ·X (R, d) for the inputs X of the chunk's rows `sub` (gᵀ·X² with squared=True) and g (n, R)."""
        if self.inputs is None:
            x = cache["a"][0][sub]
            return g.T @ (x.square() if squared else x)
        x = cache["inputs"][sub]
        return self.inputs.spread(g.T @ (x.square() if squared else x), squared=squared)

    def _logit_hessian_product(self, cache: dict, r: torch.Tensor) -> torch.Tensor:
        """∇²_z L·r for r (n, b, C): for plain cross-entropy the closed form (w/n)(p⊙r − p(pᵀr)), p = softmax(z),
        w the chunk's share of the mean; for any other loss, autograd on the (n, C) graph, one direction at a time
        (vmap's fallback for log-softmax's double backward is slower than a loop)."""
        if self.cross_entropy:
            weight = 1.0 / self.x.shape[0]  # the chunk's share n_c/N of the mean times its own 1/n_c
            p = cache["probabilities"]
            return weight * (p * r - p * (p * r).sum(dim=2, keepdim=True))
        grads = [torch.autograd.grad(cache["grad_logits"], cache["logits"], r[:, j], retain_graph=True)[0]
                 for j in range(r.shape[1])]
        return torch.stack(grads, dim=1)

    def gradient(self) -> torch.Tensor:
        """∇L, flat: δ_lᵀ·a_l and Σδ_l per Linear layer, from the cached backward pass."""
        total = None
        for i, rows in enumerate(self.chunks):
            cache = self._caches[i] if self._caches is not None else self._cache(rows)
            parts = []
            for l, ((_, bias), a, delta) in enumerate(zip(self.weights, cache["a"], cache["deltas"])):
                grad_w = self._inputs_times(cache, delta) if l == 0 else delta.T @ a
                parts += [grad_w.reshape(-1), *([] if bias is None else [delta.sum(dim=0)])]
            flat = torch.cat(parts)
            total = flat if total is None else total + flat
        return total

    def diagonal(self) -> torch.Tensor | None:
        """diag(H), exactly, when every activation has φ'' = 0 on the data (ReLU, LeakyReLU, Identity); else None.

        Then the network is piecewise linear in each single parameter, so ∂²f/∂θᵢ² = 0 and H's diagonal is the
        Gauss-Newton one: Hᵢᵢ = Σ_n J_n[:, i]ᵀ·∇²_z L_n·J_n[:, i] with J_n = ∂z_last/∂θ. For W_l[j, k] that is
        Σ_n Q_l[n, j]·a_l[n, k]² with Q_l[n, j] = (J_lᵀ·∇²L_n·J_l)_jj and J_l = ∂z_last/∂z_l, carried back
        like δ (J_{l−1} = (J_l·W_l)⊙φ'); a bias adds Σ_n Q_l[n, j]. One backward pass of C vectors, no products.
        """
        total = None
        classes = self.weights[-1][0].shape[0]
        # per row: J_l and ∇²L·J_l (C × width each) and the squared inputs
        per_row = (2 * classes * max(w.shape[0] for w, _ in self.weights) + self.x[:1].flatten(1).shape[1])
        for i, rows in enumerate(self.chunks):
            cache = self._caches[i] if self._caches is not None else self._cache(rows)
            if any(d2 is not None for d2 in cache["d2"]):
                return None
            n, like = cache["a"][0].shape[0], cache["a"][0]
            eye = torch.eye(classes, dtype=like.dtype, device=like.device).expand(n, classes, classes)
            loss_hessian = self._logit_hessian_product(cache, eye)  # (n, C, C): ∇²_z L_n, symmetric
            for sub in _row_chunks(n, self.budget // (per_row * like.element_size())):
                flat = self._diagonal_part(cache, loss_hessian[sub], sub)
                total = flat if total is None else total.add_(flat)
        return total

    def _diagonal_part(self, cache: dict, loss_hessian: torch.Tensor, sub: slice) -> torch.Tensor:
        """The rows `sub` of one chunk's share of diag(H)."""
        a, d1 = cache["a"], cache["d1"]
        jac = None  # J_l (n, C, out) = ∂z_last/∂z_l; the identity for the last layer
        parts = []
        for l in range(len(self.weights) - 1, -1, -1):
            w, bias = self.weights[l]
            if jac is None:
                q = torch.diagonal(loss_hessian, dim1=1, dim2=2)  # (n, C)
            else:
                q = ((loss_hessian @ jac) * jac).sum(dim=1)  # (n, out): (J_lᵀ·∇²L·J_l)_jj
            grad_w = self._inputs_times(cache, q, sub, squared=True) if l == 0 else q.T @ a[l][sub].square()
            parts = [grad_w.reshape(-1), *([] if bias is None else [q.sum(dim=0)]), *parts]
            if l > 0:
                jac = (w if jac is None else jac @ w) * d1[l - 1][sub, None, :]  # (n, C, in) by broadcasting
        return torch.cat(parts)

    def matmat(self, vs: torch.Tensor, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """H·vᵢ for every row vᵢ of vs (b, D); with `outputs` (b, D) of zeros and ones, (H·vᵢ)⊙outputsᵢ, and the
        two GEMMs with the inputs (most of the cost) are skipped where vᵢ or outputsᵢ has no first-layer weight."""
        self.matvecs += vs.shape[0]
        b = vs.shape[0]
        directions = _linear_parts(self.linears, vs.detach())
        first_in = first_out = list(range(b))
        if outputs is not None:  # restricted products (diagonal blocks): find the ones with no first-layer part
            first_in = torch.nonzero(directions[0][0].reshape(b, -1).any(dim=1)).flatten().tolist()
            first_out = torch.nonzero(_linear_parts(self.linears, outputs)[0][0].reshape(b, -1).any(dim=1)).flatten().tolist()
        total = None
        with torch.no_grad():
            for i, rows in enumerate(self.chunks):
                cache = self._caches[i] if self._caches is not None else self._cache(rows)
                product = self._product(cache, directions, b, first_in, first_out)
                total = product if total is None else total.add_(product)
        return total if outputs is None else total * outputs.to(total)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[None])[0]


def _some_columns(compute, columns: list[int], b: int, shape, *, dim: int, like: torch.Tensor) -> torch.Tensor:
    """compute(index) for the listed columns (indices along `dim` of a result of `shape`; compute's result is
    viewed so), zeros elsewhere; all b columns at once (index = slice(None)) when every one is listed."""
    def part(index, count: int) -> torch.Tensor:
        return compute(index).view(*shape[:dim], count, *shape[dim + 1 :])

    if len(columns) == b:
        return part(slice(None), b)
    out = torch.zeros(shape, dtype=like.dtype, device=like.device)
    if columns:
        out.index_copy_(dim, torch.tensor(columns, device=like.device), part(columns, len(columns)))
    return out


def hessian_operator(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
) -> HessianOperator | MLPHessianOperator:
    """The exact Hessian of the mean loss as a matrix-free operator: `op(v)` = H·v, `op.matmat(V)` = rows H·vᵢ.

    path="auto" uses the closed-form R-operator for plain MLPs and autograd's double backward
    (reverse-over-reverse, which every loss supports) for any other model; "fast"/"general" force one.
    """
    x, y = _prepare(model, x, y)
    layers = _fast_path_layers(model, path)
    if layers is not None:
        return MLPHessianOperator(model, layers, x, y, _loss_fn(loss_fn), memory_budget)
    return HessianOperator(model, x, y, _loss_fn(loss_fn), memory_budget)


def hessian_vector_product(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, loss_fn: LossFn | None = None
) -> torch.Tensor:
    """Exact H·v, H = ∇²_θ (1/N) Σ_i ℓ(f_θ(x_i), y_i); v and the result are flat over `model.parameters()`."""
    return hessian_operator(model, x, y, loss_fn=loss_fn)(v.to(next(model.parameters())))


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn | None = None,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """The dense Hessian (D, D) of the mean loss, column block by column block (for small models)."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    like = flat_parameters(model)
    columns = max(1, min(op.dim, memory_budget // max(1, 8 * op.dim * like.element_size())))
    blocks = [op.matmat(torch.eye(op.dim, dtype=like.dtype, device=like.device)[s : s + columns])
              for s in range(0, op.dim, columns)]
    dense = torch.cat(blocks)
    return (dense + dense.T) / 2  # symmetric up to rounding; make it exactly so


# ----------------------------------------------------------------------------- Lanczos


@dataclass
class _Lanczos:
    """One Lanczos run: the tridiagonal T (alphas on the diagonal, betas off it) and the orthonormal basis."""

    alphas: list = field(default_factory=list)
    betas: list = field(default_factory=list)
    beta_next: float = 0.0
    basis: torch.Tensor | None = None  # (m, D) after the run
    finished: bool = False

    def ritz(self, k: int, which: str):
        """The k wanted Ritz values (largest first / most negative first), their vectors, residual estimates
        β_m·|s_m| (exact in exact arithmetic, reliable with full reorthogonalisation) and max |θ|."""
        values, vectors = np.linalg.eigh(np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1))
        order = (np.argsort(-values) if which == "largest" else np.argsort(values))[: min(k, len(values))]
        residuals = abs(self.beta_next) * np.abs(vectors[-1, order])
        ritz_vectors = torch.from_numpy(np.ascontiguousarray(vectors[:, order].T)).to(self.basis) @ self.basis
        return values[order], ritz_vectors, residuals, float(np.abs(values).max())

    def converged(self, k: int, which: str, tol: float) -> bool:
        values, vectors = np.linalg.eigh(np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1))
        order = (np.argsort(-values) if which == "largest" else np.argsort(values))[:k]
        scale = max(float(np.abs(values).max()), 1e-30)  # ≈ ‖H‖: eigenvalues near zero cannot stall the test
        residuals = abs(self.beta_next) * np.abs(vectors[-1, order])
        return len(order) == k and bool(np.all(residuals <= tol * np.maximum(np.abs(values[order]), 1e-8 * scale)))


_DGKS = 1 / math.sqrt(2)  # reorthogonalise again when a pass shrank the vector below this share of its norm


def _lanczos_runs(matmat, starts: torch.Tensor, *, max_steps, done=lambda run: False, outputs=None) -> list[_Lanczos]:
    """Independent Lanczos runs with full reorthogonalisation, advanced in lockstep so that each step is one
    batched product H·[q_1 ... q_R]. Run r stops after max_steps (an int, or one per run), when `done(run)` says
    so, or at breakdown (β ≈ 0: its Krylov space is invariant and its Ritz values are exact).
    `outputs` (R, D) of zeros and ones restricts run r's products to outputs[r] (for diagonal blocks: the start
    must lie in the same block); the operator's matmat(vs, outputs) skips work the restriction makes needless."""
    # numpy's BLAS runs the small eigh of each step on its own threads, which then spin for a while and take
    # the cores from torch's products (seed 42's spectrum: 1.7 s -> 0.9 s with one thread)
    with numpy_blas_single_threaded():
        return _lanczos_steps(matmat, starts, max_steps, done, outputs)


def _lanczos_steps(matmat, starts, max_steps, done, outputs) -> list[_Lanczos]:
    n_runs, dim = starts.shape
    limits = [min(m, dim) for m in (max_steps if isinstance(max_steps, (list, tuple)) else [max_steps] * n_runs)]
    # one basis per run, each grown (doubled, up to its limit) only as its own run needs: a run that goes on
    # after the others stopped does not take their memory with it
    bases = [torch.empty((min(limit, 16) + 1, dim), dtype=starts.dtype, device=starts.device) for limit in limits]
    for basis, start in zip(bases, starts):
        basis[0] = start / start.norm()
    runs = [_Lanczos() for _ in range(n_runs)]
    for j in range(max(limits)):
        active = [r for r in range(n_runs) if not runs[r].finished]
        if not active:
            break
        vectors = torch.stack([bases[r][j] for r in active])
        products = matmat(vectors) if outputs is None else matmat(vectors, outputs[active])
        for w, r in zip(products, active):
            run, q = runs[r], bases[r][: j + 1]
            run.alphas.append(float(w @ q[j]))
            # the three-term recurrence, then full reorthogonalisation by classical Gram-Schmidt, repeated only
            # when it removed much (Daniel, Gragg, Kaufman & Stewart's test: "twice is enough")
            w = torch.sub(w, q[j], alpha=run.alphas[-1])  # a fresh vector, then updated in place
            if j > 0:
                w.sub_(q[j - 1], alpha=run.betas[-1])
            before = float(w.norm())
            w.addmv_(q.T, q @ w, alpha=-1)
            run.beta_next = float(w.norm())
            if run.beta_next < _DGKS * before:
                w.addmv_(q.T, q @ w, alpha=-1)
                run.beta_next = float(w.norm())
            scale = max(abs(a) for a in run.alphas) + max(run.betas, default=0.0)
            if run.beta_next <= 1e-12 * max(scale, 1e-30) or j + 1 == limits[r] or done(run):
                run.finished = True
                continue
            if j + 1 >= bases[r].shape[0]:
                grown = torch.empty((min(2 * bases[r].shape[0], limits[r] + 1), dim), dtype=starts.dtype,
                                    device=starts.device)
                grown[: j + 1] = bases[r][: j + 1]
                bases[r] = grown
            bases[r][j + 1] = w / run.beta_next
            run.betas.append(run.beta_next)
    for run, basis in zip(runs, bases):
        run.basis = basis[: len(run.alphas)].clone()
    return runs


def _rademacher(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(like)


def _gaussian(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Seeded standard normal draws, made in float32 whatever `like`'s dtype: float64 gets the same numbers."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like)


def _start_vector(dim: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded Gaussian vector (`_gaussian`)."""
    return _gaussian(dim, torch.Generator().manual_seed(seed), like)


def _gradient_start(op, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A Lanczos start vector rich in the top eigendirections: the loss gradient, which after training lies
    mostly in the top Hessian eigenspace (Gur-Ari et al. 2018), plus a seeded random tenth so that no
    direction is missed; the random vector alone where the gradient vanishes."""
    random = _start_vector(op.dim, seed, like)
    random = random / random.norm()
    gradient = op.gradient().to(like)
    norm = gradient.norm()
    if not torch.isfinite(norm) or norm <= torch.finfo(like.dtype).eps * max(1.0, float(like.abs().max())):
        return random
    return gradient / norm + 0.1 * random


@dataclass
class EigenResult:
    """An eigenpair estimate with its convergence certificate ‖H·v − λ·v‖ (v of unit norm)."""

    eigenvalue: float
    eigenvector: torch.Tensor
    iterations: int  # Hessian-vector products spent
    converged: bool
    residual: float
    method: str


def _power_iteration(matvec, start: torch.Tensor, *, tol: float, max_iter: int):
    """Power iteration; stops when the Rayleigh quotient changes by less than tol relatively."""
    v = start / start.norm()
    previous = None
    for i in range(1, max_iter + 1):
        w = matvec(v)
        value = float(v @ w)
        residual = float((w - value * v).norm())
        if previous is not None and abs(value - previous) < tol * abs(previous):
            return value, v, i, True, residual
        previous = value
        norm = w.norm()
        if norm == 0:
            return 0.0, v, i, True, 0.0
        v = w / norm
    return value, v, max_iter, False, residual


def top_hessian_eigenvalue(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = "lanczos",
    start: torch.Tensor | None = None,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    operator: HessianOperator | MLPHessianOperator | None = None,
) -> EigenResult:
    """Largest algebraic eigenvalue λ_max of the Hessian of the mean loss (sharpness; Keskar et al. 2017).

    method="lanczos" (default): Lanczos with full reorthogonalisation, stopped when the
    residual ‖Hv − λv‖ ≤ tol·|λ|, which bounds the eigenvalue error by tol·|λ|.
    method="power": power iteration stopped on a relative change below tol (PyHessian's
    rule, which does not bound the error). Power iteration finds the eigenvalue of largest
    magnitude; when that is negative it is rerun on H − λ_neg·I, whose dominant eigenvalue
    is λ_max − λ_neg, so the result is always the largest algebraic eigenvalue. Unless `start` is given,
    both start from the gradient plus a seeded random tenth (`_gradient_start`), which saves a few products
    at a trained point. `operator` reuses a `hessian_operator` of the same model and data.
    """
    op = operator or hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    spent = op.matvecs
    like = flat_parameters(model)
    v0 = _gradient_start(op, seed, like) if start is None else start.detach().to(like)
    if method == "lanczos":
        run = _lanczos_runs(op.matmat, v0[None], max_steps=max_iter, done=lambda r: r.converged(1, "largest", tol))[0]
        values, vectors, residuals, _ = run.ritz(1, "largest")
        return EigenResult(float(values[0]), vectors[0], op.matvecs - spent, run.converged(1, "largest", tol)
                           or run.beta_next <= 1e-12 * max(abs(values[0]), 1e-30), float(residuals[0]), "lanczos")
    if method != "power":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    value, vector, _, converged, residual = _power_iteration(op, v0, tol=tol, max_iter=max_iter)
    if value < 0:  # the dominant eigenvalue is the most negative one: shift it to zero
        shift = value
        shifted = lambda v: op(v) - shift * v  # noqa: E731
        mu, vector, _, converged_shifted, residual = _power_iteration(shifted, v0, tol=tol, max_iter=max_iter)
        value, converged = mu + shift, converged and converged_shifted
    return EigenResult(value, vector, op.matvecs - spent, converged, residual, "power")


@dataclass
class EigenpairsResult:
    """k extreme eigenpairs of the Hessian with their certificates ‖H·v_i − λ_i·v_i‖ (computed, not estimated)."""

    eigenvalues: list[float]  # largest first ("largest") or most negative first ("smallest")
    eigenvectors: torch.Tensor  # (k, D), orthonormal rows
    residuals: list[float]
    converged: bool
    iterations: int  # Hessian-vector products, the final residual check included
    which: str


def hessian_eigenpairs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 5,
    which: str = "largest",
    tol: float = 1e-6,
    seed: int = 0,
    max_iter: int = 300,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> EigenpairsResult:
    """The k largest (or most negative) eigenvalues of the Hessian and their eigenvectors, by Lanczos with full
    reorthogonalisation, stopped when every wanted pair has ‖Hv − λv‖ ≤ tol·max(|λ|, 1e-8·‖H‖); the residuals
    are then recomputed with k true products. λ_min < 0 means a saddle, not a minimum (Dauphin et al. 2014)."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    return _extreme_eigenpairs(model, x, y, {which: k}, tol, seed, max_iter, loss_fn, memory_budget)[which]


def hessian_spectrum_ends(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 5,
    k_smallest: int = 1,
    tol: float = 1e-6,
    seed: int = 0,
    max_iter: int = 300,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[EigenpairsResult, EigenpairsResult]:
    """The k largest and the k_smallest most negative eigenpairs from one Lanczos run: a Krylov space converges
    at both ends of the spectrum at once, so one run stopped when both ends meet the test of `hessian_eigenpairs`
    costs the longer of the two separate runs, not their sum. Both results count the shared products."""
    pairs = _extreme_eigenpairs(model, x, y, {"largest": k, "smallest": k_smallest}, tol, seed, max_iter, loss_fn,
                                memory_budget)
    return pairs["largest"], pairs["smallest"]


def _extreme_eigenpairs(model, x, y, wanted: dict[str, int], tol, seed, max_iter, loss_fn, memory_budget):
    """One Lanczos run from a seeded Gaussian start until every end in `wanted` ({which: k}) has converged,
    then the true residuals of all wanted pairs in one batched product."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    _check_wanted(wanted, op.dim)
    v0 = _start_vector(op.dim, seed, flat_parameters(model))
    run = _lanczos_runs(op.matmat, v0[None], max_steps=max(max_iter, *wanted.values()),
                        done=lambda r: _ends_converged(r, wanted, tol))[0]
    return _certified_ends(op, run, wanted, tol)


def _ends_converged(run: _Lanczos, wanted: dict[str, int], tol: float) -> bool:
    return all(run.converged(k, which, tol) for which, k in wanted.items())


def _check_wanted(wanted: dict[str, int], dim: int) -> None:
    for k in wanted.values():
        if not 1 <= k <= dim:
            raise ValueError(f"k must be between 1 and the number of parameters ({dim}), got {k}")


def _certified_ends(op, run: _Lanczos, wanted: dict[str, int], tol: float) -> dict[str, EigenpairsResult]:
    """The Ritz pairs of `run` at each end in `wanted`, with their true residuals from one batched product;
    `iterations` counts the run's products and those."""
    ritz = {which: run.ritz(k, which) for which, k in wanted.items()}
    vectors = torch.cat([ritz[which][1] for which in wanted])
    products = op.matmat(vectors)
    out, row = {}, 0
    for which, k in wanted.items():
        values, vecs, _, scale = ritz[which]
        mine = products[row : row + len(values)]
        row += len(values)
        residuals = (mine - torch.as_tensor(values).to(vecs)[:, None] * vecs).norm(dim=1)
        limits = torch.as_tensor(tol * np.maximum(np.abs(values), 1e-8 * scale)).to(residuals)
        converged = len(values) == k and bool(torch.all(residuals <= limits))
        out[which] = EigenpairsResult(values.tolist(), vecs, residuals.tolist(), converged,
                                      len(run.alphas) + len(vectors), which)
    return out


# ----------------------------------------------------------------------------- traces and spectra


@dataclass
class TraceResult:
    """A stochastic trace estimate with its standard error."""

    trace: float
    stderr: float
    matvecs: int
    method: str
    converged: bool  # the standard error reached rel_stderr·|trace| within max_matvecs


def trace_estimate(matmat, dim: int, *, method: str = "hutch++", rel_stderr: float = 0.01,
                   max_matvecs: int = 1000, seed: int = 0, like: torch.Tensor | None = None,
                   block: int = 8, sketch: int = 16) -> TraceResult:
    """tr(A) for a symmetric operator given by `matmat` (rows in, rows out).

    "hutchinson": mean of zᵀAz over Rademacher z, standard error std/√m (Hutchinson 1989).
    "hutch++": tr(QᵀAQ) exactly on the span Q of A·S for `sketch` Rademacher S, plus Hutchinson on
    the deflated (I − QQᵀ)A(I − QQᵀ) (Meyer et al. 2021), whose variance the top directions no
    longer dominate. Both add probes, `block` at a time, until stderr ≤ rel_stderr·|trace|
    (at least 2 blocks), not until the running mean stops moving.
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    like = torch.zeros(1) if like is None else like
    generator = torch.Generator().manual_seed(seed)
    used, exact_part, q = 0, 0.0, None
    if method == "hutch++":
        s = min(sketch, dim, max(1, max_matvecs // 3))
        q, _ = torch.linalg.qr(matmat(_rademacher((s, dim), generator, like)).T)  # (D, s)
        exact_part = float(torch.trace(q.T @ matmat(q.T.contiguous()).T))
        used = 2 * s
    if q is not None and q.shape[1] == dim:  # the sketch spans everything: tr(QᵀAQ) is the trace
        return TraceResult(exact_part, 0.0, used, method, True)
    samples: list[float] = []
    estimate, stderr = exact_part, math.inf
    while used < max_matvecs:
        z = _rademacher((min(block, max_matvecs - used), dim), generator, like)
        if q is not None:
            z = z - (z @ q) @ q.T
        samples += (z * matmat(z)).sum(dim=1).tolist()
        used += z.shape[0]
        estimate = exact_part + float(np.mean(samples))
        stderr = float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
        if len(samples) >= 2 * block and stderr <= rel_stderr * abs(estimate):
            break
    return TraceResult(estimate, stderr, used, method, stderr <= rel_stderr * abs(estimate))


_NO_EXACT_DIAGONAL = ("the exact Hessian diagonal needs a plain MLP (nn.Sequential of Linear layers) whose "
                      "activations are piecewise linear (ReLU, LeakyReLU, Identity)")


def _exact_diagonal(op: HessianOperator | MLPHessianOperator) -> torch.Tensor | None:
    return op.diagonal() if isinstance(op, MLPHessianOperator) else None


def hessian_diagonal(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """diag(H) of the mean loss, exactly, flat over `model.parameters()`, for a plain MLP with piecewise-linear
    activations: there ∂²f/∂θᵢ² = 0, so H's diagonal equals the Gauss-Newton diagonal, which one backward pass
    of the C output directions gives (`MLPHessianOperator.diagonal`). ValueError for any other model."""
    diagonal = _exact_diagonal(hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget))
    if diagonal is None:
        raise ValueError(f"{_NO_EXACT_DIAGONAL}; estimate tr(H) with hessian_trace(method='hutch++') instead")
    return diagonal


def hessian_trace(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    method: str = "hutch++",
    rel_stderr: float = 0.01,
    max_matvecs: int = 1000,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    operator: HessianOperator | MLPHessianOperator | None = None,
) -> TraceResult:
    """tr(H) of the mean loss by Hutch++ (default) or Hutchinson on exact products, stopped when the standard
    error reaches rel_stderr·|tr(H)| (PyHessian stops when the running mean moves < 1e-3, ~3% error here);
    "exact" sums the exact diagonal (`hessian_diagonal`: plain MLPs with piecewise-linear activations, stderr 0,
    no products); "auto" is "exact" where it applies and Hutch++ elsewhere.
    `operator` reuses a `hessian_operator` of the same model and data."""
    if method not in ("hutchinson", "hutch++", "exact", "auto"):
        raise ValueError(f"method must be 'hutchinson', 'hutch++', 'exact' or 'auto', got {method!r}")
    op = operator or hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    if method in ("exact", "auto"):
        diagonal = _exact_diagonal(op)
        if diagonal is not None:
            return TraceResult(float(diagonal.double().sum()), 0.0, 0, "exact", True)
        if method == "exact":
            raise ValueError(f"method='exact': {_NO_EXACT_DIAGONAL}; use method='hutch++' or 'auto'")
        method = "hutch++"
    return trace_estimate(op.matmat, op.dim, method=method, rel_stderr=rel_stderr, max_matvecs=max_matvecs,
                          seed=seed, like=flat_parameters(model))


@dataclass
class SpectralDensity:
    """Smoothed spectral density of the Hessian from stochastic Lanczos quadrature."""

    grid: np.ndarray
    density: np.ndarray  # integrates to 1 over grid
    nodes: np.ndarray  # (runs, steps) Ritz values; unused entries (early breakdown) have weight 0
    weights: np.ndarray  # (runs, steps) squared first components of T's eigenvectors; each row sums to 1
    sigma: float


def hessian_spectral_density(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lanczos_steps: int = 80,
    runs: int = 10,
    seed: int = 0,
    sigma: float | None = None,
    grid_points: int = 2000,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019): for each of `runs` Gaussian vectors v/‖v‖,
    m Lanczos steps give T = U·diag(θ)·Uᵀ, and vᵀf(H)v ≈ Σ_i U_1i²·f(θ_i); the density is the average over
    runs of Σ_i U_1i²·N(t; θ_i, σ²), so it integrates to 1 and its mean is ≈ tr(H)/D. σ defaults to
    1% of the spectral range. All runs advance in lockstep, one batched product per step."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    results = _slq_runs(op, flat_parameters(model), runs, lanczos_steps, seed, memory_budget)
    return _slq_density(results, lanczos_steps, sigma, grid_points)


@dataclass
class HessianSpectrum:
    """Both ends of the Hessian spectrum and its density, from one set of Lanczos runs (`hessian_spectrum`)."""

    top: EigenpairsResult  # the k largest eigenpairs
    bottom: EigenpairsResult  # the k_smallest most negative
    density: SpectralDensity


def hessian_spectrum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 5,
    k_smallest: int = 1,
    tol: float = 1e-6,
    lanczos_steps: int = 80,
    runs: int = 10,
    seed: int = 0,
    max_iter: int = 300,
    sigma: float | None = None,
    grid_points: int = 2000,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> HessianSpectrum:
    """`hessian_spectral_density` and `hessian_spectrum_ends` from one set of Lanczos runs. The SLQ runs advance
    in lockstep for `lanczos_steps` steps; the first then goes on alone until the k largest and the k_smallest
    most negative Ritz pairs pass `hessian_eigenpairs`'s test (at most max(max_iter, lanczos_steps) steps), and
    their true residuals take one batched product. A run's first m steps do not depend on how long it goes on,
    so the density, from each run's leading m×m block of T, is `hessian_spectral_density`'s for the same seed;
    the ends cost the few steps past m instead of a run of their own (35-47 products per model here)."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    wanted = {"largest": k, "smallest": k_smallest}
    _check_wanted(wanted, op.dim)
    results = _slq_runs(op, flat_parameters(model), runs, lanczos_steps, seed, memory_budget,
                        first_until=lambda r: _ends_converged(r, wanted, tol),
                        first_max_steps=max(max_iter, lanczos_steps, k, k_smallest))
    ends = _certified_ends(op, results[0], wanted, tol)
    return HessianSpectrum(ends["largest"], ends["smallest"], _slq_density(results, lanczos_steps, sigma, grid_points))


def _slq_runs(op, like: torch.Tensor, runs: int, steps: int, seed: int, memory_budget: int, *, first_until=None,
              first_max_steps: int = 0) -> list[_Lanczos]:
    """SLQ's Lanczos runs from seeded Gaussian starts, in lockstep blocks that fit the memory budget, `steps`
    each; with `first_until`, the first run goes on past `steps` until first_until(run) or first_max_steps.
    A normalised Gaussian vector is uniform on the sphere, so E[vvᵀ] = I/D as quadrature needs, and it is
    orthogonal to a given eigenvector with probability zero, where a Rademacher vector is orthogonal to
    (e_i − e_j)/√2 half the time: the eigenpairs read off the first run rely on that."""
    starts = _gaussian((runs, op.dim), torch.Generator().manual_seed(seed), like)
    per_block = max(1, memory_budget // max(1, (steps + 1) * op.dim * like.element_size()))
    results = []
    for s in range(0, runs, per_block):
        block = starts[s : s + per_block]
        limits = [steps] * block.shape[0]
        done = lambda run: False  # noqa: E731
        if s == 0 and first_until is not None:
            limits[0] = first_max_steps  # the others stop at `steps` whatever done says
            done = lambda run: len(run.alphas) >= steps and first_until(run)  # noqa: E731
        results += _lanczos_runs(op.matmat, block, max_steps=limits, done=done)
    return results


def _slq_density(results: list[_Lanczos], steps: int, sigma: float | None, grid_points: int) -> SpectralDensity:
    """The SLQ density from each run's first `steps` steps (a longer run's leading block of T)."""
    runs = len(results)
    width = min(steps, max(len(r.alphas) for r in results))
    nodes, weights = np.zeros((runs, width)), np.zeros((runs, width))
    for i, run in enumerate(results):
        alphas, betas = run.alphas[:steps], run.betas[: steps - 1]
        values, vectors = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        nodes[i, : len(values)], weights[i, : len(values)] = values, vectors[0] ** 2
    used = weights > 0
    low, high = nodes[used].min(), nodes[used].max()
    sigma = sigma if sigma is not None else max(0.01 * (high - low), 1e-12 * max(abs(high), 1.0))
    grid = np.linspace(low - 6 * sigma, high + 6 * sigma, grid_points)
    kernel = np.exp(-0.5 * ((grid[:, None] - nodes[used][None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights[used] / runs
    return SpectralDensity(grid, density, nodes, weights, sigma)


@dataclass
class LayerCurvature:
    """Curvature of one parameter tensor's diagonal Hessian block H_bb."""

    name: str
    size: int
    top_eigenvalue: float
    residual: float
    trace: float
    trace_stderr: float  # 0 when the trace is exact
    converged: bool


def layer_curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int = 0,
    tol: float = 1e-3,
    max_iter: int = 100,
    rel_stderr: float = 0.02,
    max_probes: int = 200,
    exact_below: int = 64,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> list[LayerCurvature]:
    """Per parameter tensor b: the top eigenvalue of its diagonal Hessian block H_bb (Lanczos restricted to the
    block, stopped at ‖H_bb v − λv‖ ≤ tol·|λ|) and tr(H_bb): the sum of the exact diagonal where
    `hessian_diagonal` applies (plain MLPs with piecewise-linear activations), else exact for blocks of at most
    `exact_below` entries and Hutchinson with block-restricted Rademacher probes until the standard error
    reaches rel_stderr. All blocks advance together: each Lanczos step and each probe round is one batched
    product."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    like = flat_parameters(model)
    names, sizes = zip(*[(name, math.prod(shape)) for name, shape in _shapes(model)])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    masks = torch.zeros((len(sizes), op.dim), dtype=like.dtype)
    for b in range(len(sizes)):
        masks[b, offsets[b] : offsets[b + 1]] = 1
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randn((len(sizes), op.dim), generator=generator, dtype=torch.float64).to(like) * masks
    runs = _lanczos_runs(op.matmat, starts, max_steps=[min(max_iter, n) for n in sizes],
                         done=lambda r: r.converged(1, "largest", tol),
                         outputs=masks)
    diagonal = _exact_diagonal(op)
    if diagonal is not None:
        traces = [(float(diagonal[offsets[b] : offsets[b + 1]].double().sum()), 0.0) for b in range(len(sizes))]
    else:
        traces = _block_traces(op, masks, sizes, offsets, generator, like, rel_stderr, max_probes, exact_below)
    out = []
    for b, run in enumerate(runs):
        values, _, residuals, _ = run.ritz(1, "largest")
        out.append(LayerCurvature(names[b], sizes[b], float(values[0]), float(residuals[0]), *traces[b],
                                  run.converged(1, "largest", tol) or len(run.alphas) == sizes[b]))
    return out


def _block_traces(op, masks, sizes, offsets, generator, like, rel_stderr, max_probes, exact_below):
    """(trace, stderr) of every diagonal block: exact from unit vectors for small blocks, else Hutchinson
    with probes restricted to the block, all blocks of one round in a single batched product."""
    out = [None] * len(sizes)
    for b, size in enumerate(sizes):
        if size <= exact_below:
            eye = torch.zeros((size, op.dim), dtype=like.dtype)
            eye[:, offsets[b] : offsets[b + 1]] = torch.eye(size, dtype=like.dtype)
            wanted = masks[b].expand(size, -1)
            out[b] = (float(torch.diagonal(op.matmat(eye.to(like), wanted)[:, offsets[b] : offsets[b + 1]]).sum()), 0.0)
    pending = [b for b in range(len(sizes)) if out[b] is None]
    samples = {b: [] for b in pending}
    while pending and min(len(samples[b]) for b in pending) < max_probes:
        z = _rademacher((len(pending), op.dim), generator, like) * masks[pending].to(like)
        for b, value in zip(pending, (z * op.matmat(z, masks[pending])).sum(dim=1).tolist()):
            samples[b].append(value)
        still = []
        for b in pending:
            s = samples[b]
            stderr = float(np.std(s, ddof=1) / math.sqrt(len(s))) if len(s) > 1 else math.inf
            out[b] = (float(np.mean(s)), stderr)
            if len(s) < 8 or stderr > rel_stderr * abs(out[b][0]):
                still.append(b)
        pending = still
    return out


# ============================================================================ 3. flatness


def filter_normalize(direction: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Li et al. 2018 filter normalisation of a flat direction (D,), or of each row of a batch (K, D): every
    row / conv filter of each weight tensor rescaled to the norm of the same row of θ; 1-D tensors (biases)
    set to zero."""
    params = list(model.parameters())
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
                      normalization: str = "filter") -> torch.Tensor:
    """`count` Gaussian directions (count, D) in parameter space, one after another from `generator` (the
    numbers of `count` calls of `random_direction`): "filter"-normalised (Li et al. 2018), "adaptive" (each
    entry scaled by |θ|, Kwon et al. 2021) or "none"."""
    if normalization not in ("filter", "adaptive", "none"):
        raise ValueError(f"normalization must be 'filter', 'adaptive' or 'none', got {normalization!r}")
    theta = flat_parameters(model)
    drawn = torch.empty((count, theta.numel()), dtype=torch.float32)  # `_gaussian`'s float32 draws, row by row
    for row in drawn:
        torch.randn(theta.numel(), generator=generator, out=row)
    d = drawn.to(theta)
    if normalization == "filter":
        return filter_normalize(d, model)
    if normalization == "adaptive":
        return d.mul_(theta.abs())
    return d


def random_direction(model: nn.Module, generator: torch.Generator, *, normalization: str = "filter") -> torch.Tensor:
    """A Gaussian direction in parameter space: "filter"-normalised (Li et al. 2018), "adaptive"
    (each entry scaled by |θ|, Kwon et al. 2021) or "none"."""
    return random_directions(model, generator, 1, normalization=normalization)[0]


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
) -> FlatnessResult:
    """Average-case flatness: E_d[L(θ + σd) − L(θ)] for Gaussian d, filter-normalised (Li et al. 2018)
    or, with adaptive=True, scaled entry-wise by |θ| (Kwon et al. 2021). All σ and directions in one batch."""
    sigmas = [float(s) for s in sigmas]
    generator = torch.Generator().manual_seed(seed)
    normalization = "adaptive" if adaptive else "filter"
    directions = random_directions(model, generator, samples, normalization=normalization)
    # point 0 is θ itself; then, direction by direction, every σ
    coefficients = torch.zeros(1 + samples * len(sigmas), samples, dtype=torch.float64)
    for k in range(samples):
        coefficients[1 + k * len(sigmas) : 1 + (k + 1) * len(sigmas), k] = torch.tensor(sigmas, dtype=torch.float64)
    result = losses_at_points(model, x, y, flat_parameters(model), directions, coefficients,
                              loss_fn=loss_fn, memory_budget=memory_budget, accuracy=False)
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


def _loss_and_gradient(model, params_flat, x, y, loss_fn, rows, *,
                       gradient: bool = True) -> tuple[float, torch.Tensor | None]:
    """Mean loss and its gradient (None with gradient=False: a forward pass only) at a flat parameter vector,
    summed over row chunks. The loss is the same number either way."""
    theta = params_flat.detach().requires_grad_(gradient)
    total, grad = 0.0, torch.zeros_like(theta) if gradient else None
    with torch.set_grad_enabled(gradient):
        for rs in _row_chunks(x.shape[0], rows):
            weight = (rs.stop - rs.start) / x.shape[0]
            loss = weight * _functional_loss(model, _split(theta, model), x[rs], y[rs], loss_fn)
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
) -> WorstCaseResult:
    """max_{‖T⁻¹ε‖₂ ≤ ρ} L(θ + ε) − L(θ) by projected, normalised gradient ascent (Keskar et al. 2017;
    Andriushchenko et al. 2023), T = I (absolute) or T = diag(|θ|) (adaptive, Kwon et al. 2021).

    Ascent runs in u = T⁻¹ε: u ← Π_ρ(u + η·∇_u/‖∇_u‖) with ∇_u = T·∇L(θ + Tu); it starts from the best
    of `starts` random points on the sphere ‖u‖ = ρ, and η starts at ρ and halves whenever a step does not
    improve. The best point seen is returned, so the result is a lower bound on the true maximum and
    at least the increase at any random point of the sphere it tried.
    """
    if not rho > 0 or steps < 1:
        raise ValueError(f"rho must be > 0 and steps >= 1, got rho={rho}, steps={steps}")
    x, y = _prepare(model, x, y)
    loss_fn = _loss_fn(loss_fn)
    theta = flat_parameters(model)
    scale = theta.abs() if adaptive else torch.ones_like(theta)
    rows = memory_budget // max(1.0, 2 * _graph_bytes_per_example(model, x, y, loss_fn))
    base = _loss_and_gradient(model, theta, x, y, loss_fn, rows, gradient=False)[0]
    generator = torch.Generator().manual_seed(seed)
    candidates = []  # the starts' losses by forward passes; a gradient only at the best
    for _ in range(max(1, starts)):
        u = _gaussian(theta.numel(), generator, theta)
        u = u * (rho / u.norm())
        candidates.append((_loss_and_gradient(model, theta + scale * u, x, y, loss_fn, rows, gradient=False)[0], u))
    _, u = max(candidates, key=lambda c: c[0])
    best_loss, grad = _loss_and_gradient(model, theta + scale * u, x, y, loss_fn, rows)
    best_u, step, history = u, rho, []
    for _ in range(steps):
        direction = scale * grad
        norm = direction.norm()
        if norm == 0:
            break
        trial = u + step * direction / norm
        trial = trial * min(1.0, rho / float(trial.norm()))  # projection onto the ρ-ball
        loss, trial_grad = _loss_and_gradient(model, theta + scale * trial, x, y, loss_fn, rows)
        if loss > best_loss:
            best_loss, best_u, u, grad = loss, trial, trial, trial_grad
        else:
            step /= 2
        history.append(best_loss - base)
    return WorstCaseResult(best_loss - base, rho, adaptive, scale * best_u, history)


@dataclass
class PacBayesResult:
    """The largest Gaussian weight-noise level that raises the training error by at most a target."""

    sigma: float
    flatness: float  # 1/σ²
    base_error: float
    error_increase: float  # mean error increase at σ
    magnitude_aware: bool


def pac_bayes_flatness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    magnitude_aware: bool = False,
    max_error_increase: float = 0.1,
    samples: int = 10,
    seed: int = 0,
    rounds: int = 12,
    sigma_min: float = 1e-4,
    sigma_max: float = 2.0,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> PacBayesResult:
    """PAC-Bayes flatness (Jiang et al. 2020; Dziugaite et al. 2020): the largest σ such that the mean training
    error of θ + σ·ε over `samples` Gaussian draws ε rises by at most `max_error_increase`; flatness = 1/σ².
    Magnitude-aware: the noise on each weight is σ·(|w| + 1e-3)·ε (Dziugaite et al.'s magnitude_eps).

    The same draws ε serve every σ (common random numbers), so the search runs on one fixed error curve, which
    it assumes grows with σ: a bisection in log σ of the bracket [σ_ok, σ_too_big], starting from [sigma_min,
    sigma_max], one σ per round, for a relative precision of (sigma_max/sigma_min)^(2^−rounds), 0.24% at the
    defaults. Each σ costs `samples` network evaluations: 15 σ in all here, where 4 rounds of 7 σ (the same
    precision) took 31 and twice the time.
    """
    if not 0 < max_error_increase < 1 or samples < 1:
        raise ValueError("max_error_increase must be in (0, 1) and samples >= 1")
    theta = flat_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    noise = _gaussian((samples, theta.numel()), generator, theta)
    if magnitude_aware:
        noise = noise * (theta.abs() + 1e-3)

    known: dict[float, float] = {}
    evaluate = point_evaluator(model, x, y, theta, noise, loss_fn=loss_fn, memory_budget=memory_budget)

    def mean_errors(sigmas: list[float]) -> list[float]:
        new = [s for s in sigmas if s not in known]
        if new:
            result = evaluate(torch.cat([torch.eye(samples, dtype=torch.float64) * s for s in new]))
            known.update(zip(new, (1.0 - result.accuracies.reshape(len(new), samples).mean(dim=1)).tolist()))
        return [known[s] for s in sigmas]

    base_error, low_error, high_error = mean_errors([0.0, sigma_min, sigma_max])
    low, high = sigma_min, sigma_max
    if high_error - base_error <= max_error_increase:
        low = high  # even the largest σ searched keeps the error within the target
    elif low_error - base_error > max_error_increase:
        low = 0.0  # even the smallest σ searched raises the error too much
    else:
        for _ in range(rounds):
            middle = math.sqrt(low * high)
            if mean_errors([middle])[0] - base_error <= max_error_increase:
                low = middle
            else:
                high = middle
    increase = mean_errors([low])[0] - base_error if low > 0 else 0.0
    return PacBayesResult(low, 1 / low**2 if low > 0 else math.inf, base_error, increase, magnitude_aware)


def rescaled_copy(model: nn.Module, alpha: float) -> nn.Module:
    """A copy of a ReLU MLP computing exactly the same function: the first Linear layer (weights and bias)
    multiplied by α > 0 and the second layer's weights divided by α, which ReLU's positive homogeneity,
    ReLU(αz) = α·ReLU(z), leaves unchanged (Dinh et al. 2017). Sharpness changes; the function does not."""
    layers = _mlp_layers(model)
    if layers is None or not alpha > 0:
        raise ValueError("rescaled_copy needs a plain MLP (nn.Sequential of Linear and ReLU layers) and alpha > 0")
    linear_positions = [i for i, m in enumerate(layers) if type(m) is nn.Linear]
    if len(linear_positions) < 2 or not all(type(m) in (nn.ReLU, nn.Identity)
                                            for m in layers[linear_positions[0] + 1 : linear_positions[1]]):
        raise ValueError("rescaled_copy needs two Linear layers with only ReLU between them (positive homogeneity)")
    out = copy.deepcopy(model)
    first, second = [m for m in _mlp_layers(out) if type(m) is nn.Linear][:2]
    with torch.no_grad():
        first.weight.mul_(alpha)
        if first.bias is not None:
            first.bias.mul_(alpha)
        second.weight.div_(alpha)
    return out



# ============================================================================ 4. gradient noise


def _mlp_parts(layers, params, x, y, loss_fn) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Per Linear layer of a plain MLP: its inputs a (n, in), the per-example output gradients δ (n, out) of
    ℓ_i, and whether it has a bias. Per-example gradients are ∂ℓ_i/∂W = δ_i·a_iᵀ and ∂ℓ_i/∂b = δ_i."""
    h = x.flatten(1)
    inputs, outputs, linears, index = [], [], [], 0
    for m in layers:
        if type(m) is not nn.Linear:
            h = m(h)
            continue
        w = params[index]
        b = params[index + 1] if m.bias is not None else None
        index += 2 if m.bias is not None else 1
        inputs.append(h.detach())
        z = F.linear(h, w, b)
        if not outputs:
            z.requires_grad_(True)  # the first pre-activation is the leaf of this graph
        outputs.append(z)
        linears.append(m)
        h = z
    with torch.enable_grad():
        total = loss_fn(h, y) * x.shape[0]  # Σ_i ℓ_i, so ∂/∂z_i is the per-example output gradient δ_i
        deltas = torch.autograd.grad(total, outputs)
    return [(a, d, m.bias is not None) for a, d, m in zip(inputs, deltas, linears)]


def _vmap_gradients(model, x, y, loss_fn) -> torch.Tensor:
    """Per-example gradients (n, D) of any model, by torch.func.vmap(grad)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


class _PerExample:
    """Per-example gradients g_i of ℓ_i, chunk by chunk under the memory budget, never all materialised:
    closed forms for plain MLPs, torch.func.vmap(grad) otherwise."""

    def __init__(self, model, x, y, loss_fn, memory_budget, path):
        self.x, self.y = _prepare(model, x, y)
        self.model, self.loss_fn = model, _loss_fn(loss_fn)
        self.layers = _fast_path_layers(model, path)
        self.closed_form = self.layers is not None
        self.params = [p.detach() for p in model.parameters()]
        self.dim = sum(p.numel() for p in self.params)
        if self.closed_form:  # inputs, pre-activations and δ of every Linear layer, with room to spare
            widths = self.x.flatten(1).shape[1] + sum(m.out_features for m in self.layers if type(m) is nn.Linear)
            per_row = 6 * widths * self.x.element_size()
        else:
            per_row = 4 * _graph_bytes_per_example(model, self.x, self.y, self.loss_fn) + 2 * self.dim * self.x.element_size()
        self.chunks = _row_chunks(self.x.shape[0], memory_budget // max(1.0, per_row))
        self._cached = None  # the only chunk's per-example parts, kept when everything fits in one chunk

    def _chunk(self, rows: slice):
        if self._cached is not None:
            return self._cached
        x, y = self.x[rows], self.y[rows]
        part = (_mlp_parts(self.layers, self.params, x, y, self.loss_fn) if self.closed_form
                else _vmap_gradients(self.model, x, y, self.loss_fn))
        if len(self.chunks) == 1:
            self._cached = part
        return part

    def norms_and_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖g_i‖² for all i, float64; G = mean g_i, float64)."""
        norms, total = [], torch.zeros(self.dim, dtype=torch.float64)
        for rows in self.chunks:
            part = self._chunk(rows)
            if self.closed_form:
                n = torch.zeros(rows.stop - rows.start, dtype=torch.float64)
                sums = []
                for a, delta, bias in part:
                    delta_sq = delta.pow(2).sum(dim=1).double()
                    n += a.pow(2).sum(dim=1).double() * delta_sq  # ‖δ_i a_iᵀ‖² = ‖a_i‖²‖δ_i‖²
                    if bias:
                        n += delta_sq
                    sums += [(delta.T @ a).reshape(-1), *([delta.sum(dim=0)] if bias else [])]
                norms.append(n)
                total += torch.cat(sums).double()
            else:
                norms.append(part.pow(2).sum(dim=1).double())
                total += part.sum(dim=0).double()
        return torch.cat(norms), total / self.x.shape[0]

    def weighted_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i weights[p, i]·g_i for every row p of weights (P, N), as (P, D) in the model's dtype."""
        out = torch.zeros((weights.shape[0], self.dim), dtype=self.params[0].dtype)
        for rows in self.chunks:
            u = weights[:, rows].to(self.params[0])
            part = self._chunk(rows)
            if not self.closed_form:
                out += u @ part
                continue
            pieces = []
            for a, delta, bias in part:
                # (P, out, n) built in that layout: transposing a (P, n, out) product instead copied P times more
                scaled = (u[:, None, :] * delta.T.contiguous()[None]).view(-1, delta.shape[0])  # (P·out, n)
                pieces += [(scaled @ a).reshape(u.shape[0], -1), *([u @ delta] if bias else [])]
            out += torch.cat(pieces, dim=1)
        return out


    def dots(self, vectors: torch.Tensor) -> torch.Tensor:
        """g_iᵀ·v_p for every example i and row p of vectors (P, D), as (P, N) in float64."""
        out = []
        for rows in self.chunks:
            part = self._chunk(rows)
            if not self.closed_form:
                out.append((part @ vectors.T).T.double())
                continue
            n = rows.stop - rows.start
            total = torch.zeros((n, vectors.shape[0]), dtype=vectors.dtype)
            offset = 0
            for a, delta, bias in part:
                out_f, in_f = delta.shape[1], a.shape[1]
                v_w = vectors[:, offset : offset + out_f * in_f].reshape(-1, in_f)  # (P·out, in)
                offset += out_f * in_f
                total += (a @ v_w.T).view(n, -1, out_f).mul_(delta[:, None, :]).sum(dim=2)  # δ_iᵀ·V·a_i
                if bias:
                    total += delta @ vectors[:, offset : offset + out_f].T
                    offset += out_f
            out.append(total.T.double())
        return torch.cat(out, dim=1)


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                          loss_fn: LossFn | None = None) -> torch.Tensor:
    """Every per-example gradient ∇ℓ_i as a dense (N, D) matrix (for small models and exact checks)."""
    x, y = _prepare(model, x, y)
    return _vmap_gradients(model, x, y, _loss_fn(loss_fn))


def per_example_gradient_norms_sq(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖∇ℓ_i‖² for every example i, float64 (N,); the mean gradient G, flat).

    ℓ_i = loss_fn(f(x_i), y_i), which requires `loss_fn` to be a mean of per-example terms.
    Plain MLPs: ‖∂ℓ_i/∂W‖² = ‖a_i‖²·‖δ_i‖² per Linear layer (input a_i, output gradient δ_i),
    plus ‖δ_i‖² for the bias, all from one backward pass. Other models: torch.func.vmap(grad).
    """
    return _PerExample(model, x, y, loss_fn, memory_budget, path).norms_and_mean()


@dataclass
class NoiseScaleResult:
    """McCandlish et al. 2018's noise scales: B_simple = tr(Σ)/|G|² and B_noise = tr(HΣ)/(GᵀHG)."""

    b_simple: float
    trace_cov: float  # tr(Σ), Σ the per-example gradient covariance with 1/(N−1)
    grad_norm_sq: float  # |G|², G the mean gradient
    n: int
    note: str = ""  # why a noise scale is infinite, when it is
    b_noise: float = math.nan  # NaN when not computed
    trace_h_cov: float = math.nan  # tr(HΣ)
    trace_h_cov_stderr: float = math.nan  # 0 when exact
    g_h_g: float = math.nan  # GᵀHG
    probes: int = 0  # example-space probes spent on tr(HΣ); 0 when exact


def gradient_noise_scale(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    b_noise: bool = True,
    rel_stderr: float = 0.05,
    max_probes: int = 256,
    exact_below: int = 256,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
) -> NoiseScaleResult:
    """McCandlish et al. 2018's noise scales, from the exact per-example gradients g_i of all N examples.

    B_simple = tr(Σ)/|G|², G = (1/N) Σ g_i, tr(Σ) = 1/(N−1) Σ ‖g_i − G‖² = N/(N−1)·(mean ‖g_i‖² − |G|²).
    B_noise = tr(HΣ)/(GᵀHG), the curvature-aware scale, with exact Hessian products: tr(HΣ) =
    1/(N−1) Σ (g_i − G)ᵀH(g_i − G), exactly when N ≤ exact_below, else by Hutch++ in example space
    until its standard error reaches rel_stderr·|tr(HΣ)| (b_noise=False skips it).
    """
    per_example = _PerExample(model, x, y, loss_fn, memory_budget, path)
    norms_sq, mean_grad = per_example.norms_and_mean()
    n = norms_sq.numel()
    if n < 2:
        raise ValueError("the gradient noise scale needs at least 2 examples")
    mean_norm_sq = float(norms_sq.mean())
    grad_norm_sq = float(mean_grad @ mean_grad)
    trace_cov = max(0.0, n / (n - 1) * (mean_norm_sq - grad_norm_sq))
    eps = torch.finfo(per_example.params[0].dtype).eps
    zero_gradient = grad_norm_sq <= (100 * eps) ** 2 * mean_norm_sq
    note = (f"|G|^2 = {grad_norm_sq:.3g} is numerically zero (below (100 eps)^2 x mean |g_i|^2 = "
            f"{(100 * eps) ** 2 * mean_norm_sq:.3g}): the mean gradient vanishes at this point, so the noise "
            "scales are infinite") if zero_gradient else ""
    result = NoiseScaleResult(math.inf if zero_gradient else trace_cov / grad_norm_sq, trace_cov, grad_norm_sq, n,
                              note)
    if b_noise:
        _add_b_noise(result, per_example, mean_grad, model, rel_stderr, max_probes, exact_below, seed,
                     memory_budget, zero_gradient)
    return result


def _add_b_noise(result, per_example, mean_grad, model, rel_stderr, max_probes, exact_below, seed, budget, zero):
    """tr(HΣ), GᵀHG and B_noise into `result`. With J_c the centred per-example gradients (N, D),
    tr(HΣ) = tr(M)/(N−1) for M = J_c·H·J_cᵀ (N, N); M·u costs one weighted gradient sum, one Hessian product
    and one pass of per-example dot products, so tr(M) is estimated by Hutch++ in example space (exact when
    N ≤ exact_below, from the N unit vectors)."""
    op = hessian_operator(model, per_example.x, per_example.y, loss_fn=per_example.loss_fn, memory_budget=budget)
    g = mean_grad.to(per_example.params[0])
    result.g_h_g = float(g @ op(g))
    n = result.n

    def m_matmat(u: torch.Tensor) -> torch.Tensor:  # rows u (P, N) -> rows of M·u
        w = per_example.weighted_sums(u) - u.sum(dim=1, keepdim=True).to(g) * g  # Σ_i u_i (g_i − G)
        hw = op.matmat(w)
        return per_example.dots(hw) - (hw @ g).double()[:, None]

    if n <= exact_below:
        trace, stderr, probes = float(torch.trace(m_matmat(torch.eye(n, dtype=torch.float64)))), 0.0, 0
    else:
        # a sketch of one probe block (8): 16 sketch products and the 16 Hutchinson ones that the stopping rule
        # needs at least, Hutch++'s 2:1 split; here 32 products reach 0.9% stderr, 16 sketches 0.6% with 48
        estimate = trace_estimate(m_matmat, n, method="hutch++", rel_stderr=rel_stderr, max_matvecs=max_probes,
                                  seed=seed, like=torch.zeros(1, dtype=torch.float64), sketch=8)
        trace, stderr, probes = estimate.trace, estimate.stderr, estimate.matvecs
    result.trace_h_cov, result.trace_h_cov_stderr, result.probes = trace / (n - 1), stderr / (n - 1), probes
    result.b_noise = math.inf if zero else result.trace_h_cov / result.g_h_g


@dataclass
class TwoBatchNoiseResult:
    """McCandlish et al. 2018's unbiased two-batch-size estimates, averaged over independent draws."""

    grad_norm_sq: float
    trace_cov: float
    b_simple: float
    grad_norm_sq_stderr: float
    trace_cov_stderr: float
    batches: int
    b_small: int
    b_big: int


def two_batch_noise_scale(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    b_small: int,
    b_big: int,
    batches: int = 10,
    seed: int = 0,
    loss_fn: LossFn | None = None,
) -> TwoBatchNoiseResult:
    """|G|², tr(Σ) and B_simple from mini-batch gradients only, as one computes them at scale (McCandlish et al.
    2018, appendix A): with G_B the mean gradient of a batch of B examples drawn without replacement,
    E|G_B|² = |G|² + tr(Σ)(1/B − 1/N), so per draw tr(Σ) ≈ (|G_s|² − |G_b|²)/(1/b_s − 1/b_b) and
    |G|² ≈ (b_b|G_b|² − b_s|G_s|²)/(b_b − b_s) + tr(Σ)/N (the last term corrects for the finite data set;
    both are then unbiased). Small and big batches are drawn independently; B_simple = mean tr(Σ)/mean |G|²."""
    x, y = _prepare(model, x, y)
    n = x.shape[0]
    if not 1 <= b_small < b_big <= n or batches < 2:
        raise ValueError(f"need 1 <= b_small < b_big <= N = {n} and batches >= 2, got {b_small}, {b_big}, {batches}")
    loss_fn = _loss_fn(loss_fn)
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    generator = torch.Generator().manual_seed(seed)

    def batch_grad_norm_sq(size: int) -> float:
        idx = torch.randperm(n, generator=generator)[:size]
        with torch.enable_grad():
            grads = torch.autograd.grad(_functional_loss(model, params, x[idx], y[idx], loss_fn),
                                        list(params.values()), allow_unused=True, materialize_grads=True)
        return float(sum(g.double().pow(2).sum() for g in grads))

    traces, norms = [], []
    for _ in range(batches):
        small, big = batch_grad_norm_sq(b_small), batch_grad_norm_sq(b_big)
        trace = (small - big) / (1 / b_small - 1 / b_big)
        traces.append(trace)
        norms.append((b_big * big - b_small * small) / (b_big - b_small) + trace / n)
    t, g = float(np.mean(traces)), float(np.mean(norms))
    return TwoBatchNoiseResult(g, t, t / g if g > 0 else math.inf, float(np.std(norms, ddof=1) / math.sqrt(batches)),
                               float(np.std(traces, ddof=1) / math.sqrt(batches)), batches, b_small, b_big)


def noise_temperature(lr: float, n: int, batch_size: int, momentum: float = 0.0) -> float:
    """Smith & Le 2018's SGD noise scale g = εN/(B(1 − m)): learning rate ε, N examples, batch B, momentum m."""
    return lr * n / (batch_size * (1 - momentum))


# ============================================================================ 5. connectivity


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


def _same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    if _shapes(model_a) != _shapes(model_b):
        raise ValueError("the two models must have the same parameter names and shapes to be interpolated")


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
) -> InterpolationResult:
    """Linear mode connectivity: L and accuracy at θ(α) = (1−α)·θ_a + α·θ_b for each α, the loss barrier
    `barrier_height` over the given α (Entezari et al. 2022), and `.barriers`, every common definition for loss
    and error (`barrier_definitions`) after `refine` rounds that evaluate 8 more α between the neighbours of
    the current loss and error peaks. The endpoints are evaluated exactly (α = 0 and 1)."""
    _same_architecture(model_a, model_b)
    check_measurable(model_b)
    theta_a = flat_parameters(model_a)
    endpoints = torch.stack([theta_a, flat_parameters(model_b).to(theta_a)])

    mixtures = point_evaluator(model_a, x, y, torch.zeros_like(theta_a), endpoints, loss_fn=loss_fn,
                               memory_budget=memory_budget)

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
    layers = _mlp_layers(model)
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
    wa = [m.weight.detach().double() for m in la]
    wb = [m.weight.detach().double() for m in lb]
    ba = [None if m.bias is None else m.bias.detach().double() for m in la]
    bb = [None if m.bias is None else m.bias.detach().double() for m in lb]
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
    t = torch.as_tensor(ts, dtype=theta_a.dtype)[:, None]
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
) -> BezierResult:
    """A low-loss quadratic Bézier curve between two models (Garipov et al. 2018): θ_c starts at the midpoint
    and is trained by SGD on E_{t~U(0,1)} L(θ(t)), one t per mini-batch; the curve's loss and accuracy are
    then evaluated exactly at `points` values of t (t = 0 and 1 are the two models)."""
    _same_architecture(model_a, model_b)
    check_measurable(model_b)
    x, y = _prepare(model_a, x, y)
    loss_fn = _loss_fn(loss_fn)
    theta_a, theta_b = flat_parameters(model_a), flat_parameters(model_b).to(flat_parameters(model_a))
    control = ((theta_a + theta_b) / 2).requires_grad_(True)
    momentum_buffer: list[torch.Tensor | None] = [None]
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=generator)
            total = 0.0
            for start in range(0, x.shape[0], batch_size):
                idx = order[start : start + batch_size]
                t = float(torch.rand((), generator=generator, dtype=torch.float64))
                theta = (1 - t) ** 2 * theta_a + 2 * t * (1 - t) * control + t**2 * theta_b
                loss = _functional_loss(model_a, _split(theta, model_a), x[idx], y[idx], loss_fn)
                control.grad = torch.autograd.grad(loss, control)[0]  # the curve's own point, never a model's
                sgd_step([control], momentum_buffer, lr=lr, momentum=momentum)
                total += float(loss.detach()) * idx.numel()
            epoch_losses.append(total / x.shape[0])
    control = control.detach()
    ts = np.linspace(0.0, 1.0, points).tolist()
    result = losses_at_points(model_a, x, y, torch.zeros_like(theta_a), torch.stack([theta_a, control, theta_b]),
                              torch.tensor([[(1 - t) ** 2, 2 * t * (1 - t), t**2] for t in ts], dtype=torch.float64),
                              loss_fn=loss_fn, memory_budget=memory_budget)
    return BezierResult(control, ts, result.losses.tolist(), result.accuracies.tolist(), epoch_losses)


# ============================================================================ 6. surfaces


def symmetric_grid(steps: int, span: float) -> np.ndarray:
    """`steps` points evenly spaced on [−span, span], exactly symmetric, with an exact 0 when steps is odd."""
    if steps < 2 or not span > 0:
        raise ValueError(f"a grid needs steps >= 2 and span > 0, got steps={steps}, span={span}")
    half = np.linspace(-span, span, steps)
    grid = (half - half[::-1]) / 2
    return grid


@dataclass
class SurfaceResult:
    """Loss on the plane θ + α·d1 + β·d2: losses[i, j] at (alphas[i], betas[j])."""

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray  # (steps, steps)
    accuracies: np.ndarray  # (steps, steps)
    directions: tuple[torch.Tensor, torch.Tensor] = field(repr=False, default=None)


def loss_surface_2d(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 25,
    span: float = 1.0,
    seed: int = 0,
    directions: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    accuracy: bool = True,
) -> SurfaceResult:
    """2-D slice of the loss around θ (Li et al. 2018): two random Gaussian filter-normalised directions
    from `seed` (or the given flat `directions`, used unchanged), on a steps×steps grid over [−span, span]².
    With accuracy=False the accuracies are NaN and cost nothing."""
    grid = symmetric_grid(steps, span)
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = (random_direction(model, generator), random_direction(model, generator))
    d = torch.stack([directions[0], directions[1]])
    a, b = np.meshgrid(grid, grid, indexing="ij")
    coefficients = torch.from_numpy(np.stack([a.ravel(), b.ravel()], axis=1))
    result = losses_at_points(model, x, y, flat_parameters(model), d, coefficients,
                              loss_fn=loss_fn, memory_budget=memory_budget, accuracy=accuracy)
    return SurfaceResult(grid.copy(), grid.copy(), result.losses.numpy().reshape(steps, steps),
                         result.accuracies.numpy().reshape(steps, steps), (d[0], d[1]))


@dataclass
class PlaneResult:
    """The loss on the plane through three parameter points, in orthonormal in-plane coordinates."""

    xs: np.ndarray  # (steps,) coordinate along u = (θ_b − θ_a)/‖θ_b − θ_a‖
    ys: np.ndarray  # (steps,) coordinate along v, the unit part of θ_c − θ_a orthogonal to u
    losses: np.ndarray  # (steps, steps), losses[i, j] at θ_a + xs[i]·u + ys[j]·v
    points: np.ndarray  # (3, 2) in-plane coordinates of θ_a, θ_b, θ_c


def loss_plane(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    steps: int = 21,
    margin: float = 0.2,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> PlaneResult:
    """Loss on the plane through θ_a, θ_b, θ_c (flat vectors; e.g. two models and a Bézier control point,
    Garipov et al. 2018), on a steps×steps grid covering the three points with `margin` of their extent on
    each side. `model` gives the architecture; its own parameters are not used."""
    theta_a, theta_b, theta_c = (p.detach().to(flat_parameters(model)) for p in points)
    u = theta_b - theta_a
    if float(u.norm()) == 0:
        raise ValueError("θ_a and θ_b coincide: the three points span no plane")
    u = u / u.norm()
    v = (theta_c - theta_a) - ((theta_c - theta_a) @ u) * u
    if float(v.norm()) <= 1e-12 * float((theta_c - theta_a).norm() + 1e-30):
        raise ValueError("the three points are collinear: they span no plane")
    v = v / v.norm()
    coords = np.array([[0.0, 0.0], [float((theta_b - theta_a) @ u), 0.0],
                       [float((theta_c - theta_a) @ u), float((theta_c - theta_a) @ v)]])
    low, high = coords.min(axis=0), coords.max(axis=0)
    pad = margin * (high - low)
    xs = np.linspace(low[0] - pad[0], high[0] + pad[0], steps)
    ys = np.linspace(low[1] - pad[1], high[1] + pad[1], steps)
    a, b = np.meshgrid(xs, ys, indexing="ij")
    result = losses_at_points(model, x, y, theta_a, torch.stack([u, v]),
                              torch.from_numpy(np.stack([a.ravel(), b.ravel()], axis=1)),
                              loss_fn=loss_fn, memory_budget=memory_budget, accuracy=False)
    return PlaneResult(xs, ys, result.losses.numpy().reshape(steps, steps), coords)
