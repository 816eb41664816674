r"""Independent oracle tests for the exact Hessian diagonal (utils.hessian_diagonal) and the code that uses it
(hessian_trace(method="exact" / "auto"), layer_curvature's exact block traces).

Written without reading utils.py, main.py or plotting.py. The mathematics being checked:

    H = (1/N) sum_n J_n^T (d^2 l_n / d f^2) J_n  +  (1/N) sum_n sum_k (d l_n / d f_k) d^2 f_{n,k} / d theta^2
        \_______________ Gauss-Newton G ______/     \___________________ residual R _______________________/

For a plain MLP whose hidden activations are piecewise linear (ReLU, LeakyReLU, Identity), each output f_k is,
locally, a product of weights along paths: it is affine in every single parameter theta_i (each path contains
each weight at most once), so d^2 f_k / d theta_i^2 = 0 and diag(R) = 0, i.e. diag(H) = diag(G) exactly -- even
though R itself is not zero off the diagonal (weights of different layers multiply each other).

Expected values come from plain autograd: a dense float64 Hessian of the flat-parameter mean loss by
torch.autograd.functional.hessian, a Gauss-Newton matrix from autograd Jacobians, or a closed form in numpy
(multinomial logistic regression). ReLU kinks are never hit exactly with random float64 weights and inputs.
"""

from __future__ import annotations

import copy
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
from conftest import Wrapped, _loss, flat, param_blocks, make_logreg, mlp_of, softmax_np, unflatten

DT = torch.float64
REL = 1e-10

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "identity": nn.Identity,
}


# ======================================================================================
# Independent helpers (no use of utils)
# ======================================================================================


def randomize(model: nn.Module, seed: int, scale: float = 0.8) -> nn.Module:
    """Overwrite every parameter with scale * N(0, 1) draws from `seed` (deterministic, float64)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def make_mlp(widths, act="relu", bias=True, tail=None, seed=0, scale=0.8) -> nn.Sequential:
    return randomize(mlp_of(widths, ACTIVATIONS[act], bias=bias, tail=tail), seed, scale)


def make_data(n, d, classes, seed=0):
    g = torch.Generator().manual_seed(7919 + seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def dense_hessian(model, x, y, loss_fn=None) -> torch.Tensor:
    """Dense Hessian of the mean loss w.r.t. the flat parameter vector (plain autograd, float64)."""
    theta = flat(model).to(DT)
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    H = torch.autograd.functional.hessian(
        lambda th: _loss(functional_call(m64, unflatten(m64, th), (x64,)), y, loss_fn), theta
    )
    return H.detach()


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


def snapshot(model):
    return (
        copy.deepcopy(model.state_dict()),
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def assert_unchanged(model, snap):
    sd, grads, rgs, modes = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[k], sd[k]), f"parameter/buffer {k} changed"
        assert now[k].dtype == sd[k].dtype
    for p, g, rg in zip(model.parameters(), grads, rgs):
        assert p.requires_grad == rg, "requires_grad changed"
        if g is None:
            assert p.grad is None, ".grad was None and is now set"
        else:
            assert p.grad is not None and torch.equal(p.grad, g), ".grad changed"
    assert [m.training for m in model.modules()] == modes, "train/eval mode changed"


# ======================================================================================
# hessian_diagonal == diag(dense H)
# ======================================================================================


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
    H = dense_hessian(model, x, y)
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
    assert rel_err(full, torch.diagonal(dense_hessian(model, x, y))) < REL


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
        H = dense_hessian(model, x, y, loss_fn=lf)
        got = utils.hessian_diagonal(model, x, y, loss_fn=lf)
        assert rel_err(got, torch.diagonal(H)) < REL
    # the tail really changes the answer: drop it and the diagonal is different
    m_tail = cases[0][0]
    m_notail = nn.Sequential(*list(m_tail)[:-1])
    d_tail = utils.hessian_diagonal(m_tail, x, y, loss_fn=sq_loss)
    d_notail = torch.diagonal(dense_hessian(m_notail, x, y, loss_fn=sq_loss))
    assert rel_err(d_tail, d_notail) > 1e-2


def test_hessian_diagonal_float32_model_returns_float32():
    """The result is in the model's dtype: for a float32 ReLU MLP and float32 data it is a float32 vector equal to the
    float64 dense diagonal (of the same float32 weights) to float32 accuracy."""
    model64 = make_mlp([4, 6, 5, 3], "relu", seed=8)
    x64, y = make_data(13, 4, 3, seed=8)
    model32, x32 = copy.deepcopy(model64).float(), x64.float()
    got = utils.hessian_diagonal(model32, x32, y)
    assert got.dtype == torch.float32
    expected = torch.diagonal(dense_hessian(model32, x32, y))  # float64 copy of the float32 weights
    assert rel_err(got, expected) < 1e-4


# ======================================================================================
# The identity is not trivial: H != G off the diagonal, diag(H) == diag(G)
# ======================================================================================


@pytest.mark.parametrize("act", ["relu", "leaky"])
def test_diagonal_equals_gauss_newton_diagonal_but_hessian_is_not_gauss_newton(act):
    """For a ReLU / LeakyReLU MLP, H = G + R with R = (1/N) sum_n sum_k (dl_n/df_k) d^2 f_{n,k}/dtheta^2. Each f_k is
    affine in every single weight, so diag(R) = 0 and diag(H) == diag(G) (1e-10) -- but R is NOT zero: weights of
    successive layers multiply, so H and G differ off the diagonal by a clear margin (> 1% of max |H|). G is built from
    autograd Jacobians, independently of the dense Hessian; hessian_diagonal matches both diagonals."""
    model = make_mlp([3, 4, 4, 3], act, seed=9, scale=1.0)
    x, y = make_data(9, 3, 3, seed=9)
    H = dense_hessian(model, x, y)
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
    H = dense_hessian(model, x, y)
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
    snap = snapshot(model)
    with pytest.raises(ValueError):
        utils.hessian_diagonal(model, x, y)
    assert_unchanged(model, snap)


# ======================================================================================
# hessian_trace(method="exact" / "auto")
# ======================================================================================


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_hessian_trace_exact_and_auto_equal_dense_trace(act):
    """tr(H) = sum_i H_ii: method="exact" returns the dense trace (1e-10 relative), with stderr 0, no matvecs,
    method "exact", converged True; method="auto" returns the same exact result on a piecewise-linear MLP."""
    model = make_mlp([4, 6, 5, 3], act, seed=12)
    x, y = make_data(14, 4, 3, seed=12)
    tr = float(torch.trace(dense_hessian(model, x, y)))
    for method in ("exact", "auto"):
        r = utils.hessian_trace(model, x, y, method=method)
        assert abs(r.trace - tr) <= REL * abs(tr)
        assert r.stderr == 0 and r.matvecs == 0
        assert r.method == "exact" and r.converged is True


def test_hessian_trace_exact_with_custom_loss_and_chunks():
    """method="exact" with a custom loss and a tail equals the dense trace, and does not depend on memory_budget."""
    C = 3

    def sq_loss(o, t):
        return 0.5 * ((o - F.one_hot(t, C).to(o.dtype)) ** 2).sum(1).mean()

    model = make_mlp([4, 5, C], "relu", tail=nn.Tanh(), seed=13, scale=0.6)
    x, y = make_data(30, 4, C, seed=13)
    tr = float(torch.trace(dense_hessian(model, x, y, loss_fn=sq_loss)))
    for budget in (2_000, 1 << 30):
        r = utils.hessian_trace(model, x, y, method="exact", loss_fn=sq_loss, memory_budget=budget)
        assert abs(r.trace - tr) <= REL * abs(tr)
        assert r.stderr == 0 and r.matvecs == 0 and r.method == "exact"


@pytest.mark.parametrize("kind", ["tanh", "wrapped"])
def test_hessian_trace_exact_refuses_and_auto_falls_back_to_hutchpp(kind):
    """Where the exact diagonal does not apply (Tanh hidden activation; non-Sequential wrapper), method="exact" raises
    ValueError, and method="auto" returns a Hutch++ estimate (method "hutch++", stderr > 0, matvecs > 0) within
    4 standard errors of the dense trace (rel_stderr=0.05, max_matvecs=400, seed 0)."""
    base = make_mlp([4, 6, 5, 3], "relu", seed=14)
    if kind == "tanh":
        base[1], base[3] = nn.Tanh(), nn.Tanh()
        model = base
    else:
        model = Wrapped(base)
    x, y = make_data(14, 4, 3, seed=14)
    tr = float(torch.trace(dense_hessian(model, x, y)))
    with pytest.raises(ValueError):
        utils.hessian_trace(model, x, y, method="exact")
    r = utils.hessian_trace(model, x, y, method="auto", rel_stderr=0.05, max_matvecs=400, seed=0)
    assert r.method == "hutch++"
    assert r.stderr > 0 and r.matvecs > 0
    assert abs(r.trace - tr) <= 4 * r.stderr


# ======================================================================================
# layer_curvature's exact block traces
# ======================================================================================


@pytest.mark.parametrize("exact_below", [0, 64])
@pytest.mark.parametrize("act", ["relu", "leaky", "identity"])
def test_layer_curvature_block_traces_are_exact(act, exact_below):
    """tr(H_bb) = sum over the block's diagonal entries: for a piecewise-linear MLP, every parameter block's .trace
    equals the trace of the dense Hessian's diagonal block (1e-10 relative) with .trace_stderr == 0, even with
    exact_below=0 (so it is not the small-block dense path); names and sizes follow named_parameters()."""
    model = make_mlp([4, 7, 6, 3], act, seed=15)
    x, y = make_data(16, 4, 3, seed=15)
    H = dense_hessian(model, x, y)
    res = utils.layer_curvature(model, x, y, exact_below=exact_below, seed=0)
    blocks = param_blocks(model)
    assert [r.name for r in res] == [b[0] for b in blocks]
    assert [r.size for r in res] == [b[2] for b in blocks]
    for r, (name, i, k) in zip(res, blocks):
        t = float(torch.trace(H[i : i + k, i : i + k]))
        scale = max(abs(t), float(torch.diagonal(H)[i : i + k].abs().max()))
        assert abs(r.trace - t) <= REL * scale, name
        assert r.trace_stderr == 0, name


def test_layer_curvature_exact_traces_with_custom_loss_tail_and_no_bias():
    """Same fact with a custom loss, an element-wise Tanh tail, bias-free Linear layers and a tiny memory_budget."""
    C = 3

    def sq_loss(o, t):
        return 0.5 * ((o - F.one_hot(t, C).to(o.dtype)) ** 2).sum(1).mean()

    model = make_mlp([4, 5, 5, C], "relu", bias=False, tail=nn.Tanh(), seed=16, scale=0.6)
    x, y = make_data(25, 4, C, seed=16)
    H = dense_hessian(model, x, y, loss_fn=sq_loss)
    res = utils.layer_curvature(model, x, y, exact_below=0, loss_fn=sq_loss, memory_budget=2_000)
    blocks = param_blocks(model)
    assert len(res) == len(blocks)
    for r, (name, i, k) in zip(res, blocks):
        t = float(torch.trace(H[i : i + k, i : i + k]))
        scale = max(abs(t), float(torch.diagonal(H)[i : i + k].abs().max()))
        assert r.name == name and abs(r.trace - t) <= REL * scale
        assert r.trace_stderr == 0


# ======================================================================================
# The model is left unchanged
# ======================================================================================


def _calls():
    return {
        "hessian_diagonal": lambda m, x, y: utils.hessian_diagonal(m, x, y, memory_budget=2_000),
        "trace_exact": lambda m, x, y: utils.hessian_trace(m, x, y, method="exact"),
        "trace_auto": lambda m, x, y: utils.hessian_trace(m, x, y, method="auto"),
        "layer_curvature": lambda m, x, y: utils.layer_curvature(m, x, y, exact_below=0, max_iter=30),
    }


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("preset_grad", [False, True])
@pytest.mark.parametrize("fn", sorted(_calls()))
def test_functions_leave_model_unchanged(fn, preset_grad, training):
    """A measurement is a pure function of (theta, data): parameters (state_dict), .grad (None stays None, a set .grad
    keeps its value), requires_grad and the train/eval flag of every module are exactly as before the call."""
    model = make_mlp([4, 5, 5, 3], "relu", seed=17)
    x, y = make_data(10, 4, 3, seed=17)
    model.train(training)
    if preset_grad:
        g = torch.Generator().manual_seed(99)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    snap = snapshot(model)
    _calls()[fn](model, x, y)
    assert_unchanged(model, snap)
