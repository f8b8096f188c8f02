"""Structured shrinking: which values can be computed *compact* along one dim.

A value is compact along ``dim`` with kept indices ``keep`` when every index outside
``keep`` is pruned in its propagated mask (zero or unused). Compact values flow through
linear layers (smaller weights), zero-preserving elementwise ops, residual adds of equal
layouts, head-splitting views and transposes, and scaled_dot_product_attention (a pruned
head disappears). Anywhere else they are expanded back with zeros, which is exactly what
applying the mask means, so the result equals the masked dense model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

# f(0) == 0 and elementwise in one input: compact in -> compact out.
UNARY = {
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.tanh.default,
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.neg.default,
    aten.detach.default,
}
SCALAR_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
LINEAR = aten.linear.default
SDPA = aten.scaled_dot_product_attention.default


@dataclass(frozen=True)
class Compact:
    dim: int  # non-negative
    keep: torch.Tensor  # sorted int64 indices kept along dim
    full: int  # size of the dim when expanded

    def same(self, other: Compact | None) -> bool:
        return other is not None and self.dim == other.dim and torch.equal(self.keep, other.keep)


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


def _value(traced, n):
    return traced.example.get(n)


def analyse(traced, masks: dict, shrinkable: set[fx.Node]) -> dict[fx.Node, Compact]:
    """Layout of every value that can stay compact. ``shrinkable``: linear nodes allowed to
    produce or consume compact values (the planner removes those that measured slower)."""
    layout: dict[fx.Node, Compact] = {}
    for n in traced.gm.graph.nodes:
        v = _value(traced, n)
        if n.op != "call_function" or not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        c = _layout_of(traced, n, v, masks, layout, shrinkable)
        if c is not None and len(c.keep) < c.full:
            layout[n] = c
        elif c is not None and any(isinstance(a, fx.Node) and a in layout for a in n.args):
            layout[n] = c  # full-size but fed by compact inputs: keep the chain uniform
    return layout


def _layout_of(traced, n, v, masks, layout, shrinkable) -> Compact | None:
    t = n.target
    args = n.args
    if t is LINEAR and n in shrinkable:
        return Compact(v.dim() - 1, linear_keep(masks[n]), v.shape[-1])
    src = args[0] if args and isinstance(args[0], fx.Node) else None
    c = layout.get(src)
    if c is None:
        return None
    if t in UNARY:
        return c
    if t in SCALAR_OPS and not isinstance(args[1], fx.Node):
        return c
    if t is aten.add.Tensor and isinstance(args[1], fx.Node) and c.same(layout.get(args[1])):
        return c
    if t is aten.transpose.int:
        d0, d1 = (d % v.dim() for d in args[1:3])
        return Compact({d0: d1, d1: d0}.get(c.dim, c.dim), c.keep, c.full)
    if t is aten.permute.default:
        perm = [d % v.dim() for d in args[1]]
        return Compact(perm.index(c.dim), c.keep, c.full)
    if t in VIEWS:
        return _view_layout(_value(traced, src), v, c)
    if t is SDPA:
        q, k, vv = args[:3]
        attn_mask = n.kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        mask_ok = attn_mask is None or (
            attn_mask not in layout and _broadcasts_over_heads(_value(traced, attn_mask))
        )
        if c.same(layout.get(k)) and c.same(layout.get(vv)) and c.dim == v.dim() - 3 and mask_ok:
            return c
    return None


def _broadcasts_over_heads(mask: torch.Tensor) -> bool:
    """An attention mask of shape (..., [H,] L, S) that is the same for every head."""
    return mask.dim() < 3 or mask.shape[-3] == 1


def _view_layout(src: torch.Tensor, out: torch.Tensor, c: Compact) -> Compact | None:
    """(.., H*D) -> (.., H, D) splits a compact feature dim into whole heads; the reverse merges."""
    s, o = list(src.shape), list(out.shape)
    if c.dim == len(s) - 1 and len(o) == len(s) + 1 and o[:-2] == s[:-1] and o[-2] * o[-1] == s[-1]:
        d = o[-1]
        heads = torch.unique(c.keep // d)
        whole = (heads[:, None] * d + torch.arange(d)).flatten()
        if torch.equal(whole, c.keep):
            return Compact(len(o) - 2, heads, o[-2])
    if c.dim == len(s) - 2 and len(o) == len(s) - 1 and o[:-1] == s[:-2] and o[-1] == s[-2] * s[-1]:
        d = s[-1]
        return Compact(len(o) - 1, (c.keep[:, None] * d + torch.arange(d)).flatten(), o[-1])
    return None


def expand(x: torch.Tensor, dim: int, keep: torch.Tensor, full: int) -> torch.Tensor:
    """Put a compact value back at full size, zeros at the dropped indices."""
    shape = list(x.shape)
    shape[dim] = full
    out = x.new_zeros(shape)
    return out.index_copy_(dim, keep.to(x.device), x)
