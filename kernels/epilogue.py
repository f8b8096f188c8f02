"""The epilogue activations: one entry per activation, read by everything that knows one.

An epilogue is the elementwise activation a generated kernel applies to its accumulator before
it stores the output (``act(x @ W.T + b)``), so the graph's separate activation node is absorbed.
Each ``Epilogue`` states, in one place, the graph node it replaces (the planner's match), the
dense reference (``kernels/reference.py``), its code in the C++ kernels (the ``ACT`` code of
``act_apply`` in ``kernels/cpu_act.inc``) and its Triton source. Adding an activation is one
entry here plus its C++ branch in ``cpu_act.inc`` (or ``cpu=None``: the C++ kernels then leave
it to the graph).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparta.errors import BackendError

aten = torch.ops.aten


@dataclass(frozen=True)
class Epilogue:
    name: str
    target: torch._ops.OpOverload  # the traced graph's op that computes it
    reference: Callable[[torch.Tensor], torch.Tensor]  # dense, any dtype and device
    cpu: int | None  # ``act_apply<ACT>`` code of cpu_act.inc; None: the C++ kernels leave it
    triton: str  # lines updating the fp32 accumulator ``acc`` in place
    # the arguments of ``target`` after its input that select this activation, in order, as
    # (name, default, value): gelu's ``approximate``
    options: tuple[tuple[str, Any, Any], ...] = ()


EPILOGUES: dict[str, Epilogue] = {
    e.name: e
    for e in (
        Epilogue("relu", aten.relu.default, torch.relu, 1, "acc = tl.maximum(acc, 0.0)"),
        Epilogue(
            "gelu",
            aten.gelu.default,
            F.gelu,
            2,
            "acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))",
            (("approximate", "none", "none"),),
        ),
        # tanh(u) = 1 - 2 / (exp(2u) + 1); 2u is clamped at 80 (tanh is 1 there in any dtype).
        Epilogue(
            "gelu_tanh",
            aten.gelu.default,
            lambda y: F.gelu(y, approximate="tanh"),
            3,
            "u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)\n"
            "acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(tl.minimum(2.0 * u, 80.0)) + 1.0))",
            (("approximate", "none", "tanh"),),
        ),
        # silu(x) = x * sigmoid(x); exp(-x) is clamped at 80 (sigmoid is 0 there in any dtype).
        Epilogue(
            "silu",
            aten.silu.default,
            F.silu,
            None,
            "acc = acc / (1.0 + tl.exp(tl.minimum(-acc, 80.0)))",
        ),
    )
}

CPU_ACTIVATIONS = (None, *(k for k, e in EPILOGUES.items() if e.cpu is not None))
TRITON_ACTIVATIONS = (None, *EPILOGUES)
ALL_ACTIVATIONS = TRITON_ACTIVATIONS


def of_node(node: Any) -> str | None:
    """The epilogue a graph node computes (an ``fx.Node`` of the traced graph), or None."""

    def arg(i: int, name: str, default: Any) -> Any:
        return node.kwargs.get(name, node.args[i] if len(node.args) > i else default)

    for e in EPILOGUES.values():
        if node.target is e.target and all(
            arg(i + 1, name, default) == value for i, (name, default, value) in enumerate(e.options)
        ):
            return e.name
    return None


def _get(name: str, allowed: tuple[str | None, ...], what: str) -> Epilogue | None:
    if name not in allowed:
        raise BackendError(f"{what}: activation must be one of {allowed}, got {name!r}.")
    return None if name is None else EPILOGUES[name]


def apply(y: torch.Tensor, name: str | None) -> torch.Tensor:
    """The epilogue ``name`` applied to ``y`` densely (``None`` = identity)."""
    e = _get(name, ALL_ACTIVATIONS, "reference")
    return y if e is None else e.reference(y)


def cpu_code(name: str | None, what: str = "C++ kernel") -> int:
    """The ``ACT`` code of ``name`` in ``cpu_act.inc`` (0 = none); BackendError when the C++
    kernels do not fuse it."""
    e = _get(name, CPU_ACTIVATIONS, what)
    return 0 if e is None else e.cpu


def triton_source(name: str | None, indent: int, what: str = "Triton kernel") -> str:
    """The epilogue lines of ``name``, indented for a kernel body; BackendError when unknown."""
    e = _get(name, TRITON_ACTIVATIONS, what)
    pad = " " * indent
    return "" if e is None else "".join(f"{pad}{line}\n" for line in e.triton.splitlines())
