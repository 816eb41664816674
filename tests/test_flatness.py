"""Flatness: filter normalisation and random directions, average-case flatness on quadratics, worst-case
sharpness against closed forms, PAC-Bayes σ against the closed-form expected error, and the rescaling
invariances (Dinh et al. 2017)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    DUMMY_X,
    DUMMY_Y,
    REL,
    ThetaModel,
    TinyCNN,
    _loss,
    acc_at,
    assert_filter_normalized,
    assert_same_params,
    assert_unchanged_conn,
    default_constants,
    flat,
    forward_at,
    linears,
    logreg_closed_form,
    loss_at,
    make_mlp_inputs,
    make_x,
    make_y,
    param_rows,
    quad_loss,
    rand_vec,
    relu_mlp,
    snapshot_conn,
    sym_with_spectrum,
    tiny_data,
    tiny_mlp,
    unflatten,
)
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import norm
from torch import nn
from torch.func import functional_call

import utils
from models import SmallMLP


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


def my_rescale(model, alpha):
    out = copy.deepcopy(model)
    l0, l1 = linears(out)[:2]
    with torch.no_grad():
        l0.weight.mul_(alpha)
        l0.bias.mul_(alpha)
        l1.weight.div_(alpha)
    return out


def full_hessian_conn(model, x, y, loss_fn=None) -> np.ndarray:
    theta = flat(model)
    H = torch.autograd.functional.hessian(
        lambda th: _loss(functional_call(model, unflatten(model, th), (x,)), y, loss_fn), theta
    )
    return H.detach().numpy()


class MatBiasModel(nn.Module):
    """Parameters W (r x k, a filter-normalised tensor) and b (r, 1-D); output row = [W.ravel(), b]."""

    def __init__(self, W, b):
        super().__init__()
        self.W = nn.Parameter(torch.as_tensor(W, dtype=DT).clone())
        self.b = nn.Parameter(torch.as_tensor(b, dtype=DT).clone())

    def forward(self, x):
        v = torch.cat([self.W.reshape(-1), self.b])
        return v.unsqueeze(0).expand(x.shape[0], -1)


def _avg_increase_on_sphere(model, x, y, rho, adaptive, K=200, seed=99):
    th = flat(model)
    base = loss_at(model, th, x, y)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(K):
        z = torch.randn(th.numel(), generator=g, dtype=DT)
        z = rho * z / z.norm()
        e = th.abs() * z if adaptive else z
        out.append(loss_at(model, th + e, x, y) - base)
    return float(np.mean(out)), float(np.max(out))


def _binary_problem(n=400, d=10, seed=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    Wt = torch.randn(2, d, generator=g, dtype=DT)
    lin = nn.Linear(d, 2).to(DT)
    with torch.no_grad():
        lin.weight.copy_(Wt + 0.3 * torch.randn(2, d, generator=g, dtype=DT))
        lin.bias.copy_(0.2 * torch.randn(2, generator=g, dtype=DT))
    y = (X @ Wt.T).argmax(1)
    return lin, X, y


def _expected_error(lin, X, y, sigma, magnitude_aware):
    """Binary linear classifier, Gaussian noise on W and b: the logit difference is m(x) + N(0, s(x)^2) with
    s(x)^2 = sigma^2 (sum_j (a_1j^2 + a_0j^2) x_j^2 + a_1b^2 + a_0b^2), a = 1 (absolute) or |w| + 1e-3."""
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    Xn, yn = X.numpy(), y.numpy()
    m = Xn @ (W[1] - W[0]) + b[1] - b[0]
    A = np.abs(W) + 1e-3 if magnitude_aware else np.ones_like(W)
    Ab = np.abs(b) + 1e-3 if magnitude_aware else np.ones_like(b)
    s = sigma * np.sqrt((Xn**2) @ (A[0] ** 2 + A[1] ** 2) + Ab[0] ** 2 + Ab[1] ** 2)
    p_flip = norm.cdf(-np.abs(m) / s)
    correct = (m > 0) == (yn == 1)
    return float(np.mean(np.where(correct, p_flip, 1 - p_flip)))


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


@pytest.mark.parametrize("alpha", [0.25, 1.0, 3.0])
def test_rescaled_copy_preserves_outputs_and_scales_the_first_two_layers(alpha):
    """rescaled_copy: W1, b1 times alpha, W2 / alpha, rest unchanged; same outputs to 1e-12 (also on SmallMLP)."""
    model = relu_mlp(2, (4, 6, 5, 3))
    x, _ = tiny_data(2, n=30, d=4)
    snap = snapshot_conn(model)
    rc = utils.rescaled_copy(model, alpha)
    assert_unchanged_conn([model], snap)
    torch.testing.assert_close(rc(x), model(x), rtol=1e-12, atol=1e-12)
    assert_same_params(rc, my_rescale(model, alpha), rtol=1e-15, atol=0)
    sm = SmallMLP((6, 5), in_features=4, num_classes=3, generator=torch.Generator().manual_seed(0)).to(DT)
    torch.testing.assert_close(utils.rescaled_copy(sm, alpha)(x), sm(x), rtol=1e-12, atol=1e-12)


@given(alpha=st.floats(0.01, 100.0))
def test_rescaled_copy_random_alpha_preserves_outputs_property(alpha):
    """Hypothesis: for any alpha > 0, the rescaled copy computes the same outputs (rtol 1e-12, atol 1e-12)."""
    model = relu_mlp(4, (3, 5, 4, 2))
    x, _ = tiny_data(4, n=15, d=3)
    torch.testing.assert_close(utils.rescaled_copy(model, alpha)(x), model(x), rtol=1e-12, atol=1e-12)


def test_rescaled_copy_rejects_nonpositive_alpha_and_non_relu_activation():
    """alpha <= 0 is not a symmetry (ValueError); Tanh between the first two Linear layers is not
    positively homogeneous (ValueError)."""
    model = relu_mlp(0)
    for bad in (0.0, -1.0, -0.5):
        with pytest.raises(ValueError):
            utils.rescaled_copy(model, bad)
    with pytest.raises(ValueError):
        utils.rescaled_copy(tiny_mlp(0, activation=nn.Tanh), 2.0)
    with pytest.raises(ValueError):
        utils.rescaled_copy(tiny_mlp(0, activation=nn.Sigmoid), 2.0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_average_case_flatness_is_invariant_under_rescaling_same_seed(adaptive):
    """Filter-normalised directions scale row-wise with theta (W1 rows x alpha, W2 rows / alpha, biases zero), and
    adaptive directions g * |theta| scale entry-wise, so theta + sigma d is the rescaling of the original
    perturbed point: with the same seed every increase is identical up to float64 rounding (rtol 1e-10;
    the observed difference is reported by the assertion message if it fails)."""
    model = relu_mlp(5, (4, 6, 5, 3))
    x, y = tiny_data(5, n=30)
    sig = [0.05, 0.2, 0.5]
    r1 = utils.perturbation_flatness(model, x, y, sig, samples=12, seed=4, adaptive=adaptive)
    for alpha in (0.2, 5.0):
        r2 = utils.perturbation_flatness(utils.rescaled_copy(model, alpha), x, y, sig, samples=12, seed=4, adaptive=adaptive)
        i1, i2 = np.asarray(r1.increases), np.asarray(r2.increases)
        assert i1.shape == (12, 3)
        np.testing.assert_allclose(i2, i1, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(r2.mean_increase, r1.mean_increase, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(r2.base_loss, r1.base_loss, rtol=1e-12)
        assert bool(r2.adaptive) == adaptive
    assert np.ptp(np.asarray(r1.increases)[:, -1]) > 0  # genuinely random directions
    # alpha = 2: scaling by a power of two is exact in floating point, so the increases are bitwise identical
    # (for alpha = 0.2 or 5 they differ by a few ulp, ~4e-15, observed when this test was written)
    r2 = utils.perturbation_flatness(utils.rescaled_copy(model, 2.0), x, y, sig, samples=12, seed=4, adaptive=adaptive)
    assert np.array_equal(np.asarray(r2.increases), np.asarray(r1.increases))


def test_top_hessian_eigenvalue_and_absolute_worst_case_sharpness_change_under_rescaling():
    """Rescaling keeps the function but not the geometry: the dense Hessian's top eigenvalue and the absolute
    worst-case sharpness differ between alpha = 1 and alpha = 4 (by more than 5 %), while the loss is the same."""
    model = relu_mlp(6, (4, 6, 3))
    x, y = tiny_data(6, n=30)
    rc = utils.rescaled_copy(model, 4.0)
    assert abs(loss_at(rc, flat(rc), x, y) - loss_at(model, flat(model), x, y)) < 1e-12
    lam1 = np.linalg.eigvalsh(full_hessian_conn(model, x, y))[-1]
    lam4 = np.linalg.eigvalsh(full_hessian_conn(rc, x, y))[-1]
    assert abs(lam4 - lam1) > 0.05 * abs(lam1), (lam1, lam4)
    s1 = utils.worst_case_sharpness(model, x, y, rho=0.3).sharpness
    s4 = utils.worst_case_sharpness(rc, x, y, rho=0.3).sharpness
    assert abs(s4 - s1) > 0.05 * abs(s1), (s1, s4)


def test_filter_normalised_flatness_on_quadratic_centred_at_theta_is_half_sigma_sq_norm_W_sq():
    """L(theta') = 1/2 ||theta' - theta0||^2 at theta0: a filter-normalised d has ||d||^2 = ||W||_F^2 (every row rescaled
    to theta's row norm, bias zeroed), so every increase equals 1/2 sigma^2 ||W||_F^2 exactly (rtol 1e-12),
    the std is 0 and base_loss = 0."""
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    m = MatBiasModel(W, b)
    lf = quad_loss(np.eye(15), flat(m).numpy())
    sig = [0.1, 0.5, 2.0]
    res = utils.perturbation_flatness(m, DUMMY_X, DUMMY_Y, sig, samples=9, seed=1, loss_fn=lf)
    expect = np.array([0.5 * s**2 * float((W**2).sum()) for s in sig])
    np.testing.assert_allclose(np.asarray(res.increases), np.tile(expect, (9, 1)), rtol=1e-12)
    np.testing.assert_allclose(res.mean_increase, expect, rtol=1e-12)
    np.testing.assert_allclose(res.std_increase, 0.0, atol=1e-12)
    assert res.base_loss == 0.0


def test_adaptive_flatness_on_quadratic_centred_at_theta_has_expected_mean():
    """Same quadratic, adaptive: increase = 1/2 sigma^2 sum_i g_i^2 theta_i^2 (biases included), so every increase is
    >= 0 and the mean over 400 samples is 1/2 sigma^2 ||theta||^2 within 5 Monte-Carlo standard errors
    (Var = 2 sum theta^4 (sigma^2/2)^2 per sample)."""
    g = torch.Generator().manual_seed(2)
    W, b = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    m = MatBiasModel(W, b)
    th = flat(m)
    lf = quad_loss(np.eye(15), th.numpy())
    sig, S = 0.3, 400
    res = utils.perturbation_flatness(m, DUMMY_X, DUMMY_Y, [sig], samples=S, seed=0, adaptive=True, loss_fn=lf)
    inc = np.asarray(res.increases)[:, 0]
    assert np.all(inc >= 0)
    mean = 0.5 * sig**2 * float((th**2).sum())
    se = 0.5 * sig**2 * math.sqrt(2 * float((th**4).sum()) / S)
    assert abs(res.mean_increase[0] - mean) <= 5 * se, (res.mean_increase[0], mean, se)


@pytest.mark.parametrize("adaptive,rho", [(False, 0.1), (False, 0.5), (True, 0.05), (True, 0.3)])
def test_worst_case_sharpness_exceeds_average_case_and_stays_in_the_ball(adaptive, rho):
    """The worst case found is >= the average increase over 200 random directions on the same sphere (computed here);
    its perturbation satisfies ||e|| <= rho (absolute) or ||e/|theta| || <= rho (adaptive) up to 1e-9 relative;
    sharpness = L(theta + e) - L(theta) re-evaluated here (1e-10), equals the last entry of the non-decreasing
    .increases, and rho/adaptive are echoed."""
    model = tiny_mlp(7, (4, 6, 3))
    x, y = tiny_data(7, n=20)
    th = flat(model)
    snap = snapshot_conn(model)
    res = utils.worst_case_sharpness(model, x, y, rho=rho, adaptive=adaptive, steps=20, seed=0, starts=3)
    assert_unchanged_conn([model], snap)
    e = torch.as_tensor(res.perturbation, dtype=DT).reshape(-1)
    assert e.numel() == th.numel()
    nrm = float((e / th.abs()).norm()) if adaptive else float(e.norm())
    assert nrm <= rho * (1 + 1e-9), (nrm, rho)
    base = loss_at(model, th, x, y)
    assert res.sharpness == pytest.approx(loss_at(model, th + e, x, y) - base, rel=1e-10, abs=1e-13)
    inc = np.asarray(res.increases)
    assert len(inc) == 20
    assert np.all(np.diff(inc) >= -1e-15)
    assert res.sharpness == pytest.approx(inc[-1], rel=1e-12, abs=1e-15)
    avg, mx = _avg_increase_on_sphere(model, x, y, rho, adaptive)
    assert res.sharpness >= avg
    assert res.sharpness > 0
    assert res.rho == rho and bool(res.adaptive) == adaptive


@pytest.mark.parametrize("rho", [1e-2, 0.3])
def test_worst_case_sharpness_on_quadratic_equals_half_rho_sq_lambda_max(rho):
    """L = 1/2 (theta - c)^T H (theta - c) at theta = c, H PSD with spectrum (4, 1.5, 1, 0.5, 0.2):
    max_{||e|| <= rho} L(c + e) - L(c) = 1/2 rho^2 lambda_max exactly (no Taylor error: the loss is quadratic).
    The result is a lower bound, so it is <= 1/2 rho^2 lambda_max (1 + 1e-9), and the ascent must reach it
    to 1e-4 relative (eigen-gap 1.5/4)."""
    H = sym_with_spectrum([4.0, 1.5, 1.0, 0.5, 0.2], seed=1)
    c = np.array([0.7, -1.2, 0.4, 2.0, -0.9])
    m = ThetaModel(c)
    res = utils.worst_case_sharpness(m, DUMMY_X, DUMMY_Y, rho=rho, loss_fn=quad_loss(H, c))
    target = 0.5 * rho**2 * 4.0
    assert res.sharpness <= target * (1 + 1e-9)
    assert res.sharpness == pytest.approx(target, rel=1e-4)
    e = np.asarray(torch.as_tensor(res.perturbation).reshape(-1))
    top = np.linalg.eigh(H)[1][:, -1]
    assert abs(abs(e @ top) / np.linalg.norm(e)) == pytest.approx(1.0, abs=1e-3)  # along the top eigenvector


@pytest.mark.parametrize("rho", [1e-2, 0.3])
def test_adaptive_worst_case_sharpness_on_quadratic_equals_half_rho_sq_lambda_max_of_DHD(rho):
    """Adaptive: e = D z with D = diag|theta|, ||z|| <= rho, so the maximum of 1/2 e^T H e is 1/2 rho^2 lambda_max(D H D).
    At theta = c with all entries nonzero (quadratic centred away from 0): result <= that (1 + 1e-9) and >= it (1 - 1e-4);
    the constraint ||e/|theta| || <= rho holds to 1e-9."""
    H = sym_with_spectrum([3.0, 1.2, 0.8, 0.4, 0.1], seed=2)
    c = np.array([1.0, -2.0, 0.5, 3.0, -1.5])
    D = np.diag(np.abs(c))
    lam = np.linalg.eigvalsh(D @ H @ D)
    assert lam[-2] / lam[-1] < 0.8
    m = ThetaModel(c)
    res = utils.worst_case_sharpness(m, DUMMY_X, DUMMY_Y, rho=rho, adaptive=True, loss_fn=quad_loss(H, c))
    target = 0.5 * rho**2 * lam[-1]
    assert res.sharpness <= target * (1 + 1e-9)
    assert res.sharpness == pytest.approx(target, rel=1e-4)
    e = np.asarray(torch.as_tensor(res.perturbation).reshape(-1))
    assert np.linalg.norm(e / np.abs(c)) <= rho * (1 + 1e-9)
    # the absolute version sees a different matrix: 1/2 rho^2 lambda_max(H)
    res_abs = utils.worst_case_sharpness(m, DUMMY_X, DUMMY_Y, rho=rho, loss_fn=quad_loss(H, c))
    assert res_abs.sharpness == pytest.approx(0.5 * rho**2 * 3.0, rel=1e-4)


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_sigma_is_the_crossing_of_the_closed_form_expected_error(magnitude_aware):
    """Binary linear classifier: E[error](sigma) has a closed form (above). With 40 draws the returned sigma's true
    expected increase must be within 0.04 of the 0.1 target (a simulation of the estimator gives std ~0.008);
    .error_increase <= target, flatness = 1/sigma^2 (1e-12), base_error = 1 - accuracy computed here, sigma inside
    [sigma_min, sigma_max]; the model is unchanged."""
    lin, X, y = _binary_problem()
    base = 1 - acc_at(lin, flat(lin), X, y)
    snap = snapshot_conn(lin)
    res = utils.pac_bayes_flatness(lin, X, y, magnitude_aware=magnitude_aware, max_error_increase=0.1, samples=40, seed=0)
    assert_unchanged_conn([lin], snap)
    assert res.base_error == pytest.approx(base, abs=1e-15)
    assert 1e-4 <= res.sigma <= 2.0
    assert res.sigma < 2.0 * 0.99  # not clamped: the crossing is inside the range
    assert res.flatness == pytest.approx(1 / res.sigma**2, rel=1e-12)
    assert res.error_increase <= 0.1 + 1e-12
    assert bool(res.magnitude_aware) == magnitude_aware
    inc = _expected_error(lin, X, y, res.sigma, magnitude_aware) - base
    assert abs(inc - 0.1) <= 0.04, (res.sigma, inc)
    assert _expected_error(lin, X, y, 1e-9, magnitude_aware) == pytest.approx(base, abs=1e-12)  # sanity of the oracle


@pytest.mark.parametrize("rounds", [3, 12])
def test_pac_bayes_bisection_brackets_the_crossing_to_its_stated_precision(rounds):
    """The search is a bisection in log sigma on one fixed error curve (the same draws for every sigma): after r
    rounds the returned sigma keeps the increase within the target and sigma * q, q = (sigma_max/sigma_min)^(2^-r),
    does not. Read through the public contract, with the same seed and draws: a search whose sigma_min is
    sigma * q finds even its smallest sigma too noisy (sigma 0)."""
    lin, X, y = _binary_problem()
    kwargs = dict(max_error_increase=0.1, samples=10, seed=1)
    res = utils.pac_bayes_flatness(lin, X, y, rounds=rounds, sigma_min=1e-4, sigma_max=2.0, **kwargs)
    q = (2.0 / 1e-4) ** (2.0**-rounds)
    assert 1e-4 < res.sigma < 2.0 and res.error_increase <= 0.1
    above = utils.pac_bayes_flatness(lin, X, y, rounds=1, sigma_min=res.sigma * q * (1 + 1e-9), sigma_max=4.0, **kwargs)
    assert above.sigma == 0.0


def test_pac_bayes_sigma_scales_inversely_with_shrunk_logits():
    """Dividing a linear classifier's weights and bias by k keeps its predictions, but absolute noise sigma on
    W/k is noise k*sigma on W (argmax of (W/k + sigma E)x = argmax of (W + k sigma E)x), so with the same draws
    the error curve is e(k sigma) and sigma' = sigma/k up to the search precision (2 % allowed). The shrunk
    (sharper) model has the smaller sigma. (Scaling logits UP gives a LARGER sigma for absolute noise.)"""
    lin, X, y = _binary_problem()
    r1 = utils.pac_bayes_flatness(lin, X, y, samples=10, seed=3)
    for k in (4.0, 0.5):
        sm = copy.deepcopy(lin)
        with torch.no_grad():
            sm.weight.div_(k)
            sm.bias.div_(k)
        rk = utils.pac_bayes_flatness(sm, X, y, samples=10, seed=3)
        assert rk.base_error == pytest.approx(r1.base_error, abs=1e-15)
        assert rk.sigma * k == pytest.approx(r1.sigma, rel=0.02), (k, rk.sigma, r1.sigma)
        assert (rk.sigma < r1.sigma) == (k > 1)


@pytest.mark.parametrize("budget", [2_000, 1 << 30])
@pytest.mark.parametrize("act", ["relu", "relu_tanh"])
def test_perturbation_flatness_equals_direct_loss_increases(act, budget, backend):
    """increases[k, j] == L(theta + sigma_j d_k) - L(theta) and base_loss == L(theta), each L by a direct
    functional_call, where d_k are utils.random_directions(model, Generator().manual_seed(seed), samples) (filter-
    normalised, zero bias blocks); 10 samples, a 64-unit first layer, 4 Linear layers, constant-column inputs.
    Tolerance 1e-10 relative to L(theta) (an increase is a difference of two losses)."""
    d = 22
    model = make_mlp_inputs([d, 64, 12, 8, 4], act, seed=161)
    x = make_x(45, d, default_constants(d), seed=161)
    y = make_y(45, 4, seed=161)
    sigmas = [0.0, 0.01, 0.1, 0.5, 1.0]
    S, seed = 10, 7
    res = utils.perturbation_flatness(backend.model(model), x, y, sigmas, samples=S, seed=seed, memory_budget=budget)
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

