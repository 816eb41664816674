"""The training losses by name: one home for their definitions, so that training (`training.train(loss=...)`)
and every curvature measurement (`loss_fn=`) differentiate the same function."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def squared_error_loss(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """½‖f(x) − onehot(y)‖² summed over the C classes, averaged over the examples (Cohen et al. 2021's MSE on
    class labels): outputs (N, C), integer labels (N,). Its Hessian in the outputs is I/N, so the Gauss-Newton
    part of the parameter Hessian is JᵀJ/N."""
    target = F.one_hot(labels, outputs.shape[1]).to(outputs.dtype)
    return 0.5 * (outputs - target).pow(2).sum(dim=1).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,  # mean over examples of −log softmax(f(x))_y
    "mse": squared_error_loss,
}


def loss_function(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss called `name` ("cross_entropy" or "mse"), as `loss_fn(outputs, labels)` returning the mean over
    examples. Cross-entropy is `F.cross_entropy` itself, so the measurements keep their closed forms for it."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return LOSSES[name]
