"""Table-driven soundness tests of every propagation rule on random data (sparta.rulecheck).

Each case is an op with example arguments; it runs under every mask pattern (random
unstructured, rows, columns, channels, blocks, head-shaped, all kept, all pruned) applied to
its float/bool arguments, with every output kept and (for some patterns) a random ``used`` mask.
Precision tests for the hard cases live in test_rules_precision.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import sparta.propagation_rules  # noqa: F401  (registers the rules)
from sparta.calls import bound_arguments, tensor_arg_names
from sparta.rulecheck import check_rule

aten = torch.ops.aten
PATTERNS = ("random", "rows", "cols", "channels", "blocks", "heads", "dense", "empty")
USED_PATTERNS = ("random", "channels", "heads", "dense")  # also run with a random ``used``


def pattern_mask(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    """A bool mask of ``shape`` in the given pattern (True = kept)."""
    if kind == "dense" or len(shape) == 0:
        return torch.ones(shape, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "random":
        return torch.rand(shape, generator=gen) > 0.5

    def along(dim: int, group: int = 1) -> torch.Tensor:
        n = shape[dim]
        keep = (torch.rand((n + group - 1) // group, generator=gen) > 0.5).repeat_interleave(group)
        view = [1] * len(shape)
        view[dim] = n
        return keep[:n].reshape(view).expand(shape).clone()

    if kind == "rows":
        return along(0)
    if kind == "cols":
        return along(len(shape) - 1)
    if kind == "channels":
        return along(1 if len(shape) > 1 else 0)
    if kind == "heads":  # groups of consecutive features along the last dim
        return along(len(shape) - 1, max(1, shape[-1] // 4))
    if kind == "blocks":
        if len(shape) < 2:
            return along(0, 2)
        r, c = shape[-2], shape[-1]
        lead = shape[:-2]
        b = torch.rand((*lead, (r + 1) // 2, (c + 1) // 2), generator=gen) > 0.5
        b = b.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        return b[..., :r, :c].clone()
    raise ValueError(kind)


@dataclass
class Case:
    op: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)
    skip_masks: tuple[str, ...] = ()  # arguments left all-kept (e.g. indices)
    const_args: tuple[str, ...] = ()
    samplers: dict[str, Callable] = field(default_factory=dict)
    id: str = ""


def r(*shape: int) -> torch.Tensor:
    return torch.randn(shape)


def ri(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape)


def b(*shape: int) -> torch.Tensor:
    return torch.rand(shape) > 0.5


torch.manual_seed(0)
CASES: list[Case] = [
    # elementwise
    Case(aten.relu.default, (r(4, 8),)),
    Case(aten.gelu.default, (r(4, 8),)),
    Case(aten.tanh.default, (r(2, 3, 8),)),
    Case(aten.sigmoid.default, (r(4, 8),)),
    Case(aten.exp.default, (r(4, 8),)),
    Case(aten.rsqrt.default, (r(4, 8).abs() + 0.5,)),
    Case(aten.add.Tensor, (r(2, 4, 8), r(2, 4, 8)), id="residual"),
    Case(aten.add.Tensor, (r(2, 4, 8), r(8)), id="bias_bcast"),
    Case(aten.add.Tensor, (r(4, 8), 0), id="scalar0"),
    Case(aten.add.Tensor, (r(4, 8), 1.0), id="scalar1"),
    Case(aten.add.Tensor, (r(4, 8), r(4, 8)), {"alpha": 0}, id="alpha0"),
    Case(aten.sub.Tensor, (r(4, 8), r(4, 1))),
    Case(aten.rsub.Scalar, (r(4, 8), 1.0)),
    Case(aten.mul.Tensor, (r(4, 8), r(4, 8))),
    Case(aten.mul.Tensor, (r(2, 4, 8), r(4, 1))),
    Case(aten.mul.Tensor, (r(4, 8), 0.5)),
    Case(aten.mul.Scalar, (r(4, 8), 0.0)),
    Case(aten.div.Tensor, (r(4, 8), r(4, 8).abs() + 0.5)),
    Case(aten.div.Tensor, (r(4, 8), 3.0)),
    Case(aten.pow.Tensor_Scalar, (r(4, 8), 3.0)),
    Case(aten.pow.Tensor_Scalar, (r(4, 8), 0)),
    Case(aten.clamp.default, (r(4, 8), -1.0, 1.0)),
    Case(aten.clamp.default, (r(4, 8), 0.5)),
    Case(aten.hardtanh.default, (r(4, 8),)),
    Case(aten.ge.Scalar, (r(4, 8), 0)),
    Case(aten.eq.Tensor, (ri(3, 4, 8), ri(3, 4, 8))),
    Case(aten.le.Tensor, (ri(3, 1, 8), ri(3, 4, 1))),
    Case(aten.ne.Scalar, (ri(3, 4, 8), 1)),
    Case(aten.logical_not.default, (b(4, 8),)),
    Case(aten.__and__.Tensor, (b(4, 8), b(4, 8))),
    Case(aten.bitwise_and.Tensor, (b(1, 8), b(4, 1))),
    Case(aten.bitwise_or.Tensor, (b(4, 8), b(4, 8))),
    Case(aten.dropout.default, (r(4, 8), 0.3, False)),
    Case(aten.dropout.default, (r(4, 8), 0.3, True), id="train"),
    Case(aten.native_dropout.default, (r(4, 8), 0.3, True)),
    Case(aten.clone.default, (r(4, 8),)),
    Case(aten._to_copy.default, (r(4, 8),), {"dtype": torch.float64}),
    Case(aten.to.dtype, (r(4, 8), torch.float16)),
    Case(aten.to.dtype_layout, (r(4, 8),), {"dtype": torch.float64}),
    Case(aten.type_as.default, (r(4, 8), r(2).double())),
    Case(aten.maximum.default, (r(4, 8), r(4, 8))),
    # shape
    Case(aten.view.default, (r(2, 8, 64), [2, 8, 4, 16]), id="split_heads"),
    Case(aten.view.default, (r(2, 8, 4, 16), [2, 8, 64]), id="merge_heads"),
    Case(aten.reshape.default, (r(2, 4, 8, 16), [2, -1, 8, 16])),
    Case(aten._unsafe_view.default, (r(16, 64), [2, 8, 64])),
    Case(aten.flatten.using_ints, (r(2, 3, 4, 5), 1)),
    Case(aten.transpose.int, (r(2, 8, 4, 16), 1, 2)),
    Case(aten.t.default, (r(4, 8),)),
    Case(aten.permute.default, (r(2, 8, 4, 16), [0, 2, 1, 3])),
    Case(aten.expand.default, (r(1, 8, 1), [2, 8, 4])),
    Case(aten.expand.default, (r(8, 1), [3, 8, 5])),
    Case(aten.unsqueeze.default, (r(4, 8), 1)),
    Case(aten.squeeze.dim, (r(4, 1, 8), 1)),
    Case(aten.contiguous.default, (r(4, 8),)),
    Case(aten.repeat.default, (r(2, 3), [2, 1, 3])),
    Case(aten.movedim.int, (r(2, 3, 4), 0, 2)),
    # indexing
    Case(aten.cat.default, ([r(2, 3, 4), r(2, 5, 4)], 1)),
    Case(aten.cat.default, ([r(2, 3), r(4, 3)],), id="dim0"),
    Case(aten.stack.default, ([r(2, 3), r(2, 3), r(2, 3)], 1)),
    Case(aten.split.Tensor, (r(2, 8, 192), 64, 2)),
    Case(aten.split.Tensor, (r(2, 9), 4, 1), id="ragged"),
    Case(aten.split_with_sizes.default, (r(2, 9), [2, 3, 4], 1)),
    Case(aten.chunk.default, (r(6, 4), 3)),
    Case(aten.unbind.int, (r(3, 4, 5), 1)),
    Case(aten.slice.Tensor, (r(4, 9), 1, 2, 8, 2)),
    Case(aten.slice.Tensor, (r(4, 9), 0, -3)),
    Case(aten.slice.Tensor, (r(1, 32), 1, 0, 8)),
    Case(aten.select.int, (r(2, 8, 64), 1, 0)),
    Case(aten.select.int, (r(4, 9), 1, -2)),
    Case(aten.narrow.default, (r(4, 9), 1, 2, 5)),
    Case(aten.tril.default, (r(2, 5, 5),)),
    Case(aten.triu.default, (r(5, 6), 1)),
    Case(aten.index_select.default, (r(5, 6), 0, torch.tensor([4, 0, 4])), skip_masks=("index",)),
    Case(
        aten.index_select.default,
        (r(5, 6), 1, torch.tensor([1, 3])),
        const_args=("index",),
        skip_masks=("index",),
        id="const",
    ),  # fmt: skip
    Case(aten.embedding.default, (r(10, 6), ri(10, 2, 3))),
    Case(aten.embedding.default, (r(10, 6), ri(10, 2, 3)), const_args=("indices",), id="const"),
    Case(aten.gather.default, (r(4, 6), 1, ri(6, 3, 2))),
    Case(aten.gather.default, (r(4, 6), 1, ri(6, 3, 2)), const_args=("index",), id="const"),
    Case(aten.index.Tensor, (r(4, 5), [torch.tensor([0, 2])])),
    Case(aten.index.Tensor, (b(2, 8), [ri(2, 2, 1, 1, 1), ri(8, 1, 1, 1, 8)]), id="bert_mask"),
    # matrix products
    Case(aten.linear.default, (r(2, 4, 8), r(6, 8), r(6))),
    Case(aten.linear.default, (r(4, 8), r(6, 8))),
    Case(aten.addmm.default, (r(6), r(4, 8), r(8, 6))),
    Case(aten.addmm.default, (r(4, 6), r(4, 8), r(8, 6)), {"beta": 0.0}, id="beta0"),
    Case(aten.addmm.default, (r(1, 6), r(4, 8), r(8, 6)), {"beta": 0.5, "alpha": 2.0}),
    Case(aten.mm.default, (r(4, 8), r(8, 6))),
    Case(aten.bmm.default, (r(2, 4, 8), r(2, 8, 6))),
    Case(aten.matmul.default, (r(2, 4, 8), r(8, 6))),
    Case(aten.matmul.default, (r(8), r(2, 8, 6)), id="vec"),
    Case(aten.baddbmm.default, (r(1, 4, 6), r(2, 4, 8), r(2, 8, 6))),
    Case(aten.einsum.default, ("bhld,bhsd->bhls", [r(2, 2, 3, 4), r(2, 2, 5, 4)])),
    # convolution and pooling
    Case(aten.conv2d.default, (r(2, 3, 6, 6), r(4, 3, 3, 3), r(4), [1, 1], [1, 1])),
    Case(
        aten.conv2d.default,
        (r(2, 4, 7, 7), r(4, 2, 3, 3), None, [2, 2], [0, 0], [1, 1], 2),
        id="groups_stride",
    ),  # fmt: skip
    Case(aten.conv2d.default, (r(2, 3, 8, 8), r(4, 3, 4, 4), r(4), [4, 4]), id="patch_embed"),
    Case(aten.conv1d.default, (r(2, 3, 9), r(4, 3, 3), r(4), [1], [2], [2])),
    Case(
        aten.convolution.default,
        (r(2, 3, 6, 6), r(4, 3, 3, 3), r(4), [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
    ),  # fmt: skip
    Case(aten.max_pool2d.default, (r(2, 3, 6, 6), [2, 2])),
    Case(
        aten.max_pool2d.default, (r(2, 3, 7, 7), [3, 3], [2, 2], [1, 1], [1, 1], True), id="ceil"
    ),  # fmt: skip
    Case(aten.max_pool2d.default, (r(1, 2, 7, 7), [2, 2], [1, 1], [0, 0], [2, 2]), id="dilated"),
    Case(aten.max_pool2d_with_indices.default, (r(2, 3, 6, 6), [2, 2], [2, 2])),
    Case(aten.avg_pool2d.default, (r(2, 3, 7, 7), [3, 3], [2, 2], [1, 1], True, False)),
    Case(aten.adaptive_avg_pool2d.default, (r(2, 3, 7, 7), [3, 3])),
    Case(aten.adaptive_avg_pool2d.default, (r(2, 8, 4, 4), [1, 1]), id="global"),
    Case(aten.adaptive_max_pool2d.default, (r(2, 3, 7, 7), [3, 2])),
    # normalisation
    Case(aten.layer_norm.default, (r(2, 4, 8), [8], r(8), r(8))),
    Case(aten.layer_norm.default, (r(2, 4, 8), [8])),
    Case(aten.layer_norm.default, (r(2, 4, 8), [4, 8], r(4, 8), r(4, 8)), id="2d"),
    Case(aten.native_layer_norm.default, (r(2, 4, 8), [8], r(8), r(8), 1e-5)),
    Case(aten.batch_norm.default, (r(2, 4, 3, 3), r(4), r(4), r(4), r(4), False, 0.1, 1e-5, False)),
    Case(
        aten.batch_norm.default, (r(8, 4), r(4), r(4), r(4), r(4), False, 0.1, 1e-5, False), id="1d"
    ),  # fmt: skip
    Case(
        aten.batch_norm.default,
        (r(2, 4, 3, 3), r(4), r(4), None, None, True, 0.1, 1e-5, False),
        id="train",
    ),  # fmt: skip
    Case(
        aten._native_batch_norm_legit_no_training.default,
        (r(2, 4, 3, 3), r(4), r(4), r(4), r(4), 0.1, 1e-5),
    ),  # fmt: skip
    Case(
        aten.native_batch_norm.default, (r(2, 4, 3, 3), r(4), r(4), r(4), r(4), False, 0.1, 1e-5)
    ),  # fmt: skip
    Case(aten.group_norm.default, (r(2, 6, 3, 3), 3, r(6), r(6))),
    Case(aten.native_group_norm.default, (r(2, 6, 3, 3), r(6), r(6), 2, 6, 9, 3, 1e-5)),
    Case(aten.rms_norm.default, (r(2, 4, 8), [8], r(8))),
    # attention
    Case(aten.softmax.int, (r(3, 5), -1)),
    Case(aten._softmax.default, (r(2, 3, 5), 1, False)),
    Case(aten.log_softmax.int, (r(3, 5), 0)),
    Case(aten.scaled_dot_product_attention.default, (r(2, 4, 5, 8), r(2, 4, 6, 8), r(2, 4, 6, 8))),
    Case(
        aten.scaled_dot_product_attention.default,
        (r(2, 4, 6, 8), r(2, 4, 6, 8), r(2, 4, 6, 8)),
        {"is_causal": True},
        id="causal",
    ),  # fmt: skip
    Case(
        aten.scaled_dot_product_attention.default,
        (r(2, 4, 5, 8), r(2, 4, 6, 8), r(2, 4, 6, 8), b(2, 1, 5, 6) | torch.eye(5, 6, dtype=bool)),
        {"scale": 0.25},
        id="bool_mask",
    ),  # fmt: skip
    Case(
        aten.scaled_dot_product_attention.default,
        (r(2, 4, 5, 8), r(2, 4, 6, 8), r(2, 4, 6, 8), r(2, 1, 5, 6)),
        id="float_mask",
    ),  # fmt: skip
    Case(
        aten.scaled_dot_product_attention.default,
        (r(2, 4, 5, 8), r(2, 2, 6, 8), r(2, 2, 6, 8)),
        {"enable_gqa": True},
        id="gqa",
    ),  # fmt: skip
    Case(aten.where.self, (b(2, 3), r(2, 3), r(3))),
    Case(aten.where.self, (b(2, 3), r(2, 3), r(3)), const_args=("condition",), id="const"),
    Case(aten.where.ScalarOther, (b(2, 3), r(2, 3), 0.0)),
    Case(aten.masked_fill.Scalar, (r(2, 3), b(2, 3), 0.0)),
    Case(aten.masked_fill.Scalar, (r(2, 3), b(2, 3), -1e4), const_args=("mask",), id="const"),
    Case(aten.masked_fill.Tensor, (r(2, 3), b(3), torch.tensor(0.5))),
    # reductions
    Case(aten.sum.dim_IntList, (r(2, 3, 4), [1])),
    Case(aten.sum.default, (r(2, 3, 4),)),
    Case(aten.mean.dim, (r(2, 3, 4), [-1, -2], True)),
    Case(aten.amax.default, (r(2, 3, 4), [2])),
    Case(aten.max.dim, (r(2, 3, 4), 1)),
    Case(aten.prod.dim_int, (r(2, 3, 4), 2)),
    Case(aten.any.dim, (b(2, 3, 4), 1)),
    Case(aten.var.correction, (r(2, 3, 4), [2])),
    Case(aten.argmax.default, (r(2, 3, 4), 1)),
    Case(aten.cumsum.default, (r(2, 5), 1)),
    Case(aten.cumsum.default, (ri(3, 2, 5), -1), id="int"),
    Case(aten.cumprod.default, (r(2, 5), 1)),
    Case(aten.diff.default, (ri(5, 2, 8), 1, -1, ri(5, 2, 1))),
    # factories
    Case(aten.arange.default, (8,)),
    Case(aten.arange.start_step, (0, 8, 2)),
    Case(aten.full.default, ([2, 3], 0.0)),
    Case(aten.full.default, ([2, 3], 1.5)),
    Case(aten.new_ones.default, (r(2, 5), [3])),
    Case(aten.zeros_like.default, (r(2, 5),)),
    Case(aten.full_like.default, (r(2, 5), 2.0)),
    Case(aten.scalar_tensor.default, (0.0,)),
    Case(aten._assert_tensor_metadata.default, (r(2, 5),), {"dtype": torch.float32}),
]


def _case_id(c: Case) -> str:
    return f"{c.op}{'-' + c.id if c.id else ''}"


def _masks(case: Case, kind: str, gen: torch.Generator) -> dict[str, Any]:
    bound = bound_arguments(case.op, case.args, case.kwargs)
    masks: dict[str, Any] = {}
    for n in tensor_arg_names(case.op):
        v = bound.get(n)
        if n in case.skip_masks:
            continue
        if isinstance(v, torch.Tensor):
            masks[n] = pattern_mask(tuple(v.shape), kind, gen)
        elif isinstance(v, (list, tuple)):
            masks[n] = tuple(
                pattern_mask(tuple(t.shape), kind, gen) if isinstance(t, torch.Tensor) else None
                for t in v
            )
    return masks


def _random_used(case: Case, gen: torch.Generator) -> Any:
    with torch.no_grad():
        y = case.op(*case.args, **case.kwargs)
    ys = (y,) if isinstance(y, torch.Tensor) else tuple(y) if y is not None else ()
    used = tuple(torch.rand(t.shape, generator=gen) > 0.4 for t in ys)
    return used[0] if len(used) == 1 else used


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_rule_is_sound(case: Case) -> None:
    gen = torch.Generator().manual_seed(1)
    for kind in PATTERNS:
        masks = _masks(case, kind, gen)
        useds = (None, _random_used(case, gen)) if kind in USED_PATTERNS else (None,)
        for used in useds:
            try:
                check_rule(
                    case.op, case.args, case.kwargs, input_masks=masks, used=used, trials=1,
                    const_args=case.const_args, samplers=case.samplers,
                )  # fmt: skip
            except AssertionError as e:
                raise AssertionError(
                    f"pattern {kind!r}, used={'all' if used is None else 'random'}: {e}"
                ) from None


def test_table_covers_the_model_ops() -> None:
    """Every op that appears in the five reference models has at least one table case."""
    import operator

    from test_rule_coverage import graph_targets  # noqa: PLC0415

    seen = {c.op for c in CASES} | {c.op.overloadpacket for c in CASES}
    missing = set()
    for name in ("mlp", "cnn", "bert_mask", "gpt2_mask", "vit"):
        for t in graph_targets(name) - {operator.getitem}:
            if t not in seen and t.overloadpacket not in seen:
                missing.add(str(t))
    assert not missing, f"ops of the reference models without a rule test case: {sorted(missing)}"
