"""Plain baselines for the benchmark: the obvious way to compute each measurement.

Each is correct and written the way a careful researcher would write it first: a loop over
grid points, over α, over directions and σ, over examples; power iteration with PyHessian's
stopping rule on a gradient graph kept alive. `bench.py` times our functions against these
in the same process.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call


def _params_from_flat(model, flat):
    out, offset = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def loss_at(model, theta, x, y) -> float:
    return F.cross_entropy(functional_call(model, _params_from_flat(model, theta), (x,)), y).item()


def top_eigenvalue_pyhessian_rule(model, x, y, *, tol=1e-3, max_iter=100, seed=0):
    """PyHessian's algorithm: one gradient graph (create_graph) kept for every HVP, power iteration
    normalised with ‖v‖ + 1e-6, stopped when |λ_t − λ_{t−1}| / (|λ_{t−1}| + 1e-6) < tol."""
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.sqrt(sum((t * t).sum() for t in v)) + 1e-6
    v = [t / norm for t in v]
    value, hvps = None, 0
    for _ in range(max_iter):
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        hvps += 1
        new = sum((a * b).sum() for a, b in zip(hv, v)).item()
        norm = torch.sqrt(sum((t * t).sum() for t in hv)) + 1e-6
        v = [t.detach() / norm for t in hv]
        if value is not None and abs(new - value) / (abs(value) + 1e-6) < tol:
            value = new
            break
        value = new
    return value, hvps


def trace_hutchinson_pyhessian_rule(model, x, y, *, tol=1e-3, max_iter=100, seed=0):
    """PyHessian's trace: Rademacher probes zᵀHz on one kept gradient graph, their running mean stopped when it
    moves by |t_k − t_{k−1}| / (|t_{k−1}| + 1e-6) < tol (a rule on the mean's movement, not its error)."""
    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    samples, mean = [], None
    for _ in range(max_iter):
        v = [torch.randint(0, 2, p.shape, generator=g).to(p.dtype) * 2 - 1 for p in params]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        samples.append(sum((a * b).sum() for a, b in zip(hv, v)).item())
        new = sum(samples) / len(samples)
        if mean is not None and abs(new - mean) / (abs(mean) + 1e-6) < tol:
            return new, len(samples)
        mean = new
    return mean, len(samples)


def kept_graph_product(model, x, y):
    """v (flat) -> H·v (flat) by autograd's double backward through one gradient graph built here and kept:
    the product that `top_eigenvalue_pyhessian_rule` repeats."""
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)

    def product(v: torch.Tensor) -> torch.Tensor:
        parts = list(_params_from_flat(model, v).values())
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(grads, params, parts, retain_graph=True)])

    return product


def top_eigenvalue_power_to_accuracy(model, x, y, exact: float, *, rel_error=1e-4, max_iter=1000, seed=0):
    """Power iteration on the same kept graph, stopped by an oracle once |λ − exact| ≤ rel_error·exact:
    the cheapest power iteration can be at the accuracy we guarantee (no real stopping rule can do better)."""
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g) for p in params]
    norm = torch.sqrt(sum((t * t).sum() for t in v))
    v = [t / norm for t in v]
    for hvps in range(1, max_iter + 1):
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        value = sum((a * b).sum() for a, b in zip(hv, v)).item()
        if abs(value - exact) <= rel_error * abs(exact):
            return value, hvps
        norm = torch.sqrt(sum((t * t).sum() for t in hv))
        v = [t.detach() / norm for t in hv]
    return value, max_iter


def surface_loop(model, x, y, d1, d2, grid):
    """One forward pass per grid point."""
    theta = flat(model)
    out = torch.empty(len(grid), len(grid), dtype=torch.float64)
    for i, a in enumerate(grid):
        for j, b in enumerate(grid):
            out[i, j] = loss_at(model, theta + float(a) * d1 + float(b) * d2, x, y)
    return out


def interpolation_loop(model_a, model_b, x, y, alphas):
    """One forward pass per α."""
    ta, tb = flat(model_a), flat(model_b)
    return [loss_at(model_a, (1 - a) * ta + a * tb, x, y) for a in alphas]


def filter_normalised_directions(model, samples, seed=0):
    """Li et al.'s directions, drawn the obvious way: a float32 Gaussian per direction from one seeded
    generator, each weight row rescaled to the norm of the same row of θ, biases zeroed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(samples):
        d = torch.randn(sum(p.numel() for p in model.parameters()), generator=g)
        parts = []
        for p, part in zip(model.parameters(), torch.split(d, [p.numel() for p in model.parameters()])):
            if p.dim() <= 1:
                parts.append(torch.zeros_like(part))
                continue
            rows, w = part.view(p.shape[0], -1), p.detach().view(p.shape[0], -1)
            parts.append((rows * (w.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True))).reshape(-1))
        out.append(torch.cat(parts))
    return out


def flatness_loop(model, x, y, directions, sigmas):
    """One forward pass per direction and σ; returns the mean increase per σ."""
    theta = flat(model)
    base = loss_at(model, theta, x, y)
    rows = [[loss_at(model, theta + s * d, x, y) - base for s in sigmas] for d in directions]
    return torch.tensor(rows, dtype=torch.float64).mean(dim=0)


def noise_scale_loop(model, x, y):
    """One backward pass per example; B_simple = tr(Σ)/|G|² with the 1/(N−1) covariance."""
    params = [p for p in model.parameters()]
    n = x.shape[0]
    grad_sum = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    norm_sum = 0.0
    for i in range(n):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).double()
        grad_sum += g
        norm_sum += float(g @ g)
    mean = grad_sum / n
    grad_norm_sq = float(mean @ mean)
    trace = n / (n - 1) * (norm_sum / n - grad_norm_sq)
    return trace / grad_norm_sq
