"""Elements whose value is fixed whatever the inputs (partial constants).

Masks say where values are zero or unused; a fixed pattern of attention scores needs one more
fact: ``masked_fill(scores, ~pattern, -inf)`` makes those scores ``-inf`` on every run, so the
following softmax is exactly zero there. This forward pass finds such elements through
``masked_fill``/``where`` with constant conditions, shape ops and softmax; the engine then
seeds every element known to be zero as pruned.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping

import torch
import torch.fx as fx

aten = torch.ops.aten
Known = tuple[torch.Tensor, torch.Tensor]  # (bool: value fixed, the fixed values)

SHAPE_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.transpose.int,
    aten.permute.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.slice.Tensor,
    aten.select.int,
    aten.t.default,
}
IDENTITY_OPS = {
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten.detach.default,
    aten.dropout.default,
    aten._to_copy.default,
    aten.to.dtype,
}
SOFTMAX = {aten._softmax.default, aten.softmax.int}


def known_values(
    gm: fx.GraphModule, values: Mapping[fx.Node, object], consts: Mapping[fx.Node, torch.Tensor]
) -> dict[fx.Node, Known]:
    known: dict[fx.Node, Known] = {}
    for n in gm.graph.nodes:
        out = values.get(n)
        if n.op != "call_function" or not isinstance(out, torch.Tensor) or n in consts:
            continue
        k = _known(n, out, known, consts)
        if k is not None and bool(k[0].any()):
            known[n] = k
    return known


def _const(a: object, consts: Mapping[fx.Node, torch.Tensor]) -> torch.Tensor | None:
    return consts.get(a) if isinstance(a, fx.Node) else None


def _known(n: fx.Node, out: torch.Tensor, known: dict, consts: Mapping) -> Known | None:
    t, args = n.target, n.args
    src = known.get(args[0]) if args and isinstance(args[0], fx.Node) else None
    if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        cond = _const(args[1], consts)
        value = args[2] if not isinstance(args[2], fx.Node) else _const(args[2], consts)
        if cond is None or value is None:
            return None
        cond = cond.expand(out.shape).cpu()
        fill = torch.full(out.shape, float(value))
        if src is None:
            return cond.clone(), torch.where(cond, fill, torch.zeros(()))
        return cond | src[0], torch.where(cond, fill, src[1])
    if src is None:
        return None
    if t in IDENTITY_OPS:
        return src
    if t in SHAPE_OPS:
        rest = [a if not isinstance(a, fx.Node) else None for a in args[1:]]
        if any(r is None for r in rest) and any(isinstance(a, fx.Node) for a in args[1:]):
            return None  # a size computed in the graph: give up (sound: nothing known)
        shape_args = [
            list(out.shape)
            if t
            in (
                aten.view.default,
                aten.reshape.default,
                aten._unsafe_view.default,
                aten.expand.default,
            )
            and i == 0
            else r
            for i, r in enumerate(rest)
        ]
        return t(src[0], *shape_args), t(src[1], *shape_args)
    if t in SOFTMAX:
        dim = args[1]
        neg = src[0] & (src[1] == float("-inf"))
        # A row of all -inf gives NaN, not zeros: claim only rows with a free element.
        zero = neg & ~neg.all(dim=dim, keepdim=True)
        return zero, torch.zeros(out.shape)
    if t is operator.getitem:
        return None
    return None


def known_zeros(known: Mapping[fx.Node, Known]) -> dict[fx.Node, torch.Tensor]:
    """Per node: elements that are exactly zero on every run."""
    return {n: k & (v == 0) for n, (k, v) in known.items() if bool((k & (v == 0)).any())}
