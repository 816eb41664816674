"""metrics.json and the files beside it (experiment/outputs.py): the table and the arrays agree with
metrics.json number for number, strict JSON, and --plot-only redraws from it without computing."""

import csv
import math

import numpy as np
import pytest

import main
import plotting
from experiment import outputs

pytestmark = pytest.mark.slow  # most tests read the quick run's outputs


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


def test_json_has_no_non_finite_numbers():
    assert outputs.json_safe({"a": [math.inf, 1.0], "b": math.nan}) == {"a": [None, 1.0], "b": None}


def test_plot_only_redraws_from_saved_metrics_without_training_or_measuring(quick_run, monkeypatch):
    out, _ = quick_run
    for name in plotting.FIGURES:
        (out / name).unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("--plot-only must not train or measure")

    monkeypatch.setattr(main.training, "train", forbidden)
    for name in ("top_hessian_eigenvalue", "perturbation_flatness", "gradient_noise_scale", "linear_interpolation",
                 "loss_surface_2d"):
        monkeypatch.setattr(main.utils, name, forbidden)
    assert main.main(["--plot-only", "--quiet", "--out", str(out)]) == 0
    for name in plotting.FIGURES:
        assert (out / name).stat().st_size > 10_000


def test_plot_only_without_saved_results_says_what_to_do(tmp_path, capsys):
    assert main.main(["--plot-only", "--out", str(tmp_path)]) == 1
    assert "run without --plot-only first" in capsys.readouterr().err


def test_both_kinds_of_run_have_one_schema_header(run):
    """The default run's metrics.json says its kind; the header keys are those the sweep's also has."""
    _, metrics = run
    assert outputs.kind_of(metrics) == "run" and metrics["schema_version"] == outputs.SCHEMA_VERSION
    assert {"config", "data", "environment", "run_folder", "resumed", "created"} <= set(metrics)
    assert outputs.kind_of({}) == "run"  # metrics.json written before the field existed


def test_a_full_disk_is_one_line_exit_1_and_leaves_every_earlier_file_as_it_was(run, tmp_path, monkeypatch, capsys):
    """Redrawing into a folder whose disk is full (every atomic move into place fails with ENOSPC): exit status 1,
    one line naming the cause and the file, no traceback, no temporary file left, and every file as before."""
    import errno
    import shutil

    import landscape.files

    out, _ = run
    target = tmp_path / "full"
    shutil.copytree(out, target, ignore=shutil.ignore_patterns("runs"))
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}

    def disk_full(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(landscape.files, "_replace", disk_full)
    assert main.main(["--plot-only", "--quiet", "--out", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write {target}") and "the disk is full" in err
    assert "run the same command again" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before
