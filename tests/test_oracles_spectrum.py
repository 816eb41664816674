"""Independent oracle tests for the spectrum / trace / noise-scale part of utils.py.

Written without reading utils.py, main.py or plotting.py. Every expected value comes from
the mathematics alone:

* dense Hessians built here, either with plain torch.autograd.functional.hessian of the
  flat-parameter loss, or in closed form with numpy (multinomial logistic regression:
  H = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i, J_i = d logits_i / d theta, flat order
  weight (C x d, row-major) then bias), or by construction (L = 1/2 theta^T Q theta);
* numpy.linalg.eigh / eigvalsh;
* explicit loops of single-example gradients;
* synthetic symmetric matrices with a prescribed spectrum.

Stochastic estimators are checked within 3 (estimated) standard errors of the exact value,
on inputs where a Rademacher probe is NOT exact (non-diagonal matrices), with fixed seeds.
Everything runs in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import utils
from conftest import _loss, flat, param_blocks, grad_at, logreg_jacobian, make_logreg, quadratic_model, softmax_np, tiny_data, tiny_mlp, unflatten, Wrapped

DT = torch.float64
LIKE = torch.zeros(1, dtype=DT)
trapezoid = getattr(np, "trapezoid", None) or np.trapz


# ======================================================================================
# Independent helpers (no use of utils)
# ======================================================================================


def dense_hessian(model, x, y, loss_fn=None) -> np.ndarray:
    """Dense Hessian of the mean loss by plain torch.autograd.functional.hessian, symmetrised."""
    theta = flat(model)
    H = torch.autograd.functional.hessian(
        lambda th: _loss(functional_call(model, unflatten(model, th), (x,)), y, loss_fn), theta
    )
    H = H.detach().numpy()
    assert np.allclose(H, H.T, atol=1e-10)
    return 0.5 * (H + H.T)


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


def rand_vec(D, seed):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=DT)


def sym_with_spectrum(eigs, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return (U * np.asarray(eigs, dtype=np.float64)) @ U.T


def matmat_of(A: np.ndarray, counter: list | None = None):
    """Rows-in, rows-out operator for a symmetric numpy matrix; counts the rows it multiplies."""
    At = torch.tensor(A, dtype=DT)

    def mm(V):
        V = torch.as_tensor(V)
        if counter is not None:
            counter[0] += V.reshape(-1, At.shape[0]).shape[0]
        return (V.to(DT) @ At.T).to(V.dtype)

    return mm


def z_score(est, stderr, truth):
    return abs(est - truth) / stderr if stderr > 0 else (0.0 if est == truth else math.inf)


# ---- multinomial logistic regression in numpy (no autograd) ----------------------------


def logreg_closed_form(lin: nn.Linear, x, y, saddle: float = 0.0):
    """Per-example gradients (N x D) and Hessian (D x D) of

        L = mean_i [ CE(z_i, y_i) - (saddle/2) z_{i0}^2 ],   z_i = W x_i + b,

    g_i = J_i^T (p_i - e_{y_i} - saddle * z_{i0} e_0),
    H   = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T - saddle * e_0 e_0^T) J_i.
    """
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    X, Y = x.numpy(), y.numpy()
    N = X.shape[0]
    C = W.shape[0]
    Z = X @ W.T + b
    P = softmax_np(Z)
    E = np.eye(C)[Y]
    e0 = np.eye(C)[0]
    gs, H = [], 0.0
    for i in range(N):
        J = logreg_jacobian(X[i], C)
        gs.append(J.T @ (P[i] - E[i] - saddle * Z[i, 0] * e0))
        H = H + J.T @ (np.diag(P[i]) - np.outer(P[i], P[i]) - saddle * np.outer(e0, e0)) @ J
    return np.array(gs), H / N


def saddle_loss_fn(c: float):
    def lf(o, t):
        return F.cross_entropy(o, t) - 0.5 * c * (o[:, 0] ** 2).mean()

    return lf


# ---- exactly quadratic model (conftest.quadratic_model): L(θ) = ½θᵀQθ, H = Q


# ---- "never changes the model" --------------------------------------------------------


def snapshot(model):
    return [(p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]


def assert_unchanged(model, snap):
    for p, (v, rg, g) in zip(model.parameters(), snap):
        assert torch.equal(p.detach(), v), "parameters changed"
        assert p.requires_grad == rg
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)


# ======================================================================================
# exact_hessian / hessian_operator
# ======================================================================================


def test_exact_hessian_equals_closed_form_logistic_regression_hessian():
    """Softmax regression: exact_hessian == (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i (numpy, no autograd), also with
    the saddle term -(c/2) mean z_0^2 added through loss_fn (which subtracts c * mean [x,1][x,1]^T on the class-0 block)."""
    lin, x, y = make_logreg(0)
    snap = snapshot(lin)
    for c in (0.0, 1.5):
        _, H = logreg_closed_form(lin, x, y, saddle=c)
        got = utils.exact_hessian(lin, x, y, loss_fn=saddle_loss_fn(c) if c else None)
        assert got.dtype == DT and got.shape == H.shape
        torch.testing.assert_close(got, torch.tensor(H), rtol=1e-10, atol=1e-12)
    assert_unchanged(lin, snap)


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), wrap=st.booleans())
def test_exact_hessian_is_symmetric_and_equals_autograd_hessian(seed, n, wrap):
    """For any tiny Tanh MLP and data: exact_hessian is symmetric and equals torch.autograd.functional.hessian of the
    flat-parameter mean loss (to 1e-10)."""
    m = tiny_mlp(seed % 50)
    model = Wrapped(m) if wrap else m
    x, y = tiny_data(seed, n=n)
    H = utils.exact_hessian(model, x, y)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(H, torch.tensor(dense_hessian(model, x, y)), rtol=1e-10, atol=1e-10)


@settings(max_examples=12)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 6), wrap=st.booleans())
def test_hessian_operator_matmat_rows_equal_single_products_and_dense_H(seed, b, wrap):
    """op.matmat(V)[i] == op(V[i]) == H V[i] for every row; op.dim == D; op.matvecs grows by 1 per op(v) and by b per
    matmat of b rows."""
    m = tiny_mlp(seed % 7)
    model = Wrapped(m) if wrap else m
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


def test_hessian_operator_with_loss_fn_is_known_quadratic_form():
    """L = 1/2 theta^T Q theta through loss_fn: op(v) = Q v exactly, for any v."""
    Q = sym_with_spectrum([3.0, 1.0, -0.5, -4.0, 0.25, 2.0], seed=1)
    m, x, y, lf = quadratic_model(Q)
    op = utils.hessian_operator(m, x, y, loss_fn=lf)
    V = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(op.matmat(V), V @ torch.tensor(Q), rtol=1e-12, atol=1e-12)


# ======================================================================================
# hessian_eigenpairs
# ======================================================================================


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


@pytest.mark.parametrize("which", ["largest", "smallest"])
@pytest.mark.parametrize("wrap", [False, True], ids=["plain_mlp", "wrapped_mlp"])
def test_eigenpairs_equal_dense_eigh_on_tanh_mlp_at_a_saddle(which, wrap):
    """Tiny Tanh MLP at random weights (a saddle: lambda_min < 0 verified): the top-3 / bottom-3 eigenpairs equal
    numpy.linalg.eigh of the dense autograd Hessian to 1e-8, residuals are ||Hv - lambda v|| and below tol*|lambda|,
    rows orthonormal, vectors equal dense eigenvectors up to sign (Davis-Kahan)."""
    m = tiny_mlp(0)
    model = Wrapped(m) if wrap else m
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
    _, H = logreg_closed_form(lin, x, y, saddle=1.0)
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
    Q = sym_with_spectrum(eigs, seed=4)
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
    Q = sym_with_spectrum(eigs, seed=5)
    m, x, y, lf = quadratic_model(Q)
    res = utils.hessian_eigenpairs(m, x, y, k=3, which="largest", tol=1e-10, seed=0, loss_fn=lf)
    np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0, 3.0], rtol=0, atol=1e-8)
    V = res.eigenvectors.numpy()
    np.testing.assert_allclose(V @ V.T, np.eye(3), atol=1e-10)


# ======================================================================================
# trace_estimate / hessian_trace
# ======================================================================================


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
    Q = sym_with_spectrum(eigs, seed=6)
    m, x, y, lf = quadratic_model(Q)
    res = utils.hessian_trace(m, x, y, method=method, rel_stderr=0.05, max_matvecs=400, seed=5, loss_fn=lf)
    assert z_score(res.trace, res.stderr, np.trace(Q)) <= 3.0, (res.trace, res.stderr)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimate_within_3_stderr_and_matvecs_counted_on_dense_matrix(method):
    """Synthetic dense SPD-plus-indefinite matrix (D=60): estimate within 3 stderr of np.trace; .matvecs equals the
    number of rows this test's operator actually multiplied; <= max_matvecs; converged => stderr <= rel*|trace|."""
    eigs = np.linspace(-2.0, 5.0, 60)
    A = sym_with_spectrum(eigs, seed=7)
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
    A = sym_with_spectrum(eigs, seed=8)
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
    A = sym_with_spectrum(np.linspace(-1.0, 3.0, D) ** 3, seed=9)
    ests, ses = [], []
    for seed in range(30):
        res = utils.trace_estimate(matmat_of(A), D, method=method, rel_stderr=0.0, max_matvecs=64, seed=100 + seed, like=LIKE)
        ests.append(res.trace)
        ses.append(res.stderr)
    ratio = np.std(ests, ddof=1) / np.sqrt(np.mean(np.square(ses)))
    assert 0.6 < ratio < 1.6, ratio


# ======================================================================================
# hessian_spectral_density (stochastic Lanczos quadrature)
# ======================================================================================


def _run_values(sd):
    """Per run: sum_j w_j theta_j (= v^T H v for that run's unit start vector)."""
    return (np.asarray(sd.weights) * np.asarray(sd.nodes)).sum(1)


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
    Q = sym_with_spectrum(eigs, seed=10)
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


# ======================================================================================
# layer_curvature
# ======================================================================================


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


# ======================================================================================
# gradient_noise_scale (B_simple, B_noise)
# ======================================================================================


def _check_noise_exact(res, ex, N, rtol=1e-10):
    np.testing.assert_allclose(res.grad_norm_sq, ex["grad_norm_sq"], rtol=rtol)
    np.testing.assert_allclose(res.trace_cov, ex["trace_cov"], rtol=rtol)
    np.testing.assert_allclose(res.b_simple, ex["trace_cov"] / ex["grad_norm_sq"], rtol=rtol)
    np.testing.assert_allclose(res.trace_h_cov, ex["trace_h_cov"], rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(res.g_h_g, ex["g_h_g"], rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(res.b_noise, ex["trace_h_cov"] / ex["g_h_g"], rtol=rtol)
    assert res.trace_h_cov_stderr == 0
    assert res.n == N


def test_b_noise_equals_closed_form_logistic_regression():
    """Softmax regression (numpy g_i and H, no autograd), also with the saddle loss_fn: B_noise = tr(H Sigma)/(G^T H G),
    tr(H Sigma), G^T H G, |G|^2, tr(Sigma), B_simple all to 1e-10 (exact mode, N <= exact_below)."""
    lin, x, y = make_logreg(5, n=14)
    for c in (0.0, 0.7):
        gs, H = logreg_closed_form(lin, x, y, saddle=c)
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


# ======================================================================================
# two_batch_noise_scale
# ======================================================================================


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
    Q = sym_with_spectrum([2.0, 1.0, 0.5, -0.3], seed=11)
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


# ======================================================================================
# noise_temperature
# ======================================================================================


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
