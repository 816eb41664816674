"""Figures and the report, drawn from metrics alone: every figure as a 150-dpi PNG and a vector PDF, a page
per section with its numbers, redrawing without computing, a failing figure leaves no report behind."""


import re
import shutil

import numpy as np
import PIL.Image
import pytest
from helpers import pdf_pages, pdf_text

import main
import plotting
from experiment import report

pytestmark = pytest.mark.slow  # drawn from the quick run's metrics


class FigureFailed(RuntimeError):
    pass


def failing_figure(metrics, path):
    raise FigureFailed(f"could not draw {path.name}")


def test_report_has_a_page_per_section_with_names_and_numbers(run):
    out, metrics = run
    pdf = out / report.REPORT
    sections = report.report_sections(metrics)
    assert pdf_pages(pdf) == len(sections) + 2  # title page, one per section, the summary table
    text = pdf_text(pdf)
    for section in sections:
        assert section.title in text
    flattened = re.sub(r"\s+", " ", text)
    for seed, m in metrics["models"].items():
        for value in (m["sharpness"]["eigenvalue"], m["eigenpairs"]["lambda_min"], m["trace"]["trace"],
                      m["flatness"]["mean_increase"][-1], m["gradient_noise"]["b_simple"],
                      m["gradient_noise"]["b_noise"], m["test"]["loss"], m["pac_bayes"]["plain"]["sigma"]):
            number = report.fmt(value, 3) if value == m["pac_bayes"]["plain"]["sigma"] else report.fmt(value)
            assert number in flattened, (seed, number)
    # the barrier with α refined near the peak, as in the figure's legend and the summary table
    assert report.fmt(metrics["connectivity"]["train"]["barriers"]["loss_linear"]) in flattened
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
    assert (target / report.REPORT).stat().st_size > 50_000
    assert all((target / name).with_suffix(".pdf").exists() for name in plotting.FIGURES)


def test_figures_redraw_from_saved_metrics(quick_run, tmp_path):
    _, metrics = quick_run
    written = plotting.plot_all(metrics, tmp_path)
    expected = {name for png in plotting.FIGURES for name in (png, png.replace(".png", ".pdf"))} | {report.REPORT}
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
    assert not (tmp_path / report.REPORT).exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


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
