"""Properties every measurement must have: the model is left untouched, fast and general paths agree,
chunking under a small memory budget changes nothing, and bad models are refused."""

import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import mlp_of, tiny_data, tiny_mlp, Wrapped
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import models
import utils


def snapshot(model):
    return ([p.detach().clone() for p in model.parameters()], [None if p.grad is None else p.grad.clone()
                                                              for p in model.parameters()],
            model.training, [p.requires_grad for p in model.parameters()])


def assert_unchanged(model, snap):
    params, grads, training, requires = snap
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert model.training == training and [p.requires_grad for p in model.parameters()] == requires


ALL_MEASUREMENTS = [
    lambda m, x, y: utils.hessian_vector_product(m, x, y, torch.ones_like(utils.flat_parameters(m))),
    lambda m, x, y: utils.top_hessian_eigenvalue(m, x, y, max_iter=5),
    lambda m, x, y: utils.top_hessian_eigenvalue(m, x, y, max_iter=5, method="power"),
    lambda m, x, y: utils.perturbation_flatness(m, x, y, [0.0, 0.1], samples=2),
    lambda m, x, y: utils.perturbation_flatness(m, x, y, [0.1], samples=2, adaptive=True),
    lambda m, x, y: utils.gradient_noise_scale(m, x, y),
    lambda m, x, y: utils.linear_interpolation(m, m, x, y, [0.0, 0.5, 1.0]),
    lambda m, x, y: utils.loss_surface_2d(m, x, y, steps=3),
]


@pytest.mark.parametrize("measure", ALL_MEASUREMENTS)
@pytest.mark.parametrize("kind", ["mlp", "wrapped", "cnn"])
def test_no_measurement_changes_the_model(measure, kind):
    if kind == "cnn":
        model = models.SmallCNN((2, 3), generator=torch.Generator().manual_seed(0)).double()
        x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
        y = torch.arange(6) % 10
    else:
        model = tiny_mlp(1) if kind == "mlp" else Wrapped(tiny_mlp(1))
        x, y = tiny_data(1)
    model.train()
    for p in model.parameters():  # a stale .grad must survive untouched
        p.grad = torch.full_like(p, 0.25)
    snap = snapshot(model)
    measure(model, x, y)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("layer", [nn.BatchNorm1d(5), nn.Dropout(0.5)])
def test_stochastic_layers_in_training_mode_are_refused(layer):
    model = nn.Sequential(nn.Linear(4, 5), layer, nn.Linear(5, 3)).double()
    x, y = tiny_data(0)
    with pytest.raises(ValueError, match="model.eval"):
        utils.gradient_noise_scale(model, x, y)
    model.eval()
    assert math.isfinite(utils.gradient_noise_scale(model, x, y).b_simple)


def test_non_finite_parameters_are_refused():
    model = tiny_mlp(0)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        utils.top_hessian_eigenvalue(model, *tiny_data(0))


ACTIVATIONS = [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU, nn.SiLU]


def with_constant_columns(x: torch.Tensor, columns) -> torch.Tensor:
    """x (N, d) with the given columns set to constants (0, 1.5, -0.7, ... in turn), as MNIST's border pixels."""
    x = x.clone()
    for i, c in enumerate(columns):
        x[:, c] = (0.0, 1.5, -0.7)[i % 3]
    return x


@given(seed=st.integers(0, 10_000), hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3),
       act=st.sampled_from(ACTIVATIONS), bias=st.booleans(), k=st.integers(1, 6), p=st.integers(1, 7),
       sparse=st.booleans(), zero_base=st.booleans(), constant=st.sets(st.integers(0, 3), max_size=4))
def test_fast_and_general_paths_give_the_same_losses(seed, hidden, act, bias, k, p, sparse, zero_base, constant):
    # sparse coefficients (a probe uses one direction) and a zero base (points as mixtures of endpoints)
    # take the fast path's other ways of mixing the directions; constant input columns are dropped from the
    # first layer's GEMM (forced here: on its own the split waits for enough weight rows to pay); two or more
    # hidden ReLU layers defer a bias past the ReLU
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), *mlp_of([4, *hidden, 3], act, bias)).double()
    x, y = tiny_data(seed % 7, n=9)
    x = with_constant_columns(x, sorted(constant))
    theta = torch.zeros_like(utils.flat_parameters(model)) if zero_base else utils.flat_parameters(model)
    dirs = torch.randn(k, theta.numel(), generator=g, dtype=torch.float64)
    coeffs = torch.randn(p, k, generator=g, dtype=torch.float64)
    if sparse:
        coeffs *= torch.rand(p, k, generator=g, dtype=torch.float64) < 0.4
    with mock.patch.object(utils, "_SPLIT_PAYS", 0):
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


@given(seed=st.integers(0, 10_000), blocks_in=st.lists(st.sets(st.integers(0, 3)), min_size=1, max_size=4),
       blocks_out=st.lists(st.sets(st.integers(0, 3)), min_size=1, max_size=4),
       activation=st.sampled_from([nn.Tanh, nn.ReLU]))
def test_restricted_products_equal_the_dense_hessian_times_v_masked(seed, blocks_in, blocks_out, activation):
    # matmat(V, outputs) = (H·vᵢ)⊙outputsᵢ on both paths, for directions and masks that each cover some of the
    # four parameter tensors: the fast path skips its input GEMMs where vᵢ or outputsᵢ has no first-layer weight
    # (and, for ReLU, takes φ' = [z > 0], φ'' = 0 in closed form)
    model = tiny_mlp(seed % 5, widths=(4, 5, 3), activation=activation)
    x, y = tiny_data(seed % 7)
    hessian = utils.exact_hessian(model, x, y)
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    b = min(len(blocks_in), len(blocks_out))
    g = torch.Generator().manual_seed(seed)

    def masked(blocks):
        mask = torch.zeros(b, offsets[-1], dtype=torch.float64)
        for i, chosen in enumerate(blocks[:b]):
            for block in chosen:
                mask[i, offsets[block] : offsets[block + 1]] = 1.0
        return mask

    vs = torch.randn(b, offsets[-1], generator=g, dtype=torch.float64) * masked(blocks_in)
    outputs = masked(blocks_out)
    expected = (vs @ hessian) * outputs
    for path in ("fast", "general"):
        op = utils.hessian_operator(model, x, y, path=path)
        torch.testing.assert_close(op.matmat(vs, outputs), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.matmat(vs), vs @ hessian, rtol=1e-10, atol=1e-12)


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


def test_a_tiny_memory_budget_chunks_without_changing_any_number():
    model = tiny_mlp(3)
    x, y = tiny_data(3, n=40)
    v = torch.randn(utils.flat_parameters(model).numel(), dtype=torch.float64)
    big, small = 1 << 30, 2048
    torch.testing.assert_close(utils.hessian_operator(model, x, y, memory_budget=small)(v),
                               utils.hessian_operator(model, x, y, memory_budget=big)(v), rtol=1e-12, atol=1e-14)
    assert len(utils.hessian_operator(model, x, y, memory_budget=small).chunks) > 1
    for m in (model, Wrapped(model)):
        a = utils.loss_surface_2d(m, x, y, steps=5, memory_budget=small)
        b = utils.loss_surface_2d(m, x, y, steps=5, memory_budget=big)
        np.testing.assert_allclose(a.losses, b.losses, rtol=1e-12)
        na, _ = utils.per_example_gradient_norms_sq(m, x, y, memory_budget=small)
        nb, _ = utils.per_example_gradient_norms_sq(m, x, y, memory_budget=big)
        torch.testing.assert_close(na, nb, rtol=1e-12, atol=0)


def test_lanczos_residual_is_the_true_residual_of_the_returned_pair():
    model = tiny_mlp(2)
    x, y = tiny_data(2)
    result = utils.top_hessian_eigenvalue(model, x, y, tol=1e-3)
    v = result.eigenvector
    assert v.norm().item() == pytest.approx(1.0, abs=1e-12)
    true = (utils.hessian_vector_product(model, x, y, v) - result.eigenvalue * v).norm().item()
    assert true == pytest.approx(result.residual, rel=1e-6, abs=1e-12)
    assert result.converged and result.residual <= 1e-3 * abs(result.eigenvalue)


def test_unconverged_solver_says_so():
    model = tiny_mlp(2, widths=(4, 8, 8, 3))
    x, y = tiny_data(2)
    result = utils.top_hessian_eigenvalue(model, x, y, tol=1e-14, max_iter=2)
    assert not result.converged and result.iterations == 2


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


def test_interpolating_different_architectures_is_refused():
    x, y = tiny_data(0)
    with pytest.raises(ValueError, match="same parameter"):
        utils.linear_interpolation(tiny_mlp(0), tiny_mlp(0, widths=(4, 6, 3)), x, y, [0.5])


@given(seed=st.integers(0, 10_000), hidden=st.lists(st.integers(1, 6), min_size=0, max_size=3),
       act=st.sampled_from(ACTIVATIONS), bias=st.booleans(), tail=st.booleans(),
       constant=st.sets(st.integers(0, 3), max_size=4))
def test_closed_form_mlp_hvp_equals_autograd_double_backward(seed, hidden, act, bias, tail, constant):
    """Pearlmutter's R-operator, written out for MLPs, gives the same H·v as reverse-over-reverse autograd,
    for any element-wise activation (φ'' ≠ 0 included), with or without biases, chunked or not, for a loss
    taken after a trailing activation (MSE on a Tanh output), and for inputs with constant columns (which the
    first layer's products skip)."""
    g = torch.Generator().manual_seed(seed)
    model = mlp_of([4, *hidden, 3], act, bias, tail=nn.Tanh() if tail else None)
    x, y = tiny_data(seed % 5, n=10)
    x = with_constant_columns(x, sorted(constant))
    loss_fn = None
    if tail:
        y = torch.randn(10, 3, generator=g, dtype=torch.float64)
        loss_fn = torch.nn.functional.mse_loss
    v = torch.randn(utils.flat_parameters(model).numel(), generator=g, dtype=torch.float64)
    general = utils.hessian_operator(model, x, y, loss_fn=loss_fn, path="general")(v)
    for budget in (1 << 30, 600):
        with mock.patch.object(utils, "_SPLIT_PAYS_PER_PRODUCT", 0):  # split whenever a column is constant
            fast = utils.hessian_operator(model, x, y, loss_fn=loss_fn, path="fast", memory_budget=budget)
        torch.testing.assert_close(fast(v), general, rtol=1e-11, atol=1e-13)


def test_numpy_blas_runs_single_threaded_inside_lanczos_and_is_restored_after():
    """Lanczos interleaves numpy's small eigh with torch's products: while it runs numpy's BLAS has one thread
    (its spinning workers took the cores from torch), and the caller's setting comes back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():  # of the BLAS copies that numpy's and scipy's wheels bundle
        return [lib["num_threads"] for lib in threadpool_info()
                if lib["user_api"] == "blas" and Path(lib["filepath"]).parent.name in ("numpy.libs", "scipy.libs")]

    model, (x, y) = tiny_mlp(2), tiny_data(2)
    op = utils.hessian_operator(model, x, y)
    seen = []

    def matmat(v):
        seen.append(blas_threads())
        return op.matmat(v)

    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        assert before, "numpy's wheel bundles its own OpenBLAS"
        utils._lanczos_runs(matmat, torch.ones(1, op.dim, dtype=torch.float64), max_steps=5)
        assert blas_threads() == before
    assert seen and all(threads == [1] * len(threads) for threads in seen)


@given(seed=st.integers(0, 10_000), n=st.integers(1, 9), d=st.integers(1, 12), rows=st.integers(1, 5),
       constant=st.sets(st.integers(0, 11), max_size=12))
def test_inputs_without_constant_columns_give_exact_products_with_x(seed, n, d, rows, constant):
    """With c the constant columns' values (zero elsewhere): X·Wᵀ + b = [X_v | 1]·[W_v | W·c + b]ᵀ, and Gᵀ·X (Gᵀ·X²)
    is Gᵀ·X_v (Gᵀ·X_v²) on the varying columns and (Gᵀ1)·c (·c²) on the constant ones. One row makes every
    column constant; no constant column needs no split."""
    g = torch.Generator().manual_seed(seed)
    x = with_constant_columns(torch.randn(n, d, generator=g, dtype=torch.float64), sorted(c for c in constant if c < d))
    w, b = torch.randn(rows, d, generator=g, dtype=torch.float64), torch.randn(rows, generator=g, dtype=torch.float64)
    grads = torch.randn(n, rows, generator=g, dtype=torch.float64)
    split = utils._InputColumns.split(x, lambda constant: True)
    same = [j for j in range(d) if bool((x[:, j] == x[0, j]).all())]
    if not same:
        assert split is None
        return
    assert split.x.shape == (n, d - len(same) + 1) and bool((split.x[:, -1] == 1).all())
    torch.testing.assert_close(split.x @ split.weights(w, b).T, x @ w.T + b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(split.x @ split.weights(w).T, x @ w.T, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(split.spread(grads.T @ split.x), grads.T @ x, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(split.spread(grads.T @ split.x.square(), squared=True), grads.T @ x.square(),
                               rtol=1e-13, atol=1e-13)


def test_inputs_are_split_only_when_skipping_the_constant_columns_pays():
    """Skipping c of d constant columns saves c·R multiply-adds per row of X for R weight rows and costs about
    160·d once (finding them, copying X): 20 flatness directions of a 128-wide first layer on MNIST-like inputs
    (125 of 784 constant) pay, a surface's 3 do not. Per Hessian product the columns' moves cost about 2**25
    multiply-adds: 4,000 examples pay, 1,000 do not. No constant column: nothing to split."""
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    theta = utils.flat_parameters(model)
    layers = utils._mlp_layers(model)
    for n, rows in ((4000, 21), (4000, 3), (1000, 21), (1000, 3)):
        x = with_constant_columns(torch.randn(n, 784), range(125))
        first = utils._MLPFirstLayer(layers, x, theta, torch.randn(rows - 1, theta.numel()), 1 << 30)
        assert first.split == (rows == 21)
        op = utils.hessian_operator(model, x, torch.zeros(n, dtype=torch.long))
        assert (op.inputs is not None) == (n == 4000)
    op = utils.hessian_operator(model, torch.randn(4000, 784), torch.zeros(4000, dtype=torch.long))
    assert op.inputs is None


def evenly_spaced(rows) -> bool:
    return len(rows) < 3 or len({b - a for a, b in zip(rows, rows[1:])}) == 1


def mixable(rows) -> bool:
    """Rows one GEMM over a strided view mixes: evenly spaced, perhaps but for the first (a rank-one update)."""
    return evenly_spaced(rows) or evenly_spaced(rows[1:])


@given(used=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=0, max_size=30), most=st.integers(1, 7))
def test_point_batches_cover_the_points_in_order_and_end_early_only_to_keep_rows_evenly_spaced(used, most):
    """Batches are consecutive, cover every point once, hold at most `most`; one that ends short (not the last)
    does so because its rows were mixable by one GEMM and the next point's would break that."""
    used = np.array(used, dtype=bool).reshape(len(used), 5)
    batches = utils._point_batches(used, most)
    assert [i for s in batches for i in range(s.start, s.stop)] == list(range(len(used)))
    for s, after in zip(batches, batches[1:]):
        assert 1 <= s.stop - s.start <= most
        if s.stop - s.start < most:
            rows = np.flatnonzero(used[s].any(axis=0)).tolist()
            joined = np.flatnonzero(used[s.start : s.stop + 1].any(axis=0)).tolist()
            assert mixable(rows) and not mixable(joined)


@pytest.mark.parametrize("most", [1, 2, 4, 6, 7])
@pytest.mark.parametrize("sigmas", [6, 1])
def test_probe_batches_are_full_and_each_mixed_by_one_gemm(most, sigmas):
    """θ's point, then `sigmas` points for each of 20 directions (θ's row and one direction's row each, as
    flatness and PAC-Bayes probes): every batch but the last holds `most` points and its rows are θ's and an
    evenly spaced block, so each batch mixes its points with one GEMM."""
    used = np.zeros((1 + 20 * sigmas, 21), dtype=bool)
    used[:, 0] = True
    for k in range(20):
        used[1 + sigmas * k : 1 + sigmas * (k + 1), k + 1] = True
    batches = utils._point_batches(used, most)
    assert all(s.stop - s.start == most for s in batches[:-1])
    for s in batches:
        assert mixable(np.flatnonzero(used[s].any(axis=0)).tolist())


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
