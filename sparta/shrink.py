"""Structured shrinking: which values can be computed *compact* along one dim.

A value is compact along ``dim`` with kept indices ``keep`` when every index outside ``keep``
is pruned in its propagated mask (zero or unused). Linears and convolutions the planner shrinks
produce compact values (fewer output features/channels; grouped convolutions keep whole groups,
with the group count rewritten) and consume them (fewer input features/channels). Between them
a compact value flows through every op with an entry in ``sparta/shrink_ops.py`` (elementwise
ops, norms, pooling, upsampling, pixel shuffle, PReLU, residual adds of equal layouts, cat and
split, views and flattening, squeeze-excite gates, attention heads). Anywhere else it is
expanded back with zeros, which is exactly what applying the mask means, so the result equals
the masked dense model.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from .calls import bound_arguments
from .shrink_ops import Compact, lookup_through

aten = torch.ops.aten
LINEAR = aten.linear.default
SDPA = aten.scaled_dot_product_attention.default
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Convolutions: op -> transposed (weight (Cin, Cout/G, k...)) or not (weight (Cout, Cin/G, k...)).
CONVS: dict[Any, bool] = {
    op: False
    for op in (
        aten.conv1d.default,
        aten.conv2d.default,
        aten.conv3d.default,
        aten.conv1d.padding,
        aten.conv2d.padding,
        aten.conv3d.padding,
    )
}
CONVS.update(
    {
        aten.conv_transpose1d.default: True,
        aten.conv_transpose2d.input: True,
        aten.conv_transpose3d.input: True,
        aten.convolution.default: False,  # "transposed" is an argument
    }
)

__all__ = ["Compact", "analyse", "expand", "linear_keep", "conv_shrink", "ConvShrink"]


def feature_keep(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices along ``dim`` that keep anything."""
    others = [d for d in range(mask.dim()) if d != dim]
    return (mask.any(dim=others) if others else mask).nonzero().flatten()


KEEP_ALIGN = 8  # compact widths are padded to a multiple of this


def linear_keep(mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Output features a shrunk linear computes: the kept ones, padded with pruned ones (exact
    zeros: their weight rows and bias are masked) up to a multiple of ``KEEP_ALIGN``. GEMM
    libraries run odd widths on much slower kernels (cuBLAS: ~2x on an H200 for fp16).
    ``rows``: which weight rows keep anything; a kept feature whose row is pruned is the
    constant bias (``unit_fill``) and is not computed."""
    keep = feature_keep(mask, mask.dim() - 1)
    if rows is not None:
        keep = keep[rows.to(keep.device)[keep]]
    full = mask.shape[-1]
    extra = min(-len(keep) % KEEP_ALIGN, full - len(keep))
    if extra == 0:
        return keep
    pruned = torch.ones(full, dtype=torch.bool, device=keep.device)
    pruned[keep] = False
    pad = pruned.nonzero().flatten()[:extra]
    return torch.sort(torch.cat([keep, pad])).values


def weight_rows(masks: dict, n: fx.Node, transposed: bool = False) -> torch.Tensor:
    """Output units of a linear/convolution ``n`` whose weight keeps any element."""
    wm = masks[n.args[1]]
    if transposed:
        wm = wm.transpose(0, 1)
    return wm.flatten(1).any(dim=1)


def unit_fill(ex: dict, masks: dict, n: fx.Node, keep: torch.Tensor) -> torch.Tensor | None:
    """The constant value of every output unit of ``n`` outside ``keep``: its (masked) bias,
    or None when they are all zero (no bias, or the bias of every dropped unit is pruned)."""
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    if not isinstance(b, fx.Node):
        return None
    bias = (ex[b] * masks[b].to(ex[b].device)).detach().float().cpu()
    fill = bias.clone()
    fill[keep] = 0
    return fill if bool(fill.any()) else None


def _whole(groups: torch.Tensor, per: int) -> torch.Tensor:
    return (groups[:, None] * per + torch.arange(per)).flatten()


@dataclass(frozen=True)
class ConvShrink:
    """A shrunk convolution: the input channels it reads (None = all), the output channels it
    computes, its group count, and, for a compact input that misses channels of the whole
    groups it reads, where the compact channels go among them (``regroup``; the rest are
    zero-filled: they are pruned)."""

    in_keep: torch.Tensor | None
    out_keep: torch.Tensor
    groups: int
    transposed: bool
    regroup: torch.Tensor | None = None
    reads_compact: bool = False  # its input is the compact value (else the full one)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        if not self.transposed:  # (Cout, Cin/G, k...)
            w = w[self.out_keep.to(w.device)]
            if self.groups == 1 and self.in_keep is not None:
                w = w[:, self.in_keep.to(w.device)]
            return w
        if self.in_keep is not None:  # (Cin, Cout/G, k...): whole groups when grouped
            w = w[self.in_keep.to(w.device)]
        return w[:, self.out_keep.to(w.device)] if self.groups == 1 else w

    def compact_input(self, x: torch.Tensor, in_c: Compact | None) -> torch.Tensor:
        """The input this convolution reads, from the full (``in_c`` None) or compact ``x``."""
        if not self.reads_compact:
            return x if self.in_keep is None else x.index_select(1, self.in_keep.to(x.device))
        if self.regroup is None:
            return x
        return expand(x, 1, self.regroup, len(self.in_keep))


def conv_args(n: fx.Node) -> dict[str, Any]:
    return bound_arguments(n.target, n.args, n.kwargs)


def _folds_constants(b: dict, transposed: bool, groups: int) -> bool:
    """Constant input channels fold into the bias exactly when no output sees a border."""
    pad = b["padding"]
    no_pad = pad == "valid" or (not isinstance(pad, str) and not any(pad))
    return no_pad and not transposed and groups == 1


def conv_fill_bias(w: torch.Tensor, fill: torch.Tensor, in_keep: torch.Tensor) -> torch.Tensor:
    """What constant input channels (``fill`` outside ``in_keep``) add to each output channel
    of an unpadded convolution with weight ``w`` (Cout, Cin, k...)."""
    f = fill.to(w.device, w.dtype).clone()
    f[in_keep.to(w.device)] = 0
    return w.flatten(2).sum(2) @ f


def conv_shrink(
    n: fx.Node,
    x: torch.Tensor,
    out_mask: torch.Tensor,
    in_c: Compact | None,
    rows: torch.Tensor | None = None,
) -> ConvShrink | None:
    """What a convolution computes when shrunk, or None when nothing shrinks. Grouped and
    depthwise convolutions keep whole groups (those with a kept output channel or a kept input
    channel) and get their group count rewritten. ``rows``: output channels whose weights keep
    anything (the others are constant units, see ``unit_fill``)."""
    b = conv_args(n)
    groups = int(b["groups"])
    transposed = CONVS[n.target] or bool(b.get("transposed", False))
    if out_mask.dim() != x.dim() or x.dim() < 3:
        return None  # unbatched
    cout, cin = out_mask.shape[1], x.shape[1]
    in_c = in_c if in_c is not None and in_c.dim == 1 else None
    if in_c is not None and in_c.fill is not None and not _folds_constants(b, transposed, groups):
        in_c = None  # constant input channels: read the input expanded
    kept = feature_keep(out_mask, 1)
    if groups == 1 and rows is not None:
        kept = kept[rows[kept]]
    if groups == 1:
        out_keep = kept if len(kept) else torch.zeros(1, dtype=torch.long)
        in_keep = in_c.keep if in_c is not None else None
        if len(out_keep) == cout and in_keep is None:
            return None
        return ConvShrink(in_keep, out_keep, 1, transposed, None, in_c is not None)
    og, ig = cout // groups, cin // groups
    gs = kept // og if in_c is None else torch.cat([kept // og, in_c.keep // ig])
    gs = torch.unique(gs)
    if len(gs) == 0:
        gs = torch.zeros(1, dtype=torch.long)
    if len(gs) == groups and in_c is None:
        return None
    in_keep = _whole(gs, ig)
    regroup = None
    if in_c is not None and not torch.equal(in_keep, in_c.keep):
        regroup = torch.searchsorted(in_keep, in_c.keep)
    return ConvShrink(in_keep, _whole(gs, og), len(gs), transposed, regroup, in_c is not None)


class Analysis:
    """The running state of ``analyse``: example values, masks, layouts found so far."""

    def __init__(self, traced, masks: dict, shrinkable: set[fx.Node]) -> None:
        self.traced, self.masks, self.shrinkable = traced, masks, shrinkable
        self.layout: dict[fx.Node, Compact] = {}

    def value(self, n: Any) -> Any:
        return self.traced.example.get(n)


def analyse(traced, masks: dict, shrinkable: set[fx.Node]) -> dict[fx.Node, Compact]:
    """Layout of every value that can stay compact. ``shrinkable``: linear and convolution
    nodes allowed to produce or consume compact values (the planner removes those that
    measured slower)."""
    a = Analysis(traced, masks, shrinkable)
    for n in traced.gm.graph.nodes:
        v = a.value(n)
        if n.op != "call_function":
            continue
        entry = lookup_through(n.target)
        if entry is not None and entry.pieces:
            c = _through(a, n, v)
            if c is not None:
                a.layout[n] = c
            continue
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        c = _layout_of(a, n, v)
        if c is not None and len(c.keep) < c.full:
            a.layout[n] = c
        elif c is not None and any(isinstance(x, fx.Node) and x in a.layout for x in n.args):
            a.layout[n] = c  # full-size but fed by compact inputs: keep the chain uniform
    return a.layout


def _layout_of(a: Analysis, n: fx.Node, v: torch.Tensor) -> Compact | None:
    t = n.target
    ex = a.traced.example
    if t is LINEAR and n in a.shrinkable:
        keep = linear_keep(a.masks[n], weight_rows(a.masks, n))
        return Compact(v.dim() - 1, keep, v.shape[-1], unit_fill(ex, a.masks, n, keep))
    if t in CONVS and n in a.shrinkable:
        s = conv_shrink(
            n, a.value(n.args[0]), a.masks[n], a.layout.get(n.args[0]), conv_rows(a.masks, n)
        )
        if s is None:
            return None
        fill = unit_fill(ex, a.masks, n, s.out_keep) if s.groups == 1 else None
        return Compact(1, s.out_keep, v.shape[1], fill)
    return _through(a, n, v)


def linear_out_keep(masks: dict, n: fx.Node) -> torch.Tensor:
    """The output features a shrunk linear ``n`` computes (``linear_keep``)."""
    return linear_keep(masks[n], weight_rows(masks, n))


def conv_rows(masks: dict, n: fx.Node) -> torch.Tensor:
    b = conv_args(n)
    return weight_rows(masks, n, CONVS[n.target] or bool(b.get("transposed", False)))


def _through(a: Analysis, n: fx.Node, v: Any) -> Compact | None:
    entry = lookup_through(n.target)
    if entry is None:
        return None
    c = entry.layout(a, n, v)
    if c is None or n.target is operator.getitem or not isinstance(v, torch.Tensor):
        return c  # a split and its pieces carry their input's layout and constants
    c = replace(c, fill=None)
    mask = a.masks.get(n)
    if not isinstance(mask, torch.Tensor) or mask.shape != v.shape:
        return None
    # The invariant that makes the layout exact: every dropped index is pruned, or a constant
    # that the layout carries.
    exact = bool(torch.isin(feature_keep(mask, c.dim), c.keep).all())
    filled = any(a.layout[x].fill is not None for x in _nodes(n) if x in a.layout)
    if exact and not filled:
        return c
    fill = _probe_fill(a, n, v, c)
    return None if fill is None else replace(c, fill=fill if bool(fill.any()) else None)


def _nodes(n: fx.Node) -> list[fx.Node]:
    out = []
    for x in list(n.args) + list(n.kwargs.values()):
        out += [y for y in (x if isinstance(x, (list, tuple)) else (x,)) if isinstance(y, fx.Node)]
    return out


def _probe_fill(a: Analysis, n: fx.Node, v: torch.Tensor, c: Compact) -> torch.Tensor | None:
    """The values at the dropped indices of ``n``'s output, found by running the op once on its
    inputs with every dropped index at its constant (zero or ``fill``) and every kept index at
    zero; None unless each dropped index comes out the same everywhere (a constant). Only for
    ops whose other tensor inputs are constants (parameters, buffers)."""

    def probe(x: Any) -> Any:
        if isinstance(x, (list, tuple)):
            return type(x)(probe(y) for y in x)
        if not isinstance(x, fx.Node):
            return x
        xv = a.value(x)
        if x.op == "get_attr":
            m = a.masks.get(x)
            return xv * m if isinstance(m, torch.Tensor) and xv.is_floating_point() else xv
        xc = a.layout.get(x)
        if xc is None or not isinstance(xv, torch.Tensor):
            raise _NoProbe
        shape = [1] * xv.dim()
        shape[xc.dim] = xc.full
        f = xc.fill if xc.fill is not None else torch.zeros(xc.full)
        f = f.clone().to(xv.dtype)
        f[xc.keep] = 0
        return f.reshape(shape).expand(xv.shape).to(xv.device)

    try:
        with torch.no_grad():
            out = n.target(*probe(tuple(n.args)), **probe(dict(n.kwargs)))
    except (_NoProbe, RuntimeError):
        return None
    if not isinstance(out, torch.Tensor) or out.shape != v.shape:
        return None
    o = out.movedim(c.dim, 0).reshape(c.full, -1).float().cpu()
    dropped = torch.ones(c.full, dtype=torch.bool)
    dropped[c.keep] = False
    if not bool((o[dropped] == o[dropped][:, :1]).all()):
        return None
    fill = torch.zeros(c.full)
    fill[dropped] = o[dropped][:, 0]
    return fill


class _NoProbe(Exception):
    pass


def expand(
    x: torch.Tensor, dim: int, keep: torch.Tensor, full: int, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """Put a compact value back at full size: zeros (or ``fill``, a vector of size ``full``)
    at the dropped indices."""
    shape = list(x.shape)
    shape[dim] = full
    if fill is None:
        out = x.new_zeros(shape)
    else:
        view = [1] * len(shape)
        view[dim] = full
        out = fill.to(x.device, x.dtype).reshape(view).expand(shape).clone()
    return out.index_copy_(dim, keep.to(x.device), x)
