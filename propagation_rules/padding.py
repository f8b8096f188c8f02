"""Padding and shifting: constant, reflection, replication and circular padding, roll, flip,
rot90, repeat_interleave, tile.

Every output element is a copy of one input element or the padding constant, so the op run on
element numbers says which (``_util.copy_masks``): exact both ways. A constant pad keeps its
padding where the constant is nonzero.
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Refined, refine, register_rule
from sparta.shrink_ops import aten_op, first, register_through

from ._util import copy_masks, scalar_is_zero

aten = torch.ops.aten


def _ops(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


@register_rule(
    *_ops("reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d",
          "replication_pad2d", "replication_pad3d", "_pad_circular", "roll", "flip", "fliplr",
          "flipud", "rot90", "tile"),
    aten.repeat_interleave.self_int,
)  # fmt: skip
def shift(call: Call) -> Refined:
    if call.inputs["self"].numel() == 0:
        return Refined()
    fwd, used = copy_masks(call)
    return refine(out=fwd, self=used)


@register_rule(aten.repeat_interleave.self_Tensor)
def repeat_interleave_tensor(call: Call) -> Refined:
    """Copies, when the repeat counts are known (a constant); conservative otherwise."""
    reps = call.consts.get("repeats")
    if reps is None or call.inputs["self"].numel() == 0:
        return Refined()
    fwd, used = copy_masks(call, override={"repeats": reps})
    return refine(out=fwd, self=used)


@register_rule(aten.constant_pad_nd, aten.pad)
def constant_pad(call: Call) -> Refined:
    if call.inputs["self"].numel() == 0:
        return Refined()
    mode = call.params.get("mode", "constant")
    if mode != "constant":
        fwd, used = copy_masks(call)
        return refine(out=fwd, self=used)
    value = call.params.get("value")
    nonzero = value is not None and not scalar_is_zero(value)
    fwd, used = copy_masks(call, fill_nonzero=nonzero, override={"value": 0.0})
    return refine(out=fwd, self=used)


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


def _pad_layout(a, n, v):
    """Padding of the trailing dims only (constant_pad_nd, reflection/replication pads)."""
    c = first(a, n, v)
    pad = n.args[1]
    if c is None or c.dim >= v.dim() - len(pad) // 2:
        return None
    return c


register_through(
    aten.constant_pad_nd.default,
    aten_op("reflection_pad2d", "default"),
    aten_op("replication_pad2d", "default"),
    aten_op("pad", "default"),
)(_pad_layout)
