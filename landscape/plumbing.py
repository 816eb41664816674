"""Parameter plumbing every measurement shares: flat vectors, the functional loss, chunking, seeded draws.

A measurement sees a model as a function of one flat parameter vector θ (in `model.parameters()` order),
evaluated with `torch.func.functional_call`, so it never writes into the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import nn
from torch.func import functional_call

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of scratch memory a measurement may use at once
PATHS = ("auto", "fast", "general")
ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softplus, nn.Identity)
_STOCHASTIC_IN_TRAINING = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def check_measurable(model: nn.Module) -> None:
    """Raise ValueError when the loss is not a deterministic, finite function of the parameters."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"parameter {name} has non-finite values; the model cannot be measured "
                             "(did training diverge? lower the learning rate)")
    if model.training:
        for name, m in model.named_modules():
            if isinstance(m, _STOCHASTIC_IN_TRAINING):
                raise ValueError(f"module {name} ({type(m).__name__}) is in training mode, so the loss is not a "
                                 "fixed function of the parameters; call model.eval() before measuring")


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached flat vector, in `model.parameters()` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def parameter_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(name, p.shape) for name, p in model.named_parameters()]


def split_flat(flat: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    """A flat vector as a name -> tensor dict shaped like the model's parameters (views, no copy)."""
    out, offset = {}, 0
    for name, shape in parameter_shapes(model):
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"vector has {flat.numel()} entries but the model has {offset} parameters")
    return out


def split_rows(vs: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    """Rows of flat vectors (b, D) as per-parameter tensors (b, *shape)."""
    out, offset = [], 0
    for _, shape in parameter_shapes(model):
        n = math.prod(shape)
        out.append(vs[:, offset : offset + n].reshape(vs.shape[0], *shape))
        offset += n
    return out


_BUNDLED_BLAS_DIRS = ("numpy.libs", "scipy.libs")  # where the wheels keep their own OpenBLAS copies


def numpy_blas_single_threaded():
    """A context manager: the BLAS libraries bundled in numpy's and scipy's wheels run one thread meanwhile.
    Their OpenBLAS workers spin for a while after each call and take the cores from torch's products; a BLAS
    that torch may share (a system or conda library) is left alone."""
    controller = ThreadpoolController()
    bundled = [lib.filepath for lib in controller.lib_controllers
               if lib.user_api == "blas" and lib.filepath and Path(lib.filepath).parent.name in _BUNDLED_BLAS_DIRS]
    return controller.select(filepath=bundled).limit(limits=1)


def resolve_loss(loss_fn: LossFn | None) -> LossFn:
    return F.cross_entropy if loss_fn is None else loss_fn


def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the model and move the data to its device (and its dtype, for floating inputs)."""
    check_measurable(model)
    p = next(model.parameters())
    x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same, non-zero number of examples, got {x.shape[0]} and {y.shape[0]}")
    return x, y.to(p.device)


def functional_loss(model, params, x, y, loss_fn) -> torch.Tensor:
    return loss_fn(functional_call(model, params, (x,)), y)


def row_chunks(n: int, rows: int) -> list[slice]:
    rows = max(1, min(n, int(rows)))
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def graph_bytes_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> float:
    """Bytes that autograd saves per example for a gradient built with create_graph (measured on 2 tiny batches)."""
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}

    def saved_bytes(n: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = functional_loss(model, params, x[:n], y[:n], loss_fn)
            torch.autograd.grad(loss, list(params.values()), create_graph=True, materialize_grads=True)
        return total

    small, large = min(2, x.shape[0]), min(6, x.shape[0])
    if large == small:
        return float(saved_bytes(small))
    return max(1.0, (saved_bytes(large) - saved_bytes(small)) / (large - small))


def is_integer_labels(y: torch.Tensor) -> bool:
    return not y.is_floating_point() and y.dim() == 1


# ----------------------------------------------------------------------------- seeded draws


def rademacher(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(like)


def gaussian(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Seeded standard normal draws, made in float32 whatever `like`'s dtype: float64 gets the same numbers."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like)


def start_vector(dim: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded Gaussian vector (`gaussian`)."""
    return gaussian(dim, torch.Generator().manual_seed(seed), like)


# ----------------------------------------------------------------------------- which path a model takes


def mlp_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers of a plain MLP (Sequential of [Flatten], Linear and element-wise modules), else None."""
    if type(model).forward is not nn.Sequential.forward or not isinstance(model, nn.Sequential):
        return None
    layers = list(model.children())
    while layers and type(layers[0]) is nn.Flatten:
        layers = layers[1:]
    if not layers or type(layers[0]) is not nn.Linear:
        return None
    if not all(type(m) is nn.Linear or type(m) in ELEMENTWISE for m in layers):
        return None
    if any(getattr(m, "inplace", False) for m in layers):
        return None
    if sum(1 for _ in model.buffers()):
        return None
    return layers


def fast_path_layers(model: nn.Module, path: str) -> list[nn.Module] | None:
    """The dispatch rule every capability shares: the plain MLP's layers when `path` ("auto", "fast" or
    "general") takes the MLP fast path, else None (the general path)."""
    if path not in PATHS:
        raise ValueError(f"path must be 'auto', 'fast' or 'general', got {path!r}")
    layers = None if path == "general" else mlp_layers(model)
    if path == "fast" and layers is None:
        raise ValueError("the fast path needs a plain MLP (nn.Sequential of Linear and element-wise layers)")
    return layers


def linear_parts(layers, flat: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Split a flat parameter vector (..., D) into (weight, bias) per Linear layer, batched over leading dims."""
    parts, offset, lead = [], 0, flat.shape[:-1]
    for m in layers:
        if type(m) is not nn.Linear:
            continue
        w_n = m.weight.numel()
        w = flat[..., offset : offset + w_n].reshape(*lead, *m.weight.shape)
        offset += w_n
        b = None
        if m.bias is not None:
            b = flat[..., offset : offset + m.out_features]
            offset += m.out_features
        parts.append((w, b))
    return parts


def max_output_change(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor) -> float:
    """max |f_a(x) − f_b(x)| over every example and output: zero when the two compute the same function on x."""
    with torch.no_grad():
        return float((model_a(x) - model_b(x)).abs().max())
