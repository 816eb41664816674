"""The stages (experiment/stages.py) as pure functions of their settings and inputs."""

import pytest

import main
import utils
from experiment import pipeline
from experiment.settings import ReparametrisationSettings, TrainingSettings
from experiment.stages import (adaptive_flatness, build_model, curve_record, flatness, pair_and_centre,
                               reparametrisation, settings_of, sharpness, train_model, worst_case)
from landscape.store import stage_inputs


def test_a_curves_barrier_is_its_peak_above_the_chord_between_its_ends():
    """Loss (1, 3, 2) at t = (0, .5, 1): the chord is 1.5 at the middle, so the barrier is 1.5."""
    assert curve_record([0.0, 0.5, 1.0], [1.0, 3.0, 2.0], [1.0, 1.0, 1.0])["barrier"] == 1.5


def test_the_pair_is_the_first_two_seeds_and_the_centre_the_first():
    assert pair_and_centre((7, 3, 5)) == ((7, 3), 7)


def test_each_stage_reads_the_settings_its_mark_names():
    cfg = main.Config(sharpness_tol=3e-3)
    assert settings_of(sharpness, cfg).sharpness_tol == 3e-3
    assert type(settings_of(reparametrisation, cfg)) is ReparametrisationSettings
    assert settings_of(flatness, cfg) == settings_of(adaptive_flatness, cfg)


@pytest.mark.slow
def test_the_alpha_one_rescaling_row_equals_the_measures_computed_afresh(tmp_path):
    """The α = 1 row of the rescaling experiment is taken from the seed's own measurements when they used the
    same data and solver; it must equal computing every measure on the model afresh, as the other rows are."""
    cfg = main.Config(**{**main.QUICK, "train_subset": 300, "test_subset": 100, "offline": True, "quiet": True,
                         "runs_dir": str(tmp_path / "runs"), "out": str(tmp_path / "out")})
    inputs = {name: value.value for name, value in pipeline.data_inputs(cfg, pipeline.load_data(cfg)).items()}
    training_settings = TrainingSettings.of(cfg, seed=0)
    model = build_model(training_settings)
    train_model(training_settings, model, train=inputs["train"])
    model.eval()
    measured = {stage.__name__: stage(settings_of(stage, cfg), model=model,
                                      **{name: inputs[name] for name in stage_inputs(stage) if name != "model"})
                for stage in (sharpness, worst_case, flatness, adaptive_flatness)}
    row = reparametrisation(ReparametrisationSettings.of(cfg), model=model, **inputs, **measured)["rows"][0]
    x, y = inputs["analysis"].x, inputs["analysis"].y
    assert row["alpha"] == 1.0 and x.shape[0] == 300
    sigma = max(cfg.flatness_sigmas)
    fresh = {
        "top_eigenvalue": utils.top_hessian_eigenvalue(model, x, y, tol=cfg.sharpness_tol, seed=cfg.probe_seed,
                                                       max_iter=cfg.sharpness_max_iter).eigenvalue,
        "worst_case_absolute": utils.worst_case_sharpness(model, x, y, rho=cfg.sharpness_rho,
                                                          steps=cfg.worst_case_steps, seed=cfg.probe_seed).sharpness,
        "worst_case_adaptive": utils.worst_case_sharpness(model, x, y, rho=cfg.adaptive_rho, adaptive=True,
                                                          steps=cfg.worst_case_steps, seed=cfg.probe_seed).sharpness,
        "filter_normalised": utils.perturbation_flatness(model, x, y, [sigma], samples=cfg.flatness_samples,
                                                         seed=cfg.probe_seed).mean_increase[0],
        "adaptive_average": utils.perturbation_flatness(model, x, y, [sigma], samples=cfg.flatness_samples,
                                                        seed=cfg.probe_seed, adaptive=True).mean_increase[0],
    }
    for name, value in fresh.items():
        assert row[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
