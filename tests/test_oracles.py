"""Independent oracle tests for utils.py.

Every expected value here is derived from the mathematics alone, never from the
implementation under test (utils.py was deliberately not read while writing this file):

* closed forms that use no autograd (multinomial logistic regression: per-example gradient
  and Hessian in numpy; exactly quadratic losses whose Hessian is known by construction;
  a scalar two-layer linear network whose interpolation path is a polynomial in alpha);
* numpy linear algebra (np.linalg.eigvalsh, np.cov);
* explicit per-example loops and direct re-evaluation of the loss at a parameter vector;
* central finite differences of the autograd *gradient* (first derivatives only), with the
  error bound written at the call.

Flat parameter order (from the API): concatenation of p.reshape(-1) over
model.parameters(); for nn.Linear that is weight (C x d, row-major) then bias (C).
Everything runs in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import utils
from conftest import _loss, acc_at, flat, grad_at, logreg_jacobian, loss_at, make_logreg, quadratic_model, scalar_chain, softmax_np, tiny_data, tiny_mlp, unflatten, Wrapped
from models import SmallCNN, SmallMLP

DT = torch.float64


# --------------------------------------------------------------------------------------
# Independent helpers (no use of utils)
# --------------------------------------------------------------------------------------


def fd_hvp(model, theta, x, y, v, h, loss_fn=None) -> torch.Tensor:
    """Central difference of the gradient: (g(t+hv) - g(t-hv)) / 2h = Hv + (h^2/6) D^3g[v,v] + O(eps/h)."""
    return (grad_at(model, theta + h * v, x, y, loss_fn) - grad_at(model, theta - h * v, x, y, loss_fn)) / (2 * h)


def full_hessian(model, x, y, loss_fn=None) -> np.ndarray:
    """Dense Hessian by plain torch.autograd.functional.hessian (independent of utils' HVP code)."""
    theta = flat(model)
    H = torch.autograd.functional.hessian(
        lambda th: _loss(functional_call(model, unflatten(model, th), (x,)), y, loss_fn), theta
    )
    return H.detach().numpy()


def param_rows(model):
    """(offset, shape) of every parameter tensor in flat order."""
    out, i = [], 0
    for p in model.parameters():
        out.append((i, tuple(p.shape)))
        i += p.numel()
    return out


def my_filter_normalize(d: torch.Tensor, model) -> torch.Tensor:
    """Li et al. 2018: rows (slices along dim 0) of dim>=2 tensors rescaled to theta's row norm; 1-D -> 0."""
    theta = flat(model)
    out = torch.zeros_like(d)
    for off, shape in param_rows(model):
        n = math.prod(shape)
        if len(shape) >= 2:
            dr = d[off : off + n].reshape(shape[0], -1)
            tr = theta[off : off + n].reshape(shape[0], -1)
            out[off : off + n] = (dr * (tr.norm(dim=1) / dr.norm(dim=1)).unsqueeze(1)).reshape(-1)
    return out


def assert_filter_normalized(d: torch.Tensor, model, rtol=1e-12):
    theta = flat(model)
    for off, shape in param_rows(model):
        n = math.prod(shape)
        seg = d[off : off + n]
        if len(shape) >= 2:
            torch.testing.assert_close(
                seg.reshape(shape[0], -1).norm(dim=1),
                theta[off : off + n].reshape(shape[0], -1).norm(dim=1),
                rtol=rtol,
                atol=1e-14,
            )
        else:
            assert torch.count_nonzero(seg) == 0, f"1-D parameter at offset {off} not zeroed"


# ---- multinomial logistic regression, closed form in numpy (no autograd) ----------------


def logreg_closed_form(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray):
    """Returns (loss, per-example gradients (N x D), Hessian (D x D)) of mean cross-entropy.

    g_i = J_i^T (p_i - e_{y_i}) = [(p_i - e_{y_i}) x_i^T (row-major), p_i - e_{y_i}]
    H   = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i   (the Kronecker form, reordered)
    """
    N, _ = X.shape
    C = W.shape[0]
    P = softmax_np(X @ W.T + b)
    E = np.eye(C)[y]
    loss = float(-np.mean(np.log(P[np.arange(N), y])))
    gs, H = [], 0.0
    for i in range(N):
        J = logreg_jacobian(X[i], C)
        gs.append(J.T @ (P[i] - E[i]))
        H = H + J.T @ (np.diag(P[i]) - np.outer(P[i], P[i])) @ J
    return loss, np.array(gs), H / N


def logreg_np(lin, x, y):
    return lin.weight.detach().numpy(), lin.bias.detach().numpy(), x.numpy(), y.numpy()


# ---- small smooth CNN (general path) ------------------------------------------------


class TinyCNN(nn.Module):
    """conv(1->2,3x3) - tanh - conv(2->3,3x3,pad 1) - tanh - flatten - linear(48->3), on 1x6x6 images."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(1, 2, 3)
        self.c2 = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(48, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.6 * torch.randn(p.shape, generator=g))
        self.to(DT)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


def cnn_data(seed=0, n=5):
    g = torch.Generator().manual_seed(500 + seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def rand_vec(D, seed):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ---- exactly quadratic model (conftest.quadratic_model): L(θ) = ½θᵀQθ, H = Q


def sym_with_spectrum(eigs, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return (U * np.asarray(eigs)) @ U.T


# ======================================================================================
# flat parameters
# ======================================================================================


def test_flat_parameters_is_concatenation_of_reshaped_parameters_in_order():
    """flat_parameters(model) == cat(p.reshape(-1) for p in model.parameters()), and is a detached copy."""
    m = TinyCNN(1)
    v = utils.flat_parameters(m)
    torch.testing.assert_close(v, flat(m), rtol=0, atol=0)
    assert not v.requires_grad
    v.add_(1.0)  # must not alias the parameters
    torch.testing.assert_close(flat(m), flat(TinyCNN(1)), rtol=0, atol=0)


# ======================================================================================
# Hessian-vector products
# ======================================================================================


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


@pytest.mark.parametrize("wrap", [False, True], ids=["plain_mlp", "wrapped_mlp"])
def test_hvp_matches_central_difference_of_gradient_tanh_mlp(wrap):
    """H v = (g(t+hv) - g(t-hv))/2h + O(h^2): with h=1e-4, |v|=1 the truncation is ~h^2/6*|D^3 g| ~ 1e-8 and roundoff ~1e-12."""
    m = tiny_mlp(0)
    model = Wrapped(m) if wrap else m
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


# ======================================================================================
# Top Hessian eigenvalue
# ======================================================================================


def _check_eig_result(res, H, lam_true, method, tol_lam=1e-6):
    vec = res.eigenvector.detach().numpy().astype(np.float64)
    assert res.eigenvector.dtype == DT
    assert res.method == method
    np.testing.assert_allclose(np.linalg.norm(vec), 1.0, rtol=1e-8)  # unit vector
    np.testing.assert_allclose(res.eigenvalue, lam_true, rtol=tol_lam, atol=tol_lam)
    r_true = np.linalg.norm(H @ vec - res.eigenvalue * vec)
    # reported residual is ||H v - lambda v|| for the returned vector
    assert abs(res.residual - r_true) <= 1e-8 + 1e-6 * r_true, (res.residual, r_true)
    return vec


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_equals_eigvalsh_max_of_closed_form_logreg_hessian(method):
    """top_hessian_eigenvalue == max(np.linalg.eigvalsh(H_closed_form)) to 1e-6, eigenvector aligned with the top eigenvector."""
    lin, x, y = make_logreg(0)
    _, _, H = logreg_closed_form(*logreg_np(lin, x, y))
    w, U = np.linalg.eigh(H)
    assert (w[-1] - w[-2]) / w[-1] > 0.1  # precondition: a clear spectral gap
    res = utils.top_hessian_eigenvalue(lin, x, y, method=method, max_iter=5000, tol=1e-12, seed=0)
    vec = _check_eig_result(res, H, w[-1], method)
    assert abs(abs(vec @ U[:, -1]) - 1) < 1e-6
    assert res.converged
    assert res.iterations >= 1


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_is_largest_algebraic_when_negative_eigenvalue_dominates(method):
    """H = Q with spectrum {4, 1, 0.5, -0.2, -10}: |lambda_min| > lambda_max, yet the answer is lambda_max = 4."""
    Q = sym_with_spectrum([4.0, 1.0, 0.5, -0.2, -10.0], seed=2)
    w, U = np.linalg.eigh(Q)
    assert abs(w[0]) > abs(w[-1]) and w[-1] > 0  # precondition verified
    m, x, y, lf = quadratic_model(Q)
    res = utils.top_hessian_eigenvalue(m, x, y, method=method, max_iter=5000, tol=1e-12, seed=0, loss_fn=lf)
    vec = _check_eig_result(res, Q, w[-1], method)
    assert abs(abs(vec @ U[:, -1]) - 1) < 1e-6


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_negative_dominant_on_larger_quadratic(method):
    """D=40 quadratic with spectrum in [-30, 6], top eigenvalue 6 separated by 2: the answer is +6, not -30."""
    eigs = np.concatenate([[6.0], np.linspace(-30.0, 4.0, 39)])
    Q = sym_with_spectrum(eigs, seed=3)
    m, x, y, lf = quadratic_model(Q)
    res = utils.top_hessian_eigenvalue(m, x, y, method=method, max_iter=5000, tol=1e-12, seed=1, loss_fn=lf)
    _check_eig_result(res, Q, 6.0, method)


def test_top_eigenvalue_lanczos_default_tolerance_obeys_residual_bounds_tanh_mlp():
    """Lanczos with default tol on an indefinite MLP Hessian: converged => ||Hv-lv|| <= tol*|l|; the Ritz value lies
    within the residual of an eigenvalue of H (Bauer-Fike for symmetric H), and here within r^2/gap of lambda_max."""
    model, (x, y) = tiny_mlp(0), tiny_data(0)
    H = full_hessian(model, x, y)
    np.testing.assert_allclose(H, H.T, atol=1e-10)
    H = 0.5 * (H + H.T)
    w = np.linalg.eigvalsh(H)
    res = utils.top_hessian_eigenvalue(model, x, y, method="lanczos", seed=0)
    assert res.converged
    vec = res.eigenvector.numpy()
    r = np.linalg.norm(H @ vec - res.eigenvalue * vec)
    assert r <= 1e-4 * abs(res.eigenvalue) * (1 + 1e-6) + 1e-12
    assert np.min(np.abs(w - res.eigenvalue)) <= r + 1e-12
    gap = w[-1] - w[-2]
    assert abs(res.eigenvalue - w[-1]) <= r**2 / gap + 1e-10
    # and the tight version, for both methods
    for method in ("lanczos", "power"):
        res = utils.top_hessian_eigenvalue(model, x, y, method=method, max_iter=5000, tol=1e-12, seed=0)
        np.testing.assert_allclose(res.eigenvalue, w[-1], rtol=1e-6, atol=1e-6)


def test_top_eigenvalue_from_exact_eigenvector_start():
    """Started at the exact top eigenvector (a fixed point of both iterations), the result is lambda_max."""
    lin, x, y = make_logreg(1)
    _, _, H = logreg_closed_form(*logreg_np(lin, x, y))
    w, U = np.linalg.eigh(H)
    for method in ("lanczos", "power"):
        res = utils.top_hessian_eigenvalue(
            lin, x, y, method=method, max_iter=200, tol=1e-10, start=torch.tensor(U[:, -1])
        )
        np.testing.assert_allclose(res.eigenvalue, w[-1], rtol=1e-8)


# ======================================================================================
# Gradient noise scale / per-example gradient norms
# ======================================================================================


def per_example_grads_loop(model, x, y, loss_fn=None) -> torch.Tensor:
    theta = flat(model)
    return torch.stack([grad_at(model, theta, x[i : i + 1], y[i : i + 1], loss_fn) for i in range(x.shape[0])])


def test_gradient_noise_scale_equals_closed_form_logistic_regression():
    """g_i = [(p_i - e_yi) x_i^T, p_i - e_yi] in numpy; tr(Sigma) = trace(np.cov(g, ddof=1)), |G|^2, B = tr/|G|^2, n = N."""
    lin, x, y = make_logreg(2, n=15)
    _, gs, _ = logreg_closed_form(*logreg_np(lin, x, y))
    G = gs.mean(0)
    tr = np.trace(np.cov(gs.T, ddof=1))
    res = utils.gradient_noise_scale(lin, x, y)
    np.testing.assert_allclose(res.trace_cov, tr, rtol=1e-10)
    np.testing.assert_allclose(res.grad_norm_sq, G @ G, rtol=1e-10)
    np.testing.assert_allclose(res.b_simple, tr / (G @ G), rtol=1e-9)
    assert res.n == 15
    norms, Gt = utils.per_example_gradient_norms_sq(lin, x, y)
    torch.testing.assert_close(norms, torch.tensor((gs**2).sum(1)), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(Gt, torch.tensor(G), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain_mlp", "wrapped_mlp"])
def test_gradient_noise_scale_equals_explicit_per_example_loop_tanh_mlp(wrap):
    """Explicit loop of single-example autograd gradients g_i: B_simple = tr(cov_{ddof=1}(g)) / |mean g|^2."""
    m = tiny_mlp(1)
    model = Wrapped(m) if wrap else m
    x, y = tiny_data(1, n=10)
    gs = per_example_grads_loop(model, x, y).numpy()
    G = gs.mean(0)
    tr = np.trace(np.cov(gs.T, ddof=1))
    res = utils.gradient_noise_scale(model, x, y)
    np.testing.assert_allclose(res.trace_cov, tr, rtol=1e-10)
    np.testing.assert_allclose(res.grad_norm_sq, G @ G, rtol=1e-10)
    np.testing.assert_allclose(res.b_simple, tr / (G @ G), rtol=1e-9)
    assert res.n == 10


def test_gradient_noise_scale_with_custom_loss_fn_uses_single_example_losses():
    """With loss_fn, l_i = loss_fn(f(x_i), y_i) on example i alone (here label-smoothed CE); compare with the loop."""
    lf = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2)  # noqa: E731
    model, (x, y) = tiny_mlp(4), tiny_data(4, n=9)
    gs = per_example_grads_loop(model, x, y, lf).numpy()
    G = gs.mean(0)
    tr = np.trace(np.cov(gs.T, ddof=1))
    res = utils.gradient_noise_scale(model, x, y, loss_fn=lf)
    np.testing.assert_allclose(res.trace_cov, tr, rtol=1e-10)
    np.testing.assert_allclose(res.grad_norm_sq, G @ G, rtol=1e-10)
    for path in ("fast", "general"):
        norms, Gt = utils.per_example_gradient_norms_sq(model, x, y, loss_fn=lf, path=path)
        torch.testing.assert_close(norms, torch.tensor((gs**2).sum(1)), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(Gt, torch.tensor(G), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("path", ["auto", "fast", "general"])
def test_per_example_gradient_norms_sq_equal_explicit_loop_tanh_mlp(path):
    """||g_i||^2 and G = mean_i g_i agree with a loop of single-example autograd gradients, on every path."""
    model, (x, y) = tiny_mlp(5, widths=(4, 6, 5, 3)), tiny_data(5, n=11)
    gs = per_example_grads_loop(model, x, y)
    norms, G = utils.per_example_gradient_norms_sq(model, x, y, path=path)
    assert norms.shape == (11,)
    torch.testing.assert_close(norms, (gs**2).sum(1), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(G, gs.mean(0), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("path", ["auto", "general"])
def test_per_example_gradient_norms_sq_equal_explicit_loop_general_models(path):
    """Same identity on models outside the fast path: wrapped MLP, smooth CNN, and SmallMLP (Flatten + ReLU)."""
    cases = [
        (Wrapped(tiny_mlp(6)), *tiny_data(6, n=7)),
        (TinyCNN(2), *cnn_data(2, n=6)),
        (
            SmallMLP(hidden=(6, 5), in_features=8, generator=torch.Generator().manual_seed(3)).to(DT),
            torch.randn(7, 1, 2, 4, generator=torch.Generator().manual_seed(4), dtype=DT),
            torch.tensor([0, 3, 9, 1, 1, 5, 2]),
        ),
    ]
    for model, x, y in cases:
        gs = per_example_grads_loop(model, x, y)
        norms, G = utils.per_example_gradient_norms_sq(model, x, y, path=path)
        torch.testing.assert_close(norms, (gs**2).sum(1), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(G, gs.mean(0), rtol=1e-10, atol=1e-14)


def test_gradient_noise_scale_is_infinite_with_note_when_mean_gradient_vanishes_by_symmetry():
    """W=0, b=0, two classes: p_i = (1/2, 1/2) and each class holds pairs (x, -x), so G = 0 exactly.
    Hand value: ||g_i||^2 = 1/2 ||x_i||^2 + 1/2 = 3, tr(Sigma) = sum ||g_i||^2 / (N-1) = 12/3 = 4; B = inf with a note."""
    lin = nn.Linear(2, 2).to(DT)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [2.0, -1.0], [-2.0, 1.0]], dtype=DT)
    y = torch.tensor([0, 0, 1, 1])
    res = utils.gradient_noise_scale(lin, x, y)
    assert res.grad_norm_sq <= 1e-28
    np.testing.assert_allclose(res.trace_cov, 4.0, rtol=1e-12)
    assert res.b_simple == math.inf
    assert isinstance(res.note, str) and res.note.strip()


# ======================================================================================
# Filter normalisation and random directions
# ======================================================================================


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_filter_normalize_rescales_each_row_to_parameter_row_norm_and_zeroes_biases(kind):
    """Li et al.: row r of each dim>=2 tensor becomes d_r * ||theta_r|| / ||d_r|| (conv: per filter); 1-D tensors -> 0."""
    model = tiny_mlp(0) if kind == "mlp" else TinyCNN(0)
    d = rand_vec(flat(model).numel(), 40)
    d_copy = d.clone()
    out = utils.filter_normalize(d, model)
    assert_filter_normalized(out, model)
    torch.testing.assert_close(out, my_filter_normalize(d_copy, model), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d, d_copy, rtol=0, atol=0)  # input direction not mutated


@given(seed=st.integers(0, 2**31 - 1), c=st.floats(1e-3, 1e3))
def test_filter_normalize_is_positively_scale_invariant_odd_and_idempotent(seed, c):
    """FN(c d) = FN(d) for c > 0, FN(-d) = -FN(d), and FN(FN(d)) = FN(d).

    Tolerance: float64 rounding (1e-12); the rescaling is exact (no ||d_r|| + eps guard), which is also
    checked for tiny directions in test_filter_normalize_row_norms_exact_for_tiny_direction_scale."""
    model = TinyCNN(1)
    d = rand_vec(flat(model).numel(), seed)
    fn = utils.filter_normalize(d.clone(), model)
    torch.testing.assert_close(utils.filter_normalize(c * d, model), fn, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(utils.filter_normalize(-d, model), -fn, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(utils.filter_normalize(fn.clone(), model), fn, rtol=1e-12, atol=1e-13)


def test_filter_normalize_row_norms_exact_for_tiny_direction_scale():
    """The filter normalisation of c d is independent of c > 0; in particular for c = 1e-10 every row of FN(c d) still has
    exactly the norm of the matching parameter row (the rescaling factor ||theta_r|| / ||c d_r|| is finite, ~1e10)."""
    model = tiny_mlp(0)
    d = 1e-10 * rand_vec(flat(model).numel(), 1)
    out = utils.filter_normalize(d, model)
    assert_filter_normalized(out, model, rtol=1e-12)
    torch.testing.assert_close(out, my_filter_normalize(d, model), rtol=1e-12, atol=1e-15)


def test_random_direction_filter_normalized_and_deterministic_given_generator():
    """normalization='filter' gives a filter-normalised vector; equal generator seeds give equal vectors, different seeds differ."""
    for model in (tiny_mlp(0), TinyCNN(0)):
        a = utils.random_direction(model, torch.Generator().manual_seed(5), normalization="filter")
        b = utils.random_direction(model, torch.Generator().manual_seed(5), normalization="filter")
        c = utils.random_direction(model, torch.Generator().manual_seed(6), normalization="filter")
        assert a.shape == flat(model).shape and a.dtype == DT
        assert_filter_normalized(a, model)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("normalization", ["filter", "adaptive", "none"])
def test_random_directions_are_successive_float32_gaussian_draws(normalization):
    """random_directions(K) draws K rows one after another, each a float32 standard normal vector of the
    generator (converted to the model's dtype), then filter-normalised (my_filter_normalize), scaled by |θ| or
    left alone: bit for bit for MLPs in float32 and float64 and a CNN; K successive random_direction calls give
    the same rows, and K = 0 gives none."""
    for model in (tiny_mlp(0), tiny_mlp(0).float(), TinyCNN(0)):
        theta = flat(model)
        batch = utils.random_directions(model, torch.Generator().manual_seed(3), 4, normalization=normalization)
        g = torch.Generator().manual_seed(3)
        raw = [torch.randn(theta.numel(), generator=g, dtype=torch.float32).to(theta) for _ in range(4)]
        expected = torch.stack([my_filter_normalize(d, model) if normalization == "filter" else
                                d * theta.abs() if normalization == "adaptive" else d for d in raw])
        assert batch.shape == (4, theta.numel()) and batch.dtype == theta.dtype
        torch.testing.assert_close(batch, expected, rtol=1e-12 if normalization == "filter" else 0,
                                   atol=1e-15 if normalization == "filter" else 0)
        g = torch.Generator().manual_seed(3)
        one_by_one = torch.stack([utils.random_direction(model, g, normalization=normalization) for _ in range(4)])
        torch.testing.assert_close(batch, one_by_one, rtol=0, atol=0)
        assert utils.random_directions(model, g, 0, normalization=normalization).shape == (0, theta.numel())


def test_filter_normalize_of_a_batch_is_row_by_row():
    """A (K, D) batch, contiguous or not, is filter-normalised row by row, bit for bit; float32 rows of a
    float64 model come out float64, as arithmetic with θ's norms promotes them; a wrong length is refused."""
    model = TinyCNN(0)
    raw = utils.random_directions(model, torch.Generator().manual_seed(4), 3, normalization="none")
    for batch in (raw, raw.T.contiguous().T):
        normalised = utils.filter_normalize(batch, model)
        for row, out in zip(raw, normalised):
            torch.testing.assert_close(out, utils.filter_normalize(row.clone(), model), rtol=0, atol=0)
    assert utils.filter_normalize(raw.float(), model).dtype == torch.float64
    with pytest.raises(ValueError, match="entries but the model has"):
        utils.filter_normalize(raw[:, :-1], model)


def test_random_direction_none_is_standard_gaussian():
    """normalization='none': D = 25,450 i.i.d. N(0,1) entries: |mean| < 5/sqrt(D), |var - 1| < 5 sqrt(2/D), |kurtosis - 3| < 0.3."""
    model = SmallMLP(hidden=(32,), generator=torch.Generator().manual_seed(0)).to(DT)
    d = utils.random_direction(model, torch.Generator().manual_seed(0), normalization="none").numpy()
    D = d.size
    assert D == sum(p.numel() for p in model.parameters())
    assert abs(d.mean()) < 5 / math.sqrt(D)
    assert abs(d.var() - 1) < 5 * math.sqrt(2 / D)
    assert abs(np.mean(d**4) / d.var() ** 2 - 3) < 0.3


# ======================================================================================
# Perturbation flatness
# ======================================================================================


def test_flatness_zero_sigma_gives_exactly_zero_increase_and_base_loss_is_loss():
    """L(theta + 0 d) - L(theta) = 0 exactly; base_loss = L(theta); summary stats are mean / std(ddof=1) of .increases."""
    model, (x, y) = tiny_mlp(0), tiny_data(0)
    sig = [0.0, 0.05, 0.2]
    res = utils.perturbation_flatness(model, x, y, sig, samples=7, seed=3)
    inc = np.asarray(res.increases)
    assert inc.shape == (7, 3)
    assert np.all(inc[:, 0] == 0.0)
    assert res.mean_increase[0] == 0.0 and res.std_increase[0] == 0.0
    np.testing.assert_allclose(res.base_loss, loss_at(model, flat(model), x, y), rtol=1e-13)
    np.testing.assert_allclose(res.mean_increase, inc.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.std_increase, inc.std(0, ddof=1), rtol=1e-12, atol=1e-15)
    assert list(res.sigmas) == sig


def test_flatness_exact_on_quadratic_loss_filter_normalized_same_directions():
    """Exactly quadratic loss: Linear(3,3) with X = sqrt(3) I and loss_fn = mean_i 1/2 sum_c w_c (o_ic - t_ic)^2.
    The weight-block Hessian is diag(w) (x) I, so for a filter-normalised d with zero bias
    L(theta + s d) - L(theta) = s a_d + 1/2 s^2 S with S = sum_c w_c ||W_c||^2 the SAME for every direction.
    From sigmas s1, s2 we recover (a_d, S) per sample: S must equal the constant, and s3 must be predicted exactly."""
    m = 3
    lin = nn.Linear(m, 3).to(DT)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, m, generator=g, dtype=DT))
        lin.bias.copy_(torch.randn(3, generator=g, dtype=DT))
    x = math.sqrt(m) * torch.eye(m, dtype=DT)
    t = torch.randn(m, 3, generator=g, dtype=DT)
    wts = torch.tensor([1.0, 10.0, 100.0], dtype=DT)

    def lf(o, tt):
        return (0.5 * (wts * (o - tt) ** 2).sum(1)).mean()

    S_true = float((wts * lin.weight.detach().pow(2).sum(1)).sum())
    s1, s2, s3 = 0.1, 0.3, 0.7
    res = utils.perturbation_flatness(lin, x, t, [s1, s2, s3], samples=40, seed=0, loss_fn=lf)
    inc = np.asarray(res.increases)
    u1, u2 = inc[:, 0] / s1, inc[:, 1] / s2
    S = 2 * (u2 - u1) / (s2 - s1)
    a = u1 - 0.5 * s1 * S
    # rtol 1e-10: float64 rounding (~1e-12), amplified by the finite-difference fit of S
    np.testing.assert_allclose(S, S_true, rtol=1e-10)
    # same directions for every sigma: the per-sample quadratic fitted on s1, s2 predicts s3 (rounding ~1e-12)
    np.testing.assert_allclose(inc[:, 2], s3 * a + 0.5 * s3**2 * S, rtol=1e-10, atol=1e-10)
    assert np.unique(np.round(a, 8)).size > 1  # the samples really are different directions
    np.testing.assert_allclose(res.base_loss, loss_at(lin, flat(lin), x, t, lf), rtol=1e-13)


def _logreg_minimiser(seed=0, n=80, d=2, C=3):
    """Damped Newton in numpy on the closed-form gradient/Hessian (pseudo-inverse: softmax shift null space)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = rng.integers(0, C, n)  # random labels: non-separable, a finite minimiser exists
    W, b = np.zeros((C, d)), np.zeros(C)
    for _ in range(100):
        L, gs, H = logreg_closed_form(W, b, X, y)
        G = gs.mean(0)
        if np.linalg.norm(G) < 1e-14:
            break
        step = np.linalg.lstsq(H, G, rcond=1e-12)[0]
        t = 1.0
        while True:
            Wn, bn = W - t * step[: C * d].reshape(C, d), b - t * step[C * d :]
            if logreg_closed_form(Wn, bn, X, y)[0] <= L or t < 1e-8:
                break
            t /= 2
        W, b = Wn, bn
    return W, b, X, y


def test_flatness_small_sigma_matches_half_sigma_sq_expected_quadratic_form_at_minimum():
    """At a minimiser of logistic regression (G ~ 1e-14): L(theta + s d) - L(theta) = 1/2 s^2 d^T H d + O(s^3).
    A filter-normalised row d_c is uniform on the sphere of radius ||W_c|| in R^n, so
    E[d^T H d] = sum_c ||W_c||^2 / n * tr(H_{W_c W_c}) (biases zero). Check the mean within Monte-Carlo error
    (4 standard errors) + 1e-3 relative Taylor slack, and per sample 0 <= q <= lambda_max ||W||_F^2."""
    W, b, X, y = _logreg_minimiser()
    _, gs, H = logreg_closed_form(W, b, X, y)
    assert np.linalg.norm(gs.mean(0)) < 1e-12
    C, d = W.shape
    lin = nn.Linear(d, C).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W))
        lin.bias.copy_(torch.tensor(b))
    x, yt = torch.tensor(X), torch.tensor(y)
    Eq = sum((W[c] @ W[c]) / d * np.trace(H[c * d : (c + 1) * d, c * d : (c + 1) * d]) for c in range(C))
    sigma, S = 1e-4, 400
    res = utils.perturbation_flatness(lin, x, yt, [sigma], samples=S, seed=0)
    q = np.asarray(res.increases)[:, 0] / (0.5 * sigma**2)
    se = q.std(ddof=1) / math.sqrt(S)
    assert abs(q.mean() - Eq) <= 4 * se + 1e-3 * Eq, (q.mean(), Eq, se)
    np.testing.assert_allclose(res.mean_increase[0], 0.5 * sigma**2 * q.mean(), rtol=1e-10)
    lam = np.linalg.eigvalsh(H)[-1]
    bound = lam * (W**2).sum()
    assert np.all(q <= bound * (1 + 1e-3)) and np.all(q >= -1e-3 * bound)


# ======================================================================================
# Linear interpolation and barrier
# ======================================================================================


def test_interpolation_barrier_of_sign_flipped_scalar_linear_network_is_mean_y_squared():
    """f(x) = w2 w1 x, MSE, y = x. theta_a = (1,1), theta_b = (-1,-1) compute f = x (zero loss);
    theta(alpha) = (1-2 alpha)(1,1) so f = (1-2 alpha)^2 x and L(alpha) = 16 alpha^2 (1-alpha)^2 mean(x^2).
    Barrier over alphas containing 1/2 = mean(x^2) = 1.875; with alphas -1/2 and 3/2 it is 9 mean(x^2). Accuracy: NaN."""
    ma, mb = scalar_chain(1.0, 1.0), scalar_chain(-1.0, -1.0)
    x = torch.tensor([[0.5], [-1.0], [2.0], [1.5]], dtype=DT)
    y = x.clone()
    mse = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    mx2 = float((x**2).mean())
    alphas = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    res = utils.linear_interpolation(ma, mb, x, y, alphas, loss_fn=mse)
    expect = [16 * a**2 * (1 - a) ** 2 * mx2 for a in alphas]
    np.testing.assert_allclose(res.losses, expect, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.barrier, mx2, rtol=1e-12)
    np.testing.assert_allclose(res.endpoint_losses, [0.0, 0.0], atol=1e-15)
    assert list(res.alphas) == alphas
    assert all(math.isnan(a) for a in res.accuracies)
    res2 = utils.linear_interpolation(ma, mb, x, y, [-0.5, 0.0, 0.5, 1.0, 1.5], loss_fn=mse)
    np.testing.assert_allclose(res2.losses, [9 * mx2, 0, mx2, 0, 9 * mx2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res2.barrier, 9 * mx2, rtol=1e-12)


def test_interpolation_losses_accuracies_and_barrier_equal_direct_evaluation_tanh_mlps():
    """L(alpha) = L((1-a) theta_a + a theta_b) evaluated directly; acc = mean(argmax == y);
    barrier = max_a [L(a) - (1-a) L_a - a L_b]."""
    ma, mb = tiny_mlp(0), tiny_mlp(1)
    x, y = tiny_data(0, n=20)
    ta, tb = flat(ma), flat(mb)
    alphas = np.linspace(0, 1, 9).tolist()
    res = utils.linear_interpolation(ma, mb, x, y, alphas)
    L = [loss_at(ma, (1 - a) * ta + a * tb, x, y) for a in alphas]
    A = [acc_at(ma, (1 - a) * ta + a * tb, x, y) for a in alphas]
    la, lb = loss_at(ma, ta, x, y), loss_at(mb, tb, x, y)
    np.testing.assert_allclose(res.losses, L, rtol=1e-12)
    np.testing.assert_allclose(res.accuracies, A, rtol=0, atol=0)
    np.testing.assert_allclose(res.endpoint_losses, [la, lb], rtol=1e-12)
    np.testing.assert_allclose(res.barrier, max(l - (1 - a) * la - a * lb for a, l in zip(alphas, L)), rtol=1e-10, atol=1e-13)


def test_barrier_height_hand_values():
    """Hand values: losses (1, 3, 2) at (0, .5, 1) -> 3 - 1.5 = 1.5; a path below the chord -> 0 (endpoints);
    alphas (.25, .75) with losses .5 and chord 1 -> max over the GIVEN alphas = -0.5 (no clipping in the formula)."""
    np.testing.assert_allclose(utils.barrier_height([0, 0.5, 1], [1, 3, 2], 1, 2), 1.5, rtol=1e-15)
    np.testing.assert_allclose(utils.barrier_height([0, 0.5, 1], [1, 0.5, 2], 1, 2), 0.0, atol=1e-15)
    np.testing.assert_allclose(utils.barrier_height([0.25, 0.75], [0.5, 0.5], 1.0, 1.0), -0.5, rtol=1e-15)


@given(
    data=st.lists(
        st.tuples(st.floats(-1, 2, allow_nan=False), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=12
    ),
    la=st.floats(0, 10),
    lb=st.floats(0, 10),
)
def test_barrier_height_is_max_of_loss_minus_chord(data, la, lb):
    """barrier_height = max_i [losses_i - ((1 - alpha_i) la + alpha_i lb)]."""
    alphas, losses = [a for a, _ in data], [l for _, l in data]
    expect = max(l - ((1 - a) * la + a * lb) for a, l in data)
    np.testing.assert_allclose(utils.barrier_height(alphas, losses, la, lb), expect, rtol=1e-12, atol=1e-12)


# ======================================================================================
# 2-D loss surface
# ======================================================================================


@given(steps=st.integers(2, 12), span=st.floats(0.01, 10.0))
def test_loss_surface_grid_is_exactly_symmetric_and_contains_zero_for_odd_steps(steps, span):
    """alphas = betas: `steps` points over [-span, span], a_i = -a_{steps-1-i} exactly, exact 0 at the centre when steps is odd."""
    model, (x, y) = tiny_mlp(0, widths=(4, 3)), tiny_data(0, n=4)
    res = utils.loss_surface_2d(model, x, y, steps=steps, span=span, seed=0)
    for grid in (np.asarray(res.alphas), np.asarray(res.betas)):
        assert grid.shape == (steps,)
        assert np.all(grid == -grid[::-1])
        np.testing.assert_allclose(grid, np.linspace(-span, span, steps), rtol=0, atol=4e-16 * span)
        np.testing.assert_allclose([grid[0], grid[-1]], [-span, span], rtol=1e-15)
        if steps % 2:
            assert grid[steps // 2] == 0.0
        else:
            assert np.all(grid != 0.0)
    assert np.asarray(res.losses).shape == (steps, steps)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain_mlp", "wrapped_mlp"])
def test_loss_surface_with_given_directions_equals_direct_evaluation(wrap):
    """losses[i, j] = L(theta + alphas[i] d1 + betas[j] d2) with d1, d2 used unchanged; same for accuracies."""
    m = tiny_mlp(1)
    model = Wrapped(m) if wrap else m
    x, y = tiny_data(1, n=16)
    theta = flat(model)
    d1, d2 = rand_vec(theta.numel(), 50), rand_vec(theta.numel(), 51)
    res = utils.loss_surface_2d(model, x, y, steps=5, span=0.7, directions=(d1.clone(), d2.clone()))
    torch.testing.assert_close(res.directions[0], d1, rtol=0, atol=0)
    torch.testing.assert_close(res.directions[1], d2, rtol=0, atol=0)
    al, be = np.asarray(res.alphas), np.asarray(res.betas)
    L = np.array([[loss_at(model, theta + float(a) * d1 + float(b) * d2, x, y) for b in be] for a in al])
    A = np.array([[acc_at(model, theta + float(a) * d1 + float(b) * d2, x, y) for b in be] for a in al])
    np.testing.assert_allclose(np.asarray(res.losses), L, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(np.asarray(res.accuracies), A, rtol=0, atol=0)
    assert res.losses[2][2] == pytest.approx(loss_at(model, theta, x, y), rel=1e-12)


def test_loss_surface_default_directions_are_filter_normalized_and_seeded():
    """Default directions: filter-normalised Gaussian; same seed -> same directions; losses consistent with them."""
    model, (x, y) = TinyCNN(3), cnn_data(3)
    theta = flat(model)
    r1 = utils.loss_surface_2d(model, x, y, steps=3, span=0.5, seed=4)
    r2 = utils.loss_surface_2d(model, x, y, steps=3, span=0.5, seed=4)
    d1, d2 = r1.directions
    assert_filter_normalized(d1, model)
    assert_filter_normalized(d2, model)
    assert not torch.allclose(d1, d2)
    torch.testing.assert_close(r2.directions[0], d1, rtol=0, atol=0)
    L = np.array([[loss_at(model, theta + float(a) * d1 + float(b) * d2, x, y) for b in r1.betas] for a in r1.alphas])
    np.testing.assert_allclose(np.asarray(r1.losses), L, rtol=1e-11, atol=1e-13)


# ======================================================================================
# losses_at_points
# ======================================================================================


def _direct_points(model, x, y, base, dirs, coefs, loss_fn=None):
    Ls, As = [], []
    for p in range(coefs.shape[0]):
        th = base + (coefs[p].unsqueeze(1) * dirs).sum(0)
        Ls.append(loss_at(model, th, x, y, loss_fn))
        As.append(acc_at(model, th, x, y))
    return torch.tensor(Ls, dtype=DT), torch.tensor(As, dtype=DT)


@pytest.mark.parametrize("path", ["auto", "fast", "general"])
def test_losses_at_points_equal_direct_evaluation_plain_mlp(path):
    """loss at base + sum_k c[p,k] dirs[k] (base != model's own theta) evaluated directly; float64 outputs."""
    model, (x, y) = tiny_mlp(2, widths=(4, 7, 5, 3)), tiny_data(2, n=13)
    D = flat(model).numel()
    base = flat(model) + 0.3 * rand_vec(D, 60)
    dirs = torch.stack([rand_vec(D, 61), rand_vec(D, 62)])
    coefs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.3, 0.7], [-1.5, 2.0]], dtype=DT)
    res = utils.losses_at_points(model, x, y, base, dirs, coefs, path=path)
    L, A = _direct_points(model, x, y, base, dirs, coefs)
    assert res.losses.dtype == DT and res.accuracies.dtype == DT
    torch.testing.assert_close(res.losses, L, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(res.accuracies, A, rtol=0, atol=0)
    torch.testing.assert_close(flat(model), flat(tiny_mlp(2, widths=(4, 7, 5, 3))), rtol=0, atol=0)


def test_losses_at_points_general_path_on_cnn_and_relu_smallmlp_and_custom_loss():
    """General-path models (smooth CNN, SmallMLP with Flatten+ReLU) and a custom loss_fn: equal to direct evaluation."""
    lf = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)  # noqa: E731
    smlp = SmallMLP(hidden=(6, 5), in_features=8, generator=torch.Generator().manual_seed(3)).to(DT)
    xs = torch.randn(9, 1, 2, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    ys = torch.randint(0, 10, (9,), generator=torch.Generator().manual_seed(5))
    cases = [(TinyCNN(4), *cnn_data(4), "general"), (smlp, xs, ys, "general"), (smlp, xs, ys, "auto")]
    for model, x, y, path in cases:
        D = flat(model).numel()
        base = flat(model)
        dirs = torch.stack([rand_vec(D, 70), rand_vec(D, 71), rand_vec(D, 72)]) * 0.2
        coefs = torch.randn(4, 3, generator=torch.Generator().manual_seed(73), dtype=DT)
        for loss_fn in (None, lf):
            res = utils.losses_at_points(model, x, y, base, dirs, coefs, path=path, loss_fn=loss_fn)
            L, A = _direct_points(model, x, y, base, dirs, coefs, loss_fn)
            torch.testing.assert_close(res.losses, L, rtol=1e-11, atol=1e-13)
            torch.testing.assert_close(res.accuracies, A, rtol=0, atol=0)


@given(
    P=st.integers(1, 6),
    K=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    vals=st.lists(st.floats(-3, 3, allow_nan=False), min_size=18, max_size=18),
)
def test_losses_at_points_fast_path_equals_general_path(P, K, seed, vals):
    """For a plain MLP, path='fast' and path='general' give the same losses and accuracies for any coefficients."""
    model, (x, y) = tiny_mlp(3), tiny_data(3, n=10)
    D = flat(model).numel()
    base = flat(model)
    dirs = torch.randn(K, D, generator=torch.Generator().manual_seed(seed), dtype=DT) * 0.5
    coefs = torch.tensor(vals[: P * K], dtype=DT).reshape(P, K)
    fast = utils.losses_at_points(model, x, y, base, dirs, coefs, path="fast")
    gen = utils.losses_at_points(model, x, y, base, dirs, coefs, path="general")
    torch.testing.assert_close(fast.losses, gen.losses, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(fast.accuracies, gen.accuracies, rtol=0, atol=0)
    L, _ = _direct_points(model, x, y, base, dirs, coefs)
    torch.testing.assert_close(gen.losses, L, rtol=1e-11, atol=1e-13)


# ======================================================================================
# No side effects on the model
# ======================================================================================


def _snapshot(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def _assert_same(model, snap):
    params, grads, modes = snap
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "wrapped"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grads", ["none", "set"])
def test_functions_leave_parameters_grads_and_mode_unchanged(wrap, mode, grads):
    """Every public function leaves parameters, .grad (None or a set tensor) and train/eval flags exactly as they were."""

    def build(seed):
        m = tiny_mlp(seed)
        model = Wrapped(m) if wrap else m
        model.train(mode == "train")
        if grads == "set":
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.5 + i)
        return model

    model, other = build(0), build(1)
    x, y = tiny_data(0)
    D = flat(model).numel()
    snap, snap_other = _snapshot(model), _snapshot(other)
    v = rand_vec(D, 80)
    calls = [
        lambda: utils.flat_parameters(model),
        lambda: utils.hessian_vector_product(model, x, y, v),
        lambda: utils.top_hessian_eigenvalue(model, x, y, max_iter=10, method="lanczos"),
        lambda: utils.top_hessian_eigenvalue(model, x, y, max_iter=10, method="power"),
        lambda: utils.perturbation_flatness(model, x, y, [0.1], samples=3),
        lambda: utils.filter_normalize(v.clone(), model),
        lambda: utils.random_direction(model, torch.Generator().manual_seed(0)),
        lambda: utils.gradient_noise_scale(model, x, y),
        lambda: utils.per_example_gradient_norms_sq(model, x, y),
        lambda: utils.per_example_gradient_norms_sq(model, x, y, path="general"),
        lambda: utils.linear_interpolation(model, other, x, y, [0.0, 0.5, 1.0]),
        lambda: utils.loss_surface_2d(model, x, y, steps=3),
        lambda: utils.losses_at_points(model, x, y, flat(model), v.unsqueeze(0), torch.ones(2, 1, dtype=DT)),
    ]
    for i, call in enumerate(calls):
        call()
        _assert_same(model, snap)
        _assert_same(other, snap_other)
