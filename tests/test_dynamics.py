"""Gradient descent's stability on a quadratic (the helper against the iteration itself, its spectral radius and
training.train on an MSE quadratic), the edge-of-stability readings on series with known answers, both sides of
each threshold, and the MSE loss trained and measured (its Hessian against a closed form and torch.func)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_data, tiny_mlp
from hypothesis import given
from hypothesis import strategies as st

import training
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


# ----------------------------------------------------------------------------- the edge of stability in a series
def test_a_rise_to_two_over_eta_then_hovering_reads_as_sharpening_then_the_edge():
    """The shape Cohen et al. 2021 report: λ_max rising 4x, from 1 to 2/η = 4 over the first 30 checks, then
    hovering within ±5% of 2/η for 70 checks: progressive sharpening (4x > 1.2x), reached at the check where
    λ first passes 3.6, and an onset at the first check inside the band, median 1x 2/η."""
    rng = np.random.default_rng(0)
    rise = np.linspace(1.0, 4.0, 31)
    steps, values = series(np.r_[rise, 4.0 * (1 + 0.05 * rng.uniform(-1, 1, 70))])
    found = utils.edge_of_stability(steps, values, 4.0, band=0.1, rise=1.2, min_inside=0.8, min_held=0.25)
    first_inside = 10 * int(np.argmax(rise >= 3.6))
    assert found.sharpening.rose and found.sharpening.ratio == pytest.approx(values[first_inside // 10])
    assert found.lambda_max.reached == found.lambda_max.onset == found.window_start == first_inside
    assert found.lambda_max.inside_share == 1.0 and abs(found.lambda_ratio - 1) <= 0.05


def series(values) -> tuple[list[int], list[float]]:
    return [10 * i for i in range(len(values))], list(values)


@pytest.mark.parametrize("value, inside", [(0.899, False), (0.901, True), (1.099, True), (1.101, False)])
def test_band_onset_counts_a_value_inside_exactly_within_the_band(value, inside):
    """Threshold 10, band 10%: a tail at 8.99 or 11.01 is outside, at 9.01 or 10.99 inside."""
    steps, values = series([1.0] * 4 + [10 * value] * 6)
    onset = utils.band_onset(steps, values, 10.0, band=0.1, min_inside=0.8, min_held=0.25)
    assert (onset.onset == 40) == inside
    assert onset.reached == (40 if value > 0.9 else None)


@pytest.mark.parametrize("outside, stays", [(2, True), (3, False)])
def test_band_onset_needs_the_stated_share_of_checks_inside(outside, stays):
    """Ten checks from the first one inside: with 2 of them outside 80% are inside (stays, at min_inside 0.8),
    with 3 only 70% (no step from which it stays, the later starts holding too little of the run)."""
    tail = [10.0] * (10 - outside) + [20.0] * outside
    tail[1:1 + outside], tail[-outside:] = [20.0] * outside, [10.0] * outside  # the excursions early in the tail
    steps, values = series([1.0] * 30 + tail)
    onset = utils.band_onset(steps, values, 10.0, band=0.1, min_inside=0.8, min_held=0.2)
    assert (onset.onset == 300) == stays


@pytest.mark.parametrize("last_outside, held", [(7, False), (5, True)])
def test_band_onset_needs_the_stated_share_of_the_run(last_outside, held):
    """Twenty-one checks (steps 0..200) with the tail inside from check `last_outside` + 1: from step 80 it holds
    60% of the run, from step 60 70%: with min_held 0.65 only the second counts as staying."""
    values = [1.0] * 21
    values[last_outside + 1:] = [10.0] * (20 - last_outside)
    steps, values = series(values)
    onset = utils.band_onset(steps, values, 10.0, band=0.1, min_inside=1.0, min_held=0.65)
    assert (onset.onset is not None) == held


@pytest.mark.parametrize("start, rose", [(8.0 / 1.19, False), (8.0 / 1.21, True)])
def test_progressive_sharpening_needs_a_rise_beyond_the_stated_factor(start, rose):
    """λ_max rising to 8 (the band's lower edge at 2/η = 8.9, band 10%) and staying there: from 8/1.19 that is a
    1.19x rise (not sharpening at rise 1.2), from 8/1.21 a 1.21x rise (sharpening)."""
    steps, values = series([start, 0.5 * (start + 8.0), 8.0, 8.0, 8.0])
    found = utils.progressive_sharpening(steps, values, 8.0 / 0.9, band=0.1, rise=1.2)
    assert found.rose == rose and found.ratio == pytest.approx(8.0 / start)


def test_a_series_that_starts_in_the_band_has_nothing_to_sharpen_towards():
    steps, values = series([9.5, 12.0, 10.0])
    found = utils.progressive_sharpening(steps, values, 10.0, band=0.1, rise=1.2)
    assert found.started_in_band and not found.rose


def test_sgd_reading_finds_batch_sharpness_at_two_over_eta_while_lambda_max_stays_below():
    """Batch sharpness rising to 2/η = 10 and hovering (±5%), λ_max flat at 6: batch sharpness settles, λ_max is
    0.6x 2/η over the settled window; a batch sharpness that stops at 7 never reaches the band."""
    rng = np.random.default_rng(0)
    batch = np.r_[np.linspace(2, 10, 10), 10 * (1 + 0.05 * rng.uniform(-1, 1, 30))]
    steps, lam = series([6.0] * 40)
    found = utils.edge_of_stability(steps, lam, 10.0, band=0.1, rise=1.2, min_inside=0.8, min_held=0.25,
                                    batch_sharpness=batch)
    assert found.batch_sharpness.onset is not None and found.window_start == found.batch_sharpness.onset
    assert found.lambda_ratio == pytest.approx(0.6) and abs(found.batch_ratio - 1) <= 0.05
    assert found.lambda_max.reached is None and not found.sharpening.rose
    low = utils.edge_of_stability(steps, lam, 10.0, band=0.1, rise=1.2, min_inside=0.8, min_held=0.25,
                                  batch_sharpness=np.minimum(batch, 7.0))
    assert low.batch_sharpness.reached is None and low.batch_sharpness.onset is None
    assert low.window_start == 292  # the last quarter of the run (steps 0..390)


def test_readings_refuse_mismatched_series_and_bad_thresholds():
    with pytest.raises(ValueError, match="one value per step"):
        utils.band_onset([0, 10], [1.0], 1.0, band=0.1, min_inside=0.8, min_held=0.25)
    with pytest.raises(ValueError, match="0 < band < 1"):
        utils.band_onset([0, 10], [1.0, 1.0], 1.0, band=1.5, min_inside=0.8, min_held=0.25)
    with pytest.raises(ValueError, match="rise > 1"):
        utils.progressive_sharpening([0, 10], [1.0, 1.0], 1.0, band=0.1, rise=1.0)


# ----------------------------------------------------------------------------- the MSE loss, trained and measured
def linear_model_and_data(seed: int = 0, n: int = 20, d: int = 4, classes: int = 3):
    """A bias-free linear model f(x) = Wx in float64 and its data: under the MSE loss a quadratic in W."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(d, classes, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(classes, d, generator=g, dtype=torch.float64))
    return model, torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def test_mse_hessian_of_a_linear_model_is_the_closed_form_kron_identity_with_the_input_second_moment(backend):
    """½‖Wx − onehot(y)‖² summed over classes, mean over N: the Hessian in vec(W) (row-major) is I_C ⊗ XᵀX/N,
    without autograd; the operator's dense Hessian on both paths equals it."""
    model, x, y = linear_model_and_data()
    closed = torch.kron(torch.eye(3, dtype=torch.float64), x.T @ x / x.shape[0])
    dense = utils.exact_hessian(backend.model(torch.nn.Sequential(model)), x, y, loss_fn=utils.squared_error_loss)
    torch.testing.assert_close(dense, closed, rtol=1e-12, atol=1e-12)


def test_mse_hessian_of_a_tanh_mlp_matches_torch_func_hessian(backend):
    """On a tiny float64 Tanh MLP, the dense MSE Hessian from the operator (R-operator on the fast path, double
    backward on the general one) equals torch.func.hessian of the loss written out here."""
    model, (x, y) = tiny_mlp(0), tiny_data(0)
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        out = torch.func.functional_call(model, params, (x,))
        return 0.5 * ((out - torch.nn.functional.one_hot(y, 3).double()) ** 2).sum() / x.shape[0]

    truth = torch.func.hessian(loss_of)(theta)
    dense = utils.exact_hessian(backend.model(model), x, y, loss_fn=utils.loss_function("mse"))
    torch.testing.assert_close(dense, truth, rtol=1e-10, atol=1e-12)


def test_training_on_mse_decreases_the_mse_loss_and_refuses_a_cross_entropy_target():
    model, (x, y) = tiny_mlp(1), tiny_data(1)
    with torch.no_grad():
        before = float(utils.squared_error_loss(model(x), y))
    history = training.train(model, x, y, max_steps=100, lr=0.05, momentum=0.0, batch_size=x.shape[0], loss="mse")
    with torch.no_grad():
        after = float(utils.squared_error_loss(model(x), y))
    assert after < 0.5 * before and history.step_losses[0] == pytest.approx(before)
    with pytest.raises(ValueError, match="cross-entropies"):
        training.train(model, x, y, max_steps=1, lr=0.05, loss="mse", target_loss=0.1)
    with pytest.raises(ValueError, match="loss must be one of"):
        training.train(model, x, y, max_steps=1, lr=0.05, loss="hinge")


@pytest.mark.parametrize("margin", [-0.05, 0.05])
def test_full_batch_training_on_an_mse_quadratic_converges_exactly_when_lambda_max_is_below_two_over_eta(margin):
    """training.train itself (batch = N, momentum 0) on the MSE of a linear model, a quadratic whose Hessian is
    I ⊗ XᵀX/N: at η = (1 + margin)·2/λ_max the distance to the minimiser shrinks below 1e-6 of its start
    exactly when λ_max < 2/η (margin −5%), and grows when λ_max > 2/η (+5%)."""
    model, x, y = linear_model_and_data(3)
    hessian = torch.kron(torch.eye(3, dtype=torch.float64), x.T @ x / x.shape[0])
    lam = torch.linalg.eigvalsh(hessian)
    lr = (1 + margin) * 2 / float(lam[-1])
    target = torch.nn.functional.one_hot(y, 3).double()
    minimiser = torch.linalg.lstsq(x, target).solution.T  # (C, d): the least-squares W
    start = float((model.weight - minimiser).norm())
    training.train(model, x, y, max_steps=3000, lr=lr, momentum=0.0, batch_size=x.shape[0], loss="mse")
    ratio = float((model.weight.detach() - minimiser).norm()) / start
    assert utils.gradient_descent_is_stable(lam.numpy(), lr=lr) == (margin < 0) == (ratio < 1e-6)
    assert margin < 0 or ratio > 1
