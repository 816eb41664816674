"""Rank statistics of the sweep: Kendall's τ against scipy, Jiang et al.'s granulated Ψ against hand-computed
values on a 2×2 grid, and bootstrap intervals that cover a known population τ."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st

import utils

GRID = [{"a": a, "b": b} for a in (0, 1) for b in (0, 1)]  # models (0,0), (0,1), (1,0), (1,1)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=3, max_size=30))
def test_kendall_tau_is_scipys_tau_b_with_ties(pairs):
    m, g = np.array(pairs, dtype=float).T
    expected = scipy.stats.kendalltau(m, g).statistic
    got = utils.kendall_tau(m, g)
    assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected, abs=1e-12)


def test_granulated_tau_by_hand_on_a_2x2_grid_all_groups_agree():
    """m = (1,2,3,4), gap = (1,3,2,5). Axis a: groups b=0 {(1,1),(3,2)} concordant, b=1 {(2,3),(4,5)} concordant:
    ψ_a = 1; axis b: a=0 {(1,1),(2,3)}, a=1 {(3,2),(4,5)}, both concordant: ψ_b = 1; Ψ = 1. Over all four
    models one pair of six, (2,3) against (3,2), is discordant: τ = (5 − 1)/6 = 2/3."""
    m, g = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    psi, per_axis = utils.granulated_kendall_tau(m, g, GRID, ["a", "b"])
    assert per_axis == {"a": 1.0, "b": 1.0} and psi == 1.0
    assert utils.kendall_tau(m, g) == pytest.approx(2 / 3)


def test_granulated_tau_by_hand_on_a_2x2_grid_groups_disagree():
    """gap = (1,3,2,0): axis a groups +1 (b=0) and −1 (b=1): ψ_a = 0; axis b +1 (a=0), −1 (a=1): ψ_b = 0; Ψ = 0,
    while over all models 2 pairs are concordant and 4 discordant: τ = −1/3. Ψ and τ can disagree."""
    m, g = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 0.0]
    psi, per_axis = utils.granulated_kendall_tau(m, g, GRID, ["a", "b"])
    assert per_axis == {"a": 0.0, "b": 0.0} and psi == 0.0
    assert utils.kendall_tau(m, g) == pytest.approx(-1 / 3)


def test_granulated_tau_groups_keep_the_seed_fixed_and_skip_undefined_groups():
    """With two seeds, a group varies only its axis at a fixed seed: seed 0 is the concordant grid above (group
    τ's +1, +1 on each axis), seed 1 the disagreeing one (+1, −1), so ψ_a = ψ_b = (1 + 1 + 1 − 1)/4 = 1/2. A
    group that is constant in the measure (τ undefined) is left out of its axis's mean."""
    configs = [{**c, "seed": s} for s in (0, 1) for c in GRID]
    m = [1.0, 2.0, 3.0, 4.0] * 2
    g = [1.0, 3.0, 2.0, 5.0] + [1.0, 3.0, 2.0, 0.0]
    psi, per_axis = utils.granulated_kendall_tau(m, g, configs, ["a", "b"])
    assert per_axis == {"a": 0.5, "b": 0.5} and psi == 0.5
    flat = [1.0, 1.0, 3.0, 4.0]  # the a=0 group along b is constant in the measure: undefined, left out
    _, per_axis = utils.granulated_kendall_tau(flat, [1.0, 3.0, 2.0, 5.0], GRID, ["a", "b"])
    assert per_axis["b"] == 1.0


def test_bootstrap_interval_covers_a_known_population_tau():
    """For a bivariate normal with correlation ρ, Kendall's τ = (2/π)·arcsin ρ. Over 40 independent samples of
    100 models the 95% interval must cover it about 38 times; 34 or fewer has probability under 1%."""
    rho = 0.6
    truth = 2 / math.pi * math.asin(rho)
    configs = [{"i": i} for i in range(100)]
    covered = 0
    for seed in range(40):
        z = np.random.default_rng(seed).multivariate_normal([0, 0], [[1, rho], [rho, 1]], size=100)
        r = utils.rank_correlation(z[:, 0], z[:, 1], configs, [], resamples=499, seed=seed)
        covered += r.tau_interval[0] <= truth <= r.tau_interval[1]
        assert r.tau_interval[0] <= r.tau <= r.tau_interval[1]
    assert covered >= 35


def test_psi_interval_resamples_groups_and_collapses_when_every_group_agrees():
    """Ψ's interval is a bootstrap over each axis's groups: when every group's τ is 1, every resample is 1."""
    configs = [{**c, "seed": s} for s in range(3) for c in GRID]
    m = [1.0, 2.0, 3.0, 4.0] * 3
    g = [1.0, 3.0, 2.0, 5.0] * 3
    r = utils.rank_correlation(m, g, configs, ["a", "b"])
    assert r.psi == 1.0 and r.psi_interval == (1.0, 1.0) and r.models == 12
    mixed = utils.rank_correlation(m, [1.0, 3.0, 2.0, 5.0] * 2 + [1.0, 3.0, 2.0, 0.0], configs, ["a", "b"])
    low, high = mixed.psi_interval
    assert low < mixed.psi < high and -1 <= low and high <= 1


def test_rank_correlation_needs_one_value_per_model():
    with pytest.raises(ValueError, match="one measure, gap and config per model"):
        utils.rank_correlation([1.0, 2.0], [1.0, 2.0, 3.0], GRID[:3], ["a"])


# ----------------------------------------------------------------------------- the study (issue 25)
from landscape import statistics  # noqa: E402  (the study's pieces are not part of utils' public face)

STUDY_GRID = [{"batch_size": b, "lr": lr, "width": w} for b in (16, 64, 256, 1024) for lr in (0.01, 0.05, 0.2, 0.5)
              for w in (64, 256)]
STUDY_AXES = ("batch_size", "lr", "width")


def study_configs(seeds=(0, 1)):
    return [{**c, "seed": s} for c in STUDY_GRID for s in seeds]


def test_holm_by_hand():
    """p = (0.01, 0.04, 0.03, 0.005), m = 4: sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04
    → running maximum 0.02, 0.03, 0.06, 0.06; a NaN is not tested and does not count in m; capped at 1."""
    np.testing.assert_allclose(statistics.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(statistics.holm([0.01, math.nan, 0.04]), [0.02, math.nan, 0.04], rtol=1e-12)
    np.testing.assert_allclose(statistics.holm([0.6, 0.7]), [1.0, 1.0])


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_is_at_least_the_raw_p_value_monotone_and_at_most_bonferroni(p):
    adjusted = statistics.holm(p)
    assert np.all(adjusted >= np.asarray(p) - 1e-15) and np.all(adjusted <= np.minimum(1, len(p) * np.asarray(p)) + 1e-15)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adjusted[order]) >= 0)


def test_verdict_on_both_sides_of_alpha_and_for_each_direction():
    assert statistics.verdict(0.3, 0.049, alpha=0.05) == "predicts"
    assert statistics.verdict(0.3, 0.05, alpha=0.05) == "no evidence"
    assert statistics.verdict(-0.3, 0.049, alpha=0.05) == "reverse"
    assert statistics.verdict(-0.3, 0.049, direction=-1, alpha=0.05) == "predicts"
    assert statistics.verdict(-0.3, 0.049, direction=0, alpha=0.05) == "predicts"  # λ_min: no direction, no reverse
    assert statistics.verdict(-0.3, 0.051, direction=0, alpha=0.05) == "no evidence"
    assert statistics.verdict(0.3, math.nan) == "no evidence"
    with pytest.raises(ValueError, match="direction must be"):
        statistics.verdict(0.3, 0.01, direction=2)


def test_cmi_by_hand_on_a_2x2_grid():
    """Models (a,b) = (0,0), (0,1), (1,0), (1,1), gap g = 2a + b, measure μ = a: 12 ordered pairs.
    S = ∅: (V_μ, V_g) = (0, ±1) 2 pairs each, (+1,+1) and (−1,−1) 4 each; I = 2·(1/3)·ln 2, H(V_g) = ln 2 → 2/3.
    S = {a}: U = (a_i, a_j) fixes V_μ → I = 0 → 0. S = {b}: given (b_i, b_j), V_μ determines V_g (for (0,1):
    V_μ = 0 → V_g = −1, ±1 → ±1) → I = H(V_g|U) → 1. S = {a, b} names both models: H(V_g | U) = 0, undefined.
    The CMI is the minimum over the defined S: 0 (μ only follows the hyper-parameter a)."""
    r = statistics.conditional_mutual_information([0, 0, 1, 1], [0, 1, 2, 3], GRID, ["a", "b"])
    assert r.pairs == 12 and r.value == 0.0 and math.isnan(r.per_subset[("a", "b")])
    assert r.per_subset[()] == pytest.approx(2 / 3, abs=1e-12)
    assert r.per_subset[("a",)] == pytest.approx(0, abs=1e-12) and r.per_subset[("b",)] == pytest.approx(1, abs=1e-12)


@given(st.integers(0, 10**6))
def test_cmi_of_a_measure_that_orders_models_as_the_gap_does_is_one(seed):
    configs = study_configs()
    gap = np.random.default_rng(seed).normal(size=len(configs))
    r = statistics.conditional_mutual_information(np.exp(gap), gap, configs, STUDY_AXES)
    assert r.value == pytest.approx(1, abs=1e-12) and len(r.per_subset) == 1 + 3 + 3


@given(st.integers(0, 10**6))
def test_permutation_test_psi_and_groups_are_the_granulated_tau(seed):
    rng = np.random.default_rng(seed)
    configs = study_configs()
    m, g = rng.integers(0, 4, len(configs)).astype(float), rng.normal(size=len(configs))  # ties in the measure
    test = statistics.psi_permutation_test(m, g, configs, STUDY_AXES, permutations=9)
    psi, per_axis = utils.granulated_kendall_tau(m, g, configs, STUDY_AXES)
    assert test.psi == pytest.approx(psi, abs=1e-12)
    assert test.per_axis == pytest.approx(per_axis, abs=1e-12)
    assert test.groups == {a: len(t) for a, t in statistics.group_taus(m, g, configs, STUDY_AXES).items()}


def null_study(rng, configs):
    """A measure unrelated to the gap within groups: each shares a configuration effect with its seeds (clusters),
    the gap also follows the learning rate, the measure its own random configuration effect."""
    clusters = statistics.configuration_clusters(configs)
    gap = np.log([c["lr"] for c in configs]) + rng.normal(size=clusters.max() + 1)[clusters] + rng.normal(size=len(configs))
    return rng.normal(size=clusters.max() + 1)[clusters] + rng.normal(size=len(configs)), gap


def structured_null_study(rng, configs):
    """A null where the measure follows the width and the batch size, the gap the learning rate, each with its own
    configuration effect: within no group does the measure say anything about the gap."""
    clusters = statistics.configuration_clusters(configs)
    width, lr, batch = (np.array([c[k] for c in configs], dtype=float) for k in ("width", "lr", "batch_size"))
    measure = 2 * (width == 256) + 0.3 * np.log(batch) + rng.normal(size=clusters.max() + 1)[clusters]
    gap = np.log(lr) + rng.normal(size=clusters.max() + 1)[clusters]
    return measure + 0.5 * rng.normal(size=len(configs)), gap + 0.5 * rng.normal(size=len(configs))


def test_permutation_p_value_is_uniform_under_the_null():
    """Over 300 null studies the p-values of Ψ are uniform: Kolmogorov–Smirnov against U(0, 1) does not reject at
    1% (the p-values' grid of 1/200 moves the KS statistic by at most 0.005, against a critical 0.094), and the
    share below 0.05 is within 3 standard errors (0.038) of 0.05. Each axis's own p-value is valid: at most
    0.05 + 0.038 below 0.05 (not uniform: a width group holds two configurations, so ψ_width's permutations take
    few values and ties make it conservative). The same test rejects under an effect."""
    configs = study_configs()
    rng = np.random.default_rng(0)
    tests = [statistics.psi_permutation_test(*null_study(rng, configs), configs, STUDY_AXES, permutations=199, seed=k)
             for k in range(300)]
    p = np.array([t.p_value for t in tests])
    assert scipy.stats.kstest(p, "uniform").pvalue > 0.01
    assert abs(np.mean(p <= 0.05) - 0.05) <= 3 * math.sqrt(0.05 * 0.95 / 300)
    for axis in STUDY_AXES:
        assert np.mean([t.axis_p_values[axis] <= 0.05 for t in tests]) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)
    m, g = null_study(rng, configs)
    assert statistics.psi_permutation_test(g + 0.5 * m, g, configs, STUDY_AXES, permutations=199).p_value == 0.005


def test_permutation_tests_stay_valid_when_measure_and_gap_follow_different_hyper_parameters():
    """A configuration's seeds share its effects, so the permutations move configurations with all their seeds:
    under this structured null no p-value falls below 0.05 more than 0.05 + 3 standard errors of the time (moving
    models one by one rejected 11.7% on the learning-rate axis)."""
    configs = study_configs()
    rng = np.random.default_rng(1)
    tests = [statistics.psi_permutation_test(*structured_null_study(rng, configs), configs, STUDY_AXES,
                                             permutations=199, seed=k) for k in range(300)]
    bound = 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)
    assert np.mean([t.p_value <= 0.05 for t in tests]) <= bound
    assert all(np.mean([t.axis_p_values[a] <= 0.05 for t in tests]) <= bound for a in STUDY_AXES)


def clustered_sample(rng, clusters, seeds, rho):
    """(measure, gap) = configuration effect + seed noise (a quarter of its variance), both bivariate normal with
    correlation ρ, so every pair of models, within or across configurations, has difference correlation ρ:
    population τ = (2/π)·arcsin ρ."""
    cov = [[1, rho], [rho, 1]]
    shared = np.repeat(rng.multivariate_normal([0, 0], cov, size=clusters), seeds, axis=0)
    return shared + 0.5 * rng.multivariate_normal([0, 0], cov, size=clusters * seeds)


def test_cluster_bootstrap_covers_a_known_tau_at_its_nominal_rate_where_the_model_bootstrap_does_not():
    """20 configurations × 4 seeds. Over 200 samples the 95% interval from resampling configurations covers
    (2/π)·arcsin 0.5 = 1/3 at least 0.95 − 3·0.0154 = 0.904 of the time (measured: 0.93); resampling models as if
    independent (each its own configuration) covers it less than 0.85 of the time (measured: 0.795)."""
    truth, configs = 2 / math.pi * math.asin(0.5), [{"c": c, "seed": s} for c in range(20) for s in range(4)]
    rng = np.random.default_rng(1)
    covered = {"cluster": 0, "model": 0}
    for k in range(200):
        m, g = clustered_sample(rng, 20, 4, 0.5).T
        for kind, used in (("cluster", configs), ("model", [{"c": i, "seed": 0} for i in range(80)])):
            low, high = statistics.cluster_bootstrap(m, g, used, ["c"], resamples=300, seed=k).tau_interval
            covered[kind] += low <= truth <= high
    assert covered["cluster"] / 200 >= 0.904 and covered["model"] / 200 < 0.85


def test_psi_interval_does_not_collapse_when_every_group_agrees_and_contains_psi():
    """Every group of every axis concordant: Ψ = 1, yet the interval has width (an axis of G agreeing groups
    reaches down to (G−1)/(G+1) in a resample), ends at Ψ and stays within [−1, 1]."""
    configs = study_configs()
    gap = np.array([math.log(c["lr"] / c["batch_size"]) + c["width"] / 1000 + c["seed"] / 100 for c in configs])
    boot = statistics.cluster_bootstrap(gap, gap, configs, STUDY_AXES, resamples=999)
    assert statistics.psi_permutation_test(gap, gap, configs, STUDY_AXES).psi == 1.0
    low, high = boot.psi_interval
    assert high == 1.0 and 0.5 < low < 1.0 and boot.clusters == len(STUDY_GRID)


def test_weighted_kendall_tau_is_scipys_tau_b_of_the_resample_written_out():
    """A cluster resample's τ with multiplicities equals scipy's τ_b of the models repeated that many times."""
    rng = np.random.default_rng(3)
    m, g = rng.integers(0, 3, 12).astype(float), rng.integers(0, 4, 12).astype(float)  # ties on both sides
    weights = rng.integers(0, 3, (5, 12))
    got = statistics._weighted_taus(m, g, weights.astype(float))
    for row, tau in zip(weights, got):
        expected = scipy.stats.kendalltau(np.repeat(m, row), np.repeat(g, row)).statistic
        assert tau == pytest.approx(expected, abs=1e-12)


def equal_temperature_grid():
    """lr × batch size along the diagonals of a 3 × 3 grid (temperature ∝ lr/B), two widths, two seeds."""
    return [{"lr": lr, "batch_size": b, "width": w, "seed": s} for lr in (0.0125, 0.05, 0.2) for b in (16, 64, 256)
            for w in (32, 64) for s in (0, 1)]


def test_temperature_test_finds_configurations_at_equal_temperature_alike_when_the_gap_follows_it():
    """Gap = ln(lr/B) + noise: within an equal-temperature group the configurations agree, F is large and the
    permutation p-value small; F is scipy's one-way ANOVA of the configuration means."""
    configs, rng = equal_temperature_grid(), np.random.default_rng(0)
    temperature = [statistics.noise_temperature(c["lr"], c["batch_size"], examples=4000) for c in configs]
    gap = np.log(temperature) + 0.1 * rng.normal(size=len(configs))
    r = statistics.temperature_test(gap, temperature, configs)
    assert r.groups == 6 and r.configurations == 14 and r.p_value <= 0.01 and r.variance_ratio < 0.01
    means = (gap[0::2] + gap[1::2]) / 2  # the two seeds of each configuration are adjacent
    pairs = {}
    for c, mean in zip(configs[0::2], means):
        pairs.setdefault((c["width"], round(c["lr"] / c["batch_size"], 12)), []).append(mean)
    expected = scipy.stats.f_oneway(*[v for v in pairs.values() if len(v) > 1]).statistic
    assert r.f_statistic == pytest.approx(expected, rel=1e-10) and r.variance_ratio == pytest.approx(1 / expected)


def test_temperature_test_finds_no_likeness_when_the_gap_follows_the_learning_rate_alone():
    configs, rng = equal_temperature_grid(), np.random.default_rng(0)
    temperature = [statistics.noise_temperature(c["lr"], c["batch_size"], examples=4000) for c in configs]
    gap = np.log([c["lr"] for c in configs]) + 0.1 * rng.normal(size=len(configs))
    r = statistics.temperature_test(gap, temperature, configs)
    assert r.p_value > 0.2 and r.variance_ratio > 1
    alone = [c for c in configs if c["lr"] == 0.05]  # no two configurations at one temperature: not tested
    r = statistics.temperature_test(np.zeros(len(alone)), [c["lr"] / c["batch_size"] for c in alone], alone)
    assert math.isnan(r.p_value) and r.groups == 0


def replication_rows(second_seed_follows: bool):
    """Seed 0: the measure orders the models as the gap does, up to noise; seed 1: the same, or pure noise."""
    rng = np.random.default_rng(5)
    rows = []
    for c in study_configs():
        gap = math.log(c["lr"] / c["batch_size"]) + rng.normal()
        follows = c["seed"] == 0 or second_seed_follows
        rows.append({**c, "gap_error": gap, "sharp": (gap if follows else 0) + 0.5 * rng.normal(),
                     "flat_noise": rng.normal(), "lr": c["lr"]})
    return rows


def test_findings_records_carry_exactly_the_promised_fields_and_replicate_when_both_halves_agree():
    f = statistics.findings(replication_rows(True), outcome="gap_error", measures={"sharp": 1, "flat_noise": 1},
                            baselines={"lr": 0}, axes=STUDY_AXES, resamples=199)
    names = ["measure", "kind", "tau", "tau_interval", "psi", "psi_interval", "p_value", "p_holm", "cmi", "verdict",
             "replicated"]
    assert all(list(dataclasses.asdict(r)) == names for r in f.records)
    by = {r.measure: r for r in f.records}
    assert by["sharp"].verdict == "predicts" and by["sharp"].replicated and f.half_verdicts["sharp"] == ("predicts",) * 2
    assert by["flat_noise"].verdict == "no evidence" and not by["flat_noise"].replicated
    assert by["lr"].kind == "baseline" and by["lr"].cmi == 0.0  # a hyper-parameter carries nothing beyond itself
    np.testing.assert_allclose([r.p_holm for r in f.records], statistics.holm([r.p_value for r in f.records]))


def test_a_finding_that_holds_in_one_half_of_the_seeds_only_is_not_replicated():
    f = statistics.findings(replication_rows(False), outcome="gap_error", measures={"sharp": 1},
                            baselines={}, axes=STUDY_AXES, resamples=199)
    (record,) = f.records
    assert record.verdict == "predicts" and f.half_verdicts["sharp"] == ("predicts", "no evidence")
    assert not record.replicated


def test_seed_halves_are_disjoint_and_need_two_seeds():
    configs = study_configs(seeds=(7, 3, 11))
    first, second = statistics.seed_halves(configs)
    assert {c["seed"] for c, k in zip(configs, first) if k} == {3, 11} and {c["seed"] for c, k in zip(configs, second) if k} == {7}
    with pytest.raises(ValueError, match="two seeds or more"):
        statistics.seed_halves(study_configs(seeds=(0,)))


def test_a_measure_never_finite_is_no_evidence_and_left_out_of_holms_count():
    rows = replication_rows(True)
    for r in rows:
        r["missing"] = math.nan
    f = statistics.findings(rows, outcome="gap_error", measures={"sharp": 1, "missing": 1}, baselines={},
                            axes=STUDY_AXES, resamples=199)
    by = {r.measure: r for r in f.records}
    assert math.isnan(by["missing"].p_holm) and by["missing"].verdict == "no evidence" and not by["missing"].replicated
    assert by["sharp"].p_holm == by["sharp"].p_value  # a family of one


def test_configuration_permutations_move_all_seeds_together_and_keep_a_left_out_model_out():
    """Model (c, s) takes the value of model (π(c), s): each row keeps the seed's values within the seed, pairs a
    configuration's seeds with one other configuration, and the one configuration missing seed 1 stays put."""
    configs = [{"a": a, "seed": s} for a in range(5) for s in (0, 1) if (a, s) != (4, 1)]
    values = np.array([10 * c["a"] + c["seed"] for c in configs], dtype=float)
    permute = statistics._ConfigurationPermutation.of(configs, seed_key="seed")
    draws = permute(values, [()] * len(configs), 50, np.random.default_rng(0))
    seeds = np.array([c["seed"] for c in configs])
    assert np.all(draws % 10 == seeds) and np.all(draws[:, -1] == 40)
    assert np.all(draws[:, 0:8:2] // 10 == draws[:, 1:8:2] // 10)  # seeds 0 and 1 of a configuration move together
    assert len({tuple(row) for row in draws}) > 5
