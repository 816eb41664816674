"""Parameter plumbing every measurement shares: which parameters, flat vectors, the functional loss, the one
input check, chunking, seeded draws.

A measurement sees a model as a function of one flat parameter vector θ over the parameters it measures (a
`Selection`: the trainable ones by default, in `named_parameters()` order), evaluated with
`torch.func.functional_call`, so it never writes into the model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from threadpoolctl import ThreadpoolController
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ParamSpec = Sequence["str | torch.Tensor"] | str | torch.Tensor | None  # names or tensors; None: the trainable ones
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


@dataclass(frozen=True)
class Selection:
    """The parameters a measurement differentiates, each once, in `named_parameters()` order: `names` as
    `named_parameters()` spells them, `tensors` the model's own, `slots` every module attribute holding each
    (a weight tied between two modules has two; a module used twice holds its weight once), and `whole`: the
    model's every parameter, each held in exactly one place, the only case the MLP fast paths may take."""

    names: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    slots: dict
    whole: bool

    @property
    def shapes(self) -> list[tuple[str, torch.Size]]:
        return [(name, t.shape) for name, t in zip(self.names, self.tensors)]

    @property
    def dim(self) -> int:
        return sum(t.numel() for t in self.tensors)


def select_parameters(model: nn.Module, params: ParamSpec = None) -> Selection:
    """The parameters to measure: those with requires_grad=True (None, the default, as PyHessian and curvlinops
    do), or the ones `params` names (names from `named_parameters()`, or the parameter tensors themselves)."""
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters, so there is nothing to measure")
    if params is None:
        chosen = [(name, p) for name, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("none of the model's parameters is trainable (requires_grad=True); unfreeze the ones "
                             "to measure or name them with params=[...]")
    else:
        chosen = _named_choice(model, named, params)
    slots: dict[int, list[str]] = {}
    for prefix, module in model.named_modules():  # each module object once, under its first name
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append(f"{prefix}.{attr}" if prefix else attr)
    whole = len(chosen) == len(named) == sum(1 for _ in model.named_parameters(remove_duplicate=False))
    return Selection(tuple(n for n, _ in chosen), tuple(p for _, p in chosen),
                     {n: tuple(slots[id(p)]) for n, p in chosen}, whole)


def _named_choice(model: nn.Module, named, params) -> list[tuple[str, torch.Tensor]]:
    """The (name, parameter) pairs `params` picks, in the model's order; ValueError for anything else."""
    if isinstance(params, (str, torch.Tensor)):
        params = [params]
    by_id = {id(p): name for name, p in named}
    aliases = {name: by_id[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    wanted = set()
    for item in params:
        if isinstance(item, str) and item in aliases:
            wanted.add(aliases[item])
        elif isinstance(item, torch.Tensor) and id(item) in by_id:
            wanted.add(by_id[id(item)])
        else:
            shown = item if isinstance(item, str) else f"a tensor of shape {tuple(item.shape)}"
            raise ValueError(f"params names {shown!s}, which is not a parameter of the model; use names from "
                             "model.named_parameters() or the parameter tensors themselves")
    if not wanted:
        raise ValueError("params is empty: name at least one parameter to measure")
    return [(name, p) for name, p in named if name in wanted]


def flat_parameters(model: nn.Module, params: ParamSpec | Selection = None) -> torch.Tensor:
    """The measured parameters (`select_parameters`: the trainable ones by default) as one detached flat vector."""
    selection = params if isinstance(params, Selection) else select_parameters(model, params)
    return torch.cat([p.detach().reshape(-1) for p in selection.tensors])


def parameter_shapes(model: nn.Module, params: ParamSpec | Selection = None) -> list[tuple[str, torch.Size]]:
    selection = params if isinstance(params, Selection) else select_parameters(model, params)
    return selection.shapes


def split_flat(flat: torch.Tensor, selection: Selection) -> dict[str, torch.Tensor]:
    """A flat vector as a name -> tensor dict shaped like the selected parameters (views, no copy)."""
    out, offset = {}, 0
    for name, shape in selection.shapes:
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].view(shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"vector has {flat.numel()} entries but the model has {offset} measured parameters")
    return out


def split_rows(vs: torch.Tensor, selection: Selection) -> list[torch.Tensor]:
    """Rows of flat vectors (b, D) as per-parameter tensors (b, *shape)."""
    out, offset = [], 0
    for _, shape in selection.shapes:
        n = math.prod(shape)
        out.append(vs[:, offset : offset + n].reshape(vs.shape[0], *shape))
        offset += n
    return out


def functional_forward(model: nn.Module, selection: Selection, values: dict[str, torch.Tensor], x: torch.Tensor):
    """model(x) with the selected parameters replaced by `values` (name -> tensor), the others the model's own.
    Every attribute holding a tied weight gets the value, each once (tie_weights=False): torch's own tying
    swaps a module used twice twice and restores a plain tensor in place of its Parameter."""
    expanded = {slot: value for name, value in values.items() for slot in selection.slots[name]}
    return functional_call(model, expanded, (x,), tie_weights=False, strict=False)


@contextmanager
def twice_differentiable():
    """Scaled dot-product attention through its math kernel meanwhile: the fused kernels torch picks (flash,
    memory-efficient) have no second derivative. The caller's choice is restored on exit."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


PROGRESS_AFTER_SECONDS = 5.0  # a measurement shows its progress bar only once it has run this long


@contextmanager
def product_progress(total: int, what: str):
    """A tqdm bar of Hessian products done out of `total` (the budget), shown on stderr only once the
    measurement has run PROGRESS_AFTER_SECONDS: a short one prints nothing, and neither does one whose stderr is not
    a terminal (a log file, a batch job: tqdm's disable=None), where redrawn bars would pile up as lines. Yields
    `count(matmat)`, which wraps a product function so that every row it multiplies advances the bar."""
    bar = tqdm(total=total, desc=what, unit="product", delay=PROGRESS_AFTER_SECONDS, leave=False, disable=None)

    def count(matmat):
        def counted(vs, *args):
            out = matmat(vs, *args)
            bar.update(vs.shape[0])
            return out
        return counted

    try:
        yield count
    finally:
        bar.close()


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


def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None = None,
            selection: Selection | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one input check every measurement runs (`check_inputs`), then the data on the model's device (and in
    its dtype, for floating inputs)."""
    selection = selection or select_parameters(model)
    check_measurable(model)
    p = selection.tensors[0]
    x = x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else x.dtype)
    y = y.to(p.device)
    check_inputs(model, x, y, loss_fn)
    return x, y


def check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None = None) -> None:
    """ValueError, one sentence, for data no measurement can use: different or zero numbers of examples,
    non-finite x or y, labels outside [0, C) for the built-in cross-entropy (C the model's outputs), a loss_fn
    that does not return one number. Costs one forward pass of two examples."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"x and y must hold the same, non-zero number of examples, got {x.shape[0]} and {y.shape[0]}")
    for name, t in (("x", x), ("y", y)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} holds {int((~torch.isfinite(t)).sum())} NaN or infinite values; "
                             "clean the data before measuring")
    with torch.no_grad():
        outputs = model(x[:2])
        if loss_fn is None and not y.is_floating_point():
            classes = outputs.shape[1] if outputs.dim() > 1 else 1
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= classes:
                raise ValueError(f"class labels must lie in [0, {classes}) for the built-in cross-entropy over the "
                                 f"model's {classes} outputs, but y holds {low if low < 0 else high}; fix the labels "
                                 "or pass a loss_fn")
        value = resolve_loss(loss_fn)(outputs, y[:2])
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"loss_fn returned {shape}, not one number: it must return the mean loss over the "
                         "examples as a scalar (reduction='mean')")


def functional_loss(model, selection: Selection, params, x, y, loss_fn) -> torch.Tensor:
    return loss_fn(functional_forward(model, selection, params, x), y)


def row_chunks(n: int, rows: int) -> list[slice]:
    rows = max(1, min(n, int(rows)))
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def graph_bytes_per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                            selection: Selection) -> float:
    """Bytes that autograd saves per example for a gradient built with create_graph (measured on 2 tiny batches)."""
    params = {k: v.detach().requires_grad_(True) for k, v in zip(selection.names, selection.tensors)}

    def saved_bytes(n: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), twice_differentiable(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = functional_loss(model, selection, params, x[:n], y[:n], loss_fn)
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
    """Seeded ±1 draws in `like`'s dtype, drawn in that dtype: int64 draws, their ±1 and the cast held three times
    a block of probes (2 GB transient for ResNet-18's 8 probes); the numbers and the generator's state are the same."""
    return torch.randint(0, 2, shape, generator=generator, dtype=like.dtype).mul_(2).sub_(1).to(like.device)


def gaussian(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Seeded standard normal draws, made in float32 whatever `like`'s dtype: float64 gets the same numbers."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(like)


def start_vector(dim: int, seed: int, like: torch.Tensor) -> torch.Tensor:
    """A seeded Gaussian vector (`gaussian`)."""
    return gaussian(dim, torch.Generator().manual_seed(seed), like)


# ----------------------------------------------------------------------------- which path a model takes


def mlp_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers of a plain MLP (Sequential of [Flatten], Linear and element-wise modules, each a distinct
    object, no hooks, no buffers, no parameter held twice), else None. `children()` lists a module used twice
    once, so the layers come from the Sequential's own list."""
    if type(model).forward is not nn.Sequential.forward or not isinstance(model, nn.Sequential):
        return None
    layers = list(model._modules.values())
    if len({id(m) for m in layers}) != len(layers) or any(m is None for m in layers):
        return None  # a module used twice (weight tying) or a None slot
    while layers and type(layers[0]) is nn.Flatten:
        layers = layers[1:]
    if not layers or type(layers[0]) is not nn.Linear:
        return None
    if not all(type(m) is nn.Linear or type(m) in ELEMENTWISE for m in layers):
        return None
    if any(getattr(m, "inplace", False) for m in layers):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks for m in [model, *layers]):
        return None
    if sum(1 for _ in model.buffers()):
        return None
    if len(list(model.named_parameters())) != len(list(model.named_parameters(remove_duplicate=False))):
        return None  # a parameter shared by two layers
    return layers


def fast_path_layers(model: nn.Module, path: str, selection: Selection | None = None) -> list[nn.Module] | None:
    """The dispatch rule every capability shares: the plain MLP's layers when `path` ("auto", "fast" or
    "general") takes the MLP fast path, else None (the general path). The fast path needs an exact structural
    match (`mlp_layers`) and the measurement of all its parameters, each trainable or chosen."""
    if path not in PATHS:
        raise ValueError(f"path must be 'auto', 'fast' or 'general', got {path!r}")
    selection = selection or select_parameters(model)
    layers = None if path == "general" or not selection.whole else mlp_layers(model)
    if path == "fast" and layers is None:
        raise ValueError("the fast path needs a plain MLP (nn.Sequential of distinct Linear and element-wise "
                         "layers) measured over all its parameters")
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
