r"""Independent oracle tests for the plain-MLP fast paths on inputs with CONSTANT COLUMNS, on deeper MLPs whose
hidden ReLU layers are followed by another Linear, and on sparse / strided mixtures of many directions.

Written without reading utils.py's implementation (only signatures and docstrings). Every expected value is built
here from plain autograd / torch.func / explicit loops on float64 models; utils is only ever the thing under test
(except utils.random_directions, used to regenerate perturbation_flatness's own directions).

Facts used:

* Constant input column j (x_nj = c_j for every row n): the first layer's pre-activation is
  z_n = W x_n + b = W_v x_{n,v} + (W c + b), so W[:, j] and b enter the loss only through c_j W[i, j] + b_i.
  Hence, as functions of theta, dL/dW_ij = c_j dL/db_i, and differentiating once more,
  H[W_ij, :] = c_j H[b_i, :]  (in particular (H v)[W_ij] = c_j (H v)[b_i] for every v, and the diagonal
  H[W_ij, W_ij] = c_j^2 H[b_i, b_i]); for c_j = 0 the whole row is zero.
* ReLU(o + b) = max(o, -b) + b: a bias may be moved past a ReLU, so a deeper ReLU MLP is the same function whatever
  the order of evaluation -- results must equal a direct forward pass.
* theta_p = base + sum_k C[p, k] d_k is a plain linear combination: the loss at it does not depend on how points are
  grouped, on which coefficients are zero, or on the memory layout of base / directions / coefficients.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import utils
from conftest import flat, unflatten

DT = torch.float64
REL = 1e-10


@pytest.fixture(autouse=True, scope="module", params=["split forced", "split where it pays"])
def split_policy(request):
    """Every test twice: with constant input columns always dropped from the first layer's products (the split
    otherwise waits until it saves more than it costs, which these small problems never reach), and as shipped."""
    from unittest import mock

    if request.param == "split where it pays":
        yield request.param
        return
    with mock.patch.object(utils, "_SPLIT_PAYS", 0), mock.patch.object(utils, "_SPLIT_PAYS_PER_PRODUCT", 0):
        yield request.param

# hidden activation cycles: "relu_tanh" = ReLU after the 1st hidden Linear, Tanh after the 2nd, ReLU after the 3rd ...
ACTS = {
    "relu": (nn.ReLU,),
    "tanh": (nn.Tanh,),
    "relu_tanh": (nn.ReLU, nn.Tanh),
    "tanh_relu": (nn.Tanh, nn.ReLU),
}
PIECEWISE = {"relu": (nn.ReLU,), "leaky": (lambda: nn.LeakyReLU(0.1),), "relu_leaky": (nn.ReLU, lambda: nn.LeakyReLU(0.1))}


# ======================================================================================
# Independent helpers (no use of utils)
# ======================================================================================


def make_mlp(widths, act="relu", bias=True, seed=0, flatten=False, w_scale=1.3, b_scale=0.6) -> nn.Sequential:
    """A float64 plain MLP [Flatten] Linear, act, Linear, act, ..., Linear with random weights ~ w_scale/sqrt(fan_in)
    and biases ~ b_scale (so a good share of ReLU units is inactive on each example)."""
    cycle = ACTS.get(act) or PIECEWISE[act]
    layers = [nn.Flatten()] if flatten else []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(cycle[i % len(cycle)]())
    model = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(w_scale / math.sqrt(m.in_features) * torch.randn(m.weight.shape, generator=g, dtype=DT))
                if m.bias is not None:
                    m.bias.copy_(b_scale * torch.randn(m.bias.shape, generator=g, dtype=DT))
    return model


def default_constants(d):
    """Constant columns for an input of width d: column 0, the last column, a run of neighbours and isolated ones,
    with values 0.0, 1.5 and -0.7."""
    const = {0: 0.0, d - 1: 1.5}
    for j in range(2, min(6, d - 1)):  # a run 2..5
        const[j] = (0.0, -0.7, 0.0, 1.5)[j - 2]
    for j in range(8, d - 2, 5):  # isolated ones
        const[j] = (-0.7, 0.0, 1.5)[(j // 5) % 3]
    return const


def make_x(n, d, const, seed=0):
    """(n, d) Gaussian float64 inputs with x[:, j] = const[j] for every j in const."""
    g = torch.Generator().manual_seed(5000 + seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    for j, c in const.items():
        x[:, j] = c
    return x


def make_y(n, classes, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(6000 + seed))


def make_dirs(model, K, seed=0, scale=0.4, bias=True) -> torch.Tensor:
    """K random flat directions (K, D): weight entries ~ scale/sqrt(fan_in), bias entries ~ scale (or 0)."""
    g = torch.Generator().manual_seed(7000 + seed)
    rows = []
    for _ in range(K):
        parts = []
        for p in model.parameters():
            if p.dim() == 2:
                parts.append(scale / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g, dtype=DT).reshape(-1))
            else:
                parts.append(scale * torch.randn(p.shape, generator=g, dtype=DT) * (1.0 if bias else 0.0))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def forward_at(model, theta, x):
    with torch.no_grad():
        return functional_call(model, unflatten(model, theta), (x,))


def direct_points(model, x, y, base, dirs, coefs):
    """(losses, accuracies, min top-2 logit margin) at theta_p = base + sum_k coefs[p, k] dirs[k], one
    functional_call per point (loop over k, zero coefficients skipped)."""
    Ls, As, margins = [], [], []
    for p in range(coefs.shape[0]):
        th = base.clone()
        for k in range(coefs.shape[1]):
            c = float(coefs[p, k])
            if c != 0.0:
                th = th + c * dirs[k]
        z = forward_at(model, th, x)
        Ls.append(float(F.cross_entropy(z, y)))
        As.append(float((z.argmax(1) == y).double().mean()))
        top = z.topk(2, dim=1).values if z.shape[1] > 1 else torch.zeros(z.shape[0], 2, dtype=DT) + float("inf")
        margins.append(float((top[:, 0] - top[:, 1]).min()))
    return torch.tensor(Ls, dtype=DT), torch.tensor(As, dtype=DT), margins


def assert_points_match(res, model, x, y, base, dirs, coefs, tag=""):
    L, A, margins = direct_points(model, x, y, base, dirs, coefs)
    assert res.losses.shape == L.shape and res.losses.dtype == DT, tag
    err = (res.losses - L).abs()
    bad = err > REL * L.abs().clamp_min(1.0)
    assert not bool(bad.any()), f"{tag}: loss mismatch at points {bad.nonzero().flatten().tolist()}, max err {float(err.max()):.3e}"
    for p, m in enumerate(margins):
        if m > 1e-9:  # away from an argmax tie the accuracy is a well-defined count
            assert float(res.accuracies[p]) == float(A[p]), f"{tag}: accuracy mismatch at point {p}"


def loss_theta(model, x, y):
    return lambda th: F.cross_entropy(functional_call(model, unflatten(model, th), (x,)), y)


def grad_oracle(model, x, y) -> torch.Tensor:
    th = flat(model).requires_grad_(True)
    (g,) = torch.autograd.grad(loss_theta(model, x, y)(th), th)
    return g.detach()


def hvp_oracle(model, x, y, V) -> torch.Tensor:
    """Rows H v_i by autograd double backward (reverse-over-reverse) of the mean cross-entropy."""
    th = flat(model).requires_grad_(True)
    (g,) = torch.autograd.grad(loss_theta(model, x, y)(th), th, create_graph=True)
    rows = [torch.autograd.grad(g, th, grad_outputs=v, retain_graph=True)[0] for v in V]
    return torch.stack(rows).detach()


def dense_hessian(model, x, y) -> torch.Tensor:
    return torch.func.hessian(loss_theta(model, x, y))(flat(model)).detach()


def rand_V(D, b, seed):
    return torch.randn(b, D, generator=torch.Generator().manual_seed(8000 + seed), dtype=DT)


def assert_rows_close(got, expected, tag=""):
    """Row-wise relative check (REL of each row's max |entry|); all-zero expected rows must come back (near) zero."""
    assert got.shape == expected.shape, tag
    gscale = float(expected.abs().max())
    for i in range(expected.shape[0]):
        s = float(expected[i].abs().max())
        err = float((got[i] - expected[i]).abs().max())
        if s == 0.0:
            assert err <= 1e-13 * max(gscale, 1.0), f"{tag} row {i}: expected zero, got {err:.3e}"
        else:
            assert err <= REL * s, f"{tag} row {i}: rel err {err / s:.3e}"


def first_layer(model):
    return next(m for m in model.modules() if isinstance(m, nn.Linear))


def index_of(model, param):
    i = 0
    for p in model.parameters():
        if p is param:
            return i
        i += p.numel()
    raise KeyError


# ======================================================================================
# hessian_operator: H·v, matmat, outputs mask, gradient on constant-column inputs
# ======================================================================================

HESS_CASES = [
    # (widths, act, bias)
    ([14, 9, 7, 4], "relu", True),
    ([14, 9, 7, 4], "relu", False),
    ([14, 8, 6, 5, 3], "relu", True),
    ([14, 9, 7, 4], "tanh", True),
    ([14, 8, 7, 6, 3], "relu_tanh", True),
    ([14, 8, 7, 6, 3], "tanh_relu", False),
]


@pytest.mark.parametrize("path", ["fast", "auto", "general"])
@pytest.mark.parametrize("widths,act,bias", HESS_CASES)
def test_hessian_operator_equals_double_backward_with_constant_columns(widths, act, bias, path):
    """op.matmat(V) rows == H v_i and op(v) == H v, with H the Hessian of the mean cross-entropy w.r.t. the flat
    parameters, computed by autograd double backward; inputs have constant columns (0, last, a run, isolated ones,
    values 0 / 1.5 / -0.7). V includes an all-zero row (H·0 = 0). op.gradient() == autograd gradient. Holds for 3-4
    Linear ReLU / Tanh / mixed MLPs, with and without biases, on all paths (1e-10 relative per row)."""
    d = widths[0]
    model = make_mlp(widths, act, bias=bias, seed=len(widths) + 3 * bias)
    x = make_x(21, d, default_constants(d), seed=1)
    y = make_y(21, widths[-1], seed=1)
    D = flat(model).numel()
    V = rand_V(D, 6, seed=2)
    V[3] = 0.0
    expected = hvp_oracle(model, x, y, V)
    op = utils.hessian_operator(model, x, y, path=path)
    assert_rows_close(op.matmat(V), expected, f"{act} matmat")
    assert_rows_close(op(V[0]).unsqueeze(0), expected[:1], f"{act} op(v)")
    g = grad_oracle(model, x, y)
    assert float((op.gradient() - g).abs().max()) <= REL * float(g.abs().max())


@pytest.mark.parametrize("act", ["relu", "relu_tanh", "tanh"])
def test_hessian_operator_wide_first_layer_many_directions_and_budgets(act):
    """With a wide first hidden layer (64 units), 24 inputs of which 9 are constant, and 12 product directions at
    once (so the first layer's GEMMs with X have many weight rows), op.matmat(V) == autograd H v_i for every
    memory_budget (2 kB and 20 kB force example chunks; 1 GiB one pass). Some rows of V have no first-layer weight
    entries, some only first-layer entries, one is zero; with an `outputs` mask the result is (H v_i) * mask_i."""
    d = 24
    model = make_mlp([d, 64, 10, 7, 5], act, seed=11)
    x = make_x(60, d, default_constants(d), seed=11)
    y = make_y(60, 5, seed=11)
    D = flat(model).numel()
    W1 = first_layer(model)
    w0 = index_of(model, W1.weight)
    nW1 = W1.weight.numel()
    V = rand_V(D, 12, seed=11)
    V[1, w0 : w0 + nW1] = 0.0  # no first-layer weight
    V[2, : w0 + nW1] = 0.0
    V[4, w0 + nW1 :] = 0.0  # only first-layer weights
    V[7] = 0.0
    expected = hvp_oracle(model, x, y, V)
    g = torch.Generator().manual_seed(12)
    masks = (torch.rand(12, D, generator=g, dtype=DT) < 0.5).to(DT)
    masks[0] = 0.0
    masks[0, w0 : w0 + nW1] = 1.0  # outputs only in the first-layer weights
    masks[5] = 1.0
    masks[5, w0 : w0 + nW1] = 0.0  # outputs everywhere but the first-layer weights
    for budget in (2_000, 20_000, 1 << 30):
        op = utils.hessian_operator(model, x, y, path="fast", memory_budget=budget)
        assert_rows_close(op.matmat(V), expected, f"{act} budget {budget}")
        assert_rows_close(op.matmat(V, masks), expected * masks, f"{act} masked budget {budget}")


@pytest.mark.parametrize("act", ["relu", "relu_tanh"])
def test_constant_column_rows_of_hessian_are_multiples_of_bias_rows(act):
    """For a constant input column j (x_nj = c_j for all n), W1[i, j] and b1[i] enter the loss only through
    c_j W1[i, j] + b1[i], so dL/dW1_ij = c_j dL/db1_i as functions of theta and H[W1_ij, :] = c_j H[b1_i, :]:
    for every v, (H v)[W1_ij] = c_j (H v)[b1_i] (zero for c_j = 0), and likewise for the gradient. Checked on the
    library's fast operator (and against autograd), with the wide first layer and 10 directions."""
    d = 20
    const = default_constants(d)
    model = make_mlp([d, 48, 9, 4], act, seed=21)
    x = make_x(33, d, const, seed=21)
    y = make_y(33, 4, seed=21)
    D = flat(model).numel()
    W1 = first_layer(model)
    w0, b0 = index_of(model, W1.weight), index_of(model, W1.bias)
    V = rand_V(D, 10, seed=21)
    op = utils.hessian_operator(model, x, y, path="fast")
    HV = op.matmat(V)
    grad = op.gradient()
    assert_rows_close(HV, hvp_oracle(model, x, y, V), f"{act} oracle")
    H_of = lambda M, i, j: M[..., w0 + i * d + j]  # noqa: E731  W1 row-major
    scale = float(HV.abs().max())
    gscale = float(grad.abs().max())
    for j, c in const.items():
        for i in range(W1.out_features):
            lhs, rhs = H_of(HV, i, j), c * HV[:, b0 + i]
            assert float((lhs - rhs).abs().max()) <= REL * scale, (j, i)
            assert abs(float(H_of(grad, i, j) - c * grad[b0 + i])) <= REL * gscale, (j, i)
            if c == 0.0:
                assert float(lhs.abs().max()) <= 1e-14 * scale


@pytest.mark.parametrize("act", ["relu", "tanh_relu"])
def test_hessian_operator_single_example_every_column_constant(act):
    """N = 1: every input column is constant (the non-constant part of X is empty). H v still equals autograd's
    double backward (fast and auto paths), and so does the gradient."""
    d = 12
    model = make_mlp([d, 16, 8, 3], act, seed=31)
    x = make_x(1, d, {}, seed=31)
    x[0, 3] = 0.0
    y = make_y(1, 3, seed=31)
    D = flat(model).numel()
    V = rand_V(D, 9, seed=31)
    expected = hvp_oracle(model, x, y, V)
    for path in ("fast", "auto"):
        for budget in (2_000, 1 << 30):
            op = utils.hessian_operator(model, x, y, path=path, memory_budget=budget)
            assert_rows_close(op.matmat(V), expected, f"{path} {budget}")
            g = grad_oracle(model, x, y)
            assert float((op.gradient() - g).abs().max()) <= REL * float(g.abs().max())


@pytest.mark.parametrize("kind", ["all_rows_equal", "one_varying_column", "no_constant_column"])
def test_hessian_operator_extreme_constant_patterns(kind):
    """Many rows, but (a) every column constant (all rows the same vector), (b) all columns but one constant, (c) no
    constant column: H v == autograd double backward on the fast path with a wide first layer and 10 directions."""
    d = 16
    g = torch.Generator().manual_seed(41)
    if kind == "all_rows_equal":
        x = torch.randn(1, d, generator=g, dtype=DT).repeat(25, 1)
    elif kind == "one_varying_column":
        x = torch.randn(1, d, generator=g, dtype=DT).repeat(25, 1)
        x[:, 7] = torch.randn(25, generator=g, dtype=DT)
    else:
        x = torch.randn(25, d, generator=g, dtype=DT)
    y = make_y(25, 4, seed=41)
    model = make_mlp([d, 64, 8, 4], "relu", seed=41)
    V = rand_V(flat(model).numel(), 10, seed=41)
    op = utils.hessian_operator(model, x, y, path="fast", memory_budget=20_000)
    assert_rows_close(op.matmat(V), hvp_oracle(model, x, y, V), kind)


def test_hessian_operator_flatten_image_input_with_blank_border():
    """x shaped (N, 1, 4, 4) with a leading nn.Flatten: the 12 border pixels are always 0 (MNIST-like) and one
    interior pixel is always 1.5; H v == autograd double backward (fast and auto), gradient too."""
    g = torch.Generator().manual_seed(51)
    x = torch.zeros(30, 1, 4, 4, dtype=DT)
    x[:, 0, 1:3, 1:3] = torch.randn(30, 2, 2, generator=g, dtype=DT)
    x[:, 0, 2, 2] = 1.5
    y = make_y(30, 3, seed=51)
    model = make_mlp([16, 40, 7, 3], "relu", seed=51, flatten=True)
    V = rand_V(flat(model).numel(), 10, seed=51)
    expected = hvp_oracle(model, x, y, V)
    for path in ("fast", "auto"):
        op = utils.hessian_operator(model, x, y, path=path)
        assert_rows_close(op.matmat(V), expected, path)
        gr = grad_oracle(model, x, y)
        assert float((op.gradient() - gr).abs().max()) <= REL * float(gr.abs().max())


# ======================================================================================
# hessian_diagonal on constant-column inputs
# ======================================================================================


@pytest.mark.parametrize("budget", [2_000, 1 << 30])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", sorted(PIECEWISE))
def test_hessian_diagonal_constant_columns(act, bias, budget):
    """For piecewise-linear MLPs (ReLU, LeakyReLU(0.1), mixed; 3-4 Linear layers) on inputs with constant columns,
    hessian_diagonal == diag of the dense autograd Hessian (1e-10 relative to max |H_ii|); for a constant column j,
    diag[W1_ij] = c_j^2 diag[b1_i] (bias case) and diag[W1_ij] = 0 exactly-ish for c_j = 0."""
    d = 10
    const = default_constants(d)
    widths = [d, 12, 7, 3] if act != "relu_leaky" else [d, 9, 6, 5, 3]
    model = make_mlp(widths, act, bias=bias, seed=61 + bias)
    x = make_x(17, d, const, seed=61)
    y = make_y(17, 3, seed=61)
    H = dense_hessian(model, x, y)
    diag = torch.diagonal(H)
    got = utils.hessian_diagonal(model, x, y, memory_budget=budget)
    scale = float(diag.abs().max())
    assert got.shape == diag.shape and got.dtype == DT
    assert float((got - diag).abs().max()) <= REL * scale
    W1 = first_layer(model)
    w0 = index_of(model, W1.weight)
    for j, c in const.items():
        for i in range(W1.out_features):
            v = float(got[w0 + i * d + j])
            if c == 0.0:
                assert abs(v) <= 1e-14 * scale
            elif bias:
                assert abs(v - c * c * float(got[index_of(model, W1.bias) + i])) <= REL * scale


def test_hessian_diagonal_wide_first_layer_flatten_input():
    """Flatten + ReLU MLP with a 64-unit first layer on (N, 1, 5, 5) images whose border is blank: hessian_diagonal
    equals diag(H) from torch.func.hessian (1e-10 relative)."""
    g = torch.Generator().manual_seed(71)
    x = torch.zeros(20, 1, 5, 5, dtype=DT)
    x[:, 0, 1:4, 1:4] = torch.randn(20, 3, 3, generator=g, dtype=DT)
    x[:, 0, 1, 3] = -0.7
    y = make_y(20, 3, seed=71)
    model = make_mlp([25, 64, 6, 3], "relu", seed=71, flatten=True)
    diag = torch.diagonal(dense_hessian(model, x, y))
    got = utils.hessian_diagonal(model, x, y)
    assert float((got - diag).abs().max()) <= REL * float(diag.abs().max())


# ======================================================================================
# top_hessian_eigenvalue
# ======================================================================================


@pytest.mark.parametrize(
    "widths,act,n,flatten",
    [
        ([10, 12, 8, 3], "relu", 19, False),
        ([10, 12, 8, 3], "relu_tanh", 19, False),
        ([10, 9, 7, 6, 3], "tanh_relu", 19, False),
        ([10, 12, 8, 3], "relu", 1, False),
        ([16, 10, 6, 3], "relu", 14, True),
    ],
)
def test_top_hessian_eigenvalue_equals_dense_eigvalsh(widths, act, n, flatten):
    """lambda_max(H) from top_hessian_eigenvalue (Lanczos, tol 1e-11) equals max torch.linalg.eigvalsh of the dense
    autograd Hessian (relative 1e-9, the residual bound), and the returned unit eigenvector satisfies
    |H v - lambda v| <= 1e-8 |lambda| with the dense H; inputs have constant columns (n = 1: all constant; images with
    a blank border behind Flatten)."""
    d = widths[0]
    if flatten:
        g = torch.Generator().manual_seed(81)
        x = torch.zeros(n, 1, 4, 4, dtype=DT)
        x[:, 0, 1:3, :3] = torch.randn(n, 2, 3, generator=g, dtype=DT)
    else:
        x = make_x(n, d, default_constants(d), seed=81)
    y = make_y(n, widths[-1], seed=81)
    model = make_mlp(widths, act, seed=81 + n, flatten=flatten)
    H = dense_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(H)
    lam = float(evals[-1])
    D = H.shape[0]
    r = utils.top_hessian_eigenvalue(model, x, y, tol=1e-11, max_iter=D)
    assert abs(r.eigenvalue - lam) <= 1e-9 * abs(lam), (r.eigenvalue, lam, r.converged)
    v = r.eigenvector.to(DT)
    v = v / v.norm()
    assert float((H @ v - r.eigenvalue * v).norm()) <= 1e-8 * abs(lam)


# ======================================================================================
# losses_at_points: fast path vs direct functional_call loop
# ======================================================================================


def flatness_layout(K, sigmas):
    """One row per (direction k, sigma) with the single nonzero entry sigma in column k, then an all-zero row."""
    rows = []
    for k in range(K):
        for s in sigmas:
            r = torch.zeros(K, dtype=DT)
            r[k] = s
            rows.append(r)
    rows.append(torch.zeros(K, dtype=DT))
    return torch.stack(rows)


def grid_layout(K, i, j, ticks):
    """A 2-D grid over directions i and j (other columns zero), ticks include 0 so the axes are in it."""
    rows = []
    for a in ticks:
        for b in ticks:
            r = torch.zeros(K, dtype=DT)
            r[i], r[j] = a, b
            rows.append(r)
    return torch.stack(rows)


def strided_layout(K):
    """Rows that use direction sets with various spacings: evenly spaced (stride 2, 3, K-1), contiguous, uneven,
    single, reversed-order rows, all directions, none."""
    sets = [range(0, K, 2), range(1, K, 3), [0, K - 1], [3, 4], [0, 1, 5], [K - 2], list(range(K)), [],
            range(K - 1, -1, -3), [2, 3, 4, 5], [1], [0, 2, 4, 5]]
    g = torch.Generator().manual_seed(91)
    rows = []
    for s in sets:
        r = torch.zeros(K, dtype=DT)
        for k in s:
            r[k] = float(torch.randn(1, generator=g, dtype=DT))
        rows.append(r)
    return torch.stack(rows)


LAYOUTS = ["flatness", "identity", "grid", "strided", "dense"]


def coefficients(kind, K):
    if kind == "flatness":
        return flatness_layout(K, [0.05, 0.3, 1.0])
    if kind == "identity":
        return torch.eye(K, dtype=DT)
    if kind == "grid":
        return torch.cat([grid_layout(K, 0, 1, [-1.0, -0.25, 0.0, 0.5, 1.0]), grid_layout(K, K - 1, 3, [-0.5, 0.0, 0.75])])
    if kind == "strided":
        return strided_layout(K)
    return torch.randn(7, K, generator=torch.Generator().manual_seed(92), dtype=DT)


@pytest.mark.parametrize("budget", [2_000, 20_000, 1 << 30])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["relu", "relu_tanh"])
def test_losses_at_points_wide_first_layer_many_directions(act, layout, budget):
    """With a 64-unit first layer, 24 inputs of which 9 are constant, 4 Linear layers and K = 10 directions (with
    bias components), losses_at_points(path="fast") at theta_p = base + sum_k C[p, k] d_k equals a direct
    functional_call loop (1e-10 relative; accuracies equal wherever the top-2 logit margin exceeds 1e-9) for sparse
    coefficient layouts (flatness rows + a zero row, identity, 2-D grids with zero axes, rows using evenly / unevenly
    spaced direction sets, dense), for base = theta and base = 0, and for budgets that force several batches."""
    d, K = 24, 10
    model = make_mlp([d, 64, 12, 8, 5], act, seed=101)
    x = make_x(40, d, default_constants(d), seed=101)
    y = make_y(40, 5, seed=101)
    dirs = make_dirs(model, K, seed=101)
    C = coefficients(layout, K)
    for base in (flat(model), torch.zeros_like(flat(model))):
        res = utils.losses_at_points(model, x, y, base, dirs, C, path="fast", memory_budget=budget)
        assert_points_match(res, model, x, y, base, dirs, C, f"{layout} {budget}")


def test_losses_at_points_zero_point_and_ties():
    """At theta = 0 (base 0, an all-zero coefficient row) every logit is 0, so the loss is exactly log C; argmax of a
    tie picks class 0, so the accuracy is the share of label 0 (torch.argmax's convention, as a direct evaluation
    gives). Checked on the fast path with constant-column inputs, a wide first layer and 9 directions."""
    d, K = 18, 9
    model = make_mlp([d, 64, 10, 6, 4], "relu", seed=111)
    x = make_x(30, d, default_constants(d), seed=111)
    y = make_y(30, 4, seed=111)
    dirs = make_dirs(model, K, seed=111)
    C = torch.cat([flatness_layout(K, [0.5]), torch.zeros(2, K, dtype=DT)])
    base = torch.zeros_like(flat(model))
    for budget in (2_000, 1 << 30):
        res = utils.losses_at_points(model, x, y, base, dirs, C, path="fast", memory_budget=budget)
        assert_points_match(res, model, x, y, base, dirs, C, str(budget))
        for p in (K, K + 1, K + 2):
            assert abs(float(res.losses[p]) - math.log(4)) <= 1e-14
            assert float(res.accuracies[p]) == float((y == 0).double().mean())


def test_losses_at_points_relu_bias_deferral_many_inactive_units():
    """ReLU(o + b) = max(o, -b) + b: for a 4-Linear ReLU MLP with large biases (|b| ~ 2, so many units are off and
    many on), and directions that move the biases, the fast path's losses equal direct evaluation. Also bias-free
    directions (like random_directions') and a model without biases."""
    d, K = 12, 8
    x = make_x(35, d, default_constants(d), seed=121)
    y = make_y(35, 3, seed=121)
    for bias, b_scale, dir_bias in [(True, 2.0, True), (True, 2.0, False), (True, 0.1, True), (False, 0.0, False)]:
        model = make_mlp([d, 30, 20, 10, 3], "relu", bias=bias, seed=122, b_scale=b_scale)
        dirs = make_dirs(model, K, seed=122, scale=0.8, bias=dir_bias)
        C = torch.cat([coefficients("strided", K), coefficients("dense", K), flatness_layout(K, [0.2, 2.0])])
        for budget in (3_000, 1 << 30):
            res = utils.losses_at_points(model, x, y, flat(model), dirs, C, path="fast", memory_budget=budget)
            assert_points_match(res, model, x, y, flat(model), dirs, C, f"bias={bias} {b_scale} {dir_bias} {budget}")


def test_losses_at_points_noncontiguous_inputs():
    """theta_p depends only on the VALUES of base, directions and coefficients: non-contiguous views (every other row
    of a larger direction tensor, a (D, K) tensor transposed, a strided base, transposed coefficients) give the
    direct loop's losses (and equal the contiguous call's numbers to 1e-12)."""
    d, K = 20, 9
    model = make_mlp([d, 64, 10, 4], "relu", seed=131)
    x = make_x(25, d, default_constants(d), seed=131)
    y = make_y(25, 4, seed=131)
    D = flat(model).numel()
    big = make_dirs(model, 2 * K, seed=131)
    dirs_rows = big[::2]  # row stride 2 D
    dirs_T = big[1::2].T.contiguous().T  # column-major (D, K) seen as (K, D)
    base_strided = torch.stack([flat(model), torch.zeros(D, dtype=DT)], 1)[:, 0]  # stride 2
    C = strided_layout(K)
    C_T = C.T.contiguous().T
    assert not dirs_rows.is_contiguous() and not dirs_T.is_contiguous() and not base_strided.is_contiguous()
    assert not C_T.is_contiguous()
    for dirs in (dirs_rows, dirs_T):
        for budget in (2_000, 1 << 30):
            res = utils.losses_at_points(model, x, y, base_strided, dirs, C_T, path="fast", memory_budget=budget)
            assert_points_match(res, model, x, y, flat(model), dirs.contiguous(), C, f"noncontig {budget}")
            ref = utils.losses_at_points(model, x, y, flat(model), dirs.contiguous(), C.contiguous(), path="fast",
                                         memory_budget=budget)
            assert float((res.losses - ref.losses).abs().max()) <= 1e-12 * float(ref.losses.abs().max())


@pytest.mark.parametrize("n", [1, 2])
def test_losses_at_points_tiny_batches_all_columns_constant(n):
    """N = 1 (every column constant) and N = 2 with identical rows: fast-path losses equal direct evaluation for a
    wide 4-Linear ReLU/Tanh MLP with 10 directions, base theta and base 0, several budgets."""
    d, K = 14, 10
    x = make_x(1, d, {3: 0.0, 4: 0.0}, seed=141).repeat(n, 1)
    y = make_y(n, 3, seed=141)
    for act in ("relu", "relu_tanh"):
        model = make_mlp([d, 64, 9, 7, 3], act, seed=142)
        dirs = make_dirs(model, K, seed=142)
        C = torch.cat([flatness_layout(K, [0.1, 1.0]), coefficients("strided", K)])
        for base in (flat(model), torch.zeros_like(flat(model))):
            for budget in (2_000, 20_000, 1 << 30):
                res = utils.losses_at_points(model, x, y, base, dirs, C, path="fast", memory_budget=budget)
                assert_points_match(res, model, x, y, base, dirs, C, f"{act} n={n} {budget}")


def test_losses_at_points_flatten_images_with_blank_border():
    """(N, 1, 6, 6) images whose 20 border pixels are 0 and one interior pixel always -0.7, behind nn.Flatten, in a
    4-Linear ReLU MLP with a 64-unit first layer: fast-path losses == direct evaluation for flatness and grid layouts."""
    g = torch.Generator().manual_seed(151)
    x = torch.zeros(30, 1, 6, 6, dtype=DT)
    x[:, 0, 1:5, 1:5] = torch.randn(30, 4, 4, generator=g, dtype=DT)
    x[:, 0, 3, 2] = -0.7
    y = make_y(30, 4, seed=151)
    model = make_mlp([36, 64, 10, 8, 4], "relu", seed=151, flatten=True)
    K = 8
    dirs = make_dirs(model, K, seed=151)
    for layout in ("flatness", "grid", "identity"):
        C = coefficients(layout, K)
        for budget in (2_000, 1 << 30):
            res = utils.losses_at_points(model, x, y, flat(model), dirs, C, path="fast", memory_budget=budget)
            assert_points_match(res, model, x, y, flat(model), dirs, C, f"{layout} {budget}")


@st.composite
def point_problems(draw):
    # sampled_from lists put the most demanding choice first: derandomized hypothesis favours early elements
    n_hidden = draw(st.sampled_from([2, 3]))  # 3 or 4 Linear layers
    first = draw(st.sampled_from([64, 40, 12, 5]))
    hidden = [first] + [draw(st.integers(5, 40)) for _ in range(n_hidden - 1)]
    d = draw(st.sampled_from([20, 13, 6, 1]))
    classes = draw(st.integers(2, 5))
    bias = draw(st.booleans())
    n = draw(st.sampled_from([30, 17, 2, 1]))
    mask = draw(st.lists(st.sampled_from([True, False]), min_size=d, max_size=d))
    values = draw(st.lists(st.sampled_from([0.0, 1.5, -0.7, 3.0]), min_size=d, max_size=d))
    const = {j: values[j] for j in range(d) if mask[j]}
    K = draw(st.sampled_from([10, 12, 8, 3, 1]))
    P = draw(st.integers(1, 14))
    entries = draw(st.lists(st.one_of(st.just(0.0), st.floats(-2, 2, allow_nan=False, allow_infinity=False)),
                            min_size=P * K, max_size=P * K))
    zero_row = draw(st.booleans())
    zero_base = draw(st.booleans())
    dir_bias = draw(st.booleans())
    budget = draw(st.sampled_from([2_000, 20_000, 200_000, 1 << 30]))
    seed = draw(st.integers(0, 10_000))
    return dict(widths=[d, *hidden, classes], bias=bias, n=n, const=const, K=K, P=P, entries=entries,
                zero_row=zero_row, zero_base=zero_base, dir_bias=dir_bias, budget=budget, seed=seed)


@pytest.mark.parametrize("act", ["relu", "relu_tanh", "tanh_relu", "tanh"])
@settings(max_examples=30)
@given(prob=point_problems())
def test_losses_at_points_fast_equals_direct_property(act, prob):
    """For random 3-4 Linear MLPs (first hidden width 64 / 40 / 12 / 5, others 5..40; ReLU / ReLU-Tanh / Tanh-ReLU /
    Tanh; with or without biases), d in {20, 13, 6, 1} inputs with random constant-column masks (values 0, 1.5, -0.7,
    3), N in {30, 17, 2, 1}, K in {12, 10, 8, 3, 1} directions, P = 1..14 coefficient rows with many exact zeros (and
    optionally an all-zero row), base theta or 0, and budgets 2 kB..1 GiB, losses_at_points(path="fast") equals the
    direct functional_call loop: losses to 1e-10 relative, accuracies exactly wherever no argmax is within 1e-9 of a
    tie."""
    p = prob
    model = make_mlp(p["widths"], act, bias=p["bias"], seed=p["seed"])
    d = p["widths"][0]
    x = make_x(p["n"], d, p["const"], seed=p["seed"])
    y = make_y(p["n"], p["widths"][-1], seed=p["seed"])
    dirs = make_dirs(model, p["K"], seed=p["seed"], bias=p["dir_bias"])
    C = torch.tensor(p["entries"], dtype=DT).reshape(p["P"], p["K"])
    if p["zero_row"]:
        C = torch.cat([C, torch.zeros(1, p["K"], dtype=DT)])
    base = torch.zeros_like(flat(model)) if p["zero_base"] else flat(model)
    res = utils.losses_at_points(model, x, y, base, dirs, C, path="fast", memory_budget=p["budget"])
    assert_points_match(res, model, x, y, base, dirs, C, f"{act} " + str({k: v for k, v in p.items() if k != "entries"}))


# ======================================================================================
# perturbation_flatness
# ======================================================================================


@pytest.mark.parametrize("budget", [2_000, 1 << 30])
@pytest.mark.parametrize("act", ["relu", "relu_tanh"])
def test_perturbation_flatness_equals_direct_loss_increases(act, budget):
    """increases[k, j] == L(theta + sigma_j d_k) - L(theta) and base_loss == L(theta), each L by a direct
    functional_call, where d_k are utils.random_directions(model, Generator().manual_seed(seed), samples) (filter-
    normalised, zero bias blocks); 10 samples, a 64-unit first layer, 4 Linear layers, constant-column inputs.
    Tolerance 1e-10 relative to L(theta) (an increase is a difference of two losses)."""
    d = 22
    model = make_mlp([d, 64, 12, 8, 4], act, seed=161)
    x = make_x(45, d, default_constants(d), seed=161)
    y = make_y(45, 4, seed=161)
    sigmas = [0.0, 0.01, 0.1, 0.5, 1.0]
    S, seed = 10, 7
    res = utils.perturbation_flatness(model, x, y, sigmas, samples=S, seed=seed, memory_budget=budget)
    dirs = utils.random_directions(model, torch.Generator().manual_seed(seed), S).to(DT)
    assert dirs.shape == (S, flat(model).numel())
    theta = flat(model)
    L0 = float(F.cross_entropy(forward_at(model, theta, x), y))
    assert abs(float(res.base_loss) - L0) <= REL * L0
    inc = torch.as_tensor(res.increases, dtype=DT)
    assert inc.shape == (S, len(sigmas))
    for k in range(S):
        for j, s in enumerate(sigmas):
            Lk = float(F.cross_entropy(forward_at(model, theta + s * dirs[k], x), y))
            assert abs(float(inc[k, j]) - (Lk - L0)) <= REL * max(L0, Lk), (k, j)
    assert float(inc[:, 0].abs().max()) <= 1e-12 * L0
    assert float(inc[:, -1].abs().max()) > 1e-3  # the directions really move the loss
