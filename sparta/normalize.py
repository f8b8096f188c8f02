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
