"""Propagation rules as data beside a tiny engine.

A rule is a pure function ``rule(call: Call) -> Refined``. ``Call`` holds the masks
(bool, True = kept) of the op's tensor inputs by schema argument name, the masks of its
outputs, the op's non-tensor arguments by name (defaults filled in), dtypes, and the values
of inputs that are compile-time constants (buffers, lifted constants). A rule returns the
masks it can refine; the engine intersects them with what is known (pruned sets only grow),
so a rule may return only what it learns and must never claim more than is sound:

* forward: an output element is pruned if it is zero whenever the pruned inputs are zero;
* backward: an input element is pruned if no kept output element depends on it.

A rule never sees an ``fx.Node``; keys are ATen ``OpOverload``s (or an ``OpOverloadPacket``,
which covers all its overloads) and ``torch.library`` custom ops.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MissingRuleError, RuleError

Mask = torch.Tensor
InputMask = Mask | tuple[Mask, ...] | None


@dataclass(frozen=True)
class Call:
    """What a rule sees of one op application."""

    op: Any
    inputs: Mapping[str, InputMask]  # schema name -> mask (tuple for Tensor[] args)
    outputs: tuple[Mask, ...]
    params: Mapping[str, Any]  # non-tensor arguments by schema name, defaults filled
    dtypes: Mapping[str, Any] = field(default_factory=dict)  # schema name / "out{i}" -> dtype
    consts: Mapping[str, torch.Tensor] = field(default_factory=dict)  # known input values
    # Value-range facts of inputs by schema name (``sparta.signs.Sign``: the signs a value can
    # take whatever the model's inputs; absent = unknown).
    signs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Mask:
        return self.outputs[0]

    def __getitem__(self, name: str) -> Any:
        """An input mask or a parameter by schema name."""
        if name in self.inputs:
            return self.inputs[name]
        return self.params[name]


@dataclass(frozen=True)
class Refined:
    """Masks a rule learned. Anything absent is left as it was."""

    inputs: Mapping[str, InputMask] = field(default_factory=dict)
    outputs: tuple[Mask | None, ...] = ()


def refine(out: Mask | tuple[Mask | None, ...] | None = None, **inputs: InputMask) -> Refined:
    """Shorthand: ``refine(out=m, input=a, weight=b)``; ``out`` may be a tuple (multi-output)."""
    outs = () if out is None else (out if isinstance(out, tuple) else (out,))
    return Refined(inputs={k: v for k, v in inputs.items() if v is not None}, outputs=outs)


RuleFn = Callable[[Call], Refined]


@dataclass(frozen=True)
class RuleEntry:
    fn: RuleFn
    name: str  # shown in the report
    where: str  # file:line of the registration, for double-registration errors


_RULES: dict[Any, RuleEntry] = {}


def _where(fn: Callable) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
    except (OSError, TypeError):
        return repr(fn)


def _key(op: Any) -> Any:
    if isinstance(op, str):  # "mylib::op" names a torch.library custom op
        ns, _, name = op.partition("::")
        return getattr(getattr(torch.ops, ns), name)
    return op


def register_rule(*ops: Any, name: str | None = None) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the propagation rule of ``ops``. Usable as a decorator.

    Registering an op twice is an error that names the first registration.
    """

    def deco(fn: RuleFn) -> RuleFn:
        for op in ops:
            key = _key(op)
            if key in _RULES:
                first = _RULES[key]
                raise RuleError(
                    f"a rule for {key} is already registered ({first.name!r} at {first.where}); "
                    f"unregister_rule({key}) first if you mean to replace it."
                )
            _RULES[key] = RuleEntry(fn, name or fn.__name__, _where(fn))
        return fn

    return deco


def unregister_rule(op: Any) -> None:
    _RULES.pop(_key(op), None)


def lookup(op: Any) -> RuleEntry | None:
    """The rule of an OpOverload, else of its packet."""
    if op in _RULES:
        return _RULES[op]
    packet = getattr(op, "overloadpacket", None)
    return _RULES.get(packet) if packet is not None else None


def registered_ops() -> list[Any]:
    return list(_RULES)


def missing_rule_error(op: Any) -> MissingRuleError:
    schema = getattr(op, "_schema", None)
    args = [a.name for a in schema.arguments] if schema is not None else ["x"]
    tensor_args = (
        [a.name for a in schema.arguments if "Tensor" in str(a.type)]
        if schema is not None
        else args
    )
    first = tensor_args[0] if tensor_args else "self"
    stub = (
        f"import sparta\n"
        f"from sparta.registry import Call, Refined, refine\n\n"
        f"@sparta.register_rule(torch.ops.{_qualname(op)})\n"
        f"def {_ident(op)}_rule(call: Call) -> Refined:\n"
        f"    # masks: call.inputs[{first!r}], call.out; static args: call.params\n"
        f"    # forward: prune outputs that are zero when pruned inputs are zero;\n"
        f"    # backward: prune inputs that no kept output depends on.\n"
        f"    return refine(out=call.inputs[{first!r}], {first}=call.out)  # if elementwise\n"
    )
    return MissingRuleError(
        f"no propagation rule for {op} (schema: {schema}). Register one with "
        f"sparta.register_rule, or pass strict=False to treat the op conservatively "
        f"(its rule is then inferred or its outputs kept dense). A rule to start from:\n\n{stub}"
    )


def _qualname(op: Any) -> str:
    """``aten.mul.Tensor`` / ``mylib.op.default``: the attribute path under ``torch.ops``."""
    if isinstance(op, torch._ops.OpOverload):
        return str(op)
    return f"{str(op).replace('::', '.')}.default"


def _ident(op: Any) -> str:
    return _qualname(op).replace(".", "_")


# ---------------------------------------------------------------- one-line rule factories


def _broadcast_back(mask: Mask, shape: torch.Size) -> Mask:
    """Reduce an output-shaped mask to an input that was broadcast to it: an input element
    is kept if any output element it feeds is kept."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    lead = mask.dim() - len(shape)
    m = mask.any(dim=tuple(range(lead))) if lead > 0 else mask
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and m.shape[i] != 1)
    return m.any(dim=dims, keepdim=True) if dims else m


def _broadcast_fwd(mask: Mask, shape: torch.Size) -> Mask:
    return mask.expand(shape) if tuple(mask.shape) != tuple(shape) else mask


def elementwise(zeros: str, *arg_names: str) -> RuleFn:
    """Rule of an elementwise op over the named tensor args (broadcasting allowed).

    ``zeros`` says when an output element is known to be zero:
    ``"any"``   if any named input is zero (mul, and unary ops with f(0) = 0 such as relu, gelu);
    ``"all"``   only if all named inputs are zero (add, sub);
    ``"none"``  never (sigmoid, exp, cos: f(0) != 0).
    Backward: an input element is used only if an output element it feeds is kept. That is
    sound only when the op stays finite with pruned inputs forced to zero: write a custom
    rule for ops like div, log or reciprocal (0 * inf would turn an unused value into NaN).
    """
    if zeros not in ("any", "all", "none"):
        raise RuleError(f"zeros must be 'any', 'all' or 'none', got {zeros!r}.")

    def rule(call: Call) -> Refined:
        out = call.out
        masks = [m for n in arg_names if isinstance(m := call.inputs.get(n), Mask)]
        back = {
            n: _broadcast_back(out, m.shape)
            for n in arg_names
            if isinstance(m := call.inputs.get(n), Mask)
        }
        fwd = None
        if masks and zeros != "none":
            # A scalar or absent operand is not known to be zero: "all" then learns nothing.
            if zeros == "all" and len(masks) < len(arg_names):
                masks = []
            combine = torch.logical_or if zeros == "all" else torch.logical_and
            for m in masks:
                m = _broadcast_fwd(m, out.shape)
                fwd = m if fwd is None else combine(fwd, m)
        return refine(out=fwd, **back)

    rule.__name__ = f"elementwise[{zeros}]"
    return rule
