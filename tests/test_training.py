"""Training: bit-identical weights for a seed, different weights across seeds, the accuracy the README promises."""

import pytest
import torch

import data
import main
import models
import training


@pytest.fixture(scope="module")
def fallback():
    return data.load_dataset("mnist", download=False)


def train_once(ds, seed, n=1000, epochs=1, lr=0.1):
    model = models.SmallMLP(generator=torch.Generator().manual_seed(seed))
    history = training.train(model, ds.x_train[:n], ds.y_train[:n], epochs=epochs, lr=lr, seed=seed)
    return model, history


def test_same_seed_gives_bit_identical_weights(fallback):
    a, ha = train_once(fallback, 0)
    b, hb = train_once(fallback, 0)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert ha.step_losses == hb.step_losses


def test_seeds_0_and_42_give_different_weights(fallback):
    a, _ = train_once(fallback, 0)
    b, _ = train_once(fallback, 42)
    assert not torch.equal(a.fc1.weight, b.fc1.weight)


def test_initialisation_matches_pytorch_default_distribution():
    """Kaiming-uniform(a=√5) gives U(−1/√fan_in, 1/√fan_in) for weights and biases alike."""
    model = models.SmallMLP(generator=torch.Generator().manual_seed(0))
    bound = 1 / 784 ** 0.5
    assert model.fc1.weight.abs().max() <= bound and model.fc1.weight.abs().max() > 0.95 * bound
    assert model.fc1.bias.abs().max() <= bound


def test_default_settings_reach_90_percent_on_the_offline_fallback(fallback):
    cfg = main.Config()
    model = main.build_model(cfg, cfg.seeds[0])
    training.train(model, fallback.x_train, fallback.y_train, epochs=cfg.epochs, lr=cfg.lr, momentum=cfg.momentum,
                   batch_size=cfg.batch_size, seed=cfg.seeds[0])
    assert training.evaluate(model, fallback.x_test, fallback.y_test).accuracy >= 0.90


def test_divergence_names_seed_epoch_and_step(fallback):
    with pytest.raises(training.TrainingDiverged) as info:
        train_once(fallback, 7, n=512, lr=1e6)
    err = info.value
    assert err.seed == 7 and err.epoch == 1 and err.step >= 1
    assert "lower the learning rate" in str(err)


def test_evaluate_restores_the_training_mode(fallback):
    model = models.SmallMLP()
    model.train()
    result = training.evaluate(model, fallback.x_test[:50], fallback.y_test[:50])
    assert model.training and 0 <= result.accuracy <= 1


def test_cnn_trains_and_evaluates(fallback):
    model = models.SmallCNN(generator=torch.Generator().manual_seed(0))
    training.train(model, fallback.x_train[:256], fallback.y_train[:256], epochs=1, lr=0.05, seed=0)
    assert training.evaluate(model, fallback.x_test[:64], fallback.y_test[:64]).loss < 2.31
