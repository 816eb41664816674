"""The environment record: which device a run uses, and what its results depend on beyond the code and data."""

from __future__ import annotations

import importlib.metadata
import platform

import numpy as np
import torch


def device_of(name: str) -> str:
    """The device a --device value names: "cuda" or "cpu" (auto: cuda when torch sees a GPU)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def device_name(device: str) -> str:
    """The device in words, for metrics.json and the stage keys: "cpu", or "cuda (<the GPU's name>)"."""
    return f"cuda ({torch.cuda.get_device_name()})" if device == "cuda" else "cpu"


def stage_environment(device: str) -> dict:
    """What every stage's result depends on beyond its settings, inputs and code: the rounding of torch's
    kernels (its version, the thread count, the default dtype, the device and the GPU it ran on)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(torch.get_default_dtype()),
            "device": device_name(device)}


def installed_version(package: str) -> str | None:
    """A package's installed version without importing it (None when it is not installed)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    """metrics.json's `environment`: Python, platform, library versions, device, threads, default dtype."""
    import matplotlib
    import scipy

    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torchvision": installed_version("torchvision"),  # importing it costs 1.5 s
            "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__, "device": device_name(device), "threads": torch.get_num_threads(),
            "dtype": str(torch.get_default_dtype()).replace("torch.", "")}
