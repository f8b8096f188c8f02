"""Reductions and scans: sum, mean, amax/amin, max/min, prod, any/all, norms, var/std,
logsumexp, argmax/argmin, cumsum/cumprod.

A reduction over a group of pruned (zero) elements is zero for sum/mean/max/norm/any; prod/all
are zero when any element is. Backward: every element of a group is used if its output is kept
(for prod/all, only if the product can be nonzero at all).
"""

from __future__ import annotations

from typing import Any

import torch

from sparta.registry import Call, Mask, Refined, elementwise, refine, register_rule
from sparta.shrink_ops import Compact, first, register_through

from ._util import dims_of, full

aten = torch.ops.aten


def _dims(call: Call, x: Mask) -> tuple[int, ...]:
    if x.dim() == 0:
        return ()
    return dims_of(call.params.get("dim"), x.dim())


def _keep_shape(x: Mask, dims: tuple[int, ...]) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(x.shape)]


def _reduction(zero_if: str | None) -> Any:
    """zero_if: "all" (output zero if all of its group is pruned), "any" (if any is), None."""

    def rule(call: Call) -> Refined:
        x = call.inputs["self"]
        dims = _dims(call, x)
        kshape = _keep_shape(x, dims)
        out0 = call.outputs[0]
        used = out0 if len(call.outputs) == 1 else out0 | call.outputs[1]
        used_k = used.reshape(kshape)
        if zero_if is None:
            fwd = None
        elif x.dim() == 0:
            fwd = x.reshape(out0.shape)
        elif zero_if == "all":
            fwd = x.any(dim=dims, keepdim=True).reshape(out0.shape)
        else:
            fwd = x.all(dim=dims, keepdim=True).reshape(out0.shape)
            used_k = used_k & fwd.reshape(kshape)  # a known-zero product reads nothing
        back = used_k.expand(x.shape)
        outs = fwd if len(call.outputs) == 1 else (fwd, None)
        return refine(out=outs, self=back)

    rule.__name__ = f"reduce[{zero_if}]"
    return rule


register_rule(
    aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.nansum,
    aten.amax, aten.amin, aten.max.default, aten.max.dim, aten.min.default, aten.min.dim,
    aten.any.default, aten.any.dim, aten.linalg_vector_norm, aten.norm.ScalarOpt_dim,
    aten.norm.Scalar, aten.nanmean, name="reduce[all]",
)(_reduction("all"))  # fmt: skip
if hasattr(aten.any, "dims"):
    register_rule(aten.any.dims, name="reduce[all]")(_reduction("all"))
register_rule(
    aten.prod.default, aten.prod.dim_int, aten.all.default, aten.all.dim, name="reduce[any]"
)(_reduction("any"))
if hasattr(aten.all, "dims"):
    register_rule(aten.all.dims, name="reduce[any]")(_reduction("any"))
# var/std of a group smaller than the correction is NaN: no forward claim.
register_rule(
    aten.var, aten.std, aten.var_mean, aten.std_mean, aten.logsumexp, aten.argmax, aten.argmin,
    name="reduce[none]",
)(_reduction(None))  # fmt: skip
register_rule(aten.max.other, aten.min.other, name="elementwise[all]")(
    elementwise("all", "self", "other")
)


def _scan_fwd(x: Mask, dim: int, prod: bool) -> Mask:
    c = (
        torch.cummin(x.to(torch.uint8), dim).values
        if prod
        else torch.cummax(x.to(torch.uint8), dim).values
    )
    return c.bool()


@register_rule(aten.cumsum, aten.cumprod, aten.logcumsumexp, aten.cummax, aten.cummin)
def cumulative(call: Call) -> Refined:
    """out[j] = f(x[..j]): zero while the prefix is pruned (cumsum/cummax/cummin) or once any
    prefix element is (cumprod); x[j] is used if any out[i >= j] is kept."""
    x = call.inputs["self"]
    if x.dim() == 0:
        return refine(out=x if call.op.overloadpacket is not aten.logcumsumexp else None,
                      self=call.outputs[0])  # fmt: skip
    dim = call.params["dim"] % x.dim()
    used = call.outputs[0] if len(call.outputs) == 1 else call.outputs[0] | call.outputs[1]
    back = torch.cummax(used.flip(dim).to(torch.uint8), dim).values.flip(dim).bool()
    packet = call.op.overloadpacket
    exp = packet is aten.logcumsumexp  # exp(0) != 0: no forward claim
    fwd = None if exp else _scan_fwd(x, dim, prod=packet is aten.cumprod)
    outs = fwd if len(call.outputs) == 1 else (fwd, None)
    return refine(out=outs, self=back)


@register_rule(aten.diff)
def diff(call: Call) -> Refined:
    """Conservative: differences of neighbours (with prepend/append) are rarely on a sparse path;
    the inputs are unused only when no output is kept."""
    used = bool(call.out.any())
    return refine(**{n: full(m.shape, used) for n, m in call.inputs.items() if m is not None})


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


def _reduce_layout(a, n, v):
    """mean/sum/amax over dims other than the compact one (the squeeze-excite pool)."""
    c = first(a, n, v)
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
