"""The output margin: how far the true class's logit stands above the runner-up's (Jiang et al. 2020's
"output margin" baseline, which a generalisation measure must beat)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from landscape.plumbing import prepare


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 8192) -> np.ndarray:
    """Per-example margin f_y(x) − max_{j≠y} f_j(x) of the model's outputs (logits), (N,) float64; negative where
    an example is misclassified. The model is evaluated as it is (its train/eval mode is left alone)."""
    x, y = prepare(model, x, y)
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start : start + batch_size]).double()  # (b, C)
            target = y[start : start + batch_size]
            true = logits.gather(1, target[:, None])[:, 0]
            others = logits.scatter(1, target[:, None], -torch.inf).amax(dim=1)
            out.append((true - others).cpu())
    return torch.cat(out).numpy()


def output_margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, quantile: float = 0.1) -> float:
    """γ, the `quantile` (Jiang et al. 2020: the 10th percentile) of the margins over (x, y), linear
    interpolation between order statistics as numpy's default."""
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    return float(np.quantile(margins(model, x, y), quantile))
