"""Hessian-vector products against closed forms, the materialised Hessian and finite differences (reference
and MLP R-operator, any loss); the dense Hessian; the exact diagonal; the float32 products' rounding."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ACTIVATIONS,
    DT,
    PIECEWISE,
    REL,
    ACTIVATIONS_meas,
    TinyCNN,
    Wrapped,
    assert_unchanged,
    assert_unchanged_diag,
    cnn_data,
    default_constants,
    dense_hessian,
    dense_hessian_diag,
    dense_hessian_inputs,
    flat,
    grad_at,
    logreg_closed_form,
    logreg_closed_form_spectrum,
    logreg_np,
    loss_theta,
    make_data,
    make_logreg,
    make_mlp,
    make_mlp_inputs,
    make_x,
    make_y,
    mlp_of,
    quadratic_model,
    rand_vec,
    saddle_loss_fn,
    snapshot,
    snapshot_diag,
    softmax_np,
    sym_with_spectrum,
    sym_with_spectrum_spectrum,
    tiny_data,
    tiny_mlp,
    unflatten,
    with_constant_columns,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import utils
from models import SmallCNN


def fd_hvp(model, theta, x, y, v, h, loss_fn=None) -> torch.Tensor:
    """Central difference of the gradient: (g(t+hv) - g(t-hv)) / 2h = Hv + (h^2/6) D^3g[v,v] + O(eps/h)."""
    return (grad_at(model, theta + h * v, x, y, loss_fn) - grad_at(model, theta - h * v, x, y, loss_fn)) / (2 * h)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def gauss_newton(model, x, y) -> torch.Tensor:
    """G = (1/N) sum_n J_n^T (diag p_n - p_n p_n^T) J_n for cross-entropy, J_n = d logits_n / d theta by autograd."""
    theta = flat(model)
    N = x.shape[0]
    G = torch.zeros(theta.numel(), theta.numel(), dtype=DT)
    for n in range(N):
        J = torch.autograd.functional.jacobian(
            lambda th: functional_call(model, unflatten(model, th), (x[n : n + 1],))[0], theta
        )
        with torch.no_grad():
            p = torch.softmax(functional_call(model, unflatten(model, theta), (x[n : n + 1],))[0], 0)
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return G / N


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to(DT), b.detach().to(DT)
    scale = float(b.abs().max())
    assert scale > 0, "degenerate expected value"
    return float((a - b).abs().max()) / scale


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


HESS_CASES = [
    # (widths, act, bias)
    ([14, 9, 7, 4], "relu", True),
    ([14, 9, 7, 4], "relu", False),
    ([14, 8, 6, 5, 3], "relu", True),
    ([14, 9, 7, 4], "tanh", True),
    ([14, 8, 7, 6, 3], "relu_tanh", True),
    ([14, 8, 7, 6, 3], "tanh_relu", False),
]


def dense_hessian_smoke(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = utils.flat_parameters(model)

    def loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta)


def dense_hessian_outputs(model, x, y, loss):
    theta = flat(model)
    return torch.autograd.functional.hessian(lambda t: loss(functional_call(model, unflatten(model, t), (x,)), y),
                                             theta)


LOSSES = {
    "cross-entropy": (lambda out, y: F.cross_entropy(out, y), lambda y: y),
    "mse on one-hot": (lambda out, t: F.mse_loss(out, t), lambda y: F.one_hot(y, 3).double()),
}


def test_hvp_equals_closed_form_logistic_regression_hessian():
    """Logistic regression: H = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i (numpy, no autograd); every column H e_k and H v match."""
    lin, x, y = make_logreg(0)
    _, _, H = logreg_closed_form(*logreg_np(lin, x, y))
    D = H.shape[0]
    cols = torch.stack([utils.hessian_vector_product(lin, x, y, torch.eye(D, dtype=DT)[k]) for k in range(D)], 1)
    assert cols.dtype == DT
    torch.testing.assert_close(cols, torch.tensor(H), rtol=1e-10, atol=1e-12)
    v = rand_vec(D, 3)
    torch.testing.assert_close(
        utils.hessian_vector_product(lin, x, y, v), torch.tensor(H) @ v, rtol=1e-10, atol=1e-12
    )


def test_hvp_with_loss_fn_equals_known_quadratic_hessian():
    """For L(theta) = 1/2 theta^T Q theta (built through loss_fn), H v = Q v exactly for any v."""
    Q = sym_with_spectrum([3.0, 1.0, -0.5, -4.0, 0.25], seed=1)
    m, x, y, lf = quadratic_model(Q)
    for s in range(3):
        v = rand_vec(5, s)
        torch.testing.assert_close(
            utils.hessian_vector_product(m, x, y, v, loss_fn=lf), torch.tensor(Q) @ v, rtol=1e-12, atol=1e-12
        )


def test_hvp_matches_central_difference_of_gradient_tanh_mlp(backend):
    """H v = (g(t+hv) - g(t-hv))/2h + O(h^2): with h=1e-4, |v|=1 the truncation is ~h^2/6*|D^3 g| ~ 1e-8 and roundoff ~1e-12."""
    m = tiny_mlp(0)
    model = backend.model(m)
    x, y = tiny_data(0)
    theta = flat(model)
    for s in range(3):
        v = unit(rand_vec(theta.numel(), 10 + s))
        got = utils.hessian_vector_product(model, x, y, v)
        torch.testing.assert_close(got, fd_hvp(model, theta, x, y, v, 1e-4), rtol=1e-6, atol=1e-6)


def test_hvp_matches_central_difference_of_gradient_tiny_tanh_cnn():
    """Same finite-difference identity on a smooth two-conv CNN (general path; 4-D conv weights)."""
    model = TinyCNN(0)
    x, y = cnn_data(0)
    theta = flat(model)
    for s in range(2):
        v = unit(rand_vec(theta.numel(), 20 + s))
        got = utils.hessian_vector_product(model, x, y, v)
        torch.testing.assert_close(got, fd_hvp(model, theta, x, y, v, 1e-4), rtol=1e-6, atol=1e-6)


def test_hvp_matches_central_difference_small_cnn_relu_maxpool():
    """SmallCNN (ReLU, max-pool; piecewise smooth): with h=1e-6 no kink is crossed, so the central difference is exact to ~1e-9."""
    model = SmallCNN(channels=(2, 3), generator=torch.Generator().manual_seed(0)).to(DT)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 1, 28, 28, generator=g, dtype=DT)
    y = torch.tensor([1, 4, 7])
    theta = flat(model)
    v = unit(rand_vec(theta.numel(), 30))
    got = utils.hessian_vector_product(model, x, y, v)
    torch.testing.assert_close(got, fd_hvp(model, theta, x, y, v, 1e-6), rtol=1e-5, atol=1e-7)


@given(seed_u=st.integers(0, 2**31 - 1), seed_v=st.integers(0, 2**31 - 1))
def test_hvp_bilinear_form_is_symmetric(seed_u, seed_v):
    """The Hessian is symmetric: u^T (H v) = v^T (H u)."""
    model, (x, y) = tiny_mlp(2), tiny_data(2)
    D = flat(model).numel()
    u, v = rand_vec(D, seed_u), rand_vec(D, seed_v)
    a = torch.dot(u, utils.hessian_vector_product(model, x, y, v))
    b = torch.dot(v, utils.hessian_vector_product(model, x, y, u))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@given(
    seed_u=st.integers(0, 2**31 - 1),
    seed_v=st.integers(0, 2**31 - 1),
    a=st.floats(-3, 3, allow_nan=False),
    b=st.floats(-3, 3, allow_nan=False),
)
def test_hvp_is_linear_in_v(seed_u, seed_v, a, b):
    """H(a u + b v) = a Hu + b Hv."""
    model, (x, y) = tiny_mlp(3), tiny_data(3)
    D = flat(model).numel()
    u, v = rand_vec(D, seed_u), rand_vec(D, seed_v)
    hvp = lambda w: utils.hessian_vector_product(model, x, y, w)  # noqa: E731
    torch.testing.assert_close(hvp(a * u + b * v), a * hvp(u) + b * hvp(v), rtol=1e-9, atol=1e-9)


def test_exact_hessian_equals_closed_form_logistic_regression_hessian():
    """Softmax regression: exact_hessian == (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i (numpy, no autograd), also with
    the saddle term -(c/2) mean z_0^2 added through loss_fn (which subtracts c * mean [x,1][x,1]^T on the class-0 block)."""
    lin, x, y = make_logreg(0)
    snap = snapshot(lin)
    for c in (0.0, 1.5):
        _, H = logreg_closed_form_spectrum(lin, x, y, saddle=c)
        got = utils.exact_hessian(lin, x, y, loss_fn=saddle_loss_fn(c) if c else None)
        assert got.dtype == DT and got.shape == H.shape
        torch.testing.assert_close(got, torch.tensor(H), rtol=1e-10, atol=1e-12)
    assert_unchanged(lin, snap)


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9))
def test_exact_hessian_is_symmetric_and_equals_autograd_hessian(seed, n, backend):
    """For any tiny Tanh MLP and data: exact_hessian is symmetric and equals torch.autograd.functional.hessian of the
    flat-parameter mean loss (to 1e-10)."""
    m = tiny_mlp(seed % 50)
    model = backend.model(m)
    x, y = tiny_data(seed, n=n)
    H = utils.exact_hessian(model, x, y)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(H, torch.tensor(dense_hessian(model, x, y)), rtol=1e-10, atol=1e-10)


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6))
def test_hessian_operator_matmat_rows_equal_single_products_and_dense_H(seed, b, backend):
    """op.matmat(V)[i] == op(V[i]) == H V[i] for every row; op.dim == D; op.matvecs grows by 1 per op(v) and by b per
    matmat of b rows."""
    m = tiny_mlp(seed % 7)
    model = backend.model(m)
    x, y = tiny_data(seed % 7, n=8)
    H = torch.tensor(dense_hessian(model, x, y))
    D = H.shape[0]
    op = utils.hessian_operator(model, x, y)
    assert op.dim == D
    V = torch.randn(b, D, generator=torch.Generator().manual_seed(seed), dtype=DT)
    c0 = op.matvecs
    rows = op.matmat(V)
    assert op.matvecs - c0 == b
    singles = torch.stack([op(V[i]) for i in range(b)])
    assert op.matvecs - c0 == 2 * b
    assert rows.shape == (b, D) and rows.dtype == DT
    torch.testing.assert_close(rows, singles, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rows, V @ H, rtol=1e-9, atol=1e-10)


def test_general_products_are_zero_for_a_parameter_the_loss_does_not_use_and_dense_h_elsewhere():
    """Rows of several products written in place: the unused head's columns stay zero, the rest are H·v."""
    model = Wrapped(tiny_mlp(3))
    model.unused = nn.Linear(2, 2).to(DT)
    x, y = tiny_data(3, n=8)
    used = sum(p.numel() for p in model.inner.parameters())
    H = torch.tensor(dense_hessian(model.inner, x, y))
    V = torch.randn(3, used + 6, generator=torch.Generator().manual_seed(4), dtype=DT)
    rows = utils.hessian_operator(model, x, y, path="general").matmat(V)
    torch.testing.assert_close(rows[:, :used], V[:, :used] @ H, rtol=1e-9, atol=1e-10)
    assert torch.equal(rows[:, used:], torch.zeros(3, 6, dtype=DT))


def test_hessian_operator_with_loss_fn_is_known_quadratic_form():
    """L = 1/2 theta^T Q theta through loss_fn: op(v) = Q v exactly, for any v."""
    Q = sym_with_spectrum_spectrum([3.0, 1.0, -0.5, -4.0, 0.25, 2.0], seed=1)
    m, x, y, lf = quadratic_model(Q)
    op = utils.hessian_operator(m, x, y, loss_fn=lf)
    V = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(op.matmat(V), V @ torch.tensor(Q), rtol=1e-12, atol=1e-12)


@given(
    seed=st.integers(0, 10_000),
    hidden=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    d_in=st.integers(1, 6),
    classes=st.integers(2, 4),
    act=st.sampled_from(sorted(ACTIVATIONS)),
    bias=st.booleans(),
    n=st.integers(1, 15),
)
def test_hessian_diagonal_equals_diagonal_of_dense_hessian_property(seed, hidden, d_in, classes, act, bias, n):
    """For any plain MLP with piecewise-linear hidden activations (ReLU, LeakyReLU(0.1), Identity), with or without
    biases, hessian_diagonal(model, x, y) == diag(d^2 L / d theta^2) of the mean cross-entropy, computed by dense
    autograd (1e-10 relative to max |H_ii|), flat in parameters() order, float64, one entry per parameter."""
    widths = [d_in, *hidden, classes]
    model = make_mlp(widths, act, bias=bias, seed=seed)
    x, y = make_data(n, d_in, classes, seed)
    H = dense_hessian_diag(model, x, y)
    got = utils.hessian_diagonal(model, x, y)
    assert got.dtype == DT and got.shape == (sum(p.numel() for p in model.parameters()),)
    if not bool(torch.diagonal(H).any()):  # every path dead on every example (a bias-free ReLU unit, n = 1)
        assert not bool(got.any())
        return
    # a saturated softmax makes the diagonal tiny (1e-6 in one drawn case) by cancellation in p(1 − p): both
    # sides then carry rounding of ~1e-16 times the O(1) terms that cancelled, hence the absolute floor
    assert rel_err(got, torch.diagonal(H)) < REL or float((got - torch.diagonal(H)).abs().max()) < 1e-13


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_hessian_diagonal_does_not_depend_on_memory_budget(act):
    """The diagonal is a mean over examples, so processing rows in chunks (a tiny memory_budget of 2 kB, which cannot
    hold all 40 examples' intermediate tensors at once) gives the same vector as one pass, and both equal diag(H)."""
    model = make_mlp([5, 6, 6, 4], act, seed=3)
    x, y = make_data(40, 5, 4, seed=3)
    full = utils.hessian_diagonal(model, x, y)
    for budget in (2_000, 5_000, 1 << 20):
        chunked = utils.hessian_diagonal(model, x, y, memory_budget=budget)
        assert chunked.shape == full.shape and chunked.dtype == full.dtype
        assert rel_err(chunked, full) < 1e-12
    assert rel_err(full, torch.diagonal(dense_hessian_diag(model, x, y))) < REL


def test_hessian_diagonal_closed_form_multinomial_logistic_regression():
    """Softmax regression z = W x + b (nn.Sequential(Linear), no hidden layer): d^2 L / dW_ck^2 = (1/N) sum_n p_nc (1 - p_nc) x_nk^2
    and d^2 L / db_c^2 = (1/N) sum_n p_nc (1 - p_nc), computed in numpy; flat order W row-major then b."""
    lin, x, y = make_logreg(seed=4, n=17, d=5, C=4)
    W, b, X = lin.weight.detach().numpy(), lin.bias.detach().numpy(), x.numpy()
    P = softmax_np(X @ W.T + b)
    S = P * (1 - P)  # (N, C)
    dW = (S.T @ (X**2)) / X.shape[0]  # (C, d)
    db = S.mean(0)
    expected = torch.tensor(np.concatenate([dW.ravel(), db]))
    seq = nn.Sequential(lin)  # a plain MLP with no hidden layer (the API is specified for nn.Sequential)
    got = utils.hessian_diagonal(seq, x, y)
    assert rel_err(got, expected) < REL


def test_hessian_diagonal_custom_loss_and_elementwise_tail():
    """With a trailing element-wise module (Tanh after the last Linear: only HIDDEN activations need be piecewise
    linear, since the curvature of tanh is absorbed into the Hessian of loss∘tanh w.r.t. the last Linear's output) and a
    custom mean loss L = 1/2 mean_n |tanh(z_n) - onehot(y_n)|^2, hessian_diagonal == diag of the dense Hessian. Also
    the Sigmoid tail with the default cross-entropy, and a LeakyReLU MLP with the custom loss and no tail."""
    C = 3

    def sq_loss(o, t):
        return 0.5 * ((o - F.one_hot(t, C).to(o.dtype)) ** 2).sum(1).mean()

    x, y = make_data(11, 4, C, seed=5)
    cases = [
        (make_mlp([4, 5, 4, C], "relu", tail=nn.Tanh(), seed=5, scale=0.6), sq_loss),
        (make_mlp([4, 6, C], "relu", tail=nn.Sigmoid(), seed=6), None),
        (make_mlp([4, 5, 5, C], "leaky", seed=7), sq_loss),
    ]
    for model, lf in cases:
        H = dense_hessian_diag(model, x, y, loss_fn=lf)
        got = utils.hessian_diagonal(model, x, y, loss_fn=lf)
        assert rel_err(got, torch.diagonal(H)) < REL
    # the tail really changes the answer: drop it and the diagonal is different
    m_tail = cases[0][0]
    m_notail = nn.Sequential(*list(m_tail)[:-1])
    d_tail = utils.hessian_diagonal(m_tail, x, y, loss_fn=sq_loss)
    d_notail = torch.diagonal(dense_hessian_diag(m_notail, x, y, loss_fn=sq_loss))
    assert rel_err(d_tail, d_notail) > 1e-2


def test_hessian_diagonal_float32_model_returns_float32():
    """The result is in the model's dtype: for a float32 ReLU MLP and float32 data it is a float32 vector equal to the
    float64 dense diagonal (of the same float32 weights) to float32 accuracy."""
    model64 = make_mlp([4, 6, 5, 3], "relu", seed=8)
    x64, y = make_data(13, 4, 3, seed=8)
    model32, x32 = copy.deepcopy(model64).float(), x64.float()
    got = utils.hessian_diagonal(model32, x32, y)
    assert got.dtype == torch.float32
    expected = torch.diagonal(dense_hessian_diag(model32, x32, y))  # float64 copy of the float32 weights
    assert rel_err(got, expected) < 1e-4


@pytest.mark.parametrize("act", ["relu", "leaky"])
def test_diagonal_equals_gauss_newton_diagonal_but_hessian_is_not_gauss_newton(act):
    """For a ReLU / LeakyReLU MLP, H = G + R with R = (1/N) sum_n sum_k (dl_n/df_k) d^2 f_{n,k}/dtheta^2. Each f_k is
    affine in every single weight, so diag(R) = 0 and diag(H) == diag(G) (1e-10) -- but R is NOT zero: weights of
    successive layers multiply, so H and G differ off the diagonal by a clear margin (> 1% of max |H|). G is built from
    autograd Jacobians, independently of the dense Hessian; hessian_diagonal matches both diagonals."""
    model = make_mlp([3, 4, 4, 3], act, seed=9, scale=1.0)
    x, y = make_data(9, 3, 3, seed=9)
    H = dense_hessian_diag(model, x, y)
    G = gauss_newton(model, x, y)
    assert rel_err(torch.diagonal(G), torch.diagonal(H)) < REL
    off = ~torch.eye(H.shape[0], dtype=torch.bool)
    assert float((H - G)[off].abs().max()) > 1e-2 * float(H.abs().max())
    got = utils.hessian_diagonal(model, x, y)
    assert rel_err(got, torch.diagonal(H)) < REL
    assert rel_err(got, torch.diagonal(G)) < REL


def test_with_tanh_hidden_the_diagonals_differ_so_exact_diagonal_must_refuse():
    """Control: with a smooth hidden activation (Tanh), d^2 f/dtheta_i^2 != 0 for first-layer weights, so
    diag(H) != diag(G) -- a Gauss-Newton diagonal would be wrong -- and hessian_diagonal raises ValueError
    (as it does for Sigmoid hidden activations)."""
    model = make_mlp([3, 4, 3], "relu", seed=10, scale=1.0)
    model[1] = nn.Tanh()
    x, y = make_data(9, 3, 3, seed=10)
    H = dense_hessian_diag(model, x, y)
    G = gauss_newton(model, x, y)
    assert rel_err(torch.diagonal(G), torch.diagonal(H)) > 1e-3
    with pytest.raises(ValueError):
        utils.hessian_diagonal(model, x, y)
    model[1] = nn.Sigmoid()
    with pytest.raises(ValueError):
        utils.hessian_diagonal(model, x, y)


def test_hessian_diagonal_refuses_non_sequential_model():
    """A non-Sequential wrapper (conftest.Wrapped) around a ReLU MLP computes the same function, but its structure is
    not known to be a plain MLP: hessian_diagonal raises ValueError (and leaves the model unchanged)."""
    model = Wrapped(make_mlp([3, 4, 3], "relu", seed=11))
    x, y = make_data(6, 3, 3, seed=11)
    snap = snapshot_diag(model)
    with pytest.raises(ValueError):
        utils.hessian_diagonal(model, x, y)
    assert_unchanged_diag(model, snap)


@pytest.mark.parametrize("path", ["fast", "auto", "general"])
@pytest.mark.parametrize("widths,act,bias", HESS_CASES)
def test_hessian_operator_equals_double_backward_with_constant_columns(widths, act, bias, path):
    """op.matmat(V) rows == H v_i and op(v) == H v, with H the Hessian of the mean cross-entropy w.r.t. the flat
    parameters, computed by autograd double backward; inputs have constant columns (0, last, a run, isolated ones,
    values 0 / 1.5 / -0.7). V includes an all-zero row (H·0 = 0). op.gradient() == autograd gradient. Holds for 3-4
    Linear ReLU / Tanh / mixed MLPs, with and without biases, on all paths (1e-10 relative per row)."""
    d = widths[0]
    model = make_mlp_inputs(widths, act, bias=bias, seed=len(widths) + 3 * bias)
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
def test_hessian_operator_wide_first_layer_many_directions_and_budgets(act, backend):
    """With a wide first hidden layer (64 units), 24 inputs of which 9 are constant, and 12 product directions at
    once (so the first layer's GEMMs with X have many weight rows), op.matmat(V) == autograd H v_i for every
    memory_budget (2 kB and 20 kB force example chunks; 1 GiB one pass). Some rows of V have no first-layer weight
    entries, some only first-layer entries, one is zero; with an `outputs` mask the result is (H v_i) * mask_i."""
    d = 24
    model = make_mlp_inputs([d, 64, 10, 7, 5], act, seed=11)
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
        op = utils.hessian_operator(model, x, y, path=backend.path, memory_budget=budget)
        assert_rows_close(op.matmat(V), expected, f"{act} budget {budget}")
        assert_rows_close(op.matmat(V, masks), expected * masks, f"{act} masked budget {budget}")


@pytest.mark.parametrize("act", ["relu", "relu_tanh"])
def test_constant_column_rows_of_hessian_are_multiples_of_bias_rows(act, backend):
    """For a constant input column j (x_nj = c_j for all n), W1[i, j] and b1[i] enter the loss only through
    c_j W1[i, j] + b1[i], so dL/dW1_ij = c_j dL/db1_i as functions of theta and H[W1_ij, :] = c_j H[b1_i, :]:
    for every v, (H v)[W1_ij] = c_j (H v)[b1_i] (zero for c_j = 0), and likewise for the gradient. Checked on the
    library's fast operator (and against autograd), with the wide first layer and 10 directions."""
    d = 20
    const = default_constants(d)
    model = make_mlp_inputs([d, 48, 9, 4], act, seed=21)
    x = make_x(33, d, const, seed=21)
    y = make_y(33, 4, seed=21)
    D = flat(model).numel()
    W1 = first_layer(model)
    w0, b0 = index_of(model, W1.weight), index_of(model, W1.bias)
    V = rand_V(D, 10, seed=21)
    op = utils.hessian_operator(model, x, y, path=backend.path)
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
    model = make_mlp_inputs([d, 16, 8, 3], act, seed=31)
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
    model = make_mlp_inputs([d, 64, 8, 4], "relu", seed=41)
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
    model = make_mlp_inputs([16, 40, 7, 3], "relu", seed=51, flatten=True)
    V = rand_V(flat(model).numel(), 10, seed=51)
    expected = hvp_oracle(model, x, y, V)
    for path in ("general", "fast", "auto"):
        op = utils.hessian_operator(model, x, y, path=path)
        assert_rows_close(op.matmat(V), expected, path)
        gr = grad_oracle(model, x, y)
        assert float((op.gradient() - gr).abs().max()) <= REL * float(gr.abs().max())


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
    model = make_mlp_inputs(widths, act, bias=bias, seed=61 + bias)
    x = make_x(17, d, const, seed=61)
    y = make_y(17, 3, seed=61)
    H = dense_hessian_inputs(model, x, y)
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
    model = make_mlp_inputs([25, 64, 6, 3], "relu", seed=71, flatten=True)
    diag = torch.diagonal(dense_hessian_inputs(model, x, y))
    got = utils.hessian_diagonal(model, x, y)
    assert float((got - diag).abs().max()) <= REL * float(diag.abs().max())


@given(seed=st.integers(0, 10_000), blocks_in=st.lists(st.sets(st.integers(0, 3)), min_size=1, max_size=4),
       blocks_out=st.lists(st.sets(st.integers(0, 3)), min_size=1, max_size=4),
       activation=st.sampled_from([nn.Tanh, nn.ReLU]))
def test_restricted_products_equal_the_dense_hessian_times_v_masked(seed, blocks_in, blocks_out, activation):
    # matmat(V, outputs) = (H·vᵢ)⊙outputsᵢ on both paths, for directions and masks that each cover some of the
    # four parameter tensors: the fast path skips its input GEMMs where vᵢ or outputsᵢ has no first-layer weight
    # (and, for ReLU, takes φ' = [z > 0], φ'' = 0 in closed form)
    model = tiny_mlp(seed % 5, widths=(4, 5, 3), activation=activation)
    x, y = tiny_data(seed % 7)
    hessian = utils.exact_hessian(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    b = min(len(blocks_in), len(blocks_out))
    g = torch.Generator().manual_seed(seed)

    def masked(blocks):
        mask = torch.zeros(b, offsets[-1], dtype=torch.float64)
        for i, chosen in enumerate(blocks[:b]):
            for block in chosen:
                mask[i, offsets[block] : offsets[block + 1]] = 1.0
        return mask

    vs = torch.randn(b, offsets[-1], generator=g, dtype=torch.float64) * masked(blocks_in)
    outputs = masked(blocks_out)
    expected = (vs @ hessian) * outputs
    for path in ("fast", "general"):
        op = utils.hessian_operator(model, x, y, path=path)
        torch.testing.assert_close(op.matmat(vs, outputs), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.matmat(vs), vs @ hessian, rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 10_000), hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3),
       act=st.sampled_from(ACTIVATIONS_meas), bias=st.booleans(), tail=st.booleans(),
       constant=st.sets(st.integers(0, 3), max_size=4))
def test_closed_form_mlp_hvp_equals_autograd_double_backward(seed, hidden, act, bias, tail, constant):
    """Pearlmutter's R-operator, written out for MLPs, gives the same H·v as reverse-over-reverse autograd,
    for any element-wise activation (φ'' ≠ 0 included), with or without biases, chunked or not, for a loss
    taken after a trailing activation (MSE on a Tanh output), and for inputs with constant columns."""
    g = torch.Generator().manual_seed(seed)
    model = mlp_of([4, *hidden, 3], act, bias, tail=nn.Tanh() if tail else None)
    x, y = tiny_data(seed % 5, n=10)
    x = with_constant_columns(x, sorted(constant))
    loss_fn = None
    if tail:
        y = torch.randn(10, 3, generator=g, dtype=torch.float64)
        loss_fn = torch.nn.functional.mse_loss
    v = torch.randn(utils.flat_parameters(model).numel(), generator=g, dtype=torch.float64)
    general = utils.hessian_operator(model, x, y, loss_fn=loss_fn, path="general")(v)
    for budget in (1 << 30, 600):
        fast = utils.hessian_operator(model, x, y, loss_fn=loss_fn, path="fast", memory_budget=budget)
        torch.testing.assert_close(fast(v), general, rtol=1e-11, atol=1e-13)


def test_hvp_equals_dense_hessian_times_v():
    model = tiny_mlp(0)
    x, y = tiny_data(0)
    H = dense_hessian_smoke(model, x, y)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for m in (model, Wrapped(model)):
        torch.testing.assert_close(utils.hessian_vector_product(m, x, y, v), H @ v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_each_supported_loss_gives_exact_hessian_vector_products(loss_name, backend):
    """H·v equals the dense Hessian times v for every loss we support, on both paths (F.mse_loss with mean
    reduction included, whose forward-over-reverse HVP fails in torch.func: we use reverse-over-reverse)."""
    loss, targets = LOSSES[loss_name]
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = targets(torch.randint(0, 3, (10,), generator=g))
    v = torch.randn(flat(model).numel(), generator=g, dtype=torch.float64)
    H = dense_hessian_outputs(model, x, y, loss)
    op = utils.hessian_operator(model, x, y, loss_fn=loss, path=backend.path)
    torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    eig = utils.top_hessian_eigenvalue(model, x, y, loss_fn=loss, tol=1e-10, max_iter=200)
    assert eig.eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)


def test_product_rounding_is_the_float32_products_distance_from_the_dense_hessian():
    """product_rounding(u) = max ‖H·u − H64·u‖: at float64 it is float64 rounding (≤ 1e-12·λ_max), and at float32
    it is float32's, between 0.01 and 10 eps32·λ_max (the certificates' floor that exact mode allows for)."""
    model32 = tiny_mlp(3, widths=(4, 6, 3), activation=torch.nn.ReLU).float()
    x32, y = tiny_data(3, n=40, dtype=torch.float32)
    model, x = copy.deepcopy(model32).double(), x32.double()  # the same numbers: H64 is the float32 model's Hessian
    dense = utils.exact_hessian(model, x, y)
    values, vectors = torch.linalg.eigh(dense)
    scale = float(values.abs().max())
    top = vectors[:, -2:].T  # rows: the two top eigenvectors
    assert utils.product_rounding(model, x, y, top, top @ dense) <= 1e-12 * scale
    assert utils.product_rounding(model, x, y, top, top * values[-2:, None]) <= 1e-12 * scale
    rounding = utils.product_rounding(model32, x32, y, top, top @ dense)
    eps32 = torch.finfo(torch.float32).eps
    assert 0.01 * eps32 * scale < rounding < 10 * eps32 * scale

