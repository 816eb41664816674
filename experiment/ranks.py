"""Running across processes: the ranks torchrun starts, the work each takes, and the measurements they share.

Without torchrun a run is one process (`Ranks()`, world 1) and nothing here touches torch.distributed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

import utils
from experiment.cli import UsageError
from experiment.environment import device_of
from experiment.settings import TrainingSettings
from experiment.stages import POINT_STAGES, SHARDED_STAGES, Split, build_model, train_model
from landscape.store import Keyed, Store, digest

log = logging.getLogger("landscape")
RANK_TIMEOUT = dt.timedelta(hours=12)  # how long a rank waits at a collective for a slower one (a sweep's share)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes torchrun started: its rank and the world size (1: a single
    process, which needs no torch.distributed at all). Rank 0 gathers, writes and plots."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's items: every world-th from its rank on (round robin, so costly grid corners spread)."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a collective call)."""
        if self.world == 1:
            return value
        found = [value]
        torch.distributed.broadcast_object_list(found, src=0)
        return found[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank (a collective call)."""
        if self.world == 1:
            return [value]
        found = [None] * self.world
        torch.distributed.all_gather_object(found, value)
        return found


def join_ranks(cfg) -> Ranks:
    """The process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): gloo on the CPU, NCCL on CUDA, each rank on GPU LOCAL_RANK. Without torchrun, a single
    process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    device, local = device_of(cfg.device), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"torchrun started process {local} on a machine with {torch.cuda.device_count()} GPU(s): "
                             "start at most one process per GPU (--nproc_per_node), or use --device cpu")
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", timeout=RANK_TIMEOUT)
    return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size())


def leave_ranks(ranks: Ranks) -> None:
    """Close the process group `join_ranks` opened, if any."""
    if ranks.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_spreading_flags(cfg, ranks: Ranks) -> None:
    """--shard-data and --shard-points need torchrun's processes."""
    for flag, wanted in (("--shard-data", cfg.shard_data), ("--shard-points", cfg.shard_points)):
        if wanted and ranks.world == 1:
            raise UsageError(f"{flag} spreads work over the processes torchrun starts: run "
                             f"torchrun --nproc_per_node=N main.py {flag} (one process does it all anyway)")


def run_in_shares(store: Store, ranks: Ranks, *phases: list[Callable[[], object]]) -> list[list[str]]:
    """Under torchrun: each phase's jobs spread over the ranks (jobs[rank::world]), a phase starting once every
    rank has finished the one before. Between phases every rank's store accepts the files all ranks wrote,
    so that under --fresh each stage is computed once and then read back. Returns the labels each rank
    computed; what was loaded meanwhile is forgotten, since the gathering pass that follows loads it again."""
    for phase, jobs in enumerate(phases, 1):
        mine, start = ranks.share(jobs), time.perf_counter()
        for done, job in enumerate(mine, 1):
            job()
            log.info("phase %d/%d: %d of this process's %d jobs done in %.1f s", phase, len(phases), done,
                     len(mine), time.perf_counter() - start)
        for paths in ranks.gather(sorted(str(path) for path in store.written)):
            store.accept(paths)
    others = [w for r, found in enumerate(ranks.gather(store.warnings)) if r != ranks.rank for w in found]
    store.warnings += [w for w in others if w not in store.warnings]  # a damaged file any rank met
    store.loaded.clear()
    return ranks.gather(store.computed)


@dataclass(frozen=True)
class ShardedRun:
    """A default run under torchrun whose `stages` every rank computes together, on its `sliced` inputs:
    --shard-data cuts each split into one contiguous slice per rank (a copy, keyed as the whole split cut so,
    since all-reduced sums round differently from one process's); --shard-points gives every rank all of
    each split, marked to spread the points (`PointShare`)."""

    ranks: Ranks
    sliced: dict[str, Keyed]
    stages: tuple = SHARDED_STAGES

    @classmethod
    def of_data(cls, ranks: Ranks, inputs: dict[str, Keyed]) -> "ShardedRun":
        """This rank's slices of train, analysis and test (a collective call: every rank makes it)."""
        sliced = {}
        for name in ("train", "analysis", "test"):
            split = inputs[name].value
            if split.size < ranks.world:
                raise UsageError(f"--shard-data: the {name} split has {split.size} examples, fewer than the "
                                 f"{ranks.world} processes; use more examples or fewer processes")
            parts = [utils.shard_rows(split.size, r, ranks.world) for r in range(ranks.world)]
            part = parts[ranks.rank]
            sliced[name] = Keyed(Split(split.x[part].clone(), split.y[part].clone(),
                                       utils.DataShard.of(part.stop - part.start)),
                                 digest(inputs[name].key, "rows per process", [(p.start, p.stop) for p in parts]))
        return cls(ranks, sliced)

    @classmethod
    def of_points(cls, ranks: Ranks, inputs: dict[str, Keyed]) -> "ShardedRun":
        """Every split whole on every rank, its points spread over the ranks."""
        share = utils.PointShare()
        sliced = {name: Keyed(Split(inputs[name].value.x, inputs[name].value.y, share),
                              digest(inputs[name].key, "points spread over", ranks.world))
                  for name in ("train", "analysis", "test")}
        return cls(ranks, sliced, POINT_STAGES)

    def trained(self, store: Store, settings: TrainingSettings, inputs: dict[str, Keyed], *, label: str
                ) -> tuple[Keyed, dict]:
        """Rank 0 trains (or loads) the model on the whole training set and sends it to every rank."""
        found = store.trained(build_model, train_model, settings, inputs, label=label) if self.ranks.main else None
        sent = self.ranks.broadcast(None if found is None else
                                    ({k: v.cpu() for k, v in found[0].value.state_dict().items()}, found[0].key,
                                     found[1]))
        if self.ranks.main:
            return found
        state, key, history = sent
        model = build_model(settings)
        model.load_state_dict(state)
        return Keyed(model.eval(), key), history

    def run(self, store: Store, stage, settings, subject: str, found: dict[str, Keyed], *, label: str
            ) -> Keyed | None:
        """A sharded stage: loaded by rank 0 if it finished before, else computed by every rank on its slice
        and saved by rank 0. Any other stage: on rank 0 alone. None on the ranks that get no result."""
        if stage not in self.stages:
            return store.run(stage, settings, subject, found, label=label) if self.ranks.main else None
        inputs = {**found, **self.sliced}
        loaded = store.load(stage, settings, subject, inputs, label=label) if self.ranks.main else None
        if self.ranks.broadcast(loaded is not None):
            return loaded
        return store.run(stage, settings, subject, inputs, label=label, save=self.ranks.main, reuse=False)
