"""The reports' words (experiment/report.py): each interpretation sentence is chosen by its numbers, and both
sides of every threshold are tested here; the documents hold the pages a report has."""

import math

import numpy as np
import pytest

from experiment import report


def test_stability_sentence_below_at_and_beyond_the_edge():
    """Threshold 2(1+β)/η = 2·1.9/0.1 = 38 (2/η = 20 without momentum); ±EDGE_BAND around it is the edge."""
    band = report.EDGE_BAND
    below = report.stability_sentence("0", 38 * (1 - band) * 0.99, 1.0, 0.1, 0.9)
    at_low = report.stability_sentence("0", 38 * (1 - band) * 1.01, 1.0, 0.1, 0.9)
    at_high = report.stability_sentence("0", 38 * (1 + band) * 0.99, 1.0, 0.1, 0.9)
    beyond = report.stability_sentence("0", 38 * (1 + band) * 1.01, 1.0, 0.1, 0.9)
    assert "below the edge" in below and "at the edge" in at_low and "at the edge" in at_high
    assert "beyond the edge" in beyond
    assert "2/eta = 20" in report.stability_sentence("0", 19.0, 1.0, 0.1, 0.0)
    assert "2(1+beta)/eta = 38" in below


def test_stability_sentence_says_whether_lambda_max_is_below_batch_sharpness():
    assert "is below it, as Andreyev" in report.stability_sentence("0", 5.0, 4.0, 0.1, 0.9)
    assert "not below it, unlike" in report.stability_sentence("0", 5.0, 6.0, 0.1, 0.9)
    assert "not tracked" in report.stability_sentence("0", math.nan, 6.0, 0.1, 0.9)


def test_noise_sentence_above_below_and_mixed():
    """B_simple > B for all: noise dominates; < B for all: signal dominates; otherwise mixed."""
    assert "noise dominates" in report.noise_sentence({"0": 129.0, "42": 500.0}, 128)
    assert "signal dominates" in report.noise_sentence({"0": 127.0, "42": 3.0}, 128)
    mixed = report.noise_sentence({"0": 129.0, "42": 127.0}, 128)
    assert "for seed(s) 0 but not for 42" in mixed


def test_connectivity_sentence_both_sides_of_the_threshold_and_after_alignment():
    """Connected when barrier/endpoint loss < CONNECTED (5%); alignment connected, lower, or not lower."""
    t = report.CONNECTED
    assert "are linearly connected" in report.connectivity_sentence(0.99 * t, 1.0, None)
    assert "are not linearly connected" in report.connectivity_sentence(1.01 * t, 1.0, None)
    assert "up to permutation symmetry" in report.connectivity_sentence(1.0, 1.0, 0.99 * t)
    lower = report.connectivity_sentence(1.0, 1.0, 1.01 * t)
    assert "95% of it was permutation symmetry" in lower and "not linearly connected even after" in lower
    assert "does not lower it" in report.connectivity_sentence(0.5, 1.0, 0.6)


def test_curve_sentence_low_loss_lower_than_the_line_or_not():
    t = report.CONNECTED
    joins = report.curve_sentence(0.99 * t, 1.0, 1.0)
    assert "joins the two solutions" in joins and "although the straight line" in joins
    assert "as the straight line does" in report.curve_sentence(0.99 * t, 0.99 * t, 1.0)
    assert "not a low-loss path" in report.curve_sentence(1.01 * t, 1.0, 1.0)
    assert "no lower than" in report.curve_sentence(1.0, 0.5, 1.0)


def test_basin_sentence_single_basin_off_centre_minimum_and_falling_rays():
    """A bowl a² + b² rises along all 8 rays; shifting its minimum moves the lowest point off the centre; a
    bump ring makes the loss fall again along the rays."""
    grid = np.linspace(-1, 1, 5)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    assert "single basin" in report.basin_sentence(a**2 + b**2, grid, grid)
    off = report.basin_sentence((a - 0.5) ** 2 + b**2, grid, grid)
    assert "lies off the trained model, at (alpha, beta) = (0.5, 0)" in off
    ring = np.exp(-((np.hypot(a, b) - 0.5) ** 2) * 20) + 0.01 * (a**2 + b**2)
    assert "falls again" in report.basin_sentence(ring, grid, grid)


def test_rescaling_sentence_sorts_measures_into_moving_and_invariant():
    """Spread max/min − 1 across α: over MOVES moves, under INVARIANT stays, in between moves a little."""
    rows = [{"top_eigenvalue": v, "worst_case_absolute": w, "worst_case_adaptive": 1.0, "filter_normalised": 2.0,
             "adaptive_average": a} for v, w, a in ((1.0, 1.0, 1.0), (2.5, 1.05, 1.0))]
    text = report.rescaling_sentence(rows)
    assert "moves lambda_max (x2.5)" in text and "absolute worst-case sharpness (5.0%) a little" in text
    assert "adaptive worst-case sharpness, filter-normalised flatness and adaptive flatness stay within 1%" in text
    every = [{k: v * (1 + i) for k, v in rows[0].items()} for i in range(2)]
    assert "every measure depends on the parametrisation" in report.rescaling_sentence(every)


def test_negative_curvature_sentence_needs_lambda_min_below_minus_its_residual():
    assert "seed(s) 0:" in report.negative_curvature_sentence({"0": (-0.2, 0.1), "42": (-0.05, 0.1)})
    assert "no negative curvature is resolved" in report.negative_curvature_sentence({"0": (-0.05, 0.1)})


def corr(tau, low, high, psi=None):
    return {"gap_loss": {"tau": tau, "tau_interval": [low, high], "psi": tau if psi is None else psi,
                         "psi_interval": [low, high]}}


def test_ranking_sentences_split_measures_by_which_side_of_zero_their_interval_lies():
    text = " ".join(report.ranking_sentences({"lambda_max": corr(0.5, 0.1, 0.8), "trace": corr(-0.4, -0.7, -0.05),
                                                "b_noise": corr(0.1, -0.2, 0.4)}))
    assert "Ranked generalisation (τ's 95% interval above 0): λ_max (τ +0.50)" in text
    assert "wrong way round (interval below 0: larger went with a smaller gap): tr(H) (τ -0.40)" in text
    assert "No evidence either way (interval contains 0): B_noise (τ +0.10)" in text
    none = " ".join(report.ranking_sentences({"lambda_max": corr(0.1, -0.2, 0.4)}))
    assert "No measure ranked generalisation" in none


def test_literature_sentences_agree_partly_or_disagree_with_jiang_and_keskar():
    measures = {"worst_case_absolute": corr(0.6, 0.3, 0.9), "worst_case_adaptive": corr(0.5, 0.2, 0.8),
                "pac_bayes_magnitude_aware_inv_sigma_sq": corr(0.4, 0.1, 0.7), "lambda_max": corr(-0.3, -0.6, -0.1),
                **{f"m{i}": corr(-0.5, -0.8, -0.2) for i in range(6)}}
    agree = report.literature_sentences(measures, {"tau": 0.4, "tau_interval": [0.1, 0.6]})
    assert "Our data agree." in agree[0] and "our data agree" in agree[1]
    assert "invariant measure ranks better and λ_max ranks the wrong way round" in agree[2]
    measures["worst_case_absolute"] = corr(-0.9, -1.0, -0.8)
    partly = report.literature_sentences(measures, {"tau": -0.4, "tau_interval": [-0.6, -0.1]})
    assert "are in the top third by Ψ: our data partly disagree" in partly[0]
    assert "larger batches found flatter minima, our data disagree" in partly[1]
    for m in ("worst_case_adaptive", "pac_bayes_magnitude_aware_inv_sigma_sq"):
        measures[m] = corr(-0.9, -1.0, -0.8)
    none = report.literature_sentences(measures, {"tau": 0.0, "tau_interval": [-0.3, 0.3]})
    assert "none of them is in the top third by Ψ: our data disagree" in none[0]
    assert "neither confirm nor refute" in none[1]


def test_edge_of_stability_sentence_counts_models_at_each_threshold_and_the_order():
    """lr 0.1, β 0.9: 2/η = 20, 2(1+β)/η = 38; ±10% counts as at the threshold."""
    rows = [{"lr": 0.1, "batch_sharpness": 21.0, "lambda_max": 5.0}, {"lr": 0.1, "batch_sharpness": 37.0,
                                                                      "lambda_max": 40.0},
            {"lr": 0.1, "batch_sharpness": 10.0, "lambda_max": 2.0}]
    text = report.edge_of_stability_sentence(rows, 0.9)
    assert "1 of 3 models end with batch sharpness within 10% of 2/η and 1 within 10% of 2(1+β)/η" in text
    assert "below batch sharpness in 2 of 3: our data agree on the order" in text
    rows[0]["lambda_max"] = 30.0
    assert "our data disagree on the order" in report.edge_of_stability_sentence(rows, 0.9)
    assert "not tracked" in report.edge_of_stability_sentence([{"lr": 0.1, "batch_sharpness": None}], 0.9)


@pytest.mark.slow
def test_the_default_report_has_a_title_page_a_section_per_measure_and_the_summary(run):
    _, metrics = run
    doc = report.document(metrics)
    assert doc.name == report.REPORT and isinstance(doc.pages[0], report.TextPage)
    assert doc.pages[1:-1] == report.report_sections(metrics) and doc.pages[-1] == report.SUMMARY_SECTION
    plane = next(s for s in doc.pages[1:] if s.figure == "connectivity_plane.png")
    barrier = metrics["connectivity"]["bezier"]["train"]["barrier"]  # stored by the stage, not recomputed here
    assert plane.interpretation == report.curve_sentence(barrier, report.barrier_of(metrics["connectivity"]["train"]),
                                                         float(np.mean(metrics["connectivity"]["train"]["endpoint_losses"])))


@pytest.mark.slow
def test_the_summary_text_of_the_default_run_lists_every_seed(quick_run):
    text = report.summary_text(quick_run[1])
    assert "seed 0" in text and "seed 42" in text and "sharpness" in text
