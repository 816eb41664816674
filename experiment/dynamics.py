"""`--dynamics`: the edge of stability reproduced (Cohen et al. 2021; Andreyev & Beneventano 2024).

One seed's MLP is trained on the first --dynamics-examples training digits by full-batch gradient descent at each
step size of its loss and by SGD at each batch size, for each loss (MSE and cross-entropy), tracking densely:
full-batch λ_max by Lanczos warm-started from the last check's eigenvector, converged to a stated residual;
batch sharpness (for gradient descent, the full gradient's own curvature gᵀHg/‖g‖²); the training loss at every
step. Each training run is a stage of the store (subject "dynamics"), so a rerun resumes. The reading of each run
against 2/η (landscape.dynamics, with the report's thresholds) is stored beside its series.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch

import models
import training
import utils
from experiment import report
from experiment.environment import device_of
from experiment.settings import Settings
from experiment.stages import Split, stage
from landscape.store import Keyed, digest

log = logging.getLogger("landscape")
FAMILIES = ("gd", "sgd")  # full-batch gradient descent, mini-batch SGD


@dataclass(frozen=True)
class DynamicsRunSettings(Settings):
    """One training run of the study: its loss, optimiser family, step size and batch (N for gradient descent),
    its length and checks, and how each check measures."""

    loss: str
    family: str
    lr: float
    batch_size: int
    steps: int
    check_every: int
    hidden: tuple[int, ...]
    tol: float
    max_iter: int
    batches: int
    seed: int
    probe_seed: int
    memory_budget_mb: int
    device: str


def plan(cfg, examples: int) -> list[DynamicsRunSettings]:
    """Every run, in order: per loss, gradient descent at each of its step sizes (batch = all `examples`), then
    SGD at its one step size and each batch size."""
    common = dict(steps=cfg.dynamics_steps, check_every=cfg.dynamics_check_every, hidden=tuple(cfg.dynamics_hidden),
                  tol=cfg.dynamics_tol, max_iter=cfg.dynamics_max_iter, batches=cfg.dynamics_batches,
                  seed=cfg.seeds[0], probe_seed=cfg.probe_seed, memory_budget_mb=cfg.memory_budget_mb,
                  device=device_of(cfg.device))
    runs = []
    for loss in cfg.dynamics_losses:
        runs += [DynamicsRunSettings(loss, "gd", lr, examples, **common) for lr in gd_lrs(cfg, loss)]
        runs += [DynamicsRunSettings(loss, "sgd", sgd_lr(cfg, loss), b, **common) for b in cfg.dynamics_batch_sizes]
    return runs


def gd_lrs(cfg, loss: str) -> tuple[float, ...]:
    """Gradient descent's step sizes for `loss`."""
    return cfg.dynamics_mse_lrs if loss == "mse" else cfg.dynamics_cross_entropy_lrs


def sgd_lr(cfg, loss: str) -> float:
    """SGD's step size for `loss`."""
    return cfg.dynamics_mse_sgd_lr if loss == "mse" else cfg.dynamics_cross_entropy_sgd_lr


def inputs(run) -> dict[str, Keyed]:
    """The study's data: the first --dynamics-examples training examples (all when 0 or more than there are)."""
    train = run.inputs["train"].value
    n = min(run.cfg.dynamics_examples or train.size, train.size)
    return {"train": Keyed(Split(train.x[:n], train.y[:n]), digest(run.data.sha256, "train", n))}


def label(s: DynamicsRunSettings) -> str:
    """A run in a progress line: "gd mse lr=0.1" or "sgd mse lr=0.1 b=32"."""
    return f"{s.family} {s.loss} lr={s.lr:g}" + (f" b={s.batch_size}" if s.family == "sgd" else "")


class CurvatureTracker:
    """Training callback: at each check, the full-batch training loss, full-batch λ_max (Lanczos from the last
    check's eigenvector, stopped at ‖Hv − λv‖ ≤ tol·|λ| or `max_iter` products, its residual recorded) and batch
    sharpness over `batches` mini-batches of `batch_size` (one batch of all examples for gradient descent: the
    full gradient's own curvature), all of the loss the run trains on. The model is left as it was."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, s: DynamicsRunSettings) -> None:
        self.x, self.y, self.s = x, y, s
        self.loss_fn = utils.loss_function(s.loss)
        self.vector: torch.Tensor | None = None
        self.records: list[dict] = []
        self.seconds = 0.0

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        begin, was_training, s = time.perf_counter(), model.training, self.s
        model.eval()
        try:
            with torch.no_grad():
                loss = float(self.loss_fn(model(self.x), self.y))
            if not math.isfinite(loss):  # the update before this check blew up: no curvature to measure
                raise training.TrainingDiverged(s.seed, math.ceil(step * s.batch_size / self.x.shape[0]), step, loss,
                                                s.lr)
            eig = utils.top_hessian_eigenvalue(model, self.x, self.y, loss_fn=self.loss_fn, tol=s.tol,
                                               max_iter=s.max_iter, seed=s.probe_seed, start=self.vector,
                                               memory_budget=s.budget)
            full = s.batch_size >= self.x.shape[0]
            batch = utils.batch_sharpness(model, self.x, self.y, loss_fn=self.loss_fn,
                                          batch_size=min(s.batch_size, self.x.shape[0]),
                                          batches=1 if full else s.batches, seed=s.probe_seed + step,
                                          memory_budget=s.budget)
        finally:
            model.train(was_training)
        self.vector = eig.eigenvector
        self.records.append({"step": step, "loss": loss, "lambda_max": eig.eigenvalue, "residual": eig.residual,
                             "converged": bool(eig.converged), "products": eig.iterations,
                             "batch_sharpness": batch.value, "batch_sharpness_stderr": batch.stderr})
        self.seconds += time.perf_counter() - begin


@stage(DynamicsRunSettings)
def dynamics_trajectory(s: DynamicsRunSettings, *, train: Split, progress: bool = False) -> dict:
    """One run trained from the seed's initial weights, checked at step 0, every `check_every` steps and at the
    end: its records, its per-step training losses (for gradient descent, the full-batch loss before each step)
    and how it ended ("fixed budget", or "diverged" with the records up to the blow-up)."""
    model = models.SmallMLP(s.hidden, generator=torch.Generator().manual_seed(s.seed)).to(s.device)
    x, y = train.x, train.y
    tracker = CurvatureTracker(x, y, s)
    tracker(model, 0)
    outcome, losses, seconds, diverged_at = "fixed budget", [], 0.0, None
    try:
        h = training.train(model, x, y, max_steps=s.steps, lr=s.lr, momentum=0.0, batch_size=s.batch_size,
                           seed=s.seed, loss=s.loss, callback=tracker, callback_every=s.check_every,
                           progress=progress, desc=label(s))
        losses, seconds = h.step_losses, h.seconds - h.callback_seconds
        if tracker.records[-1]["step"] != h.steps:
            tracker(model, h.steps)
    except training.TrainingDiverged as err:
        outcome, diverged_at = "diverged", err.step
    return {"outcome": outcome, "diverged_at": diverged_at, "examples": int(x.shape[0]),
            "threshold": utils.stability_threshold(s.lr), "records": tracker.records, "step_losses": losses,
            "seconds": round(seconds, 4), "tracking_seconds": round(tracker.seconds, 4)}


def reading(result: dict) -> dict:
    """The run read against its 2/η with the report's thresholds (landscape.dynamics.edge_of_stability): batch
    sharpness is read for SGD; for gradient descent only λ_max."""
    records = result["records"]
    steps = [r["step"] for r in records]
    sgd = result["family"] == "sgd"
    thresholds = {"band": report.EDGE_BAND, "rise": report.SHARPENING_RISE, "min_inside": report.EOS_INSIDE,
                  "min_held": report.EOS_HELD}
    found = utils.edge_of_stability(steps, [r["lambda_max"] for r in records], result["threshold"], **thresholds,
                                    batch_sharpness=[r["batch_sharpness"] for r in records] if sgd else None)
    return {**dataclasses.asdict(found), "thresholds": thresholds}


def measure_all(run) -> list[dict]:
    """Every run of the plan trained and tracked (or loaded from the store), with its settings and its reading,
    a log line each."""
    data = inputs(run)
    runs = plan(run.cfg, data["train"].value.size)
    found, begin = [], time.perf_counter()
    for number, s in enumerate(runs):
        result = {**dataclasses.asdict(s),
                  **run.store.run(dynamics_trajectory, s, "dynamics", data, label=f"dynamics[{label(s)}]").value}
        result["reading"] = reading(result)
        found.append(result)
        last = result["records"][-1]
        log.info("dynamics %d/%d (%s): lambda_max %.3g -> %.3g, 2/eta %.3g, loss %.3g (%s); %.0f s so far",
                 number + 1, len(runs), label(s), result["records"][0]["lambda_max"], last["lambda_max"],
                 result["threshold"], last["loss"], result["outcome"], time.perf_counter() - begin)
    return found


def stage_count(cfg) -> int:
    """How many stages the study has (for its progress bar)."""
    return sum(len(gd_lrs(cfg, loss)) + len(cfg.dynamics_batch_sizes) for loss in cfg.dynamics_losses)


def mlp_parameters(hidden: tuple[int, ...]) -> int:
    """The parameters of SmallMLP(hidden) on 28x28 images and 10 classes, counted without building one (which
    would draw its default initialisation from the global random state)."""
    widths = [28 * 28, *hidden, models.NUM_CLASSES]
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))


def summary(cfg, runs: list[dict]) -> dict:
    """The study's part of metrics.json: its data and model, the thresholds its readings used, and the runs."""
    return {"seed": cfg.seeds[0], "examples": runs[0]["examples"] if runs else 0, "hidden": list(cfg.dynamics_hidden),
            "parameters": mlp_parameters(tuple(cfg.dynamics_hidden)),
            "thresholds": runs[0]["reading"]["thresholds"] if runs else {}, "runs": runs}
