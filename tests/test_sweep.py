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
import training
import utils
from experiment import report
from experiment.sweep import BASELINES, MODEL_MEASURES, PAIR_MEASURES

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
    text = " ".join(pdf_text(out / report.SWEEP_REPORT).split())
    assert "Findings" in text and "Keskar et al. 2017" in text and "Jiang et al. 2020" in text
    assert "Outcome: the error gap" in text and "momentum 0" in text and "Stopping rule" in text
    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(s["rows"])
    arrays = np.load(out / "results.npz")
    for csv_row, row, i in zip(table, s["rows"], range(len(table))):
        for key, value in row.items():
            if isinstance(value, float) and math.isfinite(value):
                assert float(csv_row[key]) == value, key
                assert arrays[key][i] == value, key
    target = metrics["config"]["sweep_target_loss"]
    for row in s["rows"]:  # every model kept reached the common target, or stepped back to a step checked near it
        assert row["train_loss"] <= training.StoppingRule.CLOSE * target
        assert row["gap_loss"] == row["test_loss"] - row["train_loss"]
    rows = s["rows"]
    assert s["outcome"] == "gap_error" and s["trained_fraction"] == len(rows) / 8
    for row in rows:
        assert row["gap_error"] == row["test_error"] - row["train_error"] and row["outcome"] == "reached"
        assert row["test_examples"] == 1000  # the 500 training examples no model trains on, and the test split
    names = {f["measure"]: f for f in s["findings"]}
    assert set(names) == {*MODEL_MEASURES, *BASELINES, *PAIR_MEASURES}
    for f in s["findings"]:
        assert set(f) == {"measure", "kind", "tau", "tau_interval", "psi", "psi_interval", "p_value", "p_holm", "cmi",
                          "verdict", "replicated"}
        assert f["kind"] == ("baseline" if f["measure"] in BASELINES else "measure")
        assert f["verdict"] in ("predicts", "reverse", "no evidence")
    units = {**{m: rows for m in (*MODEL_MEASURES, *BASELINES)}, **{m: s["pairs"] for m in PAIR_MEASURES}}
    for name, records in units.items():  # τ is Kendall's over the models (pairs, for the barriers) that have it
        usable = [r for r in records if r.get(name) is not None]  # JSON writes NaN and inf as null
        tau = math.nan if names[name]["tau"] is None else names[name]["tau"]  # JSON writes an undefined τ as null
        assert tau == pytest.approx(utils.kendall_tau([r[name] for r in usable], [r["gap_error"] for r in usable]),
                                    nan_ok=True)
    for p in s["pairs"]:  # one barrier per pair of seeds, never copied onto the models
        assert p["seeds"] == [0, 42] and "barrier" not in rows[0]


def test_models_that_miss_the_target_within_the_budget_are_reported_as_too_slow_and_left_out(tmp_path):
    metrics = sweep(tmp_path, "out", "runs", "--sweep-max-steps", "3", "--sweep-batch-sizes", "64", "--skip-figures")
    s = metrics["sweep"]
    assert s["rows"] == [] and s["trained_fraction"] == 0
    assert [e["reason"] for e in s["excluded"]] == ["too slow"] * 4 and {e["steps"] for e in s["excluded"]} == {3}
    assert all(e["final_epoch_loss"] > metrics["config"]["sweep_target_loss"] for e in s["excluded"])


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
