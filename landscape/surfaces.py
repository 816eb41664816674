"""2-D slices of the loss: around one model along two directions, and on the plane through three points."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from landscape.distributed import DataShard, PointShare
from landscape.flatness import random_direction
from landscape.plumbing import DEFAULT_MEMORY_BUDGET, LossFn, ParamSpec, flat_parameters
from landscape.points import losses_at_points


def symmetric_grid(steps: int, span: float) -> np.ndarray:
    """`steps` points evenly spaced on [−span, span], exactly symmetric, with an exact 0 when steps is odd."""
    if steps < 2 or not span > 0:
        raise ValueError(f"a grid needs steps >= 2 and span > 0, got steps={steps}, span={span}")
    half = np.linspace(-span, span, steps)
    grid = (half - half[::-1]) / 2
    return grid


@dataclass
class SurfaceResult:
    """Loss on the plane θ + α·d1 + β·d2: losses[i, j] at (alphas[i], betas[j])."""

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray  # (steps, steps)
    accuracies: np.ndarray  # (steps, steps)
    directions: tuple[torch.Tensor, torch.Tensor] = field(repr=False, default=None)


def loss_surface_2d(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int = 25,
    span: float = 1.0,
    seed: int = 0,
    directions: tuple[torch.Tensor, torch.Tensor] | None = None,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    accuracy: bool = True,
    shard: DataShard | PointShare | None = None,
    params: ParamSpec = None,
    bn: str = "keep",
) -> SurfaceResult:
    """2-D slice of the loss around θ (Li et al. 2018): two random Gaussian filter-normalised directions
    from `seed` (or the given flat `directions`, used unchanged), on a steps×steps grid over [−span, span]².
    With accuracy=False the accuracies are NaN and cost nothing. `shard` spreads the data or the grid points
    over processes (`losses_at_points`); `bn` keeps the BatchNorm running statistics (default) or recomputes them at
    each grid point from x ("recompute", Garipov et al. 2018)."""
    grid = symmetric_grid(steps, span)
    if directions is None:
        generator = torch.Generator().manual_seed(seed)
        directions = (random_direction(model, generator, params=params), random_direction(model, generator, params=params))
    d = torch.stack([directions[0], directions[1]])
    a, b = np.meshgrid(grid, grid, indexing="ij")
    coefficients = torch.from_numpy(np.stack([a.ravel(), b.ravel()], axis=1))
    result = losses_at_points(model, x, y, flat_parameters(model, params), d, coefficients,
                              loss_fn=loss_fn, memory_budget=memory_budget, accuracy=accuracy, shard=shard, params=params,
                              bn=bn)
    return SurfaceResult(grid.copy(), grid.copy(), result.losses.numpy().reshape(steps, steps),
                         result.accuracies.numpy().reshape(steps, steps), (d[0], d[1]))


@dataclass
class PlaneResult:
    """The loss on the plane through three parameter points, in orthonormal in-plane coordinates."""

    xs: np.ndarray  # (steps,) coordinate along u = (θ_b − θ_a)/‖θ_b − θ_a‖
    ys: np.ndarray  # (steps,) coordinate along v, the unit part of θ_c − θ_a orthogonal to u
    losses: np.ndarray  # (steps, steps), losses[i, j] at θ_a + xs[i]·u + ys[j]·v
    points: np.ndarray  # (3, 2) in-plane coordinates of θ_a, θ_b, θ_c
    origin: torch.Tensor = field(repr=False, default=None)  # θ_a
    basis: torch.Tensor = field(repr=False, default=None)  # (2, D): the rows u and v

    def coordinates(self, thetas: torch.Tensor) -> torch.Tensor:
        """In-plane coordinates (n, 2) of parameter points (n, D): their projections onto u and v."""
        offsets = thetas - self.origin
        return torch.stack([offsets @ self.basis[0], offsets @ self.basis[1]], dim=1)


def loss_plane(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    points: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    steps: int = 21,
    margin: float = 0.2,
    loss_fn: LossFn | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    params: ParamSpec = None,
    bn: str = "keep",
) -> PlaneResult:
    """Loss on the plane through θ_a, θ_b, θ_c (flat vectors; e.g. two models and a Bézier control point,
    Garipov et al. 2018), on a steps×steps grid covering the three points with `margin` of their extent on
    each side. `model` gives the architecture; its own parameters are not used. `bn`: BatchNorm statistics kept
    (default) or recomputed at each point from x (Garipov et al.'s update_bn)."""
    like = flat_parameters(model, params)
    theta_a, theta_b, theta_c = (p.detach().to(like) for p in points)
    u = theta_b - theta_a
    if float(u.norm()) == 0:
        raise ValueError("θ_a and θ_b coincide: the three points span no plane")
    u = u / u.norm()
    v = (theta_c - theta_a) - ((theta_c - theta_a) @ u) * u
    if float(v.norm()) <= 1e-12 * float((theta_c - theta_a).norm() + 1e-30):
        raise ValueError("the three points are collinear: they span no plane")
    v = v / v.norm()
    coords = np.array([[0.0, 0.0], [float((theta_b - theta_a) @ u), 0.0],
                       [float((theta_c - theta_a) @ u), float((theta_c - theta_a) @ v)]])
    low, high = coords.min(axis=0), coords.max(axis=0)
    pad = margin * (high - low)
    xs = np.linspace(low[0] - pad[0], high[0] + pad[0], steps)
    ys = np.linspace(low[1] - pad[1], high[1] + pad[1], steps)
    a, b = np.meshgrid(xs, ys, indexing="ij")
    basis = torch.stack([u, v])
    result = losses_at_points(model, x, y, theta_a, basis,
                              torch.from_numpy(np.stack([a.ravel(), b.ravel()], axis=1)),
                              loss_fn=loss_fn, memory_budget=memory_budget, accuracy=False, params=params, bn=bn)
    return PlaneResult(xs, ys, result.losses.numpy().reshape(steps, steps), coords, theta_a, basis)
