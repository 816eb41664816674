"""Properties every measurement shares: the model is left exactly as it was handed in (parameters, .grad,
mode), bad models are refused, a small memory budget changes no number, numpy's BLAS is kept to one thread."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    DT,
    ROOT,
    TinyCNN,
    Wrapped,
    assert_unchanged_diag,
    flat,
    make_data,
    make_mlp,
    rand_vec,
    snapshot_diag,
    tiny_data,
    tiny_mlp,
)
from torch import nn

import models
import utils
from landscape import spectrum


def _snapshot(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [m.training for m in model.modules()],
    )


def _assert_same(model, snap):
    params, grads, modes = snap
    for p, q in zip(model.parameters(), params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)
    for p, g in zip(model.parameters(), grads):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes


def _calls():
    return {
        "hessian_diagonal": lambda m, x, y: utils.hessian_diagonal(m, x, y, memory_budget=2_000),
        "trace_exact": lambda m, x, y: utils.hessian_trace(m, x, y, method="exact"),
        "trace_auto": lambda m, x, y: utils.hessian_trace(m, x, y, method="auto"),
        "layer_curvature": lambda m, x, y: utils.layer_curvature(m, x, y, exact_below=0, max_iter=30),
    }


def snapshot_meas(model):
    return ([p.detach().clone() for p in model.parameters()], [None if p.grad is None else p.grad.clone()
                                                              for p in model.parameters()],
            model.training, [p.requires_grad for p in model.parameters()])


def assert_unchanged_meas(model, snap):
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


def test_flat_parameters_is_concatenation_of_reshaped_parameters_in_order():
    """flat_parameters(model) == cat(p.reshape(-1) for p in model.parameters()), and is a detached copy."""
    m = TinyCNN(1)
    v = utils.flat_parameters(m)
    torch.testing.assert_close(v, flat(m), rtol=0, atol=0)
    assert not v.requires_grad
    v.add_(1.0)  # must not alias the parameters
    torch.testing.assert_close(flat(m), flat(TinyCNN(1)), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grads", ["none", "set"])
def test_functions_leave_parameters_grads_and_mode_unchanged(backend, mode, grads):
    """Every public function leaves parameters, .grad (None or a set tensor) and train/eval flags exactly as they were."""

    def build(seed):
        m = tiny_mlp(seed)
        model = backend.model(m)
        model.train(mode == "train")
        if grads == "set":
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.5 + i)
        return model

    model, other = build(0), build(1)
    x, y = tiny_data(0)
    D = flat(model).numel()
    snap, snap_other = _snapshot(model), _snapshot(other)
    v = rand_vec(D, 80)
    calls = [
        lambda: utils.flat_parameters(model),
        lambda: utils.hessian_vector_product(model, x, y, v),
        lambda: utils.top_hessian_eigenvalue(model, x, y, max_iter=10, method="lanczos"),
        lambda: utils.top_hessian_eigenvalue(model, x, y, max_iter=10, method="power"),
        lambda: utils.perturbation_flatness(model, x, y, [0.1], samples=3),
        lambda: utils.filter_normalize(v.clone(), model),
        lambda: utils.random_direction(model, torch.Generator().manual_seed(0)),
        lambda: utils.gradient_noise_scale(model, x, y),
        lambda: utils.per_example_gradient_norms_sq(model, x, y),
        lambda: utils.per_example_gradient_norms_sq(model, x, y, path="general"),
        lambda: utils.linear_interpolation(model, other, x, y, [0.0, 0.5, 1.0]),
        lambda: utils.loss_surface_2d(model, x, y, steps=3),
        lambda: utils.losses_at_points(model, x, y, flat(model), v.unsqueeze(0), torch.ones(2, 1, dtype=DT)),
    ]
    for i, call in enumerate(calls):
        call()
        _assert_same(model, snap)
        _assert_same(other, snap_other)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("preset_grad", [False, True])
@pytest.mark.parametrize("fn", sorted(_calls()))
def test_functions_leave_model_unchanged(fn, preset_grad, training):
    """A measurement is a pure function of (theta, data): parameters (state_dict), .grad (None stays None, a set .grad
    keeps its value), requires_grad and the train/eval flag of every module are exactly as before the call."""
    model = make_mlp([4, 5, 5, 3], "relu", seed=17)
    x, y = make_data(10, 4, 3, seed=17)
    model.train(training)
    if preset_grad:
        g = torch.Generator().manual_seed(99)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    snap = snapshot_diag(model)
    _calls()[fn](model, x, y)
    assert_unchanged_diag(model, snap)


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
    snap = snapshot_meas(model)
    measure(model, x, y)
    assert_unchanged_meas(model, snap)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rademacher_draws_the_same_numbers_and_leaves_the_same_generator_state_as_int64_draws_cast(dtype):
    """Drawn directly in the measurement's dtype (one buffer, not three): the ±1 of randint's int64 draws, cast."""
    from landscape.plumbing import rademacher

    drawn, reference = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = rademacher((7, 33), drawn, torch.zeros(1, dtype=dtype))
    assert got.dtype == dtype
    assert torch.equal(got, (torch.randint(0, 2, (7, 33), generator=reference) * 2 - 1).to(dtype))
    assert torch.equal(torch.randint(0, 1000, (5,), generator=drawn), torch.randint(0, 1000, (5,), generator=reference))


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
        spectrum._lanczos_runs(matmat, torch.ones(1, op.dim, dtype=torch.float64), max_steps=5)
        assert blas_threads() == before
    assert seen and all(threads == [1] * len(threads) for threads in seen)



def test_each_fast_path_names_an_equivalence_test_that_exists():
    """Every MLP fast path says in its docstring which test proves it equal to its reference; that test exists."""
    import re

    from landscape.hessian import MLPHessian
    from landscape.noise import MLPPerExample
    from landscape.points import MLPPoints

    for fast in (MLPHessian, MLPPoints, MLPPerExample):
        found = re.findall(r"(tests/test_\w+\.py)::(test_\w+)", fast.__doc__)
        assert found, fast.__name__
        for path, name in found:
            assert f"def {name}(" in (ROOT / path).read_text(), (fast.__name__, path, name)
