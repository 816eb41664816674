"""The sweep: a grid of training recipes (batch size × learning rate × width × seed), every model trained to a
common training loss and measured with every per-model stage, the barriers within each pair of seeds of a
configuration, and the study of which measure predicts the generalisation gap (landscape.statistics).

The design, as a reviewer of Jiang et al. 2020's kind would check it: equal fit (trained to one training loss,
checked every few steps), the error gap as the outcome on held-out data large enough that its binomial noise is
small against its spread, intervals and permutation tests that resample configurations, Holm's correction,
hyper-parameter baselines ranked like the measures, and every verdict recomputed on two halves of the seeds."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import numpy as np
import torch

import training
import utils
from experiment.outputs import model_metrics
from experiment.pipeline import Run, run_stages
from experiment.settings import TrainingSettings
from experiment.stages import MODEL_STAGES, Split, aligned, build_model, connectivity, seed_pairs, train_model
from landscape import statistics
from landscape.margins import output_margin
from landscape.store import Keyed, digest

log = logging.getLogger("landscape")

AXES = ("batch_size", "lr", "width")  # the hyper-parameters Ψ averages over; the seed only groups
PAIR_STAGES = (connectivity, aligned)  # within each pair of seeds of a configuration
STAGES = MODEL_STAGES  # each model's stages, the stationary distribution and the local entropy included
OUTCOME = "gap_error"  # the primary outcome: test − train error (Jiang et al. 2020)
SECONDARY = "gap_loss"  # test − train cross-entropy: mostly overconfidence, kept as a secondary table
# Each measure's claimed direction (+1: larger is sharper and should go with a larger gap; 0: no claimed
# direction, tested two-sided; -1: larger is flatter). Flatness measures are oriented so that larger means sharper
# (Jiang et al. use 1/σ² for the PAC-Bayes σ); Chaudhari et al.'s local entropy is larger in wider valleys, which
# they argue generalise better; the stationary ratio (measured / predicted variance, Mandt et al.) claims nothing.
MODEL_MEASURES = {"lambda_max": 1, "lambda_k": 1, "lambda_min": 0, "trace": 1, "layer_lambda_max": 1, "flatness": 1,
                  "adaptive_flatness": 1, "worst_case_absolute": 1, "worst_case_adaptive": 1,
                  "pac_bayes_inv_sigma_sq": 1, "pac_bayes_magnitude_aware_inv_sigma_sq": 1, "b_simple": 0,
                  "b_noise": 0, "batch_sharpness": 1, "local_entropy": -1, "stationary_ratio": 0}
PAIR_MEASURES = {"barrier": 0, "aligned_barrier": 0}  # one number per pair of seeds of a configuration
# What a measure must beat: the hyper-parameters (Smith & Le 2018: more noise, a smaller gap) and Jiang et al.'s
# simple quantities (steps to the target, the squared weight norm, 1/γ² of the 10th-percentile output margin).
BASELINES = {"lr": -1, "inv_batch_size": -1, "temperature": -1, "steps": 0, "weight_norm_sq": 0, "inv_margin_sq": 1}
NOISE_RATIO = 1 / 3  # the outcome's binomial noise must be at most this share of its spread across models


def grid(cfg) -> list[dict]:
    """The sweep's configurations (without the seed), in the order they are trained."""
    return [{"batch_size": b, "lr": lr, "width": w}
            for b in cfg.sweep_batch_sizes for lr in cfg.sweep_lrs for w in cfg.sweep_widths]


def stage_count(cfg, points: list[dict]) -> int:
    """How many stages the sweep has (for its progress bar)."""
    return len(points) * (len(cfg.seeds) * (1 + len(STAGES)) + len(seed_pairs(cfg.seeds)) * len(PAIR_STAGES))


def model_config(cfg, point: dict):
    """The configuration one sweep model is trained and measured with: the grid point's batch size, learning
    rate and width (two hidden layers), the sweep's momentum, trained to its target loss within its step budget,
    checked every --sweep-check-every steps; its curvature tracked at the first and the last step only, since the
    study reads the last check (batch sharpness and the tracked λ_max where the model stopped)."""
    return dataclasses.replace(cfg, batch_size=point["batch_size"], lr=point["lr"], hidden=(point["width"],) * 2,
                               momentum=cfg.sweep_momentum, max_steps=cfg.sweep_max_steps,
                               train_to_loss=cfg.sweep_target_loss, check_every=cfg.sweep_check_every,
                               collapse_steps=cfg.sweep_collapse_steps, track_checks=2)


def inputs(run: Run) -> dict[str, Keyed]:
    """The sweep's data: each model trains on the first --sweep-train-examples training examples (its analyses on
    the first --analysis-examples of those), and is tested on the rest of the training split with the test split."""
    train, test = run.inputs["train"].value, run.inputs["test"].value
    n = run.cfg.sweep_train_examples or train.size
    if n >= train.size:
        return run.inputs
    checksum = run.data.sha256
    analysis = run.cfg.analysis_examples or n
    held_out = Split(torch.cat([train.x[n:], test.x]), torch.cat([train.y[n:], test.y]))
    return {"train": Keyed(Split(train.x[:n], train.y[:n]), digest(checksum, "train", n)),
            "analysis": Keyed(Split(train.x[: min(n, analysis)], train.y[: min(n, analysis)]),
                              digest(checksum, "train", min(n, analysis))),
            "test": Keyed(held_out, digest(checksum, "held out after", n, held_out.size))}


def tag(point: dict) -> str:
    """A grid point in a progress label: b=… lr=… w=…."""
    return f"b={point['batch_size']} lr={point['lr']} w={point['width']}"


def row(point: dict, seed: int, history: dict, model: torch.nn.Module, m: dict, data: dict[str, Keyed]) -> dict:
    """sweep.csv's row for one model: its configuration, fit, generalisation gaps, every scalar measure and the
    baselines."""
    records = history["tracking"]["records"]
    train, test = data["train"].value, data["test"].value
    out = {**point, "seed": seed, "outcome": history["outcome"], "steps": history["steps"],
           "train_examples": train.size, "test_examples": test.size,
           "train_loss": m["train"]["loss"], "test_loss": m["test"]["loss"],
           "train_error": 1 - m["train"]["accuracy"], "test_error": 1 - m["test"]["accuracy"]}
    out["gap_loss"] = out["test_loss"] - out["train_loss"]
    out["gap_error"] = out["test_error"] - out["train_error"]
    out["test_error_se"] = math.sqrt(out["test_error"] * (1 - out["test_error"]) / test.size)  # binomial
    pac = m["pac_bayes"]
    margin = output_margin(model, train.x, train.y)
    out.update({
        "lambda_max": m["sharpness"]["eigenvalue"], "lambda_k": m["eigenpairs"]["top"][-1],
        "lambda_min": m["eigenpairs"]["lambda_min"], "trace": m["trace"]["trace"],
        "layer_lambda_max": max(layer["top_eigenvalue"] for layer in m["layers"]),
        "flatness": m["flatness"]["mean_increase"][-1], "adaptive_flatness": m["adaptive_flatness"]["mean_increase"][-1],
        "worst_case_absolute": m["worst_case"]["absolute"]["sharpness"],
        "worst_case_adaptive": m["worst_case"]["adaptive"]["sharpness"],
        "pac_bayes_inv_sigma_sq": pac["plain"]["sigma"] ** -2,
        "pac_bayes_magnitude_aware_inv_sigma_sq": pac["magnitude_aware"]["sigma"] ** -2,
        "b_simple": m["gradient_noise"]["b_simple"], "b_noise": m["gradient_noise"]["b_noise"],
        "batch_sharpness": records[-1]["batch_sharpness"] if records else math.nan,
        "tracked_lambda_max": records[-1]["lambda_max"] if records else math.nan,
        "inv_batch_size": 1 / point["batch_size"], "temperature": m["gradient_noise"]["temperature"],
        "weight_norm_sq": float(utils.flat_parameters(model).double().pow(2).sum()),
        "margin": margin, "inv_margin_sq": margin**-2 if margin > 0 else math.inf,
        "local_entropy": middle_scope_entropy(m["local_entropy"]),
        "stationary_ratio": median_eigen_ratio(m["stationary"]),
    })
    return out


def middle_scope_entropy(result: dict) -> float:
    """The Langevin local entropy ΔF at the middle scope γ of the sorted scopes (the lower middle of an even
    count): one number per model for the study."""
    order = np.argsort(result["scopes"])
    return float(result["langevin"][order[(len(order) - 1) // 2]])


def median_eigen_ratio(result: dict) -> float:
    """The median over the top Hessian eigenvectors (not the random controls) of measured / predicted stationary
    variance; NaN where no direction has a prediction (SGD on them unstable)."""
    ratios = [r for label, r in zip(result["labels"], result["ratio"])
              if label.startswith("eigen") and r is not None and math.isfinite(r)]
    return float(np.median(ratios)) if ratios else math.nan


def train_and_measure(run: Run, point: dict, seed: int, *, say: bool = True
                      ) -> tuple[Keyed | None, dict | None, dict | None]:
    """One sweep model trained and measured (or loaded): (the trained model, its sweep.csv row, None), or
    (None, None, why it is left out) when it diverged, collapsed to chance or was too slow to reach the target,
    which `say` logs."""
    cfg, mcfg, where, data = run.cfg, model_config(run.cfg, point), tag(point), inputs(run)
    try:
        keyed, history = run.store.trained(build_model, train_model, TrainingSettings.of(mcfg, seed=seed), data,
                                           label=f"train[{where} seed={seed}]")
    except training.TrainingDiverged as err:  # not cached: a rerun tries it again, up to the blow-up
        if say:
            log.warning("sweep: %s seed %d diverged at step %d: left out of the statistics", where, seed, err.step)
        return None, None, {**point, "seed": seed, "steps": err.step, "final_epoch_loss": math.inf,
                            "reason": "diverged"}
    if history["outcome"] != "reached":
        if say:
            log.warning("sweep: %s seed %d %s (training loss %g not reached in %d steps; last epoch %.4f): left out "
                        "of the statistics", where, seed, history["outcome"], cfg.sweep_target_loss, history["steps"],
                        history["epoch_losses"][-1])
        return None, None, {**point, "seed": seed, "steps": history["steps"],
                            "final_epoch_loss": history["epoch_losses"][-1], "reason": history["outcome"]}
    measured = run_stages(run.store, mcfg, STAGES, keyed.key, {**data, "model": keyed},
                          suffix=f"[{where} seed={seed}]")
    metrics = model_metrics(seed, history, keyed.value, measured)
    return keyed, row(point, seed, history, keyed.value, metrics, data), None


def pair_barriers(run: Run, point: dict, first: Keyed, second: Keyed) -> dict:
    """The straight-line and weight-matched barriers between two seeds' models of one configuration."""
    pair = run_stages(run.store, model_config(run.cfg, point), PAIR_STAGES, digest(first.key, second.key),
                      {**inputs(run), "model_a": first, "model_b": second}, suffix=f"[{tag(point)}]")
    return {"barrier": pair["connectivity"].value["train"]["barriers"]["loss_linear"],
            "aligned_barrier": pair["aligned"].value["train"]["barriers"]["loss_linear"]}


def measure_point(run: Run, point: dict, *, say: bool = True) -> tuple[list[dict], list[dict], list[dict]]:
    """Every seed's model of one grid point (trained and measured, or loaded) and the barriers within each of its
    pairs of seeds: (sweep.csv's rows, one record per pair whose two models both trained, the models left out
    with the reason, which `say` logs). A pair's record holds its barriers and the mean of its models' gaps."""
    trained, rows, excluded = {}, {}, []
    for seed in run.cfg.seeds:
        keyed, found, why = train_and_measure(run, point, seed, say=say)
        if keyed is None:
            excluded.append(why)
            continue
        trained[seed], rows[seed] = keyed, found
    pairs = []
    for number, (a, b) in enumerate(seed_pairs(run.cfg.seeds)):
        if a in trained and b in trained:
            gaps = {g: (rows[a][g] + rows[b][g]) / 2 for g in (OUTCOME, SECONDARY)}
            pairs.append({**point, "pair": number, "seeds": [a, b], **gaps,
                          **pair_barriers(run, point, trained[a], trained[b])})
    return list(rows.values()), pairs, excluded


def phases(run: Run, points: list[dict]) -> tuple[list, ...]:
    """Under torchrun: first each rank's share of the models, then its share of the grid points' pairs."""
    if run.ranks.world == 1:
        return ()
    units = [(point, seed) for point in points for seed in run.cfg.seeds]
    return ([functools.partial(train_and_measure, run, *unit) for unit in units],
            [functools.partial(measure_point, run, point, say=False) for point in points])


def measure_grid(run: Run, points: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """Every grid point's rows, pairs and left-out models, in grid order, with progress (under torchrun: reading
    back what the ranks computed)."""
    rows, pairs, excluded, begin = [], [], [], time.perf_counter()
    alone = run.ranks.world == 1
    for number, point in enumerate(points):
        found = measure_point(run, point, say=alone)
        rows, pairs, excluded = rows + found[0], pairs + found[1], excluded + found[2]
        if alone:
            done, total = (number + 1) * len(run.cfg.seeds), len(points) * len(run.cfg.seeds)
            elapsed = time.perf_counter() - begin
            log.info("sweep: %d/%d models (%s), %.1f s per model, about %.0f s to go", done, total, tag(point),
                     elapsed / done, elapsed / done * (total - done))
    return rows, pairs, excluded


# ----------------------------------------------------------------------------- the study's statistics
def configs(rows: list[dict], seed_key: str = "seed") -> list[dict]:
    """Each model's hyper-parameters and seed (or pair): what the statistics group models by."""
    return [{k: r[k] for k in (*AXES, seed_key)} for r in rows]


def study(rows: list[dict], pairs: list[dict], *, outcome: str, seed: int) -> statistics.Findings:
    """Every measure and baseline against `outcome`: the models' own measures over the models, the barriers over
    the pairs (one number each, never copied onto models), Holm's correction across all of them together."""
    by_model = statistics.findings(rows, outcome=outcome, measures=MODEL_MEASURES, baselines=BASELINES, axes=AXES,
                                   seed=seed)
    by_pair = statistics.findings([{**p, "seed": p["pair"]} for p in pairs], outcome=outcome,  # pairs as the units
                                  measures=PAIR_MEASURES, baselines={}, axes=AXES, seed=seed)
    records = by_model.records + by_pair.records
    directions = {**MODEL_MEASURES, **BASELINES, **PAIR_MEASURES}
    for record, q in zip(records, statistics.holm([r.p_value for r in records])):
        record.p_holm = float(q)
        record.verdict = statistics.verdict(record.psi, record.p_holm, direction=directions[record.measure])
        halves = {**by_model.half_verdicts, **by_pair.half_verdicts}.get(record.measure)
        record.replicated = record.verdict != "no evidence" and halves == (record.verdict, record.verdict)
    return statistics.Findings(records, {**by_model.statistics, **by_pair.statistics},
                               {**by_model.half_verdicts, **by_pair.half_verdicts}, by_model.alpha)


def noise_of(rows: list[dict]) -> dict:
    """The outcome's measurement noise against its spread: the median binomial standard error of one model's
    test error, the standard deviation of the error gap across models, and their ratio (at most NOISE_RATIO)."""
    se = float(np.median([r["test_error_se"] for r in rows])) if rows else math.nan
    sd = float(np.std([r[OUTCOME] for r in rows], ddof=1)) if len(rows) > 1 else math.nan
    return {"test_examples": rows[0]["test_examples"] if rows else 0, "median_test_error_se": se, "gap_sd": sd,
            "ratio": se / sd if sd > 0 else math.nan, "threshold": NOISE_RATIO}


def keskar_test(rows: list[dict], *, seed: int) -> dict | None:
    """Keskar et al. 2017's claim as they state it: within groups that fix the learning rate, width and seed,
    does λ_max rise with the batch size? The batch-size axis of Ψ(batch size, λ_max) with its permutation p."""
    usable = [r for r in rows if math.isfinite(r["lambda_max"])]
    if len(usable) < 2:
        return None
    test = statistics.psi_permutation_test([r["batch_size"] for r in usable], [r["lambda_max"] for r in usable],
                                           configs(usable), ("batch_size",), seed=seed)
    return {"psi": test.per_axis["batch_size"], "p_value": test.axis_p_values["batch_size"],
            "groups": test.groups["batch_size"]}


def temperature_test(rows: list[dict], *, seed: int) -> dict | None:
    """Smith & Le 2018: do configurations at equal temperature have alike error gaps (statistics.temperature_test)?"""
    if len(rows) < 2:
        return None
    return dataclasses.asdict(statistics.temperature_test([r[OUTCOME] for r in rows], [r["temperature"] for r in rows],
                                                          configs(rows), seed=seed))


def summary(cfg, points: list[dict], rows: list[dict], pairs: list[dict], excluded: list[dict]) -> dict:
    """The sweep's part of metrics.json: the grid, the rows, the pairs, what was left out, and the study."""
    primary = study(rows, pairs, outcome=OUTCOME, seed=cfg.probe_seed)
    secondary = study(rows, pairs, outcome=SECONDARY, seed=cfg.probe_seed)
    total = len(points) * len(cfg.seeds)
    return {"grid": points, "seeds": list(cfg.seeds), "axes": list(AXES), "rows": rows, "pairs": pairs,
            "excluded": excluded, "outcome": OUTCOME, "secondary_outcome": SECONDARY,
            "stopping_gate": training.StoppingRule.TARGET_GATE,
            "trained_fraction": len(rows) / total if total else math.nan,
            "findings": [dataclasses.asdict(r) for r in primary.records],
            "half_verdicts": {k: list(v) for k, v in primary.half_verdicts.items()},
            "secondary_findings": [dataclasses.asdict(r) for r in secondary.records],
            "alpha": primary.alpha, "noise": noise_of(rows), "temperature_test": temperature_test(rows, seed=cfg.probe_seed),
            "keskar": keskar_test(rows, seed=cfg.probe_seed)}
