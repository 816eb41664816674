"""The output margin against hand-computed logits."""

import numpy as np
import pytest
import torch
from torch import nn

from landscape.margins import margins, output_margin


class FixedLogits(nn.Module):
    """A model whose logits are its input (and one parameter, so that it is measurable)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.scale * x


def test_margins_are_the_true_logit_minus_the_largest_other():
    x = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 4.5], [1.0, 2.0, 3.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, 0])
    np.testing.assert_array_equal(margins(FixedLogits(), x, y), [1.0, -0.5, -2.0])  # 3-2, 4.5-5, 1-3


def test_output_margin_is_the_quantile_of_the_margins_in_small_batches_too():
    x = torch.tensor([[float(i), 0.0] for i in range(11)], dtype=torch.float64)  # margins 0, 1, ..., 10
    y = torch.zeros(11, dtype=torch.long)
    assert output_margin(FixedLogits(), x, y) == pytest.approx(1.0)  # the 10th percentile of 0..10
    assert output_margin(FixedLogits(), x, y, quantile=0.5) == pytest.approx(5.0)
    np.testing.assert_array_equal(margins(FixedLogits(), x, y, batch_size=3), np.arange(11.0))
    with pytest.raises(ValueError, match="quantile"):
        output_margin(FixedLogits(), x, y, quantile=1.5)
