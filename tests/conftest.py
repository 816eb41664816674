"""Shared fixtures: tiny float64 models with smooth activations, and their data.

Curvature fixtures use Tanh: ReLU's second derivative is zero almost everywhere, which
would hide errors in the second-order terms.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

settings.register_profile("repo", deadline=None, max_examples=25, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repo"))
torch.set_num_threads(min(2, torch.get_num_threads()))


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


def tiny_data(seed: int = 0, n: int = 12, d: int = 4, classes: int = 3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture
def mlp_and_data():
    return tiny_mlp(0), *tiny_data(0)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """One `main --quick` run for every test that inspects a complete run's outputs."""
    import json

    import main

    out = tmp_path_factory.mktemp("quick")
    assert main.main(["--quick", "--quiet", "--offline", "--out", str(out), "--runs-dir", str(out / "runs")]) == 0
    return out, json.loads((out / "metrics.json").read_text())


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
