"""The loss at many parameter points (`losses_at_points`, `point_evaluator`): the MLP fast path equals the
reference and direct forward passes, on inputs with constant columns, deep ReLU networks, ties and any layout."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DT,
    REL,
    ACTIVATIONS_meas,
    TinyCNN,
    acc_at,
    cnn_data,
    default_constants,
    flat,
    forward_at,
    loss_at,
    make_mlp_inputs,
    make_x,
    make_y,
    mlp_of,
    rand_vec,
    tiny_data,
    tiny_mlp,
    with_constant_columns,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import utils
from models import SmallMLP


def _direct_points(model, x, y, base, dirs, coefs, loss_fn=None):
    Ls, As = [], []
    for p in range(coefs.shape[0]):
        th = base + (coefs[p].unsqueeze(1) * dirs).sum(0)
        Ls.append(loss_at(model, th, x, y, loss_fn))
        As.append(acc_at(model, th, x, y))
    return torch.tensor(Ls, dtype=DT), torch.tensor(As, dtype=DT)


def make_dirs(model, K, seed=0, scale=0.4, bias=True) -> torch.Tensor:
    """K random flat directions (K, D): weight entries ~ scale/sqrt(fan_in), bias entries ~ scale (or 0)."""
    g = torch.Generator().manual_seed(7000 + seed)
    rows = []
    for _ in range(K):
        parts = []
        for p in model.parameters():
            if p.dim() == 2:
                parts.append(scale / math.sqrt(p.shape[1]) * torch.randn(p.shape, generator=g, dtype=DT).reshape(-1))
            else:
                parts.append(scale * torch.randn(p.shape, generator=g, dtype=DT) * (1.0 if bias else 0.0))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def direct_points(model, x, y, base, dirs, coefs):
    """(losses, accuracies, min top-2 logit margin) at theta_p = base + sum_k coefs[p, k] dirs[k], one
    functional_call per point (loop over k, zero coefficients skipped)."""
    Ls, As, margins = [], [], []
    for p in range(coefs.shape[0]):
        th = base.clone()
        for k in range(coefs.shape[1]):
            c = float(coefs[p, k])
            if c != 0.0:
                th = th + c * dirs[k]
        z = forward_at(model, th, x)
        Ls.append(float(F.cross_entropy(z, y)))
        As.append(float((z.argmax(1) == y).double().mean()))
        top = z.topk(2, dim=1).values if z.shape[1] > 1 else torch.zeros(z.shape[0], 2, dtype=DT) + float("inf")
        margins.append(float((top[:, 0] - top[:, 1]).min()))
    return torch.tensor(Ls, dtype=DT), torch.tensor(As, dtype=DT), margins


def assert_points_match(res, model, x, y, base, dirs, coefs, tag=""):
    L, A, margins = direct_points(model, x, y, base, dirs, coefs)
    assert res.losses.shape == L.shape and res.losses.dtype == DT, tag
    err = (res.losses - L).abs()
    bad = err > REL * L.abs().clamp_min(1.0)
    assert not bool(bad.any()), f"{tag}: loss mismatch at points {bad.nonzero().flatten().tolist()}, max err {float(err.max()):.3e}"
    for p, m in enumerate(margins):
        if m > 1e-9:  # away from an argmax tie the accuracy is a well-defined count
            assert float(res.accuracies[p]) == float(A[p]), f"{tag}: accuracy mismatch at point {p}"


def flatness_layout(K, sigmas):
    """One row per (direction k, sigma) with the single nonzero entry sigma in column k, then an all-zero row."""
    rows = []
    for k in range(K):
        for s in sigmas:
            r = torch.zeros(K, dtype=DT)
            r[k] = s
            rows.append(r)
    rows.append(torch.zeros(K, dtype=DT))
    return torch.stack(rows)


def grid_layout(K, i, j, ticks):
    """A 2-D grid over directions i and j (other columns zero), ticks include 0 so the axes are in it."""
    rows = []
    for a in ticks:
        for b in ticks:
            r = torch.zeros(K, dtype=DT)
            r[i], r[j] = a, b
            rows.append(r)
    return torch.stack(rows)


def strided_layout(K):
    """Rows that use direction sets with various spacings: evenly spaced (stride 2, 3, K-1), contiguous, uneven,
    single, reversed-order rows, all directions, none."""
    sets = [range(0, K, 2), range(1, K, 3), [0, K - 1], [3, 4], [0, 1, 5], [K - 2], list(range(K)), [],
            range(K - 1, -1, -3), [2, 3, 4, 5], [1], [0, 2, 4, 5]]
    g = torch.Generator().manual_seed(91)
    rows = []
    for s in sets:
        r = torch.zeros(K, dtype=DT)
        for k in s:
            r[k] = float(torch.randn(1, generator=g, dtype=DT))
        rows.append(r)
    return torch.stack(rows)


LAYOUTS = ["flatness", "identity", "grid", "strided", "dense"]


def coefficients(kind, K):
    if kind == "flatness":
        return flatness_layout(K, [0.05, 0.3, 1.0])
    if kind == "identity":
        return torch.eye(K, dtype=DT)
    if kind == "grid":
        return torch.cat([grid_layout(K, 0, 1, [-1.0, -0.25, 0.0, 0.5, 1.0]), grid_layout(K, K - 1, 3, [-0.5, 0.0, 0.75])])
    if kind == "strided":
        return strided_layout(K)
    return torch.randn(7, K, generator=torch.Generator().manual_seed(92), dtype=DT)


@st.composite
def point_problems(draw):
    # sampled_from lists put the most demanding choice first: derandomized hypothesis favours early elements
    n_hidden = draw(st.sampled_from([2, 3]))  # 3 or 4 Linear layers
    first = draw(st.sampled_from([64, 40, 12, 5]))
    hidden = [first] + [draw(st.integers(5, 40)) for _ in range(n_hidden - 1)]
    d = draw(st.sampled_from([20, 13, 6, 1]))
    classes = draw(st.integers(2, 5))
    bias = draw(st.booleans())
    n = draw(st.sampled_from([30, 17, 2, 1]))
    mask = draw(st.lists(st.sampled_from([True, False]), min_size=d, max_size=d))
    values = draw(st.lists(st.sampled_from([0.0, 1.5, -0.7, 3.0]), min_size=d, max_size=d))
    const = {j: values[j] for j in range(d) if mask[j]}
    K = draw(st.sampled_from([10, 12, 8, 3, 1]))
    P = draw(st.integers(1, 14))
    entries = draw(st.lists(st.one_of(st.just(0.0), st.floats(-2, 2, allow_nan=False, allow_infinity=False)),
                            min_size=P * K, max_size=P * K))
    zero_row = draw(st.booleans())
    zero_base = draw(st.booleans())
    dir_bias = draw(st.booleans())
    budget = draw(st.sampled_from([2_000, 20_000, 200_000, 1 << 30]))
    seed = draw(st.integers(0, 10_000))
    return dict(widths=[d, *hidden, classes], bias=bias, n=n, const=const, K=K, P=P, entries=entries,
                zero_row=zero_row, zero_base=zero_base, dir_bias=dir_bias, budget=budget, seed=seed)


@pytest.mark.parametrize("path", ["auto", "fast", "general"])
def test_losses_at_points_equal_direct_evaluation_plain_mlp(path):
    """loss at base + sum_k c[p,k] dirs[k] (base != model's own theta) evaluated directly; float64 outputs."""
    model, (x, y) = tiny_mlp(2, widths=(4, 7, 5, 3)), tiny_data(2, n=13)
    D = flat(model).numel()
    base = flat(model) + 0.3 * rand_vec(D, 60)
    dirs = torch.stack([rand_vec(D, 61), rand_vec(D, 62)])
    coefs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.3, 0.7], [-1.5, 2.0]], dtype=DT)
    res = utils.losses_at_points(model, x, y, base, dirs, coefs, path=path)
    L, A = _direct_points(model, x, y, base, dirs, coefs)
    assert res.losses.dtype == DT and res.accuracies.dtype == DT
    torch.testing.assert_close(res.losses, L, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(res.accuracies, A, rtol=0, atol=0)
    torch.testing.assert_close(flat(model), flat(tiny_mlp(2, widths=(4, 7, 5, 3))), rtol=0, atol=0)


def test_losses_at_points_general_path_on_cnn_and_relu_smallmlp_and_custom_loss():
    """General-path models (smooth CNN, SmallMLP with Flatten+ReLU) and a custom loss_fn: equal to direct evaluation."""
    lf = lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1)  # noqa: E731
    smlp = SmallMLP(hidden=(6, 5), in_features=8, generator=torch.Generator().manual_seed(3)).to(DT)
    xs = torch.randn(9, 1, 2, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    ys = torch.randint(0, 10, (9,), generator=torch.Generator().manual_seed(5))
    cases = [(TinyCNN(4), *cnn_data(4), "general"), (smlp, xs, ys, "general"), (smlp, xs, ys, "auto")]
    for model, x, y, path in cases:
        D = flat(model).numel()
        base = flat(model)
        dirs = torch.stack([rand_vec(D, 70), rand_vec(D, 71), rand_vec(D, 72)]) * 0.2
        coefs = torch.randn(4, 3, generator=torch.Generator().manual_seed(73), dtype=DT)
        for loss_fn in (None, lf):
            res = utils.losses_at_points(model, x, y, base, dirs, coefs, path=path, loss_fn=loss_fn)
            L, A = _direct_points(model, x, y, base, dirs, coefs, loss_fn)
            torch.testing.assert_close(res.losses, L, rtol=1e-11, atol=1e-13)
            torch.testing.assert_close(res.accuracies, A, rtol=0, atol=0)


def test_general_path_points_along_some_directions_equal_base_plus_the_full_combination():
    """A point moving along one of K directions (flatness, PAC-Bayes) gives exactly the loss at base + c @ D summed
    over all K; a point along two of three equals it to rounding; the base point (c = 0) is θ's loss."""
    model = TinyCNN(4)
    x, y = cnn_data(4)
    base, D = flat(model), flat(model).numel()
    dirs = torch.stack([rand_vec(D, 80 + k) for k in range(3)]) * 0.3
    coefs = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.7, 0.0], [-1.3, 0.0, 0.0], [0.0, 0.0, 0.2], [0.5, 0.0, -0.4]],
                         dtype=DT)
    losses = utils.losses_at_points(model, x, y, base, dirs, coefs, path="general", accuracy=False).losses
    full = torch.tensor([loss_at(model, base + c @ dirs, x, y) for c in coefs], dtype=DT)
    assert torch.equal(losses[:4], full[:4])
    torch.testing.assert_close(losses[4:], full[4:], rtol=1e-14, atol=0)
    assert losses[0] == loss_at(model, base, x, y)


@given(
    P=st.integers(1, 6),
    K=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    vals=st.lists(st.floats(-3, 3, allow_nan=False), min_size=18, max_size=18),
)
def test_losses_at_points_fast_path_equals_general_path(P, K, seed, vals):
    """For a plain MLP, path='fast' and path='general' give the same losses and accuracies for any coefficients."""
    model, (x, y) = tiny_mlp(3), tiny_data(3, n=10)
    D = flat(model).numel()
    base = flat(model)
    dirs = torch.randn(K, D, generator=torch.Generator().manual_seed(seed), dtype=DT) * 0.5
    coefs = torch.tensor(vals[: P * K], dtype=DT).reshape(P, K)
    fast = utils.losses_at_points(model, x, y, base, dirs, coefs, path="fast")
    gen = utils.losses_at_points(model, x, y, base, dirs, coefs, path="general")
    torch.testing.assert_close(fast.losses, gen.losses, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(fast.accuracies, gen.accuracies, rtol=0, atol=0)
    L, _ = _direct_points(model, x, y, base, dirs, coefs)
    torch.testing.assert_close(gen.losses, L, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("budget", [2_000, 20_000, 1 << 30])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("act", ["relu", "relu_tanh"])
def test_losses_at_points_wide_first_layer_many_directions(act, layout, budget, backend):
    """With a 64-unit first layer, 24 inputs of which 9 are constant, 4 Linear layers and K = 10 directions (with
    bias components), losses_at_points(path=backend.path) at theta_p = base + sum_k C[p, k] d_k equals a direct
    functional_call loop (1e-10 relative; accuracies equal wherever the top-2 logit margin exceeds 1e-9) for sparse
    coefficient layouts (flatness rows + a zero row, identity, 2-D grids with zero axes, rows using evenly / unevenly
    spaced direction sets, dense), for base = theta and base = 0, and for budgets that force several batches."""
    d, K = 24, 10
    model = make_mlp_inputs([d, 64, 12, 8, 5], act, seed=101)
    x = make_x(40, d, default_constants(d), seed=101)
    y = make_y(40, 5, seed=101)
    dirs = make_dirs(model, K, seed=101)
    C = coefficients(layout, K)
    for base in (flat(model), torch.zeros_like(flat(model))):
        res = utils.losses_at_points(model, x, y, base, dirs, C, path=backend.path, memory_budget=budget)
        assert_points_match(res, model, x, y, base, dirs, C, f"{layout} {budget}")


def test_losses_at_points_zero_point_and_ties(backend):
    """At theta = 0 (base 0, an all-zero coefficient row) every logit is 0, so the loss is exactly log C; argmax of a
    tie picks class 0, so the accuracy is the share of label 0 (torch.argmax's convention, as a direct evaluation
    gives). Checked on the fast path with constant-column inputs, a wide first layer and 9 directions."""
    d, K = 18, 9
    model = make_mlp_inputs([d, 64, 10, 6, 4], "relu", seed=111)
    x = make_x(30, d, default_constants(d), seed=111)
    y = make_y(30, 4, seed=111)
    dirs = make_dirs(model, K, seed=111)
    C = torch.cat([flatness_layout(K, [0.5]), torch.zeros(2, K, dtype=DT)])
    base = torch.zeros_like(flat(model))
    for budget in (2_000, 1 << 30):
        res = utils.losses_at_points(model, x, y, base, dirs, C, path=backend.path, memory_budget=budget)
        assert_points_match(res, model, x, y, base, dirs, C, str(budget))
        for p in (K, K + 1, K + 2):
            assert abs(float(res.losses[p]) - math.log(4)) <= 1e-14
            assert float(res.accuracies[p]) == float((y == 0).double().mean())


def test_losses_at_points_relu_bias_deferral_many_inactive_units(backend):
    """ReLU(o + b) = max(o, -b) + b: for a 4-Linear ReLU MLP with large biases (|b| ~ 2, so many units are off and
    many on), and directions that move the biases, the fast path's losses equal direct evaluation. Also bias-free
    directions (like random_directions') and a model without biases."""
    d, K = 12, 8
    x = make_x(35, d, default_constants(d), seed=121)
    y = make_y(35, 3, seed=121)
    for bias, b_scale, dir_bias in [(True, 2.0, True), (True, 2.0, False), (True, 0.1, True), (False, 0.0, False)]:
        model = make_mlp_inputs([d, 30, 20, 10, 3], "relu", bias=bias, seed=122, b_scale=b_scale)
        dirs = make_dirs(model, K, seed=122, scale=0.8, bias=dir_bias)
        C = torch.cat([coefficients("strided", K), coefficients("dense", K), flatness_layout(K, [0.2, 2.0])])
        for budget in (3_000, 1 << 30):
            res = utils.losses_at_points(model, x, y, flat(model), dirs, C, path=backend.path, memory_budget=budget)
            assert_points_match(res, model, x, y, flat(model), dirs, C, f"bias={bias} {b_scale} {dir_bias} {budget}")


def test_losses_at_points_noncontiguous_inputs(backend):
    """theta_p depends only on the VALUES of base, directions and coefficients: non-contiguous views (every other row
    of a larger direction tensor, a (D, K) tensor transposed, a strided base, transposed coefficients) give the
    direct loop's losses (and equal the contiguous call's numbers to 1e-12)."""
    d, K = 20, 9
    model = make_mlp_inputs([d, 64, 10, 4], "relu", seed=131)
    x = make_x(25, d, default_constants(d), seed=131)
    y = make_y(25, 4, seed=131)
    D = flat(model).numel()
    big = make_dirs(model, 2 * K, seed=131)
    dirs_rows = big[::2]  # row stride 2 D
    dirs_T = big[1::2].T.contiguous().T  # column-major (D, K) seen as (K, D)
    base_strided = torch.stack([flat(model), torch.zeros(D, dtype=DT)], 1)[:, 0]  # stride 2
    C = strided_layout(K)
    C_T = C.T.contiguous().T
    assert not dirs_rows.is_contiguous() and not dirs_T.is_contiguous() and not base_strided.is_contiguous()
    assert not C_T.is_contiguous()
    for dirs in (dirs_rows, dirs_T):
        for budget in (2_000, 1 << 30):
            res = utils.losses_at_points(model, x, y, base_strided, dirs, C_T, path=backend.path, memory_budget=budget)
            assert_points_match(res, model, x, y, flat(model), dirs.contiguous(), C, f"noncontig {budget}")
            ref = utils.losses_at_points(model, x, y, flat(model), dirs.contiguous(), C.contiguous(), path=backend.path,
                                         memory_budget=budget)
            assert float((res.losses - ref.losses).abs().max()) <= 1e-12 * float(ref.losses.abs().max())


@pytest.mark.parametrize("n", [1, 2])
def test_losses_at_points_tiny_batches_all_columns_constant(n, backend):
    """N = 1 (every column constant) and N = 2 with identical rows: fast-path losses equal direct evaluation for a
    wide 4-Linear ReLU/Tanh MLP with 10 directions, base theta and base 0, several budgets."""
    d, K = 14, 10
    x = make_x(1, d, {3: 0.0, 4: 0.0}, seed=141).repeat(n, 1)
    y = make_y(n, 3, seed=141)
    for act in ("relu", "relu_tanh"):
        model = make_mlp_inputs([d, 64, 9, 7, 3], act, seed=142)
        dirs = make_dirs(model, K, seed=142)
        C = torch.cat([flatness_layout(K, [0.1, 1.0]), coefficients("strided", K)])
        for base in (flat(model), torch.zeros_like(flat(model))):
            for budget in (2_000, 20_000, 1 << 30):
                res = utils.losses_at_points(model, x, y, base, dirs, C, path=backend.path, memory_budget=budget)
                assert_points_match(res, model, x, y, base, dirs, C, f"{act} n={n} {budget}")


def test_losses_at_points_flatten_images_with_blank_border(backend):
    """(N, 1, 6, 6) images whose 20 border pixels are 0 and one interior pixel always -0.7, behind nn.Flatten, in a
    4-Linear ReLU MLP with a 64-unit first layer: fast-path losses == direct evaluation for flatness and grid layouts."""
    g = torch.Generator().manual_seed(151)
    x = torch.zeros(30, 1, 6, 6, dtype=DT)
    x[:, 0, 1:5, 1:5] = torch.randn(30, 4, 4, generator=g, dtype=DT)
    x[:, 0, 3, 2] = -0.7
    y = make_y(30, 4, seed=151)
    model = make_mlp_inputs([36, 64, 10, 8, 4], "relu", seed=151, flatten=True)
    K = 8
    dirs = make_dirs(model, K, seed=151)
    for layout in ("flatness", "grid", "identity"):
        C = coefficients(layout, K)
        for budget in (2_000, 1 << 30):
            res = utils.losses_at_points(model, x, y, flat(model), dirs, C, path=backend.path, memory_budget=budget)
            assert_points_match(res, model, x, y, flat(model), dirs, C, f"{layout} {budget}")


@pytest.mark.parametrize("act", ["relu", "relu_tanh", "tanh_relu", "tanh"])
@settings(max_examples=30)
@given(prob=point_problems())
def test_losses_at_points_fast_equals_direct_property(act, prob, backend):
    """For random 3-4 Linear MLPs (first hidden width 64 / 40 / 12 / 5, others 5..40; ReLU / ReLU-Tanh / Tanh-ReLU /
    Tanh; with or without biases), d in {20, 13, 6, 1} inputs with random constant-column masks (values 0, 1.5, -0.7,
    3), N in {30, 17, 2, 1}, K in {12, 10, 8, 3, 1} directions, P = 1..14 coefficient rows with many exact zeros (and
    optionally an all-zero row), base theta or 0, and budgets 2 kB..1 GiB, losses_at_points(path=backend.path) equals the
    direct functional_call loop: losses to 1e-10 relative, accuracies exactly wherever no argmax is within 1e-9 of a
    tie."""
    p = prob
    model = make_mlp_inputs(p["widths"], act, bias=p["bias"], seed=p["seed"])
    d = p["widths"][0]
    x = make_x(p["n"], d, p["const"], seed=p["seed"])
    y = make_y(p["n"], p["widths"][-1], seed=p["seed"])
    dirs = make_dirs(model, p["K"], seed=p["seed"], bias=p["dir_bias"])
    C = torch.tensor(p["entries"], dtype=DT).reshape(p["P"], p["K"])
    if p["zero_row"]:
        C = torch.cat([C, torch.zeros(1, p["K"], dtype=DT)])
    base = torch.zeros_like(flat(model)) if p["zero_base"] else flat(model)
    res = utils.losses_at_points(model, x, y, base, dirs, C, path=backend.path, memory_budget=p["budget"])
    assert_points_match(res, model, x, y, base, dirs, C, f"{act} " + str({k: v for k, v in p.items() if k != "entries"}))


@given(seed=st.integers(0, 10_000), hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3),
       act=st.sampled_from(ACTIVATIONS_meas), bias=st.booleans(), k=st.integers(1, 6), p=st.integers(1, 7),
       sparse=st.booleans(), zero_base=st.booleans(), constant=st.sets(st.integers(0, 3), max_size=4))
def test_fast_and_general_paths_give_the_same_losses(seed, hidden, act, bias, k, p, sparse, zero_base, constant):
    # sparse coefficients (a probe uses one direction), a zero base (points as mixtures of endpoints, whose
    # first-layer block the fast path leaves out), constant input columns (MNIST's blank border) and two or more
    # hidden layers
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), *mlp_of([4, *hidden, 3], act, bias)).double()
    x, y = tiny_data(seed % 7, n=9)
    x = with_constant_columns(x, sorted(constant))
    theta = torch.zeros_like(utils.flat_parameters(model)) if zero_base else utils.flat_parameters(model)
    dirs = torch.randn(k, theta.numel(), generator=g, dtype=torch.float64)
    coeffs = torch.randn(p, k, generator=g, dtype=torch.float64)
    if sparse:
        coeffs *= torch.rand(p, k, generator=g, dtype=torch.float64) < 0.4
    fast = utils.losses_at_points(model, x, y, theta, dirs, coeffs, path="fast")
    general = utils.losses_at_points(model, x, y, theta, dirs, coeffs, path="general")
    torch.testing.assert_close(fast.losses, general.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.accuracies, general.accuracies, rtol=0, atol=0)
    n_fast, g_fast = utils.per_example_gradient_norms_sq(model, x, y, path="fast")
    n_gen, g_gen = utils.per_example_gradient_norms_sq(model, x, y, path="general")
    torch.testing.assert_close(n_fast, n_gen, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_fast, g_gen, rtol=1e-10, atol=1e-14)


@given(seed=st.integers(0, 10_000), budget=st.sampled_from([1 << 30, 3_000]), splits=st.integers(1, 4))
def test_a_point_evaluator_called_batch_by_batch_equals_one_call(seed, budget, splits):
    """The evaluator keeps the first layer's outputs between calls (or, under a small budget, recomputes them per
    row chunk): any split of the points into calls gives the numbers of one losses_at_points call."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), *mlp_of([4, 5, 3], nn.ReLU)).double()
    x, y = tiny_data(seed % 7, n=23)
    theta = utils.flat_parameters(model)
    dirs = torch.randn(3, theta.numel(), generator=g, dtype=torch.float64)
    coeffs = torch.randn(7, 3, generator=g, dtype=torch.float64)
    whole = utils.losses_at_points(model, x, y, theta, dirs, coeffs)
    evaluate = utils.point_evaluator(model, x, y, theta, dirs, memory_budget=budget)
    parts = [evaluate(c) for c in torch.tensor_split(coeffs, splits)]
    torch.testing.assert_close(torch.cat([p.losses for p in parts]), whole.losses, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(torch.cat([p.accuracies for p in parts]), whole.accuracies, rtol=0, atol=0)


def test_batched_accuracy_breaks_ties_as_argmax_does():
    # all logits equal (a zero last layer, zero bias): argmax predicts class 0 for every example,
    # so the accuracy is the share of label 0; the batched count must agree exactly
    model = tiny_mlp(5, widths=(4, 5, 3))
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    x, y = tiny_data(5, n=40)
    theta = utils.flat_parameters(model)
    direction = torch.zeros(1, theta.numel(), dtype=torch.float64)
    direction[0, : model[0].weight.numel()] = 1.0  # moves only the first layer: the logits stay tied
    coeffs = torch.tensor([[0.0], [0.5]], dtype=torch.float64)
    for path in ("fast", "general"):
        result = utils.losses_at_points(model, x, y, theta, direction, coeffs, path=path)
        assert result.accuracies.tolist() == [float((y == 0).double().mean())] * 2


@pytest.mark.parametrize("widths", [[4, 5, 6, 3], [4, 5, 6, 5, 3]])
@pytest.mark.parametrize("budget", [1 << 30, 2_000])
def test_deep_relu_networks_defer_each_hidden_bias_past_its_relu_exactly(widths, budget):
    """ReLU(o + b) = max(o, −b) + b, the next layer adding W·b: with two or more hidden ReLU layers (each
    hidden bias deferred) the fast path gives the general path's losses, whole or in small batches."""
    g = torch.Generator().manual_seed(5)
    model = mlp_of(widths, nn.ReLU)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 1.0, generator=g)  # large biases: W·b matters
    x, y = tiny_data(2, n=11)
    theta = utils.flat_parameters(model)
    dirs = torch.randn(3, theta.numel(), generator=g, dtype=torch.float64)
    coeffs = torch.randn(8, 3, generator=g, dtype=torch.float64)
    fast = utils.losses_at_points(model, x, y, theta, dirs, coeffs, path="fast", memory_budget=budget)
    general = utils.losses_at_points(model, x, y, theta, dirs, coeffs, path="general")
    torch.testing.assert_close(fast.losses, general.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.accuracies, general.accuracies, rtol=0, atol=0)


def test_large_hidden_biases_are_added_before_the_relu_so_float32_keeps_its_digits():
    """Carrying a bias b past a ReLU cancels W·(−b) against W·b where a unit is off, which loses float32 digits
    as |b| grows: with half the second layer's biases at −1000 the fast path stays as close to the float64
    answer as the general path (the bias is then added the plain way)."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[2].bias[:32] = -1000.0
    x, y = torch.randn(50, 20, generator=g), torch.randint(0, 10, (50,), generator=g)
    theta = utils.flat_parameters(model)
    dirs = 0.01 * torch.randn(2, theta.numel(), generator=g)
    coeffs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    exact = utils.losses_at_points(model.double(), x.double(), y, theta.double(), dirs.double(), coeffs.double(),
                                   path="general").losses
    model.float()
    fast = utils.losses_at_points(model, x, y, theta, dirs, coeffs, path="fast").losses
    general = utils.losses_at_points(model, x, y, theta, dirs, coeffs, path="general").losses
    assert float((fast - exact).abs().max()) <= 2 * float((general - exact).abs().max()) + 1e-6

