"""Gradient descent's stability on a quadratic: the helper against the iteration itself and its spectral radius."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import utils


def gradient_descent_converges(eigenvalues, lr, momentum, steps=4000) -> bool:
    """Run heavy-ball GD on ½θᵀdiag(λ)θ from θ = 1 and see whether it reaches 0."""
    lam = np.asarray(eigenvalues, dtype=np.float64)
    theta, velocity = np.ones_like(lam), np.zeros_like(lam)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run overflows to inf and NaN: not below 1e-3
        for _ in range(steps):
            velocity = momentum * velocity + lam * theta
            theta = theta - lr * velocity
    return bool(np.all(np.abs(theta) < 1e-3))


@given(seed=st.integers(0, 10_000), momentum=st.sampled_from([0.0, 0.5, 0.9]),
       margin=st.sampled_from([-0.05, 0.05]))
def test_gradient_descent_on_a_quadratic_is_stable_exactly_when_lambda_max_is_below_two_over_eta(seed, momentum,
                                                                                                 margin):
    """λ_max 5% below or above 2(1+β)/η: the helper says stable exactly when the iteration converges, and exactly
    when the spectral radius of its 2×2 update matrix [[1 − ηλ, −ηβ], [λ, β]] is below 1."""
    rng = np.random.default_rng(seed)
    lr = float(rng.uniform(0.01, 1.0))
    threshold = utils.stability_threshold(lr, momentum)
    eigs = np.append(rng.uniform(0.05, 0.9, 3) * threshold, (1 + margin) * threshold)
    stable = utils.gradient_descent_is_stable(eigs, lr=lr, momentum=momentum)
    radius = max(np.abs(np.linalg.eigvals(np.array([[1 - lr * lam, -lr * momentum], [lam, momentum]]))).max()
                 for lam in eigs)
    assert stable == (margin < 0) == (radius < 1) == gradient_descent_converges(eigs, lr, momentum)


def test_stability_threshold_is_two_over_eta_and_refuses_bad_steps():
    assert utils.stability_threshold(0.1) == pytest.approx(20.0)
    assert utils.stability_threshold(0.1, 0.9) == pytest.approx(38.0)
    assert not utils.gradient_descent_is_stable([-0.1, 1.0], lr=0.1)  # negative curvature diverges
    assert not utils.gradient_descent_is_stable([20.0], lr=0.1)  # λ = 2/η oscillates forever
    with pytest.raises(ValueError, match="lr > 0"):
        utils.stability_threshold(0.0)
