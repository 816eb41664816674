"""The dense float64 answers that every estimate is checked against in exact mode (small models only)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from landscape.hessian import exact_hessian, hessian_operator
from landscape.noise import per_example_gradients
from landscape.plumbing import LossFn, ParamSpec, flat_parameters, parameter_shapes, select_parameters


@dataclass
class ExactCurvature:
    """The dense Hessian H (float64) of the mean loss on one data set, and what the estimates measure of it."""

    eigenvalues: np.ndarray  # (D,) ascending
    eigenvectors: torch.Tensor = field(repr=False)  # (D, D), column i belongs to eigenvalues[i]
    hessian: torch.Tensor = field(repr=False)  # (D, D)
    trace: float
    b_noise: float  # tr(HΣ)/(GᵀHG) from the exact per-example gradients
    layer_top: list[float]  # largest eigenvalue of each parameter tensor's diagonal block
    layer_trace: list[float]


def exact_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                    loss_fn: LossFn | None = None, params: ParamSpec = None) -> ExactCurvature:
    """Everything the dense Hessian says, computed on a float64 copy of `model` (the model is not changed).
    tr(HΣ) = tr(J_c·H·J_cᵀ)/(N−1) with J_c the centred per-example gradients (N, D)."""
    model64 = copy.deepcopy(model).double().cpu()  # dense answers on the CPU, wherever the model lives
    x64, y = (x.double() if x.is_floating_point() else x).cpu(), y.cpu()
    names = list(select_parameters(model, params).names)  # the copy's parameters are other tensors: by name
    dense = exact_hessian(model64, x64, y, loss_fn=loss_fn, params=names)
    eigenvalues, eigenvectors = torch.linalg.eigh(dense)
    offsets = np.cumsum([0] + [int(np.prod(shape)) for _, shape in parameter_shapes(model64, names)])
    blocks = [dense[a:b, a:b].numpy() for a, b in zip(offsets[:-1], offsets[1:])]
    grads = per_example_gradients(model64, x64, y, loss_fn=loss_fn, params=names)  # (N, D)
    mean = grads.mean(dim=0)
    centred = grads - mean
    trace_h_cov = float(((centred @ dense) * centred).sum()) / (x.shape[0] - 1)
    return ExactCurvature(eigenvalues.numpy(), eigenvectors, dense, float(np.trace(dense.numpy())),
                          trace_h_cov / float(mean @ dense @ mean),
                          [float(np.linalg.eigvalsh(b)[-1]) for b in blocks], [float(np.trace(b)) for b in blocks])


def product_rounding(model: nn.Module, x: torch.Tensor, y: torch.Tensor, vectors: torch.Tensor,
                     exact_products: torch.Tensor, *, loss_fn: LossFn | None = None, params: ParamSpec = None) -> float:
    """max ‖H·u − exact_products[i]‖ over the unit rows u of `vectors` (m, D), H·u computed in the model's own
    dtype: the rounding of the products every certificate r = ‖H·v − θ·v‖ is computed with. |θ − λ| ≤ r holds
    up to it: ‖H64·v − θv‖ ≤ r + ‖H32·v − H64·v‖."""
    like = flat_parameters(model, params)
    products = hessian_operator(model, x, y, loss_fn=loss_fn, params=params).matmat(vectors.to(like)).double()
    return float((products - exact_products.to(products)).norm(dim=1).max())
