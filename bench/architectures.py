"""Bench rows for real architectures (issue 26): ResNet-18 and a small transformer language model, each of our
measurements beside the field's tools that have it (PyHessian, hessian-eigenthings, curvlinops, loss-landscapes)
or, where none has it, beside the plain loop a researcher would write (bench/baselines.py's kind).

Every (model, measure, tool) job runs in a fresh child process (`python bench/architectures.py --job MODEL MEASURE
TOOL`): it imports the same libraries, builds the model and data from fixed seeds, then times the measurement alone,
counts its Hessian products (a counting wrapper around each tool's own product function) and reports its own peak
resident memory, getrusage(RUSAGE_SELF).ru_maxrss. The peak memory in the table is that minus the same number for
a child that only imports and builds (the `setup` job). Repetitions alternate the tools' order, as bench.py does.

    .venv/bin/python bench/architectures.py --reps 2            # prints the section
    .venv/bin/python bench/bench.py --only architectures --write  # the same, written into bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402
from landscape import hessian as our_hessian  # noqa: E402

warnings.filterwarnings("ignore")  # the peers' deprecation warnings would bury the table
SEED = 0
SIGMAS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
FLATNESS_SAMPLES = 20
SURFACE_STEPS = 11
TOP_K = 5
CHILD_TIMEOUT_S = 240  # a job past this is reported as not finishing (PyHessian's top-5 on ResNet-18 may)


# ----------------------------------------------------------------------------- the two workloads


class TinyLM(nn.Module):
    """Token embedding + learned positions, causal TransformerEncoderLayers (batch_first), a linear head:
    tokens (N, L) -> next-token logits (N, L, vocab)."""

    def __init__(self, vocab: int = 256, width: int = 64, heads: int = 4, layers: int = 2, length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Embedding(length, width)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, heads, 4 * width, batch_first=True)
                                    for _ in range(layers))
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        h = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))  # (N, L, width)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(h)  # (N, L, vocab)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of every sequence: logits (N, L, V), targets (N, L)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class NextTokenLoss(nn.Module):
    """`next_token_loss` as a module with reduction="mean": curvlinops takes only a loss module it can read that
    from (the adapted runs give every peer this and the math attention kernel)."""

    reduction = "mean"

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return next_token_loss(logits, targets)


def resnet18_workload():
    """torchvision's ResNet-18 (10 classes, 11.2 M parameters) in eval mode on 64 random CIFAR-shaped images with
    labels in 0..9. Its BatchNorm statistics are first set from these images (one train-mode pass, cumulative
    average): at torchvision's initial running statistics (mean 0, variance 1) nothing is normalised."""
    import torchvision

    torch.manual_seed(SEED)  # torchvision initialises from the global generator
    g = torch.Generator().manual_seed(SEED)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x, y, None


def transformer_workload():
    """TinyLM (vocab 256, width 64, 2 layers) in eval mode on 64 random token sequences of 33: inputs the first 32
    tokens, targets the next 32, loss `next_token_loss`."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    model = TinyLM()
    tokens = torch.randint(0, 256, (64, 33), generator=g)
    return model.eval(), tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), next_token_loss


WORKLOADS = {"resnet18": resnet18_workload, "transformer": transformer_workload}


# ----------------------------------------------------------------------------- counting products


class Counter:
    """Hessian-vector products (columns) seen by a wrapped product function."""

    def __init__(self) -> None:
        self.products = 0

    def wrap(self, function, columns=lambda *args: 1):
        def counted(*args, **kwargs):
            self.products += columns(*args)
            return function(*args, **kwargs)
        return counted


def count_ours(counter: Counter) -> None:
    """Every product of our general path goes through AutogradHessian.matmat (rows of V)."""
    our_hessian.AutogradHessian.matmat = counter.wrap(our_hessian.AutogradHessian.matmat,
                                                      lambda self, vs, *rest: vs.shape[0])


def loss_or_default(loss_fn):
    return loss_fn or nn.CrossEntropyLoss()


def count_pyhessian(counter: Counter):
    """PyHessian's full-batch mode multiplies through pyhessian.utils.hessian_vector_product, imported by name."""
    import pyhessian.hessian  # noqa: F401

    module = sys.modules["pyhessian.hessian"]  # the package's attribute of that name is the class, not the module
    module.hessian_vector_product = counter.wrap(module.hessian_vector_product)
    return module.hessian


def eigenthings_operator(model, x, y, loss_fn, counter: Counter):
    """hessian-eigenthings' HessianOperator on (x, y) as one batch, its matvec counted."""
    import hessian_eigenthings as he

    op = he.HessianOperator(model, [(x, y)], he.supervised_loss(loss_fn or F.cross_entropy))
    op.matvec = counter.wrap(op.matvec)
    return he, op


def curvlinops_operator(model, x, y, loss_fn, counter: Counter, params=None):
    """curvlinops' HessianLinearOperator on (x, y) as one batch, its products counted by columns. Its determinism
    check (a few extra products and forward passes at construction) is left out; the model is in eval mode."""
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    op = HessianLinearOperator(model, loss_or_default(loss_fn), params, [(x, y)], check_deterministic=False)
    op._matmat_batch = counter.wrap(op._matmat_batch, lambda X, y, M: M[0].shape[-1])
    return op


# ----------------------------------------------------------------------------- the jobs: (measure, tool) -> value


def layer_names(model) -> list[str]:
    """Weight tensors from the input to the output, four of the transformer's and two of ResNet-18's: per-layer
    curvature of all 62 of ResNet-18's would take thousands of full-network products (1-2 s each here)."""
    names = [name for name, p in model.named_parameters() if p.dim() > 1]
    if isinstance(model, TinyLM):
        return [names[0], names[len(names) // 3], names[2 * len(names) // 3], names[-1]]
    return [names[len(names) // 2], names[-1]]


LAYER_SETTINGS = dict(tol=1e-3, rel_stderr=0.1, max_probes=16)  # λ to 1e-3, traces to 10% or 16 probes per block
TRACE_PROBES = 16  # Hutchinson for every tool: our Hutch++ spends 48 at least, too many at ResNet-18's 1-2 s each
TRACE_SETTINGS = dict(method="hutchinson", rel_stderr=0.01, max_matvecs=TRACE_PROBES)
TOP_TOL = 1e-3


def ours_lambda(model, x, y, loss_fn, counter, tol=1e-4):
    count_ours(counter)
    result = utils.top_hessian_eigenvalue(model, x, y, loss_fn=loss_fn, tol=tol)
    return {"value": result.eigenvalue, "converged": result.converged}


def ours_lambda_reference(model, x, y, loss_fn, counter):
    return ours_lambda(model, x, y, loss_fn, counter, tol=1e-6)


def pyhessian_lambda(model, x, y, loss_fn, counter):
    hessian = count_pyhessian(counter)
    return {"value": float(hessian(model, loss_or_default(loss_fn), data=(x, y), cuda=False).eigenvalues()[0][0])}


def eigenthings_lambda(model, x, y, loss_fn, counter, steps=None):
    """Its Lanczos (largest algebraic) at `steps` steps, default its own 2k."""
    he, op = eigenthings_operator(model, x, y, loss_fn, counter)
    result = he.lanczos(op, k=1, max_iter=steps, which="LA", seed=SEED)
    return {"value": float(result.eigenvalues[0]), "converged": bool(result.converged[0])}


def curvlinops_eigsh(model, x, y, loss_fn, counter, k, tol, params=None):
    """scipy's eigsh (ARPACK, largest algebraic) on curvlinops' operator, largest first."""
    from scipy.sparse.linalg import eigsh

    op = curvlinops_operator(model, x, y, loss_fn, counter, params)
    values = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, return_eigenvectors=False)
    return sorted((float(v) for v in values), reverse=True)


def curvlinops_lambda(model, x, y, loss_fn, counter):
    return {"value": curvlinops_eigsh(model, x, y, loss_fn, counter, 1, 1e-4)[0]}


def ours_top(model, x, y, loss_fn, counter, tol=TOP_TOL):
    count_ours(counter)
    result = utils.hessian_eigenpairs(model, x, y, k=TOP_K, tol=tol, loss_fn=loss_fn)
    return {"value": result.eigenvalues, "converged": result.converged}


def ours_top_reference(model, x, y, loss_fn, counter):
    return ours_top(model, x, y, loss_fn, counter, tol=1e-6)


def pyhessian_top(model, x, y, loss_fn, counter):
    hessian = count_pyhessian(counter)
    values = hessian(model, loss_or_default(loss_fn), data=(x, y), cuda=False).eigenvalues(top_n=TOP_K)[0]
    return {"value": sorted((float(v) for v in values), reverse=True)}


def eigenthings_top(model, x, y, loss_fn, counter, steps=None):
    he, op = eigenthings_operator(model, x, y, loss_fn, counter)
    result = he.lanczos(op, k=TOP_K, max_iter=steps, which="LA", seed=SEED)
    return {"value": sorted((float(v) for v in result.eigenvalues), reverse=True),
            "converged": bool(result.converged.all())}


def curvlinops_top(model, x, y, loss_fn, counter):
    return {"value": curvlinops_eigsh(model, x, y, loss_fn, counter, TOP_K, TOP_TOL)}


def ours_trace(model, x, y, loss_fn, counter, settings=TRACE_SETTINGS):
    count_ours(counter)
    result = utils.hessian_trace(model, x, y, loss_fn=loss_fn, seed=SEED, **settings)
    return {"value": result.trace, "stderr": result.stderr}


def ours_trace_reference(model, x, y, loss_fn, counter):
    return ours_trace(model, x, y, loss_fn, counter, dict(method="hutch++", rel_stderr=0.01, max_matvecs=400))


def pyhessian_trace(model, x, y, loss_fn, counter):
    hessian = count_pyhessian(counter)
    samples = hessian(model, loss_or_default(loss_fn), data=(x, y), cuda=False).trace()
    return {"value": float(np.mean(samples)), "stderr": float(np.std(samples, ddof=1) / math.sqrt(len(samples)))}


def eigenthings_trace(model, x, y, loss_fn, counter):
    he, op = eigenthings_operator(model, x, y, loss_fn, counter)
    result = he.trace(op, num_matvecs=TRACE_PROBES, method="hutchinson", seed=SEED)
    return {"value": float(result.estimate), "stderr": float(result.stderr)}


def curvlinops_hutchinson(op, probes: int) -> float:
    """Its Hutchinson, one probe per call, averaged: a call multiplies all its probe columns at once (vmap), which
    holds a full-network product per column (16 at once took 1 GB more on the transformer; on ResNet-18 a single
    column took 2.3 GB)."""
    from curvlinops import hutchinson_trace

    torch.manual_seed(SEED)  # it draws its probes from the global generator
    return float(np.mean([float(hutchinson_trace(op, num_matvecs=1)) for _ in range(probes)]))


def curvlinops_trace(model, x, y, loss_fn, counter):
    return {"value": curvlinops_hutchinson(curvlinops_operator(model, x, y, loss_fn, counter), TRACE_PROBES)}


def ours_layers(model, x, y, loss_fn, counter):
    count_ours(counter)
    rows = utils.layer_curvature(model, x, y, loss_fn=loss_fn, params=layer_names(model), seed=SEED,
                                 **LAYER_SETTINGS)
    return {"value": {r.name: [r.top_eigenvalue, r.trace] for r in rows}}


def curvlinops_layers(model, x, y, loss_fn, counter):
    """Per tensor: eigsh on its own operator (the diagonal block H_bb) and Hutchinson with our probe count."""
    named = dict(model.named_parameters())
    out = {}
    for name in layer_names(model):
        top = curvlinops_eigsh(model, x, y, loss_fn, counter, 1, LAYER_SETTINGS["tol"], [named[name]])[0]
        op = curvlinops_operator(model, x, y, loss_fn, counter, [named[name]])
        out[name] = [top, curvlinops_hutchinson(op, LAYER_SETTINGS["max_probes"])]
    return {"value": out}


def ours_flatness(model, x, y, loss_fn, counter):
    result = utils.perturbation_flatness(model, x, y, SIGMAS, samples=FLATNESS_SAMPLES, seed=SEED, loss_fn=loss_fn)
    return {"value": result.mean_increase}


@torch.no_grad()
def loop_loss(model, values: dict, x, y, loss_fn) -> float:
    return float(loss_or_default(loss_fn)(torch.func.functional_call(model, values, (x,)), y))


def shaped(model, flat: torch.Tensor) -> dict:
    """A flat parameter vector as name -> tensor, each shaped like the model's own."""
    sizes = [p.numel() for p in model.parameters()]
    return {name: t.view_as(p) for (name, p), t in zip(model.named_parameters(), torch.split(flat, sizes))}


def loop_flatness(model, x, y, loss_fn, counter):
    """One forward pass per direction and σ, on our directions (drawn inside the timing, as ours draws them)."""
    directions = utils.random_directions(model, torch.Generator().manual_seed(SEED), FLATNESS_SAMPLES)
    theta = utils.flat_parameters(model)
    base = loop_loss(model, shaped(model, theta), x, y, loss_fn)
    rows = [[loop_loss(model, shaped(model, theta + s * d), x, y, loss_fn) - base for s in SIGMAS] for d in directions]
    return {"value": np.mean(rows, axis=0).tolist()}


def ours_surface(model, x, y, loss_fn, counter):
    result = utils.loss_surface_2d(model, x, y, steps=SURFACE_STEPS, seed=SEED, loss_fn=loss_fn, accuracy=False)
    return {"value": result.losses.tolist()}


def loop_surface(model, x, y, loss_fn, counter):
    """One forward pass per grid point, on our directions and grid."""
    g = torch.Generator().manual_seed(SEED)
    d1, d2 = utils.random_direction(model, g), utils.random_direction(model, g)
    theta = utils.flat_parameters(model)
    grid = utils.symmetric_grid(SURFACE_STEPS, 1.0)
    return {"value": [[loop_loss(model, shaped(model, theta + float(a) * d1 + float(b) * d2), x, y, loss_fn)
                       for b in grid] for a in grid]}


def loss_landscapes_surface(model, x, y, loss_fn, counter, adapted=False):
    """Its random_plane, filter-normalised (adapted: layer-normalised), at distance 1: its own directions and a
    shifted grid, so its numbers are not comparable point by point with ours."""
    import loss_landscapes
    import loss_landscapes.metrics

    torch.manual_seed(SEED)  # it draws its directions from the global generator
    metric = loss_landscapes.metrics.Loss(loss_or_default(loss_fn), x, y)
    losses = loss_landscapes.random_plane(model, metric, distance=1, steps=SURFACE_STEPS,
                                          normalization="layer" if adapted else "filter", deepcopy_model=True)
    return {"value": np.asarray(losses).tolist()}


def ours_noise(model, x, y, loss_fn, counter):
    result = utils.gradient_noise_scale(model, x, y, b_noise=False, loss_fn=loss_fn)
    return {"value": result.b_simple}


def loop_noise(model, x, y, loss_fn, counter):
    """One backward pass per example; B_simple = tr(Σ)/|G|² with the 1/(N−1) covariance, sums in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = x.shape[0]
    grad_sum, norm_sum = 0, 0.0
    for i in range(n):
        loss = loss_or_default(loss_fn)(model(x[i : i + 1]), y[i : i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)]).double()
        grad_sum, norm_sum = grad_sum + g, norm_sum + float(g @ g)
    mean = grad_sum / n
    grad_norm_sq = float(mean @ mean)
    return {"value": n / (n - 1) * (norm_sum / n - grad_norm_sq) / grad_norm_sq}


def nothing(model, x, y, loss_fn, counter):
    """The setup job: imports and builds only; its peak memory is every other job's zero."""
    return {"value": None}


MEASURES = {  # measure -> tool -> job; the first tool is ours, the reference (untimed row) where there is one
    "setup": {"none": nothing},
    "λ_max": {"ours": ours_lambda, "PyHessian": pyhessian_lambda, "hessian-eigenthings": eigenthings_lambda,
              "curvlinops": curvlinops_lambda, "reference": ours_lambda_reference},
    f"top-{TOP_K}": {"ours": ours_top, "PyHessian": pyhessian_top, "hessian-eigenthings": eigenthings_top,
                     "curvlinops": curvlinops_top, "reference": ours_top_reference},
    "trace": {"ours": ours_trace, "PyHessian": pyhessian_trace, "hessian-eigenthings": eigenthings_trace,
              "curvlinops": curvlinops_trace, "reference": ours_trace_reference},
    "layer curvature": {"ours": ours_layers, "curvlinops": curvlinops_layers},
    "flatness": {"ours": ours_flatness, "loop": loop_flatness},
    f"{SURFACE_STEPS}×{SURFACE_STEPS} surface": {"ours": ours_surface, "loop": loop_surface,
                                                  "loss-landscapes": loss_landscapes_surface},
    "gradient noise": {"ours": ours_noise, "loop": loop_noise},
}


# ----------------------------------------------------------------------------- one job in a child process


def import_every_tool() -> None:
    """Every child imports the same libraries, so that the setup job's peak memory is every job's zero."""
    import scipy.sparse.linalg  # noqa: F401
    import torchvision  # noqa: F401

    for name in ("pyhessian.hessian", "hessian_eigenthings", "curvlinops", "loss_landscapes.metrics"):
        try:
            __import__(name)
        except ImportError:
            pass


def warm_up(model, x, y, loss_fn) -> None:
    """One double backward on two examples, untimed: a process's first one pays a one-time initialisation (1-3 s
    measured on the transformer), which every job would otherwise carry whatever its tool."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        grads = torch.autograd.grad(loss_or_default(loss_fn)(model(x[:2]), y[:2]), params, create_graph=True)
        torch.autograd.grad(grads, params, [torch.ones_like(g) for g in grads], allow_unused=True)


def run_job(workload: str, measure: str, tool: str, steps: int | None, threads: int, adapted: bool = False) -> dict:
    """Build the workload, run one job, and return its seconds, products, value and peak memory (or its error).
    `adapted`: the loss as a module (`NextTokenLoss`) and attention through its twice-differentiable math kernel,
    what a peer needs to measure the transformer at all."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(threads)
    import_every_tool()
    model, x, y, loss_fn = WORKLOADS[workload]()
    warm_up(model, x, y, loss_fn)
    if adapted and loss_fn is not None:
        loss_fn = NextTokenLoss()
    job = MEASURES[measure][tool]
    kwargs = {"steps": steps} if steps is not None else {}
    if tool == "loss-landscapes":
        kwargs["adapted"] = adapted
    counter = Counter()
    out = {}
    start = time.perf_counter()
    try:
        kernel = sdpa_kernel(SDPBackend.MATH) if adapted else contextlib.nullcontext()
        with utils.numpy_blas_single_threaded(), kernel:
            out = job(model, x, y, loss_fn, counter, **kwargs)
    except Exception as error:  # a peer that cannot measure this model: the one-line error is the finding
        out = {"error": f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"}
    out["seconds"] = time.perf_counter() - start
    out["products"] = counter.products
    out["peak_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return out


def in_child(workload: str, measure: str, tool: str, *, steps: int | None = None, threads: int = 1,
             adapted: bool = False) -> dict:
    command = [sys.executable, __file__, "--job", workload, measure, tool, "--threads", str(threads)]
    if adapted:
        command.append("--adapted")
    if steps is not None:
        command += ["--steps", str(steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish within {CHILD_TIMEOUT_S} s", "seconds": math.nan, "products": 0,
                "peak_kib": 0}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child failed (exit {done.returncode}): {tail[:160]}", "seconds": math.nan, "products": 0,
                "peak_kib": 0}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the parent: alternate, summarise

REPS = {"resnet18": 1}  # at 1-2 s a product, one repetition of ResNet-18 (about 10 minutes)
FOLLOWS_OURS = {"hessian-eigenthings"}  # its Lanczos has no stopping rule: it gets as many steps as ours took
NO_REFERENCE = {("resnet18", f"top-{TOP_K}"), ("resnet18", "trace")}  # hundreds of ResNet-18 products
PEERS = ("PyHessian", "hessian-eigenthings", "curvlinops", "loss-landscapes")
# a custom loss function and fused attention, which a peer's defaults may not take (and loss-landscapes' filter
# normalisation, which divides by zero on any all-zero parameter, adapts on every workload: zero-initialised biases)
ADAPTABLE = {"transformer"}


def measure_workload(workload: str, reps: int, threads: int, log=print, only=None) -> dict:
    """Every measure of one workload: the setup job, the reference once, each peer once at its defaults (where that
    fails on a custom-loss workload, the error is kept and the peer runs adapted: loss module, math attention),
    then the tools alternating."""
    results = {"setup": in_child(workload, "setup", "none", threads=threads), "measures": {}}
    for measure, tools in MEASURES.items():
        if measure == "setup" or (only and measure not in only):
            continue
        runs, failures, adapted = {tool: [] for tool in tools}, {}, set()
        if "reference" in tools and not (workload, measure) in NO_REFERENCE:
            runs["reference"].append(in_child(workload, measure, "reference", threads=threads))
        timed = [tool for tool in tools if tool != "reference"]
        for r in range(REPS.get(workload, reps)):
            for tool in timed[r % len(timed):] + timed[: r % len(timed)]:
                if runs[tool] and "error" in runs[tool][-1]:
                    continue  # a tool that failed (adapted, or where nothing can adapt it) is not run again
                steps = runs["ours"][0]["products"] if tool in FOLLOWS_OURS and measure != "trace" else None
                run = in_child(workload, measure, tool, steps=steps, threads=threads, adapted=tool in adapted)
                if "error" in run and tool in PEERS and (workload in ADAPTABLE or tool == "loss-landscapes") \
                        and tool not in adapted:
                    failures[tool], run = run["error"], in_child(workload, measure, tool, steps=steps,
                                                                 threads=threads, adapted=True)
                    adapted.add(tool)
                runs[tool].append(run)
                log(f"{workload} {measure} {tool}{' (adapted)' if tool in adapted else ''}: " + short(run))
        results["measures"][measure] = {"runs": runs, "failures": failures, "adapted": sorted(adapted)}
    return results


def short(run: dict) -> str:
    if "error" in run:
        return run["error"]
    return f"{run['seconds']:.2f} s, {run['products']} products, peak {run['peak_kib'] / 1024:.0f} MiB"


# ----------------------------------------------------------------------------- the section's words

TITLES = {"resnet18": "ResNet-18 (torchvision, 11.2 M parameters, eval, 64 CIFAR-shaped images, cross-entropy)",
          "transformer": "Transformer LM (embedding + 2 causal encoder layers + head, 135 k parameters, eval, "
                         "64 sequences of 32 tokens, vocab 256, custom next-token loss_fn)"}


def summary(runs: list[dict], setup_kib: float) -> dict | None:
    """Median seconds with min-max, products and peak memory above the setup job, over a tool's successful runs."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return None
    seconds = [r["seconds"] for r in done]
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "n": len(seconds),
            "products": statistics.median(r["products"] for r in done),
            "peak_mib": statistics.median((r["peak_kib"] - setup_kib) / 1024 for r in done), "value": done[-1]["value"]}


def difference(value, other) -> float:
    """Largest relative difference (numbers, lists, per-layer pairs); the surface and flatness losses absolute."""
    if isinstance(value, dict):
        return max(difference(value[k], other[k]) for k in value)
    a, b = np.asarray(value, dtype=float).ravel(), np.asarray(other, dtype=float).ravel()
    if a.shape != b.shape:
        return math.nan
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


ABSOLUTE = {"flatness", f"{SURFACE_STEPS}×{SURFACE_STEPS} surface"}


def agreement(measure: str, tool: str, value, ours, reference) -> str:
    if tool == "loss-landscapes":
        return "its own directions and shifted grid: not comparable point by point"
    if measure in ABSOLUTE:
        a, b = np.asarray(value, dtype=float), np.asarray(ours, dtype=float)
        return f"max abs. loss difference from ours {np.max(np.abs(a - b)):.1e} (rel. {difference(a, b):.1e})"
    words = f"rel. diff. from ours {difference(value, ours):.1e}"
    if reference is not None:
        words += f"; error vs reference {difference(value, reference):.1e}"
    return words


def mib(value: float) -> str:
    """A peak above the setup job's; at or below it, within that job's own variation, shown as ≤ 0."""
    return f"{value:.0f} MiB" if value > 0 else "≤ 0 MiB"


def cell(s: dict | None) -> str:
    if s is None:
        return "—"
    spread = f" ({s['min']:.2f}–{s['max']:.2f}, n={s['n']})" if s["n"] > 1 else ""
    return f"{s['median']:.2f} s{spread}, {s['products']:.0f} HVPs, {mib(s['peak_mib'])}"


def goal(ours: dict, peer: dict | None) -> str:
    """Time at parity or better (within 10%: the shared machine's noise) and memory within 2× of the peer's."""
    if peer is None:
        return "no peer"
    ratio = ours["median"] / peer["median"]
    memory_ok = ours["peak_mib"] <= 2 * max(peer["peak_mib"], 0.0)
    memory = f"{ours['peak_mib'] / peer['peak_mib']:.1f}×" if peer["peak_mib"] > 0 else \
        f"{mib(ours['peak_mib'])} against {mib(peer['peak_mib'])}"
    return f"{'✓' if ratio <= 1.1 and memory_ok else '✗'} time {ratio:.2f}×, memory {memory}"


def workload_table(workload: str, results: dict) -> list[str]:
    setup = results["setup"]["peak_kib"]
    lines = [f"### {TITLES[workload]}", "", "| measure | ours | fastest peer | agreement | goal met? |",
             "|---|---|---|---|---|"]
    details = ["", "| measure | tool | time median (min–max, n), HVPs, peak MiB | agreement or failure |",
               "|---|---|---|---|"]
    for measure, entry in results["measures"].items():
        runs = entry["runs"]
        ours = summary(runs["ours"], setup)
        reference = summary(runs.get("reference", []), setup)
        ref_value = reference["value"] if reference else None
        peers = {t: summary(r, setup) for t, r in runs.items() if t in PEERS}
        fastest = min((t for t, v in peers.items() if v), key=lambda t: peers[t]["median"], default=None)
        if ours is None:
            lines.append(f"| {measure} | failed: {runs['ours'][-1]['error']} | | | |")
            continue
        head = (f"{fastest}{' (adapted)' if fastest in entry['adapted'] else ''}: {cell(peers[fastest])}"
                if fastest else "no peer has it")
        agree = agreement(measure, fastest, peers[fastest]["value"], ours["value"], ref_value) if fastest else ""
        if ref_value is not None:
            agree += f"; ours vs reference {difference(ours['value'], ref_value):.1e}"
        lines.append(f"| {measure} | {cell(ours)} | {head} | {agree} | {goal(ours, peers.get(fastest))} |")
        details += detail_rows(measure, entry, runs, setup, ours, ref_value)
    return lines + details


def detail_rows(measure, entry, runs, setup, ours, ref_value) -> list[str]:
    rows = []
    for tool, tool_runs in runs.items():
        s = summary(tool_runs, setup)
        name = tool + (" (adapted)" if tool in entry["adapted"] else "")
        if tool == "reference":
            name = "reference: ours at tol 1e-6" if measure != "trace" else "reference: our Hutch++ to 1% stderr"
        if tool in entry["failures"]:
            rows.append(f"| {measure} | {tool} at its defaults | — | fails: {entry['failures'][tool]} |")
        if s is None and not tool_runs:
            continue  # a reference not run for this workload (hundreds of ResNet-18 products)
        if s is None:
            rows.append(f"| {measure} | {name} | — | fails: {tool_runs[-1]['error']} |")
            continue
        words = "" if tool == "ours" else agreement(measure, tool, s["value"], ours["value"],
                                                     None if tool == "reference" else ref_value)
        extra = [f"{k} {tool_runs[-1][k]:.3g}" for k in ("stderr",) if k in tool_runs[-1]]
        extra += ["not converged by its own test"] if tool_runs[-1].get("converged") is False else []
        rows.append(f"| {measure} | {name} | {cell(s)} | {'; '.join([w for w in [words, *extra] if w])} |")
    return rows


def render(results: dict, gemm: float, threads: int) -> str:
    """The section between the architectures markers of bench/RESULTS.md."""
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    lines = [f"Measured {when} by `bench/architectures.py` ({threads} torch thread(s) per child process); this "
             f"host ran a 2000×2000×2000 float32 GEMM at {gemm:.0f} G multiply-adds/s with that many threads just "
             "before. Each cell: median seconds (min–max, n) of the "
             "measurement alone, Hessian-vector products counted at each tool's own product function, and peak "
             "resident memory (getrusage ru_maxrss of the child) above a child that only imports the same libraries "
             "and builds the model and data. 'Adapted': the peer failed at its defaults (the failure is listed) and "
             "was given the loss as a module and attention through the math kernel (loss-landscapes: layer instead "
             "of filter normalisation).", ""]
    for workload, result in results.items():
        lines += workload_table(workload, result) + [""]
    return "\n".join(lines)


def section(reps: int, threads: int, gemm_rate, workloads=None, only=None, log=print) -> str:
    """Measure every workload and return the section's text (bench.py writes it into RESULTS.md); `gemm_rate()`
    is bench.py's host_gemm_rate, run here at the children's thread count."""
    torch.set_num_threads(threads)
    gemm = gemm_rate()
    results = {w: measure_workload(w, reps, threads, log=log, only=only) for w in workloads or WORKLOADS}
    return render(results, gemm, threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", nargs=3, metavar=("WORKLOAD", "MEASURE", "TOOL"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adapted", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per child (1: two ran 7-10x slower while other tenants used the cores)")
    parser.add_argument("--reps", type=int, default=2, help="alternating repetitions (one for ResNet-18's slowest)")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS))
    parser.add_argument("--measures", type=lambda s: s.split(","), default=None, help="only these measures")
    args = parser.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(*args.job, args.steps, args.threads, args.adapted)))
        return 0
    from bench import host_gemm_rate  # bench/bench.py: this script's folder is first on the path

    print(section(args.reps, args.threads, host_gemm_rate, args.workloads, args.measures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
