"""Loss-landscape measurements: pure functions of a model and in-memory data.

Every function takes a model and tensors `x, y`, measures the mean loss over all
examples (cross-entropy unless a `loss_fn(outputs, targets)` returning a mean over
examples is given), works in the model's dtype and device, leaves the model exactly
as it found it (parameters, `.grad`, train/eval mode) and returns a small dataclass.
Randomness comes from a `torch.Generator` built from the `seed` argument.

Contents
1. Plumbing: flat parameter vectors, functional loss, memory-bounded chunking,
   the batched evaluation of many parameter points (`losses_at_points`).
2. Curvature: `hessian_operator`, `hessian_vector_product`, `top_hessian_eigenvalue`
   (Lanczos with full reorthogonalisation, or power iteration).
3. Flatness: `filter_normalize`, `random_direction`, `perturbation_flatness`.
4. Gradient noise: `per_example_gradient_norms_sq`, `gradient_noise_scale`.
5. Connectivity: `barrier_height`, `linear_interpolation`.
6. Surfaces: `symmetric_grid`, `loss_surface_2d`.

Fast paths: for a plain MLP (an `nn.Sequential` of Linear layers and element-wise
activations, such as `models.SmallMLP`) the batched evaluation uses the linearity
of the first layer in its weights, and per-example gradient norms come from one
backward pass in closed form. Every other model takes the general path; tests check
that both paths agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "EigenResult",
    "FlatnessResult",
    "InterpolationResult",
    "NoiseScaleResult",
    "PointLosses",
    "SurfaceResult",
    "barrier_height",
    "check_measurable",
    "filter_normalize",
    "flat_parameters",
    "gradient_noise_scale",
    "hessian_operator",
    "hessian_vector_product",
    "linear_interpolation",
    "loss_surface_2d",
    "losses_at_points",
    "per_example_gradient_norms_sq",
    "perturbation_flatness",
    "random_direction",
    "symmetric_grid",
    "top_hessian_eigenvalue",
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
    x, y = _prepare(model, x, y)
    count_correct = accuracy and _is_integer_labels(y)
    p0 = next(model.parameters())
    base = base.to(p0)
    directions = directions.to(p0).reshape(-1, base.numel())
    coefficients = torch.as_tensor(coefficients).to(p0).reshape(-1, directions.shape[0])
    loss_fn = _loss_fn(loss_fn)
    layers = _mlp_layers(model)
    if path == "fast" and layers is None:
        raise ValueError("the fast path needs a plain MLP (nn.Sequential of Linear and element-wise layers)")
    if path not in ("auto", "fast", "general"):
        raise ValueError(f"path must be 'auto', 'fast' or 'general', got {path!r}")
    with torch.no_grad():
        if layers is not None and path != "general":
            sums, correct = _mlp_points(model, layers, x, y, base, directions, coefficients, loss_fn, memory_budget,
                                        count_correct)
        else:
            sums, correct = _general_points(model, x, y, base, directions, coefficients, loss_fn, memory_budget,
                                            count_correct)
    n = x.shape[0]
    return PointLosses(losses=sums / n, accuracies=correct / n)


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


_INPLACE = {nn.ReLU: torch.relu_, nn.Tanh: torch.tanh_, nn.Sigmoid: torch.sigmoid_, nn.Identity: lambda z: z}
_CACHE_BYTES = 4 << 20  # working set per batch of points: small enough to stay in cache, large enough for GEMMs


def _mlp_points(model, layers, x, y, base, directions, coefficients, loss_fn, budget, count_correct):
    """Batched MLP evaluation: (W + Σ_k c_k D_k)·Xᵀ = W·Xᵀ + Σ_k c_k D_k·Xᵀ, so the first (largest) layer
    costs K+1 GEMMs for all P points together; later layers run as one `bmm` per batch of points.

    Activations are feature-major, (p, features, n), and live in buffers reused across batches
    (fresh multi-MB allocations cost more in page faults than the arithmetic).
    """
    xf = x.flatten(1)  # (N, d0)
    n, k = xf.shape[0], directions.shape[0]
    (w0, b0), *rest = _linear_parts(layers, base)
    (dw0, db0), *rest_dirs = _linear_parts(layers, directions)
    h0 = w0.shape[0]
    width = max(m.out_features for m in layers if type(m) is nn.Linear)
    bytes_per = base.element_size()
    sums = torch.zeros(coefficients.shape[0], dtype=torch.float64)
    correct = torch.zeros_like(sums)
    for rs in _row_chunks(n, budget // (2 * bytes_per * h0 * (k + 1))):
        xr_t, yr = xf[rs].T, y[rs]  # (d0, n)
        nr = xr_t.shape[1]
        z_base = w0 @ xr_t  # (h, n)
        z_dirs = dw0.reshape(k * h0, -1) @ xr_t  # (K·h, n)
        if b0 is not None:
            z_base += b0[:, None]
            z_dirs += db0.reshape(k * h0, 1)
        z_dirs = z_dirs.reshape(k, h0 * nr)
        per_batch = max(1, min(budget, _CACHE_BYTES) // (2 * bytes_per * nr * width))
        buffers = {}
        for ps in _row_chunks(coefficients.shape[0], per_batch):
            c = coefficients[ps]  # (p, K)
            z = _buffer(buffers, "first", (c.shape[0], h0, nr), base)
            _mix_directions(c, z_dirs, z_base.view(1, -1), out=z.view(c.shape[0], -1))  # (p, h, n)
            logits = _mlp_tail(layers, z, c, rest, rest_dirs, buffers)  # (p, C, n)
            s, r = _batched_loss_and_correct(logits, yr, loss_fn, count_correct)
            sums[ps] += s
            correct[ps] += r
    return sums, correct


def _mix_directions(c: torch.Tensor, z_dirs: torch.Tensor, z_base: torch.Tensor, *, out: torch.Tensor) -> None:
    """out = z_base + c·z_dirs, reading only the directions some point uses (a flatness probe uses one)."""
    used = torch.nonzero(c.any(dim=0)).flatten().tolist()
    if len(used) == c.shape[1] or len(used) > 4:
        torch.addmm(z_base, c, z_dirs, out=out)
        return
    if not used:
        out.copy_(z_base.expand_as(out))
        return
    torch.addmm(z_base, c[:, used[0] : used[0] + 1], z_dirs[used[0] : used[0] + 1], out=out)
    for k in used[1:]:
        out.addmm_(c[:, k : k + 1], z_dirs[k : k + 1])


def _buffer(buffers: dict, key, shape, like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of `shape`, reused while the shape fits (the last batch may be smaller)."""
    size = math.prod(shape)
    if key not in buffers or buffers[key].numel() < size:
        buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
    return buffers[key][:size].view(shape)


def _mlp_tail(layers, z, c, rest, rest_dirs, buffers):
    """The layers after the first Linear, on a batch of points (p, features, n), each with its own weights."""
    linear_index = 0
    for i, m in enumerate(layers[1:]):
        if type(m) is not nn.Linear:
            z = _INPLACE[type(m)](z) if type(m) in _INPLACE else m(z)
            continue
        (w, b), (dw, db) = rest[linear_index], rest_dirs[linear_index]
        linear_index += 1
        w_p = w + (c @ dw.reshape(dw.shape[0], -1)).reshape(-1, *w.shape)  # (p, out, in)
        out = _buffer(buffers, i, (z.shape[0], w.shape[0], z.shape[2]), z)
        if b is None:
            z = torch.bmm(w_p, z, out=out)  # (p, out, n)
        else:
            z = torch.baddbmm((b + c @ db)[:, :, None], w_p, z, out=out)
    return z


def _batched_loss_and_correct(logits, y, loss_fn, count_correct: bool):
    """Summed loss and correct count per point for feature-major logits (p, C, n)."""
    p, _, n = logits.shape
    if loss_fn is F.cross_entropy:
        sums = F.cross_entropy(logits, y.expand(p, n), reduction="none").sum(dim=1).double()
    else:
        sums = torch.stack([loss_fn(logits[i].T, y) for i in range(p)]).double() * n
    if count_correct:
        correct = (logits.transpose(1, 2).contiguous().argmax(dim=-1) == y).sum(dim=1).double()
    else:
        correct = torch.full((p,), float("nan"), dtype=torch.float64)
    return sums, correct


# ============================================================================ 2. curvature


class HessianOperator:
    """v -> H·v for the mean loss over (x, y), H the Hessian w.r.t. all parameters (flat, `parameters()` order).

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
        loss = _functional_loss(self.model, self.params, self.x[rows], self.y[rows], self.loss_fn)
        return torch.autograd.grad(loss, list(self.params.values()), create_graph=True, materialize_grads=True)

    def _hvp(self, grads, v_parts, retain: bool) -> torch.Tensor:
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # a gradient that is constant has no Hessian
        hv = torch.autograd.grad([grads[i] for i in live], list(self.params.values()), [v_parts[i] for i in live],
                                 retain_graph=retain, allow_unused=True)
        return torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                          for h, p in zip(hv, self.params.values())])

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.matvecs += 1
        v_parts = list(_split(v.detach(), self.model).values())
        if self._grads is not None:
            return self._hvp(self._grads, v_parts, retain=True).detach()
        n = self.x.shape[0]
        total = torch.zeros_like(v)
        for rows in self.chunks:
            weight = (rows.stop - rows.start) / n
            total += weight * self._hvp(self._gradient_graph(rows), v_parts, retain=False).detach()
        return total


class MLPHessianOperator:
    """Closed-form v -> H·v for a plain MLP: Pearlmutter's R-operator, a forward then a backward pass.

    For Linear layers z_l = a_l·W_lᵀ + b_l with a_{l+1} = φ_l(z_l) element-wise, the direction
    v = (V_l, c_l) gives Rz_l = Ra_l·W_lᵀ + a_l·V_lᵀ + c_l and Ra_{l+1} = φ_l'(z_l)⊙Rz_l; backwards,
    Rδ_last = ∇²_z L·Rz_last (the loss Hessian in the logits, by autograd on an (N, C) graph),
    Rδ_{l−1} = φ'⊙(Rδ_l·W_l + δ_l·V_l) + φ''⊙Rz_{l−1}⊙(δ_l·W_l), and H·v = (Rδ_lᵀ·a_l + δ_lᵀ·Ra_l, ΣRδ_l).
    The activations, φ', φ'' and δ are computed once; each product costs two GEMMs with the
    input and a few small ones, about 60% of autograd's double backward.
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
        self.dim = sum(p.numel() for p in model.parameters())
        self.matvecs = 0
        # per row, the cache holds about five vectors per hidden layer and three per output (the input is a view)
        per_row = (5 * sum(m.out_features for m in self.linears[:-1]) + 3 * self.linears[-1].out_features)
        self.chunks = _row_chunks(x.shape[0], memory_budget // (per_row * x.element_size()))
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
                z = F.linear(a[-1], w, b).detach().requires_grad_(True)
                zs.append(z)
                if l == len(self.weights) - 1:
                    break
                out = self._compose(self.between[l], z)
                d1 = torch.autograd.grad(out.sum(), z, create_graph=True)[0] if out.requires_grad else torch.ones_like(z)
                d2 = torch.autograd.grad(d1.sum(), z)[0] if d1.requires_grad else None
                d1s.append(d1.detach())
                d2s.append(d2 if d2 is not None and bool(d2.any()) else None)  # ReLU: φ'' = 0 almost everywhere
                a.append(out.detach())
            logits = zs[-1]
            grad_logits = torch.autograd.grad(weight * self.loss_fn(self._compose(self.tail, logits), self.y[rows]),
                                              logits, create_graph=True)[0]
        deltas = [None] * len(self.weights)
        deltas[-1] = grad_logits.detach()
        grad_inputs = [None] * len(self.weights)
        for l in range(len(self.weights) - 1, 0, -1):
            grad_inputs[l] = deltas[l] @ self.weights[l][0]  # ∂L/∂a_l
            deltas[l - 1] = d1s[l - 1] * grad_inputs[l]
        return {"a": a, "d1": d1s, "d2": d2s, "deltas": deltas, "grad_inputs": grad_inputs,
                "logits": logits, "grad_logits": grad_logits}

    def _product(self, cache: dict, directions) -> list[torch.Tensor]:
        a, d1, d2, deltas = cache["a"], cache["d1"], cache["d2"], cache["deltas"]
        rz, ra = [], [None]
        for l, ((w, _), (dw, db)) in enumerate(zip(self.weights, directions)):
            z = a[l] @ dw.T  # (n, out)
            if l > 0:
                z += ra[l] @ w.T
            if db is not None:
                z += db
            rz.append(z)
            if l < len(self.weights) - 1:
                ra.append(d1[l] * z)
        r_delta = torch.autograd.grad(cache["grad_logits"], cache["logits"], rz[-1], retain_graph=True)[0]
        out = []
        for l in range(len(self.weights) - 1, -1, -1):
            w, dw = self.weights[l][0], directions[l][0]
            grad_w = r_delta.T @ a[l]
            if l > 0:
                grad_w += deltas[l].T @ ra[l]
            out = [grad_w, *([] if self.weights[l][1] is None else [r_delta.sum(dim=0)]), *out]
            if l > 0:
                r_delta_prev = d1[l - 1] * (r_delta @ w + deltas[l] @ dw)
                if d2[l - 1] is not None:
                    r_delta_prev += d2[l - 1] * rz[l - 1] * cache["grad_inputs"][l]
                r_delta = r_delta_prev
        return out

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.matvecs += 1
        directions = _linear_parts(self.linears, v.detach())
        total = torch.zeros_like(v)
        with torch.no_grad():
            for i, rows in enumerate(self.chunks):
                cache = self._caches[i] if self._caches is not None else self._cache(rows)
                total += torch.cat([t.reshape(-1) for t in self._product(cache, directions)])
        return total


def hessian_operator(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
) -> HessianOperator | MLPHessianOperator:
    """The exact Hessian of the mean loss as a matrix-free operator v -> H·v (flat, `parameters()` order).

    path="auto" uses the closed-form R-operator for plain MLPs and autograd's double backward
    (reverse-over-reverse, which every loss supports) for any other model; "fast"/"general" force one.
    """
    x, y = _prepare(model, x, y)
    layers = _mlp_layers(model)
    if path not in ("auto", "fast", "general"):
        raise ValueError(f"path must be 'auto', 'fast' or 'general', got {path!r}")
    if path == "fast" and layers is None:
        raise ValueError("the fast path needs a plain MLP (nn.Sequential of Linear and element-wise layers)")
    if layers is not None and path != "general":
        return MLPHessianOperator(model, layers, x, y, _loss_fn(loss_fn), memory_budget)
    return HessianOperator(model, x, y, _loss_fn(loss_fn), memory_budget)


def hessian_vector_product(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, loss_fn: LossFn | None = None
) -> torch.Tensor:
    """Exact H·v, H = ∇²_θ (1/N) Σ_i ℓ(f_θ(x_i), y_i); v and the result are flat over `model.parameters()`."""
    return hessian_operator(model, x, y, loss_fn=loss_fn)(v.to(next(model.parameters())))


@dataclass
class EigenResult:
    """An eigenpair estimate with its convergence certificate ‖H·v − λ·v‖ (v of unit norm)."""

    eigenvalue: float
    eigenvector: torch.Tensor
    iterations: int  # Hessian-vector products spent
    converged: bool
    residual: float
    method: str


@dataclass
class _Ritz:
    values: np.ndarray
    vectors: torch.Tensor  # (k, D)
    residuals: np.ndarray
    steps: int
    converged: bool


def _lanczos(matvec, start: torch.Tensor, *, k: int, which: str, tol: float, max_iter: int) -> _Ritz:
    """Lanczos with full reorthogonalisation; stops when every wanted Ritz pair has ‖Hv − θv‖ ≤ tol·|θ|.

    The residual of a Ritz pair (θ, Q s) is β_m·|s_m| (last component of the T-eigenvector),
    exact in exact arithmetic and reliable with full reorthogonalisation.
    """
    dim = start.numel()
    max_iter = min(max_iter, dim)
    basis = torch.empty((min(max_iter, 32) + 1, dim), dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()
    alphas, betas = [], []
    for j in range(max_iter):
        w = matvec(basis[j])
        alphas.append(float(w @ basis[j]))
        q = basis[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            w = w - q.T @ (q @ w)
        beta = float(w.norm())
        ritz = _ritz_from_tridiagonal(alphas, betas, beta, k=k, which=which)
        scale = max(ritz[3], 1e-30)  # ≈ ‖H‖, so eigenvalues near zero cannot stall the relative test
        done = bool(np.all(ritz[2] <= tol * np.maximum(np.abs(ritz[0]), 1e-8 * scale))) and j + 1 >= k
        if done or beta <= 1e-12 * scale or j + 1 == max_iter:
            converged = done or beta <= 1e-12 * scale
            return _Ritz(ritz[0], ritz[1].T.to(basis) @ basis[: j + 1], ritz[2], j + 1, converged)
        if j + 1 >= basis.shape[0] - 1:
            basis = torch.cat([basis, torch.empty_like(basis)])
        basis[j + 1] = w / beta
        betas.append(beta)
    raise AssertionError("unreachable")


def _ritz_from_tridiagonal(alphas, betas, beta_next, *, k, which):
    """Ritz values (sorted as requested), T-eigenvectors (m, k), residual norms of the k wanted pairs, max |Ritz|."""
    values, vectors = _eigh_tridiagonal(np.asarray(alphas), np.asarray(betas))
    order = np.argsort(-values) if which == "largest" else np.argsort(values)
    order = order[: min(k, len(values))]
    residuals = abs(beta_next) * np.abs(vectors[-1, order])
    return values[order], torch.from_numpy(np.ascontiguousarray(vectors[:, order])), residuals, np.abs(values).max()


def _eigh_tridiagonal(diagonal: np.ndarray, off_diagonal: np.ndarray):
    t = np.diag(diagonal) + np.diag(off_diagonal, 1) + np.diag(off_diagonal, -1)
    return np.linalg.eigh(t)


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


def _start_vector(dim: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=generator, dtype=torch.float64).to(like)


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
) -> EigenResult:
    """Largest algebraic eigenvalue λ_max of the Hessian of the mean loss (sharpness; Keskar et al. 2017).

    method="lanczos" (default): Lanczos with full reorthogonalisation, stopped when the
    residual ‖Hv − λv‖ ≤ tol·|λ|, which bounds the eigenvalue error by tol·|λ|.
    method="power": power iteration stopped on a relative change below tol (PyHessian's
    rule, which does not bound the error). Power iteration finds the eigenvalue of largest
    magnitude; when that is negative it is rerun on H − λ_neg·I, whose dominant eigenvalue
    is λ_max − λ_neg, so the result is always the largest algebraic eigenvalue.
    """
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget)
    like = flat_parameters(model)
    v0 = _start_vector(op.dim, seed, like) if start is None else start.detach().to(like)
    if method == "lanczos":
        ritz = _lanczos(op, v0, k=1, which="largest", tol=tol, max_iter=max_iter)
        return EigenResult(float(ritz.values[0]), ritz.vectors[0], op.matvecs, ritz.converged,
                           float(ritz.residuals[0]), "lanczos")
    if method != "power":
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    value, vector, _, converged, residual = _power_iteration(op, v0, tol=tol, max_iter=max_iter)
    if value < 0:  # the dominant eigenvalue is the most negative one: shift it to zero
        shift = value
        shifted = lambda v: op(v) - shift * v  # noqa: E731
        mu, vector, _, converged_shifted, residual = _power_iteration(shifted, v0, tol=tol, max_iter=max_iter)
        value, converged = mu + shift, converged and converged_shifted
    return EigenResult(value, vector, op.matvecs, converged, residual, "power")


# ============================================================================ 3. flatness


def filter_normalize(direction: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Li et al. 2018 filter normalisation of a flat direction: every row / conv filter of each weight
    tensor rescaled to the norm of the same row of θ; 1-D tensors (biases) set to zero."""
    reference = dict(model.named_parameters())
    out = []
    for name, d in _split(direction, model).items():
        if d.dim() <= 1:
            out.append(torch.zeros_like(d).reshape(-1))
            continue
        w = reference[name].detach()
        d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
        d_norms = d_rows.norm(dim=1, keepdim=True)
        # exact rescaling (Li et al.'s code adds 1e-10 to the norm, which is wrong for small directions);
        # an all-zero row has no direction to rescale and stays zero
        scale = torch.where(d_norms > 0, w_rows.norm(dim=1, keepdim=True) / d_norms.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
        out.append((d_rows * scale).reshape(-1))
    return torch.cat(out)


def random_direction(model: nn.Module, generator: torch.Generator, *, normalization: str = "filter") -> torch.Tensor:
    """A Gaussian direction in parameter space: "filter"-normalised (Li et al. 2018), "adaptive"
    (each entry scaled by |θ|, Kwon et al. 2021) or "none"."""
    theta = flat_parameters(model)
    # drawn in float32 whatever the model's dtype: the same seed gives the same directions in float64
    d = torch.randn(theta.numel(), generator=generator, dtype=torch.float32).to(theta)
    if normalization == "filter":
        return filter_normalize(d, model)
    if normalization == "adaptive":
        return d * theta.abs()
    if normalization == "none":
        return d
    raise ValueError(f"normalization must be 'filter', 'adaptive' or 'none', got {normalization!r}")


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
    directions = torch.stack([random_direction(model, generator, normalization=normalization) for _ in range(samples)])
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


# ============================================================================ 4. gradient noise


@dataclass
class NoiseScaleResult:
    """McCandlish et al. 2018's simple noise scale B_simple = tr(Σ)/|G|²."""

    b_simple: float
    trace_cov: float  # tr(Σ), Σ the per-example gradient covariance with 1/(N−1)
    grad_norm_sq: float  # |G|², G the mean gradient
    n: int
    note: str = ""  # why b_simple is infinite, when it is


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
    x, y = _prepare(model, x, y)
    loss_fn = _loss_fn(loss_fn)
    layers = _mlp_layers(model)
    if path == "fast" and layers is None:
        raise ValueError("the fast path needs a plain MLP (nn.Sequential of Linear and element-wise layers)")
    rows = memory_budget // max(1.0, 4 * _graph_bytes_per_example(model, x, y, loss_fn))
    norms, grad_sum = [], torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for rs in _row_chunks(x.shape[0], rows):
        if layers is not None and path != "general":
            chunk_norms, chunk_sum = _mlp_per_example_norms(model, layers, x[rs], y[rs], loss_fn)
        else:
            chunk_norms, chunk_sum = _vmap_per_example_norms(model, x[rs], y[rs], loss_fn)
        norms.append(chunk_norms)
        grad_sum += chunk_sum
    return torch.cat(norms), (grad_sum / x.shape[0])


def _mlp_per_example_norms(model, layers, x, y, loss_fn):
    """Closed-form per-example gradient norms of a plain MLP; returns (norms², summed gradient)."""
    params = list(p.detach() for p in model.parameters())
    h = x.flatten(1)
    inputs, outputs, index = [], [], 0
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
        h = z
    total = loss_fn(h, y) * x.shape[0]  # Σ_i ℓ_i, so ∂/∂z_i is the per-example output gradient δ_i
    deltas = torch.autograd.grad(total, outputs)
    norms = torch.zeros(x.shape[0], dtype=torch.float64)
    grads = []
    for a, delta, m in zip(inputs, deltas, (m for m in layers if type(m) is nn.Linear)):
        delta_sq = delta.pow(2).sum(dim=1).double()
        norms += a.pow(2).sum(dim=1).double() * delta_sq
        grads.append((delta.T @ a).reshape(-1))
        if m.bias is not None:
            norms += delta_sq
            grads.append(delta.sum(dim=0))
    return norms, torch.cat(grads).double()


def _vmap_per_example_norms(model, x, y, loss_fn):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def example_loss(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)  # (n, D)
    return flat.pow(2).sum(dim=1).double(), flat.sum(dim=0).double()


def gradient_noise_scale(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
) -> NoiseScaleResult:
    """B_simple = tr(Σ)/|G|² (McCandlish et al. 2018), exact from per-example gradients g_i over all N examples:
    G = (1/N) Σ g_i, tr(Σ) = 1/(N−1) Σ ‖g_i − G‖² = N/(N−1)·(mean ‖g_i‖² − |G|²)."""
    norms_sq, mean_grad = per_example_gradient_norms_sq(model, x, y, loss_fn=loss_fn,
                                                        memory_budget=memory_budget, path=path)
    n = norms_sq.numel()
    if n < 2:
        raise ValueError("the gradient noise scale needs at least 2 examples")
    mean_norm_sq = float(norms_sq.mean())
    grad_norm_sq = float(mean_grad @ mean_grad)
    trace_cov = max(0.0, n / (n - 1) * (mean_norm_sq - grad_norm_sq))
    eps = torch.finfo(next(model.parameters()).dtype).eps
    if grad_norm_sq <= (100 * eps) ** 2 * mean_norm_sq:
        note = (f"|G|^2 = {grad_norm_sq:.3g} is numerically zero (below (100 eps)^2 x mean |g_i|^2 = "
                f"{(100 * eps) ** 2 * mean_norm_sq:.3g}): the mean gradient vanishes at this point, so B_simple is infinite")
        return NoiseScaleResult(math.inf, trace_cov, grad_norm_sq, n, note)
    return NoiseScaleResult(trace_cov / grad_norm_sq, trace_cov, grad_norm_sq, n)


# ============================================================================ 5. connectivity


def barrier_height(alphas: Sequence[float], losses: Sequence[float], loss_a: float, loss_b: float) -> float:
    """max_α [L(θ(α)) − ((1−α)·L(θ_a) + α·L(θ_b))]: height above the straight line between the endpoint
    losses (Entezari et al. 2022). Frankle et al. 2020 subtract the endpoint mean instead."""
    a = np.asarray(alphas, dtype=np.float64)
    return float(np.max(np.asarray(losses, dtype=np.float64) - ((1 - a) * loss_a + a * loss_b)))


@dataclass
class InterpolationResult:
    """Loss and accuracy along θ(α) = (1−α)·θ_a + α·θ_b."""

    alphas: list[float]
    losses: list[float]
    accuracies: list[float]
    barrier: float
    endpoint_losses: tuple[float, float]


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
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> InterpolationResult:
    """Linear mode connectivity: L and accuracy at θ(α) = (1−α)·θ_a + α·θ_b for each α, and the loss
    barrier `barrier_height` (Entezari et al. 2022). The endpoints are evaluated exactly (α = 0 and 1)."""
    _same_architecture(model_a, model_b)
    check_measurable(model_b)
    theta_a = flat_parameters(model_a)
    endpoints = torch.stack([theta_a, flat_parameters(model_b).to(theta_a)])  # θ(α) = (1−α)·θ_a + α·θ_b
    alphas = [float(a) for a in alphas]
    a = torch.tensor([0.0, 1.0, *alphas], dtype=torch.float64)[:, None]
    result = losses_at_points(model_a, x, y, torch.zeros_like(theta_a), endpoints, torch.cat([1 - a, a], dim=1),
                              loss_fn=loss_fn, memory_budget=memory_budget)
    loss_a, loss_b = float(result.losses[0]), float(result.losses[1])
    losses = result.losses[2:].tolist()
    return InterpolationResult(alphas, losses, result.accuracies[2:].tolist(),
                               barrier_height(alphas, losses, loss_a, loss_b), (loss_a, loss_b))


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
) -> SurfaceResult:
    """2-D slice of the loss around θ (Li et al. 2018): two random Gaussian filter-normalised directions
    from `seed` (or the given flat `directions`, used unchanged), on a steps×steps grid over [−span, span]²."""
    grid = symmetric_grid(steps, span)
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = (random_direction(model, generator), random_direction(model, generator))
    d = torch.stack([directions[0], directions[1]])
    a, b = np.meshgrid(grid, grid, indexing="ij")
    coefficients = torch.from_numpy(np.stack([a.ravel(), b.ravel()], axis=1))
    result = losses_at_points(model, x, y, flat_parameters(model), d, coefficients,
                              loss_fn=loss_fn, memory_budget=memory_budget)
    return SurfaceResult(grid.copy(), grid.copy(), result.losses.numpy().reshape(steps, steps),
                         result.accuracies.numpy().reshape(steps, steps), (d[0], d[1]))
