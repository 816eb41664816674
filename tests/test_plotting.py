"""Figures and the report, drawn from metrics alone: every figure as a 150-dpi PNG and a vector PDF, a page
per section with its numbers, redrawing without computing, a failing figure leaves no report behind."""


import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import ROOT

import main
import plotting


def pdf_text(path: Path) -> str:
    """Text of a PDF by poppler's pdftotext, or pypdf where poppler is not installed."""
    if shutil.which("pdftotext"):
        return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True,
                              check=True).stdout
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(str(path)).pages)


def pdf_pages(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page[^s]", path.read_bytes()))


class FigureFailed(RuntimeError):
    pass


def failing_figure(metrics, path):
    raise FigureFailed(f"could not draw {path.name}")


def test_report_has_a_page_per_section_with_names_and_numbers(run):
    out, metrics = run
    report = out / plotting.REPORT
    sections = plotting.report_sections(metrics)
    assert pdf_pages(report) == len(sections) + 2  # title page, one per section, the summary table
    text = pdf_text(report)
    for section in sections:
        assert section["title"] in text
    flattened = re.sub(r"\s+", " ", text)
    for seed, m in metrics["models"].items():
        for value in (m["sharpness"]["eigenvalue"], m["eigenpairs"]["lambda_min"], m["trace"]["trace"],
                      m["flatness"]["mean_increase"][-1], m["gradient_noise"]["b_simple"],
                      m["gradient_noise"]["b_noise"], m["test"]["loss"], m["pac_bayes"]["plain"]["sigma"]):
            number = plotting._fmt(value, 3) if value == m["pac_bayes"]["plain"]["sigma"] else plotting._fmt(value)
            assert number in flattened, (seed, number)
    # the barrier with α refined near the peak, as in the figure's legend and the summary table
    assert plotting._fmt(metrics["connectivity"]["train"]["barriers"]["loss_linear"]) in flattened
    for name in ("sharpness", "flatness", "noise scale", "barrier", "Loss surface", "trace"):
        assert name.lower() in flattened.lower()


def test_every_figure_has_a_png_at_150_dpi_and_a_vector_pdf(run):
    out, _ = run
    for name in plotting.FIGURES:
        with PIL.Image.open(out / name) as png:
            assert png.height > 300 and png.mode == "RGBA"
            assert tuple(round(d) for d in png.info["dpi"]) == (150, 150)  # the resolution written in the file
        assert (out / name).with_suffix(".pdf").read_bytes().startswith(b"%PDF")


def test_plot_only_redraws_report_and_vector_copies(run, tmp_path):
    out, metrics = run
    target = tmp_path / "redraw"
    target.mkdir()
    shutil.copy(out / "metrics.json", target / "metrics.json")
    assert main.main(["--plot-only", "--quiet", "--out", str(target)]) == 0
    assert (target / plotting.REPORT).stat().st_size > 50_000
    assert all((target / name).with_suffix(".pdf").exists() for name in plotting.FIGURES)
    done = subprocess.run([main.sys.executable, str(ROOT / "plotting.py"), str(target)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and plotting.REPORT in done.stdout


def test_figures_redraw_from_saved_metrics(quick_run, tmp_path):
    _, metrics = quick_run
    written = plotting.plot_all(metrics, tmp_path)
    expected = {name for png in plotting.FIGURES for name in (png, png.replace(".png", ".pdf"))} | {plotting.REPORT}
    assert sorted(p.name for p in written) == sorted(expected)


@pytest.mark.parametrize("broken", ["connectivity_plane.png", "summary_table.png", "not_in_the_report.png"])
def test_a_figure_that_fails_fails_plot_all_and_leaves_no_report(quick_run, tmp_path, monkeypatch,
                                                                                 broken):
    """The report comes after the figures: an error in any figure (one the report embeds early or last, or one no
    page embeds) reaches the caller, no report is written and no temporary file is left behind."""
    _, metrics = quick_run
    monkeypatch.setitem(plotting.FIGURES, broken, failing_figure)
    with pytest.raises(FigureFailed, match=broken):
        plotting.plot_all(metrics, tmp_path)
    assert not (tmp_path / plotting.REPORT).exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_summary_table_lists_every_seed(quick_run):
    text = plotting.format_summary(quick_run[1])
    assert "seed 0" in text and "seed 42" in text and "sharpness" in text



def test_every_figure_is_cropped_to_its_content(run):
    """savefig's tight crop leaves a margin of pad_inches (0.1 in: 15 px at 150 dpi) around what is drawn: on every
    side the outermost pixels are blank and something is drawn within 50 px of the edge (invisible extents, a
    legend's frame or a 3-D box, hold the drawing a little further in; matplotlib's uncropped margins, 12.5% of
    the width on the left, are 120-230 px at these sizes)."""
    out, _ = run
    for name in plotting.FIGURES:
        with PIL.Image.open(out / name) as png:
            drawn = np.asarray(png.convert("RGB")).min(axis=2) < 250  # (height, width): not white
        rows, columns = np.flatnonzero(drawn.any(axis=1)), np.flatnonzero(drawn.any(axis=0))
        height, width = drawn.shape
        margins = (rows[0], height - 1 - rows[-1], columns[0], width - 1 - columns[-1])
        assert all(1 <= m <= 50 for m in margins), (name, margins)


# ----------------------------------------------------------------------------- the report's sentences
# Each interpretation sentence is chosen by its numbers; both sides of every threshold are tested here.
def test_stability_sentence_below_at_and_beyond_the_edge():
    """Threshold 2(1+β)/η = 2·1.9/0.1 = 38 (2/η = 20 without momentum); ±EDGE_BAND around it is the edge."""
    band = plotting.EDGE_BAND
    below = plotting.stability_sentence("0", 38 * (1 - band) * 0.99, 1.0, 0.1, 0.9)
    at_low = plotting.stability_sentence("0", 38 * (1 - band) * 1.01, 1.0, 0.1, 0.9)
    at_high = plotting.stability_sentence("0", 38 * (1 + band) * 0.99, 1.0, 0.1, 0.9)
    beyond = plotting.stability_sentence("0", 38 * (1 + band) * 1.01, 1.0, 0.1, 0.9)
    assert "below the edge" in below and "at the edge" in at_low and "at the edge" in at_high
    assert "beyond the edge" in beyond
    assert "2/eta = 20" in plotting.stability_sentence("0", 19.0, 1.0, 0.1, 0.0)
    assert "2(1+beta)/eta = 38" in below


def test_stability_sentence_says_whether_lambda_max_is_below_batch_sharpness():
    assert "is below it, as Andreyev" in plotting.stability_sentence("0", 5.0, 4.0, 0.1, 0.9)
    assert "not below it, unlike" in plotting.stability_sentence("0", 5.0, 6.0, 0.1, 0.9)
    assert "not tracked" in plotting.stability_sentence("0", math.nan, 6.0, 0.1, 0.9)


def test_noise_sentence_above_below_and_mixed():
    """B_simple > B for all: noise dominates; < B for all: signal dominates; otherwise mixed."""
    assert "noise dominates" in plotting.noise_sentence({"0": 129.0, "42": 500.0}, 128)
    assert "signal dominates" in plotting.noise_sentence({"0": 127.0, "42": 3.0}, 128)
    mixed = plotting.noise_sentence({"0": 129.0, "42": 127.0}, 128)
    assert "for seed(s) 0 but not for 42" in mixed


def test_connectivity_sentence_both_sides_of_the_threshold_and_after_alignment():
    """Connected when barrier/endpoint loss < CONNECTED (5%); alignment connected, lower, or not lower."""
    t = plotting.CONNECTED
    assert "are linearly connected" in plotting.connectivity_sentence(0.99 * t, 1.0, None)
    assert "are not linearly connected" in plotting.connectivity_sentence(1.01 * t, 1.0, None)
    assert "up to permutation symmetry" in plotting.connectivity_sentence(1.0, 1.0, 0.99 * t)
    lower = plotting.connectivity_sentence(1.0, 1.0, 1.01 * t)
    assert "95% of it was permutation symmetry" in lower and "not linearly connected even after" in lower
    assert "does not lower it" in plotting.connectivity_sentence(0.5, 1.0, 0.6)


def test_path_barrier_is_the_peak_above_the_endpoints_line():
    """Loss (1, 3, 2) at t = (0, .5, 1): the line is 1.5 at the middle, so the barrier is 1.5."""
    assert plotting.path_barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0]) == 1.5


def test_curve_sentence_low_loss_lower_than_the_line_or_not():
    t = plotting.CONNECTED
    joins = plotting.curve_sentence(0.99 * t, 1.0, 1.0)
    assert "joins the two solutions" in joins and "although the straight line" in joins
    assert "as the straight line does" in plotting.curve_sentence(0.99 * t, 0.99 * t, 1.0)
    assert "not a low-loss path" in plotting.curve_sentence(1.01 * t, 1.0, 1.0)
    assert "no lower than" in plotting.curve_sentence(1.0, 0.5, 1.0)


def test_basin_sentence_single_basin_off_centre_minimum_and_falling_rays():
    """A bowl a² + b² rises along all 8 rays; shifting its minimum moves the lowest point off the centre; a
    bump ring makes the loss fall again along the rays."""
    grid = np.linspace(-1, 1, 5)
    a, b = np.meshgrid(grid, grid, indexing="ij")
    assert "single basin" in plotting.basin_sentence(a**2 + b**2, grid, grid)
    off = plotting.basin_sentence((a - 0.5) ** 2 + b**2, grid, grid)
    assert "lies off the trained model, at (alpha, beta) = (0.5, 0)" in off
    ring = np.exp(-((np.hypot(a, b) - 0.5) ** 2) * 20) + 0.01 * (a**2 + b**2)
    assert "falls again" in plotting.basin_sentence(ring, grid, grid)


def test_rescaling_sentence_sorts_measures_into_moving_and_invariant():
    """Spread max/min − 1 across α: over MOVES moves, under INVARIANT stays, in between moves a little."""
    rows = [{"top_eigenvalue": v, "worst_case_absolute": w, "worst_case_adaptive": 1.0, "filter_normalised": 2.0,
             "adaptive_average": a} for v, w, a in ((1.0, 1.0, 1.0), (2.5, 1.05, 1.0))]
    text = plotting.rescaling_sentence(rows)
    assert "moves lambda_max (x2.5)" in text and "absolute worst-case sharpness (5.0%) a little" in text
    assert "adaptive worst-case sharpness, filter-normalised flatness and adaptive flatness stay within 1%" in text
    every = [{k: v * (1 + i) for k, v in rows[0].items()} for i in range(2)]
    assert "every measure depends on the parametrisation" in plotting.rescaling_sentence(every)


def test_negative_curvature_sentence_needs_lambda_min_below_minus_its_residual():
    assert "seed(s) 0:" in plotting.negative_curvature_sentence({"0": (-0.2, 0.1), "42": (-0.05, 0.1)})
    assert "no negative curvature is resolved" in plotting.negative_curvature_sentence({"0": (-0.05, 0.1)})


# ----------------------------------------------------------------------------- the sweep report's sentences
def corr(tau, low, high, psi=None):
    return {"gap_loss": {"tau": tau, "tau_interval": [low, high], "psi": tau if psi is None else psi,
                         "psi_interval": [low, high]}}


def test_ranking_sentences_split_measures_by_which_side_of_zero_their_interval_lies():
    text = " ".join(plotting.ranking_sentences({"lambda_max": corr(0.5, 0.1, 0.8), "trace": corr(-0.4, -0.7, -0.05),
                                                "b_noise": corr(0.1, -0.2, 0.4)}))
    assert "Ranked generalisation (τ's 95% interval above 0): λ_max (τ +0.50)" in text
    assert "wrong way round (interval below 0: larger went with a smaller gap): tr(H) (τ -0.40)" in text
    assert "No evidence either way (interval contains 0): B_noise (τ +0.10)" in text
    none = " ".join(plotting.ranking_sentences({"lambda_max": corr(0.1, -0.2, 0.4)}))
    assert "No measure ranked generalisation" in none


def test_literature_sentences_agree_partly_or_disagree_with_jiang_and_keskar():
    measures = {"worst_case_absolute": corr(0.6, 0.3, 0.9), "worst_case_adaptive": corr(0.5, 0.2, 0.8),
                "pac_bayes_magnitude_aware_inv_sigma_sq": corr(0.4, 0.1, 0.7), "lambda_max": corr(-0.3, -0.6, -0.1),
                **{f"m{i}": corr(-0.5, -0.8, -0.2) for i in range(6)}}
    agree = plotting.literature_sentences(measures, {"tau": 0.4, "tau_interval": [0.1, 0.6]})
    assert "Our data agree." in agree[0] and "our data agree" in agree[1]
    assert "invariant measure ranks better and λ_max ranks the wrong way round" in agree[2]
    measures["worst_case_absolute"] = corr(-0.9, -1.0, -0.8)
    partly = plotting.literature_sentences(measures, {"tau": -0.4, "tau_interval": [-0.6, -0.1]})
    assert "are in the top third by Ψ: our data partly disagree" in partly[0]
    assert "larger batches found flatter minima, our data disagree" in partly[1]
    for m in ("worst_case_adaptive", "pac_bayes_magnitude_aware_inv_sigma_sq"):
        measures[m] = corr(-0.9, -1.0, -0.8)
    none = plotting.literature_sentences(measures, {"tau": 0.0, "tau_interval": [-0.3, 0.3]})
    assert "none of them is in the top third by Ψ: our data disagree" in none[0]
    assert "neither confirm nor refute" in none[1]


def test_edge_of_stability_sentence_counts_models_at_each_threshold_and_the_order():
    """lr 0.1, β 0.9: 2/η = 20, 2(1+β)/η = 38; ±10% counts as at the threshold."""
    rows = [{"lr": 0.1, "batch_sharpness": 21.0, "lambda_max": 5.0}, {"lr": 0.1, "batch_sharpness": 37.0,
                                                                      "lambda_max": 40.0},
            {"lr": 0.1, "batch_sharpness": 10.0, "lambda_max": 2.0}]
    text = plotting.edge_of_stability_sentence(rows, 0.9)
    assert "1 of 3 models end with batch sharpness within 10% of 2/η and 1 within 10% of 2(1+β)/η" in text
    assert "below batch sharpness in 2 of 3: our data agree on the order" in text
    rows[0]["lambda_max"] = 30.0
    assert "our data disagree on the order" in plotting.edge_of_stability_sentence(rows, 0.9)
    assert "not tracked" in plotting.edge_of_stability_sentence([{"lr": 0.1, "batch_sharpness": None}], 0.9)
