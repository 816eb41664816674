"""The networks the experiment trains: a small MLP and a small CNN for 28x28 images.

Both are `nn.Sequential` subclasses that do not override `forward`, so a model is
exactly the composition of its layers. `utils.py` relies on that to take fast,
exact paths for plain MLPs (see its "fast paths" section); anything else, SmallCNN
included, goes through the general path.

Initialisation reproduces PyTorch's default for Linear and Conv2d layers
(Kaiming-uniform weights with a = sqrt(5), biases uniform in +-1/sqrt(fan_in)) but
draws from an explicit `torch.Generator`, so a seed fixes the weights without
touching the global random state.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["SmallMLP", "SmallCNN", "reset_parameters"]

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def reset_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-initialise every Linear/Conv2d layer of `model` with PyTorch's default scheme, drawn from `generator`."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return model


class SmallMLP(nn.Sequential):
    """784 -> hidden[0] -> ... -> hidden[-1] -> 10 multilayer perceptron with ReLU activations.

    Accepts images of shape (B, 1, 28, 28) or flat inputs (B, 784).
    """

    def __init__(
        self,
        hidden: tuple[int, ...] = (128, 128),
        *,
        in_features: int = 28 * 28,
        num_classes: int = NUM_CLASSES,
        generator: torch.Generator | None = None,
    ) -> None:
        widths = [in_features, *hidden]
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            layers += [(f"fc{i}", nn.Linear(fan_in, fan_out)), (f"relu{i}", nn.ReLU())]
        layers.append((f"fc{len(widths)}", nn.Linear(widths[-1], num_classes)))
        super().__init__(OrderedDict(layers))
        self.hidden = tuple(hidden)
        if generator is not None:
            reset_parameters(self, generator)


class SmallCNN(nn.Sequential):
    """Two conv blocks (3x3 conv, ReLU, 2x2 max-pool) and a linear head, for (B, 1, 28, 28) images."""

    def __init__(
        self,
        channels: tuple[int, int] = (16, 32),
        *,
        num_classes: int = NUM_CLASSES,
        generator: torch.Generator | None = None,
    ) -> None:
        c1, c2 = channels
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, c1, kernel_size=3, padding=1)),  # (B, c1, 28, 28)
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),  # (B, c1, 14, 14)
                    ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),  # (B, c2, 14, 14)
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),  # (B, c2, 7, 7)
                    ("flatten", nn.Flatten()),  # (B, c2 * 49)
                    ("fc", nn.Linear(c2 * 7 * 7, num_classes)),
                ]
            )
        )
        self.channels = (c1, c2)
        if generator is not None:
            reset_parameters(self, generator)
