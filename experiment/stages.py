"""The stages: training and every measurement, each a pure function of its settings and its inputs.

A stage is `stage(settings, *, inputs...)`, marked with `@stage(SettingsClass)`; the stage store keeps its
result under a key of exactly those settings, the inputs' keys and the code it can run. Inputs by name:
`model` (or `model_a`, `model_b` for a pair); `train`, `test` (the whole splits) and `analysis` (the first
--analysis-examples training examples, which the costlier analyses see), each a `Split`; and the results of
earlier stages of the same model, by their stage's name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import models
import training
import utils
from experiment.settings import (BezierSettings, ConnectivitySettings, FlatnessSettings, LayersSettings,
                                 LocalEntropySettings, NoiseSettings, NoSettings, PacBayesSettings,
                                 ReparametrisationSettings, Settings, SharpnessSettings, SpectrumSettings,
                                 StationarySettings, SurfaceSettings, TraceSettings, TrainingSettings,
                                 WorstCaseSettings)


@dataclass(frozen=True)
class Split:
    """One split's examples as a stage sees them, and how a measurement on it is spread over processes: a
    `DataShard` under --shard-data (this process holds only a slice), a `PointShare` under --shard-points,
    None for the whole split in one process."""

    x: torch.Tensor
    y: torch.Tensor
    shard: utils.DataShard | utils.PointShare | None = None

    @property
    def size(self) -> int:
        """The number of examples this process holds."""
        return int(self.x.shape[0])


def stage(settings: type[Settings]) -> Callable[[Callable], Callable]:
    """Mark a function as a stage that reads `settings` (a Settings class): `settings_of` builds them."""

    def mark(function: Callable) -> Callable:
        function.settings = settings
        return function

    return mark


def settings_of(stage_function: Callable, cfg, **given) -> Settings:
    """The settings a stage reads (those its @stage mark names), taken from `cfg`."""
    return stage_function.settings.of(cfg, **given)


# ----------------------------------------------------------------------------- training
def build_model(s: TrainingSettings) -> torch.nn.Module:
    """The untrained architecture, its weights drawn from the seed."""
    # drawn on the CPU, then moved: the same initial weights on every device
    generator = torch.Generator().manual_seed(s.seed)
    if s.model == "cnn":
        return models.SmallCNN(generator=generator).to(s.device)
    return models.SmallMLP(tuple(s.hidden), generator=generator).to(s.device)


def train_model(s: TrainingSettings, model: torch.nn.Module, *, train: Split, progress: bool = False) -> dict:
    """Train `model` in place with SGD, tracking its curvature; returns the history metrics.json keeps."""
    x, y = train.x, train.y
    tracker = training.SharpnessTracker(x, y, examples=s.track_examples, batch_size=s.batch_size,
                                        seed=s.probe_seed, memory_budget=s.budget, tol=s.track_tol,
                                        max_iter=s.track_max_iter)
    budget = s.max_steps or s.epochs * math.ceil(x.shape[0] / s.batch_size)
    every = tracker.interval(budget, every=s.track_every, checks=s.track_checks)
    if every:
        tracker(model, 0)
    h = training.train(model, x, y, epochs=0 if s.max_steps else s.epochs, max_steps=s.max_steps, lr=s.lr,
                       momentum=s.momentum, batch_size=s.batch_size, weight_decay=s.weight_decay, seed=s.seed,
                       progress=progress, desc=f"train seed {s.seed}", callback=tracker if every else None,
                       callback_every=every, target_loss=s.train_to_loss, check_every=s.check_every,
                       collapse_steps=s.collapse_steps, optimizer=s.optimizer)
    if every and (not tracker.records or tracker.records[-1]["step"] != h.steps):
        tracker(model, h.steps)
    seconds = h.seconds - h.callback_seconds
    return {"steps": h.steps, "epoch_losses": h.epoch_losses, "seconds": round(seconds, 4),
            "reached_target": h.reached_target, "outcome": h.outcome,
            "tracking": {"every": every, "examples": tracker.examples, "batches": tracker.BATCHES, "records": tracker.records,
                         "seconds": round(tracker.seconds, 4), "overhead": tracker.seconds / max(seconds, 1e-9)}}


# ----------------------------------------------------------------------------- per-model stages
@stage(NoSettings)
def evaluate(s: NoSettings, *, model, train: Split, test: Split) -> dict:
    """Loss and accuracy on train and test, and the generalisation gap in loss."""
    out = {split: dataclasses.asdict(training.evaluate(model, data.x, data.y)) for split, data in
           (("train", train), ("test", test))}
    out["generalization_gap"] = out["test"]["loss"] - out["train"]["loss"]
    return out


@stage(SharpnessSettings)
def sharpness(s: SharpnessSettings, *, model, train: Split) -> dict:
    """λ_max of the Hessian of the training loss over all training examples."""
    eig = utils.top_hessian_eigenvalue(model, train.x, train.y, max_iter=s.sharpness_max_iter, tol=s.sharpness_tol,
                                       seed=s.probe_seed, method=s.sharpness_method, memory_budget=s.budget,
                                       shard=train.shard)
    return {**eigen_record(eig), "tol": s.sharpness_tol}


@stage(SpectrumSettings)
def spectrum(s: SpectrumSettings, *, model, analysis: Split) -> dict:
    """The top-k eigenvalues and λ_min with their true residuals (no eigenvectors: they are D numbers each) and
    the SLQ spectral density, from one set of Lanczos runs."""
    r = utils.hessian_spectrum(model, analysis.x, analysis.y, k=s.eigen_k, tol=s.eigen_tol,
                               lanczos_steps=s.density_steps, runs=s.density_runs, seed=s.probe_seed,
                               memory_budget=s.budget, shard=analysis.shard)
    top, bottom, d = r.top, r.bottom, r.density
    return {"eigenpairs": {"top": top.eigenvalues, "top_residuals": top.residuals, "top_converged": top.converged,
                           "top_iterations": top.iterations, "lambda_min": bottom.eigenvalues[0],
                           "lambda_min_residual": bottom.residuals[0], "lambda_min_converged": bottom.converged,
                           "lambda_min_iterations": bottom.iterations, "tol": s.eigen_tol},
            "density": {"grid": d.grid.tolist(), "density": d.density.tolist(), "nodes": d.nodes.tolist(),
                        "weights": d.weights.tolist(), "sigma": d.sigma}}


@stage(TraceSettings)
def trace(s: TraceSettings, *, model, analysis: Split) -> dict:
    """tr(H): the exact diagonal sum where it applies, else a stochastic estimate with its standard error."""
    return dataclasses.asdict(utils.hessian_trace(model, analysis.x, analysis.y, method=s.trace_method,
                                                  rel_stderr=s.trace_rel_stderr, seed=s.probe_seed,
                                                  memory_budget=s.budget, shard=analysis.shard))


@stage(LayersSettings)
def layers(s: LayersSettings, *, model, analysis: Split) -> list[dict]:
    """λ_max and trace of each parameter tensor's diagonal Hessian block."""
    return [dataclasses.asdict(layer) for layer in utils.layer_curvature(
        model, analysis.x, analysis.y, seed=s.probe_seed, tol=s.layer_tol, rel_stderr=s.layer_rel_stderr,
        max_probes=s.layer_max_probes, memory_budget=s.budget, shard=analysis.shard)]


@stage(FlatnessSettings)
def flatness(s: FlatnessSettings, *, model, train: Split) -> dict:
    """Filter-normalised perturbation flatness (Li et al. 2018)."""
    return flatness_record(utils.perturbation_flatness(model, train.x, train.y, s.flatness_sigmas,
                                                       samples=s.flatness_samples, seed=s.probe_seed,
                                                       memory_budget=s.budget, shard=train.shard))


@stage(FlatnessSettings)
def adaptive_flatness(s: FlatnessSettings, *, model, train: Split) -> dict:
    """Perturbation flatness with |θ|-scaled directions (Kwon et al. 2021)."""
    return flatness_record(utils.perturbation_flatness(model, train.x, train.y, s.flatness_sigmas,
                                                       samples=s.flatness_samples, seed=s.probe_seed, adaptive=True,
                                                       memory_budget=s.budget, shard=train.shard))


@stage(WorstCaseSettings)
def worst_case(s: WorstCaseSettings, *, model, analysis: Split) -> dict:
    """Absolute and adaptive worst-case sharpness in their ρ-balls."""
    return {kind: worst_case_record(utils.worst_case_sharpness(model, analysis.x, analysis.y, rho=rho,
                                                               adaptive=adaptive, steps=s.worst_case_steps,
                                                               seed=s.probe_seed, memory_budget=s.budget))
            for kind, rho, adaptive in (("absolute", s.sharpness_rho, False), ("adaptive", s.adaptive_rho, True))}


@stage(PacBayesSettings)
def pac_bayes(s: PacBayesSettings, *, model, analysis: Split) -> dict:
    """The plain and magnitude-aware PAC-Bayes σ (Jiang et al. 2020)."""
    return {kind: dataclasses.asdict(utils.pac_bayes_flatness(model, analysis.x, analysis.y, magnitude_aware=aware,
                                                              max_error_increase=s.pac_bayes_target,
                                                              samples=s.pac_bayes_samples, seed=s.probe_seed,
                                                              memory_budget=s.budget))
            for kind, aware in (("plain", False), ("magnitude_aware", True))}


@stage(NoiseSettings)
def gradient_noise(s: NoiseSettings, *, model, train: Split, analysis: Split) -> dict:
    """B_simple over all training examples; B_noise, which needs Hessian products, over the analysis subset."""
    x, y = train.x, train.y
    everything = analysis.size == train.size
    out = dataclasses.asdict(utils.gradient_noise_scale(model, x, y, b_noise=everything, rel_stderr=s.noise_rel_stderr,
                                                        seed=s.probe_seed, memory_budget=s.budget))
    if not everything:
        sub = utils.gradient_noise_scale(model, analysis.x, analysis.y, rel_stderr=s.noise_rel_stderr,
                                         seed=s.probe_seed, memory_budget=s.budget)
        out.update({k: getattr(sub, k) for k in ("b_noise", "trace_h_cov", "trace_h_cov_stderr", "g_h_g", "probes")})
    out["b_noise_examples"] = analysis.size
    small, big = s.two_batch
    if big <= train.size:
        out["two_batch"] = dataclasses.asdict(utils.two_batch_noise_scale(model, x, y, b_small=small, b_big=big,
                                                                          batches=s.two_batch_batches,
                                                                          seed=s.probe_seed))
    out["temperature"] = utils.noise_temperature(s.lr, train.size, s.batch_size, s.momentum)
    return out


@stage(StationarySettings)
def stationary(s: StationarySettings, *, model, train: Split) -> dict:
    """Mandt et al. 2017: SGD continued from the model at its own η, B and momentum; the iterates' variance along
    the top Hessian eigenvectors and random controls, measured against the discrete Lyapunov prediction."""
    top_k, controls = s.stationary_directions
    return dataclasses.asdict(utils.stationary_distribution(
        model, train.x, train.y, lr=s.lr, batch_size=min(s.batch_size, train.size), momentum=s.momentum,
        steps=s.stationary_steps, burn_in=s.stationary_burn_in, top_k=top_k, random_directions=controls,
        eigen_tol=s.eigen_tol, seed=s.probe_seed, memory_budget=s.budget))


@stage(LocalEntropySettings)
def local_entropy(s: LocalEntropySettings, *, model, analysis: Split, spectrum) -> dict:
    """Chaudhari et al. 2017's local entropy at each scope by Langevin chains, beside its Laplace approximation
    from the spectral density the spectrum stage measured on the same examples."""
    d = spectrum["density"]
    density = utils.SpectralDensity(np.asarray(d["grid"]), np.asarray(d["density"]), np.asarray(d["nodes"]),
                                    np.asarray(d["weights"]), d["sigma"])
    return dataclasses.asdict(utils.local_entropy(model, analysis.x, analysis.y, scopes=s.entropy_scopes,
                                                  chains=s.entropy_chains, density=density,
                                                  lambda_max=spectrum["eigenpairs"]["top"][0], seed=s.probe_seed,
                                                  memory_budget=s.budget))


@stage(NoSettings)
def exact(s: NoSettings, *, model, train: Split, analysis: Split, sharpness, spectrum, trace, layers,
          gradient_noise) -> dict:
    """The dense float64 Hessian's answers beside every estimate, with the errors (λ_max on all training
    examples, the rest on the analysis subset, as they were measured)."""
    dense = utils.exact_curvature(model, analysis.x, analysis.y)
    k = len(spectrum["eigenpairs"]["top"])
    ends = dense.eigenvectors[:, [0, *range(-k, 0)]]
    rounding = utils.product_rounding(model, analysis.x, analysis.y, ends.T, (dense.hessian @ ends).T)
    top = dense.eigenvalues[::-1][:k]
    full_top = float(dense.eigenvalues[-1])
    if analysis.size != train.size:
        full = utils.exact_curvature(model, train.x, train.y)
        full_top = float(full.eigenvalues[-1])
        vector = full.eigenvectors[:, -1:]
        rounding = max(rounding, utils.product_rounding(model, train.x, train.y, vector.T,
                                                        vector.T * full.eigenvalues[-1]))
    answers = {"top": top.tolist(), "lambda_min": float(dense.eigenvalues[0]), "trace": dense.trace,
               "b_noise": dense.b_noise, "layer_top": dense.layer_top, "layer_trace": dense.layer_trace,
               "product_rounding": rounding}
    answers["errors"] = exact_errors(answers, full_top, sharpness=sharpness, spectrum=spectrum, trace=trace,
                                     layers=layers, gradient_noise=gradient_noise)
    return answers


def exact_errors(answers: dict, full_top: float, *, sharpness, spectrum, trace, layers, gradient_noise) -> dict:
    """Each estimate's absolute error against the dense answer; the trace's also in units of its stderr."""
    estimated_trace = trace["trace"]
    return {
        "top": float(np.max(np.abs(np.asarray(spectrum["eigenpairs"]["top"]) - np.asarray(answers["top"])))),
        "lambda_min": abs(spectrum["eigenpairs"]["lambda_min"] - answers["lambda_min"]),
        "trace": abs(estimated_trace - answers["trace"]),
        "trace_in_stderr": (abs(estimated_trace - answers["trace"]) / trace["stderr"]
                            if trace["stderr"] > 0 else None),  # None: the trace is exact, not estimated
        "sharpness": abs(sharpness["eigenvalue"] - full_top),
        "b_noise": abs(gradient_noise["b_noise"] - answers["b_noise"]),
        "layer_top": float(np.max(np.abs(np.asarray([layer["top_eigenvalue"] for layer in layers]) -
                                         np.asarray(answers["layer_top"])))),
        "layer_trace": float(np.max(np.abs(np.asarray([layer["trace"] for layer in layers]) -
                                           np.asarray(answers["layer_trace"])))),
    }


@stage(ReparametrisationSettings)
def reparametrisation(s: ReparametrisationSettings, *, model, train: Split, test: Split, analysis: Split, sharpness,
                      worst_case, flatness, adaptive_flatness) -> dict:
    """Dinh et al. 2017: rescaled copies compute the same function; which measures move with α? The α = 1 row
    is the model itself: where its own measurements used the same data and solver (the analysis subset is the
    whole training set), they are that row, not computed twice."""
    sigma = max(s.flatness_sigmas)
    rows = []
    if analysis.size == train.size and s.sharpness_method == "lanczos":
        at = flatness["sigmas"].index(sigma)
        rows.append({"alpha": 1.0, "max_output_change": 0.0, "top_eigenvalue": sharpness["eigenvalue"],
                     "worst_case_absolute": worst_case["absolute"]["sharpness"],
                     "worst_case_adaptive": worst_case["adaptive"]["sharpness"],
                     "filter_normalised": flatness["mean_increase"][at],
                     "adaptive_average": adaptive_flatness["mean_increase"][at]})
    for alpha in (*([] if rows else [1.0]), *s.rescale_alphas):
        rows.append(rescaled_row(s, model, alpha, analysis, test, sigma))
    return {"sigma": sigma, "rows": rows}


def rescaled_row(s: ReparametrisationSettings, model, alpha: float, analysis: Split, test: Split, sigma: float
                 ) -> dict:
    """Every measure of the rescaling experiment on the copy of `model` rescaled by α."""
    m = utils.rescaled_copy(model, alpha)
    x, y = analysis.x, analysis.y
    return {
        "alpha": alpha,
        "max_output_change": utils.max_output_change(m, model, test.x),
        "top_eigenvalue": utils.top_hessian_eigenvalue(m, x, y, tol=s.sharpness_tol, seed=s.probe_seed,
                                                       max_iter=s.sharpness_max_iter,
                                                       memory_budget=s.budget).eigenvalue,
        **{f"worst_case_{kind}": utils.worst_case_sharpness(m, x, y, rho=rho, adaptive=kind == "adaptive",
                                                            steps=s.worst_case_steps, seed=s.probe_seed,
                                                            memory_budget=s.budget).sharpness
           for kind, rho in (("absolute", s.sharpness_rho), ("adaptive", s.adaptive_rho))},
        **{name: utils.perturbation_flatness(m, x, y, [sigma], samples=s.flatness_samples, seed=s.probe_seed,
                                             adaptive=adaptive, memory_budget=s.budget).mean_increase[0]
           for name, adaptive in (("filter_normalised", False), ("adaptive_average", True))},
    }


@stage(SurfaceSettings)
def surface(s: SurfaceSettings, *, model, analysis: Split, test: Split) -> dict:
    """The 2-D loss surface around the model in two filter-normalised directions (Li et al. 2018)."""
    split = analysis if s.surface_split == "train" else test
    r = utils.loss_surface_2d(model, split.x, split.y, steps=s.surface_steps, span=s.surface_span,
                              seed=s.probe_seed, memory_budget=s.budget, shard=split.shard)
    examples = split.shard.examples if isinstance(split.shard, utils.DataShard) else split.size  # the whole split's
    return {"split": s.surface_split, "examples": examples, "alphas": r.alphas.tolist(),
            "betas": r.betas.tolist(), "losses": r.losses.tolist(), "accuracies": r.accuracies.tolist()}


# ----------------------------------------------------------------------------- stages of a pair of models
@stage(ConnectivitySettings)
def connectivity(s: ConnectivitySettings, *, model_a, model_b, train: Split, test: Split) -> dict:
    """Loss and accuracy along the straight line between two models, on train and test."""
    alphas = np.linspace(0.0, 1.0, s.interpolation_points).tolist()
    out = {"alphas": alphas}
    for split, data in (("train", train), ("test", test)):
        r = utils.linear_interpolation(model_a, model_b, data.x, data.y, alphas, memory_budget=s.budget)
        out[split] = {"losses": r.losses, "accuracies": r.accuracies, "barrier": r.barrier,
                      "endpoint_losses": list(r.endpoint_losses), "barriers": r.barriers}
    return out


@stage(ConnectivitySettings)
def aligned(s: ConnectivitySettings, *, model_a, model_b, train: Split, test: Split) -> dict:
    """Weight matching (Ainsworth et al. 2022), then the straight line to the aligned model."""
    matched = utils.weight_matching(model_a, model_b, seed=s.probe_seed)
    return {"sweeps": matched.sweeps, "max_output_change": utils.max_output_change(matched.model.eval(), model_b, test.x),
            "permutations": [p.tolist() for p in matched.permutations],
            **connectivity(s, model_a=model_a, model_b=matched.model, train=train, test=test)}


@stage(BezierSettings)
def bezier(s: BezierSettings, *, model_a, model_b, analysis: Split, test: Split) -> dict:
    """A trained quadratic Bézier curve (Garipov et al. 2018), evaluated on train and test with its barrier
    above the chord between its ends, and the loss on the plane through both models and the curve's middle."""
    curve = utils.bezier_curve(model_a, model_b, analysis.x, analysis.y, epochs=s.bezier_epochs, lr=s.bezier_lr,
                               seed=s.probe_seed, momentum=s.momentum, batch_size=s.batch_size,
                               points=s.interpolation_points, memory_budget=s.budget)
    ends = (utils.flat_parameters(model_a), curve.control, utils.flat_parameters(model_b))
    on_test = utils.bezier_losses(model_a, test.x, test.y, ends, curve.ts, memory_budget=s.budget)
    plane = utils.loss_plane(model_a, analysis.x, analysis.y, (ends[0], ends[2], ends[1]), steps=s.plane_steps,
                             memory_budget=s.budget)
    path = plane.coordinates(utils.bezier_points(*ends, curve.ts))
    return {"ts": curve.ts, "train_losses": curve.train_losses,
            "train": curve_record(curve.ts, curve.losses, curve.accuracies),
            "test": curve_record(curve.ts, on_test.losses.tolist(), on_test.accuracies.tolist()),
            "plane": {"xs": plane.xs.tolist(), "ys": plane.ys.tolist(), "losses": plane.losses.tolist(),
                      "points": plane.points.tolist(), "curve": path.tolist(), "split": "train"}}


# ----------------------------------------------------------------------------- results as metrics.json keeps them
def curve_record(ts: list[float], losses: list[float], accuracies: list[float]) -> dict:
    """A curve's losses and accuracies along t, and its barrier above the chord between its end losses."""
    return {"losses": losses, "accuracies": accuracies,
            "barrier": utils.barrier_height(ts, losses, losses[0], losses[-1])}


def eigen_record(eig: utils.EigenResult) -> dict:
    return {"eigenvalue": eig.eigenvalue, "iterations": eig.iterations, "converged": eig.converged,
            "residual": eig.residual, "method": eig.method}


def flatness_record(flat: utils.FlatnessResult) -> dict:
    return {"sigmas": flat.sigmas, "mean_increase": flat.mean_increase, "std_increase": flat.std_increase,
            "base_loss": flat.base_loss, "samples": flat.increases.shape[0], "increases": flat.increases.tolist()}


def worst_case_record(w: utils.WorstCaseResult) -> dict:
    return {"sharpness": w.sharpness, "rho": w.rho, "adaptive": w.adaptive, "increases": w.increases}


# ----------------------------------------------------------------------------- which stages a run has
MODEL_STAGES = (evaluate, sharpness, spectrum, trace, layers, flatness, adaptive_flatness, worst_case, pac_bayes,
                gradient_noise, stationary, local_entropy)
EXACT_STAGES = (exact,)  # in exact mode: --exact, or automatic at most --exact-max-parameters parameters
PAIR_STAGES = (connectivity, aligned, bezier)  # between the pair of models; aligned needs an MLP
CENTRE_STAGES = (reparametrisation, surface)  # on the centre model; reparametrisation needs an MLP
NEEDS_AN_MLP = {"aligned", "reparametrisation"}  # hidden-unit permutations and ReLU rescaling
# The stages whose measurements add up over slices of the data (landscape.distributed): under --shard-data every
# rank computes them together on its slice; the others (and training) run on rank 0 with all the data.
SHARDED_STAGES = (sharpness, spectrum, trace, layers, flatness, adaptive_flatness, surface)
# The stages that evaluate many parameter points: under --shard-points every rank evaluates its share of them.
POINT_STAGES = (flatness, adaptive_flatness, surface)


def seed_pairs(seeds) -> list[tuple[int, int]]:
    """The disjoint pairs of seeds whose models' connectivity is measured: the first and second, the third and
    fourth, ... (an odd last seed has no partner)."""
    return list(zip(seeds[0::2], seeds[1::2]))


def pair_and_centre(seeds) -> tuple[tuple[int, int], int]:
    """The rule the default run follows: its pair is the first of `seed_pairs` (the first two seeds), and the first
    seed's model is the centre of the surface and of the rescaling experiment."""
    return seed_pairs(seeds)[0], seeds[0]


def exact_mode(cfg, model: torch.nn.Module) -> bool:
    """Whether the dense-Hessian stage runs: --exact, or a model of at most --exact-max-parameters parameters."""
    return cfg.exact or sum(p.numel() for p in model.parameters()) <= cfg.exact_max_parameters
