"""Training and evaluation on in-memory tensors, and the curvature tracked while training.

`train` runs mini-batch SGD (with heavy-ball momentum) over tensors already in
memory: no DataLoader, no per-sample transforms. Shuffling draws from a
`torch.Generator` seeded by the caller, so the same seed and the same initial
weights give bit-identical trained weights on the same machine. The budget is in
epochs or in optimiser steps; `StoppingRule` stops a run at a target training loss
(models compared at equal fit) or when it is stuck at chance. `SharpnessTracker`
is a training callback that measures λ_max, tr(H) and B_simple every few steps.
`EntropySGD` is Chaudhari et al. 2017's Entropy-SGD, which `train(optimizer="entropy-sgd")` runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.sgd import sgd
from tqdm.auto import tqdm

import utils

__all__ = ["EntropySGD", "EntropySGDSettings", "Evaluation", "SharpnessTracker", "StoppingRule", "TrainHistory",
           "TrainingDiverged", "evaluate", "sgd_step", "train"]


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite."""

    def __init__(self, seed: int, epoch: int, step: int, loss: float, lr: float) -> None:
        self.seed, self.epoch, self.step, self.loss = seed, epoch, step, loss
        super().__init__(
            f"training seed {seed} diverged at epoch {epoch}, step {step} (loss {loss}); "
            f"lower the learning rate (now {lr}, try {lr / 2:g})"
        )


@dataclass
class TrainHistory:
    """Per-step training losses (on the mini-batch, before the update) and per-epoch means."""

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    callback_seconds: float = 0.0
    reached_target: bool | None = None  # with a target loss: whether the training loss reached it
    outcome: str | None = None  # how the run ended: one of StoppingRule.OUTCOMES
    checks: list[tuple[int, float]] = field(default_factory=list)  # (step, cross-entropy over all of x) at each target check
    stepped_back: bool = False  # the step that crossed the target overshot it more than the step before fell short: undone


@dataclass
class Evaluation:
    """Mean cross-entropy and accuracy of a model over a data set."""

    loss: float
    accuracy: float


def sgd_step(params: list[torch.Tensor], buffers: list[torch.Tensor | None], *, lr: float, momentum: float,
             weight_decay: float = 0.0) -> None:
    """One step of `torch.optim.SGD` (heavy-ball momentum, no dampening, no Nesterov) on `params` from their `.grad`:
    the same functional `torch.optim.sgd.sgd` that `SGD.step` runs, so the update is bit-identical. `buffers` holds
    the momentum buffers (None before the first step) and is updated in place. Constructing `torch.optim.SGD`
    imports torch._dynamo on first use, 2.1 s of a 25 s run measured here; this does not. As in `SGD.step`, a
    parameter whose `.grad` is None is left alone."""
    live = [i for i, p in enumerate(params) if p.grad is not None]
    live_buffers = [buffers[i] for i in live]
    with torch.no_grad():
        sgd([params[i] for i in live], [params[i].grad for i in live], live_buffers, weight_decay=weight_decay,
            momentum=momentum, lr=lr, dampening=0.0, nesterov=False, maximize=False)
    for i, buffer in zip(live, live_buffers):
        buffers[i] = buffer


@dataclass
class StoppingRule:
    """When a run stops, decided at checks every `every` steps from its mini-batch losses (each taken before its
    update). Target: the mean of the last max(every, ⌈GATE_EXAMPLES/batch⌉) mini-batch losses estimates the
    training loss for free but noisily and late (it averages earlier, higher-loss weights); once it has been within
    TARGET_GATE× of the target, the exact cross-entropy over every training example (`evaluate`, eval mode) is
    computed at every check from then on and decides (the gate stays open: at lr 0.2 and batch 16 the average rose
    back above 2× after three exact checks at 0.16-0.23, and 53 steps later the first exact check found 0.082),
    and once that exact loss is within CLOSE× of the target it is computed
    after every step (near the target the full-data loss of a large step oscillates by ±10% from one step to the
    next: checked every 5 steps, lr 0.2 at batch 256 stopped at 0.085 for a target of 0.1). So a run stops at the
    first check whose exact loss is at most the target, within `every` steps of the crossing; there `train` keeps
    whichever of that step and the one before (checked too, when near) has the exact loss closer to the target,
    since one large step can jump from 5% above the target to 20% below it. Collapse: a run whose
    mean mini-batch loss over its last `collapse_steps` steps is still within CHANCE_MARGIN of chance (the loss of
    predicting the label frequencies, the labels' entropy: ln C for balanced classes), or above it, is stuck there:
    training from the usual initialisation leaves chance within a few dozen steps."""

    target_loss: float
    every: int
    collapse_steps: int
    chance_loss: float
    window: int  # mini-batch losses averaged by the gate
    checks: list[tuple[int, float]] = field(default_factory=list)
    near: bool = False  # the last exact check was within CLOSE× of the target: check after every step
    opened: bool = False  # the gate has opened: every check from now on computes the exact loss

    OUTCOMES = ("reached", "too slow", "collapsed", "fixed budget")
    TARGET_GATE, CLOSE, GATE_EXAMPLES, CHANCE_MARGIN = 3.0, 1.25, 512, 0.02

    @classmethod
    def for_labels(cls, y: torch.Tensor, *, target_loss: float, every: int, collapse_steps: int, batch_size: int
                   ) -> "StoppingRule":
        """The rule for training labels `y`: chance is their entropy, computed only when collapse is checked."""
        if every < 1 or collapse_steps < 0 or not target_loss >= 0:
            raise ValueError(f"check_every must be positive, collapse_steps and target_loss non-negative; got "
                             f"{every}, {collapse_steps} and {target_loss}")
        chance = math.nan
        if collapse_steps:
            p = torch.bincount(y.cpu()).double() / y.numel()
            chance = float(-(p[p > 0] * p[p > 0].log()).sum())
        window = max(every, math.ceil(cls.GATE_EXAMPLES / batch_size))
        return cls(target_loss, every, collapse_steps, chance, window)

    def due(self, step: int) -> bool:
        """Whether `step` is a check."""
        return step % self.every == 0 or self.near

    def decide(self, step_losses: list[float], full_loss: Callable[[], float], *, last: bool) -> str | None:
        """At a check: the outcome if the run stops here, else None. `full_loss()` is the exact training loss,
        called only when the gate is open (or near the target, or at the budget's last step)."""
        steps = len(step_losses)
        if self.collapse_steps and steps >= self.collapse_steps:
            mean = math.fsum(step_losses[-self.collapse_steps:]) / self.collapse_steps
            if mean >= (1 - self.CHANCE_MARGIN) * self.chance_loss:
                return "collapsed"
        if self.target_loss > 0:
            recent = step_losses[-self.window:]
            self.opened = self.opened or math.fsum(recent) / len(recent) <= self.TARGET_GATE * self.target_loss
            if last or self.near or self.opened:
                self.checks.append((steps, full_loss()))
                self.near = self.checks[-1][1] <= self.CLOSE * self.target_loss
                if self.checks[-1][1] <= self.target_loss:
                    return "reached"
        if last:
            return "too slow" if self.target_loss > 0 else "fixed budget"
        return None


@dataclass(frozen=True)
class EntropySGDSettings:
    """Entropy-SGD's hyper-parameters (Chaudhari et al. 2017, Algorithm 1; defaults: their MNIST recipe's L, η′, ε
    and the paper's α, with a constant scope)."""

    langevin_steps: int = 20  # L, inner Langevin steps per outer step
    scope: float = 0.03  # γ, the coupling to the current weights
    scoping: float = 0.0  # γ grows as γ·(1 + scoping)^t over outer steps t (Chaudhari et al.'s γ1)
    langevin_lr: float = 0.1  # η′
    noise: float = 1e-4  # ε: the inner step adds √η′·ε·N(0, I)
    averaging: float = 0.75  # α: μ ← (1 − α)μ + α·x′


class EntropySGD:
    """Entropy-SGD (Chaudhari et al. 2017, Algorithm 1) fed one mini-batch gradient at a time. With x the weights
    at the start of an outer step and x′ = μ = x, each inner step on a mini-batch gradient g(x′) takes
    x′ ← x′ − η′(g + γ(x′ − x)) + √η′·ε·N(0, I) and μ ← (1 − α)μ + α·x′; after L inner steps the weights go back
    to x and take one SGD step (`sgd_step`, so heavy-ball momentum and weight decay apply as for SGD) along
    γ(x − μ), the gradient of the negative local entropy; with momentum 0 that is Algorithm 1's x ← x − ηγ(x − μ).
    The noise draws from `generator`, apart from the batches' shuffling."""

    def __init__(self, settings: EntropySGDSettings, generator: torch.Generator) -> None:
        if settings.langevin_steps < 1 or settings.scope <= 0 or not 0 < settings.averaging <= 1:
            raise ValueError(f"Entropy-SGD needs langevin_steps >= 1, scope > 0 and 0 < averaging <= 1, got {settings}")
        self.settings, self.generator = settings, generator
        self.anchor: list[torch.Tensor] = []
        self.average: list[torch.Tensor] = []
        self.inner = 0
        self.outer = 0

    def step(self, params: list[torch.Tensor], buffers: list[torch.Tensor | None], *, lr: float, momentum: float,
             weight_decay: float = 0.0, last: bool = False) -> bool:
        """One inner step from the parameters' `.grad` (at x′); then, after the L-th (or when `last`), the outer
        step. Returns whether the weights x moved (an outer step was taken)."""
        s = self.settings
        gamma = s.scope * (1 + s.scoping) ** self.outer
        with torch.no_grad():
            if self.inner == 0:
                self.anchor = [p.detach().clone() for p in params]
                self.average = [p.detach().clone() for p in params]
            for p, x, mu in zip(params, self.anchor, self.average):
                drift = gamma * (p - x) if p.grad is None else p.grad + gamma * (p - x)
                p.sub_(drift, alpha=s.langevin_lr)
                if s.noise:
                    p.add_(torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device),
                           alpha=math.sqrt(s.langevin_lr) * s.noise)
                mu.mul_(1 - s.averaging).add_(p, alpha=s.averaging)
        self.inner += 1
        if self.inner < s.langevin_steps and not last:
            return False
        with torch.no_grad():
            for p, x, mu in zip(params, self.anchor, self.average):
                p.copy_(x)
                p.grad = gamma * (x - mu)
        sgd_step(params, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.inner, self.outer = 0, self.outer + 1
        return True


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 0,
    lr: float,
    momentum: float = 0.9,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[nn.Module, int], None] | None = None,
    callback_every: int = 0,
    desc: str = "train",
    target_loss: float = 0.0,
    max_steps: int = 0,
    check_every: int = 0,
    collapse_steps: int = 0,
    optimizer: str = "sgd",
    entropy_sgd: EntropySGDSettings | None = None,
    loss: str = "cross_entropy",
) -> TrainHistory:
    """Train `model` in place with SGD on cross-entropy for `epochs` epochs or `max_steps` optimiser steps (the
    budget; give one); `callback(model, step)` runs every `callback_every` steps. With `target_loss` > 0 it trains
    to that loss (models compared at equal fit, as in Jiang et al. 2020: the first checked step at most the target,
    or the step before it when that one's exact loss was closer, `stepped_back`) and with `collapse_steps` > 0 it stops a
    run stuck at chance: `StoppingRule` checks both every `check_every` steps (0: at epoch ends; after every step
    near the target); `outcome` says how the run ended ("reached", "too slow", "collapsed" or "fixed budget"; a
    divergence raises TrainingDiverged).
    optimizer="entropy-sgd" runs `EntropySGD` (settings `entropy_sgd`, default `EntropySGDSettings()`): each
    mini-batch is one inner Langevin step, an outer step every L batches and at the end of each epoch, so an epoch
    costs SGD's gradients; `steps`, `step_losses` and the callback then count outer steps, a step's loss being its
    last inner batch's (at the Langevin iterate), and the epoch losses are over the inner iterates.
    loss="mse" trains on `utils.squared_error_loss` (½‖f(x) − onehot(y)‖² summed over classes, mean over examples;
    Cohen et al. 2021) instead of cross-entropy; the stopping rule's target and chance are cross-entropies, so it
    refuses `target_loss` and `collapse_steps` then. Full-batch gradient descent is batch_size = N, momentum 0."""
    loss_fn = utils.loss_function(loss)
    if loss != "cross_entropy" and (target_loss > 0 or collapse_steps > 0):
        raise ValueError(f"target_loss and collapse_steps are cross-entropies: give neither with loss={loss!r}")
    if optimizer not in ("sgd", "entropy-sgd"):
        raise ValueError(f"optimizer must be 'sgd' or 'entropy-sgd', got {optimizer!r}")
    # its own stream, seed + 1, so that the batches are drawn as SGD draws them
    entropy = (EntropySGD(entropy_sgd or EntropySGDSettings(), torch.Generator().manual_seed(seed + 1))
               if optimizer == "entropy-sgd" else None)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    if (epochs > 0) == (max_steps > 0):
        raise ValueError(f"give the budget as epochs or as max_steps (one of them positive), got epochs={epochs} "
                         f"and max_steps={max_steps}")
    budget = max_steps or epochs * steps_per_epoch
    rule = StoppingRule.for_labels(y, target_loss=target_loss, every=check_every or steps_per_epoch,
                                   collapse_steps=collapse_steps, batch_size=batch_size)
    generator = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    buffers: list[torch.Tensor | None] = [None] * len(params)
    history = TrainHistory()
    before: tuple[float, list[torch.Tensor]] | None = None  # the last step's exact loss and weights, when checked
    model.train()
    start = time.perf_counter()
    with tqdm(total=budget, desc=desc, disable=not progress, leave=False) as bar:
        for epoch in range(math.ceil(budget / steps_per_epoch)):
            order = torch.randperm(n, generator=generator).to(x.device)  # drawn on the CPU: the same order on any device
            epoch_sum, seen = 0.0, 0
            for i in range(min(steps_per_epoch, budget - history.steps)):
                idx = order[i * batch_size : (i + 1) * batch_size]
                batch_loss = loss_fn(model(x[idx]), y[idx])
                value = batch_loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(seed, epoch + 1, history.steps + 1, value, lr)
                model.zero_grad(set_to_none=True)
                batch_loss.backward()
                if entropy is None:
                    sgd_step(params, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay)
                elif not entropy.step(params, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      last=i + 1 == steps_per_epoch):
                    epoch_sum += value * idx.numel()  # an inner step: the weights x have not moved
                    bar.update(1)
                    continue
                history.steps += 1
                history.step_losses.append(value)
                epoch_sum += value * idx.numel()
                seen += idx.numel()
                if callback is not None and callback_every and history.steps % callback_every == 0:
                    t0 = time.perf_counter()
                    callback(model, history.steps)
                    history.callback_seconds += time.perf_counter() - t0
                bar.update(1)
                if rule.due(history.steps) or history.steps == budget:
                    checked = len(rule.checks)
                    history.outcome = rule.decide(history.step_losses, lambda: evaluate(model, x, y).loss,
                                                  last=history.steps == budget)
                    if history.outcome == "reached" and before is not None and \
                            abs(before[0] - target_loss) < abs(rule.checks[-1][1] - target_loss):
                        with torch.no_grad():  # the step before was closer to the target: undo this one
                            for p, kept in zip(params, before[1]):
                                p.copy_(kept)
                        history.steps, history.stepped_back = history.steps - 1, True
                        history.step_losses.pop()
                        epoch_sum, seen = epoch_sum - value * idx.numel(), seen - idx.numel()
                    if history.outcome is not None:
                        break
                    # near the target every step is checked: keep this step's weights, in case the next overshoots
                    before = ((rule.checks[-1][1], [p.detach().clone() for p in params])
                              if rule.near and len(rule.checks) > checked else None)
            if seen:  # none when the epoch's one step was undone
                history.epoch_losses.append(epoch_sum / seen)
                bar.set_postfix(loss=f"{history.epoch_losses[-1]:.4f}")
            if history.outcome is not None:
                break
    history.checks = rule.checks
    history.reached_target = None if target_loss <= 0 else history.outcome == "reached"
    model.zero_grad(set_to_none=True)
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


@torch.no_grad()
def _finite(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether every parameter and the mean cross-entropy on (x, y) are finite."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters()) and math.isfinite(
        F.cross_entropy(model(x), y).item())


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 8192) -> Evaluation:
    """Mean cross-entropy and accuracy of `model` on (x, y), in chunks; the model's mode is left as it was."""
    was_training = model.training
    model.eval()
    try:
        loss_sum, correct = 0.0, 0
        for start in range(0, x.shape[0], batch_size):
            logits = model(x[start : start + batch_size])
            target = y[start : start + batch_size]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(dim=1) == target).sum().item()
    finally:
        model.train(was_training)
    return Evaluation(loss=loss_sum / x.shape[0], accuracy=correct / x.shape[0])


class SharpnessTracker:
    """Training callback: every few steps, λ_max (warm-started Lanczos), tr(H) (exact diagonal sum where it
    applies, else Hutchinson) and B_simple on the first `examples` training examples, and batch sharpness
    (Andreyev & Beneventano 2024: E_B[g_Bᵀ H_B g_B/‖g_B‖²] over mini-batches of the training batch size drawn
    from all training examples), compared with the stability thresholds 2/η and 2(1+β)/η (Cohen et al. 2021).
    Andreyev & Beneventano find that under mini-batch SGD batch sharpness, not λ_max, settles at the threshold.
    It leaves the model's parameters untouched."""

    # products of the first check (from a random start, at least FIRST_HVPS), trace probes per check, and
    # mini-batches for batch sharpness per check
    FIRST_HVPS, PROBES, BATCHES = 8, 2, 8

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, examples: int, batch_size: int, seed: int,
                 memory_budget: int, tol: float = 1e-2, max_iter: int = 30) -> None:
        """λ_max by Lanczos stopped at ‖Hv − λv‖ ≤ tol·|λ| or after max_iter products (the first check, from a
        random start, at least FIRST_HVPS); each later check starts from the last check's eigenvector, so it
        converges in a few products (4-11 at the defaults on the digits); each record says whether it did."""
        if tol <= 0 or max_iter < 1:
            raise ValueError(f"the tracker needs tol > 0 and max_iter >= 1, got {tol} and {max_iter}")
        self.x, self.y, self.seed, self.budget = x, y, seed, memory_budget
        self.tol, self.max_iter = tol, max_iter
        self.examples = min(examples, x.shape[0])
        self.batch_size = min(batch_size, x.shape[0])
        self.vector = None
        self.records: list[dict] = []
        self.seconds = 0.0

    @staticmethod
    def interval(steps: int, *, every: int = 0, checks: int = 21) -> int:
        """Steps between checks: `every` when given (-1: never, returned as 0); else the spacing
        steps // (checks − 1), which gives at least `checks` checks (at step 0, every k steps and the last step;
        all `steps` + 1 when there are fewer steps). A fixed count, not a share of the training time: the
        default run's training is a fraction of a second, so a time budget against it left 2 checks (issue 28);
        the count is deterministic, so a rerun tracks the same steps."""
        if every:
            return max(every, 0)
        if checks < 2:
            raise ValueError(f"the tracker needs at least 2 checks (the first and the last step), got {checks}")
        return max(1, steps // (checks - 1))

    def __call__(self, model: nn.Module, step: int) -> None:
        """One check at `step`, appended to `records`; none where the model has blown up (a non-finite parameter
        or loss on the tracked examples): the training loop names the divergence at its next step."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        x, y = self.x[: self.examples], self.y[: self.examples]
        try:
            if not _finite(model, x, y):
                return
            op = utils.hessian_operator(model, x, y, memory_budget=self.budget)
            eig = utils.top_hessian_eigenvalue(model, x, y, tol=self.tol, seed=self.seed, start=self.vector,
                                               max_iter=self.max_iter if self.vector is not None
                                               else max(self.FIRST_HVPS, self.max_iter), operator=op)
            trace = utils.hessian_trace(model, x, y, method="auto", rel_stderr=0.5, max_matvecs=self.PROBES,
                                        seed=self.seed + step, operator=op)
            noise = utils.gradient_noise_scale(model, x, y, b_noise=False, memory_budget=self.budget)
            batch = utils.batch_sharpness(model, self.x, self.y, batch_size=self.batch_size, batches=self.BATCHES,
                                          seed=self.seed + step, memory_budget=self.budget)
        finally:
            model.train(was_training)
        self.vector = eig.eigenvector
        self.records.append({"step": step, "lambda_max": eig.eigenvalue, "residual": eig.residual,
                             "tol": self.tol, "converged": bool(eig.converged), "products": eig.iterations,
                             "trace": trace.trace, "trace_method": trace.method, "b_simple": noise.b_simple,
                             "batch_sharpness": batch.value, "batch_sharpness_stderr": batch.stderr})
        self.seconds += time.perf_counter() - start
