"""--device, and every measurement where the model lives.

On a machine without CUDA the GPU tests are skipped (and say why); bench/gpu_check.sh runs them on one. The
fact checked there: a float64 measurement on the GPU equals the same measurement on the CPU to float64
rounding (the algorithms, seeds and probes are the same; only the kernels' summation order differs).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import main
from experiment.environment import device_of
from experiment.settings import TrainingSettings
import training
import utils
from helpers import CUDA, ROOT, Wrapped, needs_cuda, tiny_data, tiny_mlp


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="this machine has CUDA: the refusal is for machines without it")
def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "--device", "cuda", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: --device cuda: torch sees no CUDA device") and "--device cpu" in done.stderr
    assert not (tmp_path / "o").exists()


def test_auto_picks_cuda_exactly_when_torch_sees_a_gpu():
    assert device_of("auto") == ("cuda" if CUDA else "cpu")
    assert device_of("cpu") == "cpu"
    assert TrainingSettings.of(main.Config(), seed=3).device == device_of("auto")


@pytest.mark.slow
def test_metrics_record_the_device_that_ran(quick_run):
    _, metrics = quick_run
    assert metrics["environment"]["device"] == "cpu"  # the run asked for --device cpu
    assert metrics["environment"]["processes"] == 1


def measurements(model, other, x, y) -> dict:
    """Every measurement (`other`: a second model of the same architecture), as plain numbers."""
    out = {
        "lambda_max": utils.top_hessian_eigenvalue(model, x, y, tol=1e-10, seed=1).eigenvalue,
        "spectrum": utils.hessian_spectrum(model, x, y, k=3, tol=1e-8, lanczos_steps=10, runs=2).top.eigenvalues,
        "trace": utils.hessian_trace(model, x, y, method="hutch++", rel_stderr=0.05, seed=2).trace,
        "diagonal_trace": utils.hessian_trace(model, x, y, method="auto").trace,
        "two_batch": utils.two_batch_noise_scale(model, x, y, b_small=2, b_big=8, batches=3).b_simple,
        "plane": utils.loss_plane(model, x, y, (utils.flat_parameters(model), utils.flat_parameters(other),
                                               utils.flat_parameters(model) * 0.5), steps=3).losses.tolist(),
        "layers": [layer.top_eigenvalue for layer in utils.layer_curvature(model, x, y, tol=1e-8)],
        "flatness": utils.perturbation_flatness(model, x, y, [0.1, 0.2], samples=3).mean_increase,
        "worst_case": utils.worst_case_sharpness(model, x, y, rho=0.1, steps=5).sharpness,
        "pac_bayes": utils.pac_bayes_flatness(model, x, y, max_error_increase=0.1, samples=3).sigma,
        "noise": utils.gradient_noise_scale(model, x, y).b_noise,
        "batch_sharpness": utils.batch_sharpness(model, x, y, batch_size=4, batches=3, seed=0).value,
        "surface": utils.loss_surface_2d(model, x, y, steps=3).losses.tolist(),
        "interpolation": utils.linear_interpolation(model, other, x, y, [0.0, 0.5, 1.0]).losses,
        "bezier": utils.bezier_curve(model, other, x, y, epochs=2, lr=0.05, points=3).losses,
        "exact": float(utils.exact_curvature(model, x, y).eigenvalues[-1]),
    }
    if isinstance(model, nn.Sequential):
        matched = utils.weight_matching(model, other)
        out["weight_matching"] = [p.tolist() for p in matched.permutations]
    return out


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("activation, general", [(nn.Tanh, False), (nn.Tanh, True), (nn.ReLU, False)])
def test_every_measurement_on_the_gpu_equals_the_cpu(activation, general):
    model = tiny_mlp(0, activation=activation)
    x, y = tiny_data(0, n=16)
    other = tiny_mlp(9, activation=activation)
    wrap = Wrapped if general else (lambda m: m)
    on_cpu = measurements(wrap(model), wrap(other), x, y)
    on_gpu = measurements(wrap(model).cuda(), wrap(other).cuda(), x.cuda(), y.cuda())
    for key, want in on_cpu.items():
        np.testing.assert_allclose(np.asarray(on_gpu[key], dtype=float), np.asarray(want, dtype=float),
                                   rtol=1e-8, atol=1e-10, err_msg=key)


@needs_cuda
@pytest.mark.cuda
def test_training_on_the_gpu_follows_the_cpu_in_float64():
    """The shuffling order is drawn on the CPU and the update is the same: the trained weights agree."""
    x, y = tiny_data(1, n=64)
    trained = []
    for device in ("cpu", "cuda"):
        model = tiny_mlp(3).to(device)
        training.train(model, x.to(device), y.to(device), epochs=3, lr=0.05, batch_size=16, seed=4)
        trained.append(utils.flat_parameters(model).cpu())
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-9, atol=1e-11)


@pytest.mark.slow
@needs_cuda
@pytest.mark.cuda
def test_a_quick_run_on_the_gpu_writes_everything_and_records_the_gpu(tmp_path):
    args = ["--quick", "--offline", "--quiet", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), *args, "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["environment"]["device"].startswith("cuda (")
    for m in metrics["models"].values():
        assert np.isfinite(m["sharpness"]["eigenvalue"]) and m["sharpness"]["converged"]
