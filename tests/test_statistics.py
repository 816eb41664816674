"""Rank statistics of the sweep: Kendall's τ against scipy, Jiang et al.'s granulated Ψ against hand-computed
values on a 2×2 grid, and bootstrap intervals that cover a known population τ."""

from __future__ import annotations

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
