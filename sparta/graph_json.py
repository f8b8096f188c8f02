"""The compiled graph as data: nodes, targets by name, arguments as JSON (for saved plans).

Targets resolve only to registered ``torch.ops`` and a fixed list of functions (``FUNCTIONS``):
reading a graph runs no code from the file.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .emit import apply_input_mask
from .errors import PlanFileError
from .shrink import expand

# The Python functions a saved graph may call, by name (anything else is refused on save).
FUNCTIONS: dict[str, Any] = {
    "sparta.apply_input_mask": apply_input_mask,
    "sparta.expand": expand,
    **{
        f"operator.{k}": getattr(operator, k)
        for k in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "neg", "pow",
                  "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")
    },  # fmt: skip
    **{f"torch.{k}": getattr(torch, k) for k in ("sym_int", "sym_float", "sym_max", "sym_min",
                                                  "sym_not", "sym_ite") if hasattr(torch, k)},
    **{f"math.{k}": getattr(math, k) for k in ("ceil", "floor", "sqrt", "trunc")},
}  # fmt: skip
_FUNCTION_NAMES = {id(f): k for k, f in FUNCTIONS.items()}


# ------------------------------------------------------------------ values and graphs as JSON


def encode(a: Any, where: str) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return {"float": repr(a)}  # inf and nan too
    if isinstance(a, list):
        return {"list": [encode(x, where) for x in a]}
    if isinstance(a, tuple):
        return {"tuple": [encode(x, where) for x in a]}
    if isinstance(a, dict):
        return {"dict": {k: encode(v, where) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, slice):
        return {"slice": [encode(a.start, where), encode(a.stop, where), encode(a.step, where)]}
    raise PlanFileError(f"{where}: a {type(a).__name__} argument cannot be saved ({a!r}).")


def decode(a: Any, env: Mapping[str, fx.Node]) -> Any:
    if not isinstance(a, dict):
        return a
    (kind, v), = a.items()  # fmt: skip
    if kind == "node":
        return env[v]
    if kind == "float":
        return float(v)
    if kind == "list":
        return [decode(x, env) for x in v]
    if kind == "tuple":
        return tuple(decode(x, env) for x in v)
    if kind == "dict":
        return {k: decode(x, env) for k, x in v.items()}
    if kind in ("dtype", "layout", "memory_format"):
        out = getattr(torch, v, None)
        if not isinstance(out, (torch.dtype, torch.layout, torch.memory_format)):
            raise PlanFileError(f"unknown torch {kind} {v!r} in the saved graph.")
        return out
    if kind == "device":
        return torch.device(v)
    if kind == "slice":
        return slice(*(decode(x, env) for x in v))
    raise PlanFileError(f"unknown value kind {kind!r} in the saved graph.")


def _target_name(n: fx.Node) -> str:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"op:{t._schema.name}.{t._overloadname}"
    name = _FUNCTION_NAMES.get(id(t))
    if name is None:
        raise PlanFileError(
            f"node {n.name} calls {getattr(t, '__qualname__', t)!r}, which a saved plan cannot "
            f"name; keep such plans in memory (or compile again)."
        )
    return name


def _target(name: str) -> Any:
    if name.startswith("op:"):
        qual, _, overload = name[3:].rpartition(".")
        ns, _, op = qual.partition("::")
        if ns == "sparta":
            _import_sparta_ops()
        try:
            return getattr(getattr(getattr(torch.ops, ns), op), overload)
        except (AttributeError, RuntimeError):
            raise PlanFileError(
                f"the saved graph calls {qual}.{overload}, which is not a registered op here; "
                f"import the library that defines it first."
            ) from None
    if name not in FUNCTIONS:
        raise PlanFileError(f"the saved graph calls {name!r}, which sparta does not allow.")
    return FUNCTIONS[name]


def _import_sparta_ops() -> None:
    from .codegen import cpu_ops  # noqa: F401  (registers sparta::nm_linear, sparse_linear)

    with contextlib.suppress(ImportError):  # triton absent: no triton ops to find
        from .codegen import triton_ops  # noqa: F401


def graph_to_json(gm: fx.GraphModule, skip_buffers: set[str]) -> tuple[dict, dict]:
    """The graph as JSON-ready data and its buffers (name -> tensor), ``skip_buffers`` left
    out (they are rebuilt on load)."""
    nodes, buffers = [], {}
    for n in gm.graph.nodes:
        entry: dict[str, Any] = {"op": n.op, "name": n.name}
        if n.op == "get_attr":
            value = getattr(gm, str(n.target))
            if not isinstance(value, torch.Tensor):
                raise PlanFileError(
                    f"node {n.name} reads a submodule ({type(value).__name__}), which a saved plan "
                    f"cannot hold."
                )
            entry["target"] = str(n.target)
            if str(n.target) not in skip_buffers:
                buffers[str(n.target)] = value
        elif n.op == "call_function":
            entry["target"] = _target_name(n)
        elif n.op == "call_module":  # a kernel module; the saved plan holds its recipe
            entry["target"] = str(n.target)
        entry["args"] = encode(n.args, n.name)
        entry["kwargs"] = encode(n.kwargs, n.name)
        nodes.append(entry)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    spec = None
    if info is not None:
        spec = {
            "orig_args": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec else None,
            "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec else None,
        }
    return {"nodes": nodes, "pytree": spec}, buffers


def graph_from_json(data: Mapping[str, Any], root: torch.nn.Module) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for e in data["nodes"]:
        args, kwargs = decode(e["args"], env), decode(e["kwargs"], env)
        if e["op"] == "output":
            env[e["name"]] = g.output(args[0])
            continue
        target = e["target"] if e["op"] == "get_attr" else e.get("target")
        if e["op"] == "call_function":
            target = _target(target)
        elif e["op"] == "placeholder":
            target = e["name"]
        elif e["op"] == "call_module":
            if not isinstance(target, str) or not hasattr(root, target):
                raise PlanFileError(f"the saved graph calls a module {target!r} it does not hold.")
        elif e["op"] != "get_attr":
            raise PlanFileError(f"unknown node kind {e['op']!r} in the saved graph.")
        env[e["name"]] = g.create_node(e["op"], target, args, kwargs, name=e["name"])
    spec = data.get("pytree")
    if spec is not None:
        from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

        g._codegen = _PyTreeCodeGen(
            _PyTreeInfo(
                spec["orig_args"],
                pytree.treespec_loads(spec["in_spec"]) if spec["in_spec"] else None,
                pytree.treespec_loads(spec["out_spec"]) if spec["out_spec"] else None,
            )
        )
    return fx.GraphModule(root, g)
