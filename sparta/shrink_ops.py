"""How a compact (shrunk) layout passes through each op: one entry per op family.

An entry ``Through(layout, emit)`` says, for an op whose inputs may be compact:

- ``layout(a, n, v)``: the compact layout of its output (``Compact``), or None when the op
  needs its inputs at full size. ``a`` is the running ``Analysis`` (example values, masks,
  the layouts found so far), ``n`` the node, ``v`` its example value. The analysis then checks
  the one invariant that makes every entry exact: every index the output drops is pruned in
  the output's propagated mask (zero or unused), so putting zeros there, as the masked model
  may, changes no output. An entry only has to say how the kept indices map through the op
  (channel-separable ops keep them; views and cat/split shift them).
- ``emit(em, n, args, kwargs, c)``: the rewrite of the op's (already mapped) arguments when it
  runs on compact values: sizes it names, per-channel parameters sliced (``em.sliced``), group
  counts. None when the op needs no rewrite.

The framework is here; each op's entry sits in its propagation-rule file
(``propagation_rules/<family>.py``, under "Compact layout"), beside its propagation rule, so an
op is one file. Pointwise ATen ops (``torch.Tag.pointwise``) share one entry
(``propagation_rules/elementwise.py``). Convolutions and linears, which produce compact values,
are in ``sparta/shrink.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class Compact:
    """A value computed only at ``keep`` (sorted int64 indices) along ``dim``; ``full`` is the
    size of that dim when expanded."""

    dim: int  # non-negative
    keep: torch.Tensor
    full: int
    # The values of the dropped indices when some are constants rather than zeros (a unit whose
    # weights are pruned but whose bias is kept, and what follows it): a float vector of size
    # ``full``, read at the dropped indices only. None = all dropped values are zero.
    fill: torch.Tensor | None = None

    def same(self, other: Compact | None) -> bool:
        return other is not None and self.dim == other.dim and torch.equal(self.keep, other.keep)


@dataclass(frozen=True)
class Through:
    layout: Callable[[Any, fx.Node, Any], Compact | None]
    emit: Callable[[Any, fx.Node, tuple, dict, Compact], tuple[tuple, dict]] | None = None
    op: Any = None  # the op to call on compact values, when not the same
    pieces: bool = False  # returns several pieces (a split), each taken by a getitem


THROUGH: dict[Any, Through] = {}


def register_through(*ops: Any, emit=None, op_compact=None, pieces: bool = False) -> Callable:
    """Register the compact-layout pass of ``ops`` (ops missing from this torch are skipped);
    ``torch.Tag.pointwise`` registers the entry every pointwise-tagged op without its own uses."""

    def deco(fn):
        for op in ops:
            if op is not None:
                if op in THROUGH:
                    raise ValueError(f"{op} already has a compact-layout entry")
                THROUGH[op] = Through(fn, emit, op_compact, pieces)
        return fn

    return deco


def aten_op(packet: str, overload: str) -> Any:
    """``aten.<packet>.<overload>``, or None when this torch lacks it."""
    p = getattr(aten, packet, None)
    return getattr(p, overload, None) if p is not None else None


def lookup_through(op: Any) -> Through | None:
    """The entry of ``op``; pointwise ATen ops (``torch.Tag.pointwise``) share one."""
    entry = THROUGH.get(op)
    if entry is None and torch.Tag.pointwise in getattr(op, "tags", ()):
        return THROUGH.get(torch.Tag.pointwise)
    return entry


def tensor_args(n: fx.Node) -> list[fx.Node]:
    """The node's tensor arguments (inside lists too), in order."""
    out = []
    for a in list(n.args) + list(n.kwargs.values()):
        for x in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(x, fx.Node):
                out.append(x)
    return out


def channel_src(a, n: fx.Node, v) -> Compact | None:
    """The layout of input 0 when it is compact along the channel dim (1) of a batched value."""
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    c = a.layout.get(src)
    return c if c is not None and c.dim == 1 and v.dim() == a.value(src).dim() else None


def first(a, n: fx.Node, v) -> Compact | None:
    """The layout of input 0."""
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    return a.layout.get(src)


def slice_params(*positions: int):
    """Slice the per-channel 1-D parameters at ``positions`` (weight, bias, running stats)."""

    def emit(em, n, args, kwargs, c):
        args = list(args)
        for i in positions:
            if i < len(n.args) and isinstance(n.args[i], fx.Node):
                xv = em.value(n.args[i])
                if xv.dim() == 1 and xv.shape[0] == c.full and c.full != 1:
                    args[i] = em.sliced(n.args[i], 0, c.keep)
        return tuple(args), kwargs

    return emit
