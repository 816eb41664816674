"""The Hessian-vector product against the materialised Hessian of a tiny float64 model."""

import torch
from conftest import Wrapped, tiny_data, tiny_mlp
from torch.func import functional_call

import utils


def dense_hessian(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = utils.flat_parameters(model)

    def loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta)


def test_hvp_equals_dense_hessian_times_v():
    model = tiny_mlp(0)
    x, y = tiny_data(0)
    H = dense_hessian(model, x, y)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for m in (model, Wrapped(model)):
        torch.testing.assert_close(utils.hessian_vector_product(m, x, y, v), H @ v, rtol=0, atol=1e-10)
