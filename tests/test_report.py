"""The reports' words (experiment/report.py): each interpretation sentence is chosen by its numbers, and both
sides of every threshold are tested here; the documents hold the pages a report has."""

import math

import numpy as np
import pytest

from experiment import report


def test_stability_sentence_below_at_and_beyond_the_edge():
    """Threshold 2(1+β)/η = 2·1.9/0.1 = 38 (2/η = 20 without momentum); ±EDGE_BAND around it is the edge."""
    band = report.EDGE_BAND
    below = report.stability_sentence("0", 38 * (1 - band) * 0.99, 1.0, 0.1, 0.9, examples=128)
    at_low = report.stability_sentence("0", 38 * (1 - band) * 1.01, 1.0, 0.1, 0.9, examples=128)
    at_high = report.stability_sentence("0", 38 * (1 + band) * 0.99, 1.0, 0.1, 0.9, examples=128)
    beyond = report.stability_sentence("0", 38 * (1 + band) * 1.01, 1.0, 0.1, 0.9, examples=128)
    assert "below the edge" in below and "at the edge" in at_low and "at the edge" in at_high
    assert "beyond the edge" in beyond
    assert "2/eta = 20" in report.stability_sentence("0", 19.0, 1.0, 0.1, 0.0, examples=128)
    assert "2(1+beta)/eta = 38" in below


def test_stability_sentence_says_whether_lambda_max_is_below_batch_sharpness():
    assert "is below it, as Andreyev" in report.stability_sentence("0", 5.0, 4.0, 0.1, 0.9, examples=128)
    assert "not below it, unlike" in report.stability_sentence("0", 5.0, 6.0, 0.1, 0.9, examples=128)
    assert "not tracked" in report.stability_sentence("0", math.nan, 6.0, 0.1, 0.9, examples=128)
    assert "the lambda_max on the first 128 training examples, 4, is below" in report.stability_sentence(
        "0", 5.0, 4.0, 0.1, 0.9, examples=128)  # says what λ_max is measured on: not the full batch


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


# ----------------------------------------------------------------------------- the sweep report's sentences
def finding(name, verdict="no evidence", psi=0.3, p_holm=0.2, cmi=0.1, kind="measure", replicated=False):
    return {"measure": name, "kind": kind, "tau": psi, "tau_interval": [psi - 0.2, psi + 0.2], "psi": psi,
            "psi_interval": [psi - 0.2, psi + 0.2], "p_value": p_holm / 2, "p_holm": p_holm, "cmi": cmi,
            "verdict": verdict, "replicated": replicated}


def test_verdict_sentences_name_each_verdict_and_whether_it_replicated():
    found = [finding("lambda_max", "predicts", 0.5, 0.01, replicated=True), finding("trace", "predicts", 0.4, 0.02),
             finding("b_noise", "reverse", -0.4, 0.03), finding("flatness"), finding("lr", "predicts", kind="baseline")]
    text = " ".join(report.verdict_sentences(found, 0.05))
    assert "Predict the error gap (Ψ's permutation test, Holm-adjusted p < 0.05): λ_max (Ψ +0.50, Holm p 0.01, " \
           "replicated in both halves of the seeds) and tr(H) (Ψ +0.40, Holm p 0.02, not replicated)." in text
    assert "against the direction the measure claims" in text and "B_noise (Ψ -0.40" in text
    assert "No evidence either way: filter-normalised ΔL(σ_max)." in text and "learning rate" not in text
    assert "No measure predicts the error gap" in report.verdict_sentences([finding("trace")], 0.05)[0]


def test_baseline_sentence_a_predicting_measure_must_beat_the_best_baselines_cmi():
    base = [finding("steps", kind="baseline", cmi=0.2), finding("lr", kind="baseline", cmi=0.0)]
    beats = report.baseline_sentence([*base, finding("lambda_max", "predicts", cmi=0.21)])
    assert "steps to the target with CMI 0.200" in beats and "λ_max (CMI 0.210, not replicated) beat it" in beats
    assert "λ_max (CMI 0.210, replicated) beat it" in report.baseline_sentence(
        [*base, finding("lambda_max", "predicts", cmi=0.21, replicated=True)])
    assert "none predicts beyond" in report.baseline_sentence([*base, finding("lambda_max", "predicts", cmi=0.2)])
    assert "none predicts beyond" in report.baseline_sentence([*base, finding("lambda_max", "no evidence", cmi=0.9)])
    assert "not tested here" in report.baseline_sentence([finding("lambda_max", "predicts")])


def test_keskar_sentence_is_the_batch_size_axis_both_sides_of_alpha_and_untested():
    assert "our data agree" in report.keskar_sentence({"psi": 0.5, "p_value": 0.049, "groups": 6}, 0.05)
    assert "flatter minima, our data disagree" in report.keskar_sentence({"psi": -0.5, "p_value": 0.01, "groups": 6}, 0.05)
    assert "no evidence either way" in report.keskar_sentence({"psi": 0.5, "p_value": 0.051, "groups": 6}, 0.05)
    text = report.keskar_sentence({"psi": 0.5, "p_value": 0.051, "groups": 6}, 0.05)
    assert "within the 6 groups of models that share a learning rate, width and seed is +0.50" in text
    assert "whole configurations, each with all its seeds, shuffled" in text  # the permutation's unit
    assert "Not tested here" in report.keskar_sentence(None, 0.05)


def test_invariance_sentence_states_andriushchenko_and_tests_adaptive_sharpness_against_baselines():
    base = finding("lr", kind="baseline", cmi=0.3)
    none = report.invariance_sentence([base, finding("worst_case_adaptive")])
    assert "mostly tracks the learning rate" in none and "no evidence that it predicts the error gap, as they found" in none
    beyond = report.invariance_sentence([base, finding("worst_case_adaptive", "predicts", cmi=0.31)])
    assert "predicts beyond the hyper-parameters, unlike their finding" in beyond
    alike = report.invariance_sentence([base, finding("worst_case_adaptive", "predicts", cmi=0.3)])
    assert "no better than the hyper-parameters, as they found" in alike
    assert "Not tested here" in report.invariance_sentence([base])


def test_temperature_sentence_both_sides_of_alpha_and_untested():
    test = {"variance_ratio": 0.1, "f_statistic": 10.0, "groups": 3, "configurations": 7, "p_value": 0.04}
    assert "generalise alike, our data agree" in report.temperature_sentence(test, 0.05)
    assert "no evidence that equal temperature" in report.temperature_sentence({**test, "p_value": 0.06}, 0.05)
    assert "Not tested here" in report.temperature_sentence({**test, "p_value": math.nan}, 0.05)
    assert "Not tested here" in report.temperature_sentence(None, 0.05)


def test_edge_of_stability_sentence_is_not_tested_unless_a_model_comes_within_the_band():
    """lr 0.1: 2/η = 20; ±EDGE_BAND (10%) around it counts; without momentum only 2/η is named."""
    far = [{"lr": 0.1, "batch_sharpness": 14.0, "lambda_max": 5.0}, {"lr": 0.1, "batch_sharpness": 17.9,
                                                                     "lambda_max": 5.0}]
    text = report.edge_of_stability_sentence(far, 0.0)
    assert "Not tested here: no model ended with batch sharpness within 10% of 2/η (the closest at 0.90× of it" in text
    near = [{"lr": 0.1, "batch_sharpness": 18.1, "lambda_max": 5.0}, {"lr": 0.1, "batch_sharpness": 14.0,
                                                                      "lambda_max": 5.0}]
    text = report.edge_of_stability_sentence(near, 0.0)
    assert "1 of 2 models end with batch sharpness within 10% of 2/η; full-batch λ_max is below batch sharpness " \
           "in 2 of 2: our data agree on the order" in text and "2(1+β)" not in text
    near[1]["lambda_max"] = 15.0
    assert "in 1 of 2: our data disagree on the order" in report.edge_of_stability_sentence(near, 0.0)
    assert "within 10% of 2(1+β)/η" in report.edge_of_stability_sentence(near, 0.9)
    assert "Not tested here (batch sharpness was not tracked)" in report.edge_of_stability_sentence(
        [{"lr": 0.1, "batch_sharpness": None}], 0.0)


def test_noise_sentence_of_the_sweep_both_sides_of_its_threshold():
    noise = {"test_examples": 4000, "median_test_error_se": 0.004, "gap_sd": 0.012, "ratio": 1 / 3, "threshold": 1 / 3}
    assert "within the 0.33 this study needs" in report.noise_sentence_of_sweep(noise)
    assert "partly measurement noise" in report.noise_sentence_of_sweep({**noise, "ratio": 0.34})


# ----------------------------------------------------------------------------- the theories' sentences
def stationary_record(ratios, loss_start=0.1, loss_end=0.095, stable=True):
    labels = [f"eigen {i + 1}" for i in range(len(ratios))] + ["random 1"]
    return {"labels": labels, "ratio": [*ratios, 0.001], "loss_start": loss_start, "loss_end": loss_end,
            "stable": stable}


def test_stationary_sentence_counts_directions_within_the_match_factor_and_names_the_drift():
    """Within a factor MATCH_FACTOR (2) either way matches; a loss moving by over DRIFT (10%) is not stationary;
    the random controls never count."""
    f = report.MATCH_FACTOR
    text = report.stationary_sentence("0", stationary_record([1 / f, f, f * 1.01, 1 / (f * 1.01)]))
    assert "along 2 of the 4 top eigenvectors" in text and "close to stationary" in text
    moved = report.stationary_sentence("0", stationary_record([1.0], loss_start=0.1, loss_end=0.0899))
    assert "was not stationary" in moved and "(10%)" in moved
    assert "close to stationary" in report.stationary_sentence("0", stationary_record([1.0], loss_end=0.0901))
    assert "no stationary distribution" in report.stationary_sentence("0", stationary_record([1.0], stable=False))
    assert report.median_eigen_ratio(stationary_record([0.5, 1.0, 4.0])) == 1.0


def test_local_entropy_sentence_laplace_agrees_within_three_stderr_or_departs():
    record = {"scopes": [1.0, 10.0], "langevin": [2.0, 1.0], "langevin_stderr": [0.1, 0.1],
              "laplace": [-1.0, 0.5], "gradient_term": [2.7, 0.2]}  # quadratic model 1.7 and 0.7: 3 stderr off
    assert "agrees with the Langevin estimate within 3 standard errors at every scope" in \
        report.local_entropy_sentence("0", record)
    record["gradient_term"] = [2.69, 0.2]  # 1.69: 3.1 stderr off at γ = 1
    text = report.local_entropy_sentence("0", record)
    assert "departs from the Langevin estimate by more than 3 standard errors at scope(s) 1 (agrees at 10)" in text


def test_tracking_numbers_say_what_each_curve_is_measured_on_and_how_many_checks_converged():
    records = [{"step": 0, "lambda_max": 2.0, "residual": 0.001, "tol": 0.01, "converged": True,
                "batch_sharpness": 1.0, "batch_sharpness_stderr": 0.1},
               {"step": 8, "lambda_max": 3.0, "residual": 0.05, "tol": 0.01, "converged": False,
                "batch_sharpness": 1.5, "batch_sharpness_stderr": 0.2}]
    line = report.tracking_numbers("0", {"every": 8, "examples": 128, "batches": 8, "records": records}, 128, 4000)
    assert "2 checks, every 8 steps" in line and "on the first 128 training examples" in line
    assert "1 of 2 checks within tol 0.01" in line
    assert "over 8 mini-batches of 128 from all 4,000 training examples" in line
    assert report.tracking_numbers("0", {"records": []}, 128, 4000) == "seed 0: not tracked"


def test_equal_fit_counts_the_models_within_ten_percent_of_the_target_either_side():
    rows = [{"train_loss": v} for v in (0.0905, 0.0895, 0.1095, 0.1105, 0.1)]
    assert report.equal_fit_count(rows, 0.1) == 3  # 0.0905, 0.1095 and 0.1 in; 0.0895 and 0.1105 out
