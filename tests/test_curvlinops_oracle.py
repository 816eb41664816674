"""An independent oracle: curvlinops' Hessian operator with scipy's ARPACK (eigsh) gives the same λ_max."""

import warnings

import pytest
import torch
from scipy.sparse.linalg import eigsh

import data
import models
import training
import utils

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # curvlinops' dependencies warn about deprecated torch.jit
    from curvlinops import HessianLinearOperator


@pytest.fixture(scope="module")
def trained_float64():
    ds = data.load_dataset("mnist", download=False)
    x, y = ds.x_train[:600].double(), ds.y_train[:600]
    model = models.SmallMLP((24, 16), generator=torch.Generator().manual_seed(0)).double()
    training.train(model, x, y, epochs=3, lr=0.1, seed=0)
    return model, x, y


def curvlinops_top_eigenvalue(model, x, y) -> float:
    operator = HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)])
    return float(eigsh(operator.to_scipy(), k=1, which="LA", tol=1e-12)[0][0])


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalue_agrees_with_curvlinops_and_arpack(trained_float64, method):
    model, x, y = trained_float64
    oracle = curvlinops_top_eigenvalue(model, x, y)
    ours = utils.top_hessian_eigenvalue(model, x, y, tol=1e-10 if method == "lanczos" else 1e-12, max_iter=500,
                                        method=method)
    assert ours.converged
    assert ours.eigenvalue == pytest.approx(oracle, rel=1e-8 if method == "lanczos" else 1e-6)


def test_default_settings_stay_within_the_residual_bound_of_the_oracle(trained_float64):
    """At default tol the error |λ − λ_oracle| is below the certified bound ‖Hv − λv‖ ≤ tol·|λ|."""
    model, x, y = trained_float64
    oracle = curvlinops_top_eigenvalue(model, x, y)
    ours = utils.top_hessian_eigenvalue(model, x, y)
    assert abs(ours.eigenvalue - oracle) <= ours.residual + 1e-12
    assert abs(ours.eigenvalue - oracle) <= 1e-4 * oracle
