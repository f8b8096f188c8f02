"""Convolutions and pooling.

Convolution is a sum of products, so running it on 0/1 masks is exact (stride, padding,
dilation, groups, transposed all included): an output channel is pruned when all its weights
meet only pruned inputs and its bias is pruned or absent; an input channel is unused when its
weight column is pruned for every kept output channel. Spatial zeros are claimed only where
every window term is pruned — exact, never a guess.

Pooling: average pools are linear with positive weights (exact the same way); a max over a
window of zeros is zero, so a window whose inputs are all pruned gives a pruned output
(an entire pruned channel gives a pruned output channel); backward, an input element is used if
any kept output's window covers it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from sparta.registry import Call, Mask, Refined, refine, register_rule
from sparta.shrink_ops import aten_op, channel_src, register_through

from ._util import is_mask, nonneg_masks

aten = torch.ops.aten


def _channel_bias(call: Call, term: Mask, back: dict[str, Mask]) -> Refined:
    """Add a per-output-channel bias (dim 1, or dim 0 when unbatched)."""
    b = call.inputs.get("bias")
    if not is_mask(b):
        return refine(out=term, **back)
    out = call.out
    unbatched = call.inputs["input"].dim() == call.inputs["weight"].dim() - 1
    cdim = 0 if unbatched else 1
    shape = [1] * out.dim()
    shape[cdim] = b.shape[0]
    fwd = term | b.reshape(shape)
    used = out.any(dim=tuple(d for d in range(out.dim()) if d != cdim))
    return refine(out=fwd, bias=used, **back)


@register_rule(*[getattr(aten, n) for n in ("conv1d", "conv2d", "conv3d", "convolution",
                 "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "_convolution")
                 if hasattr(aten, n)])  # fmt: skip
def conv(call: Call) -> Refined:
    term, back = nonneg_masks(call.op, call, ("input", "weight"), override={"bias": None})
    return _channel_bias(call, term, back)


def _pair(v: Any, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    v = list(v)
    return v * n if len(v) == 1 else v


@register_rule(aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
               aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d, aten._adaptive_avg_pool2d,
               aten._adaptive_avg_pool3d)  # fmt: skip
def avg_pool(call: Call) -> Refined:
    """Average pooling: an output is zero iff its window is all pruned; exact both ways."""
    x = call.inputs["self"]
    if x.numel() == 0:
        return Refined()
    fwd, back = nonneg_masks(call.op, call, ("self",))
    return refine(out=fwd, self=back["self"])


_MAX_TO_AVG = {
    1: F.avg_pool1d,
    2: F.avg_pool2d,
    3: F.avg_pool3d,
}


def _spatial(call: Call) -> int:
    name = call.op._schema.name.split("::")[-1]
    return int(next(c for c in name if c.isdigit()))


def _window_used(call: Call, used: Mask) -> Mask:
    """Input elements covered by the window of any kept output of a (dilation-1) max pool."""
    x = call.inputs["self"]
    n = _spatial(call)
    k = _pair(call.params["kernel_size"], n)
    s = _pair(call.params.get("stride") or k, n)
    p = _pair(call.params.get("padding", 0), n)
    d = _pair(call.params.get("dilation", 1), n)
    if any(v != 1 for v in d):  # windows with holes: whole channels (conservative)
        lead = x.dim() - n
        ch = used.any(dim=tuple(range(lead, used.dim())), keepdim=True)
        return ch.expand(x.shape)
    pool = _MAX_TO_AVG[n]

    def fn(self: torch.Tensor, **_: Any) -> torch.Tensor:
        return pool(self, k, s, p, ceil_mode=bool(call.params.get("ceil_mode", False)))

    _, back = nonneg_masks(fn, call, ("self",), used=used)
    return back["self"]


def _max_fwd(call: Call) -> Mask:
    """A window of pruned (zero) inputs has max 0; padding does not count (it is -inf)."""
    x = call.inputs["self"].to(torch.float32)
    y = call.op(x, **call.params)
    y = y[0] if isinstance(y, tuple) else y
    return y > 0


@register_rule(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d)
def max_pool(call: Call) -> Refined:
    return refine(out=_max_fwd(call), self=_window_used(call, call.out))


@register_rule(aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)
def max_pool_with_indices(call: Call) -> Refined:
    """(values, indices): values as max_pool; where indices are read, their windows are used."""
    used = call.outputs[0] | call.outputs[1]
    return refine(out=(_max_fwd(call), None), self=_window_used(call, used))


@register_rule(aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d)
def adaptive_max_pool(call: Call) -> Refined:
    """Adaptive windows are those of the adaptive average pool over the same sizes."""
    n = _spatial(call)
    size = list(call.outputs[0].shape[-n:])
    avg = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[n]
    used = call.outputs[0] | call.outputs[1] if len(call.outputs) > 1 else call.outputs[0]

    def fn(self: torch.Tensor, **_: Any) -> torch.Tensor:
        return avg(self, size)

    fwd, back = nonneg_masks(fn, call, ("self",), used=used)
    outs = (fwd, None) if len(call.outputs) > 1 else fwd
    return refine(out=outs, self=back["self"])


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


POOLS = [
    aten_op(p, o)
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
    )
    for o in ("default", "vec")
]
register_through(*POOLS)(channel_src)
