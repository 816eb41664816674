"""The default run's machinery: starting a run (output folder, threads, data, stage store), training and
measuring one seed's model, the pair and centre stages, and closing the store.

Every stage goes through the stage store (landscape/store.py), so a rerun loads what finished before.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data as data_module
from experiment.cli import UsageError
from experiment.environment import device_of, stage_environment
from experiment.ranks import Ranks, ShardedRun, run_in_shares
from experiment.stages import (CENTRE_STAGES, EXACT_STAGES, MODEL_STAGES, NEEDS_AN_MLP, PAIR_STAGES, Split,
                               build_model, exact_mode, pair_and_centre, settings_of, train_model)
from experiment.settings import TrainingSettings
from landscape.files import WriteError, check_writable, make_folder, remove_stale_temporaries
from landscape.store import CodeIndex, Keyed, Store, digest

log = logging.getLogger("landscape")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """A started run: its configuration, its place among torchrun's processes, where it writes, its data (keyed
    stage inputs), its stage store, and under --shard-data/--shard-points how its measurements are spread."""

    cfg: object
    ranks: Ranks
    out: Path
    data: data_module.Dataset | None
    inputs: dict[str, Keyed]
    store: Store
    sharded: ShardedRun | None = None
    shares: list[list[str]] = field(default_factory=list)  # under torchrun: the stages each rank computed


@dataclass(frozen=True)
class Measured:
    """One seed's trained model, its training history and its stage results (by stage name)."""

    model: Keyed
    history: dict
    results: dict[str, Keyed]


def resolve(path: str) -> Path:
    """A flag's folder: absolute as given, else under the current directory."""
    p = Path(path)
    return p if p.is_absolute() else Path.cwd() / p


def output_folder(cfg) -> Path:
    """Where a run writes: --out, and for a sweep (--dynamics) its sweep/ (dynamics/) subfolder, so that neither
    overwrites the default run's metrics.json."""
    if getattr(cfg, "dynamics", False):
        return resolve(cfg.out) / "dynamics"
    return resolve(cfg.out) / "sweep" if cfg.sweep else resolve(cfg.out)


def check_folders(cfg, *, redraw: bool = False) -> None:
    """Before any work: every folder the run will write can be written (--out; unless redrawing, --runs-dir and
    --data-dir too), and what a killed run left half-written in --out is removed (the writer's own temporaries
    only). A folder that cannot be written is a UsageError naming the flag, the path and the cause."""
    folders = {"--out": output_folder(cfg)}
    if not redraw:
        folders.update({"--runs-dir": resolve(cfg.runs_dir), "--data-dir": resolve(cfg.data_dir)})
    for flag, folder in folders.items():
        try:
            check_writable(folder)
        except WriteError as err:
            raise UsageError(f"{flag} must be a folder this run can write: {err}") from None
    make_folder(folders["--out"])
    for path in remove_stale_temporaries(folders["--out"]):
        log.info("removed %s, left half-written by a run that was killed", path)


def load_data(cfg) -> data_module.Dataset:
    """The data set in memory, cut to the configured subsets."""
    ds = data_module.load_dataset(cfg.dataset, data_dir=resolve(cfg.data_dir), download=not cfg.offline)
    if cfg.train_subset:
        ds.x_train, ds.y_train = ds.x_train[: cfg.train_subset], ds.y_train[: cfg.train_subset]
    if cfg.test_subset:
        ds.x_test, ds.y_test = ds.x_test[: cfg.test_subset], ds.y_test[: cfg.test_subset]
    return ds


def data_inputs(cfg, ds: data_module.Dataset) -> dict[str, Keyed]:
    """The data the stages read, on the run's device, each keyed by the data set's checksum and the examples it
    holds: train and test (whole), analysis (the first --analysis-examples training examples; all when 0)."""
    n = cfg.analysis_examples or ds.x_train.shape[0]
    device = device_of(cfg.device)
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)

    def keyed(split: str, x, y) -> Keyed:
        return Keyed(Split(x, y), digest(ds.sha256, split, int(x.shape[0])))

    return {"train": keyed("train", x_train, y_train),
            "test": keyed("test", ds.x_test.to(device), ds.y_test.to(device)),
            "analysis": keyed("train", x_train[:n], y_train[:n])}


def start(cfg, ranks: Ranks | None = None, *, stages: int) -> Run:
    """What every run does first: check the output folder, set the threads, load the data (under torchrun rank 0
    first, which may download it, then the others from disk), open the stage store (with a progress bar over
    `stages` stages, on rank 0), and under --shard-data/--shard-points spread the measurements."""
    ranks = ranks or Ranks()
    out = output_folder(cfg)
    check_folders(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device_of(cfg.device) == "cuda":  # full float32 products, and the same result for the same key
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    environment = stage_environment(device_of(cfg.device))
    if len({json.dumps(e, sort_keys=True) for e in ranks.gather(environment)}) > 1:
        raise UsageError("the processes differ in torch version, thread count or device, so their results would "
                         "not match: give every process the same --threads and the same kind of device")
    ds, load_seconds = _load_data_in_turn(cfg, ranks)
    store = Store(resolve(cfg.runs_dir), code=CodeIndex(REPO_ROOT), environment=environment, fresh=cfg.fresh,
                  total=stages, progress=ranks.main and not cfg.quiet and sys.stdout.isatty() and sys.stderr.isatty())
    store.timings["load_data"] = load_seconds
    store.warnings += ds.warnings  # a damaged data cache rebuilt: metrics.json and the terminal say so
    run = Run(cfg, ranks, out, ds, data_inputs(cfg, ds), store)
    if cfg.shard_data or cfg.shard_points:
        run.sharded = (ShardedRun.of_data if cfg.shard_data else ShardedRun.of_points)(ranks, run.inputs)
    if cfg.shard_data and not ranks.main:  # this rank keeps only its slices
        run.inputs, run.data = {name: Keyed(None, keyed.key) for name, keyed in run.inputs.items()}, None
    return run


def _load_data_in_turn(cfg, ranks: Ranks) -> tuple[data_module.Dataset, float]:
    """The data set and the seconds it took; under torchrun rank 0 loads (and may download) it first, and every
    rank checks that all read the same bytes."""
    if not ranks.main:
        ranks.barrier()  # rank 0 has the data on disk
    begin = time.perf_counter()
    ds = load_data(cfg if ranks.main else dataclasses.replace(cfg, offline=True))
    seconds = round(time.perf_counter() - begin, 4)
    if ranks.main:
        ranks.barrier()
    if len(set(ranks.gather(ds.sha256))) > 1:
        raise data_module.DataError("the processes read different data (checksums differ): give them the same "
                                    "--data-dir, or run rank 0 once alone to put the data set on disk")
    if ranks.main:
        log.info("data: %s", ds.source)
        if ds.hint:
            log.info("      %s", ds.hint)
    return ds, seconds


def spread(run: Run, *phases: list) -> bool:
    """Under torchrun: each phase's jobs (callables) spread over the ranks, one phase after the other (see
    `run_in_shares`). Returns whether this process goes on to the pass that reads everything back: rank 0
    always, every rank when the measurements themselves are spread (--shard-data, --shard-points)."""
    if run.ranks.world > 1 and phases:
        run.shares = run_in_shares(run.store, run.ranks, *phases)
    return run.ranks.main or run.sharded is not None


def default_phases(run: Run) -> tuple[list, ...]:
    """The default run under torchrun without spread measurements: first each seed's model, then the pair's and
    the centre's stages. Nothing to spread in one process, or when the measurements themselves are spread."""
    if run.ranks.world == 1 or run.sharded is not None:
        return ()
    return ([functools.partial(measure_seed, run, seed) for seed in run.cfg.seeds],
            [functools.partial(pair_stages, run), functools.partial(centre_stages, run)])


def default_stage_count(cfg) -> int:
    """How many stages the default run has (for its progress bar)."""
    return len(cfg.seeds) * (1 + len(MODEL_STAGES) + len(EXACT_STAGES)) + len(PAIR_STAGES) + len(CENTRE_STAGES)


def train_seed(run: Run, seed: int) -> tuple[Keyed, dict]:
    """One seed's model, trained or loaded: (model, training history)."""
    label = f"train[seed={seed}]"
    settings = TrainingSettings.of(run.cfg, seed=seed)
    if run.sharded is None:
        model, history = run.store.trained(build_model, train_model, settings, run.inputs, label=label)
    else:
        model, history = run.sharded.trained(run.store, settings, run.inputs, label=label)
    if label in run.store.computed:
        log.info("trained seed %d: %d steps, final epoch loss %.4f", seed, history["steps"], history["epoch_losses"][-1])
    return model, history


def measure_seed(run: Run, seed: int) -> Measured:
    """One seed's model trained (or loaded) and every per-model stage run on it (or loaded)."""
    model, history = train_seed(run, seed)
    stages = MODEL_STAGES + (EXACT_STAGES if exact_mode(run.cfg, model.value) else ())
    return Measured(model, history, run_stages(run.store, run.cfg, stages, model.key, {**run.inputs, "model": model},
                                               suffix=f"[seed={seed}]", sharded=run.sharded))


def pair_stages(run: Run, measured: dict[int, Measured] | None = None) -> dict[str, Keyed]:
    """PAIR_STAGES between the pair's two models (trained or loaded here when not given)."""
    pair, _ = pair_and_centre(run.cfg.seeds)
    models = {seed: measured[seed].model if measured else train_seed(run, seed)[0] for seed in pair}
    first, second = (models[seed] for seed in pair)
    return run_stages(run.store, run.cfg, PAIR_STAGES, digest(first.key, second.key),
                      {**run.inputs, "model_a": first, "model_b": second}, sharded=run.sharded)


def centre_stages(run: Run, measured: dict[int, Measured] | None = None) -> dict[str, Keyed]:
    """CENTRE_STAGES on the centre model, which read its results (measured here when not given)."""
    _, centre = pair_and_centre(run.cfg.seeds)
    results = (measured[centre] if measured else measure_seed(run, centre)).results
    return run_stages(run.store, run.cfg, CENTRE_STAGES, results["model"].key, results, sharded=run.sharded)


def run_stages(store: Store, cfg, stages, subject: str, found: dict[str, Keyed], *, suffix: str = "",
               sharded: ShardedRun | None = None) -> dict[str, Keyed]:
    """Each stage in order into `subject`'s folder, its result added to `found` for the stages after it;
    those that need an MLP are skipped for other models. Under --shard-data (`sharded`) the sharded stages are
    computed by every rank together and the others by rank 0 alone. Returns `found` with the results."""
    found = dict(found)
    for stage in stages:
        if cfg.model != "mlp" and stage.__name__ in NEEDS_AN_MLP:
            continue
        settings, label = settings_of(stage, cfg), stage.__name__ + suffix
        if sharded is None:
            found[stage.__name__] = store.run(stage, settings, subject, found, label=label)
        elif (result := sharded.run(store, stage, settings, subject, found, label=label)) is not None:
            found[stage.__name__] = result
    return found


def close(run: Run) -> bool:
    """Close the store; on rank 0 also say what was resumed and tidy the store (--prune). Returns whether this
    process writes the outputs (rank 0)."""
    run.store.close()
    if not run.ranks.main:
        return False
    computed = {label for share in run.shares for label in share}  # by any rank in this run: not "resumed"
    run.store.loaded = [label for label in run.store.loaded if label not in computed]
    if run.store.loaded:
        log.info("resumed %d finished stages from %s (--fresh recomputes them)", len(run.store.loaded), run.store.root)
    if run.store.outdated:
        log.info("recomputed %d stage files saved before stage files held checksums", len(run.store.outdated))
    for path in run.store.removed_temporaries:
        log.info("removed %s, left half-written by a run that was killed", path)
    tidy_store(run.store, prune=run.cfg.prune)
    return True


def tidy_store(store: Store, *, prune: bool) -> None:
    """--prune: delete what this run did not use and say what; otherwise say how much there is."""
    if prune:
        removed = store.prune()
        for path in removed:
            log.info("pruned %s", path)
        log.info("pruned %d files no stage of this run uses from %s", len(removed), store.root)
        return
    unused = store.unused()
    if unused:
        size = sum(p.stat().st_size for p in unused) / 2**20
        log.info("%s holds %d files (%.1f MB) this run did not use (other settings, older code); --prune deletes "
                 "them", store.root, len(unused), size)
