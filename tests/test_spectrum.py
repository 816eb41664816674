"""The spectrum from exact products: eigenvalues and eigenpairs against numpy.linalg.eigh and an independent
library (curvlinops with ARPACK), certified residuals, Hutchinson and Hutch++ within 3 standard errors, the SLQ
density, per-layer curvature."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import utils

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # curvlinops' dependencies warn about deprecated torch.jit
    from curvlinops import HessianLinearOperator


from helpers import (
    ACTIVATIONS,
    DT,
    REL,
    Wrapped,
    _loss,
    assert_unchanged,
    default_constants,
    dense_hessian,
    dense_hessian_diag,
    dense_hessian_inputs,
    flat,
    logreg_closed_form,
    logreg_closed_form_spectrum,
    logreg_np,
    make_data,
    make_logreg,
    make_mlp,
    make_mlp_inputs,
    make_x,
    make_y,
    param_blocks,
    quadratic_model,
    saddle_loss_fn,
    snapshot,
    sym_with_spectrum,
    sym_with_spectrum_spectrum,
    tiny_data,
    tiny_mlp,
    unflatten,
    z_score,
)
from scipy.sparse.linalg import eigsh

import data
import models
import training


def full_hessian(model, x, y, loss_fn=None) -> np.ndarray:
    """Dense Hessian by plain torch.autograd.functional.hessian (independent of utils' HVP code)."""
    theta = flat(model)
    H = torch.autograd.functional.hessian(
        lambda th: _loss(functional_call(model, unflatten(model, th), (x,)), y, loss_fn), theta
    )
    return H.detach().numpy()


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


LIKE = torch.zeros(1, dtype=DT)


trapezoid = getattr(np, "trapezoid", None) or np.trapz


def matmat_of(A: np.ndarray, counter: list | None = None):
    """Rows-in, rows-out operator for a symmetric numpy matrix; counts the rows it multiplies."""
    At = torch.tensor(A, dtype=DT)

    def mm(V):
        V = torch.as_tensor(V)
        if counter is not None:
            counter[0] += V.reshape(-1, At.shape[0]).shape[0]
        return (V.to(DT) @ At.T).to(V.dtype)

    return mm


def _check_eigenpairs(res, H, k, which, tol, eig_atol=1e-8):
    """Shared oracle: dense eigh of H gives the exact answer; residuals recomputed here."""
    w, U = np.linalg.eigh(H)  # ascending
    normH = max(abs(w[0]), abs(w[-1]))
    idx = list(range(len(w) - 1, len(w) - 1 - k, -1)) if which == "largest" else list(range(k))
    lam_true = w[idx]
    lam = np.asarray(res.eigenvalues, dtype=np.float64)
    V = res.eigenvectors.detach().numpy()
    assert res.which == which
    assert res.eigenvectors.dtype == DT and V.shape == (k, H.shape[0])
    assert len(res.eigenvalues) == k and len(res.residuals) == k
    # ordering: largest first for "largest", most negative first for "smallest"
    assert list(lam) == sorted(lam, reverse=(which == "largest"))
    # eigenvalues equal the dense ones
    np.testing.assert_allclose(lam, lam_true, rtol=0, atol=eig_atol)
    # orthonormal rows
    np.testing.assert_allclose(V @ V.T, np.eye(k), rtol=0, atol=1e-10)
    # reported residuals equal ||H v - lambda v|| computed here, and satisfy the tolerance
    r_mine = np.linalg.norm(V @ H - lam[:, None] * V, axis=1)
    np.testing.assert_allclose(np.asarray(res.residuals), r_mine, rtol=1e-6, atol=1e-12)
    assert res.converged
    for li, ri in zip(lam, r_mine):
        assert ri <= tol * max(abs(li), 1e-8 * normH) * (1 + 1e-6) + 1e-14, (li, ri)
    # eigenvectors: Davis-Kahan, sin(angle to the true eigenvector) <= r / gap, where gap separates lambda_i from the rest
    for j, i in enumerate(idx):
        gap = np.min(np.abs(np.delete(w, i) - w[i]))
        if gap > 1e-6 * normH:
            cos = abs(V[j] @ U[:, i])
            sin = math.sqrt(max(0.0, 1 - cos * cos))
            assert sin <= 2 * r_mine[j] / gap + 1e-7, (j, sin, r_mine[j], gap)
    assert res.iterations >= 1


def _run_values(sd):
    """Per run: sum_j w_j theta_j (= v^T H v for that run's unit start vector)."""
    return (np.asarray(sd.weights) * np.asarray(sd.nodes)).sum(1)


@pytest.fixture(scope="module")
def trained_float64():
    ds = data.load_dataset("mnist", download=False)
    x, y = ds.x_train[:600].double(), ds.y_train[:600]
    model = models.SmallMLP((24, 16), generator=torch.Generator().manual_seed(0)).double()
    training.train(model, x, y, epochs=3, lr=0.1, seed=0)
    return model, x, y


def curvlinops_top_eigenvalue(model, x, y) -> float:
    operator = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)])
    return float(eigsh(operator.to_scipy(), k=1, which="LA", tol=1e-12)[0][0])


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


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigenpairs_equal_dense_eigh_on_tanh_mlp_at_a_saddle(which, backend):
    """Tiny Tanh MLP at random weights (a saddle: lambda_min < 0 verified): the top-3 / bottom-3 eigenpairs equal
    numpy.linalg.eigh of the dense autograd Hessian to 1e-8, residuals are ||Hv - lambda v|| and below tol*|lambda|,
    rows orthonormal, vectors equal dense eigenvectors up to sign (Davis-Kahan)."""
    m = tiny_mlp(0)
    model = backend.model(m)
    x, y = tiny_data(0)
    H = dense_hessian(model, x, y)
    w = np.linalg.eigvalsh(H)
    assert w[0] < -1e-3 and w[-1] > 1e-3  # a genuine saddle
    snap = snapshot(model)
    tol = 1e-10
    res = utils.hessian_eigenpairs(model, x, y, k=3, which=which, tol=tol, seed=0, max_iter=300)
    _check_eigenpairs(res, H, 3, which, tol)
    assert_unchanged(model, snap)


def test_both_ends_of_the_spectrum_from_one_run_equal_dense_eigh_and_cost_less_than_two_runs():
    """hessian_spectrum_ends: the top-3 and the 2 most negative eigenpairs of a tiny Tanh MLP at a saddle equal
    numpy.linalg.eigh of the dense Hessian (same oracle as the separate runs), and one shared Krylov space
    spends fewer products than the two separate runs together."""
    model = tiny_mlp(0)
    x, y = tiny_data(0)
    H = dense_hessian(model, x, y)
    snap = snapshot(model)
    tol = 1e-10
    top, bottom = utils.hessian_spectrum_ends(model, x, y, k=3, k_smallest=2, tol=tol, seed=0)
    _check_eigenpairs(top, H, 3, "largest", tol)
    _check_eigenpairs(bottom, H, 2, "smallest", tol)
    assert top.iterations == bottom.iterations  # one shared count
    separate = (utils.hessian_eigenpairs(model, x, y, k=3, which="largest", tol=tol, seed=0).iterations
                + utils.hessian_eigenpairs(model, x, y, k=2, which="smallest", tol=tol, seed=0).iterations)
    assert top.iterations < separate
    assert_unchanged(model, snap)


@pytest.mark.parametrize("steps, runs", [(4, 3), (12, 2), (60, 1)])
def test_spectrum_gives_dense_eigh_ends_and_exactly_the_slq_density_of_the_same_seed(steps, runs):
    """hessian_spectrum: its top-3 and 2 most negative eigenpairs equal numpy.linalg.eigh of the dense Hessian of a
    tiny Tanh MLP at a saddle (residuals recomputed here), and its density is hessian_spectral_density's with the
    same seed, node for node: a Lanczos run's first m steps do not depend on how long the run goes on, so the first
    run's extension (steps=4, 12: it runs past m to converge the ends) leaves T's leading m×m block as it was;
    with steps=60 > D=43 every run stops at breakdown, and the ends come from the full Krylov space."""
    model = tiny_mlp(0)
    x, y = tiny_data(0)
    H = dense_hessian(model, x, y)
    snap = snapshot(model)
    tol = 1e-10
    spectrum = utils.hessian_spectrum(model, x, y, k=3, k_smallest=2, tol=tol, lanczos_steps=steps, runs=runs, seed=5)
    _check_eigenpairs(spectrum.top, H, 3, "largest", tol)
    _check_eigenpairs(spectrum.bottom, H, 2, "smallest", tol)
    alone = utils.hessian_spectral_density(model, x, y, lanczos_steps=steps, runs=runs, seed=5)
    for name in ("nodes", "weights", "grid", "density"):
        np.testing.assert_array_equal(getattr(spectrum.density, name), getattr(alone, name))
    assert spectrum.density.sigma == alone.sigma
    assert_unchanged(model, snap)


def test_spectrum_ends_cost_less_than_a_run_of_their_own_beside_the_density():
    """The ends ride on the density's first run. Separately, the density takes runs·m products and
    hessian_spectrum_ends its own run; together, (runs − 1)·m plus the first run's length and the 5 residual
    checks, which the ends report: fewer in all when that count is below m plus the separate run's."""
    model = tiny_mlp(0)
    x, y = tiny_data(0)
    tol, steps = 1e-10, 12
    spectrum = utils.hessian_spectrum(model, x, y, k=3, k_smallest=2, tol=tol, lanczos_steps=steps, runs=2, seed=0)
    top, _ = utils.hessian_spectrum_ends(model, x, y, k=3, k_smallest=2, tol=tol, seed=0)
    assert spectrum.top.iterations == spectrum.bottom.iterations
    assert steps + 5 <= spectrum.top.iterations < top.iterations + steps
    np.testing.assert_allclose(spectrum.top.eigenvalues, top.eigenvalues, rtol=0, atol=1e-8)


def test_spectrum_refuses_k_beyond_the_parameters():
    """k and k_smallest must lie in [1, D]: 0 or D + 1 is a ValueError naming the parameter count."""
    model = tiny_mlp(0)
    x, y = tiny_data(0)
    with pytest.raises(ValueError, match="number of parameters"):
        utils.hessian_spectrum(model, x, y, k=0, lanczos_steps=4, runs=1)
    with pytest.raises(ValueError, match="number of parameters"):
        utils.hessian_spectrum(model, x, y, k_smallest=44, lanczos_steps=4, runs=1)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigenpairs_equal_closed_form_hessian_of_logreg_with_saddle_term(which):
    """Softmax regression plus -(c/2) mean z_0^2 (loss_fn): closed-form numpy Hessian with lambda_min < 0 (verified);
    top-2 / bottom-2 eigenpairs match eigh to 1e-8."""
    lin, x, y = make_logreg(3, n=20)
    lf = saddle_loss_fn(1.0)
    _, H = logreg_closed_form_spectrum(lin, x, y, saddle=1.0)
    w = np.linalg.eigvalsh(H)
    assert w[0] < -0.1 and w[-1] > 0.01
    tol = 1e-10
    res = utils.hessian_eigenpairs(lin, x, y, k=2, which=which, tol=tol, seed=1, loss_fn=lf)
    _check_eigenpairs(res, H, 2, which, tol)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigenpairs_are_algebraic_extremes_on_larger_quadratic(which):
    """D=150 quadratic, spectrum {9, 7, 5.5} U [-1, 1] U {-3, -6, -20}: 'largest' returns 9, 7, 5.5 (not -20) and
    'smallest' returns -20, -6, -3, converging well before D Lanczos steps are possible (max_iter=120 < D)."""
    eigs = np.concatenate([[9.0, 7.0, 5.5], np.linspace(-1.0, 1.0, 144), [-3.0, -6.0, -20.0]])
    Q = sym_with_spectrum_spectrum(eigs, seed=4)
    m, x, y, lf = quadratic_model(Q)
    tol = 1e-10
    res = utils.hessian_eigenpairs(m, x, y, k=3, which=which, tol=tol, seed=2, max_iter=120, loss_fn=lf)
    _check_eigenpairs(res, Q, 3, which, tol)
    assert res.iterations <= 120 + 3 + 5  # Lanczos steps (<= max_iter) plus a few explicit residual products


def test_eigenpairs_default_tolerance_converged_flag_matches_definition():
    """With the default tol=1e-6: converged == all(||Hv_i - l_i v_i|| <= tol * max(|l_i|, 1e-8 ||H||)) recomputed here,
    and every Ritz value lies within its residual of an eigenvalue of H (Bauer-Fike for symmetric H)."""
    model, (x, y) = tiny_mlp(2), tiny_data(2)
    H = dense_hessian(model, x, y)
    w = np.linalg.eigvalsh(H)
    normH = np.abs(w).max()
    for which in ("largest", "smallest"):
        res = utils.hessian_eigenpairs(model, x, y, k=4, which=which, seed=3)
        V = res.eigenvectors.numpy()
        lam = np.asarray(res.eigenvalues)
        r = np.linalg.norm(V @ H - lam[:, None] * V, axis=1)
        ok = all(ri <= 1e-6 * max(abs(li), 1e-8 * normH) for li, ri in zip(lam, r))
        assert res.converged == ok
        for li, ri in zip(lam, r):
            assert np.min(np.abs(w - li)) <= ri * (1 + 1e-8) + 1e-12


def test_eigenpairs_count_multiplicity_of_repeated_top_eigenvalue():
    """Quadratic with spectrum {5, 5, 3, 2, linspace(-1, 1, 26)}: the top-3 eigenvalues of H are (5, 5, 3) -- a
    repeated eigenvalue must appear twice, with two orthonormal eigenvectors spanning its eigenspace."""
    eigs = np.concatenate([[5.0, 5.0, 3.0, 2.0], np.linspace(-1.0, 1.0, 26)])
    Q = sym_with_spectrum_spectrum(eigs, seed=5)
    m, x, y, lf = quadratic_model(Q)
    res = utils.hessian_eigenpairs(m, x, y, k=3, which="largest", tol=1e-10, seed=0, loss_fn=lf)
    np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0, 3.0], rtol=0, atol=1e-8)
    V = res.eigenvectors.numpy()
    np.testing.assert_allclose(V @ V.T, np.eye(3), atol=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hessian_trace_within_3_stderr_of_exact_trace_tanh_mlp(method, seed):
    """tr(H) of a tiny Tanh MLP (dense autograd Hessian, far from diagonal so a Rademacher probe is not exact) lies within
    3 reported standard errors of the estimate; converged => stderr <= rel_stderr*|trace|; stderr > 0."""
    model, (x, y) = tiny_mlp(1), tiny_data(1)
    H = dense_hessian(model, x, y)
    off = H - np.diag(np.diag(H))
    assert np.linalg.norm(off) > 0.3 * np.linalg.norm(H)  # precondition: strongly non-diagonal
    snap = snapshot(model)
    res = utils.hessian_trace(model, x, y, method=method, rel_stderr=0.02, max_matvecs=400, seed=seed)
    assert res.method == method
    assert 0 < res.stderr and res.matvecs <= 400
    if res.converged:
        assert res.stderr <= 0.02 * abs(res.trace) * (1 + 1e-12)
    assert z_score(res.trace, res.stderr, np.trace(H)) <= 3.0, (res.trace, res.stderr, np.trace(H))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_hessian_trace_within_3_stderr_with_loss_fn_quadratic(method):
    """L = 1/2 theta^T Q theta (loss_fn) with a dense indefinite Q of trace 7: estimate within 3 stderr of tr(Q)."""
    eigs = np.concatenate([[6.0, 4.0, -3.0], np.linspace(-0.5, 0.5, 37)])
    Q = sym_with_spectrum_spectrum(eigs, seed=6)
    m, x, y, lf = quadratic_model(Q)
    res = utils.hessian_trace(m, x, y, method=method, rel_stderr=0.05, max_matvecs=400, seed=5, loss_fn=lf)
    assert z_score(res.trace, res.stderr, np.trace(Q)) <= 3.0, (res.trace, res.stderr)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimate_within_3_stderr_and_matvecs_counted_on_dense_matrix(method):
    """Synthetic dense SPD-plus-indefinite matrix (D=60): estimate within 3 stderr of np.trace; .matvecs equals the
    number of rows this test's operator actually multiplied; <= max_matvecs; converged => stderr <= rel*|trace|."""
    eigs = np.linspace(-2.0, 5.0, 60)
    A = sym_with_spectrum_spectrum(eigs, seed=7)
    for seed in range(3):
        cnt = [0]
        res = utils.trace_estimate(matmat_of(A, cnt), 60, method=method, rel_stderr=0.05, max_matvecs=600, seed=seed, like=LIKE)
        assert res.method == method
        assert res.matvecs == cnt[0] <= 600
        if res.converged:
            assert res.stderr <= 0.05 * abs(res.trace) * (1 + 1e-12)
        assert z_score(res.trace, res.stderr, np.trace(A)) <= 3.0, (seed, res.trace, res.stderr, np.trace(A))


@given(diag=st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=30), seed=st.integers(0, 1000))
def test_hutchinson_with_rademacher_probes_is_exact_on_diagonal_matrices(diag, seed):
    """z^T D z = sum_i d_i z_i^2 = tr(D) for Rademacher z: on a diagonal matrix Hutchinson is exact with zero stderr."""
    A = np.diag(diag)
    res = utils.trace_estimate(matmat_of(A), len(diag), method="hutchinson", rel_stderr=0.01, max_matvecs=64, seed=seed, like=LIKE)
    scale = max(1.0, float(np.abs(diag).sum()))
    assert abs(res.trace - sum(diag)) <= 1e-12 * scale
    assert res.stderr <= 1e-12 * scale


@given(rank=st.integers(1, 16), seed=st.integers(0, 1000))
def test_hutchpp_is_exact_when_rank_at_most_sketch(rank, seed):
    """If rank(A) <= sketch, span(A S) = range(A), so tr(Q^T A Q) = tr(A) and the deflated remainder is 0:
    Hutch++ returns tr(A) to roundoff with (numerically) zero stderr (D=50, indefinite low-rank A)."""
    rng = np.random.default_rng(seed)
    lam = rng.uniform(-3, 3, rank)
    U, _ = np.linalg.qr(rng.standard_normal((50, rank)))
    A = (U * lam) @ U.T
    res = utils.trace_estimate(matmat_of(A), 50, method="hutch++", rel_stderr=0.01, max_matvecs=200, seed=seed, like=LIKE, sketch=16)
    assert abs(res.trace - lam.sum()) <= 1e-9
    assert res.stderr <= 1e-9


def test_hutchpp_mean_squared_error_below_hutchinson_at_equal_matvecs_decaying_spectrum():
    """D=200, eigenvalues 1/i^2 (fast decay), dense eigenbasis; rel_stderr=0 so both spend max_matvecs=96. Over 20 seeds
    MSE(Hutch++) < MSE(Hutchinson) (theory: Hutchinson var = 2(|A|_F^2 - sum a_ii^2)/m ~ 2e-2, Hutch++ ~ 1e-6), and the
    Hutchinson MSE agrees with that variance within a factor 3."""
    D = 200
    eigs = 1.0 / np.arange(1, D + 1) ** 2
    A = sym_with_spectrum_spectrum(eigs, seed=8)
    tr = eigs.sum()
    err = {"hutchinson": [], "hutch++": []}
    mv = {}
    for method in err:
        for seed in range(20):
            cnt = [0]
            res = utils.trace_estimate(matmat_of(A, cnt), D, method=method, rel_stderr=0.0, max_matvecs=96, seed=seed, like=LIKE)
            assert res.matvecs == cnt[0] and 96 - 16 < res.matvecs <= 96
            mv[method] = res.matvecs
            err[method].append(res.trace - tr)
    mse = {k: float(np.mean(np.square(v))) for k, v in err.items()}
    assert mse["hutch++"] < mse["hutchinson"], mse
    var_h = 2 * (np.sum(A * A) - np.sum(np.diag(A) ** 2)) / mv["hutchinson"]
    assert var_h / 3 < mse["hutchinson"] < 3 * var_h, (mse, var_h)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimate_stderr_matches_spread_over_seeds(method):
    """With rel_stderr=0 and fixed max_matvecs, the empirical std of the estimate over 30 seeds agrees with the mean
    reported stderr (sample-std relative error ~13%, so a [0.6, 1.6] window is ~3 sigma); D=80 dense matrix."""
    D = 80
    A = sym_with_spectrum_spectrum(np.linspace(-1.0, 3.0, D) ** 3, seed=9)
    ests, ses = [], []
    for seed in range(30):
        res = utils.trace_estimate(matmat_of(A), D, method=method, rel_stderr=0.0, max_matvecs=64, seed=100 + seed, like=LIKE)
        ests.append(res.trace)
        ses.append(res.stderr)
    ratio = np.std(ests, ddof=1) / np.sqrt(np.mean(np.square(ses)))
    assert 0.6 < ratio < 1.6, ratio


def test_spectral_density_integrates_to_one_and_its_mean_is_average_quadrature_mean():
    """rho >= 0, integral of rho over the grid = 1, each weight row sums to 1, and the density's mean
    int t rho(t) dt equals the average over runs of sum_j w_j theta_j (Gaussian smoothing preserves the mean)."""
    model, (x, y) = tiny_mlp(0), tiny_data(0)
    snap = snapshot(model)
    sd = utils.hessian_spectral_density(model, x, y, lanczos_steps=12, runs=8, seed=0)
    grid, rho = np.asarray(sd.grid), np.asarray(sd.density)
    W = np.asarray(sd.weights)
    assert W.shape == (8, 12) and np.asarray(sd.nodes).shape == (8, 12)
    assert np.all(rho >= 0) and np.all(W >= -1e-15) and sd.sigma > 0
    np.testing.assert_allclose(trapezoid(rho, grid), 1.0, atol=1e-6)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    span = grid[-1] - grid[0]
    np.testing.assert_allclose(trapezoid(grid * rho, grid), _run_values(sd).mean(), rtol=0, atol=1e-6 * span)
    assert_unchanged(model, snap)


def test_spectral_density_is_gaussian_smoothed_quadrature_with_given_sigma():
    """With sigma given, rho(t) is proportional to (1/runs) sum_r sum_j w_rj N(t; theta_rj, sigma^2) (rebuilt here from
    .nodes/.weights and normalised over the grid), .sigma is the given width, and the grid covers every weighted node."""
    model, (x, y) = tiny_mlp(2), tiny_data(2)
    sd = utils.hessian_spectral_density(model, x, y, lanczos_steps=15, runs=4, seed=3, sigma=0.05, grid_points=1500)
    assert sd.sigma == 0.05
    grid, rho = np.asarray(sd.grid), np.asarray(sd.density)
    nodes, W = np.asarray(sd.nodes), np.asarray(sd.weights)
    assert grid.shape == rho.shape == (1500,)
    used = W > 0
    assert grid[0] <= nodes[used].min() and nodes[used].max() <= grid[-1]
    mine = sum(
        (W[r, :, None] * np.exp(-0.5 * ((grid[None, :] - nodes[r, :, None]) / 0.05) ** 2)).sum(0) for r in range(4)
    ) / (4 * 0.05 * math.sqrt(2 * math.pi))
    mine = mine / trapezoid(mine, grid)
    np.testing.assert_allclose(rho, mine, rtol=1e-6, atol=1e-9 * mine.max())


@pytest.mark.parametrize("steps", [6, 60])
def test_spectral_density_mean_within_3_stderr_of_trace_over_D(steps):
    """Gauss quadrature with m >= 1 nodes integrates t exactly, so sum_j w_j theta_j = v^T H v, unbiased for tr(H)/D.
    Over 30 runs the average is within 3 standard errors (std over runs / sqrt(runs)) of tr(H)/D (dense Hessian)."""
    model, (x, y) = tiny_mlp(1), tiny_data(1)
    H = dense_hessian(model, x, y)
    D = H.shape[0]
    sd = utils.hessian_spectral_density(model, x, y, lanczos_steps=steps, runs=30, seed=4)
    vals = _run_values(sd)
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    assert se > 0
    assert z_score(vals.mean(), se, np.trace(H) / D) <= 3.0, (vals.mean(), se, np.trace(H) / D)
    grid, rho = np.asarray(sd.grid), np.asarray(sd.density)
    np.testing.assert_allclose(trapezoid(grid * rho, grid), vals.mean(), rtol=0, atol=1e-6 * (grid[-1] - grid[0]))


def test_spectral_density_nodes_are_exact_eigenvalues_when_steps_at_least_D():
    """lanczos_steps >= D (D=43): every node carrying weight is an eigenvalue of the dense Hessian (to 1e-8), each
    weight row sums to 1, every distinct eigenvalue of H carries weight (generic random start), and
    sum_j w_j theta_j^2 = v^T H^2 v lies in [lambda_min^2, lambda_max^2]."""
    model, (x, y) = tiny_mlp(0), tiny_data(0)
    H = dense_hessian(model, x, y)
    w = np.linalg.eigvalsh(H)
    D = H.shape[0]
    sd = utils.hessian_spectral_density(model, x, y, lanczos_steps=D + 5, runs=3, seed=1)
    nodes, W = np.asarray(sd.nodes), np.asarray(sd.weights)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    # distinct eigenvalues of H (the softmax/last-layer invariances give a multiple zero eigenvalue)
    distinct = [w[0]]
    for lam in w[1:]:
        if lam - distinct[-1] > 1e-7:
            distinct.append(lam)
    distinct = np.array(distinct)
    for r in range(nodes.shape[0]):
        used = W[r] > 1e-14
        dist = np.min(np.abs(nodes[r][used][:, None] - w[None, :]), axis=1)
        assert dist.max() <= 1e-8, dist.max()
        # every distinct eigenvalue has a node within 1e-8 carrying weight
        d2 = np.min(np.abs(distinct[:, None] - nodes[r][used][None, :]), axis=1)
        assert d2.max() <= 1e-8, d2.max()
        m2 = float((W[r] * nodes[r] ** 2).sum())
        assert 0 <= m2 <= max(w[0] ** 2, w[-1] ** 2) * (1 + 1e-10)


def test_spectral_density_nodes_exact_on_known_quadratic():
    """L = 1/2 theta^T Q theta with spectrum {-2, -1, 0.5, 1, 3, 4} on a dense basis: with lanczos_steps=10 >= D=6 the
    weighted nodes are exactly those six eigenvalues (each run), weights sum to 1, and sum_j w_j theta_j over 200 runs is
    within 3 stderr of tr(Q)/6 = 5.5/6."""
    eigs = np.array([-2.0, -1.0, 0.5, 1.0, 3.0, 4.0])
    Q = sym_with_spectrum_spectrum(eigs, seed=10)
    m, x, y, lf = quadratic_model(Q)
    sd = utils.hessian_spectral_density(m, x, y, lanczos_steps=10, runs=200, seed=2, loss_fn=lf)
    nodes, W = np.asarray(sd.nodes), np.asarray(sd.weights)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    for r in range(nodes.shape[0]):
        got = np.sort(nodes[r][W[r] > 1e-12])
        np.testing.assert_allclose(got, eigs, rtol=0, atol=1e-8)
    vals = _run_values(sd)
    se = vals.std(ddof=1) / math.sqrt(len(vals))
    assert z_score(vals.mean(), se, eigs.sum() / 6) <= 3.0


def test_layer_curvature_equals_dense_diagonal_blocks_exact_and_stochastic_traces():
    """Tanh MLP 6-12-4 (blocks of sizes 72, 12, 48, 4): each entry's top_eigenvalue = max eigvalsh(H_bb) of the dense
    Hessian's diagonal block (1e-6, tol=1e-10), residual = ||H_bb v - l v|| for some unit v (bounded by tol*|l|),
    trace = tr(H_bb) exactly with stderr 0 for size <= 64, and within 3 stderr (stderr > 0) for the 72-entry block."""
    model = tiny_mlp(3, widths=(6, 12, 4))
    x, y = tiny_data(3, n=15, d=6, classes=4)
    H = dense_hessian(model, x, y)
    blocks = param_blocks(model)
    assert [b[2] for b in blocks] == [72, 12, 48, 4]
    snap = snapshot(model)
    res = utils.layer_curvature(model, x, y, seed=0, tol=1e-10, max_iter=300, exact_below=64)
    assert_unchanged(model, snap)
    assert len(res) == len(blocks)
    for entry, (name, off, n) in zip(res, blocks):
        Hb = H[off : off + n, off : off + n]
        wb = np.linalg.eigvalsh(Hb)
        assert entry.name == name and entry.size == n
        np.testing.assert_allclose(entry.top_eigenvalue, wb[-1], rtol=0, atol=1e-6 * max(1.0, abs(wb[-1])))
        assert entry.converged
        assert entry.residual <= 1e-10 * max(abs(entry.top_eigenvalue), 1e-8 * np.abs(wb).max()) * 1.01 + 1e-14
        if n <= 64:
            assert entry.trace_stderr == 0
            np.testing.assert_allclose(entry.trace, np.trace(Hb), rtol=1e-10, atol=1e-12)
        else:
            off_b = Hb - np.diag(np.diag(Hb))
            assert np.linalg.norm(off_b) > 0.1 * np.linalg.norm(Hb)  # a probe is not exact here
            assert entry.trace_stderr > 0
            assert z_score(entry.trace, entry.trace_stderr, np.trace(Hb)) <= 3.0, (name, entry.trace, entry.trace_stderr, np.trace(Hb))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_curvature_all_stochastic_traces_within_3_stderr(seed):
    """exact_below=0 forces Hutchinson on every block (sizes 20, 5, 15, 3 of a Tanh 4-5-3 MLP, all non-diagonal):
    each block trace is within 3 reported stderr of tr(H_bb), with stderr > 0; names follow named_parameters of a
    Wrapped model."""
    model = Wrapped(tiny_mlp(4))
    x, y = tiny_data(4, n=10)
    H = dense_hessian(model, x, y)
    res = utils.layer_curvature(model, x, y, seed=seed, exact_below=0, rel_stderr=0.02, max_probes=200)
    for entry, (name, off, n) in zip(res, param_blocks(model)):
        Hb = H[off : off + n, off : off + n]
        assert entry.name == name and entry.size == n
        assert np.linalg.norm(Hb - np.diag(np.diag(Hb))) > 1e-3
        assert entry.trace_stderr > 0
        assert z_score(entry.trace, entry.trace_stderr, np.trace(Hb)) <= 3.0, (name, entry.trace, entry.trace_stderr, np.trace(Hb))


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_hessian_trace_exact_and_auto_equal_dense_trace(act):
    """tr(H) = sum_i H_ii: method="exact" returns the dense trace (1e-10 relative), with stderr 0, no matvecs,
    method "exact", converged True; method="auto" returns the same exact result on a piecewise-linear MLP."""
    model = make_mlp([4, 6, 5, 3], act, seed=12)
    x, y = make_data(14, 4, 3, seed=12)
    tr = float(torch.trace(dense_hessian_diag(model, x, y)))
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
    tr = float(torch.trace(dense_hessian_diag(model, x, y, loss_fn=sq_loss)))
    for budget in (2_000, 1 << 30):
        r = utils.hessian_trace(model, x, y, method="exact", loss_fn=sq_loss, memory_budget=budget)
        assert abs(r.trace - tr) <= REL * abs(tr)
        assert r.stderr == 0 and r.matvecs == 0 and r.method == "exact"


@pytest.mark.parametrize("kind", ["tanh", "wrapped"])
def test_hessian_trace_exact_refuses_and_auto_falls_back_to_hutchpp(kind):
    """Where the exact diagonal does not apply (Tanh hidden activation; non-Sequential wrapper), method="exact" raises
    ValueError, and method="auto" with a budget below D = 83 returns a Hutch++ estimate (method "hutch++",
    stderr > 0, matvecs > 0) within 4 standard errors of the dense trace (rel_stderr=0.05, max_matvecs=80, seed 0);
    with a budget of at least D, the exact trace from the D unit vectors."""
    base = make_mlp([4, 6, 5, 3], "relu", seed=14)
    if kind == "tanh":
        base[1], base[3] = nn.Tanh(), nn.Tanh()
        model = base
    else:
        model = Wrapped(base)
    x, y = make_data(14, 4, 3, seed=14)
    tr = float(torch.trace(dense_hessian_diag(model, x, y)))
    with pytest.raises(ValueError):
        utils.hessian_trace(model, x, y, method="exact")
    assert utils.flat_parameters(model).numel() == 83
    r = utils.hessian_trace(model, x, y, method="auto", rel_stderr=0.05, max_matvecs=80, seed=0)
    assert r.method == "hutch++"
    assert r.stderr > 0 and 0 < r.matvecs <= 80
    assert abs(r.trace - tr) <= 4 * r.stderr
    unit = utils.hessian_trace(model, x, y, method="auto", max_matvecs=83)
    assert unit.method == "exact" and unit.stderr == 0 and unit.matvecs == 83
    assert unit.trace == pytest.approx(tr, rel=1e-10)


@pytest.mark.parametrize("exact_below", [0, 64])
@pytest.mark.parametrize("act", ["relu", "leaky", "identity"])
def test_layer_curvature_block_traces_are_exact(act, exact_below):
    """tr(H_bb) = sum over the block's diagonal entries: for a piecewise-linear MLP, every parameter block's .trace
    equals the trace of the dense Hessian's diagonal block (1e-10 relative) with .trace_stderr == 0, even with
    exact_below=0 (so it is not the small-block dense path); names and sizes follow named_parameters()."""
    model = make_mlp([4, 7, 6, 3], act, seed=15)
    x, y = make_data(16, 4, 3, seed=15)
    H = dense_hessian_diag(model, x, y)
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
    H = dense_hessian_diag(model, x, y, loss_fn=sq_loss)
    res = utils.layer_curvature(model, x, y, exact_below=0, loss_fn=sq_loss, memory_budget=2_000)
    blocks = param_blocks(model)
    assert len(res) == len(blocks)
    for r, (name, i, k) in zip(res, blocks):
        t = float(torch.trace(H[i : i + k, i : i + k]))
        scale = max(abs(t), float(torch.diagonal(H)[i : i + k].abs().max()))
        assert r.name == name and abs(r.trace - t) <= REL * scale
        assert r.trace_stderr == 0


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
def test_top_hessian_eigenvalue_equals_dense_eigvalsh(widths, act, n, flatten, backend):
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
    model = make_mlp_inputs(widths, act, seed=81 + n, flatten=flatten)
    H = dense_hessian_inputs(model, x, y)
    evals = torch.linalg.eigvalsh(H)
    lam = float(evals[-1])
    D = H.shape[0]
    r = utils.top_hessian_eigenvalue(backend.model(model), x, y, tol=1e-11, max_iter=D)
    assert abs(r.eigenvalue - lam) <= 1e-9 * abs(lam), (r.eigenvalue, lam, r.converged)
    v = r.eigenvector.to(DT)
    v = v / v.norm()
    assert float((H @ v - r.eigenvalue * v).norm()) <= 1e-8 * abs(lam)


def test_lanczos_residual_is_the_true_residual_of_the_returned_pair():
    model = tiny_mlp(2)
    x, y = tiny_data(2)
    result = utils.top_hessian_eigenvalue(model, x, y, tol=1e-3)
    v = result.eigenvector
    assert v.norm().item() == pytest.approx(1.0, abs=1e-12)
    true = (utils.hessian_vector_product(model, x, y, v) - result.eigenvalue * v).norm().item()
    assert true == pytest.approx(result.residual, rel=1e-6, abs=1e-12)
    assert result.converged and result.residual <= 1e-3 * abs(result.eigenvalue)


@pytest.mark.parametrize("steps", [3, 12, 20])  # a copy (buffer of 17 rows), a view of 17, a view of the grown 34
def test_lanczos_basis_is_orthonormal_tridiagonalises_and_holds_at_most_twice_its_rows(steps):
    """The basis a run returns is Q (m, D) with QQᵀ = I and QAQᵀ = T, its alphas and betas, whether kept as a view
    of the working buffer or copied out of it; and the memory behind it is at most 2m rows."""
    from landscape.spectrum import _lanczos_runs

    a = torch.from_numpy(sym_with_spectrum(np.linspace(-1.0, 3.0, 40), seed=1))
    start = torch.randn(1, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    run = _lanczos_runs(lambda vs: vs @ a, start, max_steps=steps)[0]
    q, m = run.basis, len(run.alphas)
    t = np.diag(run.alphas) + np.diag(run.betas[: m - 1], 1) + np.diag(run.betas[: m - 1], -1)
    assert m == steps
    torch.testing.assert_close(q @ q.T, torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ a @ q.T, torch.from_numpy(t), rtol=0, atol=1e-12)
    assert q.untyped_storage().nbytes() <= 2 * m * 40 * q.element_size()


def test_unconverged_solver_says_so():
    model = tiny_mlp(2, widths=(4, 8, 8, 3))
    x, y = tiny_data(2)
    result = utils.top_hessian_eigenvalue(model, x, y, tol=1e-14, max_iter=2)
    assert not result.converged and result.iterations == 2


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_agrees_with_curvlinops_and_arpack(trained_float64, method):
    model, x, y = trained_float64
    oracle = curvlinops_top_eigenvalue(model, x, y)
    ours = utils.top_hessian_eigenvalue(model, x, y, tol=1e-10 if method == "lanczos" else 1e-12, max_iter=500,
                                        method=method)
    assert ours.converged
    assert ours.eigenvalue == pytest.approx(oracle, rel=1e-8 if method == "lanczos" else 1e-6)


def test_default_settings_stay_within_the_residual_bound_of_the_oracle(trained_float64):
    """At default tol the error |λ − λ_oracle| is below the certified bound ‖Hv − λv‖ ≤ tol·|λ|."""
    model, x, y = trained_float64
    oracle = curvlinops_top_eigenvalue(model, x, y)
    ours = utils.top_hessian_eigenvalue(model, x, y)
    assert abs(ours.eigenvalue - oracle) <= ours.residual + 1e-12
    assert abs(ours.eigenvalue - oracle) <= 1e-4 * oracle

