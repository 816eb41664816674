"""Flags and their validation: every field of main.py's `Config` is a --flag, and every value `validate`
accepts can run (bad values exit with status 2 and one line naming the flag)."""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from landscape.files import WriteError

SEED_RANGE = (0, 2**63 - 1)  # what torch.Generator.manual_seed and numpy's default_rng both accept


class UsageError(Exception):
    """A flag value that cannot be used; the message names the flag, what it accepts and what it got."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2, as for our own checks
        raise UsageError(message)


def build_parser(config: type, description: str = "") -> argparse.ArgumentParser:
    """A parser with one flag per field of the `config` dataclass (`--field-name`), its help and default from
    the field's metadata; every flag defaults to None, so that parse_args can tell a given flag from a default."""
    parser = _Parser(description=description)
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        if f.type == "bool":
            names = [meta["short"], flag] if "short" in meta else [flag]
            parser.add_argument(*names, action="store_true", default=None, help=f"{meta['help']} (default: off)")
            continue
        kind = {"int": int, "float": float, "str": str, "tuple[int, ...]": int, "tuple[float, ...]": float,
                "tuple[str, ...]": str}[f.type]
        nargs = "+" if f.type.startswith("tuple") else None
        parser.add_argument(flag, type=kind, nargs=nargs, choices=meta.get("choices"), default=None,
                            metavar=f.name.upper() if not meta.get("choices") else None,
                            help=f"{meta['help']} (default: {show(f.default)})")
    return parser


def show(value) -> str:
    """A flag value as a user types it: tuples space-separated."""
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_args(config: type, argv: list[str] | None = None, *, quick: dict, description: str = ""):
    """Flags -> a `config` instance: its defaults, then `quick`'s budgets under --quick, then every flag given
    explicitly; validated."""
    given = {k: v for k, v in vars(build_parser(config, description).parse_args(argv)).items() if v is not None}
    values = dataclasses.asdict(config())
    if given.get("quick"):
        values.update(quick)
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    cfg = config(**values)
    validate(cfg)
    return cfg


POSITIVE_INTS = ("epochs", "batch_size", "sharpness_max_iter", "flatness_samples", "memory_budget_mb", "eigen_k",
                 "density_runs", "density_steps", "track_examples", "worst_case_steps", "pac_bayes_samples",
                 "bezier_epochs", "track_max_iter", "track_checks", "stationary_steps", "entropy_chains", "sweep_max_steps", "sweep_check_every", "layer_max_probes", "two_batch_batches")
COUNTS = ("train_subset", "test_subset", "threads", "analysis_examples", "exact_max_parameters", "max_steps",
          "check_every", "collapse_steps", "sweep_collapse_steps", "sweep_train_examples", "stationary_burn_in")


def validate(cfg) -> None:
    """Raise UsageError naming the first flag whose value cannot work."""
    for name in POSITIVE_INTS:
        if getattr(cfg, name) < 1:
            raise UsageError(f"{_flag(name)} must be a positive integer, got {getattr(cfg, name)}")
    for name in COUNTS:
        if getattr(cfg, name) < 0:
            raise UsageError(f"{_flag(name)} must be 0 or a positive integer, got {getattr(cfg, name)}")
    for ok, message, value in [*_checks(cfg), *_dynamics_checks(cfg)]:
        if not ok:
            raise UsageError(f"{message}, got {show(value)}")


def os_error_line(err: OSError) -> str:
    """An operating-system failure in one line: what could not be written and why (landscape.files.WriteError
    says both), and that nothing written before was damaged, so the same command resumes."""
    what = str(err) if isinstance(err, WriteError) else \
        f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    return f"{what}; nothing written before was damaged: run the same command again to resume"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _in_seed_range(*seeds: int) -> bool:
    return all(SEED_RANGE[0] <= s <= SEED_RANGE[1] for s in seeds)


def _dynamics_checks(cfg) -> list[tuple[bool, str, object]]:
    """The checks of --dynamics's flags (and that it runs alone)."""
    rates = (*cfg.dynamics_mse_lrs, *cfg.dynamics_cross_entropy_lrs, cfg.dynamics_mse_sgd_lr,
             cfg.dynamics_cross_entropy_sgd_lr)
    return [
        (not (cfg.dynamics and cfg.sweep), "--dynamics and --sweep are two different studies: choose one", "both"),
        (not (cfg.dynamics and (cfg.shard_data or cfg.shard_points)), "--dynamics runs in one process: drop "
         "--shard-data and --shard-points", "--dynamics"),
        (not (cfg.dynamics and cfg.model != "mlp"), "--dynamics trains the MLP of --dynamics-hidden: drop --model",
         cfg.model),
        (bool(cfg.dynamics_losses) and set(cfg.dynamics_losses) <= {"mse", "cross_entropy"}
         and len(set(cfg.dynamics_losses)) == len(cfg.dynamics_losses),
         "--dynamics-losses must be distinct names from mse, cross_entropy", cfg.dynamics_losses),
        (all(math.isfinite(v) and v > 0 for v in rates), "--dynamics-mse-lrs, --dynamics-cross-entropy-lrs and the "
         "two --dynamics-*-sgd-lr must be positive numbers", rates),
        (all(b >= 1 for b in cfg.dynamics_batch_sizes), "--dynamics-batch-sizes must be positive integers",
         cfg.dynamics_batch_sizes),
        (bool(cfg.dynamics_hidden) and all(h >= 1 for h in cfg.dynamics_hidden),
         "--dynamics-hidden widths must be positive integers", cfg.dynamics_hidden),
        (cfg.dynamics_examples == 0 or cfg.dynamics_examples >= 2, "--dynamics-examples must be 0 (all) or at "
         "least 2", cfg.dynamics_examples),
        (0 < cfg.dynamics_tol < 1, "--dynamics-tol must be in (0, 1)", cfg.dynamics_tol),
        *[(getattr(cfg, name) >= 1, f"{_flag(name)} must be a positive integer", getattr(cfg, name))
          for name in ("dynamics_steps", "dynamics_check_every", "dynamics_max_iter", "dynamics_batches")],
    ]


def _checks(cfg) -> list[tuple[bool, str, object]]:
    """(holds, what the flag needs, the value given) for every check beyond the integer ranges."""
    return [
        (len(cfg.seeds) >= 2, "--seeds needs at least two seeds (connectivity compares two models)", cfg.seeds),
        (len(set(cfg.seeds)) == len(cfg.seeds), "--seeds must be distinct", cfg.seeds),
        (_in_seed_range(*cfg.seeds), f"--seeds must be integers from {SEED_RANGE[0]} to {SEED_RANGE[1]} (what torch "
         "and numpy accept as a seed)", cfg.seeds),
        (_in_seed_range(cfg.probe_seed), f"--probe-seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]} "
         "(what torch and numpy accept as a seed)", cfg.probe_seed),
        (all(h >= 1 for h in cfg.hidden), "--hidden widths must be positive integers", cfg.hidden),
        (math.isfinite(cfg.lr) and cfg.lr > 0, "--lr must be a positive number", cfg.lr),
        (0 <= cfg.momentum < 1, "--momentum must be in [0, 1)", cfg.momentum),
        (0 <= cfg.sweep_momentum < 1, "--sweep-momentum must be in [0, 1)", cfg.sweep_momentum),
        (cfg.sweep_train_examples != 1, "--sweep-train-examples must be 0 (all) or at least 2",
         cfg.sweep_train_examples),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "--weight-decay must be >= 0", cfg.weight_decay),
        (0 < cfg.sharpness_tol < 1, "--sharpness-tol must be in (0, 1)", cfg.sharpness_tol),
        (0 < cfg.eigen_tol < 1, "--eigen-tol must be in (0, 1)", cfg.eigen_tol),
        (0 < cfg.track_tol < 1, "--track-tol must be in (0, 1)", cfg.track_tol),
        (len(cfg.stationary_directions) == 2 and cfg.stationary_directions[0] >= 1 and cfg.stationary_directions[1] >= 0,
         "--stationary-directions needs two counts: eigenvectors (at least 1) and random controls (0 or more)",
         cfg.stationary_directions),
        (bool(cfg.entropy_scopes) and all(math.isfinite(g) and g > 0 for g in cfg.entropy_scopes),
         "--entropy-scopes must be positive numbers", cfg.entropy_scopes),
        (0 < cfg.layer_tol < 1, "--layer-tol must be in (0, 1)", cfg.layer_tol),
        (all(0 < v < 1 for v in (cfg.trace_rel_stderr, cfg.layer_rel_stderr, cfg.noise_rel_stderr)),
         "--trace-rel-stderr, --layer-rel-stderr and --noise-rel-stderr must be in (0, 1)",
         (cfg.trace_rel_stderr, cfg.layer_rel_stderr, cfg.noise_rel_stderr)),
        (len(cfg.two_batch) == 2 and 1 <= cfg.two_batch[0] < cfg.two_batch[1],
         "--two-batch needs two batch sizes, small < big", cfg.two_batch),
        (cfg.track_every >= -1, "--track-every must be -1 (off), 0 (--track-checks evenly spaced) or a positive integer", cfg.track_every),
        (cfg.track_checks >= 2, "--track-checks must be at least 2 (the first and the last step)", cfg.track_checks),
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
