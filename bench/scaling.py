"""Scaling across processes (issue 18), on this machine's cores: prints the numbers bench/RESULTS.md records.

1. A data-parallel λ_max on Fashion-MNIST's 60,000 training images (Debian's dataset-fashion-mnist): one
   process with 1 and with 2 threads against torchrun with 2 ranks of 1 thread, each rank holding half the
   images (`DataShard`); the same trained model, the same Lanczos, the same tolerance.
2. The sweep's wall time: `main.py --sweep` with one process of 2 threads against torchrun with 2 processes
   of 1 thread each, each from an empty stage store.

Run: python bench/scaling.py [--skip-sweep] [--sweep-args "--quick"]. It starts torchrun itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def lambda_worker(threads: int) -> None:
    """One rank (or the only process): train the default MLP for one epoch on all 60,000 images with one thread
    (the same weights in every variant: same seed, same thread count), then time λ_max on this rank's share
    with `threads` threads."""
    import torch
    import torch.distributed as dist

    import data
    import main
    import training
    from experiment.settings import TrainingSettings
    from experiment.stages import build_model
    import utils

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
    ds = data.load_dataset("fashion-mnist", download=False)
    cfg = main.Config(dataset="fashion-mnist", device="cpu")  # gloo, CPU tensors, on any machine
    model = build_model(TrainingSettings.of(cfg, seed=0))
    training.train(model, ds.x_train, ds.y_train, epochs=1, lr=cfg.lr, momentum=cfg.momentum,
                   batch_size=cfg.batch_size, seed=0)
    torch.set_num_threads(threads)
    x, y, shard = ds.x_train, ds.y_train, None
    if world > 1:
        part = utils.shard_rows(x.shape[0], rank, world)
        x, y = x[part], y[part]
        shard = utils.DataShard.of(x.shape[0])
        dist.barrier()
    start = time.perf_counter()
    eig = utils.top_hessian_eigenvalue(model, x, y, tol=cfg.sharpness_tol, max_iter=cfg.sharpness_max_iter,
                                       seed=cfg.probe_seed, shard=shard)
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"ranks": world, "threads": threads, "examples": int(ds.x_train.shape[0]),
                          "lambda_max": eig.eigenvalue, "products": eig.iterations, "residual": eig.residual,
                          "seconds": round(seconds, 3)}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def _torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def lambda_scaling(reps: int) -> list[dict]:
    rows = []
    for _ in range(reps):  # alternating, so that the host's drift reaches every variant alike
        for launcher, threads in (([sys.executable], 1), ([sys.executable], 2), (_torchrun(2), 1)):
            done = subprocess.run([*launcher, __file__, "--lambda-worker", str(threads)], cwd=ROOT,
                                  capture_output=True, text=True, check=True)
            rows.append(_last_json(done.stdout))
            print(rows[-1], flush=True)
    return rows


def sweep_scaling(extra: list[str]) -> list[dict]:
    rows = []
    for launcher, threads in (([sys.executable], 2), (_torchrun(2), 1)):
        with tempfile.TemporaryDirectory() as folder:
            command = [*launcher, str(ROOT / "main.py"), "--sweep", "--offline", "--quiet", "--threads", str(threads),
                       "--out", f"{folder}/out", "--runs-dir", f"{folder}/runs", *extra]
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
            wall = time.perf_counter() - start
            metrics = json.loads(Path(folder, "out", "sweep", "metrics.json").read_text())
        rows.append({"processes": metrics["environment"]["processes"], "threads": threads, "wall": round(wall, 1),
                     "models": len(metrics["sweep"]["rows"]) + len(metrics["sweep"]["excluded"]),
                     "rows": metrics["sweep"]["rows"]})
        print({k: v for k, v in rows[-1].items() if k != "rows"}, flush=True)
    same = rows[0]["rows"] == rows[1]["rows"]
    print(f"sweep rows identical with 1 and 2 processes: {same}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lambda-worker", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of the λ_max timings")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--sweep-args", default="", help="extra main.py flags for the sweep (e.g. --quick)")
    args = parser.parse_args(argv)
    if args.lambda_worker:
        lambda_worker(args.lambda_worker)
        return 0
    lambda_scaling(args.reps)
    if not args.skip_sweep:
        sweep_scaling(shlex.split(args.sweep_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
