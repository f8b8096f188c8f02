"""Indexing: cat, stack, split/chunk/unbind, slice, select, narrow, tril/triu, index_select,
gather, embedding, advanced indexing.

Positional ops are exact both ways: backward scatters the output masks to the positions read,
and positions an op does not read are unused by it. Value-indexed ops (embedding, gather,
index_select) are exact when the indices are compile-time constants (``call.consts``), and
otherwise reason per line: an output is pruned if every element it could have read is pruned.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparta.registry import Call, Mask, Refined, refine, register_rule
from sparta.shrink_ops import Compact, first, register_through

from ._util import any_, full, is_mask

aten = torch.ops.aten


def _ops(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


@register_rule(aten.cat, *_ops("concat", "concatenate"))
def cat(call: Call) -> Refined:
    masks = call.inputs["tensors"]
    if not all(is_mask(m) for m in masks):
        return Refined()
    out = call.out
    dim = call.params.get("dim", 0) % max(out.dim(), 1)
    # ATen skips legacy empty 1-D inputs when concatenating higher-rank tensors.
    parts = [
        i for i, m in enumerate(masks) if not (m.dim() == 1 and m.numel() == 0 < out.dim() - 1)
    ]
    pieces = out.split([masks[i].shape[dim] for i in parts], dim)
    back: list[Mask] = list(masks)
    for i, p in zip(parts, pieces):
        back[i] = p
    return refine(out=torch.cat([masks[i] for i in parts], dim), tensors=tuple(back))


@register_rule(aten.stack)
def stack(call: Call) -> Refined:
    masks = call.inputs["tensors"]
    if not all(is_mask(m) for m in masks):
        return Refined()
    dim = call.params.get("dim", 0) % (masks[0].dim() + 1)
    return refine(out=torch.stack(masks, dim), tensors=tuple(call.out.unbind(dim)))


@register_rule(*_ops("split", "split_with_sizes", "chunk", "unsafe_split",
                     "unsafe_split_with_sizes", "tensor_split", "unbind", "unsafe_chunk",
                     "split_copy", "split_with_sizes_copy", "unbind_copy"))  # fmt: skip
def split(call: Call) -> Refined:
    """Outputs are consecutive pieces along ``dim`` (unbind: single slices)."""
    x = call.inputs["self"]
    dim = call.params.get("dim", 0) % max(x.dim(), 1)
    outs = list(call.outputs)
    if call.op.overloadpacket in _ops("unbind", "unbind_copy"):
        fwd = tuple(x.unbind(dim))
        back = torch.stack([o if o is not None else full(f.shape, True) for o, f in zip(outs, fwd)],
                           dim)  # fmt: skip
        return refine(out=fwd, self=back)
    if any(o is None for o in outs) or sum(o.shape[dim] for o in outs) != x.shape[dim]:
        return Refined()
    fwd = tuple(x.split([o.shape[dim] for o in outs], dim))
    return refine(out=fwd, self=torch.cat(outs, dim))


def _region(x: Mask, dim: int, index: slice | int) -> tuple:
    return (slice(None),) * dim + (index,)


def _scatter_region(call: Call, region: tuple) -> Refined:
    x = call.inputs["self"]
    back = full(x.shape, False)
    back[region] = call.out
    return refine(out=x[region], self=back)


@register_rule(aten.slice.Tensor, *_ops("slice_copy"))
def slice_(call: Call) -> Refined:
    x = call.inputs["self"]
    dim = call.params["dim"] % x.dim()
    sl = slice(call.params.get("start"), call.params.get("end"), call.params.get("step", 1))
    return _scatter_region(call, _region(x, dim, sl))


@register_rule(aten.select.int, *_ops("select_copy"))
def select(call: Call) -> Refined:
    x = call.inputs["self"]
    dim = call.params["dim"] % x.dim()
    return _scatter_region(call, _region(x, dim, call.params["index"]))


@register_rule(aten.narrow, *_ops("narrow_copy"))
def narrow(call: Call) -> Refined:
    x = call.inputs["self"]
    dim = call.params["dim"] % x.dim()
    start = (
        call.params["start"] % x.shape[dim] if call.params["start"] < 0 else call.params["start"]
    )
    return _scatter_region(call, _region(x, dim, slice(start, start + call.params["length"])))


@register_rule(aten.tril, aten.triu)
def tril(call: Call) -> Refined:
    """Zeros outside the kept triangle: exact both ways."""
    x = call.inputs["self"]
    tri = torch.ones(x.shape[-2:], dtype=torch.bool)
    keep = (
        tri.tril(call.params["diagonal"])
        if call.op.overloadpacket is aten.tril
        else tri.triu(call.params["diagonal"])
    )
    return refine(out=x & keep, self=call.out & keep)


def _index_value(call: Call, name: str) -> torch.Tensor | None:
    """A constant index tensor as the op sees it: pruned index elements read as 0."""
    c = call.consts.get(name)
    m = call.inputs.get(name)
    if c is None or not is_mask(m):
        return None
    return torch.where(m, c, torch.zeros_like(c)).long()


@register_rule(aten.embedding)
def embedding(call: Call) -> Refined:
    """out[..., d] = weight[indices[...], d]."""
    w, ids, out = call.inputs["weight"], call.inputs["indices"], call.out
    d = w.shape[-1]
    col_nz = any_(w, dim=0)
    idx = _index_value(call, "indices")
    flat = out.reshape(-1, d)
    if idx is None:
        fwd = col_nz.expand(out.shape)
        w_used = any_(flat, dim=0).expand(w.shape)
    else:
        fwd = w[idx]
        count = torch.zeros(w.shape, dtype=torch.float32).index_add_(
            0, idx.reshape(-1), flat.float()
        )
        w_used = count > 0
    # An index is used where it selects a kept output, or a claimed zero that another row
    # (index 0, if it were pruned) would not give.
    ids_used = ((out | ~fwd) & col_nz).any(dim=-1).reshape(ids.shape)
    return refine(out=fwd, weight=w_used, indices=ids_used)


@register_rule(aten.index_select)
def index_select(call: Call) -> Refined:
    x, out = call.inputs["self"], call.out
    dim = call.params["dim"] % max(x.dim(), 1)
    idx = _index_value(call, "index")
    if x.dim() == 0:
        return refine(out=x.reshape(out.shape), self=out.reshape(x.shape))
    if idx is None:
        fwd = x.any(dim=dim, keepdim=True).expand(out.shape)
        back = out.any(dim=dim, keepdim=True).expand(x.shape)
    else:
        fwd = x.index_select(dim, idx.reshape(-1))
        z = torch.zeros(x.shape, dtype=torch.float32)
        back = z.index_add_(dim, idx.reshape(-1), out.float()) > 0
    sel = out | ~fwd if idx is not None else out  # a claimed zero rests on the index too
    lines = sel.movedim(dim, 0).reshape(out.shape[dim], -1).any(dim=1)
    return refine(out=fwd, self=back, index=lines.reshape(call.inputs["index"].shape))


@register_rule(aten.gather)
def gather(call: Call) -> Refined:
    """out[p] = self[p with p[dim] := index[p]]; index may be smaller than self off ``dim``."""
    x, index, out = call.inputs["self"], call.inputs["index"], call.out
    if x.dim() == 0:
        return refine(out=x.reshape(out.shape), self=out.reshape(x.shape), index=out)
    dim = call.params["dim"] % x.dim()
    idx = _index_value(call, "index")
    if idx is not None:
        fwd = torch.gather(x, dim, idx)
        z = torch.zeros(x.shape, dtype=torch.float32)
        back = z.scatter_add_(dim, idx, out.float()) > 0
    else:
        within = tuple(slice(0, s) if d != dim else slice(None) for d, s in enumerate(index.shape))
        fwd = x.any(dim=dim, keepdim=True)[within].expand(out.shape)
        back = full(x.shape, False)
        back[within] = out.any(dim=dim, keepdim=True).expand(back[within].shape)
    return refine(out=fwd, self=back, index=out | ~fwd if idx is not None else out)


@register_rule(aten.index.Tensor)
def index_tensor(call: Call) -> Refined:
    """Advanced indexing: conservative (all or nothing) — an all-pruned input gives an all-pruned
    output; inputs are unused only when no output is kept."""
    x, out = call.inputs["self"], call.out
    used = bool(out.any())
    indices = tuple(full(m.shape, used) if is_mask(m) else None for m in call.inputs["indices"])
    fwd = None if bool(x.any()) else full(out.shape, False)
    return refine(out=fwd, self=full(x.shape, used), indices=indices)


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


def _cat_layout(a, n, v):
    tensors = n.args[0]
    dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % v.dim()
    lays = [a.layout.get(x) for x in tensors]
    if all(c is None for c in lays):
        return None
    if any(c is not None and c.dim != dim for c in lays):
        first = next(c for c in lays if c is not None)
        return first if all(first.same(c) for c in lays) else None
    keeps, off = [], 0
    for x, c in zip(tensors, lays, strict=True):
        size = a.value(x).shape[dim]
        keeps.append((c.keep if c is not None else torch.arange(size)) + off)
        off += size
    return Compact(dim, torch.cat(keeps), off)


register_through(aten.cat.default)(_cat_layout)
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default}


def _split_layout(a, n, v):
    """A split's layout is its input's; each piece (getitem) takes its share."""
    return first(a, n, v)


def _split_sizes(a_value, n: fx.Node) -> tuple[int, list[int]]:
    src = a_value(n.args[0])
    dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % src.dim()
    return dim, [p.shape[dim] for p in a_value(n)]


def _split_emit(em, n, args, kwargs, c):
    dim, sizes = _split_sizes(em.value, n)
    if dim != c.dim:
        return (args[0], sizes, dim), {}
    counts, off = [], 0
    for s in sizes:
        counts.append(int(((c.keep >= off) & (c.keep < off + s)).sum()))
        off += s
    return (args[0], counts, dim), {}


def piece_layout(a, n: fx.Node) -> Compact | None:
    """The layout of ``getitem(split, i)`` when the split runs on a compact value."""
    split, i = n.args
    c = a.layout.get(split)
    if c is None:
        return None
    dim, sizes = _split_sizes(a.value, split)
    if dim != c.dim:
        return c
    off = sum(sizes[:i])
    sel = (c.keep >= off) & (c.keep < off + sizes[i])
    fill = None if c.fill is None else c.fill[off : off + sizes[i]]
    return Compact(dim, c.keep[sel] - off, sizes[i], fill)


register_through(*SPLITS, emit=_split_emit, op_compact=aten.split_with_sizes.default, pieces=True)(
    _split_layout
)
register_through(operator.getitem)(lambda a, n, v: piece_layout(a, n))
