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

Convolutions and linears, which produce compact values, are in ``sparta/shrink.py``.
"""

from __future__ import annotations

import operator
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


THROUGH: dict[Any, Through] = {}


def register_through(*ops: Any, emit=None, op_compact=None) -> Callable:
    """Register the compact-layout pass of ``ops`` (ops missing from this torch are skipped)."""

    def deco(fn):
        for op in ops:
            if op is not None:
                if op in THROUGH:
                    raise ValueError(f"{op} already has a compact-layout entry")
                THROUGH[op] = Through(fn, emit, op_compact)
        return fn

    return deco


def _op(packet: str, overload: str):
    p = getattr(aten, packet, None)
    return getattr(p, overload, None) if p is not None else None


def lookup_through(op: Any) -> Through | None:
    """The entry of ``op``; pointwise ATen ops (``torch.Tag.pointwise``) share one."""
    entry = THROUGH.get(op)
    if entry is None and torch.Tag.pointwise in getattr(op, "tags", ()):
        return POINTWISE
    return entry


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    out = []
    for a in list(n.args) + list(n.kwargs.values()):
        for x in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(x, fx.Node):
                out.append(x)
    return out


def _channel_src(a, n: fx.Node, v) -> Compact | None:
    """The layout of input 0 when it is compact along the channel dim (1) of a batched value."""
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    c = a.layout.get(src)
    return c if c is not None and c.dim == 1 and v.dim() == a.value(src).dim() else None


def _first(a, n: fx.Node, v) -> Compact | None:
    src = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
    return a.layout.get(src)


# --- elementwise ---------------------------------------------------------------------------


def _pointwise_layout(a, n: fx.Node, v) -> Compact | None:
    """Elementwise ops with broadcasting: every compact input has the same layout once its dims
    are aligned to the output; a full-size input is sliced at emit time."""
    found: Compact | None = None
    for x in _tensor_args(n):
        c = a.layout.get(x)
        if c is None:
            continue
        xv = a.value(x)
        if not isinstance(xv, torch.Tensor):
            return None
        out_dim = c.dim + v.dim() - xv.dim()
        cand = Compact(out_dim, c.keep, c.full)
        if found is not None and not found.same(cand):
            return None
        found = cand
    if found is None or v.shape[found.dim] != found.full:
        return None
    return found


def _pointwise_emit(em, n: fx.Node, args: tuple, kwargs: dict, c: Compact):
    """Slice full-size tensor inputs to the kept indices (aligned by broadcasting)."""
    v = em.value(n)

    def fix(orig, mapped):
        if isinstance(orig, fx.Node) and orig not in em.layout:
            xv = em.value(orig)
            if isinstance(xv, torch.Tensor):
                d = c.dim - (v.dim() - xv.dim())
                if d >= 0 and xv.shape[d] == c.full and c.full != 1:
                    return em.sliced(orig, d, c.keep)
        return mapped

    args = tuple(fix(o, m) for o, m in zip(n.args, args, strict=True))
    kwargs = {k: fix(n.kwargs[k], m) for k, m in kwargs.items()}
    return args, kwargs


POINTWISE = Through(_pointwise_layout, _pointwise_emit)

# Identity-like ops without the pointwise tag.
register_through(
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.detach.default,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.relu6.default if hasattr(aten, "relu6") else None,
    aten.mish.default,
    aten.elu.default,
    emit=_pointwise_emit,
)(_pointwise_layout)


# --- per-channel ops (channel dim 1) -------------------------------------------------------


def _slice_params(*positions: int):
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


register_through(
    aten.batch_norm.default,
    aten.instance_norm.default,
    _op("_native_batch_norm_legit_no_training", "default"),
    emit=_slice_params(1, 2, 3, 4),
)(_channel_src)
register_through(aten.prelu.default, aten._prelu_kernel.default, emit=_slice_params(1))(
    _channel_src
)


def _group_norm_layout(a, n, v):
    """Whole groups only: a group's statistics see all its channels."""
    c = _channel_src(a, n, v)
    if c is None:
        return None
    per = c.full // n.args[1]
    groups = torch.unique(c.keep // per)
    whole = (groups[:, None] * per + torch.arange(per)).flatten()
    return c if torch.equal(whole, c.keep) else None


def _group_norm_emit(em, n, args, kwargs, c):
    per = c.full // n.args[1]
    args, kwargs = _slice_params(2, 3)(em, n, args, kwargs, c)
    return (args[0], len(c.keep) // per, *args[2:]), kwargs


register_through(aten.group_norm.default, emit=_group_norm_emit)(_group_norm_layout)

POOLS = [
    _op(p, o)
    for p in (
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "_adaptive_avg_pool2d",
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "upsample_linear1d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "upsample_trilinear3d",
        "_upsample_nearest_exact2d",
    )
    for o in ("default", "vec")
]
register_through(*POOLS)(_channel_src)


def _pad_layout(a, n, v):
    """Padding of the trailing dims only (constant_pad_nd, reflection/replication pads)."""
    c = _first(a, n, v)
    pad = n.args[1]
    if c is None or c.dim >= v.dim() - len(pad) // 2:
        return None
    return c


register_through(
    aten.constant_pad_nd.default,
    _op("reflection_pad2d", "default"),
    _op("replication_pad2d", "default"),
    _op("pad", "default"),
)(_pad_layout)


def _pixel_shuffle_layout(a, n, v):
    c = _channel_src(a, n, v)
    if c is None:
        return None
    r2 = n.args[1] ** 2
    if n.target == aten.pixel_unshuffle.default:
        keep = (c.keep[:, None] * r2 + torch.arange(r2)).flatten()
        return Compact(1, keep, c.full * r2)
    blocks = torch.unique(c.keep // r2)
    if not torch.equal((blocks[:, None] * r2 + torch.arange(r2)).flatten(), c.keep):
        return None
    return Compact(1, blocks, c.full // r2)


register_through(aten.pixel_shuffle.default, aten.pixel_unshuffle.default)(_pixel_shuffle_layout)


def _reduce_layout(a, n, v):
    """mean/sum/amax over dims other than the compact one (the squeeze-excite pool)."""
    c = _first(a, n, v)
    if c is None or len(n.args) < 2 or not n.args[1]:
        return None
    src = a.value(n.args[0])
    dims = {d % src.dim() for d in n.args[1]}
    keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if c.dim in dims:
        return None
    out_dim = c.dim if keepdim else c.dim - sum(d < c.dim for d in dims)
    return Compact(out_dim, c.keep, c.full)


register_through(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)(_reduce_layout)


# --- views, transposes, cat and split ------------------------------------------------------


def _transpose_layout(a, n, v):
    c = _first(a, n, v)
    if c is None:
        return None
    d0, d1 = (d % v.dim() for d in n.args[1:3])
    return Compact({d0: d1, d1: d0}.get(c.dim, c.dim), c.keep, c.full)


def _permute_layout(a, n, v):
    c = _first(a, n, v)
    if c is None:
        return None
    return Compact([d % v.dim() for d in n.args[1]].index(c.dim), c.keep, c.full)


register_through(aten.transpose.int)(_transpose_layout)
register_through(aten.permute.default)(_permute_layout)


def view_layout(src: torch.Tensor, out: torch.Tensor, c: Compact) -> Compact | None:
    """The layout of ``src.reshape(out.shape)``: a compact dim merged with others (flatten into
    a linear: its column blocks) or split into dims of which exactly one carries the kept set
    (heads)."""
    m = torch.zeros(src.shape[: c.dim + 1], dtype=torch.bool)
    m.index_fill_(c.dim, c.keep, True)
    m = m.reshape(*m.shape, *([1] * (src.dim() - c.dim - 1))).expand(src.shape)
    try:
        mo = m.reshape(out.shape)
    except RuntimeError:
        return None
    for j in range(out.dim()):
        if out.shape[j] == 1:
            continue
        others = [d for d in range(out.dim()) if d != j]
        proj = mo.any(dim=others) if others else mo
        shape = [1] * out.dim()
        shape[j] = out.shape[j]
        if torch.equal(proj.reshape(shape).expand(out.shape), mo):
            keep = proj.nonzero().flatten()
            return Compact(j, keep, out.shape[j])
    return None


def _view_layout(a, n, v):
    c = _first(a, n, v)
    if c is None or not len(c.keep):
        # Zero width (every unit pruned) fits any dim of the view and makes a -1 ambiguous:
        # the view gets the full (zero-filled) value.
        return None
    return view_layout(a.value(n.args[0]), v, c)


def _view_shape(em, n, args, kwargs, c):
    """A view/reshape of a compact value: its size along the compact dim is the kept count."""
    shape = list(args[1])
    if not (isinstance(shape[c.dim], int) and shape[c.dim] == -1):
        shape[c.dim] = len(c.keep)
    return (args[0], shape, *args[2:]), kwargs


VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


register_through(*VIEWS, emit=_view_shape)(_view_layout)
register_through(
    aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims
)(_view_layout)


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
    return _first(a, n, v)


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


register_through(*SPLITS, emit=_split_emit, op_compact=aten.split_with_sizes.default)(_split_layout)
register_through(operator.getitem)(lambda a, n, v: piece_layout(a, n))


def _sdpa_layout(a, n, v):
    """A pruned head disappears: q, k and v compact alike along the head dim, and an attention
    mask that is the same for every head."""
    q, k, vv = n.args[:3]
    c = a.layout.get(q)
    attn_mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
    mask_ok = attn_mask is None or (
        attn_mask not in a.layout and _broadcasts_over_heads(a.value(attn_mask))
    )
    same = c is not None and c.same(a.layout.get(k)) and c.same(a.layout.get(vv))
    return c if same and c.dim == v.dim() - 3 and mask_ok else None


def _broadcasts_over_heads(mask: torch.Tensor) -> bool:
    """An attention mask of shape (..., [H,] L, S) that is the same for every head."""
    return mask.dim() < 3 or mask.shape[-3] == 1


register_through(aten.scaled_dot_product_attention.default)(_sdpa_layout)
