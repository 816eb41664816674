"""Side-by-side benchmark: every measurement against its plain baseline and the field's tools.

Reference workload: the 5,000 real MNIST digits of the offline fallback (4,000 train /
1,000 test), SmallMLP 784-128-128-10 trained 5 epochs with seeds 0 and 42, 2 CPU threads.
Each stage runs our function and its baseline (bench/baselines.py) in alternating order,
`--reps` times; the table gives medians with min-max and the ratio ours / baseline, plus the
error of each against an exact float64 answer. The field's tools (PyHessian, loss-landscapes,
from bench/requirements.txt) run beside them when installed. Finally whole `python main.py` runs
are timed (the median of `--runs`, with the share of each stage) beside this host's GEMM speed in
the same minutes, which tells a slow spell of a shared machine from a slow run.

    make bench                      # or: .venv/bin/python bench/bench.py --reps 5
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import baselines  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from landscape.plumbing import start_vector  # noqa: E402

GOALS = {"top eigenvalue": 0.5, "41x41 surface": 0.2, "noise scale": 0.02, "interpolation": 0.33, "flatness": 0.33,
         "tracking overhead": 0.25}


def alternate(functions: dict, reps: int) -> dict:
    """Run each function `reps` times, rotating the order every round; returns name -> (times, last result)."""
    times = {name: [] for name in functions}
    results = {}
    names = list(functions)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            results[name] = functions[name]()
            times[name].append(time.perf_counter() - start)
    return {name: (times[name], results[name]) for name in names}


def describe(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f})"


def trained_models(ds):
    out = []
    for seed in (0, 42):
        model = models.SmallMLP(generator=torch.Generator().manual_seed(seed))
        training.train(model, ds.x_train, ds.y_train, epochs=5, lr=0.1, momentum=0.9, batch_size=128, seed=seed)
        out.append(model.eval())
    return out


def stage_eigenvalue(model, ds, reps):
    x, y = ds.x_train, ds.y_train
    exact = utils.top_hessian_eigenvalue(copy.deepcopy(model).double(), x.double(), y, tol=1e-12, max_iter=300)
    runs = alternate({
        "baseline": lambda: baselines.top_eigenvalue_pyhessian_rule(model, x, y),
        "ours": lambda: utils.top_hessian_eigenvalue(model, x, y),
    }, reps)
    row = {"stage": "top eigenvalue", "exact": exact.eigenvalue, **_ratio(runs)}
    row["baseline_error"] = abs(runs["baseline"][1][0] - exact.eigenvalue) / exact.eigenvalue
    row["ours_error"] = abs(runs["ours"][1].eigenvalue - exact.eigenvalue) / exact.eigenvalue
    row["note"] = (f"HVPs: baseline {runs['baseline'][1][1]}, ours {runs['ours'][1].iterations}; "
                   f"exact λ_max {exact.eigenvalue:.6f} (float64, residual {exact.residual:.1e})")
    equal = alternate({"power": lambda: baselines.top_eigenvalue_power_to_accuracy(model, x, y, exact.eigenvalue)},
                      max(1, reps // 2))["power"]
    row["note"] += (f"; at our accuracy (≤ 1e-4) power iteration needs {equal[1][1]} HVPs, "
                    f"{statistics.median(equal[0]):.3f} s: ours is "
                    f"{statistics.median(runs['ours'][0]) / statistics.median(equal[0]):.2f}× that")
    row["note"] += "; " + _one_product(model, x, y, reps)
    peer = _time_pyhessian(model, x, y, reps, lambda h: h.eigenvalues()[0][0])
    if peer:
        row["peer"] = f"PyHessian {describe(peer[0])}, rel. error {abs(peer[1] - exact.eigenvalue) / exact.eigenvalue:.1e}"
    return row


def _one_product(model, x, y, reps) -> str:
    """One Hessian-vector product, set-up excluded: ours (the R-operator on its cached pass) against the
    baseline's (autograd's double backward on its kept graph), alternating, 4·reps each. Both do the same GEMMs,
    so the ratio of the eigenvalue row can only come from taking fewer products."""
    op = utils.hessian_operator(model, x, y)
    v = start_vector(op.dim, 0, utils.flat_parameters(model))
    product = baselines.kept_graph_product(model, x, y)
    times = alternate({"baseline": lambda: product(v), "ours": lambda: op(v)}, 4 * reps)
    base, ours = (statistics.median(times[k][0]) for k in ("baseline", "ours"))
    error = float((times["baseline"][1] - times["ours"][1]).norm() / times["baseline"][1].norm())
    return (f"one product (set-up excluded): ours {1e3 * ours:.1f} ms, the baseline's {1e3 * base:.1f} ms "
            f"({ours / base:.2f}×; relative difference {error:.0e})")


def _time_pyhessian(model, x, y, reps, measure):
    """Times of `measure(pyhessian's hessian object)` over reps runs and its last value, or None when PyHessian
    is not installed."""
    try:
        from pyhessian import hessian
    except ImportError:
        return None
    times, value = [], None
    for _ in range(reps):
        m = copy.deepcopy(model)
        m.zero_grad(set_to_none=True)  # PyHessian accumulates into .grad: stale gradients double every result
        start = time.perf_counter()
        value = measure(hessian(m, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False))
        times.append(time.perf_counter() - start)
    return times, value


def stage_trace(model, ds, reps):
    x, y = ds.x_train, ds.y_train
    exact = utils.hessian_trace(copy.deepcopy(model).double(), x.double(), y, method="exact").trace
    runs = alternate({
        "baseline": lambda: baselines.trace_hutchinson_pyhessian_rule(model, x, y),
        "ours": lambda: utils.hessian_trace(model, x, y, method="exact"),
    }, reps)
    hutchpp = alternate({"hutch++": lambda: utils.hessian_trace(model, x, y, rel_stderr=0.02)}, max(1, reps // 2))
    row = {"stage": "Hessian trace", **_ratio(runs)}
    row["baseline_error"] = abs(runs["baseline"][1][0] - exact) / exact
    row["ours_error"] = abs(runs["ours"][1].trace - exact) / exact
    estimate = hutchpp["hutch++"][1]
    row["note"] = (f"4,000 train; exact tr(H) {exact:.4f} (float64 diagonal); ours: the exact diagonal, no products; "
                   f"baseline: {runs['baseline'][1][1]} probes; our Hutch++ at 2% stderr: {estimate.matvecs} "
                   f"products, {statistics.median(hutchpp['hutch++'][0]):.3f} s, error "
                   f"{abs(estimate.trace - exact) / exact:.1e} (stderr {estimate.stderr / exact:.1e})")
    peer = _time_pyhessian(model, x, y, reps, lambda h: float(np.mean(h.trace())))
    if peer:
        row["peer"] = f"PyHessian trace {describe(peer[0])}, rel. error {abs(peer[1] - exact) / exact:.1e}"
    return row


def stage_surface(model, ds, reps, steps=41):
    x, y = ds.x_test, ds.y_test
    g = torch.Generator().manual_seed(0)
    d1, d2 = utils.random_direction(model, g), utils.random_direction(model, g)
    grid = utils.symmetric_grid(steps, 1.0)
    runs = alternate({
        "baseline": lambda: baselines.surface_loop(model, x, y, d1, d2, grid),
        "ours": lambda: utils.loss_surface_2d(model, x, y, steps=steps, directions=(d1, d2), accuracy=False),
    }, reps)  # the loop computes losses only: so does ours here (the run's surface adds accuracies, ~10% more)
    exact = utils.loss_surface_2d(copy.deepcopy(model).double(), x.double(), y, steps=steps,
                                  directions=(d1.double(), d2.double()), ).losses
    row = {"stage": f"{steps}x{steps} surface", **_ratio(runs)}
    row["baseline_error"] = float(np.abs(runs["baseline"][1].numpy() - exact).max())
    row["ours_error"] = float(np.abs(runs["ours"][1].losses - exact).max())
    row["note"] = f"1,000 test; max |ours − loop| {np.abs(runs['ours'][1].losses - runs['baseline'][1].numpy()).max():.1e}"
    peer = _time_loss_landscapes(lambda ll, metric: ll.random_plane(model, metric, distance=1, steps=steps,
                                                                    normalization="filter", deepcopy_model=True),
                                 x, y, reps)
    if peer:
        row["peer"] = f"loss-landscapes random_plane {describe(peer)} (grid shifted, never contains θ)"
    return row


def _time_loss_landscapes(call, x, y, reps):
    """Times of `call(loss_landscapes, metric)` over reps runs, or None when loss-landscapes is not installed."""
    try:
        import loss_landscapes
        import loss_landscapes.metrics
    except ImportError:
        return None
    metric = loss_landscapes.metrics.Loss(torch.nn.CrossEntropyLoss(), x, y)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call(loss_landscapes, metric)
        times.append(time.perf_counter() - start)
    return times


def stage_noise(model, ds, reps):
    x, y = ds.x_train, ds.y_train
    exact = utils.gradient_noise_scale(copy.deepcopy(model).double(), x.double(), y, path="general").b_simple
    runs = alternate({
        "baseline": lambda: baselines.noise_scale_loop(model, x, y),
        "ours": lambda: utils.gradient_noise_scale(model, x, y, b_noise=False),
    }, max(1, reps // 2))
    row = {"stage": "noise scale", **_ratio(runs)}
    row["baseline_error"] = abs(runs["baseline"][1] - exact) / exact
    row["ours_error"] = abs(runs["ours"][1].b_simple - exact) / exact
    row["note"] = f"4,000 train; B_simple {exact:.4f} (float64 exact)"
    return row


def stage_interpolation(model_a, model_b, ds, reps, points=51):
    x, y = ds.x_test, ds.y_test
    alphas = np.linspace(0, 1, points)
    runs = alternate({
        "baseline": lambda: baselines.interpolation_loop(model_a, model_b, x, y, alphas),
        "ours": lambda: utils.linear_interpolation(model_a, model_b, x, y, alphas, refine=0),  # the loop's 51 points
    }, reps)
    exact = utils.linear_interpolation(copy.deepcopy(model_a).double(), copy.deepcopy(model_b).double(),
                                       x.double(), y, alphas).losses
    row = {"stage": "interpolation", **_ratio(runs)}
    row["baseline_error"] = float(np.abs(np.array(runs["baseline"][1]) - exact).max())
    row["ours_error"] = float(np.abs(np.array(runs["ours"][1].losses) - exact).max())
    row["note"] = f"{points} points, 1,000 test (refine=0: the same points as the loop; the default adds ~32 near the peaks)"
    peer = _time_loss_landscapes(lambda ll, metric: ll.linear_interpolation(model_a, model_b, metric, steps=points,
                                                                            deepcopy_model=True), x, y, reps)
    if peer:
        row["peer"] = f"loss-landscapes linear_interpolation {describe(peer)} (never evaluates α = 0)"
    return row


def stage_flatness(model, ds, reps, sigmas=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5), samples=20):
    x, y = ds.x_train, ds.y_train
    runs = alternate({  # both draw their 20 directions (the same ones) inside the timing: equal work
        "baseline": lambda: baselines.flatness_loop(model, x, y, baselines.filter_normalised_directions(model, samples),
                                                    sigmas),
        "ours": lambda: utils.perturbation_flatness(model, x, y, sigmas, samples=samples, seed=0),
    }, reps)
    exact = np.array(utils.perturbation_flatness(copy.deepcopy(model).double(), x.double(), y, sigmas,
                                                 samples=samples, seed=0).mean_increase)
    row = {"stage": "flatness", **_ratio(runs)}
    row["baseline_error"] = float(np.abs(runs["baseline"][1].numpy() - exact).max())
    row["ours_error"] = float(np.abs(np.array(runs["ours"][1].mean_increase) - exact).max())
    row["note"] = f"{len(sigmas)} σ × {samples} directions, 4,000 train"
    return row


def stage_tracking(ds, reps):
    """Overhead of tracking sharpness during training at the default settings: tracked / untracked training."""
    import main

    scratch = tempfile.mkdtemp()
    cfg = main.Config(runs_dir=scratch, fresh=True)
    base = main.Config(runs_dir=scratch, fresh=True, track_every=-1)
    timings = {"untracked": [], "tracked": []}
    checks = 0
    for _ in range(reps):
        for name, c in (("untracked", base), ("tracked", cfg)):
            settings = main.Training.of(c, seed=0)
            model = main.build_model(settings)
            start = time.perf_counter()  # the training stage itself, no store around it
            history = main.train_model(settings, model, train=(ds.x_train, ds.y_train))
            timings[name].append(time.perf_counter() - start)
            checks = len(history["tracking"]["records"]) if name == "tracked" else checks
    ratio = statistics.median(timings["tracked"]) / statistics.median(timings["untracked"]) - 1
    return {"stage": "tracking overhead", "baseline_time": describe(timings["untracked"]),
            "ours_time": describe(timings["tracked"]), "ratio": ratio, "baseline_error": 0.0, "ours_error": 0.0,
            "note": f"training seed 0 with and without tracking ({checks} checks on {cfg.track_examples} examples); "
                    "ratio = extra time / training time"}


class GeneralPath(torch.nn.Module):
    """The same function as `inner`, but no plain Sequential: every measurement takes its general path."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def fast_path_hessian(model, ds, reps):
    """The R-operator (MLPHessian) against autograd's double backward on a kept graph (AutogradHessian), on one
    model's Hessian work in the default run: the spectrum (2 SLQ runs of 40 steps, top-5, λ_min), λ_max and the
    per-layer curvature (whose restricted products the R-operator runs without the first layer's GEMMs where a
    block has none, and whose traces come from its exact diagonal)."""
    x, y = ds.x_train, ds.y_train

    def work(m):
        spectrum = utils.hessian_spectrum(m, x, y, k=5, tol=1e-3, lanczos_steps=40, runs=2, seed=0)
        utils.top_hessian_eigenvalue(m, x, y)
        utils.layer_curvature(m, x, y, seed=0, tol=1e-2, rel_stderr=0.1, max_probes=64)
        return spectrum.top.eigenvalues[0]

    runs = alternate({"baseline": lambda: work(GeneralPath(model)), "ours": lambda: work(model)}, reps)
    difference = abs(runs["ours"][1] - runs["baseline"][1]) / runs["baseline"][1]
    return {"stage": "fast path: Hessian products", **_ratio(runs), "baseline_error": 0.0, "ours_error": difference,
            "note": "spectrum, λ_max and per-layer curvature of one model, 4,000 train; baseline: the general path "
                    "(AutogradHessian); our error: relative difference of λ_max from it; 20 products alone: "
                    + _twenty_products(model, x, y, reps)}


def _twenty_products(model, x, y, reps, products=20) -> str:
    vs = torch.randn(products, utils.flat_parameters(model).numel(), generator=torch.Generator().manual_seed(0))

    def products_on(path):
        op = utils.hessian_operator(model, x, y, path=path)
        return torch.cat([op.matmat(vs[i : i + 4]) for i in range(0, products, 4)])

    runs = alternate({"baseline": lambda: products_on("general"), "ours": lambda: products_on("fast")}, reps)
    return f"{statistics.median(runs['ours'][0]):.3f} s against {statistics.median(runs['baseline'][0]):.3f} s"


def fast_path_points(model, ds, reps, sigmas=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5), samples=20):
    """MLPPoints against one functional forward per point (FunctionalPoints), on flatness's 121 points."""
    x, y = ds.x_train, ds.y_train
    theta = utils.flat_parameters(model)
    directions = utils.random_directions(model, torch.Generator().manual_seed(0), samples)
    coefficients = torch.zeros(1 + samples * len(sigmas), samples, dtype=torch.float64)
    for k in range(samples):
        coefficients[1 + k * len(sigmas) : 1 + (k + 1) * len(sigmas), k] = torch.tensor(sigmas, dtype=torch.float64)
    runs = alternate({path_name: (lambda path=path: utils.losses_at_points(model, x, y, theta, directions, coefficients,
                                                                           path=path, accuracy=False).losses)
                      for path_name, path in (("baseline", "general"), ("ours", "fast"))}, reps)
    difference = float((runs["ours"][1] - runs["baseline"][1]).abs().max())
    return {"stage": "fast path: parameter points", **_ratio(runs), "baseline_error": 0.0, "ours_error": difference,
            "note": f"{coefficients.shape[0]} points (flatness: {len(sigmas)} σ × {samples} directions), 4,000 train; "
                    "baseline: the general path (FunctionalPoints); our error: max loss difference from it"}


def fast_path_per_example(model, ds, reps):
    """MLPPerExample's closed forms against vmap(grad) (AutogradPerExample): B_simple on the training digits."""
    x, y = ds.x_train, ds.y_train
    runs = alternate({name: (lambda path=path: utils.gradient_noise_scale(model, x, y, b_noise=False, path=path))
                      for name, path in (("baseline", "general"), ("ours", "fast"))}, reps)
    difference = abs(runs["ours"][1].b_simple - runs["baseline"][1].b_simple) / runs["baseline"][1].b_simple
    return {"stage": "fast path: per-example gradients", **_ratio(runs), "baseline_error": 0.0,
            "ours_error": difference, "note": "B_simple, 4,000 train; baseline: the general path (vmap(grad)); "
                                              "our error: relative difference of B_simple from it"}


def _ratio(runs) -> dict:
    base, ours = runs["baseline"][0], runs["ours"][0]
    return {"baseline_time": describe(base), "ours_time": describe(ours),
            "ratio": statistics.median(ours) / statistics.median(base)}


def whole_run() -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "main.py"), "--quiet", "--offline", "--out", out, "--runs-dir",
                        str(Path(out) / "runs")], check=True, cwd=ROOT)  # a fresh run folder: nothing resumed
        wall = time.perf_counter() - start
        timings = json.loads((Path(out) / "metrics.json").read_text())["timings"]
    return {"wall": wall, "timings": timings}


def whole_runs(count: int) -> dict:
    """`count` whole runs: the median wall time with min-max, and the stage times of the median run."""
    runs = sorted((whole_run() for _ in range(count)), key=lambda r: r["wall"])
    return {**runs[len(runs) // 2], "walls": [r["wall"] for r in runs]}


def host_gemm_rate(reps: int = 10, size: int = 2000) -> float:
    """This host's speed now, as G multiply-adds per second of a size³ float32 GEMM (median of `reps`): the
    whole run's seconds are absolute and move with a shared machine's other tenants (it has read 97-150)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return size ** 3 / statistics.median(times) / 1e9


def render(rows, run, meta) -> str:
    lines = [f"# Benchmark results ({meta['date']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads. "
             "Medians over alternating repetitions (min-max); ratio = ours / baseline; "
             "errors are against an exact float64 computation (relative for the eigenvalue and the noise scale, "
             "max absolute loss difference otherwise).", "",
             "| stage | baseline | ours | ratio | goal | baseline error | our error | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = GOALS.get(r["stage"])
        met = "" if goal is None else (f"≤ {goal} {'✓' if r['ratio'] <= goal else '✗'}")
        notes = r["note"] + (f"; {r['peer']}" if r.get("peer") else "")
        lines.append(f"| {r['stage']} | {r['baseline_time']} | {r['ours_time']} | {r['ratio']:.3f} | {met} | "
                     f"{r['baseline_error']:.1e} | {r['ours_error']:.1e} | {notes} |")
    if run:
        total = sum(v for k, v in run["timings"].items())
        shares = ", ".join(f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in run["timings"].items())
        walls = run["walls"]
        lines += ["", f"Whole `python main.py` (defaults, offline data cached): {run['wall']:.1f} s wall, the median "
                      f"of {len(walls)} runs ({min(walls):.1f}-{max(walls):.1f} s; goal ≤ 20 s). This host ran a "
                      f"2000×2000×2000 float32 GEMM at {run['gemm']:.0f} G multiply-adds/s in the same minutes "
                      f"(it has read 97-150 here). Stages of the median run: {shares}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions per stage")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="skip timing whole main.py runs")
    parser.add_argument("--runs", type=int, default=3, help="whole main.py runs to time (the median is reported)")
    parser.add_argument("--write", type=Path, default=ROOT / "bench" / "RESULTS.md", help="where to write the table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = data.load_dataset("mnist", download=False)
    model_a, model_b = trained_models(ds)
    rows = []
    stages = (lambda: stage_eigenvalue(model_a, ds, args.reps),
              lambda: stage_trace(model_a, ds, args.reps),
              lambda: stage_surface(model_a, ds, args.reps),
              lambda: stage_noise(model_a, ds, args.reps),
              lambda: stage_interpolation(model_a, model_b, ds, args.reps),
              lambda: stage_flatness(model_a, ds, args.reps),
              lambda: stage_tracking(ds, 3 * args.reps),  # a 0.2 s training: more repetitions for a stable median
              lambda: fast_path_hessian(model_a, ds, max(2, args.reps // 2)),
              lambda: fast_path_points(model_a, ds, max(2, args.reps // 2)),
              lambda: fast_path_per_example(model_a, ds, max(2, args.reps // 2)))
    with utils.numpy_blas_single_threaded():  # as main.run: numpy's spinning BLAS threads slow torch down
        for stage in stages:
            rows.append(stage())
            print(f"{rows[-1]['stage']}: ratio {rows[-1]['ratio']:.3f}", flush=True)
    run = None
    if not args.no_run:
        run = {**whole_runs(max(1, args.runs)), "gemm": host_gemm_rate()}
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": args.threads}
    text = render(rows, run, meta)
    print(text)
    args.write.write_text(with_table(args.write.read_text() if args.write.exists() else "", text))
    return 0


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def with_table(document: str, table: str) -> str:
    """`document` with the text between the bench markers replaced by `table` (the hand-written notes around
    them kept); the table alone, between markers, when there are none."""
    if START in document and END in document:
        before, rest = document.split(START, 1)
        return f"{before}{START}\n{table}{END}{rest.split(END, 1)[1]}"
    return f"{START}\n{table}{END}\n"


if __name__ == "__main__":
    sys.exit(main())
