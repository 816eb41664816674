"""Hessian-vector products of the mean loss, exact and matrix-free: one interface (`HessianOperator`), the
autograd reference (`AutogradHessian`), the MLP fast path (`MLPHessian`, Pearlmutter's R-operator written out),
and one dispatch point (`hessian_operator`); the dense Hessian and the exact diagonal built on them."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from landscape.distributed import DataShard
from landscape.plumbing import (DEFAULT_MEMORY_BUDGET, LossFn, ParamSpec, Selection, fast_path_layers,
                                flat_parameters, functional_loss, graph_bytes_per_example, is_integer_labels,
                                linear_parts, prepare, resolve_loss, row_chunks, select_parameters, split_rows,
                                twice_differentiable)

NO_EXACT_DIAGONAL = ("the exact Hessian diagonal needs a plain MLP (nn.Sequential of Linear layers) whose "
                     "activations are piecewise linear (ReLU, LeakyReLU, Identity)")


class HessianOperator(ABC):
    """H, the Hessian of the mean loss over (x, y) w.r.t. the measured parameters (`select_parameters`), as an
    operator on flat vectors (rows of V in `named_parameters()` order). `dim` is D; `matvecs` counts the
    products computed so far."""

    dim: int
    matvecs: int

    @abstractmethod
    def matmat(self, vs: torch.Tensor, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """H·vᵢ for every row vᵢ of vs (b, D); with `outputs` (b, D) of zeros and ones, (H·vᵢ)⊙outputsᵢ."""

    @abstractmethod
    def gradient(self) -> torch.Tensor:
        """∇L, flat."""

    @abstractmethod
    def diagonal(self) -> torch.Tensor | None:
        """diag(H) exactly, where a closed form applies to this model and data; else None."""

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[None])[0]


class ShardedHessian(HessianOperator):
    """The Hessian of the whole data set's mean loss from this rank's operator `local` over its slice of
    `local_examples` examples: every product, the gradient and the diagonal are (n_r/N)·(local one), summed
    over the ranks. Implements `HessianOperator`'s interface (matmat, __call__, gradient, diagonal, dim,
    matvecs)."""

    def __init__(self, local, shard: DataShard, local_examples: int) -> None:
        self.local, self.shard = local, shard
        self.weight = local_examples / shard.examples
        self.dim = local.dim

    @property
    def matvecs(self) -> int:
        return self.local.matvecs

    def matmat(self, vs: torch.Tensor, outputs: torch.Tensor | None = None) -> torch.Tensor:
        return self.shard.sum_(self.local.matmat(vs, outputs) * self.weight)

    def gradient(self) -> torch.Tensor:
        return self.shard.sum_(self.local.gradient() * self.weight)

    def diagonal(self) -> torch.Tensor | None:
        """The summed diagonal where every rank's closed form applies; None on every rank otherwise."""
        d = self.local.diagonal()
        missing = self.shard.sum_(torch.tensor([float(d is None)], dtype=torch.float64))
        if missing.item() > 0:
            return None
        return self.shard.sum_(d * self.weight)


class AutogradHessian(HessianOperator):
    """V -> H·V for the mean loss over (x, y), H the Hessian w.r.t. all parameters (rows of V flat, in
    `parameters()` order), by autograd's double backward, which every loss and model supports: the reference.

    When the double-backward graph fits in the memory budget it is built once and every
    product is one backward pass through it (about 1.25x a forward+backward); otherwise
    each product recomputes the graph chunk by chunk, weighting chunk n_c by n_c/N.
    """

    def __init__(self, model, x, y, loss_fn, memory_budget, selection: Selection):
        self.model, self.x, self.y, self.loss_fn, self.selection = model, x, y, loss_fn, selection
        self.params = {k: v.detach().requires_grad_(True) for k, v in zip(selection.names, selection.tensors)}
        self.dim = selection.dim
        self.matvecs = 0
        per_example = graph_bytes_per_example(model, x, y, loss_fn, selection)
        self.chunks = row_chunks(x.shape[0], memory_budget // per_example)
        self._grads = self._gradient_graph(self.chunks[0]) if len(self.chunks) == 1 else None

    def _gradient_graph(self, rows: slice) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad(), twice_differentiable():
            loss = functional_loss(self.model, self.selection, self.params, self.x[rows], self.y[rows], self.loss_fn)
            return torch.autograd.grad(loss, list(self.params.values()), create_graph=True, materialize_grads=True)

    def _products(self, grads, vs: torch.Tensor) -> torch.Tensor:
        live = [i for i, g in enumerate(grads) if g.requires_grad]  # a gradient that is constant has no Hessian
        rows = split_rows(vs, self.selection)
        parts = [rows[i] for i in live]
        params = list(self.params.values())
        outputs = [grads[i] for i in live]
        # each product written into its row as it comes: stacking the rows per parameter and concatenating held
        # every product three times (ResNet-18's 8 probes: 1 GB); a parameter without curvature keeps its zeros
        out = torch.zeros((vs.shape[0], self.dim), dtype=params[0].dtype, device=params[0].device)
        columns = split_rows(out, self.selection)
        # one backward per vector: vmap (is_grads_batched) falls back to a slower loop for common losses
        with twice_differentiable():
            for b in range(vs.shape[0]):
                row = torch.autograd.grad(outputs, params, [p[b] for p in parts], retain_graph=True, allow_unused=True)
                for h, target in zip(row, columns):
                    if h is not None:
                        target[b] = h
        return out

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

    def diagonal(self) -> None:
        """No closed form for an arbitrary model: diag(H) would take D products."""
        return None


class MLPHessian(HessianOperator):
    """Closed-form V -> H·V for a plain MLP: Pearlmutter's R-operator, a forward then a backward pass.

    For Linear layers z_l = a_l·W_lᵀ + b_l with a_{l+1} = φ_l(z_l) element-wise, the direction
    v = (V_l, c_l) gives Rz_l = Ra_l·W_lᵀ + a_l·V_lᵀ + c_l and Ra_{l+1} = φ_l'(z_l)⊙Rz_l; backwards,
    Rδ_last = ∇²_z L·Rz_last (the loss Hessian in the logits, by autograd on an (N, C) graph),
    Rδ_{l−1} = φ'⊙(Rδ_l·W_l + δ_l·V_l) + φ''⊙Rz_{l−1}⊙(δ_l·W_l), and H·v = (Rδ_lᵀ·a_l + δ_lᵀ·Ra_l, ΣRδ_l).
    The activations, φ', φ'' and δ are computed once; b directions at a time share every GEMM.
    Equal to `AutogradHessian`: tests/test_hessian.py::test_closed_form_mlp_hvp_equals_autograd_double_backward.
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
        self.cross_entropy = loss_fn is F.cross_entropy and not self.tail and is_integer_labels(y)
        self.dim = sum(p.numel() for p in model.parameters())
        self.matvecs = 0
        self.budget = memory_budget
        # per row, the cache holds about five vectors per hidden layer and three per output (the input is a view)
        per_row = (5 * sum(m.out_features for m in self.linears[:-1]) + 3 * self.linears[-1].out_features)
        self.chunks = row_chunks(x.shape[0], memory_budget // (per_row * x.element_size()))
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
                z = F.linear(a[-1], w, b)
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
        return {"a": a, "d1": d1s, "d2": d2s,
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
                z = _some_columns(lambda cols: a[0] @ dw[cols].reshape(-1, w.shape[1]).T,
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
                grad_w = _some_columns(lambda cols: r_delta[:, cols].reshape(n, -1).T @ a[0],
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
                grad_w = delta.T @ a
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
            for sub in row_chunks(n, self.budget // (per_row * like.element_size())):
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
            grad_w = q.T @ a[l][sub].square()
            parts = [grad_w.reshape(-1), *([] if bias is None else [q.sum(dim=0)]), *parts]
            if l > 0:
                jac = (w if jac is None else jac @ w) * d1[l - 1][sub, None, :]  # (n, C, in) by broadcasting
        return torch.cat(parts)

    def matmat(self, vs: torch.Tensor, outputs: torch.Tensor | None = None) -> torch.Tensor:
        """H·vᵢ for every row vᵢ of vs (b, D); with `outputs` (b, D) of zeros and ones, (H·vᵢ)⊙outputsᵢ, and the
        two GEMMs with the inputs (most of the cost) are skipped where vᵢ or outputsᵢ has no first-layer weight."""
        self.matvecs += vs.shape[0]
        b = vs.shape[0]
        directions = linear_parts(self.linears, vs.detach())
        first_in = first_out = list(range(b))
        if outputs is not None:  # restricted products (diagonal blocks): find the ones with no first-layer part
            first_in = torch.nonzero(directions[0][0].reshape(b, -1).any(dim=1)).flatten().tolist()
            first_out = torch.nonzero(linear_parts(self.linears, outputs)[0][0].reshape(b, -1).any(dim=1)).flatten().tolist()
        total = None
        with torch.no_grad():
            for i, rows in enumerate(self.chunks):
                cache = self._caches[i] if self._caches is not None else self._cache(rows)
                product = self._product(cache, directions, b, first_in, first_out)
                total = product if total is None else total.add_(product)
        return total if outputs is None else total * outputs.to(total)


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
    shard: DataShard | None = None,
    params: ParamSpec = None,
) -> HessianOperator:
    """The exact Hessian of the mean loss as a matrix-free operator: `op(v)` = H·v, `op.matmat(V)` = rows H·vᵢ.

    The one dispatch point: path="auto" uses the closed-form R-operator (`MLPHessian`) for plain MLPs and
    autograd's double backward (`AutogradHessian`, reverse-over-reverse, which every loss supports) for any
    other model; "fast"/"general" force one. With a `shard` (landscape.distributed), (x, y) is this rank's
    slice of a data set spread over the ranks and the operator is the whole set's (`ShardedHessian`). `params`
    chooses the parameters (names or tensors; default: those with requires_grad=True).
    """
    selection = select_parameters(model, params)
    x, y = prepare(model, x, y, loss_fn, selection)
    layers = fast_path_layers(model, path, selection)
    if layers is not None:
        op = MLPHessian(model, layers, x, y, resolve_loss(loss_fn), memory_budget)
    else:
        op = AutogradHessian(model, x, y, resolve_loss(loss_fn), memory_budget, selection)
    return op if shard is None else ShardedHessian(op, shard, x.shape[0])


def hessian_vector_product(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *, loss_fn: LossFn | None = None,
    params: ParamSpec = None,
) -> torch.Tensor:
    """Exact H·v, H = ∇²_θ (1/N) Σ_i ℓ(f_θ(x_i), y_i); v and the result are flat over the measured parameters."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, params=params)
    return op(v.to(flat_parameters(model, params)))


def exact_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss_fn: LossFn | None = None,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, params: ParamSpec = None) -> torch.Tensor:
    """The dense Hessian (D, D) of the mean loss, column block by column block (for small models)."""
    op = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, params=params)
    like = flat_parameters(model, params)
    columns = max(1, min(op.dim, memory_budget // max(1, 8 * op.dim * like.element_size())))
    blocks = [op.matmat(torch.eye(op.dim, dtype=like.dtype, device=like.device)[s : s + columns])
              for s in range(0, op.dim, columns)]
    dense = torch.cat(blocks)
    return (dense + dense.T) / 2  # symmetric up to rounding; make it exactly so


def hessian_diagonal(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    params: ParamSpec = None,
) -> torch.Tensor:
    """diag(H) of the mean loss, exactly, flat over the measured parameters, for a plain MLP with piecewise-linear
    activations: there ∂²f/∂θᵢ² = 0, so H's diagonal equals the Gauss-Newton diagonal, which one backward pass
    of the C output directions gives (`MLPHessian.diagonal`). ValueError for any other model."""
    diagonal = hessian_operator(model, x, y, loss_fn=loss_fn, memory_budget=memory_budget, params=params).diagonal()
    if diagonal is None:
        raise ValueError(f"{NO_EXACT_DIAGONAL}; estimate tr(H) with hessian_trace(method='hutch++') instead")
    return diagonal
