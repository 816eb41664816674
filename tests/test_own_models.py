"""Your own model, for real: tied weights, frozen parameters, a chosen subset, BatchNorm CNNs and a tiny
transformer get the dense float64 answer or one clear refusal, and no measurement changes the model."""

import copy
import io
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import utils
from landscape.plumbing import mlp_layers, select_parameters

torch.set_num_threads(min(2, torch.get_num_threads()))


# ----------------------------------------------------------------------------- models


class TiedLinears(nn.Module):
    """Two distinct Linear modules sharing one weight (decoder.weight is encoder.weight), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder, self.decoder, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.decoder.weight = self.encoder.weight

    def forward(self, x):
        return self.head(torch.tanh(self.decoder(torch.tanh(self.encoder(x)))))


def randomized(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BatchNorm running statistic drawn from `seed`, float64, eval mode."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))
    return model.eval()


def tied_sequential() -> nn.Sequential:
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 3))


def frozen_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    return model


def bn_cnn(activation) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), activation(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))


class TinyLanguageModel(nn.Module):
    """An embedding, one encoder layer (self-attention through scaled_dot_product_attention) and a readout."""

    def __init__(self, vocabulary: int = 5, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.encoder = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.readout = nn.Linear(width, vocabulary)

    def forward(self, tokens):
        return self.readout(self.encoder(self.embed(tokens)))  # (N, L, V)


def token_loss(outputs, targets):
    """Next-token cross-entropy over every position: outputs (N, L, V), targets (N, L)."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def classification_data(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def image_data(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def token_data(seed: int, n: int = 3, length: int = 4, vocabulary: int = 5):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocabulary, (n, length + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


# name -> (model, x, y, loss_fn, params)
CASES = {
    "tied_module": lambda: (randomized(TiedLinears(), 1), *classification_data(1), None, None),
    "tied_sequential": lambda: (randomized(tied_sequential(), 2), *classification_data(2), None, None),
    "frozen": lambda: (randomized(frozen_mlp(), 3), *classification_data(3), None, None),
    "subset": lambda: (randomized(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), 4),
                       *classification_data(4), None, ["2.weight", "2.bias"]),
    "tanh_bn_cnn": lambda: (randomized(bn_cnn(nn.Tanh), 5), *image_data(5), None, None),
    "relu_bn_cnn": lambda: (randomized(bn_cnn(nn.ReLU), 6), *image_data(6), None, None),
    "transformer": lambda: (randomized(TinyLanguageModel(), 7), *token_data(7), token_loss, None),
}


# ----------------------------------------------------------------------------- the dense reference


def reference_names(model: nn.Module, params) -> list[str]:
    """The parameters a measurement should see, written out independently of the library."""
    if params is not None:
        return list(params)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def reference_loss(model, names, x, y, loss_fn):
    """θ -> mean loss over the named parameters, through functional_call with torch's own weight tying on a
    private copy (that call leaves a tied Sequential's weight a plain tensor, so never on the model itself)."""
    private = copy.deepcopy(model)
    shapes = dict(private.named_parameters())
    loss_fn = loss_fn or F.cross_entropy

    def loss(theta):
        values, offset = {}, 0
        for name in names:
            n = shapes[name].numel()
            values[name] = theta[offset : offset + n].view(shapes[name].shape)
            offset += n
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return loss_fn(functional_call(private, values, (x,)), y)

    theta = torch.cat([shapes[name].detach().reshape(-1) for name in names])
    return loss, theta


def dense_reference(model, x, y, loss_fn, params) -> np.ndarray:
    """The dense Hessian by torch.autograd.functional.hessian (plain double backward). Not torch.func.hessian:
    under its transforms nn.TransformerEncoderLayer takes its fused inference path, and the LayerNorm blocks come
    out wrong (0.12 off central finite differences of the gradient, where this is 1e-11 off;
    test_transformer_reference_hessian_matches_finite_differences)."""
    names = reference_names(model, params)
    loss, theta = reference_loss(model, names, x, y, loss_fn)
    h = torch.autograd.functional.hessian(loss, theta).detach().numpy()
    return (h + h.T) / 2


def dense_blocks(model, x, y, loss_fn, params) -> tuple[list[str], list[np.ndarray]]:
    """The measured parameters' names and the diagonal blocks of the reference Hessian, one per parameter."""
    names = reference_names(model, params)
    dense = dense_reference(model, x, y, loss_fn, params)
    shapes = dict(model.named_parameters())
    offsets = np.cumsum([0] + [shapes[n].numel() for n in names])
    return names, [dense[a:b, a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def assert_layers_match_blocks(layers, names, blocks) -> None:
    assert [layer.name for layer in layers] == names
    for layer, block in zip(layers, blocks):
        assert layer.top_eigenvalue == pytest.approx(np.linalg.eigvalsh(block)[-1], rel=1e-7, abs=1e-9)
        if layer.trace_stderr == 0:
            assert layer.trace == pytest.approx(np.trace(block), rel=1e-9, abs=1e-11)


# ----------------------------------------------------------------------------- right answers


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_hessian_equals_the_autograd_dense_hessian_over_the_measured_parameters(case):
    model, x, y, loss_fn, params = CASES[case]()
    dense = dense_reference(model, x, y, loss_fn, params)
    ours = utils.exact_hessian(model, x, y, loss_fn=loss_fn, params=params).numpy()
    np.testing.assert_allclose(ours, dense, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", sorted(CASES))
def test_top_eigenvalue_equals_the_dense_largest_eigenvalue(case):
    model, x, y, loss_fn, params = CASES[case]()
    truth = np.linalg.eigvalsh(dense_reference(model, x, y, loss_fn, params))[-1]
    result = utils.top_hessian_eigenvalue(model, x, y, loss_fn=loss_fn, params=params, tol=1e-10, max_iter=200)
    assert result.converged
    assert result.eigenvalue == pytest.approx(truth, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layer_curvature_names_and_blocks_follow_named_parameters(case):
    model, x, y, loss_fn, params = CASES[case]()
    layers = utils.layer_curvature(model, x, y, loss_fn=loss_fn, params=params, tol=1e-10, max_iter=200)
    assert_layers_match_blocks(layers, *dense_blocks(model, x, y, loss_fn, params))


def test_transformer_reference_hessian_matches_finite_differences():
    """Central differences of the plain-autograd gradient, step h = 1e-5: error O(h²·‖∇³L‖) plus rounding
    O(eps·‖∇L‖/h), both below 1e-8 here; every column of the reference within 1e-7."""
    model, x, y, loss_fn, params = CASES["transformer"]()
    loss, theta = reference_loss(model, reference_names(model, params), x, y, loss_fn)
    dense = dense_reference(model, x, y, loss_fn, params)

    def gradient(point):
        point = point.clone().requires_grad_(True)
        return torch.autograd.grad(loss(point), point)[0]

    h = 1e-5
    for i in range(0, theta.numel(), 7):
        step = torch.zeros_like(theta)
        step[i] = h
        column = ((gradient(theta + step) - gradient(theta - step)) / (2 * h)).numpy()
        np.testing.assert_allclose(dense[:, i], column, atol=1e-7)


def test_tied_sequential_takes_the_general_path_and_frozen_layers_are_left_out():
    tied, x, y, _, _ = CASES["tied_sequential"]()
    assert mlp_layers(tied) is None
    frozen, *_ = CASES["frozen"]()
    assert select_parameters(frozen).names == ("0.bias", "2.weight", "2.bias")
    assert not select_parameters(frozen).whole  # so the MLP fast path is not taken


def test_tied_weight_is_measured_once_and_every_use_moves_with_it():
    model, x, y, _, _ = CASES["tied_module"]()
    assert select_parameters(model).names == ("encoder.weight", "encoder.bias", "decoder.bias", "head.weight",
                                              "head.bias")
    assert select_parameters(model).slots["encoder.weight"] == ("encoder.weight", "decoder.weight")


def test_a_repeated_activation_object_is_not_a_plain_mlp():
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(4, 4), act, nn.Linear(4, 4), act, nn.Linear(4, 3))
    assert mlp_layers(model) is None


def test_params_accepts_the_parameter_tensors_themselves():
    model, x, y, _, _ = CASES["subset"]()
    by_name = utils.exact_hessian(model, x, y, params=["2.weight", "2.bias"])
    by_tensor = utils.exact_hessian(model, x, y, params=[model[2].bias, model[2].weight])
    assert torch.equal(by_name, by_tensor)


def test_transformer_curvature_works_in_float32_under_the_callers_default_kernel():
    model, x, y, loss_fn, _ = CASES["transformer"]()
    model = model.float()
    before = torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    result = utils.top_hessian_eigenvalue(model, x, y, loss_fn=loss_fn, max_iter=5)
    assert math.isfinite(result.eigenvalue)
    assert (torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_transformer_flatness_base_loss_is_the_loss():
    model, x, y, loss_fn, _ = CASES["transformer"]()
    loss, theta = reference_loss(model, reference_names(model, None), x, y, loss_fn)
    result = utils.perturbation_flatness(model, x, y, [0.1], samples=2, loss_fn=loss_fn)
    assert result.base_loss == pytest.approx(float(loss(theta)), rel=1e-12)


# ----------------------------------------------------------------------------- refusals


def refusal(call) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_refuses_a_model_without_parameters():
    message = refusal(lambda: utils.top_hessian_eigenvalue(nn.Flatten(), *classification_data(0)))
    assert "has no parameters" in message


def test_refuses_a_model_whose_parameters_are_all_frozen():
    model = nn.Linear(4, 3).double().requires_grad_(False)
    for call in (lambda: utils.top_hessian_eigenvalue(model, *classification_data(0)),
                 lambda: utils.pac_bayes_flatness(model, *classification_data(0)),
                 lambda: utils.loss_surface_2d(model, *classification_data(0), steps=3)):
        assert "none of the model's parameters is trainable" in refusal(call)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_refuses_non_finite_inputs(bad):
    model = nn.Linear(4, 3).double()
    x, y = classification_data(0)
    x[3, 1] = bad
    for call in (lambda: utils.top_hessian_eigenvalue(model, x, y), lambda: utils.batch_sharpness(model, x, y, batch_size=4),
                 lambda: utils.hessian_trace(model, x, y), lambda: utils.perturbation_flatness(model, x, y, [0.1])):
        assert "x holds 1 NaN or infinite values" in refusal(call)


@pytest.mark.parametrize("label", [-3, 3])
def test_refuses_labels_outside_the_classes_for_cross_entropy(label):
    model = nn.Linear(4, 3).double()
    x, y = classification_data(0)
    y[0] = label
    for call in (lambda: utils.top_hessian_eigenvalue(model, x, y), lambda: utils.layer_curvature(model, x, y),
                 lambda: utils.gradient_noise_scale(model, x, y)):
        assert f"class labels must lie in [0, 3)" in refusal(call) and f"holds {label}" in refusal(call)


def test_refuses_a_loss_fn_that_returns_a_vector():
    model = nn.Linear(4, 3).double()
    x, y = classification_data(0)
    per_example = lambda out, t: F.cross_entropy(out, t, reduction="none")  # noqa: E731
    message = refusal(lambda: utils.top_hessian_eigenvalue(model, x, y, loss_fn=per_example))
    assert message.startswith("loss_fn returned (2,), not one number")


def test_refuses_params_that_are_not_parameters_of_the_model():
    model, x, y, _, _ = CASES["subset"]()
    assert "params names 9.weight, which is not a parameter" in refusal(
        lambda: utils.top_hessian_eigenvalue(model, x, y, params=["9.weight"]))
    assert "params is empty" in refusal(lambda: utils.top_hessian_eigenvalue(model, x, y, params=[]))


def test_pac_bayes_refuses_the_error_criterion_without_class_labels():
    model = nn.Linear(4, 1).double()
    x = classification_data(0)[0]
    y = torch.randn(10, 1, dtype=torch.float64)
    message = refusal(lambda: utils.pac_bayes_flatness(model, x, y, loss_fn=F.mse_loss))
    assert message.startswith("criterion='error' counts misclassified examples and needs class labels")


def test_pac_bayes_loss_criterion_finds_the_crossing_of_the_mean_loss_increase():
    model = nn.Linear(4, 1).double()
    x = classification_data(0)[0]
    y = torch.randn(10, 1, dtype=torch.float64)
    result = utils.pac_bayes_flatness(model, x, y, loss_fn=F.mse_loss, criterion="loss", max_loss_increase=0.05,
                                      samples=4, rounds=20)
    # the same draws at σ: the mean loss increase there is the target, to the bisection's precision
    theta = utils.flat_parameters(model)
    noise = torch.randn(4, theta.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float32).double()

    def increase(sigma):
        losses = [F.mse_loss(functional_call(model, dict(zip(["weight", "bias"],
                                                           (t[:4].view(1, 4), t[4:]))), (x,)), y)
                  for t in theta + sigma * noise]
        return float(torch.stack(losses).mean()) - float(F.mse_loss(model(x), y))

    assert result.criterion == "loss" and math.isnan(result.base_error)
    assert result.loss_increase == pytest.approx(increase(result.sigma), rel=1e-12)
    assert increase(result.sigma) <= 0.05 < increase(result.sigma * (2.0 / 1e-4) ** (2.0 ** -20) * 1.0001)


# ----------------------------------------------------------------------------- the model is left alone


def model_state(model: nn.Module):
    return ([(name, p, type(p), p.detach().clone(), p.requires_grad, None if p.grad is None else p.grad.clone())
             for name, p in model.named_parameters(remove_duplicate=False)],
            [(name, m.training) for name, m in model.named_modules(remove_duplicate=False)],
            [(name, b.clone()) for name, b in model.named_buffers()])


def assert_same_state(model: nn.Module, before) -> None:
    params, modes, buffers = model_state(model)
    assert len(params) == len(before[0])
    for (name, p, kind, value, rg, grad), (name0, p0, kind0, value0, rg0, grad0) in zip(params, before[0]):
        assert name == name0 and p is p0 and kind is kind0 is nn.Parameter, f"{name} is no longer the same Parameter"
        assert torch.equal(value, value0) and rg == rg0
        assert (grad is None and grad0 is None) or torch.equal(grad, grad0)
    assert modes == before[1]
    assert all(n == n0 and torch.equal(b, b0) for (n, b), (n0, b0) in zip(buffers, before[2]))


def every_public_measurement(model, x, y, loss_fn, params):
    """One small call of every public function that takes a model and data."""
    kw = dict(loss_fn=loss_fn, params=params)
    labels = not y.is_floating_point() and y.dim() == 1
    other = copy.deepcopy(model)
    theta = utils.flat_parameters(model, params)
    yield lambda: utils.hessian_operator(model, x, y, **kw).matmat(theta[None])
    yield lambda: utils.hessian_vector_product(model, x, y, theta, **kw)
    yield lambda: utils.top_hessian_eigenvalue(model, x, y, max_iter=5, **kw)
    yield lambda: utils.hessian_eigenpairs(model, x, y, k=2, max_iter=5, **kw)
    yield lambda: utils.hessian_spectrum(model, x, y, k=1, lanczos_steps=4, runs=2, max_iter=5, **kw)
    yield lambda: utils.hessian_spectral_density(model, x, y, lanczos_steps=4, runs=2, **kw)
    yield lambda: utils.hessian_trace(model, x, y, max_matvecs=10, **kw)
    yield lambda: utils.layer_curvature(model, x, y, max_iter=5, max_probes=10, **kw)
    yield lambda: utils.exact_hessian(model, x, y, **kw)
    yield lambda: utils.exact_curvature(model, x, y, **kw)
    yield lambda: utils.perturbation_flatness(model, x, y, [0.1], samples=2, **kw)
    yield lambda: utils.worst_case_sharpness(model, x, y, rho=0.1, steps=2, starts=1, **kw)
    yield lambda: utils.pac_bayes_flatness(model, x, y, samples=2, rounds=2, **kw, **(
        {} if labels else {"criterion": "loss", "max_loss_increase": 0.1}))
    yield lambda: utils.gradient_noise_scale(model, x, y, **kw)
    yield lambda: utils.per_example_gradient_norms_sq(model, x, y, **kw)
    yield lambda: utils.two_batch_noise_scale(model, x, y, b_small=1, b_big=2, batches=2, **kw)
    yield lambda: utils.batch_sharpness(model, x, y, batch_size=2, batches=2, **kw)
    yield lambda: utils.loss_surface_2d(model, x, y, steps=3, **kw)
    yield lambda: utils.loss_plane(model, x, y, (theta, 1.1 * theta, theta + 0.1), steps=3, **kw)
    yield lambda: utils.linear_interpolation(model, other, x, y, [0.5], refine=1, **kw)
    yield lambda: utils.bezier_curve(model, other, x, y, epochs=1, lr=0.01, points=3, batch_size=4, **kw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_public_measurement_changes_the_model(case):
    model, x, y, loss_fn, params = CASES[case]()
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 0.25)  # a caller's gradient, which must survive
    before = model_state(model)
    for call in every_public_measurement(model, x, y, loss_fn, params):
        call()
        assert_same_state(model, before)


def every_recomputing_measurement(model, x, y, loss_fn, params):
    """The measurements with a BatchNorm policy, recomputing the statistics at each point."""
    kw = dict(loss_fn=loss_fn, params=params, bn="recompute")
    labels = not y.is_floating_point() and y.dim() == 1
    other = copy.deepcopy(model)
    theta = utils.flat_parameters(model, params)
    yield lambda: utils.perturbation_flatness(model, x, y, [0.1], samples=2, **kw)
    yield lambda: utils.worst_case_sharpness(model, x, y, rho=0.1, steps=2, starts=1, **kw)
    yield lambda: utils.pac_bayes_flatness(model, x, y, samples=2, rounds=2, **kw, **(
        {} if labels else {"criterion": "loss", "max_loss_increase": 0.1}))
    yield lambda: utils.loss_surface_2d(model, x, y, steps=3, **kw)
    yield lambda: utils.loss_plane(model, x, y, (theta, 1.1 * theta, theta + 0.1), steps=3, **kw)
    yield lambda: utils.linear_interpolation(model, other, x, y, [0.5], refine=1, **kw)
    yield lambda: utils.bezier_curve(model, other, x, y, epochs=1, lr=0.01, points=3, batch_size=4, **kw)


@pytest.mark.parametrize("case", ["tanh_bn_cnn", "relu_bn_cnn"])
def test_recomputing_batchnorm_statistics_leaves_the_model_alone(case):
    model, x, y, loss_fn, params = CASES[case]()
    before = model_state(model)
    for call in every_recomputing_measurement(model, x, y, loss_fn, params):
        call()
        assert_same_state(model, before)


# ----------------------------------------------------------------------------- BatchNorm between two models


def bn_mlp(seed: int) -> nn.Sequential:
    return randomized(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)), seed)


def hand_forward(theta: dict, x: torch.Tensor, mean: torch.Tensor | None, var: torch.Tensor | None):
    """The BN network written out: statistics of the first layer's outputs over x when mean/var are None
    (unbiased variance, as update_bn stores it), else the given running ones; eps 1e-5."""
    h = x @ theta["0.weight"].T + theta["0.bias"]
    if mean is None:
        mean, var = h.mean(dim=0), h.var(dim=0, unbiased=True)
    z = (h - mean) / torch.sqrt(var + 1e-5) * theta["1.weight"] + theta["1.bias"]
    return torch.tanh(z) @ theta["3.weight"].T + theta["3.bias"]


@pytest.mark.parametrize("bn", ["keep", "recompute"])
def test_interpolation_batchnorm_policy_equals_the_hand_computed_forward_pass(bn):
    model_a, model_b = bn_mlp(11), bn_mlp(12)
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (9,), generator=g)
    alphas = [0.0, 0.3, 0.5, 1.0]
    result = utils.linear_interpolation(model_a, model_b, x, y, alphas, refine=0, bn=bn)
    a, b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    for alpha, loss in zip(alphas, result.losses):
        theta = {k: (1 - alpha) * a[k].detach() + alpha * b[k].detach() for k in a}
        stats = (None, None) if bn == "recompute" else (model_a[1].running_mean, model_a[1].running_var)
        assert loss == pytest.approx(float(F.cross_entropy(hand_forward(theta, x, *stats), y)), rel=1e-12)


def test_recomputed_statistics_differ_from_the_kept_ones_between_two_models():
    model_a, model_b = bn_mlp(11), bn_mlp(12)
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    kept = utils.linear_interpolation(model_a, model_b, x, y, [0.5], refine=0).losses[0]
    recomputed = utils.linear_interpolation(model_a, model_b, x, y, [0.5], refine=0, bn="recompute").losses[0]
    assert abs(kept - recomputed) > 1e-3


@pytest.mark.parametrize("bn", ["keep", "recompute"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_worst_case_sharpness_batchnorm_policy_equals_the_hand_computed_forward_pass(bn, adaptive):
    """The sharpness is L(θ + ε) − L(θ) at the perturbation ε it returns, both losses by the written-out network with
    the policy's statistics (each point's own under "recompute", θ's included); ε lies in the ρ-ball; the model,
    its statistics included, is unchanged."""
    model = bn_mlp(11)
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (9,), generator=g)
    before = model_state(model)
    result = utils.worst_case_sharpness(model, x, y, rho=0.5, adaptive=adaptive, steps=5, starts=2, bn=bn)
    assert_same_state(model, before)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    moved = {k: v + e.view_as(v) for (k, v), e in zip(theta.items(), torch.split(result.perturbation,
                                                                                  [v.numel() for v in theta.values()]))}
    stats = (None, None) if bn == "recompute" else (model[1].running_mean, model[1].running_var)
    hand = [float(F.cross_entropy(hand_forward(t, x, *stats), y)) for t in (moved, theta)]
    assert result.sharpness == pytest.approx(hand[0] - hand[1], rel=1e-12, abs=1e-14)
    scale = utils.flat_parameters(model).abs() if adaptive else 1.0
    assert float((result.perturbation / scale).norm()) <= 0.5 * (1 + 1e-12)


def test_worst_case_sharpness_with_recomputed_statistics_differs_from_the_kept_ones():
    model = bn_mlp(11)
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    kept = utils.worst_case_sharpness(model, x, y, rho=0.5, steps=3).sharpness
    recomputed = utils.worst_case_sharpness(model, x, y, rho=0.5, steps=3, bn="recompute").sharpness
    assert abs(kept - recomputed) > 1e-3


def test_refuses_an_unknown_batchnorm_policy():
    model, x, y, _, _ = CASES["tanh_bn_cnn"]()
    assert refusal(lambda: utils.loss_surface_2d(model, x, y, steps=3, bn="update")).startswith("bn must be")
    assert refusal(lambda: utils.worst_case_sharpness(model, x, y, rho=0.1, bn="update")).startswith("bn must be")


# ----------------------------------------------------------------------------- costs


def one_by_one_budget(blocks: list[np.ndarray], max_iter: int) -> int:
    """One byte short of what layer_curvature needs for all blocks at once (masks, starts and first bases:
    blocks·(min(max_iter, 16) + 3)·D float64 numbers), so it goes block after block."""
    dim = sum(b.shape[0] for b in blocks)
    return len(blocks) * (min(max_iter, 16) + 3) * dim * 8 - 1


@pytest.mark.parametrize("case", ["transformer", "tanh_bn_cnn", "tied_module"])
def test_layer_curvature_block_by_block_equals_the_dense_blocks(case):
    """A memory budget too small for all blocks at once sends layer_curvature block after block."""
    model, x, y, loss_fn, params = CASES[case]()
    names, blocks = dense_blocks(model, x, y, loss_fn, params)
    layers = utils.layer_curvature(model, x, y, loss_fn=loss_fn, params=params, tol=1e-10, max_iter=200,
                                   memory_budget=one_by_one_budget(blocks, 200))
    assert all(layer.trace_stderr == 0 for layer in layers)  # every block here has at most exact_below = 64 entries
    assert_layers_match_blocks(layers, names, blocks)


def test_block_by_block_hutchinson_is_within_3_stderr_of_the_block_trace():
    model, x, y, loss_fn, params = CASES["transformer"]()
    names, blocks = dense_blocks(model, x, y, loss_fn, params)
    layers = utils.layer_curvature(model, x, y, loss_fn=loss_fn, exact_below=0, max_probes=48, rel_stderr=0.0,
                                   memory_budget=one_by_one_budget(blocks, 3), max_iter=3)
    z = [abs(layer.trace - np.trace(block)) / layer.trace_stderr
         for layer, block in zip(layers, blocks) if layer.trace_stderr > 0]
    assert len(z) >= 10 and max(z) <= 3.0 and np.mean(z) <= 1.5


@pytest.mark.parametrize("case", ["transformer", "tied_sequential", "frozen"])
def test_trace_takes_the_exact_route_when_the_budget_covers_every_parameter(case):
    model, x, y, loss_fn, params = CASES[case]()
    dense = dense_reference(model, x, y, loss_fn, params)
    result = utils.hessian_trace(model, x, y, loss_fn=loss_fn, params=params, max_matvecs=dense.shape[0])
    assert result.method == "exact" and result.stderr == 0 and result.matvecs == dense.shape[0]
    assert result.trace == pytest.approx(np.trace(dense), rel=1e-10)


def test_trace_over_budget_is_hutchpp_within_the_budget():
    model, x, y, loss_fn, params = CASES["tied_sequential"]()
    dim = utils.flat_parameters(model).numel()
    result = utils.hessian_trace(model, x, y, loss_fn=loss_fn, params=params, max_matvecs=dim - 1)
    assert result.method == "hutch++" and 0 < result.matvecs <= dim - 1


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_long_measurements_show_products_done_out_of_the_budget_on_a_terminal_only(monkeypatch):
    """On a terminal the bar shows the products done out of the budget; into a log file (not a terminal) it
    prints nothing, since tqdm's redrawn bars would pile up there as lines."""
    import landscape.plumbing

    monkeypatch.setattr(landscape.plumbing, "PROGRESS_AFTER_SECONDS", 0.0)
    model, x, y, loss_fn, params = CASES["tied_module"]()
    for stream, shows in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        utils.hessian_trace(model, x, y, method="hutchinson", max_matvecs=24, rel_stderr=0.0)
        shown = stream.getvalue()
        assert ("tr(H) by hutchinson" in shown and "0/24" in shown) == shows
