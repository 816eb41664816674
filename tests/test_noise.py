"""Gradient noise: per-example gradients (reference and closed form) against explicit loops, B_simple and
B_noise against closed forms, the two-batch estimator's unbiasedness, the noise temperature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    TinyCNN,
    Wrapped,
    assert_unchanged,
    cnn_data,
    dense_hessian,
    flat,
    grad_at,
    logreg_closed_form,
    logreg_closed_form_spectrum,
    logreg_np,
    make_logreg,
    mlp_of,
    saddle_loss_fn,
    snapshot,
    sym_with_spectrum_spectrum,
    tiny_data,
    tiny_mlp,
    z_score,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import utils
from models import SmallMLP


def per_example_grads_loop(model, x, y, loss_fn=None) -> torch.Tensor:
    theta = flat(model)
    return torch.stack([grad_at(model, theta, x[i : i + 1], y[i : i + 1], loss_fn) for i in range(x.shape[0])])


def per_example_grads(model, x, y, loss_fn=None) -> np.ndarray:
    """(N, D): g_i = gradient of the loss on example i alone (explicit loop)."""
    theta = flat(model)
    return torch.stack([grad_at(model, theta, x[i : i + 1], y[i : i + 1], loss_fn) for i in range(x.shape[0])]).numpy()


def noise_stats(gs: np.ndarray, H: np.ndarray) -> dict:
    """Exact |G|^2, tr(Sigma), tr(H Sigma), G^T H G with Sigma = 1/(N-1) sum (g_i - G)(g_i - G)^T."""
    N = gs.shape[0]
    G = gs.mean(0)
    C = gs - G
    Sigma = C.T @ C / (N - 1)
    return dict(
        G=G,
        grad_norm_sq=float(G @ G),
        trace_cov=float(np.trace(Sigma)),
        trace_h_cov=float(np.trace(H @ Sigma)),
        g_h_g=float(G @ H @ G),
    )


def _check_noise_exact(res, ex, N, rtol=1e-10):
    np.testing.assert_allclose(res.grad_norm_sq, ex["grad_norm_sq"], rtol=rtol)
    np.testing.assert_allclose(res.trace_cov, ex["trace_cov"], rtol=rtol)
    np.testing.assert_allclose(res.b_simple, ex["trace_cov"] / ex["grad_norm_sq"], rtol=rtol)
    np.testing.assert_allclose(res.trace_h_cov, ex["trace_h_cov"], rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(res.g_h_g, ex["g_h_g"], rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(res.b_noise, ex["trace_h_cov"] / ex["g_h_g"], rtol=rtol)
    assert res.trace_h_cov_stderr == 0
    assert res.n == N


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


def test_gradient_noise_scale_equals_explicit_per_example_loop_tanh_mlp(backend):
    """Explicit loop of single-example autograd gradients g_i: B_simple = tr(cov_{ddof=1}(g)) / |mean g|^2."""
    m = tiny_mlp(1)
    model = backend.model(m)
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


def test_b_noise_equals_closed_form_logistic_regression():
    """Softmax regression (numpy g_i and H, no autograd), also with the saddle loss_fn: B_noise = tr(H Sigma)/(G^T H G),
    tr(H Sigma), G^T H G, |G|^2, tr(Sigma), B_simple all to 1e-10 (exact mode, N <= exact_below)."""
    lin, x, y = make_logreg(5, n=14)
    for c in (0.0, 0.7):
        gs, H = logreg_closed_form_spectrum(lin, x, y, saddle=c)
        res = utils.gradient_noise_scale(lin, x, y, loss_fn=saddle_loss_fn(c) if c else None)
        _check_noise_exact(res, noise_stats(gs, H), 14)


@pytest.mark.parametrize(
    "wrap,path", [(False, "auto"), (False, "fast"), (False, "general"), (True, "auto"), (True, "general")]
)
def test_b_noise_equals_closed_form_from_dense_H_and_per_example_loop_tanh_mlp(wrap, path):
    """Tanh MLP: B_noise = tr(H Sigma)/(G^T H G) with H the dense autograd Hessian and g_i from a single-example loop
    (Sigma with 1/(N-1)); every field to 1e-10 on every code path."""
    m = tiny_mlp(5)
    model = Wrapped(m) if wrap else m
    x, y = tiny_data(5, n=11)
    ex = noise_stats(per_example_grads(model, x, y), dense_hessian(model, x, y))
    snap = snapshot(model)
    res = utils.gradient_noise_scale(model, x, y, path=path)
    assert_unchanged(model, snap)
    _check_noise_exact(res, ex, 11)


def test_b_noise_with_custom_loss_fn_uses_single_example_losses():
    """loss_fn = label-smoothed CE: g_i = grad of loss_fn(f(x_i), y_i) alone, H of the mean loss_fn; B_noise to 1e-10."""
    lf = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.2)  # noqa: E731
    model, (x, y) = tiny_mlp(6), tiny_data(6, n=9)
    ex = noise_stats(per_example_grads(model, x, y, lf), dense_hessian(model, x, y, lf))
    _check_noise_exact(utils.gradient_noise_scale(model, x, y, loss_fn=lf), ex, 9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_b_noise_probe_mode_within_3_stderr_of_exact(seed):
    """exact_below=0 (probe mode) on N=40: tr(H Sigma) is within 3 reported stderr (> 0) of the dense closed form; the
    deterministic fields |G|^2, tr(Sigma), G^T H G stay exact (1e-8)."""
    model = tiny_mlp(7)
    x, y = tiny_data(7, n=40)
    ex = noise_stats(per_example_grads(model, x, y), dense_hessian(model, x, y))
    res = utils.gradient_noise_scale(model, x, y, exact_below=0, rel_stderr=0.05, max_probes=256, seed=seed)
    assert res.trace_h_cov_stderr > 0
    assert z_score(res.trace_h_cov, res.trace_h_cov_stderr, ex["trace_h_cov"]) <= 3.0, (
        res.trace_h_cov,
        res.trace_h_cov_stderr,
        ex["trace_h_cov"],
    )
    np.testing.assert_allclose(res.grad_norm_sq, ex["grad_norm_sq"], rtol=1e-8)
    np.testing.assert_allclose(res.trace_cov, ex["trace_cov"], rtol=1e-8)
    np.testing.assert_allclose(res.g_h_g, ex["g_h_g"], rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(res.b_noise, res.trace_h_cov / res.g_h_g, rtol=1e-10)


def test_two_batch_estimates_unbiased_for_exact_G2_and_trace_cov_pooled_over_seeds():
    """E|G_B|^2 = |G|^2 + tr(Sigma)(1/B - 1/N) (sampling without replacement, Sigma with 1/(N-1)), so the two-batch
    estimators are unbiased: pooled over 6 seeds x 100 draws (b_small=3, b_big=15, N=30), both are within 3 pooled
    standard errors of the exact values from a per-example loop. (Omitting the finite-population term tr(Sigma)/N would
    shift |G|^2 by ~14 pooled standard errors here, so the test has power against it.)"""
    model = tiny_mlp(8)
    x, y = tiny_data(8, n=30)
    ex = noise_stats(per_example_grads(model, x, y), np.eye(flat(model).numel()))  # H unused here
    g2, tc, g2_se, tc_se = [], [], [], []
    snap = snapshot(model)
    for seed in range(6):
        r = utils.two_batch_noise_scale(model, x, y, b_small=3, b_big=15, batches=100, seed=seed)
        assert r.batches == 100 and r.b_small == 3 and r.b_big == 15
        assert r.grad_norm_sq_stderr > 0 and r.trace_cov_stderr > 0
        np.testing.assert_allclose(r.b_simple, r.trace_cov / r.grad_norm_sq, rtol=1e-10)
        g2.append(r.grad_norm_sq)
        tc.append(r.trace_cov)
        g2_se.append(r.grad_norm_sq_stderr)
        tc_se.append(r.trace_cov_stderr)
    assert_unchanged(model, snap)
    k = len(g2)
    pooled = lambda v, s: (float(np.mean(v)), float(np.sqrt(np.sum(np.square(s)))) / k)  # noqa: E731
    m_g2, s_g2 = pooled(g2, g2_se)
    m_tc, s_tc = pooled(tc, tc_se)
    assert z_score(m_g2, s_g2, ex["grad_norm_sq"]) <= 3.0, (m_g2, s_g2, ex["grad_norm_sq"])
    assert z_score(m_tc, s_tc, ex["trace_cov"]) <= 3.0, (m_tc, s_tc, ex["trace_cov"])


def test_two_batch_stderr_matches_spread_of_independent_seeds():
    """The reported stderr is std over draws / sqrt(batches): across 20 seeds (batches=10 each) the empirical std of the
    seed estimates agrees with the rms reported stderr within [0.6, 1.6] (~2.5-3 sigma for 20 samples)."""
    model = tiny_mlp(9)
    x, y = tiny_data(9, n=40)
    vals, ses = [], []
    for seed in range(20):
        r = utils.two_batch_noise_scale(model, x, y, b_small=3, b_big=15, batches=10, seed=1000 + seed)
        vals.append(r.trace_cov)
        ses.append(r.trace_cov_stderr)
    ratio = np.std(vals, ddof=1) / np.sqrt(np.mean(np.square(ses)))
    assert 0.6 < ratio < 1.6, ratio


def test_two_batch_exact_when_all_examples_have_the_same_gradient():
    """Identical examples (x_i = 1, quadratic loss_fn ignoring targets) => g_i = G for all i, Sigma = 0 and every batch
    gradient equals G: the per-draw estimates are exactly tr(Sigma) = 0 and (b_b|G|^2 - b_s|G|^2)/(b_b - b_s) = |G|^2,
    with zero stderr."""
    Q = sym_with_spectrum_spectrum([2.0, 1.0, 0.5, -0.3], seed=11)
    lin = nn.Linear(1, 4, bias=False).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3], [-0.7], [1.1], [0.2]], dtype=DT))
    Qt = torch.tensor(Q)
    lf = lambda o, t: 0.5 * torch.einsum("ni,ij,nj->n", o, Qt, o).mean()  # noqa: E731
    x, y = torch.ones(30, 1, dtype=DT), torch.zeros(30, dtype=torch.long)
    G = Q @ lin.weight.detach().numpy()[:, 0]
    r = utils.two_batch_noise_scale(lin, x, y, b_small=2, b_big=10, batches=7, seed=0, loss_fn=lf)
    np.testing.assert_allclose(r.grad_norm_sq, G @ G, rtol=1e-10)
    assert abs(r.trace_cov) <= 1e-12 * (G @ G)
    assert r.trace_cov_stderr <= 1e-12 * (G @ G) and r.grad_norm_sq_stderr <= 1e-10 * (G @ G)


def test_noise_temperature_hand_values():
    """T = lr*N/(B(1-m)): 0.1*50000/128 = 39.0625; with m=0.9 it is 390.625; 0.5*10/(5*0.5) = 2; 1*1/1 = 1."""
    assert math.isclose(utils.noise_temperature(0.1, 50000, 128), 39.0625, rel_tol=1e-12)
    assert math.isclose(utils.noise_temperature(0.1, 50000, 128, momentum=0.9), 390.625, rel_tol=1e-12)
    assert math.isclose(utils.noise_temperature(0.5, 10, 5, momentum=0.5), 2.0, rel_tol=1e-12)
    assert math.isclose(utils.noise_temperature(1.0, 1, 1), 1.0, rel_tol=1e-12)


@given(
    lr=st.floats(1e-5, 10.0),
    n=st.integers(1, 10**6),
    b=st.integers(1, 4096),
    m=st.floats(0.0, 0.99),
)
def test_noise_temperature_is_lr_n_over_b_one_minus_m(lr, n, b, m):
    """noise_temperature(lr, n, B, m) == lr*n/(B*(1-m)) for any inputs (relative 1e-12)."""
    assert math.isclose(utils.noise_temperature(lr, n, b, momentum=m), lr * n / (b * (1 - m)), rel_tol=1e-12)



@given(seed=st.integers(0, 10_000), hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3),
       act=st.sampled_from([nn.Tanh, nn.ReLU, nn.GELU]), bias=st.booleans(), n=st.integers(2, 9),
       budget=st.sampled_from([1 << 30, 400]))
def test_fast_and_general_per_example_gradients_agree(seed, hidden, act, bias, n, budget):
    """The closed forms (‖δ_i a_iᵀ‖² = ‖a_i‖²‖δ_i‖², Σ_i u_i δ_i a_iᵀ, δ_iᵀ V a_i) give vmap(grad)'s norms, mean,
    weighted sums and dot products, whole or chunk by chunk under a small budget."""
    g = torch.Generator().manual_seed(seed)
    model = mlp_of([4, *hidden, 3], act, bias)
    x, y = tiny_data(seed % 7, n=n)
    fast = utils.per_example_gradient_rows(model, x, y, path="fast", memory_budget=budget)
    general = utils.per_example_gradient_rows(model, x, y, path="general")
    assert type(fast).__name__ == "MLPPerExample" and type(general).__name__ == "AutogradPerExample"
    for a, b in zip(fast.norms_and_mean(), general.norms_and_mean()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    weights = torch.randn(3, n, generator=g, dtype=torch.float64)
    vectors = torch.randn(2, fast.dim, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fast.weighted_sums(weights), general.weighted_sums(weights), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(fast.dots(vectors), general.dots(vectors), rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- batch sharpness
def _dense_batch_quotient(model, x, y, idx) -> float:
    """g_Bᵀ H_B g_B / ‖g_B‖² from the dense Hessian and the autograd gradient of the batch's mean loss."""
    H = dense_hessian(model, x[idx], y[idx])
    g = grad_at(model, flat(model), x[idx], y[idx]).numpy()
    return float(g @ H @ g / (g @ g))


def test_batch_sharpness_equals_dense_minibatch_formula(backend):
    """Batch sharpness = mean over the drawn batches B of g_Bᵀ H_B g_B / ‖g_B‖², H_B the dense Hessian of the
    batch's mean loss, g_B its gradient; the stderr is the batches' std (ddof 1) over √batches."""
    m = tiny_mlp(2)
    model = backend.model(m)
    x, y = tiny_data(2, n=12)
    snap = snapshot(model)
    res = utils.batch_sharpness(model, x, y, batch_size=5, batches=3, seed=7, path=backend.path)
    assert_unchanged(model, snap)
    assert res.indices.shape == (3, 5) and res.batch_size == 5
    dense = [_dense_batch_quotient(model, x, y, idx) for idx in res.indices]
    np.testing.assert_allclose(res.values, dense, rtol=1e-10)
    np.testing.assert_allclose(res.value, np.mean(dense), rtol=1e-10)
    np.testing.assert_allclose(res.stderr, np.std(dense, ddof=1) / math.sqrt(3), rtol=1e-8)


def test_batch_sharpness_of_the_whole_data_set_is_the_full_batch_rayleigh_quotient():
    """With B = N every batch is the data set, so every quotient is gᵀHg/‖g‖² of the full-batch loss."""
    model = tiny_mlp(3)
    x, y = tiny_data(3, n=9)
    res = utils.batch_sharpness(model, x, y, batch_size=9, batches=2, seed=0)
    full = _dense_batch_quotient(model, x, y, torch.arange(9))
    np.testing.assert_allclose(res.values, [full, full], rtol=1e-10)


@given(seed=st.integers(0, 10_000), batch_size=st.integers(1, 10))
def test_batch_sharpness_quotients_lie_in_the_batch_hessians_spectrum(seed, batch_size):
    """A Rayleigh quotient of H_B lies in [λ_min(H_B), λ_max(H_B)]; batches are drawn without replacement."""
    model = tiny_mlp(seed % 5)
    x, y = tiny_data(seed % 7, n=10)
    res = utils.batch_sharpness(model, x, y, batch_size=batch_size, batches=2, seed=seed)
    for idx, q in zip(res.indices, res.values):
        assert len(set(idx.tolist())) == batch_size
        eigs = np.linalg.eigvalsh(dense_hessian(model, x[idx], y[idx]))
        assert eigs[0] - 1e-9 * max(1.0, abs(eigs[0])) <= q <= eigs[-1] + 1e-9 * max(1.0, abs(eigs[-1]))


@pytest.mark.parametrize("batch_size,batches", [(0, 2), (11, 2), (3, 0)])
def test_batch_sharpness_rejects_impossible_batches(batch_size, batches):
    """A batch larger than the data set, an empty batch, or no batches cannot be measured."""
    x, y = tiny_data(0, n=10)
    with pytest.raises(ValueError, match="batch_size"):
        utils.batch_sharpness(tiny_mlp(0), x, y, batch_size=batch_size, batches=batches)
