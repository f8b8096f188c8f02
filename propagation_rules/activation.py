"""Activations with parameters and other elementwise ops of several inputs: prelu, glu,
threshold, log_sigmoid_forward, heaviside, copysign, xlogy, lerp, addcmul, addcdiv.

Each states when its output is zero (``f(0)``, given which operands are pruned) and, backward,
which operand elements a kept output reads: an operand that only scales another matters only
where that other can be nonzero. Divisors and logarithms follow the value-range facts
(``call.signs``) like ``div`` and ``log`` do.
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule
from sparta.shrink_ops import channel_src, register_through, slice_params
from sparta.signs import nonzero, positive

from ._util import broadcast_back, broadcast_fwd, full, is_mask, scalar_is_zero
from .elementwise import POINTWISE

aten = torch.ops.aten


def _ops(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _nz(call: Call, name: str) -> Mask:
    """Where an operand (tensor or scalar) can be nonzero, at the output's shape."""
    m = call.inputs.get(name)
    if is_mask(m):
        return broadcast_fwd(m, call.out.shape)
    return full(call.out.shape, not scalar_is_zero(call.params.get(name, 0)))


def _back(call: Call, name: str, need: Mask) -> Mask | None:
    m = call.inputs.get(name)
    return broadcast_back(need & call.out, m.shape) if is_mask(m) else None


@register_rule(*_ops("prelu", "_prelu_kernel"))
def prelu(call: Call) -> Refined:
    """x if x > 0 else w[c] * x, channel dim 1 (0 for a 1-D input): zero where x is; the slope
    of a channel is read where a kept output of it has x nonzero."""
    x, w, out = call.inputs["self"], call.inputs["weight"], call.out
    read = out & x
    if w.numel() == 1 or x.dim() == 0:
        w_used = read.any().reshape(1).expand(w.shape)
    else:
        cdim = 1 if x.dim() >= 2 else 0
        w_used = read.any(dim=tuple(d for d in range(x.dim()) if d != cdim)).reshape(w.shape)
    return refine(out=x, self=out, weight=w_used)


@register_rule(aten.glu)
def glu(call: Call) -> Refined:
    """a * sigmoid(b) for the halves (a, b) of ``dim``: zero where a is."""
    x, out = call.inputs["self"], call.out
    dim = call.params.get("dim", -1) % x.dim()
    a, _ = x.chunk(2, dim)
    return refine(out=a, self=torch.cat([out, out & a], dim))


@register_rule(aten.threshold)
def threshold(call: Call) -> Refined:
    """x if x > threshold else value: f(0) = 0 when threshold < 0 or value == 0."""
    t, v = call.params["threshold"], call.params["value"]
    keeps_zero = scalar_is_zero(v) or (isinstance(t, (int, float)) and t < 0)
    x = call.inputs["self"]
    return refine(out=x if keeps_zero else None, self=call.out)


@register_rule(*_ops("log_sigmoid_forward"))
def log_sigmoid(call: Call) -> Refined:
    """(log sigmoid(x), buffer): log sigmoid(0) = -log 2, nothing known forward."""
    used = call.outputs[0]
    if len(call.outputs) > 1 and call.outputs[1].shape == used.shape:
        used = used | call.outputs[1]
    return refine(self=used)


@register_rule(aten.heaviside)
def heaviside(call: Call) -> Refined:
    """0 for x < 0, values for x == 0, 1 for x > 0: zero where x and values are pruned."""
    fwd = _nz(call, "self") | _nz(call, "values")
    everywhere = full(fwd.shape, True)
    return refine(
        out=fwd, self=_back(call, "self", everywhere), values=_back(call, "values", everywhere)
    )


@register_rule(aten.copysign)
def copysign(call: Call) -> Refined:
    """|x| with the sign of other: zero where x is; other matters where x can be nonzero."""
    a = _nz(call, "self")
    return refine(
        out=a, self=_back(call, "self", full(a.shape, True)), other=_back(call, "other", a)
    )


@register_rule(aten.xlogy)
def xlogy(call: Call) -> Refined:
    """x * log(y), 0 where x == 0 (even for y == 0): zero where x is. y is pruned backward only
    where it is never zero or negative (log(0) = -inf would meet a pruned x's zero)."""
    a = _nz(call, "self")
    other = _back(call, "other", a) if positive(call.signs.get("other")) else None
    return refine(out=a, self=_back(call, "self", full(a.shape, True)), other=other)


@register_rule(aten.lerp)
def lerp(call: Call) -> Refined:
    """self + weight * (end - self): zero where self and end are."""
    a, b = _nz(call, "self"), _nz(call, "end")
    w = _nz(call, "weight")
    fwd = a | b
    return refine(
        out=fwd,
        self=_back(call, "self", full(fwd.shape, True)),
        end=_back(call, "end", w),
        weight=_back(call, "weight", fwd),
    )


@register_rule(aten.addcmul, aten.addcdiv)
def addc(call: Call) -> Refined:
    """self + value * t1 * t2 (addcdiv: t1 / t2): zero where self is and the product is.
    A divisor t2 may be zero (pruned) unless its value-range fact says otherwise: then 0 / 0
    is NaN, and nothing is claimed where it is pruned."""
    s, t1, t2 = _nz(call, "self"), _nz(call, "tensor1"), _nz(call, "tensor2")
    if scalar_is_zero(call.params.get("value", 1)):
        none = full(call.out.shape, False)
        return refine(
            out=s,
            self=_back(call, "self", ~none),
            tensor1=_back(call, "tensor1", none),
            tensor2=_back(call, "tensor2", none),
        )
    everywhere = full(s.shape, True)
    if call.op.overloadpacket is aten.addcmul:
        return refine(
            out=s | (t1 & t2),
            self=_back(call, "self", everywhere),
            tensor1=_back(call, "tensor1", t2),
            tensor2=_back(call, "tensor2", t1),
        )
    safe = nonzero(call.signs.get("tensor2"))
    return refine(
        out=s | t1 if safe else s | t1 | ~t2,
        self=_back(call, "self", everywhere),
        tensor1=_back(call, "tensor1", everywhere),
        tensor2=_back(call, "tensor2", t1) if safe else None,
    )


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


# Activations without the pointwise tag: elementwise all the same.
register_through(
    aten.hardtanh.default,
    aten.leaky_relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.relu6.default if hasattr(aten, "relu6") else None,
    aten.mish.default,
    aten.elu.default,
    emit=POINTWISE.emit,
)(POINTWISE.layout)
register_through(aten.prelu.default, aten._prelu_kernel.default, emit=slice_params(1))(channel_src)
