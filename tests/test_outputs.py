"""The report, the machine-readable outputs and using the measurements on your own model and loss."""

import csv
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from conftest import flat, unflatten
from torch import nn
from torch.func import functional_call

import main
import plotting
import utils

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(quick_run):
    return quick_run


def pdf_text(path: Path) -> str:
    """Text of a PDF by poppler's pdftotext, or pypdf where poppler is not installed."""
    if shutil.which("pdftotext"):
        return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True,
                              check=True).stdout
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(str(path)).pages)


def pdf_pages(path: Path) -> int:
    return len(re.findall(rb"/Type\s*/Page[^s]", path.read_bytes()))


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


def _media_box(pdf: Path) -> np.ndarray:
    return np.array(re.search(rb"/MediaBox \[([^\]]*)\]", pdf.read_bytes()).group(1).split(), dtype=float)


def _draw_ours_and_tight(metrics, names, folder, monkeypatch) -> None:
    """Each figure of `names` through _save into folder/ours, then through savefig's tight mode into folder/tight,
    and the two compared: the PNGs pixel for pixel, the PDFs' pages within 1.5 pt (inside the 7.2 pt margin)."""
    ours, tight = folder / "ours", folder / "tight"
    ours.mkdir()
    tight.mkdir()
    for name in names:
        plotting.FIGURES[name](metrics, ours / name)

    def save_tight(fig, path):
        for target in (path, path.with_suffix(".pdf")):
            fig.savefig(target, bbox_inches="tight")
        plotting.plt.close(fig)
        return path

    with monkeypatch.context() as patch:
        patch.setattr(plotting, "_save", save_tight)
        for name in names:
            plotting.FIGURES[name](metrics, tight / name)
    for name in names:
        with PIL.Image.open(ours / name) as a, PIL.Image.open(tight / name) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        box_ours, box_tight = _media_box((ours / name).with_suffix(".pdf")), _media_box((tight / name).with_suffix(".pdf"))
        assert np.abs(box_ours - box_tight).max() < 1.5, (name, box_ours, box_tight)


def test_figures_are_cropped_as_savefig_tight_crops_them(run, tmp_path, monkeypatch):
    """_save measures the tight bounding box once for both files: each PNG is pixel for pixel what
    savefig(bbox_inches="tight") writes, and each PDF page is within 1.5 pt of its."""
    _draw_ours_and_tight(run[1], list(plotting.FIGURES), tmp_path, monkeypatch)


def test_figures_with_a_layout_engine_are_cropped_as_savefig_tight_crops_them(run, tmp_path, monkeypatch):
    """A layout engine from the user's rc moves the artists when the figure is drawn, after a crop measured
    beforehand (it cut 67 px off a figure's width): _save leaves such figures to savefig's tight mode."""
    with plotting.plt.rc_context({"figure.constrained_layout.use": True}):
        _draw_ours_and_tight(run[1], ["flatness_stem.png", "summary_table.png"], tmp_path, monkeypatch)


def test_metrics_csv_agrees_with_metrics_json(run):
    out, metrics = run
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == [m["seed"] for m in metrics["models"].values()]
    for row, m in zip(rows, metrics["models"].values()):
        assert float(row["lambda_max"]) == m["sharpness"]["eigenvalue"]
        assert float(row["test_accuracy"]) == m["test"]["accuracy"]
        assert float(row["lambda_min"]) == m["eigenpairs"]["lambda_min"]
        assert float(row["b_simple"]) == m["gradient_noise"]["b_simple"]
        assert float(row["trace"]) == m["trace"]["trace"]
        assert float(row["worst_case_adaptive"]) == m["worst_case"]["adaptive"]["sharpness"]
        sigma = m["flatness"]["sigmas"][-1]
        assert float(row[f"flatness_sigma_{sigma}"]) == m["flatness"]["mean_increase"][-1]


def test_results_npz_holds_the_arrays_behind_the_figures(run):
    out, metrics = run
    with np.load(out / "results.npz") as z:
        np.testing.assert_array_equal(z["surface_losses"], np.asarray(metrics["surface"]["losses"]))
        np.testing.assert_array_equal(z["interpolation_test_losses"], metrics["connectivity"]["test"]["losses"])
        np.testing.assert_array_equal(z["seed0_flatness_increases"], metrics["models"]["0"]["flatness"]["increases"])
        np.testing.assert_array_equal(z["seed42_spectrum_density"], metrics["models"]["42"]["density"]["density"])
        assert z["bezier_test_losses"].shape == (len(metrics["connectivity"]["bezier"]["ts"]),)


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


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example:start -->\s*```python\n(.*?)```\s*<!-- example:end -->", text, re.S)
    assert match, "the README must hold the own-model example between example markers"
    return match.group(1)


def test_readme_own_model_example_runs_and_is_short():
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip() and not line.startswith("#")]) <= 14
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (the README's own example)
    assert math.isfinite(namespace["sharpness"].eigenvalue)


def dense_hessian(model, x, y, loss):
    theta = flat(model)
    return torch.autograd.functional.hessian(lambda t: loss(functional_call(model, unflatten(model, t), (x,)), y),
                                             theta)


LOSSES = {
    "cross-entropy": (lambda out, y: F.cross_entropy(out, y), lambda y: y),
    "mse on one-hot": (lambda out, t: F.mse_loss(out, t), lambda y: F.one_hot(y, 3).double()),
}


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("path", ["fast", "general"])
def test_each_supported_loss_gives_exact_hessian_vector_products(loss_name, path):
    """H·v equals the dense Hessian times v for every loss we support, on both paths (F.mse_loss with mean
    reduction included, whose forward-over-reverse HVP fails in torch.func: we use reverse-over-reverse)."""
    loss, targets = LOSSES[loss_name]
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = targets(torch.randint(0, 3, (10,), generator=g))
    v = torch.randn(flat(model).numel(), generator=g, dtype=torch.float64)
    H = dense_hessian(model, x, y, loss)
    op = utils.hessian_operator(model, x, y, loss_fn=loss, path=path)
    torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    eig = utils.top_hessian_eigenvalue(model, x, y, loss_fn=loss, tol=1e-10, max_iter=200)
    assert eig.eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
