"""Sorts and selections along a dim: sort, argsort, msort, topk, kthvalue, median, nanmedian,
mode, take_along_dim.

Which element lands where depends on all values of its line (the elements along ``dim``), so a
line is the unit: the values are zero where the whole line is pruned (the sort of zeros is
zeros, and so is any selection from them), and a line is used as a whole where any of its
outputs (values or indices) is kept. Index outputs are integers that are never claimed zero.
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule

from ._util import broadcast_back, full, is_mask

aten = torch.ops.aten


def _ops(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _dim(call: Call, x: Mask) -> int:
    if call.op.overloadpacket is aten.msort:
        return 0
    return call.params.get("dim", -1) % x.dim()


def _as_line(m: Mask, x: Mask, dim: int) -> Mask:
    """An output mask with ``dim`` present (keepdim=False outputs lack it)."""
    return m if m.dim() == x.dim() else m.unsqueeze(dim)


@register_rule(
    *_ops("sort", "argsort", "msort", "topk", "kthvalue", "mode"),
    aten.median.dim,
    aten.nanmedian.dim,
)  # fmt: skip
def line(call: Call) -> Refined:
    x = call.inputs["self"]
    if x.dim() == 0:
        return refine(out=tuple(None for _ in call.outputs), self=call.outputs[0])
    dim = _dim(call, x)
    used = full(x.shape[:dim] + (1,) + x.shape[dim + 1 :], False)
    for o in call.outputs:
        used = used | _as_line(o, x, dim).any(dim=dim, keepdim=True)
    kept = x.any(dim=dim, keepdim=True)
    outs: list[Mask | None] = [None] * len(call.outputs)
    if call.op.overloadpacket is not aten.argsort:  # values first, then indices
        values = call.outputs[0]
        fwd = kept.expand(_as_line(values, x, dim).shape)
        outs[0] = fwd if values.dim() == x.dim() else fwd.squeeze(dim)
    return refine(out=tuple(outs), self=used.expand(x.shape))


@register_rule(aten.median.default, aten.nanmedian.default)
def median_all(call: Call) -> Refined:
    x = call.inputs["self"]
    return refine(out=x.any().reshape(call.out.shape), self=call.out.any().expand(x.shape))


@register_rule(aten.take_along_dim)
def take_along_dim(call: Call) -> Refined:
    """Gathers along ``dim`` by data-dependent indices (the whole flattened tensor without a
    dim): zero where the line read is entirely pruned."""
    x, idx, out = call.inputs["self"], call.inputs["indices"], call.out
    if not is_mask(idx):
        return Refined()
    dim = call.params.get("dim")
    if dim is None or x.dim() == 0:
        return refine(
            out=x.any().expand(out.shape),
            self=out.any().expand(x.shape),
            indices=broadcast_back(out, idx.shape),
        )
    dim %= x.dim()
    kept = x.any(dim=dim, keepdim=True)
    line_used = broadcast_back(out.any(dim=dim, keepdim=True), kept.shape)
    return refine(
        out=torch.broadcast_to(kept, out.shape),
        self=line_used.expand(x.shape),
        indices=broadcast_back(out, idx.shape),
    )
