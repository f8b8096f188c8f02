"""Bind an op's arguments to its schema: which are tensors (masked), which are static params.

Shared by the propagation engine (arguments are fx nodes), the rule checker and tensor
scrambling (arguments are example tensors), so every rule sees the same ``Call`` shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .registry import Call, InputMask, Mask, Refined


def _is_tensor_type(t: Any) -> bool:
    s = str(t)
    return s.startswith("Tensor") or s.startswith("Optional[Tensor]") or s == "Tensor?"


def _is_tensor_list_type(t: Any) -> bool:
    s = str(t)
    return (
        s.startswith("List[Tensor")
        or s.startswith("List[Optional[Tensor")
        or s
        in (
            "Tensor[]",
            "Tensor?[]",
        )
    )


def bound_arguments(op: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Schema name -> value, defaults filled in."""
    schema = op._schema
    bound: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
        else:
            bound[a.name] = None
    return bound


def tensor_arg_names(op: Any) -> list[str]:
    return [
        a.name
        for a in op._schema.arguments
        if _is_tensor_type(a.type) or _is_tensor_list_type(a.type)
    ]


def make_call(
    op: Any,
    args: tuple,
    kwargs: Mapping[str, Any],
    outputs: tuple[Mask, ...],
    *,
    mask_of: Callable[[Any], Mask | None],
    dtype_of: Callable[[Any], Any] = lambda v: getattr(v, "dtype", None),
    const_of: Callable[[Any], torch.Tensor | None] = lambda v: None,
    out_dtypes: tuple[Any, ...] = (),
    signs_of: Callable[[Any], Any] = lambda v: None,
) -> Call:
    """Build the ``Call`` a rule sees. ``mask_of(value)`` gives the mask of a tensor-valued
    argument (an fx node or a tensor) and None for anything else."""
    inputs: dict[str, InputMask] = {}
    params: dict[str, Any] = {}
    dtypes: dict[str, Any] = {}
    consts: dict[str, torch.Tensor] = {}
    signs: dict[str, Any] = {}
    tensor_names = set(tensor_arg_names(op))
    for name, value in bound_arguments(op, args, kwargs).items():
        if name in tensor_names:
            if isinstance(value, (list, tuple)):
                inputs[name] = tuple(mask_of(v) for v in value)
                dtypes[name] = tuple(dtype_of(v) for v in value)
            else:
                m = mask_of(value) if value is not None else None
                inputs[name] = m
                if m is None and value is not None:
                    params[name] = value  # a python scalar passed where a Tensor is allowed
                else:
                    dtypes[name] = dtype_of(value) if value is not None else None
                    c = const_of(value) if value is not None else None
                    if c is not None:
                        consts[name] = c
                    sign = signs_of(value) if value is not None else None
                    if sign is not None:
                        signs[name] = sign
        else:
            params[name] = value
    for i, dt in enumerate(out_dtypes):
        dtypes[f"out{i}"] = dt
    return Call(
        op=op,
        inputs=inputs,
        outputs=tuple(outputs),
        params=params,
        dtypes=dtypes,
        consts=consts,
        signs=signs,
    )


def check_refined(call: Call, refined: Refined, rule_name: str) -> None:
    """Reject a rule result with wrong names or shapes early, naming the rule."""
    from .errors import RuleError

    for name, m in refined.inputs.items():
        if name not in call.inputs:
            raise RuleError(
                f"rule {rule_name!r} for {call.op} returned a mask for {name!r}, which is not a "
                f"tensor argument; tensor arguments are {sorted(call.inputs)}."
            )
        have = call.inputs[name]
        pairs = zip(m, have) if isinstance(m, tuple) else [(m, have)]
        for got, want in pairs:
            if got is not None and want is not None and tuple(got.shape) != tuple(want.shape):
                raise RuleError(
                    f"rule {rule_name!r} for {call.op} returned a mask of shape "
                    f"{tuple(got.shape)} for {name!r}, whose shape is {tuple(want.shape)}."
                )
    if len(refined.outputs) > len(call.outputs):
        raise RuleError(
            f"rule {rule_name!r} for {call.op} returned {len(refined.outputs)} output masks; "
            f"the op has {len(call.outputs)}."
        )
    for got, want in zip(refined.outputs, call.outputs):
        if got is not None and tuple(got.shape) != tuple(want.shape):
            raise RuleError(
                f"rule {rule_name!r} for {call.op} returned an output mask of shape "
                f"{tuple(got.shape)}; the output's shape is {tuple(want.shape)}."
            )
