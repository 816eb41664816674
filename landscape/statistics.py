"""Does a measure rank models by their generalisation? Kendall's τ over all models, Jiang et al. 2020's
granulated τ Ψ (τ within groups of models that differ in one hyper-parameter only, averaged over the
hyper-parameters), and bootstrap intervals for both, all from scipy.stats. Below them, the pieces of a study whose
conclusions replicate (issue 25): cluster-bootstrap intervals, permutation tests of Ψ, Holm's correction, one
verdict rule, Jiang et al.'s conditional mutual information, Smith & Le's equal-temperature test, split-seed
replication, and `findings`, which assembles them per measure and baseline.

Sign convention: τ > 0 when a larger measure goes with a larger generalisation gap, so a sharpness measure
"predicts" generalisation when its τ is positive; a flatness measure (larger = flatter) should be oriented
by the caller (Jiang et al. use 1/σ² for the PAC-Bayes σ) before it is correlated.
"""

from __future__ import annotations

import itertools
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


# ----------------------------------------------------------------------------- a study whose conclusions replicate
# Jiang et al. 2020's design, tested as a reviewer would (Dziugaite et al. 2020): uncertainty that resamples
# configurations (models that share every key but the seed are one cluster), permutation tests within the groups
# Ψ averages over, Holm's correction across the measures, Jiang et al.'s conditional mutual information against the
# hyper-parameters, Smith & Le 2018's equal-temperature test, and every verdict recomputed on two halves of the seeds.

ALPHA = 0.05  # family-wise error rate of the verdicts (Holm across all the measures and baselines of one study)
VERDICTS = ("predicts", "reverse", "no evidence")


@dataclass
class PsiTest:
    """Ψ of one measure with its within-group permutation test."""

    psi: float
    per_axis: dict[str, float]  # ψ_a: the mean τ over the axis's groups
    groups: dict[str, int]  # how many groups (defined τ) stand behind each ψ_a
    p_value: float  # two-sided: P(|Ψ*| ≥ |Ψ|) with the measure permuted within each group, (1 + count)/(1 + R)
    axis_p_values: dict[str, float]  # the same test for each ψ_a alone (the batch-size axis: Keskar et al.)
    permutations: int


@dataclass
class ClusterIntervals:
    """Percentile intervals of τ and Ψ from resampling configurations."""

    tau_interval: tuple[float, float]
    psi_interval: tuple[float, float]
    clusters: int  # configurations resampled
    resamples: int
    confidence: float


@dataclass
class ConditionalMutualInformation:
    """Jiang et al. 2020's CMI: the minimum over S of I(V_μ; V_g | U_S) / H(V_g | U_S)."""

    value: float  # the minimum over the subsets where H(V_g | U_S) > 0 (NaN if there is none)
    per_subset: dict[tuple[str, ...], float]  # S -> normalised CMI (NaN where U_S determines V_g)
    pairs: int  # ordered pairs of models


@dataclass
class TemperatureTest:
    """Smith & Le 2018: do configurations at equal noise temperature εN/(B(1−m)) generalise alike?"""

    variance_ratio: float  # mean square within equal-temperature groups / mean square between them (1/F)
    f_statistic: float  # scipy.stats.f_oneway over the groups' configuration means
    p_value: float  # permutation: P(F* ≥ F), configurations shuffled among the groups within each stratum
    groups: int  # equal-temperature groups (two or more configurations each)
    configurations: int  # configurations in those groups
    permutations: int


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values: sorted p_(1) ≤ … ≤ p_(m), p̃_(i) = max_{j≤i} min(1, (m−j+1)·p_(j));
    NaN p-values are not tested: they stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    out[order] = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * p[order]))
    return out


def verdict(psi: float, p_holm: float, *, direction: int = 1, alpha: float = ALPHA) -> str:
    """The one rule every verdict comes from: "no evidence" unless the Holm-adjusted p-value of Ψ is below `alpha`;
    then "predicts" when Ψ has the sign the measure's direction claims (+1: larger measure, larger gap; −1: the
    opposite) and "reverse" when it has the other; a measure without a direction (0, e.g. λ_min) that is
    significant "predicts" whatever the sign of Ψ (its sign says how), and is never "reverse"."""
    if direction not in (-1, 0, 1):
        raise ValueError(f"direction must be +1, -1 or 0 (no direction), got {direction}")
    if not (math.isfinite(p_holm) and p_holm < alpha and math.isfinite(psi) and psi != 0):
        return "no evidence"
    return "predicts" if direction == 0 or math.copysign(1, psi) == direction else "reverse"


def configuration_clusters(configs: Sequence[dict], *, seed_key: str = "seed") -> np.ndarray:
    """Each model's cluster: models whose configs agree on every key but `seed_key` share one (numbered 0…C−1 in
    order of first appearance); clusters, not models, are the independent units a resample draws."""
    return _first_appearance([_key(c, seed_key) for c in configs])


def noise_temperature(lr: float, batch_size: int, *, examples: int, momentum: float = 0.0) -> float:
    """Smith & Le 2018's noise scale g = εN/(B(1−m)): learning rate ε, training examples N, batch size B, momentum m."""
    return lr * examples / (batch_size * (1 - momentum))


def seed_halves(configs: Sequence[dict], *, seed_key: str = "seed") -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the seeds as boolean masks over the models: the sorted distinct seeds at even
    positions, and those at odd positions (with 2 seeds, one seed each; with 3, two and one)."""
    seeds = np.array([c[seed_key] for c in configs])
    distinct = sorted(set(seeds.tolist()))
    if len(distinct) < 2:
        raise ValueError(f"splitting the seeds in halves needs two seeds or more, got {distinct}: add seeds")
    return np.isin(seeds, distinct[0::2]), np.isin(seeds, distinct[1::2])


def _key(config: dict, *left_out: str) -> tuple:
    """A config's hashable identity without the keys `left_out`."""
    return tuple(sorted((k, v) for k, v in config.items() if k not in left_out))


def _group_ids(configs: Sequence[dict], axis: str) -> np.ndarray:
    """For each model, its group along `axis`: models that share every key but `axis` (the seed included)."""
    return _first_appearance([_key(c, axis) for c in configs])


def _first_appearance(keys: Sequence[tuple]) -> np.ndarray:
    """Each key's number, 0, 1, … in order of first appearance (reproducible, unlike hash() of strings)."""
    ids: dict[tuple, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


@dataclass
class _AxisPairs:
    """The pairs (i < j) of models in the same group of one axis, sorted by group, with the gap's sign."""

    first: np.ndarray
    second: np.ndarray
    starts: np.ndarray  # where each group's pairs begin (groups with at least one pair only)
    gap_sign: np.ndarray
    model_group: np.ndarray  # every model's group id along the axis (for within-group permutations)

    @property
    def groups(self) -> int:
        return len(self.starts)

    @classmethod
    def of(cls, gap: np.ndarray, configs: Sequence[dict], axis: str) -> "_AxisPairs":
        model_group = _group_ids(configs, axis)
        first, second = np.triu_indices(len(configs), k=1)
        same = model_group[first] == model_group[second]
        order = np.argsort(model_group[first[same]], kind="stable")
        first, second = first[same][order], second[same][order]
        starts = np.flatnonzero(np.diff(model_group[first], prepend=-1) != 0)
        return cls(first, second, starts, np.sign(gap[first] - gap[second]), model_group)

    def taus(self, measure: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """τ_b of every group, (R, groups), for R rows of measures (R, n) and model weights (R, n) (a weight is how
        often a resample drew the model: pairs of copies of one model are tied on both sides, so they drop
        out of τ_b, and a pair of distinct models counts w_i·w_j times); NaN where a side is constant."""
        if not self.groups:
            return np.zeros((max(len(measure), len(weights)), 0))
        sign = np.sign(measure[:, self.first] - measure[:, self.second])
        pair_weight = weights[:, self.first] * weights[:, self.second]

        def per_group(values):  # (rows, pairs) -> (rows, groups); rows broadcast in the end
            return np.add.reduceat(values, self.starts, axis=1)

        num = per_group(pair_weight * sign * self.gap_sign)
        untied = per_group(pair_weight * np.abs(sign)) * per_group(pair_weight * np.abs(self.gap_sign))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(untied > 0, num / np.sqrt(untied), math.nan)


def _psi_of(per_axis: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Ψ (R,) and each ψ_a (R,) from each axis's group τ's (R, groups): the mean over the defined groups, then
    over the axes with a defined ψ_a; NaN where nothing is defined."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row is a NaN mean, as intended
        psi_a = [np.nanmean(t, axis=1) if t.shape[1] else np.full(t.shape[0], math.nan) for t in per_axis]
        return np.nanmean(np.stack(psi_a), axis=0), psi_a


def _checked(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict], axes: Sequence[str]
             ) -> tuple[np.ndarray, np.ndarray]:
    """The measure and gap as float arrays, one per config, all finite; at least one axis."""
    measure, gap = np.asarray(measure, dtype=float), np.asarray(gap, dtype=float)
    if not (measure.shape == gap.shape == (len(configs),)):
        raise ValueError(f"need one measure, gap and config per model, got {measure.shape}, {gap.shape} and "
                         f"{len(configs)}")
    if not (np.isfinite(measure).all() and np.isfinite(gap).all()):
        raise ValueError("the measure and the gap must be finite: leave out the models where they are not")
    if not axes:
        raise ValueError("name at least one hyper-parameter axis")
    return measure, gap


def _permute_within(values: np.ndarray, groups: np.ndarray, resamples: int, rng: np.random.Generator
                    ) -> np.ndarray:
    """`resamples` rows (R, n), each `values` permuted within every group: sorting by group, ties broken by
    uniform keys, orders each group's members at random, and model `slots[k]` takes the value of `drawn[k]`."""
    slots = np.argsort(groups, kind="stable")
    drawn = np.argsort(groups[None, :] + rng.random((resamples, len(values))), axis=1)
    out = np.empty((resamples, len(values)))
    out[:, slots] = values[drawn]
    return out


def _two_sided(null: np.ndarray, observed: float) -> float:
    """(1 + #{|null| ≥ |observed|})/(1 + R), a valid permutation p-value (Phipson & Smyth 2010); equality up to
    rounding counts as reaching it."""
    if not math.isfinite(observed):
        return math.nan
    return float((1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + len(null)))


def psi_permutation_test(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict],
                         axes: Sequence[str], *, seed_key: str = "seed", permutations: int = 999, seed: int = 0
                         ) -> PsiTest:
    """Jiang et al. 2020's Ψ with permutation tests, two-sided, p = (1 + #{|Ψ*| ≥ |Ψ|})/(1 + R). What is permuted
    is configurations, each carrying all its seeds' values (seed s's value goes to seed s's model), since a
    configuration's seeds share it (permuting models alone rejected 11.7% of 300 null studies at 0.05 on the lr
    axis). Each ψ_a alone: configurations permuted within the groups of axis a (groups fixed: the null of no
    association within them). Ψ: the null that holds within the groups of every axis at once is invariant under
    all those permutations together, which compose to every permutation of the configurations that share the keys
    that are neither axes nor the seed: each draw is one such permutation, every ψ_a* computed from it, so Ψ*
    keeps the dependence between the axes (independent draws per axis gave 9.3% at 0.05). Configurations are
    permuted only among those trained with the same seeds (a model left out must stay out)."""
    measure, gap = _checked(measure, gap, configs, axes)
    pairs = [_AxisPairs.of(gap, configs, a) for a in axes]
    ones = np.ones((1, len(gap)))
    observed = [p.taus(measure[None, :], ones) for p in pairs]
    psi, psi_a = _psi_of(observed)
    rng = np.random.default_rng(seed)
    permute = _ConfigurationPermutation.of(configs, seed_key=seed_key)
    joint = permute(measure, [_key(c, *axes, seed_key) for c in configs], permutations, rng)
    null = _psi_of([p.taus(joint, ones) for p in pairs])[0]
    null_a = [_psi_of([p.taus(permute(measure, [_key(c, a, seed_key) for c in configs], permutations, rng), ones)])[0]
              for p, a in zip(pairs, axes)]
    return PsiTest(float(psi[0]), {a: float(t[0]) for a, t in zip(axes, psi_a)},
                   {a: int(np.isfinite(t).sum()) for a, t in zip(axes, observed)}, _two_sided(null, float(psi[0])),
                   {a: _two_sided(n, float(t[0])) for a, n, t in zip(axes, null_a, psi_a)}, permutations)


@dataclass
class _ConfigurationPermutation:
    """Permutations of whole configurations: model (c, s) takes the value of model (π(c), s)."""

    clusters: np.ndarray  # each model's configuration
    seed_column: np.ndarray  # each model's seed, numbered
    table: np.ndarray  # (configurations, seeds): the model of each configuration and seed, −1 if there is none
    seed_sets: list[tuple]  # each configuration's seeds

    @classmethod
    def of(cls, configs: Sequence[dict], *, seed_key: str) -> "_ConfigurationPermutation":
        clusters = configuration_clusters(configs, seed_key=seed_key)
        seed_column = _first_appearance([(c[seed_key],) for c in configs])
        table = np.full((int(clusters.max(initial=-1)) + 1, int(seed_column.max(initial=-1)) + 1), -1)
        table[clusters, seed_column] = np.arange(len(configs))
        return cls(clusters, seed_column, table, [tuple(row >= 0) for row in table])

    def __call__(self, values: np.ndarray, blocks: Sequence[tuple], resamples: int, rng: np.random.Generator
                 ) -> np.ndarray:
        """(resamples, n) draws of `values`, each permuting configurations within `blocks` (one key per model,
        equal within a configuration) and among configurations with the same seeds."""
        first = np.unique(self.clusters, return_index=True)[1]
        block = _first_appearance([(blocks[f], seeds) for f, seeds in zip(first, self.seed_sets)])
        drawn = _permute_within(np.arange(len(block), dtype=float), block, resamples, rng).astype(np.int64)
        return values[self.table[drawn[:, self.clusters], self.seed_column]]


def _weighted_taus(measure: np.ndarray, gap: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Kendall's τ_b over all models for each row of model weights (R, n): ½·wᵀ(S_μ∘S_g)w over
    √(½wᵀ|S_μ|w · ½wᵀ|S_g|w), S the n×n sign matrices of the differences (scipy's τ_b of the expanded sample)."""
    s_m = np.sign(measure[:, None] - measure[None, :])
    s_g = np.sign(gap[:, None] - gap[None, :])
    num = np.einsum("ri,ij,rj->r", weights, s_m * s_g, weights)
    den = np.einsum("ri,ij,rj->r", weights, np.abs(s_m), weights) * np.einsum("ri,ij,rj->r", weights, np.abs(s_g),
                                                                               weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.sqrt(den), math.nan)


def cluster_bootstrap(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict], axes: Sequence[str],
                      *, seed_key: str = "seed", resamples: int = 999, confidence: float = 0.95, seed: int = 0
                      ) -> ClusterIntervals:
    """Percentile intervals of τ and Ψ from a cluster bootstrap (Davison & Hinkley 1997, §3.8): each resample draws
    C configurations with replacement out of the C (all seeds of a configuration move together), and τ and every
    group's τ are recomputed with the models weighted by how often they were drawn. Ψ's groups are the drawn
    configurations' own, so the axes are resampled jointly. Were every group of an axis to agree (all τ = 1), it
    would agree in every resample too, and the interval would be one point although a few groups cannot show
    that; so each resample also gives every axis one pseudo-group whose τ is +1 or −1 with probability ½ (a
    prior worth one group at no association, as Jeffreys' prior adds half a success and half a failure): an axis
    whose G groups all agree then spans (G−1)/(G+1) to 1, and the interval narrows only as groups accumulate.
    The pseudo-group pulls the resamples towards 0 by about ψ_a/(G+1), so Ψ's interval is widened to contain Ψ.
    Resamples where τ or Ψ is undefined (every drawn configuration constant) are skipped."""
    measure, gap = _checked(measure, gap, configs, axes)
    clusters = configuration_clusters(configs, seed_key=seed_key)
    count = int(clusters.max()) + 1
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(count, np.full(count, 1 / count), size=resamples)[:, clusters].astype(float)
    taus = _weighted_taus(measure, gap, weights)
    pairs = [_AxisPairs.of(gap, configs, a) for a in axes]
    psi = _psi_of([p.taus(measure[None, :], np.ones((1, len(gap)))) for p in pairs])[0][0]
    psis = _psi_of([_with_pseudo_group(p.taus(measure[None, :], weights), rng) for p in pairs])[0]
    low, high = _percentiles(psis, confidence)
    psi_interval = (min(low, float(psi)), max(high, float(psi))) if math.isfinite(psi) else (math.nan, math.nan)
    return ClusterIntervals(_percentiles(taus, confidence), psi_interval, count, resamples, confidence)


def _with_pseudo_group(taus: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Group τ's (R, G) with one more column, ±1 at random, where a row has any defined group (else NaN)."""
    pseudo = rng.choice([-1.0, 1.0], size=(taus.shape[0], 1))
    return np.hstack([taus, np.where(np.isfinite(taus).any(axis=1, keepdims=True), pseudo, math.nan)])


def _percentiles(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` percentile interval of the finite draws (NaN, NaN if there are none)."""
    finite = draws[np.isfinite(draws)]
    if not finite.size:
        return (math.nan, math.nan)
    low, high = np.quantile(finite, [(1 - confidence) / 2, (1 + confidence) / 2])
    return (float(low), float(high))


def _entropy(columns: list[np.ndarray]) -> float:
    """Shannon entropy (nats) of the joint empirical distribution of the rows of `columns` (0 for no columns)."""
    if not columns:
        return 0.0
    base = max(int(c.max()) for c in columns) + 2  # columns hold integers ≥ −1: one number per row, in base `base`
    if base ** len(columns) < 2**62:
        key = np.zeros(len(columns[0]), dtype=np.int64)
        for column in columns:
            key = key * base + (column.astype(np.int64) + 1)
        counts = np.unique(key, return_counts=True)[1]
    else:
        counts = np.unique(np.stack(columns, axis=1), axis=0, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def conditional_mutual_information(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict],
                                   axes: Sequence[str], *, max_conditioned: int = 2) -> ConditionalMutualInformation:
    """Jiang et al. 2020's CMI. Over every ordered pair (i, j) of distinct models: V_g = sign(g_i − g_j),
    V_μ = sign(μ_i − μ_j) (0 for a tie, a third value) and U_S = (h_i[S], h_j[S]), both models' values of the
    hyper-parameters in S; I(V_μ; V_g | U_S) = H(U,V_μ) + H(U,V_g) − H(U,V_μ,V_g) − H(U) from the empirical joint
    distribution over the pairs, normalised by H(V_g | U_S) = H(U,V_g) − H(U), for every S ⊆ axes with
    |S| ≤ max_conditioned (S = ∅ is the plain mutual information); the CMI is the minimum over the S where
    H(V_g | U_S) > 0. A measure that is a function of a hyper-parameter in S has V_μ fixed by U_S: 0 there. This is
    the paper's definition (I and H weighted by p(U_S)); the PGDL competition's scoring code by the same author
    averages over the values of U_S unweighted, counts ties as "−", includes each model paired with itself and
    takes |S| = 2 only, so its numbers differ."""
    measure, gap = _checked(measure, gap, configs, axes)
    i, j = np.nonzero(~np.eye(len(gap), dtype=bool))
    v_mu, v_g = np.sign(measure[i] - measure[j]), np.sign(gap[i] - gap[j])
    codes = {a: np.unique([c[a] for c in configs], return_inverse=True)[1].reshape(-1) for a in axes}
    per_subset = {}
    for size in range(min(max_conditioned, len(axes)) + 1):
        for subset in itertools.combinations(axes, size):
            u = [codes[a][i] for a in subset] + [codes[a][j] for a in subset]
            h_u, h_ug = _entropy(u), _entropy([*u, v_g])
            information = _entropy([*u, v_mu]) + h_ug - _entropy([*u, v_mu, v_g]) - h_u
            per_subset[subset] = max(information, 0.0) / (h_ug - h_u) if h_ug - h_u > 1e-12 else math.nan
    defined = [v for v in per_subset.values() if math.isfinite(v)]
    return ConditionalMutualInformation(min(defined) if defined else math.nan, per_subset, len(i))


def temperature_test(gap: Sequence[float], temperature: Sequence[float], configs: Sequence[dict], *,
                     varied: Sequence[str] = ("lr", "batch_size"), seed_key: str = "seed", permutations: int = 999,
                     seed: int = 0) -> TemperatureTest:
    """Smith & Le 2018's test: each configuration's mean gap over its seeds, grouped by equal temperature (to 12
    significant digits) within strata that fix every key but `varied` (what the temperature trades off) and the
    seed; only groups of two configurations or more count (NaN F and p where every mean is equal). F = MS_between/MS_within (scipy.stats.f_oneway); the
    claim is a large F (alike within, different between), tested by shuffling the configurations among the
    groups within each stratum: p = (1 + #{F* ≥ F})/(1 + R). NaN with fewer than two groups."""
    gap, temperature = np.asarray(gap, dtype=float), np.asarray(temperature, dtype=float)
    clusters = configuration_clusters(configs, seed_key=seed_key)
    first = np.unique(clusters, return_index=True)[1]
    if not np.allclose(temperature, temperature[first][clusters], rtol=1e-12):
        raise ValueError("the temperature differs between models of one configuration: it must be a function of "
                         "the hyper-parameters, not measured per model")
    means = np.bincount(clusters, weights=gap) / np.bincount(clusters)
    strata = _first_appearance([_key(configs[f], seed_key, *varied) for f in first])
    group = _first_appearance([(s, float(f"{t:.12g}")) for s, t in zip(strata, temperature[first])])
    sizes = np.bincount(group)
    kept = np.flatnonzero(sizes[group] >= 2)
    groups = [np.flatnonzero(group[kept] == g) for g in np.unique(group[kept])]
    if len(groups) < 2:
        return TemperatureTest(math.nan, math.nan, math.nan, len(groups), len(kept), 0)
    values = means[kept]
    shuffled = _permute_within(values, strata[kept], permutations, np.random.default_rng(seed))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # a group without spread gives F = inf, which is what it is
        f = float(_stats().f_oneway(*[values[g] for g in groups]).statistic)
        null = _stats().f_oneway(*[shuffled[:, g] for g in groups], axis=1).statistic
    p = float((1 + np.sum(null >= f * (1 - 1e-12))) / (1 + permutations)) if not math.isnan(f) else math.nan
    return TemperatureTest(1 / f if f else math.inf, f, p, len(groups), len(kept), permutations)


@dataclass
class MeasureStatistics:
    """Everything the study computes for one measure (or baseline) against the outcome."""

    tau: float  # Kendall's τ_b over all models
    tau_interval: tuple[float, float]  # cluster bootstrap (configurations resampled)
    psi: float
    psi_interval: tuple[float, float]
    per_axis: dict[str, float]
    groups: dict[str, int]  # groups behind each axis's ψ_a
    p_value: float  # Ψ's within-group permutation test, two-sided
    axis_p_values: dict[str, float]
    cmi: float
    cmi_per_subset: dict[tuple[str, ...], float]
    models: int
    configurations: int


@dataclass
class Finding:
    """One row of the study's findings: these names are what metrics.json's sweep.findings holds."""

    measure: str
    kind: str  # "measure" or "baseline"
    tau: float
    tau_interval: tuple[float, float]
    psi: float
    psi_interval: tuple[float, float]
    p_value: float
    p_holm: float  # Holm-adjusted across every measure and baseline of the study
    cmi: float
    verdict: str  # `verdict`: "predicts", "reverse" or "no evidence"
    replicated: bool  # the verdict is not "no evidence" and each half of the seeds reaches it too


@dataclass
class Findings:
    """The study's findings with what stands behind them."""

    records: list[Finding]
    statistics: dict[str, MeasureStatistics]
    half_verdicts: dict[str, tuple[str, str]]  # name -> the verdicts on the two halves of the seeds
    alpha: float


def measure_statistics(measure: Sequence[float], gap: Sequence[float], configs: Sequence[dict],
                       axes: Sequence[str], *, seed_key: str = "seed", resamples: int = 999,
                       confidence: float = 0.95, seed: int = 0) -> MeasureStatistics:
    """τ, Ψ, their cluster-bootstrap intervals, Ψ's permutation p-value and the CMI of one measure; all NaN (no
    groups) with fewer than two models."""
    if len(configs) < 2:
        nan2 = (math.nan, math.nan)
        return MeasureStatistics(math.nan, nan2, math.nan, nan2, {a: math.nan for a in axes}, {a: 0 for a in axes},
                                 math.nan, {a: math.nan for a in axes}, math.nan, {}, len(configs),
                                 len(set(configuration_clusters(configs, seed_key=seed_key).tolist())))
    test = psi_permutation_test(measure, gap, configs, axes, permutations=resamples, seed=seed)
    boot = cluster_bootstrap(measure, gap, configs, axes, seed_key=seed_key, resamples=resamples,
                             confidence=confidence, seed=seed)
    cmi = conditional_mutual_information(measure, gap, configs, axes)
    return MeasureStatistics(kendall_tau(measure, gap), boot.tau_interval, test.psi, boot.psi_interval,
                             test.per_axis, test.groups, test.p_value, test.axis_p_values, cmi.value,
                             cmi.per_subset, len(configs), boot.clusters)


def findings(rows: Sequence[dict], *, outcome: str, measures: dict[str, int], baselines: dict[str, int],
             axes: Sequence[str], seed_key: str = "seed", alpha: float = ALPHA, resamples: int = 999,
             confidence: float = 0.95, seed: int = 0) -> Findings:
    """One `Finding` per measure and baseline (name -> direction, as in `verdict`) of the models in `rows` (dicts
    with the axes, the seed, the outcome and each name), each over the models where it and the outcome are finite;
    Holm across all of them; the verdicts recomputed (Ψ's permutation test and Holm alone) on each half of the
    seeds (`seed_halves`), and `replicated` when both halves reach the full data's verdict (never for "no
    evidence", nor with a single seed)."""
    directions = {**measures, **baselines}
    if len(directions) != len(measures) + len(baselines):
        raise ValueError(f"a name is both a measure and a baseline: {sorted(set(measures) & set(baselines))}")
    configs = [{k: r[k] for k in (*axes, seed_key)} for r in rows]
    stats = {name: measure_statistics(*_usable(rows, configs, name, outcome), axes, seed_key=seed_key,
                                      resamples=resamples, confidence=confidence, seed=seed) for name in directions}
    verdicts = _verdicts({n: (s.psi, s.p_value) for n, s in stats.items()}, directions, alpha)
    halves = _half_verdicts(rows, configs, directions, outcome=outcome, axes=axes, seed_key=seed_key,
                            alpha=alpha, resamples=resamples, seed=seed)
    p_holm = dict(zip(directions, holm([stats[n].p_value for n in directions])))
    records = [Finding(n, "measure" if n in measures else "baseline", s.tau, s.tau_interval, s.psi, s.psi_interval,
                       s.p_value, float(p_holm[n]), s.cmi, verdicts[n],
                       verdicts[n] != "no evidence" and halves.get(n) == (verdicts[n], verdicts[n]))
               for n, s in stats.items()]
    return Findings(records, stats, halves, alpha)


def _usable(rows: Sequence[dict], configs: Sequence[dict], name: str, outcome: str
            ) -> tuple[list[float], list[float], list[dict]]:
    """(measure, outcome, configs) over the rows where both are finite numbers."""
    keep = [i for i, r in enumerate(rows) if all(_finite(r.get(k)) for k in (name, outcome))]
    return [rows[i][name] for i in keep], [rows[i][outcome] for i in keep], [configs[i] for i in keep]


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.number)) and math.isfinite(value)


def _verdicts(tests: dict[str, tuple[float, float]], directions: dict[str, int], alpha: float) -> dict[str, str]:
    """Each name's verdict from its (Ψ, p-value), Holm-adjusted across all the names."""
    adjusted = holm([p for _, p in tests.values()])
    return {n: verdict(psi, float(q), direction=directions[n], alpha=alpha)
            for (n, (psi, _)), q in zip(tests.items(), adjusted)}


def _half_verdicts(rows: Sequence[dict], configs: Sequence[dict], directions: dict[str, int], *, outcome: str,
                   axes: Sequence[str], seed_key: str, alpha: float, resamples: int, seed: int
                   ) -> dict[str, tuple[str, str]]:
    """The verdicts on each half of the seeds (empty with a single seed)."""
    if len({c[seed_key] for c in configs}) < 2:
        return {}
    per_half = []
    for mask in seed_halves(configs, seed_key=seed_key):
        half_rows = [r for r, keep in zip(rows, mask) if keep]
        half_configs = [c for c, keep in zip(configs, mask) if keep]
        tests = {}
        for name in directions:
            measure, gap, used = _usable(half_rows, half_configs, name, outcome)
            test = psi_permutation_test(measure, gap, used, axes, permutations=resamples, seed=seed) if len(used) > 1 \
                else None
            tests[name] = (test.psi, test.p_value) if test else (math.nan, math.nan)
        per_half.append(_verdicts(tests, directions, alpha))
    return {n: (per_half[0][n], per_half[1][n]) for n in directions}
