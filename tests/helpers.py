"""Test helpers: tiny float64 models with smooth activations, their data, dense references, and runners.

Curvature fixtures use Tanh: ReLU's second derivative is zero almost everywhere, which
would hide errors in the second-order terms.
"""

import copy
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def tiny_mlp(seed: int = 0, widths=(4, 5, 3), activation=nn.Tanh, dtype=torch.float64) -> nn.Sequential:
    """A plain MLP (the fast paths apply) with random float64 weights drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g))
            lin.bias.copy_(0.5 * torch.randn(b, generator=g))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(dtype)


class Wrapped(nn.Module):
    """The same function as `inner`, but not a plain Sequential: forces the general code paths."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@dataclass(frozen=True)
class Backend:
    """One implementation of the capabilities that have an MLP fast path (Hessian products, parameter points,
    per-example gradients): "general", the autograd reference, or "fast", the MLP fast path. `path` is what
    the dispatching functions take; `model(m)` is m as that backend sees it (wrapped, so that it is no plain
    Sequential, for "general")."""

    path: str

    def model(self, m: nn.Module) -> nn.Module:
        return m if self.path == "fast" else Wrapped(m)


def tiny_data(seed: int = 0, n: int = 12, d: int = 4, classes: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


# ----------------------------------------------------------------------------- independent helpers
# Used by the oracle tests, which check utils.py against truths built without it.


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def unflatten(model: nn.Module, theta: torch.Tensor) -> dict:
    out, i = {}, 0
    for name, p in model.named_parameters():
        n = p.numel()
        out[name] = theta[i : i + n].view_as(p)
        i += n
    assert i == theta.numel()
    return out


def _loss(outputs, targets, loss_fn):
    return F.cross_entropy(outputs, targets) if loss_fn is None else loss_fn(outputs, targets)


def grad_at(model, theta, x, y, loss_fn=None) -> torch.Tensor:
    th = theta.detach().clone().requires_grad_(True)
    loss = _loss(functional_call(model, unflatten(model, th), (x,)), y, loss_fn)
    (g,) = torch.autograd.grad(loss, th)
    return g.detach()


def loss_at(model, theta, x, y, loss_fn=None) -> float:
    with torch.no_grad():
        return float(_loss(functional_call(model, unflatten(model, theta), (x,)), y, loss_fn))


def logits_at(model, theta, x) -> torch.Tensor:
    with torch.no_grad():
        return functional_call(model, unflatten(model, theta), (x,))


def acc_at(model, theta, x, y) -> float:
    return float((logits_at(model, theta, x).argmax(1) == y).double().mean())


def softmax_np(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def logreg_jacobian(xi: np.ndarray, C: int) -> np.ndarray:
    """J (C x D) = d logits / d theta for theta = [W.ravel() (C x d row-major), b] (multinomial logistic regression)."""
    d = xi.shape[0]
    J = np.zeros((C, C * d + C))
    for c in range(C):
        J[c, c * d : (c + 1) * d] = xi
        J[c, C * d + c] = 1.0
    return J


DT = torch.float64


def make_logreg(seed=0, n=12, d=4, C=3, scale=0.8):
    """Multinomial logistic regression (one float64 Linear layer) with random weights and data."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, C).to(DT)
    with torch.no_grad():
        lin.weight.copy_(scale * torch.randn(C, d, generator=g, dtype=DT))
        lin.bias.copy_(scale * torch.randn(C, generator=g, dtype=DT))
    x = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, C, (n,), generator=g)
    return lin, x, y


def scalar_chain(w1, w2):
    """f(x) = w2·w1·x as two bias-free 1×1 Linear layers (float64)."""
    m = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).to(DT)
    with torch.no_grad():
        m[0].weight.fill_(w1)
        m[1].weight.fill_(w2)
    return m


def param_blocks(model):
    """[(name, offset, numel)] in parameters() order."""
    out, i = [], 0
    for name, p in model.named_parameters():
        out.append((name, i, p.numel()))
        i += p.numel()
    return out


def mlp_of(widths, activation, bias=True, tail=None) -> nn.Sequential:
    """A float64 plain MLP with the given widths, activation between Linear layers, optional trailing module."""
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(activation())
    if tail is not None:
        layers.append(tail)
    return nn.Sequential(*layers).double()


def quadratic_model(Q: np.ndarray):
    """An exactly quadratic model: Linear(1, k, bias=False) at x = [[1]] with loss ½·oᵀQo, so θ = W[:, 0],
    L(θ) = ½·θᵀQθ and H = Q exactly. Returns (model, x, y, loss_fn), all float64."""
    k = Q.shape[0]
    lin = nn.Linear(1, k, bias=False).to(torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(0.3, 1.1, k, dtype=torch.float64).unsqueeze(1))
    Qt = torch.tensor(Q, dtype=torch.float64)

    def loss_fn(o, t):
        return 0.5 * torch.einsum("ni,ij,nj->n", o, Qt, o).mean()

    return lin, torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.long), loss_fn


# ----------------------------------------------------------------------------- shared oracles and cases


class TinyCNN(nn.Module):
    """conv(1->2,3x3) - tanh - conv(2->3,3x3,pad 1) - tanh - flatten - linear(48->3), on 1x6x6 images."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = nn.Conv2d(1, 2, 3)
        self.c2 = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(48, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.6 * torch.randn(p.shape, generator=g))
        self.to(DT)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


def assert_filter_normalized(d: torch.Tensor, model, rtol=1e-12):
    theta = flat(model)
    for off, shape in param_rows(model):
        n = math.prod(shape)
        seg = d[off : off + n]
        if len(shape) >= 2:
            torch.testing.assert_close(
                seg.reshape(shape[0], -1).norm(dim=1),
                theta[off : off + n].reshape(shape[0], -1).norm(dim=1),
                rtol=rtol,
                atol=1e-14,
            )
        else:
            assert torch.count_nonzero(seg) == 0, f"1-D parameter at offset {off} not zeroed"


def cnn_data(seed=0, n=5):
    g = torch.Generator().manual_seed(500 + seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def logreg_closed_form(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray):
    """Returns (loss, per-example gradients (N x D), Hessian (D x D)) of mean cross-entropy.

    g_i = J_i^T (p_i - e_{y_i}) = [(p_i - e_{y_i}) x_i^T (row-major), p_i - e_{y_i}]
    H   = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i   (the Kronecker form, reordered)
    """
    N, _ = X.shape
    C = W.shape[0]
    P = softmax_np(X @ W.T + b)
    E = np.eye(C)[y]
    loss = float(-np.mean(np.log(P[np.arange(N), y])))
    gs, H = [], 0.0
    for i in range(N):
        J = logreg_jacobian(X[i], C)
        gs.append(J.T @ (P[i] - E[i]))
        H = H + J.T @ (np.diag(P[i]) - np.outer(P[i], P[i])) @ J
    return loss, np.array(gs), H / N


def logreg_np(lin, x, y):
    return lin.weight.detach().numpy(), lin.bias.detach().numpy(), x.numpy(), y.numpy()


def param_rows(model):
    """(offset, shape) of every parameter tensor in flat order."""
    out, i = [], 0
    for p in model.parameters():
        out.append((i, tuple(p.shape)))
        i += p.numel()
    return out


def rand_vec(D, seed):
    return torch.randn(D, generator=torch.Generator().manual_seed(seed), dtype=DT)


def sym_with_spectrum(eigs, seed=0):
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return (U * np.asarray(eigs)) @ U.T


def assert_unchanged(model, snap):
    for p, (v, rg, g) in zip(model.parameters(), snap):
        assert torch.equal(p.detach(), v), "parameters changed"
        assert p.requires_grad == rg
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)


def dense_hessian(model, x, y, loss_fn=None) -> np.ndarray:
    """Dense Hessian of the mean loss by plain torch.autograd.functional.hessian, symmetrised."""
    theta = flat(model)
    H = torch.autograd.functional.hessian(
        lambda th: _loss(functional_call(model, unflatten(model, th), (x,)), y, loss_fn), theta
    )
    H = H.detach().numpy()
    assert np.allclose(H, H.T, atol=1e-10)
    return 0.5 * (H + H.T)


def logreg_closed_form_spectrum(lin: nn.Linear, x, y, saddle: float = 0.0):
    """Per-example gradients (N x D) and Hessian (D x D) of

        L = mean_i [ CE(z_i, y_i) - (saddle/2) z_{i0}^2 ],   z_i = W x_i + b,

    g_i = J_i^T (p_i - e_{y_i} - saddle * z_{i0} e_0),
    H   = (1/N) sum_i J_i^T (diag p_i - p_i p_i^T - saddle * e_0 e_0^T) J_i.
    """
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    X, Y = x.numpy(), y.numpy()
    N = X.shape[0]
    C = W.shape[0]
    Z = X @ W.T + b
    P = softmax_np(Z)
    E = np.eye(C)[Y]
    e0 = np.eye(C)[0]
    gs, H = [], 0.0
    for i in range(N):
        J = logreg_jacobian(X[i], C)
        gs.append(J.T @ (P[i] - E[i] - saddle * Z[i, 0] * e0))
        H = H + J.T @ (np.diag(P[i]) - np.outer(P[i], P[i]) - saddle * np.outer(e0, e0)) @ J
    return np.array(gs), H / N


def saddle_loss_fn(c: float):
    def lf(o, t):
        return F.cross_entropy(o, t) - 0.5 * c * (o[:, 0] ** 2).mean()

    return lf


def snapshot(model):
    return [(p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]


def sym_with_spectrum_spectrum(eigs, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((len(eigs), len(eigs))))
    return (U * np.asarray(eigs, dtype=np.float64)) @ U.T


def z_score(est, stderr, truth):
    return abs(est - truth) / stderr if stderr > 0 else (0.0 if est == truth else math.inf)


DUMMY_X = torch.zeros(3, 1, dtype=DT)


DUMMY_Y = torch.zeros(3, dtype=torch.long)


class ThetaModel(nn.Module):
    """A model whose only parameter is theta (1-D); its output row is theta for every input row."""

    def __init__(self, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=DT).clone())

    def forward(self, x):
        return self.theta.unsqueeze(0).expand(x.shape[0], -1)


def assert_same_params(m1, m2, rtol=0.0, atol=0.0):
    p1, p2 = list(m1.parameters()), list(m2.parameters())
    assert len(p1) == len(p2)
    for a, b in zip(p1, p2):
        assert a.shape == b.shape
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


def assert_unchanged_conn(models, snaps):
    for m, s in zip(models, snaps):
        assert torch.equal(flat(m), s), "a model passed in was modified"


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def quad_loss(H, c):
    """loss_fn(o, t) = mean over rows of 1/2 (o - c)^T H (o - c): with ThetaModel, L(theta) = 1/2 (theta-c)^T H (theta-c)."""
    Ht, ct = torch.as_tensor(H, dtype=DT), torch.as_tensor(c, dtype=DT)

    def lf(o, t):
        d = o - ct
        return 0.5 * torch.einsum("ni,ij,nj->n", d, Ht, d).mean()

    return lf


def relu_mlp(seed=0, widths=(4, 5, 3)):
    return tiny_mlp(seed, widths, activation=nn.ReLU)


def snapshot_conn(*models):
    return [flat(m) for m in models]


ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "identity": nn.Identity,
}


def assert_unchanged_diag(model, snap):
    sd, grads, rgs, modes = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[k], sd[k]), f"parameter/buffer {k} changed"
        assert now[k].dtype == sd[k].dtype
    for p, g, rg in zip(model.parameters(), grads, rgs):
        assert p.requires_grad == rg, "requires_grad changed"
        if g is None:
            assert p.grad is None, ".grad was None and is now set"
        else:
            assert p.grad is not None and torch.equal(p.grad, g), ".grad changed"
    assert [m.training for m in model.modules()] == modes, "train/eval mode changed"


def dense_hessian_diag(model, x, y, loss_fn=None) -> torch.Tensor:
    """Dense Hessian of the mean loss w.r.t. the flat parameter vector (plain autograd, float64)."""
    theta = flat(model).to(DT)
    m64 = copy.deepcopy(model).double()
    x64 = x.double()
    H = torch.autograd.functional.hessian(
        lambda th: _loss(functional_call(m64, unflatten(m64, th), (x64,)), y, loss_fn), theta
    )
    return H.detach()


def make_data(n, d, classes, seed=0):
    g = torch.Generator().manual_seed(7919 + seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def make_mlp(widths, act="relu", bias=True, tail=None, seed=0, scale=0.8) -> nn.Sequential:
    return randomize(mlp_of(widths, ACTIVATIONS[act], bias=bias, tail=tail), seed, scale)


def randomize(model: nn.Module, seed: int, scale: float = 0.8) -> nn.Module:
    """Overwrite every parameter with scale * N(0, 1) draws from `seed` (deterministic, float64)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def snapshot_diag(model):
    return (
        copy.deepcopy(model.state_dict()),
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
    )


# hidden activation cycles: "relu_tanh" = ReLU after the 1st hidden Linear, Tanh after the 2nd, ReLU after the 3rd ...
ACTS = {
    "relu": (nn.ReLU,),
    "tanh": (nn.Tanh,),
    "relu_tanh": (nn.ReLU, nn.Tanh),
    "tanh_relu": (nn.Tanh, nn.ReLU),
}


PIECEWISE = {"relu": (nn.ReLU,), "leaky": (lambda: nn.LeakyReLU(0.1),), "relu_leaky": (nn.ReLU, lambda: nn.LeakyReLU(0.1))}


REL = 1e-10


def default_constants(d):
    """Constant columns for an input of width d: column 0, the last column, a run of neighbours and isolated ones,
    with values 0.0, 1.5 and -0.7."""
    const = {0: 0.0, d - 1: 1.5}
    for j in range(2, min(6, d - 1)):  # a run 2..5
        const[j] = (0.0, -0.7, 0.0, 1.5)[j - 2]
    for j in range(8, d - 2, 5):  # isolated ones
        const[j] = (-0.7, 0.0, 1.5)[(j // 5) % 3]
    return const


def dense_hessian_inputs(model, x, y) -> torch.Tensor:
    return torch.func.hessian(loss_theta(model, x, y))(flat(model)).detach()


def forward_at(model, theta, x):
    with torch.no_grad():
        return functional_call(model, unflatten(model, theta), (x,))


def loss_theta(model, x, y):
    return lambda th: F.cross_entropy(functional_call(model, unflatten(model, th), (x,)), y)


def make_mlp_inputs(widths, act="relu", bias=True, seed=0, flatten=False, w_scale=1.3, b_scale=0.6) -> nn.Sequential:
    """A float64 plain MLP [Flatten] Linear, act, Linear, act, ..., Linear with random weights ~ w_scale/sqrt(fan_in)
    and biases ~ b_scale (so a good share of ReLU units is inactive on each example)."""
    cycle = ACTS.get(act) or PIECEWISE[act]
    layers = [nn.Flatten()] if flatten else []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(cycle[i % len(cycle)]())
    model = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(w_scale / math.sqrt(m.in_features) * torch.randn(m.weight.shape, generator=g, dtype=DT))
                if m.bias is not None:
                    m.bias.copy_(b_scale * torch.randn(m.bias.shape, generator=g, dtype=DT))
    return model


def make_x(n, d, const, seed=0):
    """(n, d) Gaussian float64 inputs with x[:, j] = const[j] for every j in const."""
    g = torch.Generator().manual_seed(5000 + seed)
    x = torch.randn(n, d, generator=g, dtype=DT)
    for j, c in const.items():
        x[:, j] = c
    return x


def make_y(n, classes, seed=0):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(6000 + seed))


ACTIVATIONS_meas = [nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU, nn.SiLU]


def with_constant_columns(x: torch.Tensor, columns) -> torch.Tensor:
    """x (N, d) with the given columns set to constants (0, 1.5, -0.7, ... in turn), as MNIST's border pixels."""
    x = x.clone()
    for i, c in enumerate(columns):
        x[:, c] = (0.0, 1.5, -0.7)[i % 3]
    return x


# Run by `run_main` to kill the process at a chosen write: every file the project writes becomes visible in
# landscape.files._replace, which this harness wraps (the project itself has no fault hooks).
FAULT_DRIVER = """
import os, re, signal, sys
import landscape.files as files
when, pattern, nth = {fault!r}
seen, replace = [0], files._replace

def replace_or_die(tmp, path):
    hit = re.search(pattern, path.name) is not None
    seen[0] += hit
    if hit and seen[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    replace(tmp, path)
    if hit and seen[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)

files._replace = replace_or_die
import main
sys.exit(main.main(sys.argv[1:]))
"""


def run_main(tmp_path, *flags, fault=None):
    """`main.py --quick` in a fresh process on the offline data, outputs and runs under tmp_path. With `fault`
    (when, file name pattern, occurrence) the process SIGKILLs itself just "before" or "after" that file is
    moved into place."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    args = ["--quick", "--quiet", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"),
            "--data-dir", str(ROOT / "data"), "--offline", "--skip-figures", *flags]
    cmd = [sys.executable, str(ROOT / "main.py"), *args] if fault is None else \
        [sys.executable, "-c", FAULT_DRIVER.format(fault=tuple(fault)), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)


# ----------------------------------------------------------------------------- CUDA
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False here); "
                                                 "bench/gpu_check.sh runs these on one")




def pdf_text(path: Path) -> str:
    """Text of a PDF by poppler's pdftotext, or pypdf where poppler is not installed."""
    import shutil

    if shutil.which("pdftotext"):
        return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True,
                              check=True).stdout
    from pypdf import PdfReader

    return "\n".join(page.extract_text() for page in PdfReader(str(path)).pages)


def pdf_pages(path: Path) -> int:
    """The number of pages of a PDF."""
    import re

    return len(re.findall(rb"/Type\s*/Page[^s]", path.read_bytes()))
