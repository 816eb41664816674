"""Measurements of data spread over processes (torch.distributed, gloo on CPU, NCCL on GPU).

A `DataShard` says that this process holds one slice of the examples and which process group holds the
rest. Given one, the two dispatch points wrap their local operator so that a measurement sees the whole
data set: `hessian_operator` returns a `ShardedHessian`, `point_evaluator` a `ShardedPoints`. Everything
built on them (Lanczos, traces, the spectral density, flatness, surfaces) then needs no change.

The identity both use: with the N examples split into slices S_r of n_r examples and L_r the mean loss over
S_r, the mean loss is L = Σ_r (n_r/N)·L_r, so H·v = Σ_r (n_r/N)·H_r·v and ∇L = Σ_r (n_r/N)·∇L_r, and summed
losses and counts of correct predictions add up over the slices. Each is one all-reduce. Every rank gets the
same reduced numbers and runs the same seeded algorithm, so every rank takes the same Lanczos steps, draws
the same probes and returns the same result: the single-process one up to the rounding of the sums
(tests/test_distributed.py runs both).

A `PointShare` is the other way to spread work: every rank holds all the data and evaluates its own share
of the parameter points (surface grid points, flatness directions), `SplitPoints` gathers them; the
gathered losses are exactly the single-process ones, point for point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataShard:
    """This process's slice of a data set spread over the ranks of `group` (None: the default group):
    `examples` is the whole set's size N, the sum of every rank's slice."""

    examples: int
    group: Any = None

    @classmethod
    def of(cls, local_examples: int, *, group=None) -> "DataShard":
        """The shard of a slice of `local_examples` examples (a collective call: every rank makes it)."""
        return cls(int(all_reduce_sum_(torch.tensor([local_examples], dtype=torch.float64), group).item()), group)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks, in place (every rank gets the same numbers); returns `t`."""
        return all_reduce_sum_(t, self.group)


def all_reduce_sum_(t: torch.Tensor, group=None) -> torch.Tensor:
    """`t` summed over the ranks of `group`, in place; returns `t`. Gloo reduces CPU tensors and NCCL GPU ones:
    a tensor elsewhere makes a round trip (small ones only: a count, a flag)."""
    where = "cpu" if dist.get_backend(group) == "gloo" else "cuda"
    if t.device.type == where:
        dist.all_reduce(t, group=group)
        return t
    moved = t.to(where)
    dist.all_reduce(moved, group=group)
    return t.copy_(moved)


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Rank `rank`'s contiguous share of n examples: the first n mod world ranks get one more."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


@dataclass(frozen=True)
class PointShare:
    """Spread the parameter points, not the data, over the ranks of `group` (None: the default group): every
    rank holds all the examples and evaluates the points r, r + world, …; each gets every point's result."""

    group: Any = None
