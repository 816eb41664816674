"""Connectivity: hidden-unit permutations preserve the function, weight matching recovers known permutations,
barriers on hand-made paths, interpolation and Bézier curves against direct evaluation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers import (
    DT,
    ThetaModel,
    acc_at,
    assert_same_params,
    assert_unchanged_conn,
    flat,
    linears,
    loss_at,
    relu_mlp,
    scalar_chain,
    snapshot_conn,
    tiny_data,
    tiny_mlp,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import utils


def my_permute(model, perms):
    """Hidden layer l, unit i of the copy = unit perms[l][i] of the original."""
    out = copy.deepcopy(model)
    lins = linears(out)
    assert len(perms) == len(lins) - 1
    with torch.no_grad():
        for l, p in enumerate(perms):
            p = torch.as_tensor(p, dtype=torch.long)
            lins[l].weight.copy_(lins[l].weight[p])
            lins[l].bias.copy_(lins[l].bias[p])
            lins[l + 1].weight.copy_(lins[l + 1].weight[:, p])
    return out


def _layer_lap_matrix(a, m, l):
    """Objective's dependence on a permutation Q of hidden layer l of m (others fixed): sum_ij C_ij [unit j -> slot i]."""
    La, Lm = linears(a), linears(m)
    C = La[l].weight @ Lm[l].weight.T + torch.outer(La[l].bias, Lm[l].bias) + La[l + 1].weight.T @ Lm[l + 1].weight
    return C.detach().numpy()


MSE = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731


XS = torch.tensor([[0.5], [-1.0], [2.0], [1.5], [-0.3]], dtype=DT)


def _chain_loss(a, wa, wb, x=XS, yscale=1.0):
    """L(alpha) for f = w2 w1 x with (w1, w2) = (1-a) wa + a wb, y = yscale x, MSE."""
    w1 = (1 - a) * wa[0] + a * wb[0]
    w2 = (1 - a) * wa[1] + a * wb[1]
    return float(((w1 * w2 - yscale) ** 2) * (x**2).mean())


def _barriers_from(alphas, losses, errors, le, ee):
    a, L, E = map(np.asarray, (alphas, losses, errors))
    return {
        "loss_linear": float(np.max(L - ((1 - a) * le[0] + a * le[1]))),
        "loss_mean": float(np.max(L) - 0.5 * (le[0] + le[1])),
        "error_linear": float(np.max(E - ((1 - a) * ee[0] + a * ee[1]))),
        "error_mean": float(np.max(E) - 0.5 * (ee[0] + ee[1])),
    }


def test_interpolation_barrier_of_sign_flipped_scalar_linear_network_is_mean_y_squared():
    """f(x) = w2 w1 x, MSE, y = x. theta_a = (1,1), theta_b = (-1,-1) compute f = x (zero loss);
    theta(alpha) = (1-2 alpha)(1,1) so f = (1-2 alpha)^2 x and L(alpha) = 16 alpha^2 (1-alpha)^2 mean(x^2).
    Barrier over alphas containing 1/2 = mean(x^2) = 1.875; with alphas -1/2 and 3/2 it is 9 mean(x^2). Accuracy: NaN."""
    ma, mb = scalar_chain(1.0, 1.0), scalar_chain(-1.0, -1.0)
    x = torch.tensor([[0.5], [-1.0], [2.0], [1.5]], dtype=DT)
    y = x.clone()
    mse = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    mx2 = float((x**2).mean())
    alphas = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
    res = utils.linear_interpolation(ma, mb, x, y, alphas, loss_fn=mse)
    expect = [16 * a**2 * (1 - a) ** 2 * mx2 for a in alphas]
    np.testing.assert_allclose(res.losses, expect, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.barrier, mx2, rtol=1e-12)
    np.testing.assert_allclose(res.endpoint_losses, [0.0, 0.0], atol=1e-15)
    assert list(res.alphas) == alphas
    assert all(math.isnan(a) for a in res.accuracies)
    res2 = utils.linear_interpolation(ma, mb, x, y, [-0.5, 0.0, 0.5, 1.0, 1.5], loss_fn=mse)
    np.testing.assert_allclose(res2.losses, [9 * mx2, 0, mx2, 0, 9 * mx2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res2.barrier, 9 * mx2, rtol=1e-12)


def test_interpolation_losses_accuracies_and_barrier_equal_direct_evaluation_tanh_mlps():
    """L(alpha) = L((1-a) theta_a + a theta_b) evaluated directly; acc = mean(argmax == y);
    barrier = max_a [L(a) - (1-a) L_a - a L_b]."""
    ma, mb = tiny_mlp(0), tiny_mlp(1)
    x, y = tiny_data(0, n=20)
    ta, tb = flat(ma), flat(mb)
    alphas = np.linspace(0, 1, 9).tolist()
    res = utils.linear_interpolation(ma, mb, x, y, alphas)
    L = [loss_at(ma, (1 - a) * ta + a * tb, x, y) for a in alphas]
    A = [acc_at(ma, (1 - a) * ta + a * tb, x, y) for a in alphas]
    la, lb = loss_at(ma, ta, x, y), loss_at(mb, tb, x, y)
    np.testing.assert_allclose(res.losses, L, rtol=1e-12)
    np.testing.assert_allclose(res.accuracies, A, rtol=0, atol=0)
    np.testing.assert_allclose(res.endpoint_losses, [la, lb], rtol=1e-12)
    np.testing.assert_allclose(res.barrier, max(l - (1 - a) * la - a * lb for a, l in zip(alphas, L)), rtol=1e-10, atol=1e-13)


def test_barrier_height_hand_values():
    """Hand values: losses (1, 3, 2) at (0, .5, 1) -> 3 - 1.5 = 1.5; a path below the chord -> 0 (endpoints);
    alphas (.25, .75) with losses .5 and chord 1 -> max over the GIVEN alphas = -0.5 (no clipping in the formula)."""
    np.testing.assert_allclose(utils.barrier_height([0, 0.5, 1], [1, 3, 2], 1, 2), 1.5, rtol=1e-15)
    np.testing.assert_allclose(utils.barrier_height([0, 0.5, 1], [1, 0.5, 2], 1, 2), 0.0, atol=1e-15)
    np.testing.assert_allclose(utils.barrier_height([0.25, 0.75], [0.5, 0.5], 1.0, 1.0), -0.5, rtol=1e-15)


@given(
    data=st.lists(
        st.tuples(st.floats(-1, 2, allow_nan=False), st.floats(0, 10, allow_nan=False)), min_size=1, max_size=12
    ),
    la=st.floats(0, 10),
    lb=st.floats(0, 10),
)
def test_barrier_height_is_max_of_loss_minus_chord(data, la, lb):
    """barrier_height = max_i [losses_i - ((1 - alpha_i) la + alpha_i lb)]."""
    alphas, losses = [a for a, _ in data], [l for _, l in data]
    expect = max(l - ((1 - a) * la + a * lb) for a, l in data)
    np.testing.assert_allclose(utils.barrier_height(alphas, losses, la, lb), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("widths", [(4, 5, 3), (4, 6, 5, 7, 3)])
def test_permute_hidden_units_leaves_outputs_unchanged_and_moves_rows_and_columns(widths):
    """Permuting hidden units is a symmetry: outputs equal to 1e-12 (shallow and 3-hidden-layer ReLU MLP),
    and the permuted parameters are exactly W_l[p], b_l[p], W_{l+1}[:, p] (the documented convention)."""
    model = relu_mlp(3, widths)
    x, _ = tiny_data(3, n=30, d=widths[0])
    g = torch.Generator().manual_seed(7)
    perms = [torch.randperm(w, generator=g) for w in widths[1:-1]]
    snap = snapshot_conn(model)
    pm = utils.permute_hidden_units(model, perms)
    assert_unchanged_conn([model], snap)
    torch.testing.assert_close(pm(x), model(x), rtol=1e-12, atol=1e-12)
    assert_same_params(pm, my_permute(model, perms))
    assert not torch.equal(flat(pm), flat(model))  # the permutation really moved something


@given(data=st.data(), depth=st.integers(1, 3))
def test_permute_hidden_units_random_permutations_preserve_function_property(data, depth):
    """Hypothesis: for random permutations of every hidden layer, the permuted copy has the same outputs (1e-12)
    and equals the hand-made permutation parameter-for-parameter."""
    widths = (3,) + tuple(data.draw(st.integers(2, 6)) for _ in range(depth)) + (2,)
    perms = [torch.tensor(data.draw(st.permutations(range(w)))) for w in widths[1:-1]]
    model = relu_mlp(1, widths)
    x, _ = tiny_data(1, n=10, d=3)
    pm = utils.permute_hidden_units(model, perms)
    torch.testing.assert_close(pm(x), model(x), rtol=1e-12, atol=1e-12)
    assert_same_params(pm, my_permute(model, perms))


@pytest.mark.parametrize("widths", [(5, 8, 3), (5, 8, 7, 3), (6, 7, 6, 5, 3)])
def test_weight_matching_recovers_known_permutation_exactly(widths):
    """model_b = model_a with hidden units permuted by known random perms. weight_matching(model_a, model_b)
    must return model == model_a parameter-for-parameter, permutations = inverse perms (so that
    permute_hidden_units(model_b, permutations) == model_a), and the aligned model computes model_b's function."""
    a = relu_mlp(11, widths)
    g = torch.Generator().manual_seed(12)
    perms = [torch.randperm(w, generator=g) for w in widths[1:-1]]
    b = my_permute(a, perms)
    x, _ = tiny_data(4, n=25, d=widths[0])
    snap = snapshot_conn(a, b)
    res = utils.weight_matching(a, b, seed=0)
    assert_unchanged_conn([a, b], snap)
    assert_same_params(res.model, a)
    assert len(res.permutations) == len(perms)
    for p_found, p_true in zip(res.permutations, perms):
        assert torch.equal(torch.as_tensor(p_found, dtype=torch.long), torch.argsort(p_true))
    assert_same_params(my_permute(b, res.permutations), a)
    torch.testing.assert_close(res.model(x), b(x), rtol=1e-12, atol=1e-12)
    assert res.sweeps >= 1


@settings(max_examples=15)
@given(data=st.data())
def test_weight_matching_one_hidden_layer_recovers_any_permutation_property(data):
    """Hypothesis: with one hidden layer the matching is a single linear assignment, whose unique maximum (rows of a
    generic model are distinct; Cauchy-Schwarz) is the true alignment: weight matching undoes any permutation exactly."""
    widths = (data.draw(st.integers(2, 6)), data.draw(st.integers(2, 9)), 3)
    a = relu_mlp(data.draw(st.integers(0, 50)), widths)
    perms = [torch.tensor(data.draw(st.permutations(range(widths[1]))))]
    b = my_permute(a, perms)
    res = utils.weight_matching(a, b, seed=data.draw(st.integers(0, 5)))
    assert_same_params(res.model, a)
    assert_same_params(my_permute(b, res.permutations), a)


@settings(max_examples=15)
@given(data=st.data())
def test_weight_matching_result_is_coordinatewise_optimal_property(data):
    """Hypothesis, 2 hidden layers: coordinate descent stops at a point where no single layer's linear assignment
    improves the objective (checked with scipy's linear_sum_assignment, 1e-9), the objective is at least the
    unaligned one, and the aligned model computes model_b's function (1e-12). (Exact recovery is NOT guaranteed for
    deeper nets: e.g. relu_mlp(0, (6, 7, 5, 3)) with perms (id, swap 2<->3) and seed 0 stops at a coordinate-wise
    optimum with objective 74.5 < 100.5 of the true alignment; seed 1 recovers it.)"""
    from scipy.optimize import linear_sum_assignment

    widths = (6, 7, 5, 3)
    a = relu_mlp(data.draw(st.integers(0, 50)), widths)
    perms = [torch.tensor(data.draw(st.permutations(range(w)))) for w in widths[1:-1]]
    b = my_permute(a, perms)
    x, _ = tiny_data(0, n=10, d=6)
    res = utils.weight_matching(a, b, seed=data.draw(st.integers(0, 5)))
    torch.testing.assert_close(res.model(x), b(x), rtol=1e-12, atol=1e-12)
    assert_same_params(my_permute(b, res.permutations), res.model)
    for l in range(len(widths) - 2):
        C = _layer_lap_matrix(a, res.model, l)
        r, c = linear_sum_assignment(C, maximize=True)
        assert C[r, c].sum() <= np.trace(C) + 1e-9 * (1 + abs(np.trace(C)))

    def obj(m):
        with torch.no_grad():
            return sum(float((la.weight * lb.weight).sum() + (la.bias * lb.bias).sum()) for la, lb in zip(linears(a), linears(m)))

    assert obj(res.model) >= obj(b) - 1e-12


def test_weight_matching_between_unrelated_models_keeps_model_b_function():
    """Two independent models: the aligned model is a permutation of model_b (same outputs, 1e-12; its parameters
    are model_b permuted by the returned permutations), and alignment does not decrease the matching objective
    sum_l <W_a^l, W'^l> + <b_a^l, b'^l> relative to the identity."""
    widths = (5, 8, 6, 3)
    a, b = relu_mlp(21, widths), relu_mlp(22, widths)
    x, _ = tiny_data(5, n=25, d=5)
    res = utils.weight_matching(a, b)
    torch.testing.assert_close(res.model(x), b(x), rtol=1e-12, atol=1e-12)
    assert_same_params(res.model, my_permute(b, res.permutations))

    def obj(m):
        with torch.no_grad():
            return sum(float((la.weight * lb.weight).sum() + (la.bias * lb.bias).sum()) for la, lb in zip(linears(a), linears(m)))

    assert obj(res.model) >= obj(b) - 1e-12


def test_barriers_of_sign_flipped_scalar_network_equal_mean_x_squared_on_grid_with_half():
    """theta_a = (1,1), theta_b = (-1,-1), y = x: L(alpha) = 16 alpha^2 (1-alpha)^2 mean(x^2), endpoints 0, so with 1/2
    on the grid: barrier = loss_linear = loss_mean = mean(x^2) exactly (1e-12); losses match the polynomial."""
    ma, mb = scalar_chain(1.0, 1.0), scalar_chain(-1.0, -1.0)
    y = XS.clone()
    mx2 = float((XS**2).mean())
    alphas = [float(a) for a in np.linspace(0, 1, 11)]
    snap = snapshot_conn(ma, mb)
    res = utils.linear_interpolation(ma, mb, XS, y, alphas, loss_fn=MSE)
    assert_unchanged_conn([ma, mb], snap)
    np.testing.assert_allclose(res.losses, [16 * a**2 * (1 - a) ** 2 * mx2 for a in alphas], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(res.endpoint_losses, [0.0, 0.0], atol=1e-15)
    assert res.barrier == pytest.approx(mx2, rel=1e-12)
    assert res.barriers["loss_linear"] == pytest.approx(mx2, rel=1e-12)
    assert res.barriers["loss_mean"] == pytest.approx(mx2, rel=1e-12)


def test_refinement_finds_the_peak_at_one_half_when_the_grid_misses_it():
    """Same path, alphas = [0, 0.3, 0.7, 1]: .barrier (given alphas only) = 16*0.09*0.49 mean(x^2) = 0.7056 mean(x^2);
    the refined barriers come from extra points near the peak: refined_alphas sorted, containing 0, 1 and the given
    alphas, refined losses equal the polynomial (1e-12), loss_linear/loss_mean recomputed from the refined arrays
    (1e-12), and the refined peak lies within 0.06 of 1/2 with loss_linear >= 0.97 mean(x^2) (true sup: mean(x^2))."""
    ma, mb = scalar_chain(1.0, 1.0), scalar_chain(-1.0, -1.0)
    mx2 = float((XS**2).mean())
    alphas = [0.0, 0.3, 0.7, 1.0]
    res = utils.linear_interpolation(ma, mb, XS, XS.clone(), alphas, refine=2, loss_fn=MSE)
    assert res.barrier == pytest.approx(16 * 0.09 * 0.49 * mx2, rel=1e-12)
    ra = np.asarray(res.refined_alphas, dtype=float)
    rl = np.asarray(res.refined_losses, dtype=float)
    assert np.all(np.diff(ra) > 0)
    for a in alphas:
        assert np.any(np.abs(ra - a) < 1e-15)
    assert len(ra) > len(alphas)
    np.testing.assert_allclose(rl, [16 * a**2 * (1 - a) ** 2 * mx2 for a in ra], rtol=1e-12, atol=1e-15)
    assert res.barriers["loss_linear"] == pytest.approx(float(np.max(rl)), rel=1e-12)
    assert res.barriers["loss_mean"] == pytest.approx(float(np.max(rl)), rel=1e-12)
    assert abs(ra[np.argmax(rl)] - 0.5) <= 0.06
    assert 0.97 * mx2 <= res.barriers["loss_linear"] <= mx2 * (1 + 1e-12)


def test_linear_and_mean_barrier_definitions_differ_on_asymmetric_scalar_path():
    """theta_a = (1,1), theta_b = (2,-1.5), y = x: endpoint losses 0 and 16 mean(x^2) differ, so loss_linear (vs chord) and
    loss_mean (vs mean of ends) differ. Both equal the definitions applied to the returned refined arrays (1e-12),
    refined losses equal the polynomial, and neither exceeds the true supremum over a 20001-point grid."""
    wa, wb = (1.0, 1.0), (2.0, -1.5)
    ma, mb = scalar_chain(*wa), scalar_chain(*wb)
    alphas = [float(a) for a in np.linspace(0, 1, 6)]
    res = utils.linear_interpolation(ma, mb, XS, XS.clone(), alphas, loss_fn=MSE)
    np.testing.assert_allclose(res.losses, [_chain_loss(a, wa, wb) for a in alphas], rtol=1e-12, atol=1e-15)
    L0, L1 = _chain_loss(0, wa, wb), _chain_loss(1, wa, wb)
    np.testing.assert_allclose(res.endpoint_losses, [L0, L1], rtol=1e-12, atol=1e-15)
    ra, rl = np.asarray(res.refined_alphas, float), np.asarray(res.refined_losses, float)
    np.testing.assert_allclose(rl, [_chain_loss(a, wa, wb) for a in ra], rtol=1e-12, atol=1e-15)
    ll = float(np.max(rl - ((1 - ra) * L0 + ra * L1)))
    lm = float(np.max(rl) - 0.5 * (L0 + L1))
    assert res.barriers["loss_linear"] == pytest.approx(ll, rel=1e-12, abs=1e-14)
    assert res.barriers["loss_mean"] == pytest.approx(lm, rel=1e-12, abs=1e-14)
    assert abs(ll - lm) > 0.1
    dense = np.linspace(0, 1, 20001)
    dl = np.array([_chain_loss(a, wa, wb) for a in dense])
    assert ll <= np.max(dl - ((1 - dense) * L0 + dense * L1)) + 1e-9
    assert lm <= np.max(dl) - 0.5 * (L0 + L1) + 1e-9
    given = np.array(res.losses) - ((1 - np.array(alphas)) * L0 + np.array(alphas) * L1)
    assert res.barrier == pytest.approx(float(np.max(given)), rel=1e-12, abs=1e-14)


def test_interpolation_of_classifiers_losses_accuracies_and_error_barriers_equal_direct_evaluation():
    """Two ReLU MLPs, CE loss: losses/accuracies at given and refined alphas equal direct evaluation at
    (1-a) theta_a + a theta_b (1e-12), and all four barriers equal the definitions on the refined arrays
    with error = 1 - accuracy."""
    ma, mb = relu_mlp(8, (4, 6, 3)), relu_mlp(9, (4, 6, 3))
    x, y = tiny_data(8, n=40)
    ta, tb = flat(ma), flat(mb)
    alphas = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    res = utils.linear_interpolation(ma, mb, x, y, alphas)
    assert list(np.asarray(res.alphas, float)) == alphas
    np.testing.assert_allclose(res.losses, [loss_at(ma, (1 - a) * ta + a * tb, x, y) for a in alphas], rtol=1e-12)
    np.testing.assert_allclose(res.accuracies, [acc_at(ma, (1 - a) * ta + a * tb, x, y) for a in alphas], atol=1e-15)
    ra = np.asarray(res.refined_alphas, float)
    rl = [loss_at(ma, (1 - a) * ta + a * tb, x, y) for a in ra]
    rac = [acc_at(ma, (1 - a) * ta + a * tb, x, y) for a in ra]
    np.testing.assert_allclose(res.refined_losses, rl, rtol=1e-12)
    np.testing.assert_allclose(res.refined_accuracies, rac, atol=1e-15)
    le = (rl[0], rl[-1])
    ee = (1 - rac[0], 1 - rac[-1])
    expect = _barriers_from(ra, rl, 1 - np.asarray(rac), le, ee)
    for k, v in expect.items():
        assert res.barriers[k] == pytest.approx(v, rel=1e-12, abs=1e-14), k


@given(a=st.floats(-0.5, 1.5))
def test_interpolation_loss_at_random_alpha_equals_polynomial_property(a):
    """Hypothesis: for any alpha (also outside [0, 1]) the scalar chain's loss is ((w1 w2 - 1)^2) mean(x^2) at
    (w1, w2) = (1-alpha)(1,1) + alpha(2,-1.5) (rtol 1e-10, atol 1e-12)."""
    wa, wb = (1.0, 1.0), (2.0, -1.5)
    res = utils.linear_interpolation(scalar_chain(*wa), scalar_chain(*wb), XS, XS.clone(), [a], loss_fn=MSE)
    assert res.losses[0] == pytest.approx(_chain_loss(a, wa, wb), rel=1e-10, abs=1e-12)


def test_barrier_definitions_on_hand_values():
    """alphas (0, .25, .5, .75, 1), losses (1, 2, 3, 4.5, 2), ends (1, 2): loss_linear = max(L - (1 + a)) = 2.75 at .75,
    loss_mean = 4.5 - 1.5 = 3.0; errors (.1, .3, .2, .5, .3), ends (.1, .3): error_linear = .5 - .25 = .25,
    error_mean = .5 - .2 = .3."""
    out = utils.barrier_definitions([0, 0.25, 0.5, 0.75, 1.0], [1, 2, 3, 4.5, 2], [0.1, 0.3, 0.2, 0.5, 0.3], (1.0, 2.0), (0.1, 0.3))
    assert set(out) >= {"loss_linear", "loss_mean", "error_linear", "error_mean"}
    assert out["loss_linear"] == pytest.approx(2.75, abs=1e-12)
    assert out["loss_mean"] == pytest.approx(3.0, abs=1e-12)
    assert out["error_linear"] == pytest.approx(0.25, abs=1e-12)
    assert out["error_mean"] == pytest.approx(0.3, abs=1e-12)


def test_barrier_definitions_peak_location_matters_for_the_linear_version():
    """Losses (0, 5, 5, 10) at alphas (0, .1, .9, 1), ends (0, 10): minus the chord (0, 1, 9, 10) gives (0, 4, -4, 0), so
    loss_linear = 4 (the peak near the low end counts, the one near the high end does not); loss_mean = max L - 5 = 5."""
    out = utils.barrier_definitions([0.0, 0.1, 0.9, 1.0], [0.0, 5.0, 5.0, 10.0], [0.0, 0.0, 0.0, 0.0], (0.0, 10.0), (0.0, 0.0))
    assert out["loss_linear"] == pytest.approx(4.0, abs=1e-12)
    assert out["loss_mean"] == pytest.approx(5.0, abs=1e-12)
    assert out["error_linear"] == pytest.approx(0.0, abs=1e-12)


def test_bezier_points_are_endpoints_at_0_and_1_and_the_quadratic_formula_inside():
    """Rows (1-t)^2 a + 2t(1-t) c + t^2 b: exactly a at t = 0 and exactly b at t = 1; at interior t equal to the
    formula (1e-14)."""
    g = torch.Generator().manual_seed(0)
    a, c, b = (torch.randn(17, generator=g, dtype=DT) for _ in range(3))
    ts = [0.0, 0.1, 0.5, 0.77, 1.0]
    P = torch.as_tensor(utils.bezier_points(a, c, b, ts))
    assert P.shape == (5, 17)
    assert torch.equal(P[0], a) and torch.equal(P[-1], b)
    for i, t in enumerate(ts):
        torch.testing.assert_close(P[i], (1 - t) ** 2 * a + 2 * t * (1 - t) * c + t**2 * b, rtol=1e-14, atol=1e-14)


@given(t=st.floats(0.0, 1.0))
def test_bezier_points_random_t_property(t):
    """Hypothesis: for t in [0, 1], the point equals the Bernstein formula (1e-14) and lies in the convex hull: its
    weights are non-negative and sum to 1 (checked on a, c, b = unit vectors e1, e2, e3)."""
    E = torch.eye(3, dtype=DT)
    P = torch.as_tensor(utils.bezier_points(E[0], E[1], E[2], [t]))[0]
    torch.testing.assert_close(P, torch.tensor([(1 - t) ** 2, 2 * t * (1 - t), t**2], dtype=DT), rtol=1e-14, atol=1e-14)
    assert float(P.sum()) == pytest.approx(1.0, abs=1e-14)


def test_bezier_curve_endpoints_and_interior_losses_equal_direct_evaluation():
    """Tiny ReLU MLPs: ts = linspace(0, 1, points); losses[0] = L(model_a), losses[-1] = L(model_b) (1e-12); at every t,
    loss and accuracy equal direct evaluation at (1-t)^2 a + 2t(1-t) control + t^2 b over all of x; one train loss per
    epoch; inputs unchanged."""
    ma, mb = relu_mlp(30, (4, 6, 3)), relu_mlp(31, (4, 6, 3))
    x, y = tiny_data(30, n=32)
    ta, tb = flat(ma), flat(mb)
    snap = snapshot_conn(ma, mb)
    res = utils.bezier_curve(ma, mb, x, y, epochs=3, lr=0.05, seed=0, batch_size=8, points=7)
    assert_unchanged_conn([ma, mb], snap)
    ts = np.asarray(res.ts, float)
    np.testing.assert_allclose(ts, np.linspace(0, 1, 7), atol=1e-15)
    assert res.losses[0] == pytest.approx(loss_at(ma, ta, x, y), rel=1e-12)
    assert res.losses[-1] == pytest.approx(loss_at(mb, tb, x, y), rel=1e-12)
    c = torch.as_tensor(res.control, dtype=DT).reshape(-1)
    assert c.numel() == ta.numel()
    assert not torch.allclose(c, 0.5 * (ta + tb))  # it was trained
    for i, t in enumerate(ts):
        th = (1 - t) ** 2 * ta + 2 * t * (1 - t) * c + t**2 * tb
        assert res.losses[i] == pytest.approx(loss_at(ma, th, x, y), rel=1e-12)
        assert res.accuracies[i] == pytest.approx(acc_at(ma, th, x, y), abs=1e-15)
    assert len(res.train_losses) == 3


def test_bezier_training_removes_the_bump_of_the_straight_line_on_a_ring_shaped_loss():
    """L(theta) = (||theta||^2 - 1)^2 on theta in R^2 (minima on the unit circle); theta_a = (1, 0.2), theta_b = (-1, 0.2).
    The segment passes near the origin (max L = (0.04 - 1)^2 = 0.9216) while a quadratic Bezier through a control near
    (0, 2) stays close to the circle. SGD from the midpoint (50 epochs x 4 batches, lr 0.05, momentum 0.9; a direct
    simulation of the method reaches max L ~ 0.02) must bring the curve's max loss below 0.25 (vs 0.9216);
    endpoints stay exact."""
    a, b = torch.tensor([1.0, 0.2], dtype=DT), torch.tensor([-1.0, 0.2], dtype=DT)
    ma, mb = ThetaModel(a), ThetaModel(b)
    x = torch.zeros(32, 1, dtype=DT)
    y = torch.zeros(32, dtype=torch.long)

    def ring(o, t):
        return ((o.pow(2).sum(1) - 1) ** 2).mean()

    res = utils.bezier_curve(ma, mb, x, y, epochs=50, lr=0.05, seed=0, batch_size=8, points=21, loss_fn=ring)
    line = max(float((((1 - t) * a + t * b).pow(2).sum() - 1) ** 2) for t in np.linspace(0, 1, 21))
    assert line == pytest.approx(0.9216, rel=1e-12)
    losses = np.asarray(res.losses, float)
    assert losses[0] == pytest.approx(float((a.pow(2).sum() - 1) ** 2), rel=1e-12)
    assert losses[-1] == pytest.approx(float((b.pow(2).sum() - 1) ** 2), rel=1e-12)
    c = torch.as_tensor(res.control, dtype=DT).reshape(-1)
    for t, L in zip(np.asarray(res.ts, float), losses):
        th = (1 - t) ** 2 * a + 2 * t * (1 - t) * c + t**2 * b
        assert L == pytest.approx(float((th.pow(2).sum() - 1) ** 2), rel=1e-10, abs=1e-14)
    assert losses.max() < 0.25, (losses.max(), c)


def test_interpolating_different_architectures_is_refused():
    x, y = tiny_data(0)
    with pytest.raises(ValueError, match="same parameter"):
        utils.linear_interpolation(tiny_mlp(0), tiny_mlp(0, widths=(4, 6, 3)), x, y, [0.5])

