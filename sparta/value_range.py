"""Value ranges that hold for every input the compiled module accepts (interval analysis).

``value_ranges(gm, consts)`` gives, for the nodes it can bound, an interval ``(lo, hi)`` that
contains every element of the node's value on every run, whatever the inputs and their
(dynamic) sizes. Bool tensors are bounded as 0/1, so ``lo >= 1`` proves a mask all-True.
The analysis is sound by construction: an op it does not know, or an argument it cannot bound,
leaves the node unbounded (absent from the result); it never guesses.

What it knows: constant tensors (buffers and parameters: their min and max bound every slice),
``arange`` (``start`` up to ``end - 1``, or unbounded above when ``end`` is a run-time size),
constant fills, adds, subtractions and products with constants, value-preserving shape and copy
ops, comparisons with a scalar, and boolean not/and/or. That covers the masks models build from
positions, such as HF BERT's ``ge(arange(T) + 0, 0)`` expanded to the attention shape, which is
all-True for every T and can be dropped from ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten
Range = tuple[float, float]
INF = math.inf

# Ops whose output elements are a subset (or copies) of their first input's elements.
PRESERVING = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.expand_as.default,
    aten.transpose.int,
    aten.permute.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.t.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.flatten.using_ints,
}
_COMPARE: dict[Any, Callable[[Range, float], Range]] = {
    aten.ge.Scalar: lambda r, c: _bool(r[0] >= c, r[1] < c),
    aten.gt.Scalar: lambda r, c: _bool(r[0] > c, r[1] <= c),
    aten.le.Scalar: lambda r, c: _bool(r[1] <= c, r[0] > c),
    aten.lt.Scalar: lambda r, c: _bool(r[1] < c, r[0] >= c),
    aten.eq.Scalar: lambda r, c: _bool(r[0] == r[1] == c, c < r[0] or c > r[1]),
    aten.ne.Scalar: lambda r, c: _bool(c < r[0] or c > r[1], r[0] == r[1] == c),
}
_FILLS = {
    aten.ones.default: 1.0,
    aten.ones_like.default: 1.0,
    aten.zeros.default: 0.0,
    aten.zeros_like.default: 0.0,
}


def _bool(always: bool, never: bool) -> Range:
    return (1.0, 1.0) if always else (0.0, 0.0) if never else (0.0, 1.0)


def _number(a: Any) -> float | None:
    if isinstance(a, bool):
        return float(a)
    if isinstance(a, (int, float)):
        return float(a)
    return None


def _scale(r: Range, c: float) -> Range | None:
    if c == 0:  # an infinite bound may be an actual inf, and inf * 0 is nan
        return (0.0, 0.0) if math.isfinite(r[0]) and math.isfinite(r[1]) else None
    lo, hi = r[0] * c, r[1] * c
    return (min(lo, hi), max(lo, hi))


def _add(a: Range, b: Range) -> Range:
    return (a[0] + b[0], a[1] + b[1])


def _arange(n: fx.Node) -> Range | None:
    """Bounds of aten.arange: [start, end - 1] for a positive static step."""
    args = list(n.args)
    if n.target is aten.arange.default:
        start, end, step = 0, args[0], 1
    elif n.target is aten.arange.start:
        start, end, step = args[0], args[1], 1
    elif n.target is aten.arange.start_step:
        start, end, step = args[0], args[1], args[2]
    else:
        return None
    start_v, step_v = _number(start), _number(step)
    if start_v is None or step_v is None or step_v <= 0:
        return None
    end_v = _number(end)  # a run-time size (SymInt node) leaves the top open
    return (start_v, end_v - 1 if end_v is not None else INF)


def value_ranges(
    gm: fx.GraphModule,
    consts: Mapping[fx.Node, torch.Tensor],
    dtype_of: Callable[[fx.Node], torch.dtype | None],
) -> dict[fx.Node, Range]:
    """Sound bounds ``(lo, hi)`` per node (see the module docstring).

    ``consts``: the values of nodes that are the same on every run (buffers, parameters);
    ``dtype_of``: a node's dtype (the same on every run), None when it is not a tensor.
    """
    out: dict[fx.Node, Range] = {}

    def rng(a: Any) -> Range | None:
        if isinstance(a, fx.Node):
            return out.get(a)
        c = _number(a)
        return None if c is None else (c, c)

    for n in gm.graph.nodes:
        r = _node_range(n, consts, rng, dtype_of)
        if r is not None and not (math.isnan(r[0]) or math.isnan(r[1])):
            out[n] = r
    return out


def _node_range(n: fx.Node, consts, rng, dtype_of) -> Range | None:
    if n in consts:
        v = consts[n]
        if not isinstance(v, torch.Tensor) or v.numel() == 0 or v.is_complex():
            return None
        v = v.detach().to("cpu", torch.float64)
        return (float(v.min()), float(v.max()))
    if n.op != "call_function":
        return None
    t, args = n.target, n.args
    if t in PRESERVING or (
        t in (aten._to_copy.default, aten.to.dtype) and _same_dtype(n, dtype_of)
    ):
        return rng(args[0])
    if t in (aten.arange.default, aten.arange.start, aten.arange.start_step):
        return _arange(n)
    if t in _FILLS:
        return (_FILLS[t], _FILLS[t])
    if t in (aten.full.default, aten.full_like.default, aten.fill.Scalar):
        c = _number(args[1])
        return None if c is None else (c, c)
    if t in _COMPARE:
        a, c = rng(args[0]), _number(args[1])
        return None if a is None or c is None else _COMPARE[t](a, c)
    if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, operator.add):
        a, b = rng(args[0]), rng(args[1])
        alpha = _number(n.kwargs.get("alpha", 1))
        if a is None or b is None or alpha is None:
            return None
        sign = -1.0 if t in (aten.sub.Tensor, aten.sub.Scalar) else 1.0
        b = _scale(b, sign * alpha)
        return None if b is None else _add(a, b)
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        a, b = rng(args[0]), rng(args[1])
        if a is None or b is None:
            return None
        if b[0] == b[1]:
            return _scale(a, b[0])
        if a[0] == a[1]:
            return _scale(b, a[0])
        corners = [x * y for x in a for y in b if not (math.isinf(x) or math.isinf(y))]
        if len(corners) < 4:
            return None  # an open side times a range spanning signs: give up, do not guess
        return (min(corners), max(corners))
    if t in (aten.logical_not.default, aten.bitwise_not.default) and _is_bool(n, dtype_of):
        a = rng(args[0])
        return None if a is None else (1.0 - a[1], 1.0 - a[0])
    if t in (aten.logical_and.default, aten.bitwise_and.Tensor, aten.__and__.Tensor) and _is_bool(
        n, dtype_of
    ):
        a, b = rng(args[0]), rng(args[1])
        return None if a is None or b is None else (min(a[0], b[0]), min(a[1], b[1]))
    if t in (aten.logical_or.default, aten.bitwise_or.Tensor, aten.__or__.Tensor) and _is_bool(
        n, dtype_of
    ):
        a, b = rng(args[0]), rng(args[1])
        return None if a is None or b is None else (max(a[0], b[0]), max(a[1], b[1]))
    return None


def _is_bool(n: fx.Node, dtype_of) -> bool:
    return dtype_of(n) == torch.bool and all(
        dtype_of(a) == torch.bool for a in n.args if isinstance(a, fx.Node)
    )


def _same_dtype(n: fx.Node, dtype_of) -> bool:
    src = n.args[0]
    return isinstance(src, fx.Node) and dtype_of(n) is not None and dtype_of(n) == dtype_of(src)


def all_true(n: Any, ranges: Mapping[fx.Node, Range], dtype: torch.dtype | None) -> bool:
    """Whether ``n`` (of dtype ``dtype``) is a bool tensor proven True everywhere, every run."""
    r = ranges.get(n) if isinstance(n, fx.Node) else None
    return r is not None and dtype == torch.bool and r[0] >= 1.0


def all_zero(n: Any, ranges: Mapping[fx.Node, Range], dtype: torch.dtype | None) -> bool:
    """Whether ``n`` is a floating tensor proven zero everywhere on every run."""
    r = ranges.get(n) if isinstance(n, fx.Node) else None
    return r is not None and dtype is not None and dtype.is_floating_point and r == (0.0, 0.0)
