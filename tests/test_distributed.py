"""Measurements across processes (landscape.distributed), on two gloo processes on this machine.

The facts checked: with the N examples split into slices, L = Σ_r (n_r/N)·L_r, so a `DataShard` measurement
(every product, gradient and loss all-reduced) equals the single-process measurement on all N examples up to
the rounding of the sums; a `PointShare` measurement (points spread, data whole) equals it exactly; every rank
returns the same numbers. The single-process values are computed in this process, the shared ones by two
processes started with torch.multiprocessing (as torchrun would start them), on float64 tiny models.
"""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import utils
from helpers import ROOT, Wrapped, tiny_data, tiny_mlp

WORLD = 2
N = 13  # odd: the slices differ in size (7 and 6), so the weights n_r/N matter
SIGMAS = (0.1, 0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases():
    """(name, model, x, y): a Tanh MLP on both paths (φ'' ≠ 0: every second-order term) and a ReLU MLP (whose
    trace is the exact diagonal)."""
    x, y = tiny_data(0, n=N)
    tanh = tiny_mlp(0)
    relu = tiny_mlp(1, activation=nn.ReLU)
    return [("tanh-fast", tanh, x, y), ("tanh-general", Wrapped(tanh), x, y), ("relu-fast", relu, x, y)]


def measure(model, x, y, shard=None, points=None) -> dict:
    """Every measurement that can be spread over processes; `shard` spreads the data, `points` the points."""
    flat_shard = points if points is not None else shard
    top = utils.top_hessian_eigenvalue(model, x, y, tol=1e-10, max_iter=60, seed=3, shard=shard)
    spectrum = utils.hessian_spectrum(model, x, y, k=3, tol=1e-8, lanczos_steps=12, runs=2, seed=4, shard=shard)
    trace = utils.hessian_trace(model, x, y, method="hutch++", rel_stderr=0.05, max_matvecs=60, seed=5, shard=shard)
    auto = utils.hessian_trace(model, x, y, method="auto", seed=5, shard=shard)
    layers = utils.layer_curvature(model, x, y, seed=6, tol=1e-8, shard=shard)
    flat = utils.perturbation_flatness(model, x, y, SIGMAS, samples=4, seed=7, shard=flat_shard)
    surface = utils.loss_surface_2d(model, x, y, steps=5, span=0.5, seed=8, shard=flat_shard)
    return {"lambda_max": top.eigenvalue, "lambda_iterations": top.iterations, "top": spectrum.top.eigenvalues,
            "lambda_min": spectrum.bottom.eigenvalues[0], "density": spectrum.density.density.tolist(),
            "trace": trace.trace, "trace_probes": trace.matvecs, "trace_auto": auto.trace, "trace_method": auto.method,
            "layer_top": [layer.top_eigenvalue for layer in layers], "layer_trace": [layer.trace for layer in layers],
            "flatness": flat.increases.tolist(), "surface": surface.losses.tolist(),
            "surface_accuracy": surface.accuracies.tolist()}


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, model, x, y in cases():
            part = utils.shard_rows(x.shape[0], rank, WORLD)
            shard = utils.DataShard.of(part.stop - part.start)
            results[name] = {"data": measure(model, x[part], y[part], shard=shard),
                             "points": measure(model, x, y, points=utils.PointShare())}
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """Both ranks' results, computed once in two processes."""
    out = tmp_path_factory.mktemp("spread")
    init = f"file://{out / 'rendezvous'}"
    mp.start_processes(_worker, args=(init, str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def alone():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        return {name: measure(model, x, y) for name, model, x, y in cases()}
    finally:
        torch.set_num_threads(threads)


def test_shard_rows_cover_every_example_once_in_order():
    for n in range(1, 40):
        for world in range(1, 6):
            parts = [utils.shard_rows(n, r, world) for r in range(world)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            sizes = [p.stop - p.start for p in parts]
            assert max(sizes) - min(sizes) <= 1


def test_every_rank_returns_the_same_numbers(spread):
    assert spread[0] == spread[1]


@pytest.mark.parametrize("name", ["tanh-fast", "tanh-general", "relu-fast"])
def test_sharded_data_equals_one_process_on_all_examples(spread, alone, name):
    """Lanczos, Hutch++, the exact diagonal and unit-vector traces, SLQ, per-layer blocks, flatness and the surface
    over two slices equal the single-process values on all 13 examples to float64 rounding of the all-reduced sums; the
    iteration and probe counts are equal, since every decision sees the same numbers."""
    got, want = spread[0][name]["data"], alone[name]
    assert got["lambda_iterations"] == want["lambda_iterations"] and got["trace_probes"] == want["trace_probes"]
    # "auto": the exact diagonal for the ReLU MLP, the D unit vectors (D ≤ max_matvecs) for the Tanh ones
    assert got["trace_method"] == want["trace_method"] == "exact"
    for key in ("lambda_max", "lambda_min", "trace", "trace_auto"):
        assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), key
    for key in ("top", "layer_top", "layer_trace", "density", "flatness", "surface", "surface_accuracy"):
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["tanh-fast", "tanh-general", "relu-fast"])
def test_points_spread_over_ranks_equal_one_process_exactly(spread, alone, name):
    """Each point is computed whole by one rank: the gathered flatness and surface are the very numbers."""
    got, want = spread[0][name]["points"], alone[name]
    for key in ("flatness", "surface", "surface_accuracy"):
        assert got[key] == want[key], key


def test_sharded_hessian_is_the_weighted_sum_of_the_slices_hessians():
    """H·v over all examples = Σ_r (n_r/N)·H_r·v, the identity the sharded operator all-reduces, checked here
    without processes on the dense Hessians of the slices."""
    model = tiny_mlp(2)
    x, y = tiny_data(2, n=N)
    whole = utils.exact_hessian(model, x, y)
    parts = [utils.shard_rows(N, r, 3) for r in range(3)]
    summed = sum((p.stop - p.start) / N * utils.exact_hessian(model, x[p], y[p]) for p in parts)
    torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-13)
    assert not math.isclose(float(utils.exact_hessian(model, x[parts[0]], y[parts[0]]).norm()), float(whole.norm()))


# ----------------------------------------------------------------------------- main.py under torchrun
# Two processes of one thread each against one process of one thread: the stage keys hold the thread count,
# so with it equal every stage a rank computes alone is the very computation of the single process.

QUICK_SWEEP = ["--sweep", "--quick", "--offline", "--quiet", "--threads", "1", "--skip-figures", "--device", "cpu"]
QUICK_RUN = ["--quick", "--offline", "--quiet", "--threads", "1", "--skip-figures", "--device", "cpu"]


def python_main(args: list[str], folder, *, processes: int = 1) -> dict:
    """main.py in a fresh process (under torchrun with `processes` > 1), writing into `folder`; its metrics."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), str(ROOT / "main.py"), *args,
               "--out", str(folder / "out"), "--runs-dir", str(folder / "runs")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = "--sweep" in args
    return json.loads((folder / "out" / ("sweep" if sweep else "") / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process_sweep(tmp_path_factory):
    return python_main(QUICK_SWEEP, tmp_path_factory.mktemp("sweep1"))


@pytest.mark.slow
def test_two_processes_run_the_quick_sweep_exactly_as_one(one_process_sweep, tmp_path):
    """Ranks split the models, then the pairs, into the shared store; rank 0 reads them all back and computes
    the statistics: every row, exclusion and statistic equals the single process's."""
    two = python_main(QUICK_SWEEP, tmp_path, processes=2)
    assert two["environment"]["processes"] == 2 and one_process_sweep["environment"]["processes"] == 1
    assert min(two["environment"]["stages_per_process"]) > 0  # both ranks did part of the work
    assert two["sweep"]["rows"] == one_process_sweep["sweep"]["rows"] and len(two["sweep"]["rows"]) >= 4
    for key in ("excluded", "pairs", "findings", "keskar", "temperature_test", "noise"):
        assert two["sweep"][key] == one_process_sweep["sweep"][key], key
    assert two["resumed"] == []  # what the other rank computed in this run is not "resumed"


def _dying_rank(rank: int, port: int, argv: list[str], models_before_dying: int) -> None:
    """A torchrun-like rank whose rank 1 is killed (os._exit) when it starts its third model."""
    import main
    from experiment import sweep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    started = []
    real = sweep.train_and_measure

    def train_and_measure(*args, **kwargs):
        started.append(args[1:])
        if rank == 1 and len(started) > models_before_dying:
            os._exit(9)
        return real(*args, **kwargs)

    sweep.train_and_measure = train_and_measure
    main.main(argv)


@pytest.mark.slow
def test_a_killed_rank_keeps_its_finished_models_and_a_rerun_resumes(one_process_sweep, tmp_path):
    """Rank 1 dies at its third model; the models both ranks finished stay in the store, and the same sweep
    rerun (here by one process) loads them, computes the rest and gives the single process's rows."""
    argv = [*QUICK_SWEEP, "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    with pytest.raises(mp.ProcessExitedException):
        mp.start_processes(_dying_rank, args=(free_port(), argv, 2), nprocs=WORLD, join=True, start_method="spawn")
    assert not (tmp_path / "out" / "sweep" / "metrics.json").exists()
    kept = sorted(p.parent.name for p in (tmp_path / "runs").glob("*/model.pt"))
    assert len(kept) >= 2  # rank 1's two finished models at least
    rerun = python_main(QUICK_SWEEP, tmp_path)
    resumed_training = [label for label in rerun["resumed"] if label.startswith("train[")]
    assert len(resumed_training) >= 2
    sweep = one_process_sweep["sweep"]
    units = [f"train[b={p['batch_size']} lr={p['lr']} w={p['width']} seed={seed}]" for p in sweep["grid"]
             for seed in sweep["seeds"]]
    assert set(units[1::WORLD][:2]) <= set(rerun["resumed"])  # rank 1's share is units[1::2]
    assert rerun["sweep"]["rows"] == one_process_sweep["sweep"]["rows"]


def numbers(value):
    """`value` without the wall times it records (which no two runs share)."""
    if isinstance(value, dict):
        return {k: numbers(v) for k, v in value.items() if k not in ("seconds", "overhead")}
    if isinstance(value, list):
        return [numbers(v) for v in value]
    return value


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    return python_main(QUICK_RUN, tmp_path_factory.mktemp("run1"))


@pytest.mark.slow
def test_two_processes_split_the_default_run_exactly_as_one(one_process_run, tmp_path):
    """Without --shard-data the ranks split the seeds, then the pair's and the first model's stages: every
    number equals the single process's; rerun, it loads every stage; rerun with --fresh, it loads none of the
    earlier files (each stage computed once, by one rank) and gives the same numbers again."""
    two = python_main(QUICK_RUN, tmp_path, processes=2)
    assert min(two["environment"]["stages_per_process"]) > 0 and two["resumed"] == []
    for key in ("models", "connectivity", "reparametrisation", "surface"):
        assert numbers(two[key]) == numbers(one_process_run[key]), key
    again = python_main(QUICK_RUN, tmp_path, processes=2)
    assert sorted(again["resumed"]) == sorted(again["timings"].keys() - {"load_data", "plots"})
    fresh = python_main([*QUICK_RUN, "--fresh"], tmp_path, processes=2)
    assert fresh["resumed"] == [] and sum(fresh["environment"]["stages_per_process"]) == len(again["resumed"])
    for key in ("models", "connectivity", "reparametrisation", "surface"):
        assert numbers(fresh[key]) == numbers(one_process_run[key]), key


@pytest.mark.slow
def test_sharded_data_default_run_equals_one_process(one_process_run, tmp_path):
    """With --shard-data each rank holds half the examples: the sharded stages (λ_max, the spectrum, the trace,
    the per-layer blocks, flatness, the surface) equal the single process's to float32 rounding of the
    all-reduced sums, and every other stage, computed by rank 0 on all the data, is the very same number."""
    two = python_main([*QUICK_RUN, "--shard-data"], tmp_path, processes=2)
    for seed, got in two["models"].items():
        want = one_process_run["models"][seed]
        assert numbers(got["training"]) == numbers(want["training"]) and got["train"] == want["train"]
        for key in ("worst_case", "pac_bayes", "gradient_noise", "test", "generalization_gap"):
            assert got[key] == want[key], key
        assert got["sharpness"]["eigenvalue"] == pytest.approx(want["sharpness"]["eigenvalue"], rel=1e-5)
        assert got["sharpness"]["iterations"] == want["sharpness"]["iterations"]
        np.testing.assert_allclose(got["eigenpairs"]["top"], want["eigenpairs"]["top"], rtol=1e-4)
        assert got["trace"]["trace"] == pytest.approx(want["trace"]["trace"], rel=1e-5)
        for a, b in zip(got["layers"], want["layers"]):
            assert a["trace"] == pytest.approx(b["trace"], rel=1e-4, abs=1e-6)
            assert a["top_eigenvalue"] == pytest.approx(b["top_eigenvalue"], rel=1e-3, abs=1e-6)
        for kind in ("flatness", "adaptive_flatness"):
            np.testing.assert_allclose(got[kind]["increases"], want[kind]["increases"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(two["surface"]["losses"], one_process_run["surface"]["losses"], rtol=1e-5)
    assert two["surface"]["examples"] == one_process_run["surface"]["examples"]
    assert two["connectivity"] == one_process_run["connectivity"]
    # the sharded stages read slices (keyed as such), the others the whole splits
    inputs = {json.loads(p.read_text())["inputs"]["train"] for p in (tmp_path / "runs").glob("*/sharpness.*.json")}
    whole = {json.loads(p.read_text())["inputs"]["train"] for p in (tmp_path / "runs").glob("*/evaluate.*.json")}
    assert len(inputs) == len(whole) == 1 and inputs != whole


@pytest.mark.slow
def test_points_spread_over_ranks_give_the_default_run_of_one_process(one_process_run, tmp_path):
    """With --shard-points every rank holds all the data and evaluates its share of the flatness directions
    and surface grid points: every number, those included, is the single process's."""
    two = python_main([*QUICK_RUN, "--shard-points"], tmp_path, processes=2)
    for key in ("models", "connectivity", "reparametrisation", "surface"):
        assert numbers(two[key]) == numbers(one_process_run[key]), key
    keys = {json.loads(p.read_text())["inputs"]["train"] for p in (tmp_path / "runs").glob("*/flatness.*.json")}
    whole = {json.loads(p.read_text())["inputs"]["train"] for p in (tmp_path / "runs").glob("*/sharpness.*.json")}
    assert len(keys) == len(whole) == 1 and keys != whole  # the flatness stages did run spread
