"""Constant units (weights pruned, bias kept): carried by the compact layout and folded into the
next linear's / unpadded convolution's bias (exact to 1e-6); shrunk weights keeping their n:m
pattern for the sparse kernels."""

from __future__ import annotations

import pytest
import torch
from test_shrink_channels import compiled_weights, randomize_norms
from torch import nn
from torch.nn.utils import prune

import sparta
from sparta.codegen import nm_cpu
from sparta.sparsify import masks_from

BATCHES = (1, 3, 4)


def check(model, attrs, shape, backends=("shrink",)):
    torch.manual_seed(0)
    model = randomize_norms(model)
    compiled = sparta.compile(
        model, attrs, (torch.randn(2, *shape),), backends=list(backends), measure=False
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


def nm_rows_mask(shape, pruned_rows, n=1, m=4, seed=0) -> torch.Tensor:
    """n:m along the input dim (at most n kept of every m), plus whole pruned rows."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(shape, generator=g).reshape(shape[0], -1, m)
    top = scores.topk(n, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True).reshape(shape)
    mask[list(pruned_rows)] = False
    return mask


@pytest.mark.skipif(not nm_cpu.available(), reason="no C++ compiler")
def test_what_remains_after_shrinking_keeps_its_nm_pattern_and_runs_nm_cpu(monkeypatch) -> None:
    import sparta.plan as sp

    def fake(fns, dev, **kw):  # the shrunk n:m kernel measures fastest
        return {k: 0.5 if k.startswith("shrink+") else 1.0 for k in fns}

    monkeypatch.setattr(sp, "compare_ms", fake)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    units = [i for i in range(64) if i // 4 % 2 == 0]  # whole groups of 4 of fc2's columns
    attrs = {
        "0.weight": nm_rows_mask((64, 64), units),
        "0.bias": rows(64, units),
        "2.weight": nm_rows_mask((32, 64), [], n=2, m=4, seed=1),
    }
    compiled = check(m, attrs, (64,), backends=("shrink", "nm_cpu"))
    impls = [c.impl for c in compiled.plan.choices.values()]
    assert impls[:2] == ["shrink+nm_cpu", "shrink+nm_cpu"]
    assert all(c.reads_compact for c in list(compiled.plan.choices.values())[1:2])
    code = compiled.graph_module.code
    assert code.count("torch.ops.sparta.nm_linear") == 2 and "shrink_expand" not in code
    assert "in_features = 32, out_features = 32" in code  # fc2 reads the 32 kept units, still 2:4


@pytest.mark.skipif(not nm_cpu.available(), reason="no C++ compiler")
def test_a_kernel_built_for_a_compact_input_turns_dense_when_its_producer_does(
    monkeypatch,
) -> None:
    """fc1 measures dense, fc2's kernel was built for fc1's compact output: it must not run."""
    import sparta.plan as sp

    winners = iter(["dense", "shrink+nm_cpu", "dense"])

    def fake(fns, dev, **kw):
        w = next(winners)
        return {k: 0.5 if k == w else 1.0 for k in fns}

    monkeypatch.setattr(sp, "compare_ms", fake)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    units = [i for i in range(64) if i // 4 % 2 == 0]
    attrs = {
        "0.weight": nm_rows_mask((64, 64), units),
        "0.bias": rows(64, units),
        "2.weight": nm_rows_mask((32, 64), [], n=2, m=4, seed=1),
    }
    compiled = check(m, attrs, (64,), backends=("dense", "shrink", "nm_cpu"))
    assert [c.impl for c in compiled.plan.choices.values()][:2] == ["dense", "dense"]
