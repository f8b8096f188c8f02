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
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .calls import bound_arguments
from .shrink_ops import SPLITS, Compact, lookup_through

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


def linear_keep(mask: torch.Tensor) -> torch.Tensor:
    """Output features a shrunk linear computes: the kept ones, padded with pruned ones (exact
    zeros: their weight rows and bias are masked) up to a multiple of ``KEEP_ALIGN``. GEMM
    libraries run odd widths on much slower kernels (cuBLAS: ~2x on an H200 for fp16)."""
    keep = feature_keep(mask, mask.dim() - 1)
    full = mask.shape[-1]
    extra = min(-len(keep) % KEEP_ALIGN, full - len(keep))
    if extra == 0:
        return keep
    pruned = torch.ones(full, dtype=torch.bool, device=keep.device)
    pruned[keep] = False
    pad = pruned.nonzero().flatten()[:extra]
    return torch.sort(torch.cat([keep, pad])).values


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
        if in_c is None:
            return x if self.in_keep is None else x.index_select(1, self.in_keep.to(x.device))
        if self.regroup is None:
            return x
        return expand(x, 1, self.regroup, len(self.in_keep))


def conv_args(n: fx.Node) -> dict[str, Any]:
    return bound_arguments(n.target, n.args, n.kwargs)


def conv_shrink(
    n: fx.Node, x: torch.Tensor, out_mask: torch.Tensor, in_c: Compact | None
) -> ConvShrink | None:
    """What a convolution computes when shrunk, or None when nothing shrinks. Grouped and
    depthwise convolutions keep whole groups (those with a kept output channel or a kept input
    channel) and get their group count rewritten."""
    b = conv_args(n)
    groups = int(b["groups"])
    transposed = CONVS[n.target] or bool(b.get("transposed", False))
    if out_mask.dim() != x.dim() or x.dim() < 3:
        return None  # unbatched
    cout, cin = out_mask.shape[1], x.shape[1]
    in_c = in_c if in_c is not None and in_c.dim == 1 else None
    kept = feature_keep(out_mask, 1)
    if groups == 1:
        out_keep = kept if len(kept) else torch.zeros(1, dtype=torch.long)
        in_keep = in_c.keep if in_c is not None else None
        if len(out_keep) == cout and in_keep is None:
            return None
        return ConvShrink(in_keep, out_keep, 1, transposed)
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
    return ConvShrink(in_keep, _whole(gs, og), len(gs), transposed, regroup)


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
        if n.target in SPLITS:
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
    if t is LINEAR and n in a.shrinkable:
        return Compact(v.dim() - 1, linear_keep(a.masks[n]), v.shape[-1])
    if t in CONVS and n in a.shrinkable:
        s = conv_shrink(n, a.value(n.args[0]), a.masks[n], a.layout.get(n.args[0]))
        return None if s is None else Compact(1, s.out_keep, v.shape[1])
    return _through(a, n, v)


def _through(a: Analysis, n: fx.Node, v: Any) -> Compact | None:
    entry = lookup_through(n.target)
    if entry is None:
        return None
    c = entry.layout(a, n, v)
    if c is None or n.target is operator.getitem or not isinstance(v, torch.Tensor):
        return c
    mask = a.masks.get(n)
    if not isinstance(mask, torch.Tensor) or mask.shape != v.shape:
        return None
    # The invariant that makes the layout exact: every dropped index is pruned.
    return c if bool(torch.isin(feature_keep(mask, c.dim), c.keep).all()) else None


def expand(x: torch.Tensor, dim: int, keep: torch.Tensor, full: int) -> torch.Tensor:
    """Put a compact value back at full size, zeros at the dropped indices."""
    shape = list(x.shape)
    shape[dim] = full
    out = x.new_zeros(shape)
    return out.index_copy_(dim, keep.to(x.device), x)
