"""Constant units: weights pruned, bias kept. Their outputs are constants, carried by the compact
layout and folded into the next linear's / unpadded convolution's bias (exact to 1e-6)."""

from __future__ import annotations

import torch
from test_shrink_channels import compiled_weights, randomize_norms
from torch import nn
from torch.nn.utils import prune

import sparta
from sparta.sparsify import masks_from

BATCHES = (1, 3, 4)


def check(model, attrs, shape):
    torch.manual_seed(0)
    model = randomize_norms(model)
    compiled = sparta.compile(
        model, attrs, (torch.randn(2, *shape),), backends=["shrink"], measure=False
    )
    ref = sparta.masked_model(model, attrs)
    for b in BATCHES:
        x = torch.randn(b, *shape)
        torch.testing.assert_close(compiled(x), ref(x), atol=1e-6, rtol=1e-6)
    return compiled


def rows(shape, pruned) -> torch.Tensor:
    m = torch.ones(shape, dtype=torch.bool)
    m[list(pruned)] = False
    return m


def test_constant_units_of_a_linear_fold_through_gelu_into_the_next_bias() -> None:
    m = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 6))
    attrs = {"0.weight": rows((32, 12), range(0, 32, 2))}  # half the rows, biases kept
    compiled = check(m, attrs, (12,))
    assert compiled_weights(compiled) == [(16, 12), (6, 16)]


def test_constant_channels_fold_through_batch_norm_into_an_unpadded_conv() -> None:
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1)
    )
    attrs = {"0.weight": rows((16, 3, 3, 3), range(8))}  # bias kept: 8 constant channels
    compiled = check(m, attrs, (3, 6, 6))
    assert compiled_weights(compiled) == [(8, 3, 3, 3), (8, 8, 1, 1)]


def test_constant_channels_before_a_padded_conv_are_filled_in_not_folded() -> None:
    m = nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)
    )
    attrs = {"0.weight": rows((16, 3, 1, 1), range(8))}
    compiled = check(m, attrs, (3, 5, 5))
    assert compiled_weights(compiled) == [(8, 3, 1, 1), (8, 16, 3, 3)]
    assert "expand" in compiled.graph_module.code


def test_ln_structured_pruned_model_shrinks() -> None:
    """torch.nn.utils.prune.ln_structured leaves biases: every pruned channel is a constant."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )
    randomize_norms(m)
    prune.ln_structured(m[0], "weight", amount=0.5, n=1, dim=0)
    prune.ln_structured(m[3], "weight", amount=0.25, n=1, dim=0)
    attrs = masks_from(m)
    compiled = check(m, attrs, (3, 6, 6))
    assert compiled_weights(compiled) == [(8, 3, 3, 3), (12, 8, 1, 1), (10, 12 * 16)]
