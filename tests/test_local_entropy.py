"""Chaudhari et al. 2017's local entropy: the Laplace value against log-determinants, the Langevin estimate
of a quadratic against its closed form within its standard error, the gradient term against a linear solve,
and the whole measure on a model whose loss is exactly quadratic (linear regression)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_unchanged, snapshot, sym_with_spectrum_spectrum, tiny_data, tiny_mlp, z_score
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import utils
from landscape.local_entropy import gauss_legendre_unit


def closed_form(h, gamma, g=None, temperature=1.0):
    """log of ∫exp(−[gᵀu + ½uᵀHu + (γ/2)‖u‖²]/T)du over ∫exp(−(γ/2)‖u‖²/T)du: Gaussian integrals by hand."""
    k = h.shape[0]
    sign, logdet = np.linalg.slogdet(np.eye(k) + h / gamma)
    assert sign > 0
    extra = 0.0 if g is None else g @ np.linalg.solve(h + gamma * np.eye(k), g) / (2 * temperature)
    return -0.5 * logdet + extra


@given(seed=st.integers(0, 10_000), k=st.integers(1, 6), gamma=st.floats(0.05, 20.0))
def test_laplace_equals_the_log_determinant_ratio(seed, k, gamma):
    eigs = np.random.default_rng(seed).uniform(-0.9 * gamma, 5.0, k)
    h = sym_with_spectrum_spectrum(eigs, seed)
    assert utils.laplace_local_entropy(eigs, scopes=[gamma])[0] == pytest.approx(closed_form(h, gamma), rel=1e-10,
                                                                                  abs=1e-12)


def test_laplace_diverges_past_minus_the_scope_and_its_graded_quadrature_converges():
    """The coupling nodes graded for λ_max make the quadrature exact for the top eigenvalue and fast elsewhere:
    4 nodes within 1e-4 for λ/γ from 0.01 to 100, where plain Gauss-Legendre is 17% off."""
    assert utils.laplace_local_entropy([-1.0, 2.0], scopes=[1.0])[0] == math.inf
    eigs, exact = [0.01, 0.3, 5.0, 100.0], utils.laplace_local_entropy([0.01, 0.3, 5.0, 100.0], scopes=[1.0])[0]
    errors = [abs(utils.laplace_local_entropy(eigs, scopes=[1.0], nodes=n)[0] - exact) for n in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] and errors[1] < 1e-4 * abs(exact) and errors[2] < 1e-8 * abs(exact)
    plain = utils.laplace_local_entropy([100.0], scopes=[1.0], nodes=4, lambda_max=0.0)[0]
    assert abs(plain - utils.laplace_local_entropy([100.0], scopes=[1.0])[0]) > 0.1
    points, weights = gauss_legendre_unit(3)
    assert weights.sum() == pytest.approx(1.0) and float(weights @ points**5) == pytest.approx(1 / 6)


def quadratic_loss(h, g=None):
    h_t = torch.as_tensor(h)
    g_t = torch.zeros(h.shape[0], dtype=torch.float64) if g is None else torch.as_tensor(g)

    def loss_and_gradient(thetas):  # L(θ′) = gᵀθ′ + ½θ′ᵀHθ′, θ = 0
        return thetas @ g_t + 0.5 * ((thetas @ h_t) * thetas).sum(dim=1), thetas @ h_t + g_t

    return loss_and_gradient


@pytest.mark.parametrize("with_gradient", [False, True])
def test_langevin_local_entropy_of_a_quadratic_matches_its_closed_form_within_three_stderr(with_gradient):
    """A non-diagonal H with λ/γ from 0.1 to 4, T = 0.5: the thermodynamic integral over Leimkuhler-Matthews chains
    (exact stationary law for a Gaussian) is within 3 stderr of −½ log det(I + H/γ) (+ gᵀ(H+γI)⁻¹g/(2T)); the
    quadrature's own error is far below the stderr, and the stderr below 2% of the value, so a biased chain fails."""
    h = sym_with_spectrum_spectrum([0.1, 0.5, 1.0, 2.0, 4.0], 21)
    g = np.array([0.3, -0.2, 0.1, 0.0, 0.4]) if with_gradient else None
    gamma, temperature = 1.0, 0.5
    est = utils.langevin_local_entropy(quadratic_loss(h, g), torch.zeros(5, dtype=torch.float64), scope=gamma,
                                       temperature=temperature, step=0.8 / (4.0 + gamma), chains=32, nodes=8,
                                       burn_in=50, samples=300, lambda_max=4.0,
                                       generator=torch.Generator().manual_seed(0))
    truth = closed_form(h, gamma, g, temperature)
    quadrature = utils.laplace_local_entropy(np.linalg.eigvalsh(h), scopes=[gamma], nodes=8)[0]
    assert abs(quadrature - closed_form(h, gamma)) < 0.05 * est.stderr
    assert z_score(est.value, est.stderr, truth) <= 3, (est.value, est.stderr, truth)
    assert est.stderr < 0.02 * abs(truth)


def test_gradient_term_equals_the_linear_solve():
    h = sym_with_spectrum_spectrum([-0.3, 0.5, 1.0, 2.0, 4.0], 22)
    g = np.array([0.3, -0.2, 0.1, 0.5, 0.4])
    h_t = torch.as_tensor(h)
    term = utils.gradient_local_entropy(lambda vs: vs @ h_t, torch.as_tensor(g), scopes=[1.0, 3.0], temperature=0.25,
                                        lanczos_steps=5)
    for value, gamma in zip(term, (1.0, 3.0)):
        assert value == pytest.approx(g @ np.linalg.solve(h + gamma * np.eye(5), g) / 0.5, rel=1e-10)
    assert utils.gradient_local_entropy(lambda vs: vs @ h_t, torch.as_tensor(g), scopes=[0.2], temperature=1.0,
                                        lanczos_steps=5)[0] == math.inf


def test_laplace_from_an_slq_density_is_within_three_stderr_of_the_exact_spectrum():
    """Softmax regression (a convex loss, so no cancellation between signs) with 15 parameters."""
    model = tiny_mlp(3, widths=(4, 3))
    x, y = tiny_data(3, n=30, d=4, classes=3)
    exact = torch.linalg.eigvalsh(utils.exact_hessian(model, x, y)).numpy()
    gamma = 0.5 * exact.max()
    dim = exact.size
    density = utils.hessian_spectral_density(model, x, y, lanczos_steps=dim, runs=30, seed=4)
    value, stderr = utils.laplace_local_entropy_from_density(density, dim, scopes=[gamma])
    truth = utils.laplace_local_entropy(exact, scopes=[gamma])[0]
    assert z_score(value[0], stderr[0], truth) <= 3 and stderr[0] < 0.1 * abs(truth)


def test_local_entropy_of_linear_regression_matches_the_quadratic_model_and_leaves_the_model_alone():
    """Linear regression under MSE is exactly quadratic in θ, so the Langevin ΔF must equal the Laplace value from
    the exact eigenvalues plus the gradient term (θ is not the minimum) within 3 stderr, at every scope."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.3 * torch.randn(50, 1, generator=g,
                                                                                           dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 1)).double()
    snap = snapshot(model)
    eigs = torch.linalg.eigvalsh(utils.exact_hessian(model, x, y, loss_fn=F.mse_loss)).numpy()
    r = utils.local_entropy(model, x, y, scopes=[0.5, 5.0], temperature=0.05, chains=24, nodes=4, burn_in=20,
                            samples=150, eigenvalues=eigs, loss_fn=F.mse_loss, seed=6)
    assert_unchanged(model, snap)
    for i in range(2):
        quadratic = r.laplace[i] + r.gradient_term[i]
        assert z_score(r.langevin[i], r.langevin_stderr[i], quadratic) <= 3, (r.langevin, r.langevin_stderr, quadratic)
        assert r.laplace_stderr[i] == 0 and r.gradient_term[i] > 0
    assert r.lambda_max == pytest.approx(eigs.max(), rel=1e-3)


def test_local_entropy_refuses_a_partial_spectrum_and_an_unstable_step():
    model = tiny_mlp(1, widths=(3, 4, 2))
    x, y = tiny_data(1, n=20, d=3, classes=2)
    with pytest.raises(ValueError, match="all 26 eigenvalues"):
        utils.local_entropy(model, x, y, eigenvalues=[1.0, 2.0], lambda_max=1.0)
    with pytest.raises(ValueError, match="step_fraction"):
        utils.local_entropy(model, x, y, step_fraction=2.5)
