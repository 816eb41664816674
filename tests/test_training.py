"""Training: bit-identical weights for a seed, different weights across seeds, the accuracy the README promises,
and the stopping rule of a run trained to a loss."""

import math

import numpy as np
import pytest
import torch
from helpers import tiny_data, tiny_mlp

import data
import main
from experiment.settings import TrainingSettings
from experiment.stages import build_model
import models
import training
import utils


@pytest.fixture(scope="module")
def fallback():
    return data.load_dataset("mnist", download=False)


def train_once(ds, seed, n=1000, epochs=1, lr=0.1):
    model = models.SmallMLP(generator=torch.Generator().manual_seed(seed))
    history = training.train(model, ds.x_train[:n], ds.y_train[:n], epochs=epochs, lr=lr, seed=seed)
    return model, history


def reference_sgd_training(model, x, y, *, epochs, lr, momentum, weight_decay, batch_size, seed):
    """The textbook loop with torch.optim.SGD, shuffling from the same seeded generator as `train`."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()


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
    model = build_model(TrainingSettings.of(cfg, seed=cfg.seeds[0]))
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


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.0), (0.5, 1e-3), (0.0, 1e-2)])
def test_train_takes_exactly_torch_optim_sgds_steps(fallback, momentum, weight_decay):
    """`train` steps through torch's functional SGD (without importing torch._dynamo): after two epochs with
    momentum and weight decay its weights equal, bit for bit, those of the same loop driven by torch.optim.SGD."""
    x, y = fallback.x_train[:600], fallback.y_train[:600]
    ours = models.SmallMLP(generator=torch.Generator().manual_seed(3))
    theirs = models.SmallMLP(generator=torch.Generator().manual_seed(3))
    settings = dict(epochs=2, lr=0.05, momentum=momentum, weight_decay=weight_decay, batch_size=100, seed=5)
    training.train(ours, x, y, **settings)
    reference_sgd_training(theirs, x, y, **settings)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_sgd_step_leaves_a_parameter_without_gradient_alone():
    """As torch.optim.SGD does, a parameter whose .grad is None keeps its value and gets no momentum buffer, while
    the others take the heavy-ball step: buffer = g on the first step, θ ← θ − lr·buffer."""
    used, unused = torch.ones(3, requires_grad=True), torch.ones(2, requires_grad=True)
    used.grad = torch.tensor([1.0, 2.0, 3.0])
    buffers = [None, None]
    training.sgd_step([used, unused], buffers, lr=0.5, momentum=0.9)
    assert torch.equal(used.detach(), torch.tensor([0.5, 0.0, -0.5])) and torch.equal(unused.detach(), torch.ones(2))
    assert torch.equal(buffers[0], torch.tensor([1.0, 2.0, 3.0])) and buffers[1] is None
    training.sgd_step([used, unused], buffers, lr=0.5, momentum=0.9)  # buffer = 0.9·g + g = 1.9·g
    assert torch.allclose(used.detach(), torch.tensor([0.5, 0.0, -0.5]) - 0.5 * 1.9 * used.grad)



def test_tracker_records_are_the_measurements_at_that_step_and_leave_the_model_alone():
    """A check records λ_max of the first `examples` examples, and batch sharpness over mini-batches of the
    training batch size from all examples, exactly as utils computes them at those weights; the parameters,
    their gradients and the training mode are left as they were."""
    x, y = tiny_data(4, n=300, d=6)
    model = tiny_mlp(4, widths=(6, 8, 3))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    tracker = training.SharpnessTracker(x, y, examples=64, batch_size=32, seed=3, memory_budget=1 << 28)
    tracker(model, 5)
    assert model.training and all(torch.equal(p, b) and p.grad is None for p, b in zip(model.parameters(), before))
    (record,) = tracker.records
    batch = utils.batch_sharpness(model, x, y, batch_size=32, batches=tracker.BATCHES, seed=3 + 5)
    assert record["batch_sharpness"] == batch.value and record["batch_sharpness_stderr"] == batch.stderr
    exact_top = float(torch.linalg.eigvalsh(utils.exact_hessian(model, x[:64], y[:64]))[-1])
    assert abs(record["lambda_max"] - exact_top) <= 2e-2 * exact_top + 1e-3  # the tracker's Lanczos tol is 1e-2


def test_tracker_interval_gives_the_asked_checks_and_honours_an_explicit_interval():
    """With no explicit interval the spacing is steps // (checks − 1): at least `checks` checks (step 0, every k
    steps, the last step) and not twice as many; -1 switches tracking off; fewer than 2 checks is refused."""
    for steps in (1, 10, 160, 400, 5000):
        for checks in (2, 21, 50):
            k = training.SharpnessTracker.interval(steps, checks=checks)
            made = 1 + steps // k + (steps % k != 0)
            assert made >= min(checks, steps + 1)
            assert made <= 2 * checks or k == 1
    assert training.SharpnessTracker.interval(160) == 8  # the default run: 160 steps, 21 checks
    assert training.SharpnessTracker.interval(400, every=7) == 7
    assert training.SharpnessTracker.interval(400, every=-1) == 0
    with pytest.raises(ValueError, match="at least 2 checks"):
        training.SharpnessTracker.interval(400, checks=1)


# ----------------------------------------------------------------------------- train to a loss, in steps (issue 25)
def teacher_data(n=256, d=6, classes=3, seed=0):
    """Inputs with labels from a random linear teacher: a tiny MLP fits them to any loss, slowly enough to watch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, (x @ torch.randn(d, classes, generator=g, dtype=torch.float64)).argmax(dim=1)


def test_train_to_loss_stops_at_the_first_check_after_the_exact_training_loss_crosses_the_target():
    """With the target checked every k = 5 steps (every step once the exact loss is within 1.25× of it), the run
    stops within k steps after the first step whose exact loss over all training examples (recorded after every
    step) is at most the target, and its last check's loss is that exact loss, at most the target and within 10%
    of it."""
    x, y = teacher_data()
    model = tiny_mlp(1, widths=(6, 16, 3))
    exact = {}
    history = training.train(model, x, y, max_steps=2000, lr=0.05, momentum=0.9, batch_size=32, seed=0,
                             target_loss=0.2, check_every=5,
                             callback=lambda m, step: exact.__setitem__(step, training.evaluate(m, x, y).loss),
                             callback_every=1)
    crossing = min(step for step, loss in exact.items() if loss <= 0.2)
    last = history.steps + history.stepped_back  # the last check (one past the kept step when it was undone)
    assert history.outcome == "reached" and history.reached_target
    assert last - 5 < crossing <= last
    assert history.checks[-1] == (last, exact[last])
    assert 0.9 * 0.2 <= history.checks[-1][1] <= 0.2
    assert all(loss > 0.2 for _, loss in history.checks[:-1])
    assert abs(training.evaluate(model, x, y).loss - 0.2) <= 0.1 * 0.2


@pytest.mark.parametrize("lr, seed, undone", [(0.3, 0, True), (0.5, 2, False)])
def test_the_run_keeps_whichever_step_of_the_crossing_pair_is_closer_to_the_target(lr, seed, undone):
    """Near the target every step is checked; when the crossing step's exact loss is farther below the target than
    the step before was above it, the run keeps the step before (its weights restored exactly), else the crossing
    step: equal fit. (lr 0.3, seed 0: 0.2014 before, 0.1984 after; lr 0.5, seed 2: 0.2085 before, 0.1992 after.)"""
    x, y = teacher_data()
    model = tiny_mlp(1, widths=(6, 16, 3))
    exact = {}
    history = training.train(model, x, y, max_steps=3000, lr=lr, momentum=0.0, batch_size=32, seed=seed,
                             target_loss=0.2, check_every=1,
                             callback=lambda m, step: exact.__setitem__(step, training.evaluate(m, x, y).loss),
                             callback_every=1)
    crossing = min(step for step, loss in exact.items() if loss <= 0.2)
    assert history.outcome == "reached" and history.stepped_back is undone
    assert history.checks[-2:] == [(crossing - 1, exact[crossing - 1]), (crossing, exact[crossing])]
    kept = crossing - 1 if undone else crossing
    assert history.steps == kept == len(history.step_losses)
    assert abs(exact[kept] - 0.2) <= abs(exact[crossing - 1 if kept == crossing else crossing] - 0.2)
    assert training.evaluate(model, x, y).loss == exact[kept]


def test_the_exact_loss_is_checked_at_every_check_once_the_gate_has_opened_even_when_the_noisy_average_rises():
    """The mini-batch average is noisy: once it has come within TARGET_GATE× of the target, every later check
    computes the exact loss (at lr 0.2, batch 16 the average rose back above the gate and the run overshot)."""
    y = torch.arange(10).repeat(10)
    rule = training.StoppingRule.for_labels(y, target_loss=0.1, every=1, collapse_steps=0, batch_size=512)
    gate = rule.TARGET_GATE * 0.1
    asked = []

    def exact(value):
        return lambda: asked.append(value) or value

    assert rule.decide([gate * 1.5], exact(0.5), last=False) is None and asked == []  # gate closed
    assert rule.decide([gate * 1.5, gate * 0.5], exact(0.2), last=False) is None and asked == [0.2]  # opens
    losses = [gate * 1.5, gate * 0.5, gate * 5.0]  # the window's mean is back above the gate
    assert rule.decide(losses, exact(0.3), last=False) is None and asked == [0.2, 0.3]
    assert rule.decide(losses + [gate * 5.0], exact(0.09), last=False) == "reached" and asked[-1] == 0.09


def test_a_run_that_misses_the_target_within_its_step_budget_is_too_slow():
    x, y = teacher_data()
    history = training.train(tiny_mlp(1, widths=(6, 16, 3)), x, y, max_steps=23, lr=0.05, batch_size=32,
                             target_loss=0.01, check_every=5)
    assert history.outcome == "too slow" and history.reached_target is False and history.steps == 23
    assert history.checks[-1][0] == 23 and history.checks[-1][1] > 0.01  # the last step is always checked


def test_a_budget_of_whole_epochs_in_steps_trains_bit_identically_and_a_partial_epoch_is_averaged_alone():
    x, y = teacher_data()
    a, b = tiny_mlp(2, widths=(6, 16, 3)), tiny_mlp(2, widths=(6, 16, 3))
    ha = training.train(a, x, y, epochs=2, lr=0.05, batch_size=32, seed=4)
    hb = training.train(b, x, y, max_steps=16, lr=0.05, batch_size=32, seed=4)  # 8 steps an epoch
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ha.step_losses == hb.step_losses and ha.epoch_losses == hb.epoch_losses
    assert ha.outcome == hb.outcome == "fixed budget" and ha.reached_target is None and ha.checks == []
    hc = training.train(tiny_mlp(2, widths=(6, 16, 3)), x, y, max_steps=11, lr=0.05, batch_size=32, seed=4)
    assert len(hc.epoch_losses) == 2 and hc.epoch_losses[1] == pytest.approx(sum(hc.step_losses[8:]) / 3)
    with pytest.raises(ValueError, match="epochs or as max_steps"):
        training.train(tiny_mlp(2, widths=(6, 16, 3)), x, y, epochs=1, max_steps=5, lr=0.05)


def test_collapse_detector_fires_on_a_run_forced_to_chance(fallback):
    """Every hidden ReLU dead (first-layer bias −1000): only the output bias can learn, so the loss can only fall to
    the labels' entropy (chance): after collapse_steps = 50 steps the run stops as "collapsed", at the first check."""
    x, y = fallback.x_train[:512], fallback.y_train[:512]
    model = models.SmallMLP(hidden=(32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.fc1.bias.fill_(-1000.0)
    history = training.train(model, x, y, max_steps=1000, lr=0.1, batch_size=64, seed=0, collapse_steps=50,
                             check_every=10)
    p = torch.bincount(y).double() / len(y)
    chance = float(-(p * p.log()).sum())
    assert history.outcome == "collapsed" and history.steps == 50
    assert min(history.step_losses) >= (1 - training.StoppingRule.CHANCE_MARGIN) * chance


def test_collapse_detector_leaves_a_slow_healthy_run_alone(fallback):
    """On 1,024 digits, lr 0.01 without momentum at batch 256 leaves chance slowly (its first 20 steps average
    2.28, within 1% of ln 10) but does leave it: over 300 steps, checked every 10, it is never called collapsed.
    (A learning rate too large also collapses runs, lr 0.2 with momentum 0.9 at batch 64 here, but where such a run
    ends depends on the float rounding of the thread count, so the forced case above is the dead network.)"""
    x, y = fallback.x_train[:1024], fallback.y_train[:1024]
    slow = models.SmallMLP(hidden=(32, 32), generator=torch.Generator().manual_seed(0))
    history = training.train(slow, x, y, max_steps=300, lr=0.01, momentum=0.0, batch_size=256, seed=0,
                             collapse_steps=100, check_every=10)
    assert history.outcome == "fixed budget" and history.steps == 300
    assert sum(history.step_losses[:20]) / 20 >= 0.99 * math.log(10)


def test_warm_started_tracker_agrees_with_a_cold_lanczos_run_at_every_check():
    """With tol=1e-8 each check's λ_max, warm-started from the last eigenvector, is converged (residual at most
    tol·|λ|, both recorded) and equals a cold Lanczos run from the gradient on the same weights within 2·tol."""
    x, y = tiny_data(5, n=240, d=6)
    model = tiny_mlp(5, widths=(6, 8, 3))
    tracker = training.SharpnessTracker(x, y, examples=64, batch_size=32, seed=1, memory_budget=1 << 28, tol=1e-8,
                                        max_iter=60)
    cold = {}

    def callback(m, step):
        tracker(m, step)
        cold[step] = utils.top_hessian_eigenvalue(m, x[:64], y[:64], tol=1e-10, max_iter=200).eigenvalue

    steps = 2 * 8
    every = tracker.interval(steps, checks=20)
    callback(model, 0)
    training.train(model, x, y, epochs=2, lr=0.5, momentum=0.0, batch_size=32, seed=2, callback=callback,
                   callback_every=every)
    assert len(tracker.records) == steps + 1 and every == 1
    for record in tracker.records:
        assert record["tol"] == 1e-8 and record["converged"] is True  # a JSON-ready bool, not numpy's
        assert record["residual"] <= 1e-8 * abs(record["lambda_max"])
        assert abs(record["lambda_max"] - cold[record["step"]]) <= 2e-8 * abs(cold[record["step"]])
    assert max(r["products"] for r in tracker.records[1:]) < tracker.records[0]["products"] + 10


def test_tracker_records_nothing_for_a_blown_up_model_and_leaves_the_divergence_to_training():
    """A check between a blow-up and the training loop's next step (which raises TrainingDiverged) must not fail
    inside the eigensolver on NaN products."""
    x, y = tiny_data(5, n=64, d=6)
    model = tiny_mlp(5, widths=(6, 8, 3))
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.inf
    tracker = training.SharpnessTracker(x, y, examples=32, batch_size=16, seed=0, memory_budget=1 << 28)
    tracker(model, 3)
    assert tracker.records == [] and model.training


def test_tracker_refuses_a_tolerance_or_budget_it_cannot_stop_on():
    x, y = torch.zeros(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="tol > 0"):
        training.SharpnessTracker(x, y, examples=8, batch_size=8, seed=0, memory_budget=1 << 20, tol=0.0)
    with pytest.raises(ValueError, match="max_iter >= 1"):
        training.SharpnessTracker(x, y, examples=8, batch_size=8, seed=0, memory_budget=1 << 20, max_iter=0)


def entropy_sgd_closed_form(a, x_star, x, *, gamma, inner_lr, steps, alpha, lr):
    """Algorithm 1 on f = ½(x′ − x*)ᵀA(x′ − x*) with ε = 0, by matrix powers: x′_l − c = M^l (x − c) with
    M = I − η′(A + γI), c = (A + γI)⁻¹(A x* + γx); μ_L = (1−α)^L x + Σ_l α(1−α)^(L−l) x′_l; x − ηγ(x − μ_L)."""
    k = len(x)
    m = np.eye(k) - inner_lr * (a + gamma * np.eye(k))
    c = np.linalg.solve(a + gamma * np.eye(k), a @ x_star + gamma * x)
    mu = (1 - alpha) ** steps * x
    for ell in range(1, steps + 1):
        mu = mu + alpha * (1 - alpha) ** (steps - ell) * (c + np.linalg.matrix_power(m, ell) @ (x - c))
    return x - lr * gamma * (x - mu)


def run_entropy_sgd_outer_step(a, x_star, x, settings, *, lr, seed=0):
    p = torch.tensor(x, dtype=torch.float64)
    a_t, star = torch.as_tensor(a), torch.as_tensor(x_star)
    optimizer = training.EntropySGD(settings, torch.Generator().manual_seed(seed))
    buffers = [None]
    for inner in range(settings.langevin_steps):
        p.grad = a_t @ (p.detach() - star)
        moved = optimizer.step([p], buffers, lr=lr, momentum=0.0)
        assert moved == (inner + 1 == settings.langevin_steps)
    return p.detach().numpy()


def test_entropy_sgd_step_equals_its_closed_form_when_the_inner_loop_is_deterministic():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    a = (q * [0.2, 0.5, 1.0, 3.0]) @ q.T
    x_star, x = rng.standard_normal(4), rng.standard_normal(4)
    settings = training.EntropySGDSettings(langevin_steps=7, scope=0.4, langevin_lr=0.2, noise=0.0, averaging=0.6)
    got = run_entropy_sgd_outer_step(a, x_star, x, settings, lr=0.9)
    expected = entropy_sgd_closed_form(a, x_star, x, gamma=0.4, inner_lr=0.2, steps=7, alpha=0.6, lr=0.9)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)
    assert np.linalg.norm(got - x_star) < np.linalg.norm(x - x_star)


def test_entropy_sgd_with_langevin_noise_moves_towards_the_minimum():
    a, x_star = np.diag([0.3, 1.0, 2.0]), np.array([1.0, -1.0, 0.5])
    x = np.zeros(3)
    settings = training.EntropySGDSettings(langevin_steps=10, scope=1.0, langevin_lr=0.1, noise=0.05)
    for t in range(30):
        x = run_entropy_sgd_outer_step(a, x_star, x, settings, lr=1.0, seed=t)
    assert np.linalg.norm(x - x_star) < 0.1 * np.linalg.norm(x_star)


def test_train_with_entropy_sgd_takes_one_outer_step_per_l_batches_and_is_reproducible():
    x, y = tiny_data(6, n=200, d=6)
    settings = training.EntropySGDSettings(langevin_steps=3, scope=1.0, langevin_lr=0.2)
    runs = []
    for _ in range(2):
        model = tiny_mlp(6, widths=(6, 8, 3))
        before = training.evaluate(model, x, y).loss
        history = training.train(model, x, y, epochs=4, lr=0.5, momentum=0.0, batch_size=20, seed=3,
                                 optimizer="entropy-sgd", entropy_sgd=settings)
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert history.steps == 4 * 4 and len(history.step_losses) == 16  # 10 batches an epoch: 3 + 3 + 3 + 1
    assert torch.equal(runs[0], runs[1]) and training.evaluate(model, x, y).loss < before
    with pytest.raises(ValueError, match="optimizer"):
        training.train(model, x, y, epochs=1, lr=0.1, optimizer="adam")
