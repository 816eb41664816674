"""Shared fixtures and pytest's configuration; the helpers the tests import live in helpers.py."""

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import CUDA, Backend, tiny_data, tiny_mlp  # noqa: E402

settings.register_profile("repo", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repo"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", params=["general", "fast"])
def backend(request) -> Backend:
    """Runs a test once on each implementation: the same oracle, both paths."""
    return Backend(request.param)


@pytest.fixture
def mlp_and_data():
    return tiny_mlp(0), *tiny_data(0)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One `main --quick` run for every test that inspects a complete run's outputs."""
    import json

    import main

    out = tmp_path_factory.mktemp("quick")
    assert main.main(["--quick", "--quiet", "--offline", "--device", "cpu", "--out", str(out),
                      "--runs-dir", str(out / "runs")]) == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.fixture
def run(quick_run):
    return quick_run


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (bench/gpu_check.sh runs them: pytest -m cuda)")
    config.addinivalue_line("markers", "slow: runs main.py end to end or reads its outputs (pytest -m 'not slow' "
                                       "skips them: the minute-long loop while you work)")


@pytest.fixture(autouse=True)
def on_the_cpu_unless_marked_cuda(request, monkeypatch):
    """Every test but the CUDA-marked ones sees no GPU, as CI's machines: `--device auto` means the CPU there."""
    if CUDA and request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
