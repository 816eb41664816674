#!/usr/bin/env bash
# The CUDA checks of issue 18, on a machine with a GPU (under 5 minutes on one): the GPU-marked tests (which
# include a quick run on the GPU), then the benchmark: the default run on the GPU against the CPU, wall time,
# the numbers side by side and the slowest stages.
# Paste what it prints into bench/RESULTS.md. Usage: bash bench/gpu_check.sh   (after make test has set up .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device: torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
echo "== the GPU-marked tests"
"$PY" -m pytest tests -m cuda -q -rs -p no:cacheprovider
echo "== the default run on cuda and on cpu (fresh stage store each)"
for device in cuda cpu; do
    start=$EPOCHREALTIME
    "$PY" main.py --offline --quiet --skip-figures --device "$device" --out "$OUT/$device" --runs-dir "$OUT/runs-$device"
    end=$EPOCHREALTIME
    awk -v a="$start" -v b="$end" -v d="$device" 'BEGIN { printf "%s: %.1f s wall\n", d, b - a }'
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
runs = {d: json.loads(Path(sys.argv[1], d, "metrics.json").read_text()) for d in ("cuda", "cpu")}
print("device:", runs["cuda"]["environment"]["device"])
for seed in runs["cpu"]["models"]:
    for name, get in (("lambda_max", lambda m: m["sharpness"]["eigenvalue"]), ("trace", lambda m: m["trace"]["trace"]),
                      ("test accuracy", lambda m: m["test"]["accuracy"]), ("B_noise", lambda m: m["gradient_noise"]["b_noise"])):
        a, b = get(runs["cuda"]["models"][seed]), get(runs["cpu"]["models"][seed])
        print(f"seed {seed} {name}: cuda {a:.6g}  cpu {b:.6g}  relative difference {abs(a - b) / abs(b):.1e}")
stages = sorted(runs["cuda"]["timings"], key=lambda k: -runs["cpu"]["timings"].get(k, 0))[:8]
for stage in stages:
    print(f"{stage}: cuda {runs['cuda']['timings'][stage]:.3f} s, cpu {runs['cpu']['timings'].get(stage, float('nan')):.3f} s")
PY
