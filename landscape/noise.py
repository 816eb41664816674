"""Gradient noise: per-example gradients (reference and MLP fast path) and the noise scales built on them."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landscape.hessian import hessian_operator
from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, ParamSpec, Selection, fast_path_layers,
                                functional_forward, functional_loss, graph_bytes_per_example, prepare, resolve_loss,
                                row_chunks, select_parameters, twice_differentiable)
from landscape.spectrum import trace_estimate


class PerExampleGradients(ABC):
    """The per-example gradients g_i = ∇ℓ_i on (x, y), ℓ_i = loss_fn(f(x_i), y_i), chunk by chunk under the
    memory budget, never all materialised. Subclasses compute one chunk's gradients in their own form
    (`_chunk_part`) and the three reductions every noise scale needs from it; this class runs the chunks."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, memory_budget: int,
                 selection: Selection):
        self.model, self.loss_fn, self.selection = model, loss_fn, selection
        self.x, self.y = x, y
        self.params = [p.detach() for p in selection.tensors]
        self.dim = sum(p.numel() for p in self.params)
        self.chunks = row_chunks(x.shape[0], memory_budget // max(1.0, self._bytes_per_row()))
        self._cached = None  # the only chunk's part, kept when everything fits in one chunk

    @abstractmethod
    def _bytes_per_row(self) -> float:
        """Scratch memory one example needs."""

    @abstractmethod
    def _chunk_part(self, x: torch.Tensor, y: torch.Tensor):
        """The gradients of one chunk of examples, in whatever form the reductions below read."""

    @abstractmethod
    def _norms_and_sum(self, part) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖g_i‖² per example of the chunk, float64; Σ_i g_i over it, float64)."""

    @abstractmethod
    def _weighted_sum(self, part, u: torch.Tensor) -> torch.Tensor:
        """Σ_i u[p, i]·g_i over the chunk for every row p of u (P, n), as (P, D)."""

    @abstractmethod
    def _dots(self, part, vectors: torch.Tensor) -> torch.Tensor:
        """g_iᵀ·v_p for the chunk's examples i and every row p of vectors (P, D), as (P, n) in float64."""

    def _part(self, rows: slice):
        if self._cached is not None:
            return self._cached
        part = self._chunk_part(self.x[rows], self.y[rows])
        if len(self.chunks) == 1:
            self._cached = part
        return part

    def norms_and_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖g_i‖² for all i, float64; G = mean g_i, float64)."""
        norms, total = [], torch.zeros(self.dim, dtype=torch.float64, device=self.x.device)
        for rows in self.chunks:
            n, s = self._norms_and_sum(self._part(rows))
            norms.append(n)
            total += s
        return torch.cat(norms), total / self.x.shape[0]

    def weighted_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """Σ_i weights[p, i]·g_i for every row p of weights (P, N), as (P, D) in the model's dtype."""
        out = torch.zeros((weights.shape[0], self.dim), dtype=self.params[0].dtype, device=self.x.device)
        for rows in self.chunks:
            out += self._weighted_sum(self._part(rows), weights[:, rows].to(self.params[0]))
        return out

    def dots(self, vectors: torch.Tensor) -> torch.Tensor:
        """g_iᵀ·v_p for every example i and row p of vectors (P, D), as (P, N) in float64."""
        return torch.cat([self._dots(self._part(rows), vectors) for rows in self.chunks], dim=1)


class AutogradPerExample(PerExampleGradients):
    """The reference: each chunk's gradients as a dense (n, D) matrix, by torch.func.vmap(grad)."""

    def _bytes_per_row(self) -> float:
        return (4 * graph_bytes_per_example(self.model, self.x, self.y, self.loss_fn, self.selection)
                + 2 * self.dim * self.x.element_size())

    def _chunk_part(self, x, y) -> torch.Tensor:
        return _vmap_gradients(self.model, x, y, self.loss_fn, self.selection)

    def _norms_and_sum(self, part):
        return part.pow(2).sum(dim=1).double(), part.sum(dim=0).double()

    def _weighted_sum(self, part, u):
        return u @ part

    def _dots(self, part, vectors):
        return (part @ vectors.T).T.double()


class MLPPerExample(PerExampleGradients):
    """The MLP fast path. For a Linear layer with inputs a_i and output gradients δ_i = ∂ℓ_i/∂z_i,
    ∂ℓ_i/∂W = δ_i·a_iᵀ and ∂ℓ_i/∂b = δ_i, so from one backward pass of Σ_i ℓ_i (which gives every δ_i):
        ‖∂ℓ_i/∂W‖² = ‖a_i‖²·‖δ_i‖²,   Σ_i u_i·∂ℓ_i/∂W = (u⊙δ)ᵀ·a,   ⟨∂ℓ_i/∂W, V⟩ = δ_iᵀ·V·a_i.
    Equal to `AutogradPerExample`: tests/test_noise.py::test_fast_and_general_per_example_gradients_agree."""

    def __init__(self, model, layers, x, y, loss_fn, memory_budget, selection):
        self.layers = layers
        super().__init__(model, x, y, loss_fn, memory_budget, selection)

    def _bytes_per_row(self) -> float:  # inputs, pre-activations and δ of every Linear layer, with room to spare
        widths = self.x.flatten(1).shape[1] + sum(m.out_features for m in self.layers if type(m) is nn.Linear)
        return 6 * widths * self.x.element_size()

    def _chunk_part(self, x, y) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
        return _mlp_parts(self.layers, self.params, x, y, self.loss_fn)

    def _norms_and_sum(self, part):
        n = torch.zeros(part[0][0].shape[0], dtype=torch.float64, device=self.x.device)
        sums = []
        for a, delta, bias in part:
            delta_sq = delta.pow(2).sum(dim=1).double()
            n += a.pow(2).sum(dim=1).double() * delta_sq  # ‖δ_i a_iᵀ‖² = ‖a_i‖²‖δ_i‖²
            if bias:
                n += delta_sq
            sums += [(delta.T @ a).reshape(-1), *([delta.sum(dim=0)] if bias else [])]
        return n, torch.cat(sums).double()

    def _weighted_sum(self, part, u):
        pieces = []
        for a, delta, bias in part:
            # (P, out, n) built in that layout: transposing a (P, n, out) product instead copied P times more
            scaled = (u[:, None, :] * delta.T.contiguous()[None]).view(-1, delta.shape[0])  # (P·out, n)
            pieces += [(scaled @ a).reshape(u.shape[0], -1), *([u @ delta] if bias else [])]
        return torch.cat(pieces, dim=1)

    def _dots(self, part, vectors):
        n = part[0][0].shape[0]
        total = torch.zeros((n, vectors.shape[0]), dtype=vectors.dtype, device=vectors.device)
        offset = 0
        for a, delta, bias in part:
            out_f, in_f = delta.shape[1], a.shape[1]
            v_w = vectors[:, offset : offset + out_f * in_f].reshape(-1, in_f)  # (P·out, in)
            offset += out_f * in_f
            total += (a @ v_w.T).view(n, -1, out_f).mul_(delta[:, None, :]).sum(dim=2)  # δ_iᵀ·V·a_i
            if bias:
                total += delta @ vectors[:, offset : offset + out_f].T
                offset += out_f
        return total.T.double()


def _mlp_parts(layers, params, x, y, loss_fn) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Per Linear layer of a plain MLP: its inputs a (n, in), the per-example output gradients δ (n, out) of
    ℓ_i, and whether it has a bias."""
    h = x.flatten(1)
    inputs, outputs, linears, index = [], [], [], 0
    with torch.enable_grad():
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
        total = loss_fn(h, y) * x.shape[0]  # Σ_i ℓ_i, so ∂/∂z_i is the per-example output gradient δ_i
        deltas = torch.autograd.grad(total, outputs)
    return [(a, d, m.bias is not None) for a, d, m in zip(inputs, deltas, linears)]


def _vmap_gradients(model, x, y, loss_fn, selection: Selection) -> torch.Tensor:
    """Per-example gradients (n, D) of any model, by torch.func.vmap(grad)."""
    params = {k: v.detach() for k, v in zip(selection.names, selection.tensors)}

    def example_loss(p, xi, yi):
        return loss_fn(functional_forward(model, selection, p, xi.unsqueeze(0)), yi.unsqueeze(0))

    with twice_differentiable():  # the math attention kernel has vmap batching rules; the fused CPU kernel has none
        grads = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.reshape(x.shape[0], -1) for g in grads.values()], dim=1)


def per_example_gradient_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn | None = None,
                              memory_budget: int = DEFAULT_MEMORY_BUDGET, path: str = "auto",
                              params: ParamSpec = None) -> PerExampleGradients:
    """The per-example gradients of (x, y) as a `PerExampleGradients`: the one dispatch point, `MLPPerExample`
    for a plain MLP (path "auto" or "fast"), `AutogradPerExample` otherwise."""
    selection = select_parameters(model, params)
    x, y = prepare(model, x, y, loss_fn, selection)
    loss_fn = resolve_loss(loss_fn)
    layers = fast_path_layers(model, path, selection)
    if layers is not None:
        return MLPPerExample(model, layers, x, y, loss_fn, memory_budget, selection)
    return AutogradPerExample(model, x, y, loss_fn, memory_budget, selection)


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                          loss_fn: LossFn | None = None, params: ParamSpec = None) -> torch.Tensor:
    """Every per-example gradient ∇ℓ_i as a dense (N, D) matrix (for small models and exact checks)."""
    selection = select_parameters(model, params)
    x, y = prepare(model, x, y, loss_fn, selection)
    return _vmap_gradients(model, x, y, resolve_loss(loss_fn), selection)


def per_example_gradient_norms_sq(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
    params: ParamSpec = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖∇ℓ_i‖² for every example i, float64 (N,); the mean gradient G, flat).

    ℓ_i = loss_fn(f(x_i), y_i), which requires `loss_fn` to be a mean of per-example terms.
    Plain MLPs: ‖∂ℓ_i/∂W‖² = ‖a_i‖²·‖δ_i‖² per Linear layer (input a_i, output gradient δ_i),
    plus ‖δ_i‖² for the bias, all from one backward pass. Other models: torch.func.vmap(grad).
    """
    return per_example_gradient_rows(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, path=path,
                                     params=params).norms_and_mean()


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
    params: ParamSpec = None,
) -> NoiseScaleResult:
    """McCandlish et al. 2018's noise scales, from the exact per-example gradients g_i of all N examples.

    B_simple = tr(Σ)/|G|², G = (1/N) Σ g_i, tr(Σ) = 1/(N−1) Σ ‖g_i − G‖² = N/(N−1)·(mean ‖g_i‖² − |G|²).
    B_noise = tr(HΣ)/(GᵀHG), the curvature-aware scale, with exact Hessian products: tr(HΣ) =
    1/(N−1) Σ (g_i − G)ᵀH(g_i − G), exactly when N ≤ exact_below, else by Hutch++ in example space
    until its standard error reaches rel_stderr·|tr(HΣ)| (b_noise=False skips it).
    """
    per_example = per_example_gradient_rows(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, path=path,
                                            params=params)
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
    op = hessian_operator(model, per_example.x, per_example.y, loss_fn=per_example.loss_fn, memory_budget=budget,
                          params=list(per_example.selection.names))
    g = mean_grad.to(per_example.params[0])
    result.g_h_g = float(g @ op(g))
    n = result.n

    def m_matmat(u: torch.Tensor) -> torch.Tensor:  # rows u (P, N) -> rows of M·u
        w = per_example.weighted_sums(u) - u.sum(dim=1, keepdim=True).to(g) * g  # Σ_i u_i (g_i − G)
        hw = op.matmat(w)
        return per_example.dots(hw) - (hw @ g).double()[:, None]

    if n <= exact_below:
        trace, stderr, probes = float(torch.trace(m_matmat(torch.eye(n, dtype=torch.float64, device=g.device)))), 0.0, 0
    else:
        # a sketch of one probe block (8): 16 sketch products and the 16 Hutchinson ones that the stopping rule
        # needs at least, Hutch++'s 2:1 split; here 32 products reach 0.9% stderr, 16 sketches 0.6% with 48
        estimate = trace_estimate(m_matmat, n, method="hutch++", rel_stderr=rel_stderr, max_matvecs=max_probes,
                                  seed=seed, like=torch.zeros(1, dtype=torch.float64, device=g.device), sketch=8)
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
    params: ParamSpec = None,
) -> TwoBatchNoiseResult:
    """|G|², tr(Σ) and B_simple from mini-batch gradients only, as one computes them at scale (McCandlish et al.
    2018, appendix A): with G_B the mean gradient of a batch of B examples drawn without replacement,
    E|G_B|² = |G|² + tr(Σ)(1/B − 1/N), so per draw tr(Σ) ≈ (|G_s|² − |G_b|²)/(1/b_s − 1/b_b) and
    |G|² ≈ (b_b|G_b|² − b_s|G_s|²)/(b_b − b_s) + tr(Σ)/N (the last term corrects for the finite data set;
    both are then unbiased). Small and big batches are drawn independently; B_simple = mean tr(Σ)/mean |G|²."""
    selection = select_parameters(model, params)
    x, y = prepare(model, x, y, loss_fn, selection)
    n = x.shape[0]
    if not 1 <= b_small < b_big <= n or batches < 2:
        raise ValueError(f"need 1 <= b_small < b_big <= N = {n} and batches >= 2, got {b_small}, {b_big}, {batches}")
    loss_fn = resolve_loss(loss_fn)
    values = {k: v.detach().requires_grad_(True) for k, v in zip(selection.names, selection.tensors)}
    generator = torch.Generator().manual_seed(seed)

    def batch_grad_norm_sq(size: int) -> float:
        idx = torch.randperm(n, generator=generator)[:size].to(x.device)
        with torch.enable_grad():
            grads = torch.autograd.grad(functional_loss(model, selection, values, x[idx], y[idx], loss_fn),
                                        list(values.values()), allow_unused=True, materialize_grads=True)
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


@dataclass
class BatchSharpnessResult:
    """Batch sharpness (Andreyev & Beneventano 2024): the mean over mini-batches B of the Rayleigh quotient of
    the batch's own Hessian along the batch's own gradient, g_Bᵀ H_B g_B / ‖g_B‖²."""

    value: float  # the mean over the batches with a non-zero gradient
    stderr: float  # the standard error of that mean (NaN for a single batch)
    values: list[float]  # one quotient per batch (NaN where g_B = 0)
    batch_size: int
    indices: torch.Tensor  # (batches, batch_size): the examples of each batch


def batch_sharpness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    batches: int = 4,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: str = "auto",
    params: ParamSpec = None,
) -> BatchSharpnessResult:
    """E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over `batches` mini-batches of `batch_size` examples, each drawn without
    replacement as one SGD step draws it; g_B and H_B are the gradient and Hessian of the batch's mean loss.

    Under mini-batch SGD this, not full-batch λ_max, is what stabilises at 2/η (Andreyev & Beneventano 2024,
    arXiv 2412.20553): a step along −η g_B changes the batch's own loss by −η‖g_B‖²(1 − η·q/2) to second order,
    q the quotient, so it is stable while q < 2/η. Each quotient lies in [λ_min(H_B), λ_max(H_B)]. One gradient
    and one exact Hessian product per batch, through `hessian_operator` (the MLP fast path where it applies).
    """
    x, y = prepare(model, x, y, loss_fn, select_parameters(model, params))
    n = x.shape[0]
    if not 1 <= batch_size <= n or batches < 1:
        raise ValueError(f"need 1 <= batch_size <= N = {n} and batches >= 1, got {batch_size} and {batches}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n, generator=generator)[:batch_size] for _ in range(batches)])
    values = []
    for idx in indices.to(x.device):
        op = hessian_operator(model, x[idx], y[idx], loss_fn=loss_fn, memory_budget=memory_budget, path=path,
                              params=params)
        g = op.gradient()
        g64 = g.double()
        norm_sq = float(g64 @ g64)
        values.append(float(g64 @ op(g).double()) / norm_sq if norm_sq > 0 else math.nan)
    finite = np.asarray([v for v in values if math.isfinite(v)])
    value = float(finite.mean()) if finite.size else math.nan
    stderr = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else math.nan
    return BatchSharpnessResult(value, stderr, values, batch_size, indices)
