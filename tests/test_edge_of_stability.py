"""`main.py --dynamics`: the report's sentences about the edge of stability on both sides of each threshold (pure
functions of a run's stored reading), and the study end to end (`--dynamics --quick`): metrics.json, the table,
the arrays, the figure and the report agree, a rerun resumes every run from the store, --plot-only redraws, and
--dynamics with --sweep is refused."""

import csv
import json

import numpy as np
import pytest
from helpers import pdf_text

import main
import utils
from experiment import dynamics, report

QUICK = ["--dynamics", "--quick", "--offline", "--quiet"]


# ----------------------------------------------------------------------------- the sentences
def run_of(family: str, lam, batch=None, *, threshold: float = 10.0) -> dict:
    """A run as metrics.json holds it, its reading made with the report's thresholds, checks every 10 steps."""
    steps = [10 * i for i in range(len(lam))]
    batch = list(lam) if batch is None else list(batch)
    r = {"family": family, "loss": "mse", "lr": 2 / threshold, "batch_size": 1000 if family == "gd" else 32,
         "examples": 1000, "threshold": threshold, "outcome": "fixed budget", "diverged_at": None,
         "records": [{"step": s, "lambda_max": v, "batch_sharpness": b, "loss": 0.1} for s, v, b in
                     zip(steps, lam, batch)]}
    r["reading"] = dynamics.reading(r)
    return r


def hovering(n: int, level: float = 10.0) -> list[float]:
    return list(level * (1 + 0.05 * np.sin(np.arange(n))))


def test_gradient_descent_sentence_names_sharpening_and_the_onset_step():
    r = run_of("gd", [*np.linspace(2.0, 9.5, 20), *hovering(60)])
    text = report.gradient_descent_sentence(r)
    assert "progressive sharpening, more than 1.2x" in text
    assert f"from step {r['reading']['lambda_max']['onset']} on" in text and "as Cohen et al. 2021 find" in text
    assert "2/eta = 10" in text and "1000 examples" in text


@pytest.mark.parametrize("start, sharpened", [(9.0 / 1.19, False), (9.0 / 1.21, True)])
def test_gradient_descent_sentence_follows_the_rise_threshold(start, sharpened):
    text = report.gradient_descent_sentence(run_of("gd", [start, 9.0, *hovering(40)]))
    assert ("progressive sharpening, more than 1.2x" in text) == sharpened
    assert ("no progressive sharpening" in text) == (not sharpened)


@pytest.mark.parametrize("end, reached", [(8.9, False), (9.1, True)])
def test_gradient_descent_sentence_says_not_reached_below_the_band(end, reached):
    text = report.gradient_descent_sentence(run_of("gd", [*np.linspace(2.0, end, 40)]))
    assert ("did not reach 90% of 2/eta within 390 steps" in text) == (not reached)


@pytest.mark.parametrize("inside, stays", [(0.8, True), (0.7, False)])
def test_gradient_descent_sentence_follows_the_share_inside_threshold(inside, stays):
    """After the rise, 20 checks to the end of which a share `inside` lie in the band, the rest at 1.5x 2/η."""
    tail = [10.0] * round(20 * inside) + [15.0] * round(20 * (1 - inside))
    tail = [tail[0], *tail[-round(20 * (1 - inside)):], *tail[1:round(20 * inside)]]  # excursions early
    text = report.gradient_descent_sentence(run_of("gd", [*np.linspace(2.0, 8.0, 40), *tail]))
    assert ("it then stayed within" in text) == stays and ("did not stay within" in text) == (not stays)


def test_a_gradient_descent_run_that_starts_in_the_band_is_not_tested_for_sharpening():
    assert "progressive sharpening not tested" in report.gradient_descent_sentence(run_of("gd", hovering(30)))


@pytest.mark.parametrize("lam_level, below", [(8.9, True), (9.1, False)])
def test_sgd_sentence_reads_batch_sharpness_at_the_edge_and_where_lambda_max_is(lam_level, below):
    """Batch sharpness rising to 2/η and hovering; λ_max flat just below (8.9) or just inside (9.1) the band."""
    batch = [*np.linspace(2.0, 9.5, 10), *hovering(40)]
    text = report.sgd_sentence(run_of("sgd", [lam_level] * 50, batch))
    assert "batch sharpness settled within" in text
    assert ("as Andreyev & Beneventano 2024 find" in text) == below
    assert ("full-batch lambda_max stayed below the band" in text) == below


def test_sgd_sentence_says_not_reached_and_reached_but_not_settled():
    low = report.sgd_sentence(run_of("sgd", [5.0] * 40, [*np.linspace(2.0, 8.0, 40)]))
    assert "batch sharpness did not reach 90% of 2/eta within 390 steps" in low
    spiky = report.sgd_sentence(run_of("sgd", [5.0] * 40, [2.0] * 10 + [10.0, 3.0] * 15))
    assert "reached 90% of 2/eta at step 100 but did not stay within" in spiky


def test_the_tally_counts_the_runs_that_show_each_claim():
    runs = [run_of("gd", [*np.linspace(2.0, 9.5, 20), *hovering(60)]), run_of("gd", [2.0] * 40),
            run_of("sgd", [5.0] * 50, [*np.linspace(2.0, 9.5, 10), *hovering(40)])]
    text = report.dynamics_tally({"dynamics": {"runs": runs}})
    assert "2/eta in 1 of 2 MSE runs (Cohen" in text and "below 90% of it in 1 of 1 MSE runs" in text


def test_dynamics_and_sweep_together_are_refused_with_one_line(capsys, tmp_path):
    assert main.main(["--dynamics", "--sweep", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dynamics and --sweep are two different studies: choose one" in err
    assert main.main(["--dynamics", "--dynamics-losses", "hinge", "--out", str(tmp_path / "o")]) == 2
    assert "--dynamics-losses" in capsys.readouterr().err
    assert main.main(["--dynamics", "--model", "cnn", "--out", str(tmp_path / "o")]) == 2
    assert "--dynamics trains the MLP of --dynamics-hidden" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def quick_dynamics(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dynamics")
    assert main.main([*QUICK, "--out", str(tmp / "out"), "--runs-dir", str(tmp / "runs")]) == 0
    return tmp, json.loads((tmp / "out" / "dynamics" / "metrics.json").read_text())


@pytest.mark.slow
def test_quick_dynamics_writes_the_runs_the_figure_the_table_and_the_report(quick_dynamics):
    tmp, metrics = quick_dynamics
    out, cfg = tmp / "out" / "dynamics", metrics["config"]
    assert metrics["kind"] == "dynamics" and not (tmp / "out" / "metrics.json").exists()
    d = metrics["dynamics"]
    assert d["examples"] == cfg["dynamics_examples"] and d["seed"] == cfg["seeds"][0]
    runs = d["runs"]
    assert [(r["loss"], r["family"]) for r in runs] == [("mse", "gd"), ("mse", "sgd"), ("cross_entropy", "gd"),
                                                       ("cross_entropy", "sgd")]
    for r in runs:
        steps = [rec["step"] for rec in r["records"]]
        assert steps == list(range(0, cfg["dynamics_steps"] + 1, cfg["dynamics_check_every"]))
        assert r["threshold"] == pytest.approx(2 / r["lr"]) and len(r["step_losses"]) == cfg["dynamics_steps"]
        assert r["batch_size"] == (d["examples"] if r["family"] == "gd" else cfg["dynamics_batch_sizes"][0])
        for rec in r["records"]:  # each λ_max converged to its stated residual
            assert rec["converged"] and rec["residual"] <= cfg["dynamics_tol"] * abs(rec["lambda_max"]) * 1.0001
        assert set(r["reading"]) == {"threshold", "sharpening", "lambda_max", "batch_sharpness", "window_start",
                                     "lambda_ratio", "batch_ratio", "thresholds"}
        assert r["reading"]["thresholds"] == d["thresholds"] == {"band": report.EDGE_BAND, "rise": report.SHARPENING_RISE,
                                                                 "min_inside": report.EOS_INSIDE,
                                                                 "min_held": report.EOS_HELD}
        assert (r["reading"]["batch_sharpness"] is None) == (r["family"] == "gd")
    gd = runs[0]  # full batch: the loss before each step is the full-batch loss the check measured at that step
    assert gd["step_losses"][10] == pytest.approx(gd["records"][1]["loss"], rel=1e-5)
    assert (out / "edge_of_stability.png").stat().st_size > 10_000 and (out / "edge_of_stability.pdf").exists()
    with open(out / "dynamics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(row["lambda_max_end"]) for row in table] == [r["records"][-1]["lambda_max"] for r in runs]
    arrays = np.load(out / "results.npz")
    assert list(arrays["run0_lambda_max"]) == [rec["lambda_max"] for rec in runs[0]["records"]]
    text = " ".join(pdf_text(out / report.DYNAMICS_REPORT).split())
    assert "The edge of stability" in text and "Andreyev & Beneventano 2024" in text
    assert "MSE, gradient descent, eta 0.2" in text and "first 200 training examples" in text


@pytest.mark.slow
def test_a_rerun_resumes_every_run_and_plot_only_redraws(quick_dynamics):
    tmp, first = quick_dynamics
    assert main.main([*QUICK, "--out", str(tmp / "again"), "--runs-dir", str(tmp / "runs")]) == 0
    again = json.loads((tmp / "again" / "dynamics" / "metrics.json").read_text())
    assert len(again["resumed"]) == len(first["dynamics"]["runs"])
    assert again["dynamics"]["runs"] == first["dynamics"]["runs"]
    figure = tmp / "out" / "dynamics" / "edge_of_stability.png"
    figure.unlink()
    assert main.main(["--plot-only", "--dynamics", "--quiet", "--out", str(tmp / "out")]) == 0
    assert figure.stat().st_size > 10_000


def test_the_mse_runs_train_on_the_loss_their_curvature_is_measured_on():
    """One source for the loss: the tracker's loss_fn is the one training.train uses for loss="mse"."""
    s = dynamics.DynamicsRunSettings("mse", "gd", 0.1, 8, 1, 1, (4,), 1e-3, 5, 1, 0, 0, 64, "cpu")
    import torch
    tracker = dynamics.CurvatureTracker(torch.zeros(8, 784), torch.zeros(8, dtype=torch.long), s)
    assert tracker.loss_fn is utils.loss_function("mse") is utils.squared_error_loss


def test_the_parameter_count_in_metrics_is_the_built_models():
    import models
    for hidden in [(32, 32, 32), (16,), (5, 7)]:
        assert dynamics.mlp_parameters(hidden) == sum(p.numel() for p in models.SmallMLP(hidden).parameters())


def test_a_diverging_run_is_recorded_up_to_the_blow_up_and_reported():
    """Gradient descent at η = 50 on an MSE problem whose λ_max at initialisation is ~20 (2/η = 0.04) blows up
    within a few steps: the stage returns "diverged" with the checks before the blow-up (no curvature is measured
    at non-finite weights), and the warning and the sentence name the step."""
    import dataclasses

    import torch

    from experiment import outputs
    from experiment.stages import Split

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
    s = dynamics.DynamicsRunSettings("mse", "gd", 50.0, 64, 200, 1, (8,), 1e-3, 20, 1, 0, 0, 64, "cpu")
    r = {**dataclasses.asdict(s), **dynamics.dynamics_trajectory(s, train=Split(x, y))}
    assert r["outcome"] == "diverged" and 1 <= r["diverged_at"] <= 10
    assert [rec["step"] for rec in r["records"]] == list(range(r["diverged_at"]))
    assert all(np.isfinite(rec["lambda_max"]) for rec in r["records"])
    r["reading"] = dynamics.reading(r)
    assert outputs.dynamics_warnings(r) == [f"gd mse lr 50: diverged at step {r['diverged_at']}; its series stop there"]
    assert f"diverged at step {r['diverged_at']})" in report.gradient_descent_sentence(r)


def test_a_sentence_words_a_run_with_the_thresholds_it_was_read_with():
    """A reading stored with a 20% band is worded with 20%, whatever the report's constant is now."""
    r = run_of("gd", [*np.linspace(2.0, 9.5, 20), *hovering(60)])
    r["reading"]["thresholds"] = {**r["reading"]["thresholds"], "band": 0.2}
    assert "within ±20% of 2/eta" in report.gradient_descent_sentence(r)
