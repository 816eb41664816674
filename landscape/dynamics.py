"""Gradient descent's linear stability on a quadratic, the yardstick of the edge of stability (Cohen et al. 2021)."""

from __future__ import annotations

import numpy as np


def stability_threshold(lr: float, momentum: float = 0.0) -> float:
    """2(1+β)/η: gradient descent with step η and heavy-ball momentum β (PyTorch's convention) on a quadratic
    converges along a direction of curvature λ > 0 exactly when λ < 2(1+β)/η (2/η without momentum)."""
    if lr <= 0 or not 0 <= momentum < 1:
        raise ValueError(f"need lr > 0 and 0 <= momentum < 1, got lr {lr} and momentum {momentum}")
    return 2 * (1 + momentum) / lr


def gradient_descent_is_stable(eigenvalues, *, lr: float, momentum: float = 0.0) -> bool:
    """Whether gradient descent on ½θᵀHθ converges to 0 from every start: every eigenvalue λ of H lies in
    (0, 2(1+β)/η). Along λ, θ ← (1 − ηλ)θ (β = 0) has |1 − ηλ| < 1 exactly there, and with momentum the roots of
    z² − (1 + β − ηλ)z + β lie inside the unit circle exactly there (Jury's test)."""
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    threshold = stability_threshold(lr, momentum)
    return bool(lam.size and np.all(lam > 0) and np.all(lam < threshold))
