"""metrics.json and the files beside it: the schema (one place for every kind of run: the default run, "run",
the sweep, "sweep", and the edge-of-stability study, "dynamics"), the tables and arrays derived from it, and the
one writer that puts them on disk.

Written last, metrics.json means a complete run: figures and report, the table (metrics.csv, sweep.csv or
dynamics.csv) and results.npz come first.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import data as data_module
import plotting
from experiment.environment import device_of, environment
from experiment.report import median_eigen_ratio
from experiment.pipeline import Measured, Run, check_folders, output_folder
from experiment.stages import pair_and_centre
from landscape.files import write_atomic, write_bytes_atomic
from landscape.store import Keyed

SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------- the schema
def run_header(run: Run, kind: str) -> dict:
    """The part of metrics.json every run has: schema, kind, time, configuration, data, environment (with the
    number of processes and, under torchrun, how many stages each computed in its share), store."""
    ds = run.data
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(run.cfg),
        "data": {"name": ds.name, "source": ds.source, "hint": ds.hint, "n_train": int(ds.x_train.shape[0]),
                 "n_test": int(ds.x_test.shape[0]), "sha256": ds.sha256},
        "environment": {**environment(device_of(run.cfg.device)), "processes": run.ranks.world,
                        **({"stages_per_process": [len(share) for share in run.shares]} if run.shares else {})},
        "run_folder": str(run.store.root),
        "resumed": run.store.loaded,
    }


def model_metrics(seed: int, history: dict, model: torch.nn.Module, r: dict[str, Keyed]) -> dict:
    """metrics.json's entry for one model, from its stages' results."""
    out = {"seed": seed, "training": history, "parameters": sum(p.numel() for p in model.parameters()),
           **r["evaluate"].value, "sharpness": r["sharpness"].value, **r["spectrum"].value}
    out.update({name: r[name].value for name in ("trace", "layers", "flatness", "adaptive_flatness", "worst_case",
                                                 "pac_bayes", "gradient_noise", "stationary", "local_entropy",
                                                 "exact") if name in r})
    return out


def run_metrics(run: Run, measured: dict[int, Measured], pair: dict[str, Keyed], centre: dict[str, Keyed]) -> dict:
    """The default run's metrics.json, from its stages' results."""
    (first, second), middle = pair_and_centre(run.cfg.seeds)
    per_model = {str(seed): model_metrics(seed, m.history, m.model.value, m.results) for seed, m in measured.items()}
    warnings = [w for m in per_model.values() for w in model_warnings(m)]
    if run.cfg.model != "mlp":
        warnings.append(f"weight matching and the rescaling experiment need an MLP: skipped for --model {run.cfg.model}")
    connectivity = {"seeds": [first, second], **pair["connectivity"].value}
    connectivity.update({name: pair[name].value for name in ("aligned", "bezier") if name in pair})
    return {
        **run_header(run, "run"),
        "models": per_model,
        "connectivity": connectivity,
        "reparametrisation": {"seed": middle, "rows": [],
                              **(centre["reparametrisation"].value if "reparametrisation" in centre else {})},
        "surface": {"seed": middle, **centre["surface"].value},
        "warnings": run.store.warnings + warnings,
        "timings": run.store.timings,
    }


def sweep_metrics(run: Run, sweep: dict) -> dict:
    """The sweep's metrics.json: `sweep` is experiment.sweep.summary's record (the grid, one row per measured
    model, one per pair of seeds, the models left out and why, and the study's findings)."""
    return {**run_header(run, "sweep"), "sweep": sweep, "warnings": run.store.warnings, "timings": run.store.timings}


def dynamics_metrics(run: Run, dynamics: dict) -> dict:
    """The edge-of-stability study's metrics.json: `dynamics` is experiment.dynamics.summary's record (the data,
    the model, the thresholds of the readings, and per run its settings, series and reading)."""
    warnings = run.store.warnings + [w for r in dynamics["runs"] for w in dynamics_warnings(r)]
    return {**run_header(run, "dynamics"), "dynamics": dynamics, "warnings": warnings, "timings": run.store.timings}


def dynamics_warnings(r: dict) -> list[str]:
    """What a reader of one dynamics run must know: a divergence, checks whose λ_max did not converge."""
    name = f"{r['family']} {r['loss']} lr {r['lr']:g}" + (f" batch {r['batch_size']}" if r["family"] == "sgd" else "")
    found = [f"{name}: diverged at step {r['diverged_at']}; its series stop there"] if r["outcome"] == "diverged" else []
    loose = sum(not rec["converged"] for rec in r["records"])
    if loose:
        found.append(f"{name}: lambda_max did not reach --dynamics-tol {r['tol']:g} within {r['max_iter']} products "
                     f"at {loose} of {len(r['records'])} checks; their residuals say how far")
    return found


def model_warnings(m: dict) -> list[str]:
    """What a reader of one model's numbers must know: unconverged solvers, notes of the noise estimate."""
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


def kind_of(metrics: dict) -> str:
    """"run", "sweep" or "dynamics" (metrics written before the field existed are the default run's)."""
    return metrics.get("kind", "run")


# ----------------------------------------------------------------------------- tables and arrays
def model_rows(metrics: dict) -> list[dict]:
    """metrics.csv: one row per model, every scalar a researcher compares across seeds."""
    rows = []
    for m in metrics["models"].values():
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
        if "stationary" in m:
            row["stationary_median_ratio"] = median_eigen_ratio(m["stationary"])
        if "local_entropy" in m:
            row.update({f"local_entropy_gamma_{g:g}": v for g, v in zip(m["local_entropy"]["scopes"],
                                                                      m["local_entropy"]["langevin"])})
        rows.append(row)
    return rows


def run_arrays(metrics: dict) -> dict[str, list]:
    """results.npz of the default run: the raw arrays behind the figures (surface grid, paths, flatness samples,
    spectra, tracking)."""
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
    return arrays


def sweep_arrays(metrics: dict) -> dict[str, list]:
    """results.npz of the sweep: each numeric sweep.csv column as an array (NaN where a row lacks it)."""
    rows = metrics["sweep"]["rows"]
    columns = [k for k in dict.fromkeys(k for row in rows for k in row)
               if all(isinstance(row.get(k, math.nan), (int, float)) for row in rows)]
    return {c: [row.get(c, math.nan) for row in rows] for c in columns}


DYNAMICS_SERIES = ("step", "loss", "lambda_max", "residual", "batch_sharpness", "batch_sharpness_stderr")


def dynamics_rows(metrics: dict) -> list[dict]:
    """dynamics.csv: one row per run, its settings, λ_max at the start, peak and end against 2/η, and its reading."""
    rows = []
    for r in metrics["dynamics"]["runs"]:
        e, first, last = r["reading"], r["records"][0], r["records"][-1]
        rows.append({"loss": r["loss"], "family": r["family"], "lr": r["lr"], "batch_size": r["batch_size"],
                     "steps": r["steps"], "outcome": r["outcome"], "threshold": r["threshold"],
                     "lambda_max_start": first["lambda_max"], "lambda_max_peak": e["sharpening"]["peak"],
                     "lambda_max_end": last["lambda_max"], "sharpening_ratio": e["sharpening"]["ratio"],
                     "sharpened": e["sharpening"]["rose"], "reached_step": e["lambda_max"]["reached"],
                     "onset_step": e["lambda_max"]["onset"],
                     "batch_sharpness_onset_step": (e["batch_sharpness"] or {}).get("onset"),
                     "lambda_max_over_threshold": e["lambda_ratio"], "batch_sharpness_over_threshold": e["batch_ratio"],
                     "batch_sharpness_end": last["batch_sharpness"], "loss_start": first["loss"],
                     "loss_end": last["loss"], "seconds": r["seconds"], "tracking_seconds": r["tracking_seconds"]})
    return rows


def dynamics_arrays(metrics: dict) -> dict[str, list]:
    """results.npz of the study: each run's tracked series and per-step losses, named run<i>_<series>."""
    arrays = {}
    for i, r in enumerate(metrics["dynamics"]["runs"]):
        arrays.update({f"run{i}_{name}": [rec[name] for rec in r["records"]] for name in DYNAMICS_SERIES})
        arrays[f"run{i}_step_losses"] = r["step_losses"]
    return arrays


@dataclass(frozen=True)
class Files:
    """What a kind of run writes beside metrics.json: its table (one row per model) and its arrays."""

    table: str
    rows: Callable[[dict], list[dict]]
    arrays: Callable[[dict], dict[str, list]]


FILES = {"run": Files("metrics.csv", model_rows, run_arrays),
         "sweep": Files("sweep.csv", lambda metrics: metrics["sweep"]["rows"], sweep_arrays),
         "dynamics": Files("dynamics.csv", dynamics_rows, dynamics_arrays)}


# ----------------------------------------------------------------------------- writing
def write_outputs(run: Run, metrics: dict) -> dict:
    """Figures and report (unless --skip-figures), the table, results.npz, then metrics.json (last: a complete
    metrics.json means a complete run). Returns `metrics` with the paths written."""
    out, files = run.out, FILES[kind_of(metrics)]
    begin = time.perf_counter()
    paths = plotting.plot_all(metrics, out) if not run.cfg.skip_figures else []
    metrics["timings"]["plots"] = round(time.perf_counter() - begin, 4)
    paths.append(write_csv_atomic(files.rows(metrics), out / files.table))
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in files.arrays(metrics).items()}
    paths.append(write_atomic(out / "results.npz", lambda f: np.savez_compressed(f, **arrays)))
    paths.append(write_json_atomic(metrics, out / "metrics.json"))
    metrics["written"] = [str(p) for p in paths]
    return metrics


def write_json_atomic(payload: dict, path: Path) -> Path:
    """metrics.json: strict JSON (non-finite numbers become null), written atomically."""
    return write_bytes_atomic(path, json.dumps(json_safe(payload), indent=1).encode())


def json_safe(value):
    """Non-finite floats become null (strict JSON has no Infinity); a note says why where it matters."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_csv_atomic(rows: list[dict], path: Path) -> Path:
    """One row per dict, the columns in order of first appearance; floats as repr (every digit), None empty."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(f):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
                         for row in rows)
        f.write(text.getvalue().encode())

    return write_atomic(path, write)


REQUIRED = {"run": ("models", "connectivity", "surface"), "sweep": ("sweep",), "dynamics": ("dynamics",)}  # what a complete metrics.json holds


def redraw(cfg) -> dict:
    """--plot-only: every figure and the report redrawn from the metrics.json saved in --out (with --sweep, its
    sweep/ folder; with --dynamics, its dynamics/ folder), without training or measuring."""
    out = output_folder(cfg)
    source = out / "metrics.json"
    if not source.exists():
        raise data_module.DataError(f"{source} not found: run without --plot-only first")
    check_folders(cfg, redraw=True)
    try:
        metrics = json.loads(source.read_text())
        for key in REQUIRED[kind_of(metrics)]:
            metrics[key]  # noqa: B018 (a complete run's keys)
    except FileNotFoundError:
        raise data_module.DataError(f"{source} not found: run without --plot-only first") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise data_module.DataError(f"{source} is damaged ({err}): run without --plot-only to recompute it") from None
    metrics["written"] = [str(p) for p in plotting.plot_all(metrics, out)]
    return metrics
