"""The sweep: a grid of training recipes (batch size × learning rate × width × seed), every model trained to a
common training loss and measured with every per-model stage, the barriers between each configuration's first
two seeds, and the rank statistics of every measure against the generalisation gaps."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time

import torch

import training
import utils
from experiment.outputs import model_metrics
from experiment.pipeline import Run, run_stages
from experiment.settings import TrainingSettings
from experiment.stages import MODEL_STAGES, aligned, build_model, connectivity, pair_and_centre, train_model
from landscape.store import Keyed, digest

log = logging.getLogger("landscape")

AXES = ("batch_size", "lr", "width")  # the hyper-parameters Ψ averages over; the seed only groups
PAIR_STAGES = (connectivity, aligned)  # between the first two seeds of each configuration
# Each measure as a sweep.csv column, oriented so that larger means sharper (Jiang et al. 2020 use 1/σ² for
# the PAC-Bayes σ): a measure predicts generalisation when its τ with the gap is positive.
MEASURES = ("lambda_max", "lambda_k", "lambda_min", "trace", "layer_lambda_max", "flatness",
            "adaptive_flatness", "worst_case_absolute", "worst_case_adaptive", "pac_bayes_inv_sigma_sq",
            "pac_bayes_magnitude_aware_inv_sigma_sq", "b_simple", "b_noise", "temperature", "weight_norm_sq",
            "batch_sharpness", "barrier", "aligned_barrier")
GAPS = ("gap_loss", "gap_error")  # test − train cross-entropy, test − train error


def grid(cfg) -> list[dict]:
    """The sweep's configurations (without the seed), in the order they are trained."""
    return [{"batch_size": b, "lr": lr, "width": w}
            for b in cfg.sweep_batch_sizes for lr in cfg.sweep_lrs for w in cfg.sweep_widths]


def stage_count(cfg, points: list[dict]) -> int:
    """How many stages the sweep has (for its progress bar)."""
    return len(points) * len(cfg.seeds) * (1 + len(MODEL_STAGES)) + len(points) * len(PAIR_STAGES)


def model_config(cfg, point: dict):
    """The configuration one sweep model is trained and measured with: the grid point's batch size, learning
    rate and width (two hidden layers), trained to the sweep's target loss within its epoch budget."""
    return dataclasses.replace(cfg, batch_size=point["batch_size"], lr=point["lr"], hidden=(point["width"],) * 2,
                               epochs=cfg.sweep_max_epochs, train_to_loss=cfg.sweep_target_loss)


def tag(point: dict) -> str:
    """A grid point in a progress label: b=… lr=… w=…."""
    return f"b={point['batch_size']} lr={point['lr']} w={point['width']}"


def row(point: dict, seed: int, history: dict, model: torch.nn.Module, m: dict) -> dict:
    """sweep.csv's row for one model: its configuration, fit, generalisation gaps and every scalar measure."""
    records = history["tracking"]["records"]
    out = {**point, "seed": seed, "steps": history["steps"], "epochs": len(history["epoch_losses"]),
           "train_loss": m["train"]["loss"], "test_loss": m["test"]["loss"],
           "train_error": 1 - m["train"]["accuracy"], "test_error": 1 - m["test"]["accuracy"]}
    out["gap_loss"] = out["test_loss"] - out["train_loss"]
    out["gap_error"] = out["test_error"] - out["train_error"]
    pac = m["pac_bayes"]
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
        "temperature": m["gradient_noise"]["temperature"],
        "weight_norm_sq": float(utils.flat_parameters(model).double().pow(2).sum()),
        "batch_sharpness": records[-1]["batch_sharpness"] if records else math.nan,
        "tracked_lambda_max": records[-1]["lambda_max"] if records else math.nan,
    })
    return out


def train_and_measure(run: Run, point: dict, seed: int, *, say: bool = True
                      ) -> tuple[Keyed | None, dict | None, dict | None]:
    """One sweep model trained and measured (or loaded): (the trained model, its sweep.csv row, None), or
    (None, None, why it is left out) when it diverged or missed the target loss, which `say` logs."""
    cfg, mcfg, where = run.cfg, model_config(run.cfg, point), tag(point)
    try:
        keyed, history = run.store.trained(build_model, train_model, TrainingSettings.of(mcfg, seed=seed), run.inputs,
                                           label=f"train[{where} seed={seed}]")
    except training.TrainingDiverged as err:  # not cached: a rerun tries it again, up to the blow-up
        if say:
            log.warning("sweep: %s seed %d diverged at epoch %d, step %d: left out of the statistics", where, seed,
                        err.epoch, err.step)
        return None, None, {**point, "seed": seed, "epochs": err.epoch, "final_epoch_loss": math.inf,
                            "reason": "diverged"}
    if not history["reached_target"]:
        if say:
            log.warning("sweep: %s seed %d did not reach training loss %g in %d epochs (last epoch %.4f): left out "
                        "of the statistics", where, seed, cfg.sweep_target_loss, cfg.sweep_max_epochs,
                        history["epoch_losses"][-1])
        return None, None, {**point, "seed": seed, "epochs": len(history["epoch_losses"]),
                            "final_epoch_loss": history["epoch_losses"][-1], "reason": "missed the target"}
    measured = run_stages(run.store, mcfg, MODEL_STAGES, keyed.key, {**run.inputs, "model": keyed},
                          suffix=f"[{where} seed={seed}]")
    return keyed, row(point, seed, history, keyed.value, model_metrics(seed, history, keyed.value, measured)), None


def pair_barriers(run: Run, point: dict, first: Keyed, second: Keyed) -> dict:
    """The straight-line and weight-matched barriers between a configuration's first two seeds."""
    pair = run_stages(run.store, model_config(run.cfg, point), PAIR_STAGES, digest(first.key, second.key),
                      {**run.inputs, "model_a": first, "model_b": second}, suffix=f"[{tag(point)}]")
    return {"barrier": pair["connectivity"].value["train"]["barriers"]["loss_linear"],
            "aligned_barrier": pair["aligned"].value["train"]["barriers"]["loss_linear"]}


def measure_point(run: Run, point: dict, *, say: bool = True) -> tuple[list[dict], list[dict]]:
    """Every seed's model of one grid point (trained and measured, or loaded) and the barriers between its pair
    of seeds: (sweep.csv's rows, the models left out with the reason, which `say` logs)."""
    trained, rows, excluded = {}, [], []
    for seed in run.cfg.seeds:
        keyed, found, why = train_and_measure(run, point, seed, say=say)
        if keyed is None:
            excluded.append(why)
            continue
        trained[seed] = keyed
        rows.append(found)
    (first, second), _ = pair_and_centre(run.cfg.seeds)
    barriers = {"barrier": math.nan, "aligned_barrier": math.nan}
    if first in trained and second in trained:
        barriers = pair_barriers(run, point, trained[first], trained[second])
    return [{**r, **barriers} for r in rows], excluded


def phases(run: Run, points: list[dict]) -> tuple[list, ...]:
    """Under torchrun: first each rank's share of the models, then its share of the grid points' pairs."""
    if run.ranks.world == 1:
        return ()
    units = [(point, seed) for point in points for seed in run.cfg.seeds]
    return ([functools.partial(train_and_measure, run, *unit) for unit in units],
            [functools.partial(measure_point, run, point, say=False) for point in points])


def measure_grid(run: Run, points: list[dict]) -> tuple[list[dict], list[dict]]:
    """Every grid point's rows and left-out models, in grid order, with progress (under torchrun: reading back
    what the ranks computed)."""
    rows, excluded, begin = [], [], time.perf_counter()
    alone = run.ranks.world == 1
    for number, point in enumerate(points):
        point_rows, point_excluded = measure_point(run, point, say=alone)
        rows += point_rows
        excluded += point_excluded
        if alone:
            done, total = (number + 1) * len(run.cfg.seeds), len(points) * len(run.cfg.seeds)
            elapsed = time.perf_counter() - begin
            log.info("sweep: %d/%d models (%s), %.1f s per model, about %.0f s to go", done, total, tag(point),
                     elapsed / done, elapsed / done * (total - done))
    return rows, excluded


def configs(rows: list[dict]) -> list[dict]:
    """Each model's hyper-parameters and seed: what the granulated τ groups models by."""
    return [{k: r[k] for k in (*AXES, "seed")} for r in rows]


def correlations(rows: list[dict], *, seed: int) -> dict:
    """For each measure and each gap: Kendall's τ over the models, the granulated Ψ over AXES and their
    bootstrap intervals (landscape.statistics); models where the measure is not finite are left out."""
    out = {}
    for measure in MEASURES:
        usable = [r for r in rows if r.get(measure) is not None and math.isfinite(r[measure])]
        out[measure] = {}
        for gap in GAPS:
            if len(usable) < 2:
                out[measure][gap] = None
                continue
            r = utils.rank_correlation([u[measure] for u in usable], [u[gap] for u in usable], configs(usable), AXES,
                                       seed=seed)
            out[measure][gap] = dataclasses.asdict(r)
    return out


def statistics(rows: list[dict], *, seed: int) -> dict:
    """The sweep's statistics for metrics.json: the axes, every measure's rank correlations with the gaps, and
    Keskar et al.'s batch size against λ_max."""
    return {"axes": list(AXES), "correlations": correlations(rows, seed=seed),
            "batch_size_vs_sharpness": batch_size_vs_sharpness(rows, seed=seed)}


def batch_size_vs_sharpness(rows: list[dict], *, seed: int) -> dict | None:
    """Keskar et al. 2017's claim as a rank statistic: Kendall's τ of (batch size, λ_max) over the models and
    the granulated Ψ within groups that differ in the batch size only (τ > 0: larger batches, sharper)."""
    if len(rows) < 2:
        return None
    return dataclasses.asdict(utils.rank_correlation([r["batch_size"] for r in rows], [r["lambda_max"] for r in rows],
                                                     configs(rows), ("batch_size",), seed=seed))
