"""Stage settings: what each stage may read of the configuration, a frozen slice of main.py's `Config` (the
same field names). A stage's settings are part of its key in the stage store, so a stage reruns when, and only
when, one of its own settings changes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from experiment.environment import device_of


@dataclass(frozen=True)
class Settings:
    """The base of every stage's settings."""

    @classmethod
    def of(cls, cfg, **given):
        """These settings of `cfg`; `given` supplies fields that are not Config's (a model's seed)."""
        return cls(**{f.name: given[f.name] if f.name in given else getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def budget(self) -> int:
        """The memory budget in bytes."""
        return self.memory_budget_mb << 20


@dataclass(frozen=True)
class NoSettings(Settings):
    """A stage that reads no setting."""


@dataclass(frozen=True)
class TrainingSettings(Settings):
    """How one model is built and trained (`build_model`, `train_model`)."""

    model: str
    hidden: tuple[int, ...]
    epochs: int
    max_steps: int
    train_to_loss: float
    check_every: int
    collapse_steps: int
    lr: float
    momentum: float
    batch_size: int
    weight_decay: float
    track_every: int
    track_checks: int
    track_examples: int
    track_tol: float
    track_max_iter: int
    optimizer: str
    probe_seed: int
    memory_budget_mb: int
    seed: int
    device: str  # "cpu" or "cuda": --device resolved, so that auto and the device it picks train the same model

    @classmethod
    def of(cls, cfg, **given):
        """As Settings.of, with --device resolved."""
        return super().of(cfg, **{"device": device_of(cfg.device), **given})


@dataclass(frozen=True)
class SharpnessSettings(Settings):
    sharpness_method: str
    sharpness_tol: float
    sharpness_max_iter: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class SpectrumSettings(Settings):
    eigen_k: int
    eigen_tol: float
    density_runs: int
    density_steps: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class TraceSettings(Settings):
    trace_method: str
    trace_rel_stderr: float
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class LayersSettings(Settings):
    layer_tol: float
    layer_rel_stderr: float
    layer_max_probes: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class FlatnessSettings(Settings):
    """For `flatness` and `adaptive_flatness`."""

    flatness_sigmas: tuple[float, ...]
    flatness_samples: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class WorstCaseSettings(Settings):
    sharpness_rho: float
    adaptive_rho: float
    worst_case_steps: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class PacBayesSettings(Settings):
    pac_bayes_target: float
    pac_bayes_samples: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class NoiseSettings(Settings):
    """For `gradient_noise`: the training recipe enters the noise temperature."""

    noise_rel_stderr: float
    two_batch: tuple[int, ...]
    two_batch_batches: int
    lr: float
    batch_size: int
    momentum: float
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class ConnectivitySettings(Settings):
    """For `connectivity` and `aligned`."""

    interpolation_points: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class BezierSettings(Settings):
    bezier_epochs: int
    bezier_lr: float
    batch_size: int
    momentum: float
    interpolation_points: int
    plane_steps: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class ReparametrisationSettings(Settings):
    rescale_alphas: tuple[float, ...]
    sharpness_method: str
    sharpness_tol: float
    sharpness_max_iter: int
    sharpness_rho: float
    adaptive_rho: float
    worst_case_steps: int
    flatness_sigmas: tuple[float, ...]
    flatness_samples: int
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class SurfaceSettings(Settings):
    surface_steps: int
    surface_span: float
    surface_split: str
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class StationarySettings(Settings):
    """For `stationary`: the model's own training recipe, continued."""

    lr: float
    batch_size: int
    momentum: float
    stationary_steps: int
    stationary_burn_in: int
    stationary_directions: tuple[int, ...]
    eigen_tol: float
    probe_seed: int
    memory_budget_mb: int


@dataclass(frozen=True)
class LocalEntropySettings(Settings):
    entropy_scopes: tuple[float, ...]
    entropy_chains: int
    probe_seed: int
    memory_budget_mb: int
