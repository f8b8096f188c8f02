"""Rewrite products with a transposed 2-D parameter into ``aten.linear``.

``x @ W.t()``, ``torch.matmul(x, W.T)``, ``torch.mm(x, W.transpose(0, 1))`` and
``torch.addmm(b, x, W.t())`` (b of shape (N,), alpha = beta = 1) compute exactly
``F.linear(x, W, b)``. Written as linear, such a layer gets the same propagation rules, shrinking
and sparse backends as an ``nn.Linear``, and its mask keeps the parameter's own (N, K)
orientation.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .shrink import LINEAR

aten = torch.ops.aten
# Transposes of a 2-D tensor that take only the tensor.
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.mT.default}


def _shape(gm: fx.GraphModule, node: object) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value: object = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _transposed_param(node: object, params: set[fx.Node]) -> fx.Node | None:
    """The 2-D parameter that ``node`` transposes, or None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.args):
        return None
    src = node.args[0]
    if src not in params:
        return None
    if node.target in _TRANSPOSES:
        return src
    if node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1}:
        return src
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0]:
        return src
    return None


def linear_from_matmuls(gm: fx.GraphModule, param_names: set[str]) -> int:
    """Rewrite ``gm`` in place; returns how many products became ``aten.linear``."""
    params = {
        n
        for n in gm.graph.nodes
        if n.op == "get_attr" and str(n.target) in param_names and len(_shape(gm, n) or ()) == 2
    }
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.kwargs.keys() - {"alpha", "beta"}:
            continue
        if node.target in (aten.matmul.default, aten.mm.default) and not node.kwargs:
            (x, transposed), bias = node.args, None
        elif node.target is aten.addmm.default and all(v == 1 for v in node.kwargs.values()):
            bias, x, transposed = node.args[:3]
            if len(node.args) > 3:
                continue  # beta / alpha given positionally
        else:
            continue
        weight = _transposed_param(transposed, params)
        if weight is None:
            continue
        if bias is not None and _shape(gm, bias) != (_shape(gm, weight) or ())[:1]:
            continue  # a (M, N) or broadcast bias is not linear's
        with gm.graph.inserting_before(node):
            args = (x, weight) if bias is None else (x, weight, bias)
            linear = gm.graph.call_function(LINEAR, args)
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        if not transposed.users:
            gm.graph.erase_node(transposed)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def _functional_variant(op: torch._ops.OpOverload) -> torch._ops.OpOverload | None:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor``: the out-of-place op with the same arguments,
    for ops that write only to their first argument and return it."""
    schema = op._schema
    written = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if not schema.arguments or written != [schema.arguments[0]]:
        return None
    base = schema.name.split("::")[-1]
    if not base.endswith("_") or base.startswith("_"):
        return None
    packet = getattr(aten, base[:-1], None)
    overload = getattr(packet, schema.overload_name or "default", None)
    if overload is None:
        return None
    if [a.name for a in overload._schema.arguments] != [a.name for a in schema.arguments]:
        return None
    return overload


def _aliases_input(node: fx.Node) -> bool:
    """Whether a node's result may share memory with one of its inputs (a view)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return node.op != "call_function"  # placeholders, parameters and buffers are not fresh
    return any(r.alias_info is not None for r in node.target._schema.returns)


def mutating_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and isinstance(n.target, torch._ops.OpOverload)
        and n.target._schema.is_mutable
    ]


def functional_from_inplace(gm: fx.GraphModule) -> int:
    """Rewrite in-place ops on fresh tensors (``out += identity``, ``ReLU(inplace=True)``,
    ``detach_`` of a new constant) as their out-of-place ops, in place; returns how many.

    Sound when nothing else can observe the mutation: the mutated tensor is the fresh result of
    an op that returns new memory (not a view, not an input, parameter or buffer), and every
    other reader of it comes earlier in the graph and is not a view of it. Later readers already
    refer to the in-place node, whose value the out-of-place op computes. Mutations that fail
    these tests are left for ``torch.export``'s functionalization.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    rewritten = 0
    for n in mutating_nodes(gm):
        functional = _functional_variant(n.target)
        target = n.args[0] if n.args else None
        if functional is None or not isinstance(target, fx.Node) or _aliases_input(target):
            continue
        others = [u for u in target.users if u is not n]
        if any(order[u] > order[n] or _aliases_input(u) for u in others):
            continue
        n.target = functional
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
