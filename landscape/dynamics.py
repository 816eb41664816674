"""Gradient descent's linear stability on a quadratic, the yardstick of the edge of stability (Cohen et al. 2021),
and the edge of stability read off a tracked curvature series: progressive sharpening, and from which step a
series stays within a band around 2/η. The readings take their thresholds as arguments; the report states them."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------- the edge of stability in a series
@dataclass(frozen=True)
class BandOnset:
    """Where a tracked curvature series sits against a band (1 ± band)·T around the threshold T = 2/η."""

    reached: int | None  # the first step at which it is at least (1 − band)·T (None: never, within the run)
    onset: int | None  # the first step from which it stays within the band (None: it does not)
    inside_share: float  # the share of checks from the onset on that lie within the band (nan without an onset)
    held_share: float  # the share of the run's steps from the onset to the end (0 without an onset)


@dataclass(frozen=True)
class Sharpening:
    """Progressive sharpening (Cohen et al. 2021): λ_max's rise from its start until it first reaches the band
    (or over the whole run, when it never does)."""

    start: float  # λ_max at the first check
    peak: float  # the largest λ_max up to the check that reaches the band (or over the run)
    ratio: float  # peak / start
    rose: bool  # ratio > the stated rise factor, from a start below the band
    started_in_band: bool  # the first check was already at least (1 − band)·T: nothing to sharpen towards


@dataclass(frozen=True)
class EdgeOfStability:
    """One run's reading: λ_max's sharpening and band onset, batch sharpness's band onset (when tracked), and the
    median of each over the settled window (from the onset of the series that settles: batch sharpness when
    tracked for SGD, else λ_max; without an onset, the last `min_held` share of the run), in units of T."""

    threshold: float
    sharpening: Sharpening
    lambda_max: BandOnset
    batch_sharpness: BandOnset | None
    window_start: int
    lambda_ratio: float  # median λ_max / T over the window
    batch_ratio: float  # median batch sharpness / T over the window (nan when not tracked)


def _checked_series(steps, values) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.int64).reshape(-1)
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if s.size == 0 or s.size != v.size or np.any(np.diff(s) <= 0):
        raise ValueError(f"need one value per step and increasing steps, got {s.size} steps and {v.size} values")
    return s, v


def band_onset(steps, values, threshold: float, *, band: float, min_inside: float, min_held: float) -> BandOnset:
    """From which step a series stays within (1 ± band)·threshold: the first check inside the band from which at
    least `min_inside` of the checks to the end are inside it and which leaves at least `min_held` of the run's
    steps (first to last check) to the end, so that one last check inside does not count as staying. `reached`
    is the first check at or above the band's lower edge (an overshoot above the band counts)."""
    if not (threshold > 0 and 0 < band < 1 and 0 < min_inside <= 1 and 0 <= min_held <= 1):
        raise ValueError(f"need threshold > 0, 0 < band < 1, 0 < min_inside <= 1, 0 <= min_held <= 1; got "
                         f"{threshold}, {band}, {min_inside}, {min_held}")
    s, v = _checked_series(steps, values)
    ratio = v / threshold
    inside = np.abs(ratio - 1) <= band  # nan compares False: a missing value is outside
    above = np.flatnonzero(ratio >= 1 - band)
    reached = int(s[above[0]]) if above.size else None
    span = max(int(s[-1] - s[0]), 1)
    for i in np.flatnonzero(inside):
        held = (s[-1] - s[i]) / span
        if held < min_held:
            break  # later checks leave even less of the run
        share = float(inside[i:].mean())
        if share >= min_inside:
            return BandOnset(reached, int(s[i]), share, float(held))
    return BandOnset(reached, None, math.nan, 0.0)


def progressive_sharpening(steps, lambda_max, threshold: float, *, band: float, rise: float) -> Sharpening:
    """Whether λ_max rose by more than the factor `rise` from its first check before it first reached
    (1 − band)·threshold (over the whole run when it never did); a run that starts at or above that edge has
    nothing to sharpen towards and does not count as sharpening."""
    if not (threshold > 0 and 0 < band < 1 and rise > 1):
        raise ValueError(f"need threshold > 0, 0 < band < 1 and rise > 1, got {threshold}, {band} and {rise}")
    _, v = _checked_series(steps, lambda_max)
    start = float(v[0])
    above = np.flatnonzero(v / threshold >= 1 - band)
    upto = v[: above[0] + 1] if above.size else v
    peak = float(np.nanmax(upto))
    started = bool(above.size and above[0] == 0)
    ratio = peak / start if start > 0 else math.nan
    return Sharpening(start, peak, ratio, bool(not started and ratio > rise), started)


def edge_of_stability(steps, lambda_max, threshold: float, *, band: float, rise: float, min_inside: float,
                      min_held: float, batch_sharpness=None) -> EdgeOfStability:
    """One run read against T = threshold (2/η): progressive sharpening and the band onset of λ_max (Cohen et al.
    2021: under full-batch gradient descent λ_max rises to 2/η and hovers there), and, given the series, the
    band onset of batch sharpness (Andreyev & Beneventano 2024: under mini-batch SGD batch sharpness, not λ_max,
    settles at 2/η); with the medians of both over the settled window, in units of T."""
    s, lam = _checked_series(steps, lambda_max)
    kw = dict(band=band, min_inside=min_inside, min_held=min_held)
    onset = band_onset(s, lam, threshold, **kw)
    batch = None if batch_sharpness is None else band_onset(s, batch_sharpness, threshold, **kw)
    settled = (batch if batch is not None else onset).onset
    window_start = settled if settled is not None else int(s[-1] - min_held * (s[-1] - s[0]))
    window = s >= window_start
    batch_ratio = (float(np.nanmedian(np.asarray(batch_sharpness, dtype=np.float64)[window]) / threshold)
                   if batch is not None else math.nan)
    return EdgeOfStability(threshold, progressive_sharpening(s, lam, threshold, band=band, rise=rise), onset, batch,
                           window_start, float(np.nanmedian(lam[window]) / threshold), batch_ratio)
