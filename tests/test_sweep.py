"""The sweep end to end (`main --sweep --quick`: a 2x2x1x2 grid on a small slice): sweep.csv, results.npz and
metrics.json agree, the figures are written, models that miss the target are reported and left out, and a
killed sweep resumes to the numbers of an uninterrupted one; a grown grid computes only the new models."""

import csv
import json
import math

import numpy as np
import pytest
from helpers import pdf_text

import main
import plotting
import utils
from experiment import report
from experiment.sweep import AXES, MEASURES

pytestmark = pytest.mark.slow

QUICK = ["--sweep", "--quick", "--offline", "--quiet"]


def sweep(tmp_path, name: str, runs: str, *extra: str) -> dict:
    assert main.main([*QUICK, "--out", str(tmp_path / name), "--runs-dir", str(tmp_path / runs), *extra]) == 0
    return json.loads((tmp_path / name / "sweep" / "metrics.json").read_text())


def numbers(metrics: dict) -> list[dict]:
    return [{k: v for k, v in row.items()} for row in metrics["sweep"]["rows"]]


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    return tmp, sweep(tmp, "out", "runs")


def test_quick_sweep_writes_figures_csv_npz_and_statistics_that_agree(quick_sweep):
    tmp, metrics = quick_sweep
    out = tmp / "out" / "sweep"
    assert not (tmp / "out" / "metrics.json").exists()  # a sweep never overwrites the default run's outputs
    s = metrics["sweep"]
    assert len(s["grid"]) == 4 and s["seeds"] == [0, 42]
    assert len(s["rows"]) + len(s["excluded"]) == 8
    for name in plotting.SWEEP_FIGURES:
        assert (out / name).stat().st_size > 10_000 and (out / name).with_suffix(".pdf").exists()
    report = " ".join(pdf_text(out / report.SWEEP_REPORT).split())
    assert "Findings" in report and "Keskar et al. 2017" in report and "Jiang et al. 2020" in report
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(s["rows"])
    arrays = np.load(out / "results.npz")
    for csv_row, row, i in zip(table, s["rows"], range(len(table))):
        for key, value in row.items():
            if isinstance(value, float) and math.isfinite(value):
                assert float(csv_row[key]) == value, key
                assert arrays[key][i] == value, key
    for row in s["rows"]:  # every model kept reached the common target
        assert row["train_loss"] <= metrics["config"]["sweep_target_loss"]
        assert row["gap_loss"] == row["test_loss"] - row["train_loss"]
    rows = s["rows"]
    configs = [{k: r[k] for k in (*AXES, "seed")} for r in rows]
    for measure in MEASURES:
        c = s["correlations"][measure]["gap_loss"]
        usable = [i for i, r in enumerate(rows) if r[measure] is not None]  # JSON writes NaN as null
        assert c["tau"] == pytest.approx(utils.kendall_tau([rows[i][measure] for i in usable],
                                                           [rows[i]["gap_loss"] for i in usable]), nan_ok=True)
        psi, _ = utils.granulated_kendall_tau([rows[i][measure] for i in usable], [rows[i]["gap_loss"] for i in usable],
                                              [configs[i] for i in usable], AXES)
        assert c["psi"] == pytest.approx(psi, nan_ok=True)


def test_models_that_miss_the_target_are_reported_and_left_out(quick_sweep):
    _, metrics = quick_sweep
    s = metrics["sweep"]
    kept = {(r["batch_size"], r["lr"], r["width"], r["seed"]) for r in s["rows"]}
    assert s["excluded"], "the quick grid's lr 0.2 with momentum 0.9 misses the target: the case under test"
    for e in s["excluded"]:
        assert (e["batch_size"], e["lr"], e["width"], e["seed"]) not in kept
        assert e["reason"] == "missed the target"
        assert e["final_epoch_loss"] > metrics["config"]["sweep_target_loss"]
        assert e["epochs"] == metrics["config"]["sweep_max_epochs"]


def test_a_killed_sweep_resumes_to_the_uninterrupted_numbers(quick_sweep, tmp_path, monkeypatch):
    """Interrupt the sweep inside the third PAC-Bayes measurement; rerunning the same command finishes it, and
    every number equals the uninterrupted sweep's."""
    _, reference = quick_sweep
    real, calls = utils.pac_bayes_flatness, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(utils, "pac_bayes_flatness", interrupted)
    command = [*QUICK, "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    assert main.main(command) == 130
    assert not (tmp_path / "out" / "sweep" / "metrics.json").exists()
    monkeypatch.setattr(utils, "pac_bayes_flatness", real)
    resumed = sweep(tmp_path, "out", "runs")
    assert numbers(resumed) == numbers(reference)
    assert any(label.startswith("train[") for label in resumed["resumed"])


def test_a_grown_grid_computes_only_the_new_models(tmp_path):
    small = sweep(tmp_path, "small", "runs", "--sweep-lrs", "0.05")
    grown = sweep(tmp_path, "grown", "runs", "--sweep-lrs", "0.05", "0.1")
    trained = [label for label in grown["timings"] if label.startswith("train[")]
    loaded = {label for label in grown["resumed"] if label.startswith("train[")}
    assert loaded == {label for label in trained if "lr=0.05 " in label}
    old = [r for r in grown["sweep"]["rows"] if r["lr"] == 0.05]
    assert old == small["sweep"]["rows"]


def test_a_diverging_model_is_reported_and_left_out_not_fatal(tmp_path):
    """A learning rate of 50 blows every model up: the sweep still finishes and lists each as diverged."""
    metrics = sweep(tmp_path, "out", "runs", "--sweep-lrs", "50", "--sweep-batch-sizes", "64", "--skip-figures")
    s = metrics["sweep"]
    assert s["rows"] == [] and [e["reason"] for e in s["excluded"]] == ["diverged", "diverged"]


def test_plot_only_redraws_the_sweep_from_its_metrics(quick_sweep):
    tmp, _ = quick_sweep
    figure = tmp / "out" / "sweep" / "sweep_correlation.png"
    figure.unlink()
    assert main.main(["--plot-only", "--sweep", "--quiet", "--out", str(tmp / "out")]) == 0
    assert figure.stat().st_size > 10_000
