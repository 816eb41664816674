"""Does a measure rank models by their generalisation? Kendall's τ over all models, Jiang et al. 2020's
granulated τ Ψ (τ within groups of models that differ in one hyper-parameter only, averaged over the
hyper-parameters), and bootstrap intervals for both, all from scipy.stats.

Sign convention: τ > 0 when a larger measure goes with a larger generalisation gap, so a sharpness measure
"predicts" generalisation when its τ is positive; a flatness measure (larger = flatter) should be oriented
by the caller (Jiang et al. use 1/σ² for the PAC-Bayes σ) before it is correlated.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class RankCorrelation:
    """How well one measure ranks the models by their generalisation gap."""

    tau: float  # Kendall's τ_b of (measure, gap) over all models
    tau_interval: tuple[float, float]  # bootstrap interval of τ (percentile method)
    psi: float  # granulated τ: the mean over axes of the per-axis τ below
    psi_interval: tuple[float, float]  # bootstrap interval of Ψ
    per_axis: dict[str, float]  # axis -> mean τ within the groups of models that differ in that axis only
    p_value: float  # scipy's two-sided test of τ = 0
    models: int
    confidence: float


def _stats():
    """scipy.stats, imported on first use: its import is slow, and the default run (no sweep) never needs it."""
    import scipy.stats

    return scipy.stats


def kendall_tau(measure: Sequence[float], gap: Sequence[float]) -> float:
    """Kendall's τ_b (ties counted as in scipy.stats.kendalltau); NaN when either side is constant."""
    return float(_stats().kendalltau(measure, gap).statistic)


def group_taus(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict],
               axes: Sequence[str]) -> dict[str, list[float]]:
    """For each axis a, τ within every group of models that share all keys of `configs` except a (keys that
    are not axes, such as the seed, only define the groups); groups whose τ is undefined (one model, or a
    constant side) are left out."""
    measure, gap = np.asarray(measure, dtype=float), np.asarray(gap, dtype=float)
    out = {}
    for axis in axes:
        groups: dict[tuple, list[int]] = {}
        for i, config in enumerate(configs):
            groups.setdefault(tuple(sorted((k, v) for k, v in config.items() if k != axis)), []).append(i)
        taus = (kendall_tau(measure[g], gap[g]) for g in groups.values() if len(g) > 1)
        out[axis] = [t for t in taus if math.isfinite(t)]
    return out


def granulated_kendall_tau(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict],
                           axes: Sequence[str]) -> tuple[float, dict[str, float]]:
    """Jiang et al. 2020's Ψ = (1/|axes|) Σ_a ψ_a, ψ_a the mean of τ over the groups of models that differ in
    axis a only (`group_taus`); an axis with no defined group is NaN and left out of Ψ."""
    per_axis = {a: float(np.mean(t)) if t else math.nan for a, t in group_taus(measure, gap, configs, axes).items()}
    defined = [t for t in per_axis.values() if math.isfinite(t)]
    return (float(np.mean(defined)) if defined else math.nan), per_axis


def rank_correlation(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict],
                     axes: Sequence[str], *, confidence: float = 0.95, resamples: int = 999,
                     seed: int = 0) -> RankCorrelation:
    """τ and Ψ of one measure against the gap, each with a percentile bootstrap interval from
    scipy.stats.bootstrap: τ's resamples the models with replacement; Ψ's resamples, independently for each
    axis, the groups whose τ it averages (the units Ψ is a mean over; recomputing Ψ on resampled models would
    break the groups apart and cost a τ per group per resample). A model resample that drew one distinct
    model only (τ undefined) counts as τ = 0; an axis with a single group enters every Ψ resample as it is."""
    measure, gap = np.asarray(measure, dtype=float), np.asarray(gap, dtype=float)
    if not (measure.shape == gap.shape == (len(configs),)):
        raise ValueError(f"need one measure, gap and config per model, got {measure.shape}, {gap.shape} and "
                         f"{len(configs)}")
    n = len(configs)
    tau_result = _stats().kendalltau(measure, gap)
    taus = group_taus(measure, gap, configs, axes)
    psi, per_axis = granulated_kendall_tau(measure, gap, configs, axes)
    rng = np.random.default_rng(seed)
    tau_interval = psi_interval = (math.nan, math.nan)
    if n >= 3 and math.isfinite(tau_result.statistic):
        tau_interval = _interval(lambda: _stats().bootstrap(
            (np.arange(n),), lambda idx: _defined_tau(measure[idx], gap[idx]), vectorized=False, paired=True,
            confidence_level=confidence, n_resamples=resamples, method="percentile", random_state=rng))
    samples = [np.asarray(t) for t in taus.values() if len(t) > 1]
    fixed = [t[0] for t in taus.values() if len(t) == 1]  # an axis with one group: nothing to resample
    axes_defined = len(samples) + len(fixed)

    def psi_of(*resampled, axis=-1):
        return (np.sum([x.mean(axis=axis) for x in resampled], axis=0) + sum(fixed)) / axes_defined

    if samples:
        psi_interval = _interval(lambda: _stats().bootstrap(
            samples, psi_of, vectorized=True, paired=False, confidence_level=confidence, n_resamples=resamples,
            method="percentile", random_state=rng))
    elif fixed:
        psi_interval = (psi, psi)
    return RankCorrelation(float(tau_result.statistic), tau_interval, psi, psi_interval, per_axis,
                           float(tau_result.pvalue), n, confidence)


def _defined_tau(measure: np.ndarray, gap: np.ndarray) -> float:
    """τ of a bootstrap resample; one that drew a single distinct model (a constant side, τ undefined) carries
    no ranking information and counts as τ = 0, so that rare draws with few models do not void the interval."""
    tau = kendall_tau(measure, gap)
    return tau if math.isfinite(tau) else 0.0


def _interval(run) -> tuple[float, float]:
    """The interval of a scipy.stats.bootstrap call; when every resample gives the same value scipy warns that
    the distribution is degenerate, and the interval is that value at both ends."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _stats().DegenerateDataWarning)
        result = run()
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))
