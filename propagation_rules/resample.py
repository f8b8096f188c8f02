"""Resampling: pixel/channel shuffles, nearest, linear and cubic upsampling, sliding windows
(im2col / col2im, Tensor.unfold), grid sampling.

* Shuffles, nearest upsampling and sliding windows copy input elements: the op itself, run on
  element numbers, says which element each output copies (``_util.copy_masks``); exact both
  ways, zero padding included.
* Linear, bilinear and trilinear interpolation (with or without antialiasing) and col2im are
  sums with non-negative weights: running them on 0/1 masks is exact (``_util.nonneg_masks``).
* Bicubic interpolation has negative taps and grid sampling reads data-dependent positions:
  exact per (sample, channel) plane — a pruned plane gives a zero plane, a plane is used where
  any of its outputs is kept — which is what channel pruning needs.
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule
from sparta.shrink_ops import Compact, aten_op, channel_src, register_through

from ._util import copy_masks, is_mask, nonneg_masks

aten = torch.ops.aten


def _ops(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _data(call: Call) -> str:
    return "self" if "self" in call.inputs else "input"


@register_rule(
    *_ops("pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
          "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
          "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
          "im2col", "unfold", "diagonal", "diag", "diag_embed"),
)  # fmt: skip
def copy(call: Call) -> Refined:
    """Every output element is one input element (or a zero of padding / off the diagonal)."""
    name = _data(call)
    if call.inputs[name].numel() == 0:
        return Refined()
    fwd, used = copy_masks(call, name)
    return refine(out=fwd, **{name: used})


@register_rule(
    *_ops("upsample_linear1d", "upsample_bilinear2d", "upsample_trilinear3d",
          "_upsample_bilinear2d_aa", "col2im"),
)  # fmt: skip
def interpolate(call: Call) -> Refined:
    """Weighted sums with non-negative weights: exact on 0/1 masks."""
    name = _data(call)
    if call.inputs[name].numel() == 0:
        return Refined()
    fwd, back = nonneg_masks(call.op, call, (name,))
    return refine(out=fwd, **{name: back[name]})


def _planes(m: Mask) -> Mask:
    """(N, C, 1, ...): does the plane keep anything."""
    kept = m.flatten(2).any(dim=2)
    return kept.reshape(*m.shape[:2], *[1] * (m.dim() - 2))


@register_rule(*_ops("upsample_bicubic2d", "_upsample_bicubic2d_aa"))
def bicubic(call: Call) -> Refined:
    name = _data(call)
    x, out = call.inputs[name], call.out
    if x.dim() < 3:
        return Refined()
    return refine(out=_planes(x).expand(out.shape), **{name: _planes(out).expand(x.shape)})


@register_rule(*_ops("grid_sampler", "grid_sampler_2d", "grid_sampler_3d"))
def grid_sample(call: Call) -> Refined:
    """out[n, c, p] = interpolation of plane x[n, c] at grid[n, p]: a pruned plane gives zeros
    (every padding mode reads zeros or the plane's own values); the grid is read where any
    channel of its output position is kept (a claimed zero never rests on it)."""
    x, grid, out = call.inputs["input"], call.inputs["grid"], call.out
    if not is_mask(grid):
        return Refined()
    pos = out.any(dim=1)  # (N, *out_spatial)
    return refine(
        out=_planes(x).expand(out.shape),
        input=_planes(out).expand(x.shape),
        grid=pos.unsqueeze(-1).expand(grid.shape),
    )


@register_rule(aten.affine_grid_generator)
def affine_grid(call: Call) -> Refined:
    """Each sample's grid comes from its own theta."""
    theta, out = call.inputs["theta"], call.out
    used = out.reshape(out.shape[0], -1).any(dim=1)
    return refine(theta=used.reshape(-1, *[1] * (theta.dim() - 1)).expand(theta.shape))


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


UPSAMPLES = [
    aten_op(p, o)
    for p in (
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
register_through(*UPSAMPLES)(channel_src)


def _pixel_shuffle_layout(a, n, v):
    c = channel_src(a, n, v)
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
