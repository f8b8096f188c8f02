"""Value-range facts: the signs each floating value of the graph can take, whatever the inputs.

Masks say where a value is zero or unused. An op that is not finite at zero (``rsqrt``,
``reciprocal``, ``log``, a divisor) needs one more fact before an input of it may be pruned
backward: that the input is never zero. ``x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)``
(a hand-written RMSNorm) is the common case: ``pow(x, 2) >= 0``, so its mean is ``>= 0``, so
adding ``eps > 0`` gives a value ``> 0`` for *every* x, zeros included, and ``rsqrt`` of it is
finite. Where such an input's output is unused, the input is unused too: it is computed, finite,
and read by nobody, so everything that feeds it may be pruned (the q/k rows of a pruned head).

A fact is a set of signs (``NEG | ZERO | POS``), found by one forward pass over a table of ops,
conservatively (floating-point underflow included: ``exp``, products and means of positives may
round to zero). It holds for every value of the model's inputs and under the forcing of pruned
elements to zero, because a value is only forced to zero where zero is one of its signs:
parameters and buffers (forced by their masks) always include zero, inputs may be anything,
and values whose signs exclude zero are never forced — the soundness check leaves them as
computed, and shrinking only drops elements that are zero (their signs include zero), read by
no kept output, or constants it restores exactly. Rules read the facts of their inputs as
``call.signs``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten


class Sign(enum.IntFlag):
    """The signs a value can take (a set: ``Sign.ZERO | Sign.POS`` is "non-negative")."""

    NEG = 1
    ZERO = 2
    POS = 4


ANY = Sign.NEG | Sign.ZERO | Sign.POS
NONNEG = Sign.ZERO | Sign.POS
NONPOS = Sign.ZERO | Sign.NEG


def nonzero(s: Sign | None) -> bool:
    """Whether a value with these signs is never zero (unknown: False)."""
    return s is not None and Sign.ZERO not in s


def positive(s: Sign | None) -> bool:
    return s is not None and s == Sign.POS


def within(s: Sign, region: Sign) -> bool:
    """Whether every sign of ``s`` is in ``region``."""
    return int(s) & ~int(region) == 0


def of_scalar(v: Any, dtype: torch.dtype | None = None) -> Sign:
    """The sign of a python scalar as the op sees it (rounded to ``dtype``: 1e-12 is 0 in
    fp16)."""
    if isinstance(v, bool):
        v = int(v)
    if not isinstance(v, (int, float)):
        return ANY
    if dtype is not None and dtype.is_floating_point:
        v = float(torch.tensor(float(v), dtype=dtype))
    if v != v:  # NaN
        return ANY
    return Sign.POS if v > 0 else Sign.NEG if v < 0 else Sign.ZERO


VALUES_LIMIT = 1 << 16  # parameters and buffers larger than this are taken as ANY


def _of_values(t: torch.Tensor) -> Sign:
    """Parameters and buffers: the signs of their values, and zero (masks force their pruned
    elements to zero). Large tensors (weights) are not scanned: ANY."""
    if t.numel() > VALUES_LIMIT or t.numel() == 0:
        return ANY
    lo, hi = torch.aminmax(t.detach().float())
    if bool(lo.isnan()) or bool(hi.isnan()):
        return ANY
    s = Sign.ZERO
    if float(hi) > 0:
        s |= Sign.POS
    if float(lo) < 0:
        s |= Sign.NEG
    return s


def _neg(s: Sign) -> Sign:
    out = s & Sign.ZERO
    if Sign.POS in s:
        out |= Sign.NEG
    if Sign.NEG in s:
        out |= Sign.POS
    return out


def _mul(a: Sign, b: Sign) -> Sign:
    """Signs of a product (or quotient by a nonzero): a nonzero product may underflow to 0."""
    out = Sign(0)
    if Sign.ZERO in a or Sign.ZERO in b:
        out |= Sign.ZERO
    for x in (Sign.NEG, Sign.POS):
        for y in (Sign.NEG, Sign.POS):
            if x in a and y in b:
                out |= (Sign.POS if x == y else Sign.NEG) | Sign.ZERO
    return out


def _add(a: Sign, b: Sign) -> Sign:
    """Signs of a sum: x >= 0 plus y > 0 is > 0 (rounding is monotone, so the sum is at least
    the positive term), mixed signs can give anything."""
    if within(a | b, NONNEG):
        return Sign.POS if Sign.POS in (a, b) else a | b
    if within(a | b, NONPOS):
        return Sign.NEG if Sign.NEG in (a, b) else a | b
    return ANY


def _union(*signs: Sign) -> Sign:
    out = Sign(0)
    for s in signs:
        out |= s
    return out


# ------------------------------------------------------------------------------- op table
# Each entry: (input signs by schema name, params by schema name, output dtype) -> output signs.

Fact = Callable[[Mapping[str, Any], Mapping[str, Any], Any], Sign]
_TABLE: dict[Any, Fact] = {}


def _register(*names: str) -> Callable[[Fact], Fact]:
    def deco(fn: Fact) -> Fact:
        for n in names:
            if hasattr(aten, n):
                _TABLE[getattr(aten, n)] = fn
        return fn

    return deco


def _arg(s: Mapping[str, Any], p: Mapping[str, Any], name: str, dtype: Any) -> Sign:
    """An operand's signs: a tensor's fact, or a scalar's sign."""
    if name in s and s[name] is not None:
        return s[name]
    return of_scalar(p.get(name), dtype)


@_register(
    "clone", "contiguous", "alias", "detach", "view", "reshape", "_unsafe_view", "flatten",
    "unflatten", "unsqueeze", "squeeze", "permute", "transpose", "t", "expand", "repeat",
    "slice", "select", "narrow", "lift_fresh_copy", "amax", "amin", "movedim",
    "view_as", "expand_as", "roll", "flip", "pixel_shuffle",
    "pixel_unshuffle", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
    "replication_pad1d", "replication_pad2d", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "_unsafe_index", "index_select", "gather",
)  # fmt: skip
def _same_as_input(s, p, dt):
    x = s.get("self", s.get("input"))
    pad = p.get("value", 0) if "value" in p else 0
    return _union(x, of_scalar(pad, dt)) if x is not None else ANY


@_register("dropout", "feature_dropout", "native_dropout")
def _dropout(s, p, dt):
    x = s.get("input")
    return ANY if x is None else x | Sign.ZERO


@_register("_to_copy", "to", "type_as")
def _cast(s, p, dt):
    x = s.get("self")
    return ANY if x is None else x | Sign.ZERO  # narrowing may flush tiny values to zero


@_register("neg")
def _neg_fact(s, p, dt):
    return _neg(s["self"])


@_register("abs")
def _abs(s, p, dt):
    x = s["self"]
    return (Sign.POS if x & (Sign.NEG | Sign.POS) else Sign(0)) | (x & Sign.ZERO)


@_register("square")
def _square(s, p, dt):
    return NONNEG


@_register("pow")
def _pow(s, p, dt):
    x, e = s.get("self"), p.get("exponent")
    if x is None or not isinstance(e, (int, float)) or isinstance(e, bool):
        return ANY
    if e == 0:
        return Sign.POS
    if float(e).is_integer():
        odd = int(e) % 2 == 1
        if e > 0:
            return (x | Sign.ZERO) if odd else NONNEG
        if Sign.ZERO in x:
            return ANY
        return x if odd else Sign.POS
    if within(x, NONNEG):  # a fractional power of a non-negative value
        return NONNEG if e > 0 else (Sign.POS if x == Sign.POS else ANY)
    return ANY  # NaN for negatives


@_register("sqrt")
def _sqrt(s, p, dt):
    x = s["self"]
    return x if within(x, NONNEG) else ANY


@_register("rsqrt")
def _rsqrt(s, p, dt):
    return Sign.POS if s["self"] == Sign.POS else ANY


@_register("reciprocal")
def _reciprocal(s, p, dt):
    x = s["self"]
    return x if Sign.ZERO not in x else ANY


@_register("exp", "exp2", "sigmoid", "softmax", "_softmax", "_safe_softmax", "softplus",
           "hardsigmoid")  # fmt: skip
def _nonneg(s, p, dt):
    return NONNEG


_REGIONS = {Sign.NEG: (-1e308, -5e-324), Sign.ZERO: (0.0, 0.0), Sign.POS: (5e-324, 1e308)}
_ORDER = (Sign.NEG, Sign.ZERO, Sign.POS)


def _monotone_image(f: Callable[[float], float], x: Sign, dt: Any) -> Sign:
    """Signs of f(x) for a non-decreasing f: each sign region maps onto an interval, whose signs
    lie between those of its end points."""
    out = Sign(0)
    for sign, (lo, hi) in _REGIONS.items():
        if sign in x:
            a, b = _ORDER.index(of_scalar(f(lo), dt)), _ORDER.index(of_scalar(f(hi), dt))
            for s in _ORDER[min(a, b) : max(a, b) + 1]:
                out |= s
    return out


@_register("relu", "relu6", "hardtanh", "clamp", "clamp_min", "clamp_max")
def _clamp(s, p, dt):
    x = s.get("self", s.get("input"))
    name = p["__name__"]
    default = {"relu": (0.0, None), "relu6": (0.0, 6.0), "hardtanh": (-1.0, 1.0)}.get(
        name, (None, None)
    )
    lo = p.get("min", p.get("min_val", default[0]))
    hi = p.get("max", p.get("max_val", default[1]))
    if x is None or not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
        return ANY

    def f(t: float) -> float:
        t = max(t, lo) if lo is not None else t
        return min(t, hi) if hi is not None else t

    return _monotone_image(f, x, dt)


@_register("sum", "nansum", "cumsum")
def _sum(s, p, dt):
    x = s["self"]
    return x if x in (Sign.POS, NONNEG, Sign.NEG, NONPOS, Sign.ZERO) else ANY


@_register("mean", "nanmean")
def _mean(s, p, dt):
    x = s["self"]  # sum / n: a tiny positive sum may round to zero
    return x | Sign.ZERO if x in (Sign.POS, NONNEG, Sign.NEG, NONPOS) else x


@_register("var", "std", "linalg_vector_norm", "norm")
def _stat(s, p, dt):
    return NONNEG


@_register("add", "sub", "rsub")
def _add_fact(s, p, dt):
    a, b = _arg(s, p, "self", dt), _arg(s, p, "other", dt)
    name = p["__name__"]
    if name == "rsub":
        a, b = b, a  # other - alpha * self
    if p.get("alpha", 1) != 1:
        b = _mul(b, of_scalar(p.get("alpha"), dt))
    if name in ("sub", "rsub"):
        b = _neg(b)
    return _add(a, b)


@_register("mul")
def _mul_fact(s, p, dt):
    return _mul(_arg(s, p, "self", dt), _arg(s, p, "other", dt))


@_register("div")
def _div(s, p, dt):
    a, b = _arg(s, p, "self", dt), _arg(s, p, "other", dt)
    if Sign.ZERO in b or p.get("rounding_mode") is not None:
        return ANY
    return _mul(a, b)


@_register("where")
def _where(s, p, dt):
    return _union(_arg(s, p, "self", dt), _arg(s, p, "other", dt))


@_register("masked_fill")
def _masked_fill(s, p, dt):
    return _union(s["self"], _arg(s, p, "value", dt))


@_register("cat", "stack")
def _cat(s, p, dt):
    parts = s.get("tensors") or ()
    return _union(*parts) if parts and all(x is not None for x in parts) else ANY


@_register("full", "full_like", "new_full", "scalar_tensor")
def _full(s, p, dt):
    return of_scalar(p.get("fill_value", p.get("s")), dt)


@_register("ones", "ones_like", "new_ones")
def _ones(s, p, dt):
    return Sign.POS


@_register("zeros", "zeros_like", "new_zeros")
def _zeros(s, p, dt):
    return Sign.ZERO


@_register("embedding")
def _embedding(s, p, dt):
    return s.get("weight") or ANY


# ------------------------------------------------------------------------------- the pass


def _is_float(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def sign_facts(
    gm: fx.GraphModule, values: Mapping[fx.Node, Any], *, bind: Callable[..., dict[str, Any]]
) -> dict[fx.Node, Sign]:
    """The signs of every floating tensor node (``ANY`` where nothing is known).

    ``values``: an example value per node (for dtypes, and the values of parameters and
    buffers); ``bind(op, args, kwargs)`` binds arguments by schema name (``sparta.calls``).
    """
    facts: dict[fx.Node, Sign] = {}
    for n in gm.graph.nodes:
        v = values.get(n)
        if not _is_float(v):
            continue
        if n.op == "get_attr" and not v.is_complex():
            facts[n] = _of_values(v.detach())
        elif n.op == "call_function" and getattr(n.target, "overloadpacket", None) in _TABLE:
            facts[n] = _apply(n, v, facts, bind)
        else:
            facts[n] = ANY
    return facts


def _apply(n: fx.Node, v: torch.Tensor, facts: Mapping[fx.Node, Sign], bind) -> Sign:
    op = n.target
    if op._schema.overload_name == "dtype":
        return ANY  # view.dtype reinterprets the bits
    signs: dict[str, Any] = {}
    params: dict[str, Any] = {"__name__": op._schema.name.split("::")[-1]}
    for name, a in bind(op, n.args, n.kwargs).items():
        if isinstance(a, fx.Node):
            signs[name] = facts.get(a)
        elif isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            signs[name] = tuple(facts.get(x) if isinstance(x, fx.Node) else None for x in a)
        else:
            params[name] = a
    try:
        out = _TABLE[op.overloadpacket](signs, params, v.dtype)
    except (KeyError, TypeError):
        return ANY
    return out if out else ANY
