"""Side-by-side benchmark: every measurement against its plain baseline and the field's tools.

Reference workload: the 5,000 real MNIST digits of the offline fallback (4,000 train /
1,000 test), SmallMLP 784-128-128-10 trained 5 epochs with seeds 0 and 42, 2 CPU threads.
Each stage runs our function and its baseline (bench/baselines.py) in alternating order,
`--reps` times; the table gives medians with min-max and the ratio ours / baseline, plus the
error of each against an exact float64 answer. The field's tools (PyHessian, hessian-eigenthings,
loss-landscapes, from bench/requirements.txt) run beside them when installed; one that cannot run
says why in its row's notes. Finally whole `python main.py` runs are timed (the median of `--runs`,
with the share of each stage) beside this host's GEMM speed in the same minutes, which tells a slow
spell of a shared machine from a slow run. Then real architectures (bench/architectures.py: ResNet-18 and a
small transformer language model, every measure beside the peers that have it, each run in its own process for
its peak memory) fill their own section of RESULTS.md. `--only` runs some stages and writes nothing unless
`--write` is given.

    make bench                      # or: .venv/bin/python bench/bench.py --reps 5
    .venv/bin/python bench/bench.py --only eigenvalue,trace --reps 3     # prints the two rows, writes nothing
    .venv/bin/python bench/bench.py --only architectures --write         # reruns the architectures section alone
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

import architectures  # noqa: E402
import baselines  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import training  # noqa: E402
import utils  # noqa: E402
from landscape.plumbing import start_vector  # noqa: E402

# the tracker's goal is a share of the whole run (issue 28), given below the table, not a ratio to training
GOALS = {"top eigenvalue": 0.5, "41x41 surface": 0.2, "noise scale": 0.02, "interpolation": 0.33, "flatness": 0.33}


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
    functions = {
        "baseline": lambda: baselines.top_eigenvalue_pyhessian_rule(model, x, y),
        "ours": lambda: utils.top_hessian_eigenvalue(model, x, y),
    }
    peer_top = _eigenthings_top(model, x, y)
    if not isinstance(peer_top, str):
        functions[EIGENTHINGS] = peer_top[0]
    runs = alternate(functions, reps)
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
    peers = [f"PyHessian {describe(peer[0])}, rel. error {abs(peer[1] - exact.eigenvalue) / exact.eigenvalue:.1e}"
             if peer else None, _eigenthings_top_note(peer_top, runs, model, x, y, exact.eigenvalue, reps)]
    row["peer"] = "; ".join(p for p in peers if p)
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
    peers = [f"PyHessian trace {describe(peer[0])}, rel. error {abs(peer[1] - exact) / exact:.1e}" if peer else None,
             _eigenthings_trace_note(model, x, y, exact, estimate.matvecs, reps)]
    row["peer"] = "; ".join(p for p in peers if p)
    return row


EIGENTHINGS = "hessian-eigenthings"


def _eigenthings():
    """The hessian_eigenthings module, or a one-line reason it cannot be used beside this torch."""
    try:
        import hessian_eigenthings
    except ModuleNotFoundError as error:
        if error.name == "hessian_eigenthings":
            return f"{EIGENTHINGS} not installed (bench/requirements.txt)"
        return f"{EIGENTHINGS} not usable beside torch {torch.__version__}: {_one_line(error)}"
    except Exception as error:  # built against another torch
        return f"{EIGENTHINGS} not usable beside torch {torch.__version__}: {_one_line(error)}"
    return hessian_eigenthings


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def _eigenthings_operator(he, model, x, y):
    """Its HessianOperator of the mean cross-entropy on (x, y) as one batch, by its default autograd method: each
    product a fresh forward pass and double backward (its DDPHessianOperator adds all-reduces, a no-op here)."""
    return he.HessianOperator(model, [(x, y)], he.supervised_loss(torch.nn.functional.cross_entropy))


def _eigenthings_top(model, x, y, tol=1e-4):
    """hessian-eigenthings' λ_max by its Lanczos (k=1, largest algebraic, seed 0), which has no stopping rule: it
    runs max_iter steps (default 2k) and flags convergence by |β_m·s_m| < tol·|λ|. Here at the fewest steps that flag
    accepts at our tol (found untimed by rerunning with 2, 3, … steps): (call, steps, module), or a one-line reason."""
    he = _eigenthings()
    if isinstance(he, str):
        return he
    try:
        steps = next(m for m in range(2, 51) if bool(he.lanczos(_eigenthings_operator(he, model, x, y), k=1, max_iter=m,
                                                                tol=tol, which="LA", seed=0).converged[0]))
    except StopIteration:
        return f"{EIGENTHINGS}: its Lanczos flagged no convergence within 50 steps"
    except Exception as error:
        return f"{EIGENTHINGS} failed beside torch {torch.__version__}: {_one_line(error)}"
    call = lambda: he.lanczos(_eigenthings_operator(he, model, x, y), k=1, max_iter=steps, tol=tol,  # noqa: E731
                              which="LA", seed=0)
    return call, steps, he


def _eigenthings_top_note(top, runs, model, x, y, exact: float, reps) -> str:
    """The eigenvalue row's words on hessian-eigenthings: its certified Lanczos (timed beside ours), its Lanczos at
    its default 2 steps, and its power iteration at its defaults (stopped on change and residual below 1e-4)."""
    if isinstance(top, str):
        return top
    _, steps, he = top
    times, result = runs[EIGENTHINGS]
    try:
        default = he.lanczos(_eigenthings_operator(he, model, x, y), k=1, seed=0)
        power = alternate({"power": lambda: he.power_iteration_one(_eigenthings_operator(he, model, x, y), seed=0)},
                          max(1, reps // 2))["power"]
    except Exception as error:
        return f"{EIGENTHINGS} failed beside torch {torch.__version__}: {_one_line(error)}"
    value, _, _, power_hvps, converged = power[1]
    return (f"{EIGENTHINGS} {he.__version__} Lanczos at {steps} steps, the fewest its own flag accepts at tol 1e-4 "
            f"({result.iterations} HVPs): {describe(times)}, rel. error "
            f"{abs(float(result.eigenvalues[0]) - exact) / exact:.1e}; at its default {default.iterations} steps rel. "
            f"error {abs(float(default.eigenvalues[0]) - exact) / exact:.1e}; its power iteration at its defaults: "
            f"{power_hvps} HVPs{'' if converged else ' (unconverged)'}, {statistics.median(power[0]):.3f} s, rel. error "
            f"{abs(value - exact) / exact:.1e}")


def _eigenthings_trace_note(model, x, y, exact: float, budget: int, reps) -> str:
    """hessian-eigenthings' Hutch++, which spends a fixed number of products (no stopping rule), at our Hutch++'s
    budget and at its default 100, timed alternately; or a one-line reason it cannot run."""
    he = _eigenthings()
    if isinstance(he, str):
        return he
    try:
        runs = alternate({"our budget": lambda: he.trace(_eigenthings_operator(he, model, x, y), num_matvecs=budget,
                                                         seed=0),
                          "its default 100": lambda: he.trace(_eigenthings_operator(he, model, x, y), seed=0)},
                         max(1, reps // 2))
    except Exception as error:
        return f"{EIGENTHINGS} failed beside torch {torch.__version__}: {_one_line(error)}"
    # its budget goes in three equal thirds (sketch, its projected trace, residual probes): 3 × the residual samples
    parts = [f"at {name}: {3 * result.samples.numel()} products, {describe(times)}, error "
             f"{abs(result.estimate - exact) / exact:.1e} (stderr {result.stderr / exact:.1e})"
             for name, (times, result) in runs.items()]
    return f"{EIGENTHINGS} {he.__version__} Hutch++ " + ", ".join(parts)


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
    from experiment.settings import TrainingSettings
    from experiment.stages import Split, build_model, train_model

    scratch = tempfile.mkdtemp()
    cfg = main.Config(runs_dir=scratch, fresh=True)
    base = main.Config(runs_dir=scratch, fresh=True, track_every=-1)
    timings = {"untracked": [], "tracked": []}
    checks = 0
    for _ in range(reps):
        for name, c in (("untracked", base), ("tracked", cfg)):
            settings = TrainingSettings.of(c, seed=0)
            model = build_model(settings)
            start = time.perf_counter()  # the training stage itself, no store around it
            history = train_model(settings, model, train=Split(ds.x_train, ds.y_train))
            timings[name].append(time.perf_counter() - start)
            checks = len(history["tracking"]["records"]) if name == "tracked" else checks
    ratio = statistics.median(timings["tracked"]) / statistics.median(timings["untracked"]) - 1
    return {"stage": "tracking overhead", "baseline_time": describe(timings["untracked"]),
            "ours_time": describe(timings["tracked"]), "ratio": ratio, "baseline_error": 0.0, "ours_error": 0.0,
            "note": f"training seed 0 with and without tracking ({checks} checks, λ_max on {cfg.track_examples} "
                    "examples); ratio = extra time / training time; the whole run's share is below the table"}


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
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    tracker = sum(m["training"]["tracking"]["seconds"] for m in metrics["models"].values())
    return {"wall": wall, "timings": metrics["timings"], "tracker": tracker}


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
                      f"(it has read 97-150 here). The training-time tracker took {run['tracker']:.1f} s of it "
                      f"({100 * run['tracker'] / run['wall']:.1f}% of the wall time; goal ≤ 10%). "
                      f"Stages of the median run: {shares}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions per stage")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="skip timing whole main.py runs")
    parser.add_argument("--runs", type=int, default=3, help="whole main.py runs to time (the median is reported)")
    parser.add_argument("--only", type=lambda s: s.split(","), metavar="NAME,...",
                        help=f"run only these stages ({', '.join(STAGES)}; 'run': the whole main.py runs; "
                             "'architectures': ResNet-18 and a transformer beside the peers, bench/architectures.py); "
                             "the partial table is printed, and written only with an explicit --write")
    parser.add_argument("--write", type=Path, nargs="?", const=RESULTS, default=None,
                        help=f"where to write the table (default {RESULTS.relative_to(ROOT)}, unless --only is given)")
    args = parser.parse_args(argv)
    chosen = list(STAGES) + ["run", "architectures"] if args.only is None else args.only
    unknown = sorted(set(chosen) - set(STAGES) - {"run", "architectures"})
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}, run, architectures")
    torch.set_num_threads(args.threads)
    rows = []
    with utils.numpy_blas_single_threaded():  # as main.main: numpy's spinning BLAS threads slow torch down
        if set(chosen) & set(STAGES):
            ds = data.load_dataset("mnist", download=False)
            model_a, model_b = trained_models(ds)
        for name, stage in STAGES.items():
            if name in chosen:
                rows.append(stage(model_a, model_b, ds, args.reps))
                print(f"{rows[-1]['stage']}: ratio {rows[-1]['ratio']:.3f}", flush=True)
    run = None
    if "run" in chosen and not args.no_run:
        run = {**whole_runs(max(1, args.runs)), "gemm": host_gemm_rate()}
    real = None
    if "architectures" in chosen:  # one thread per child process: two spun 7-10x slower beside other tenants
        real = architectures.section(min(args.reps, 2), 1, host_gemm_rate)
        print(real)
        torch.set_num_threads(args.threads)
    meta = {"date": dt.date.today().isoformat(), "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
            "torch": torch.__version__, "threads": args.threads}
    text = render(rows, run, meta) if rows or run else None
    if text:
        print(text)
    write = args.write or (RESULTS if args.only is None else None)
    if write is None:
        print(f"--only: the partial results above are not written; --write writes them into {RESULTS.relative_to(ROOT)}")
    else:
        document = write.read_text() if write.exists() else ""
        document = with_table(document, text) if text else document
        write.write_text(with_architectures(document, real) if real else document)
    return 0


RESULTS = ROOT / "bench" / "RESULTS.md"
STAGES = {  # name for --only -> stage(model_a, model_b, ds, reps), in the table's order
    "eigenvalue": lambda a, b, ds, reps: stage_eigenvalue(a, ds, reps),
    "trace": lambda a, b, ds, reps: stage_trace(a, ds, reps),
    "surface": lambda a, b, ds, reps: stage_surface(a, ds, reps),
    "noise": lambda a, b, ds, reps: stage_noise(a, ds, reps),
    "interpolation": lambda a, b, ds, reps: stage_interpolation(a, b, ds, reps),
    "flatness": lambda a, b, ds, reps: stage_flatness(a, ds, reps),
    "tracking": lambda a, b, ds, reps: stage_tracking(ds, 3 * reps),  # a 0.2 s training: more repetitions
    "fast-hessian": lambda a, b, ds, reps: fast_path_hessian(a, ds, max(2, reps // 2)),
    "fast-points": lambda a, b, ds, reps: fast_path_points(a, ds, max(2, reps // 2)),
    "fast-per-example": lambda a, b, ds, reps: fast_path_per_example(a, ds, max(2, reps // 2)),
}


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def with_table(document: str, table: str) -> str:
    """`document` with the text between the bench markers replaced by `table` (the hand-written notes around
    them kept); the table alone, between markers, when there are none."""
    if START in document and END in document:
        before, rest = document.split(START, 1)
        return f"{before}{START}\n{table}{END}{rest.split(END, 1)[1]}"
    return f"{START}\n{table}{END}\n"


ARCH_START, ARCH_END = "<!-- architectures:start -->", "<!-- architectures:end -->"
ARCH_HEADING = "## Real architectures (issue 26)"


def with_architectures(document: str, section: str) -> str:
    """`document` with the text between the architectures markers replaced by `section`; the heading and markers
    appended when there are none. The notes after the end marker are kept."""
    if ARCH_START in document and ARCH_END in document:
        before, rest = document.split(ARCH_START, 1)
        return f"{before}{ARCH_START}\n{section}{ARCH_END}{rest.split(ARCH_END, 1)[1]}"
    return f"{document.rstrip()}\n\n{ARCH_HEADING}\n\n{ARCH_START}\n{section}{ARCH_END}\n"


if __name__ == "__main__":
    sys.exit(main())
