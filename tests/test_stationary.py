"""Mandt et al. 2017's stationary distribution: the Lyapunov predictions against an independent series and the
eigenbasis closed form, the batch-means error against a hand computation, and SGD on a quadratic with injected
Gaussian noise of known covariance measured against the discrete prediction within its sampling error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import assert_unchanged, snapshot, sym_with_spectrum_spectrum, tiny_data, tiny_mlp
from hypothesis import given
from hypothesis import strategies as st

import utils
from landscape.stationary import (batch_means_variance, continuous_stationary_covariance, minibatch_noise_covariance,
                                  projected_sgd, sgd_stationary_covariance)


def lyapunov_series(h, noise, lr, momentum, terms=20000):
    """Σ_t A^t Q (A^t)ᵀ summed term by term (no scipy): the stationary covariance of z ← Az + bξ."""
    k, eye = h.shape[0], np.eye(h.shape[0])
    a = np.block([[eye - lr * h, -lr * momentum * eye], [h, momentum * eye]])
    b = np.vstack([-lr * eye, eye])
    term = b @ noise @ b.T
    total = np.zeros_like(term)
    for _ in range(terms):
        total += term
        term = a @ term @ a.T
        if np.abs(term).max() < 1e-16 * np.abs(total).max():
            break
    return total[:k, :k]


def random_covariance(k, seed):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((k, k))
    return m @ m.T / k + 0.1 * np.eye(k)


@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), momentum=st.sampled_from([0.0, 0.5, 0.9]))
def test_discrete_prediction_equals_the_summed_series_for_sgd_and_heavy_ball(seed, k, momentum):
    rng = np.random.default_rng(seed)
    eigs = rng.uniform(0.2, 3.0, k)
    h, noise = sym_with_spectrum_spectrum(eigs, seed), random_covariance(k, seed + 1)
    lr = 0.5 / eigs.max()
    sigma = sgd_stationary_covariance(h, noise, lr=lr, momentum=momentum)
    np.testing.assert_allclose(sigma, lyapunov_series(h, noise, lr, momentum), rtol=1e-8, atol=1e-12)


def test_discrete_prediction_in_the_eigenbasis_is_eta_c_over_lambda_two_minus_eta_lambda():
    """H = diag(λ), C diagonal: σ_i² = η·C_ii/(λ_i(2 − ηλ_i)) (the noise already per step, C/B)."""
    lam, c, lr = np.array([0.5, 2.0, 3.5]), np.array([1.0, 0.3, 2.0]), 0.5
    sigma = sgd_stationary_covariance(np.diag(lam), np.diag(c), lr=lr)
    np.testing.assert_allclose(np.diag(sigma), lr * c / (lam * (2 - lr * lam)), rtol=1e-12)
    np.testing.assert_allclose(sigma - np.diag(np.diag(sigma)), 0, atol=1e-15)


def test_continuous_prediction_solves_h_sigma_plus_sigma_h_and_is_the_small_step_limit():
    h, noise = sym_with_spectrum_spectrum([0.3, 1.0, 2.5], 4), random_covariance(3, 5)
    for momentum in (0.0, 0.9):
        cont = continuous_stationary_covariance(h, noise, lr=0.1, momentum=momentum)
        np.testing.assert_allclose(h @ cont + cont @ h, 0.1 / (1 - momentum) * noise, rtol=1e-10, atol=1e-14)
        # Σ/η tends to the continuous Σ/η as η → 0, the gap shrinking in proportion to η
        gaps = [np.abs(sgd_stationary_covariance(h, noise, lr=lr, momentum=momentum) / lr
                       - continuous_stationary_covariance(h, noise, lr=lr, momentum=momentum) / lr).max()
                for lr in (1e-2, 1e-3)]
        assert gaps[1] < 0.2 * gaps[0]


def test_unstable_step_has_no_stationary_distribution():
    with pytest.raises(ValueError, match="unstable"):
        sgd_stationary_covariance(np.diag([1.0, 4.0]), np.eye(2), lr=0.6)  # ηλ = 2.4 > 2
    with pytest.raises(ValueError, match="unstable"):
        sgd_stationary_covariance(np.diag([-0.1, 1.0]), np.eye(2), lr=0.1)  # negative curvature
    sgd_stationary_covariance(np.diag([1.0, 4.0]), np.eye(2), lr=0.6, momentum=0.5)  # 2.4 < 2(1 + m) = 3


def test_minibatch_noise_is_one_over_b_minus_one_over_n_times_c():
    """Cov of a without-replacement batch mean, against enumerating every batch of 2 from 5 scalars."""
    g = np.array([0.3, -1.2, 2.0, 0.7, -0.4])
    c = np.var(g, ddof=1)
    means = [(g[i] + g[j]) / 2 for i in range(5) for j in range(i + 1, 5)]
    predicted = minibatch_noise_covariance(np.array([[c]]), batch_size=2, n=5)[0, 0]
    assert predicted == pytest.approx(np.var(means), rel=1e-12)


def test_batch_means_variance_against_a_hand_computation():
    samples = np.array([[1.0], [3.0], [2.0], [6.0], [4.0], [2.0]])
    variance, stderr = batch_means_variance(samples, batches=3)
    squares = (samples[:, 0] - 3.0) ** 2  # mean 3: 4, 0, 1, 9, 1, 1
    blocks = np.array([2.0, 5.0, 1.0])
    assert variance[0] == pytest.approx(squares.mean())
    assert stderr[0] == pytest.approx(blocks.std(ddof=1) / math.sqrt(3))


def quadratic_with_noise(h, noise, seed):
    """g(θ) = Hθ + ξ, ξ ~ N(0, noise), drawn from a seeded generator."""
    h_t = torch.as_tensor(h)
    chol = torch.as_tensor(np.linalg.cholesky(noise))
    generator = torch.Generator().manual_seed(seed)
    return lambda theta: h_t @ theta + chol @ torch.randn(h.shape[0], generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_measured_covariance_of_noisy_sgd_on_a_quadratic_matches_the_discrete_lyapunov_solution(momentum):
    """SGD on ½θᵀHθ with gradient noise of known covariance (non-diagonal H and C) at ηλ_max = 1.5(1+m): the
    measured variance along each of three orthonormal directions is the prediction within 3 stderr; the
    continuous small-η prediction, off by a factor of about 2/(2 − ηλ) there, is rejected along the sharpest."""
    k = 4
    h, noise = sym_with_spectrum_spectrum([0.2, 0.7, 1.5, 3.0], 11), random_covariance(k, 12)
    lr = 1.5 * (1 + momentum) / 3.0
    basis = torch.as_tensor(np.linalg.qr(np.random.default_rng(3).standard_normal((k, 3)))[0].T)
    run = projected_sgd(quadratic_with_noise(h, noise, 0), torch.zeros(k, dtype=torch.float64), basis, lr=lr,
                        momentum=momentum, steps=60_000)
    measured, stderr = batch_means_variance(run.projections[2000:], batches=40)
    u = basis.numpy()
    predicted = np.diag(u @ sgd_stationary_covariance(h, noise, lr=lr, momentum=momentum) @ u.T)
    assert np.all(np.abs(measured - predicted) <= 3 * stderr), (measured, predicted, stderr)
    assert np.all(stderr < 0.05 * predicted)
    sharpest = np.linalg.eigh(h)[1][:, -1]
    rerun = projected_sgd(quadratic_with_noise(h, noise, 1), torch.zeros(k, dtype=torch.float64),
                          torch.as_tensor(sharpest[None]), lr=lr, momentum=momentum, steps=60_000)
    var, err = batch_means_variance(rerun.projections[2000:], batches=40)
    cont = sharpest @ continuous_stationary_covariance(h, noise, lr=lr, momentum=momentum) @ sharpest
    disc = sharpest @ sgd_stationary_covariance(h, noise, lr=lr, momentum=momentum) @ sharpest
    assert abs(var[0] - disc) <= 3 * err[0] < abs(var[0] - cont)


def test_stationary_distribution_predicts_from_the_exact_hessian_and_per_example_gradients():
    """Without a burn-in the prediction is made at the model's θ: along the exact top eigenvectors, H_U = diag(λ)
    and C_U = VᵀCV with C the per-example gradients' covariance (float64, torch.func); the model is untouched."""
    model = tiny_mlp(7, widths=(3, 4, 2))
    x, y = tiny_data(7, n=40, d=3, classes=2)
    snap = snapshot(model)
    r = utils.stationary_distribution(model, x, y, lr=0.05, batch_size=8, momentum=0.5, steps=200, burn_in=0,
                                      top_k=2, random_directions=0, batches=10, eigen_tol=1e-10, seed=1)
    assert_unchanged(model, snap)
    lam, vecs = torch.linalg.eigh(utils.exact_hessian(model, x, y))
    v = vecs[:, -2:].flip(1).T.numpy()
    g = utils.per_example_gradients(model, x, y).numpy()
    c_u = np.cov(g @ v.T, rowvar=False)
    expected = np.diag(sgd_stationary_covariance(np.diag(lam[-2:].flip(0).numpy()),
                                                 minibatch_noise_covariance(c_u, batch_size=8, n=40),
                                                 lr=0.05, momentum=0.5))
    np.testing.assert_allclose(r.curvature, lam[-2:].flip(0).numpy(), rtol=1e-8)
    np.testing.assert_allclose(r.predicted, expected, rtol=1e-6)
    np.testing.assert_allclose(r.ratio, np.array(r.measured) / expected, rtol=1e-6)
    assert r.labels == ["eigen 1", "eigen 2"] and len(r.measured_stderr) == 2 and r.stable


def test_stationary_distribution_labels_controls_and_reports_the_drift():
    model = tiny_mlp(8, widths=(3, 4, 2))
    x, y = tiny_data(8, n=40, d=3, classes=2)
    r = utils.stationary_distribution(model, x, y, lr=0.05, batch_size=8, steps=100, burn_in=20, top_k=2,
                                      random_directions=2, batches=10, seed=2)
    assert r.labels == ["eigen 1", "eigen 2", "random 1", "random 2"]
    assert r.curvature[0] >= r.curvature[1] and all(math.isfinite(v) for v in r.measured)
    assert r.loss_start > 0 and r.norm_end > 0 and r.steps == 100 and r.burn_in == 20
    with pytest.raises(ValueError, match="batch_size"):
        utils.stationary_distribution(model, x, y, lr=0.05, batch_size=41)
