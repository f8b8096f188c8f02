"""Writes by index: scatter (all variants), scatter_add, scatter_reduce, index_add, index_copy,
index_fill, index_put, masked_scatter; and ops with integer outputs that read values by
position: one_hot, bucketize, searchsorted, embedding_bag.

With a constant index (``call.consts``) the written positions are known and the masks are
exact: an output is kept where its source is (the written value, or ``self`` where nothing is
written), and a source element is used where the output it reaches is kept. Otherwise a write
may land anywhere along ``dim`` within the index's extent: the output is kept where ``self`` is
or some source of its line is, and sources are used where their line has a kept output. An
index is a selector — pruning it (forcing 0) would move the write — so it is used wherever any
output is kept.
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule

from ._util import broadcast_back, full, is_mask, scalar_is_zero

aten = torch.ops.aten


def _ops(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _any_used(m: Mask | None, out: Mask) -> Mask | None:
    return full(m.shape, bool(out.any())) if is_mask(m) else None


def _const_index(call: Call, name: str = "index") -> torch.Tensor | None:
    c, m = call.consts.get(name), call.inputs.get(name)
    if c is None or not is_mask(m) or not bool(m.all()):
        return None  # unknown, or with pruned elements (read as 0 at run time)
    return c.long()


def _source(call: Call) -> tuple[Mask | None, bool]:
    """(mask of the tensor written, or None for a scalar; whether a scalar is nonzero)."""
    for name in ("src", "source", "values"):
        m = call.inputs.get(name)
        if is_mask(m):
            return m, True
    value = call.params.get("value", call.params.get("src"))
    return None, not scalar_is_zero(value)


def _region(index: Mask, dim: int, shape: torch.Size) -> tuple:
    return tuple(slice(None) if d == dim else slice(0, index.shape[d]) for d in range(len(shape)))


@register_rule(
    aten.scatter.src, aten.scatter.value, aten.scatter.reduce, aten.scatter.value_reduce,
    aten.scatter_add, aten.scatter_reduce.two,
)  # fmt: skip
def scatter(call: Call) -> Refined:
    """out = self with src (or a scalar) written (or reduced) at index along dim."""
    x, index, out = call.inputs["self"], call.inputs["index"], call.out
    if x.dim() == 0 or not is_mask(index):
        return Refined()
    dim = call.params["dim"] % x.dim()
    src, scalar_nz = _source(call)
    region = _region(index, dim, x.shape)
    idx = _const_index(call)
    within = tuple(slice(0, s) for s in index.shape)  # the part of src that is written
    src_in = src[within] if src is not None else full(index.shape, scalar_nz)
    if idx is not None:
        written = torch.zeros(x.shape, dtype=torch.uint8).scatter(dim, idx, 1).bool()
        landed = torch.zeros(x.shape, dtype=torch.uint8)
        landed = landed.scatter_reduce(dim, idx, src_in.to(torch.uint8), "amax").bool()
        replaces = call.op in (aten.scatter.src, aten.scatter.value)
        fwd = torch.where(written, landed, x) if replaces else x | landed
        self_used = out & ~written if replaces else out
        reach = torch.gather(out, dim, idx)
    else:
        lines = full(x.shape, False)
        lines[region] = src_in.any(dim=dim, keepdim=True).expand(lines[region].shape)
        fwd = x | lines
        self_used = out
        reach = out[region].any(dim=dim, keepdim=True).expand(index.shape)
    src_used = None
    if src is not None:
        src_used = full(src.shape, False)
        src_used[within] = reach
    names = {n: src_used for n in ("src",) if is_mask(call.inputs.get(n))}
    return refine(out=fwd, self=self_used, index=_any_used(index, out), **names)


@register_rule(
    aten.index_add, aten.index_copy, aten.index_fill.int_Tensor, aten.index_fill.int_Scalar
)
def index_write(call: Call) -> Refined:
    """Whole slices along dim written (copied, added, filled) at the positions in index."""
    x, index, out = call.inputs["self"], call.inputs["index"], call.out
    if x.dim() == 0 or not is_mask(index):
        return Refined()
    dim = call.params["dim"] % x.dim()
    name = call.op.overloadpacket
    src = call.inputs.get("source")
    value = call.inputs.get("value")
    idx = _const_index(call)
    fill_nz = bool(value.any()) if is_mask(value) else not scalar_is_zero(call.params.get("value"))
    if name is aten.index_add and scalar_is_zero(call.params.get("alpha", 1)):
        return refine(
            out=x, self=out, index=full(index.shape, False), source=full(src.shape, False)
        )
    if idx is not None:
        flat = idx.reshape(-1)
        written = torch.zeros(x.shape[dim], dtype=torch.bool)
        written[flat] = True
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        written = written.reshape(shape).expand(x.shape)
        if src is not None:
            landed = torch.zeros(x.shape, dtype=torch.float32)
            landed = landed.index_add(dim, flat, src.float()) > 0
            src_used = out.index_select(dim, flat)
        else:
            landed = written & fill_nz
            src_used = None
        replaces = name is not aten.index_add
        fwd = torch.where(written, landed, x) if replaces else x | landed
        self_used = out & ~written if replaces else out
    else:
        if src is not None:
            landed = src.any(dim=dim, keepdim=True).expand(x.shape)
            src_used = out.any(dim=dim, keepdim=True).expand(src.shape)
        else:
            landed = full(x.shape, fill_nz)
            src_used = None
        fwd, self_used = x | landed, out
    extra = {"source": src_used} if src is not None else {}
    if is_mask(value):
        extra["value"] = full(value.shape, bool(out.any()))
    return refine(out=fwd, self=self_used, index=_any_used(index, out), **extra)


@register_rule(aten.index_put, *_ops("_index_put_impl"))
def index_put(call: Call) -> Refined:
    """Advanced-index writes: positions unknown, so values may land anywhere."""
    x, values, out = call.inputs["self"], call.inputs["values"], call.out
    fwd = x | bool(values.any()) if is_mask(values) else None
    indices = call.inputs["indices"]
    return refine(
        out=fwd,
        self=out,
        values=_any_used(values, out),
        indices=tuple(_any_used(m, out) for m in indices),
    )


@register_rule(aten.masked_scatter)
def masked_scatter(call: Call) -> Refined:
    x, mask, source, out = call.inputs["self"], call.inputs["mask"], call.inputs["source"], call.out
    may = torch.broadcast_to(mask, out.shape) if is_mask(mask) else full(out.shape, True)
    fwd = x | (may & bool(source.any()))
    return refine(out=fwd, self=out, mask=_any_used(mask, out), source=_any_used(source, out))


@register_rule(aten.one_hot)
def one_hot(call: Call) -> Refined:
    """Integer classes to one-hot rows: a class is read where its row is kept."""
    return refine(self=call.out.any(dim=-1))


@register_rule(*_ops("bucketize", "searchsorted"))
def bucketize(call: Call) -> Refined:
    """Integer bucket of each value: a value is read where its bucket is kept, the boundaries
    wherever any bucket is."""
    out = call.out
    boundaries = call.inputs.get("boundaries", call.inputs.get("sorted_sequence"))
    name = "boundaries" if "boundaries" in call.inputs else "sorted_sequence"
    x = call.inputs.get("self")
    back = {name: _any_used(boundaries, out)}
    if is_mask(x):
        back["self"] = broadcast_back(out, x.shape)
    return refine(**back)


@register_rule(*_ops("embedding_bag", "_embedding_bag"))
def embedding_bag(call: Call) -> Refined:
    """out[b, d] reduces weight[indices of bag b, d]: zero where column d is pruned (sum, mean
    and max of zeros); column d of every row is used where any bag's d is kept."""
    w, out = call.inputs["weight"], call.outputs[0]
    col = w.any(dim=0)
    used = out.reshape(-1, out.shape[-1]).any(dim=0)
    rest = {n: _any_used(m, out) for n, m in call.inputs.items() if n != "weight" and is_mask(m)}
    outs = (col.expand(out.shape),) + (None,) * (len(call.outputs) - 1)
    return refine(out=outs, weight=used.expand(w.shape), **rest)
