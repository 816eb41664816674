"""Loss surfaces: exactly symmetric grids, the 2-D slice and the plane through three points against direct
evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    DT,
    DUMMY_X,
    DUMMY_Y,
    ThetaModel,
    TinyCNN,
    acc_at,
    assert_filter_normalized,
    assert_unchanged_conn,
    cnn_data,
    flat,
    loss_at,
    quad_loss,
    rand_vec,
    relu_mlp,
    snapshot_conn,
    tiny_data,
    tiny_mlp,
)
from hypothesis import given
from hypothesis import strategies as st

import utils


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


def test_loss_surface_with_given_directions_equals_direct_evaluation(backend):
    """losses[i, j] = L(theta + alphas[i] d1 + betas[j] d2) with d1, d2 used unchanged; same for accuracies."""
    m = tiny_mlp(1)
    model = backend.model(m)
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


def test_loss_plane_point_coordinates_grid_and_losses_equal_direct_evaluation():
    """u = (b-a)/||b-a||, v = normalised component of c-a orthogonal to u: points = (0,0), (||b-a||, 0),
    (<c-a,u>, ||(c-a) - <c-a,u>u||) (1e-10). The grid covers the points with margin * extent on each side (per axis),
    and every grid loss equals direct evaluation at a + xs[i] u + ys[j] v (1e-10)."""
    base = relu_mlp(40, (4, 5, 3))
    pa, pb, pc = (flat(relu_mlp(s, (4, 5, 3))) for s in (41, 42, 43))
    x, y = tiny_data(40, n=20)
    snap = snapshot_conn(base)
    steps, margin = 9, 0.25
    res = utils.loss_plane(base, x, y, points=(pa, pb, pc), steps=steps, margin=margin)
    assert_unchanged_conn([base], snap)
    u = (pb - pa) / (pb - pa).norm()
    w = (pc - pa) - ((pc - pa) @ u) * u
    v = w / w.norm()
    expect = np.array([[0.0, 0.0], [float((pb - pa).norm()), 0.0], [float((pc - pa) @ u), float(w.norm())]])
    P = np.asarray(res.points, float)
    np.testing.assert_allclose(P, expect, rtol=1e-10, atol=1e-10)
    xs, ys = np.asarray(res.xs, float), np.asarray(res.ys, float)
    assert xs.shape == (steps,) and ys.shape == (steps,)
    for grid, col in ((xs, 0), (ys, 1)):
        lo, hi = expect[:, col].min(), expect[:, col].max()
        ext = hi - lo
        assert grid[0] == pytest.approx(lo - margin * ext, rel=1e-10, abs=1e-10)
        assert grid[-1] == pytest.approx(hi + margin * ext, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(np.diff(grid), np.diff(grid)[0], rtol=1e-10)
    Ls = np.asarray(res.losses, float)
    assert Ls.shape == (steps, steps)
    for i in range(steps):
        for j in range(steps):
            th = pa + float(xs[i]) * u + float(ys[j]) * v
            assert Ls[i, j] == pytest.approx(loss_at(base, th, x, y), rel=1e-10), (i, j)
    # the grid point nearest theta_a has the loss of the point a + xs[i] u + ys[j] v nearest to it
    i0, j0 = int(np.argmin(np.abs(xs))), int(np.argmin(np.abs(ys)))
    assert Ls[i0, j0] == pytest.approx(loss_at(base, pa + float(xs[i0]) * u + float(ys[j0]) * v, x, y), rel=1e-10)


def test_loss_plane_grid_hits_theta_a_exactly_with_a_custom_loss():
    """Quadratic L = 1/2||theta - m||^2 on ThetaModel, with a, b, c = 0, 2 e1, 2 e2: extent 2 per axis, margin 0.5 -> grid
    [-1, 3] per axis with steps 5 (spacing 1), so grid points (1, 1) is theta_a; every loss equals 1/2||a + x u + y v - m||^2."""
    m_ = np.array([0.3, -0.4, 1.0])
    base = ThetaModel(np.zeros(3))
    a = torch.zeros(3, dtype=DT)
    b = torch.tensor([2.0, 0, 0], dtype=DT)
    c = torch.tensor([0, 2.0, 0], dtype=DT)
    res = utils.loss_plane(base, DUMMY_X, DUMMY_Y, points=(a, b, c), steps=5, margin=0.5, loss_fn=quad_loss(np.eye(3), m_))
    xs, ys = np.asarray(res.xs, float), np.asarray(res.ys, float)
    np.testing.assert_allclose(xs, [-1, 0, 1, 2, 3], atol=1e-12)
    np.testing.assert_allclose(ys, [-1, 0, 1, 2, 3], atol=1e-12)
    Ls = np.asarray(res.losses, float)
    assert Ls[1, 1] == pytest.approx(0.5 * float(np.sum(m_**2)), rel=1e-12)
    for i in range(5):
        for j in range(5):
            p = np.array([xs[i], ys[j], 0.0])
            assert Ls[i, j] == pytest.approx(0.5 * float(np.sum((p - m_) ** 2)), rel=1e-12, abs=1e-14)


def test_loss_plane_rejects_collinear_points():
    """c on the line through a and b (or b = a) leaves no plane: ValueError."""
    base = relu_mlp(0)
    x, y = tiny_data(0)
    pa, pb = flat(relu_mlp(1)), flat(relu_mlp(2))
    for pc in (pa + 0.5 * (pb - pa), pa + 2.0 * (pb - pa), pa.clone()):
        with pytest.raises(ValueError):
            utils.loss_plane(base, x, y, points=(pa, pb, pc), steps=5)


def test_loss_plane_rejects_coincident_first_two_points():
    """theta_b = theta_a: the three points are collinear (u = (b-a)/||b-a|| is undefined), so ValueError is required."""
    base = relu_mlp(0)
    x, y = tiny_data(0)
    pa, pc = flat(relu_mlp(1)), flat(relu_mlp(2))
    with pytest.raises(ValueError):
        utils.loss_plane(base, x, y, points=(pa, pa.clone(), pc), steps=5)


@given(steps=st.integers(2, 60), span=st.floats(1e-3, 1e3))
def test_grid_is_symmetric_and_contains_zero_when_odd(steps, span):
    grid = utils.symmetric_grid(steps, span)
    assert len(grid) == steps and grid[0] == -span and grid[-1] == span
    np.testing.assert_array_equal(grid, -grid[::-1])
    assert (0.0 in grid) == (steps % 2 == 1)
    assert np.all(np.diff(grid) > 0)


@pytest.mark.parametrize("steps, span", [(1, 1.0), (5, 0.0), (5, -1.0)])
def test_degenerate_grids_are_refused(steps, span):
    with pytest.raises(ValueError, match="grid"):
        utils.symmetric_grid(steps, span)

