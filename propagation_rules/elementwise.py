"""Elementwise ops: unary activations, arithmetic, comparisons, logical ops, casts, dropout.

Forward zeros follow f(0): relu/gelu/tanh keep zeros; sigmoid/exp/cos do not. Backward: an input
element is used where an output element it feeds is kept, and (for products) where the other
factor can be nonzero. Ops whose value at zero is not finite (reciprocal, rsqrt, log, a divisor,
a negative power) prune nothing backward unless the input's value-range fact (``call.signs``,
``sparta.signs``) says it is never zero (or never outside the op's domain): an inf in an unused
slot still turns into NaN when a pruned weight multiplies it, but ``rsqrt(mean(x^2) + eps)``
is finite for every x.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from sparta.registry import Call, Mask, Refined, elementwise, refine, register_rule
from sparta.shrink_ops import Compact, Through, register_through, tensor_args
from sparta.signs import nonzero, positive

from ._util import broadcast_back, broadcast_fwd, full, is_mask, scalar_is_zero

aten = torch.ops.aten


def _ops(*names: str) -> list[Any]:
    """The ATen packets that exist in this torch version (names differ across versions)."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


# f(0) == 0: zeros stay zeros.
ZERO_PRESERVING = _ops(
    "relu", "gelu", "tanh", "silu", "mish", "neg", "abs", "sin", "sinh", "asin", "asinh",
    "atan", "atanh", "tan", "erf", "expm1", "log1p", "sqrt", "sign", "sgn", "floor", "ceil",
    "round", "trunc", "relu6", "hardswish", "leaky_relu", "elu", "celu", "selu", "hardshrink",
    "softshrink", "positive", "frac", "square", "deg2rad", "rad2deg", "nan_to_num", "erfinv",
    "signbit", "rrelu",
)  # fmt: skip
# f(0) != 0 but finite: nothing known forward; backward elementwise.
NOT_ZERO = _ops(
    "sigmoid", "exp", "exp2", "cos", "cosh", "erfc", "hardsigmoid", "softplus", "logical_not",
    "bitwise_not", "isnan", "isinf", "isfinite", "acos", "isneginf", "isposinf", "sinc", "i0",
)  # fmt: skip
COMPARE = _ops("ge", "gt", "le", "lt", "eq", "ne", "greater_equal", "greater", "less_equal",
               "less", "not_equal")  # fmt: skip
# f(0) is not finite: nothing known forward; backward only for inputs in the op's domain.
NOT_FINITE = _ops("reciprocal", "rsqrt", "log", "log2", "log10", "digamma", "lgamma", "logit")
# Where each is finite, in terms of its input's signs (digamma, lgamma: also not at negative
# integers; logit: only inside (0, 1) — no sign fact shows that, so nothing is pruned).
_FINITE_WHEN = {
    "reciprocal": nonzero,
    "rsqrt": positive,
    "log": positive,
    "log2": positive,
    "log10": positive,
    "digamma": positive,
    "lgamma": positive,
}

register_rule(*ZERO_PRESERVING, name="elementwise[any]")(elementwise("any", "self"))
register_rule(*NOT_ZERO, name="elementwise[none]")(elementwise("none", "self"))
register_rule(*COMPARE, name="compare")(elementwise("none", "self", "other"))
register_rule(*_ops("__and__", "bitwise_and", "logical_and"), name="elementwise[any]")(
    elementwise("any", "self", "other")
)
register_rule(*_ops("atan2", "logaddexp", "logaddexp2"), name="elementwise[none]")(
    elementwise("none", "self", "other")
)
register_rule(
    *_ops("__or__", "bitwise_or", "logical_or", "__xor__", "bitwise_xor", "logical_xor",
          "maximum", "minimum", "fmax", "fmin", "hypot"),
    name="elementwise[all]",
)(elementwise("all", "self", "other"))  # fmt: skip


@register_rule(*_ops("clone", "contiguous", "alias", "detach", "lift_fresh_copy", "lift_fresh",
                     "_to_copy", "to", "type_as", "_to_dim_order_copy"))  # fmt: skip
def cast(call: Call) -> Refined:
    """Copies and casts: elementwise, zero stays zero; a dtype-giving ``other`` is not read."""
    return refine(out=call.inputs["self"], self=call.out, other=_unused(call))


def _unused(call: Call, name: str = "other") -> Mask | None:
    m = call.inputs.get(name)
    return full(m.shape, False) if is_mask(m) else None


@register_rule(*NOT_FINITE)
def not_finite_at_zero(call: Call) -> Refined:
    """Nothing known forward. Backward elementwise when the input's signs keep the op finite:
    the input is then never forced to zero (``sparta.signs``), only computed and unread."""
    finite = _FINITE_WHEN.get(call.op._schema.name.split("::")[-1])
    if finite is not None and finite(call.signs.get("self")):
        return refine(self=call.out)
    return Refined()


def _operand(call: Call, name: str) -> tuple[Mask | None, Any]:
    """(mask, scalar): a tensor operand's mask, or the python scalar passed in its place."""
    m = call.inputs.get(name)
    return (m, None) if is_mask(m) else (None, call.params.get(name))


def _nz(call: Call, name: str) -> Mask | bool:
    """Where an operand can be nonzero: its mask, or whether a scalar is nonzero."""
    m, s = _operand(call, name)
    return broadcast_fwd(m, call.out.shape) if m is not None else not scalar_is_zero(s)


def _back(call: Call, name: str, need: Mask | bool) -> Mask | None:
    m = call.inputs.get(name)
    if not is_mask(m):
        return None
    need = full(call.out.shape, need) if isinstance(need, bool) else need
    return broadcast_back(need & call.out, m.shape)


def _or(a: Mask | bool, b: Mask | bool, shape: torch.Size) -> Mask:
    out = torch.logical_or(torch.as_tensor(a), torch.as_tensor(b))
    return out.expand(shape) if out.dim() == 0 else out


@register_rule(aten.add, aten.sub, aten.rsub)
def add_sub(call: Call) -> Refined:
    """self + alpha * other (rsub: other - alpha * self): zero where both terms are zero (the
    residual add keeps what either side keeps); an alpha of 0 drops its operand."""
    scaled = "self" if call.op.overloadpacket is aten.rsub else "other"
    plain = "other" if scaled == "self" else "self"
    if scalar_is_zero(call.params.get("alpha", 1)):
        fwd = _nz(call, plain)
        fwd = full(call.out.shape, fwd) if isinstance(fwd, bool) else fwd
        return refine(out=fwd, **{plain: _back(call, plain, True), scaled: _unused(call, scaled)})
    fwd = _or(_nz(call, "self"), _nz(call, "other"), call.out.shape)
    return refine(out=fwd, self=_back(call, "self", True), other=_back(call, "other", True))


@register_rule(aten.mul)
def mul(call: Call) -> Refined:
    """Zero where either factor is zero; a factor matters only where the other can be nonzero."""
    a, b = _nz(call, "self"), _nz(call, "other")
    fwd = torch.logical_and(torch.as_tensor(a), torch.as_tensor(b)).expand(call.out.shape)
    return refine(out=fwd, self=_back(call, "self", b), other=_back(call, "other", a))


@register_rule(*_ops("div", "true_divide", "floor_divide", "fmod", "remainder"))
def div(call: Call) -> Refined:
    """Zero where the dividend is zero and the divisor is not (0/0 is NaN). The divisor is
    pruned backward only when its value-range fact says it is never zero (x / sqrt(var + eps)):
    then it is never forced to zero either, and it matters where the dividend can be nonzero."""
    a = _nz(call, "self")
    if isinstance(a, bool):
        return Refined()  # a scalar dividend
    d = _nz(call, "other")
    never_zero = nonzero(call.signs.get("other"))
    fwd = (a if never_zero else a | ~d) if is_mask(d) else (a if d else None)
    divisor = _back(call, "other", a) if never_zero else None
    return refine(out=fwd, self=_back(call, "self", True), other=divisor)


@register_rule(aten.pow, *_ops("float_power"))
def pow_(call: Call) -> Refined:
    """x ** c: zero-preserving for c > 0; x ** 0 == 1 does not read x; c < 0 is not finite."""
    base, exp = call.inputs.get("self"), call.inputs.get("exponent")
    if not is_mask(base) or is_mask(exp):
        return Refined()  # pow.Scalar (scalar ** tensor) or tensor ** tensor: conservative
    e = call.params.get("exponent")
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        if e > 0:
            return refine(out=base, self=call.out)
        if e == 0:
            return refine(out=full(call.out.shape, True), self=full(base.shape, False))
        # a negative power is finite where the base is never zero (and, for a fractional
        # power, positive)
        sign = call.signs.get("self")
        if positive(sign) or (float(e).is_integer() and nonzero(sign)):
            return refine(self=call.out)
    return Refined()


@register_rule(aten.clamp, aten.clamp_min, aten.clamp_max, aten.hardtanh)
def clamp(call: Call) -> Refined:
    """Zero-preserving when min <= 0 <= max (bounds given as scalars)."""
    lo = call.params.get("min", call.params.get("min_val"))
    hi = call.params.get("max", call.params.get("max_val"))
    if any(is_mask(call.inputs.get(n)) for n in ("min", "max")):
        return Refined()  # tensor bounds: conservative
    keeps_zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    x = call.inputs["self"]
    return refine(out=x if keeps_zero else None, self=call.out)


@register_rule(aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.feature_alpha_dropout)
def dropout(call: Call) -> Refined:
    """Dropout keeps zeros (eval: identity); alpha dropout in training does not."""
    x = call.inputs["input"]
    alpha = call.op.overloadpacket in (aten.alpha_dropout, aten.feature_alpha_dropout)
    if alpha and call.params.get("train"):
        return refine(input=call.out)
    return refine(out=x, input=call.out)


@register_rule(aten.native_dropout)
def native_dropout(call: Call) -> Refined:
    """(output, keep mask): the output keeps zeros; the keep mask reads no input value."""
    x = call.inputs["input"]
    return refine(out=(x, None), input=call.outputs[0])


@register_rule(*_ops("_assert_tensor_metadata", "sym_size", "sym_stride", "sym_numel",
                     "sym_storage_offset"))  # fmt: skip
def metadata_only(call: Call) -> Refined:
    """Reads only sizes/dtype/device: no element of the input is used."""
    return refine(**{n: full(m.shape, False) for n, m in call.inputs.items() if is_mask(m)})


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


def _pointwise_layout(a, n: fx.Node, v) -> Compact | None:
    """Elementwise ops with broadcasting: every compact input has the same layout once its dims
    are aligned to the output; a full-size input is sliced at emit time."""
    found: Compact | None = None
    for x in tensor_args(n):
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
register_through(torch.Tag.pointwise, emit=_pointwise_emit)(_pointwise_layout)

# Identity-like ops without the pointwise tag.
register_through(
    aten.dropout.default,
    aten.clone.default,
    aten.contiguous.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.detach.default,
    emit=_pointwise_emit,
)(_pointwise_layout)
