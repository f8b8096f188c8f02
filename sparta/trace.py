"""Capture a model as an ATen-level fx graph with torch.export, and resolve attribute names.

Parameters and buffers appear as ``get_attr`` nodes named by their qualified names,
forward() arguments as placeholders named by the argument names. Products with a transposed
2-D parameter are rewritten as ``aten.linear`` (``sparta.normalize``). The batch and sequence
dims of tensor inputs are exported as dynamic where the model allows it, so the compiled
module accepts other sizes than the example.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim

from .errors import TraceError
from .normalize import linear_from_matmuls

# Ops that read only a tensor's metadata, never its values.
METADATA_OPS = {
    torch.ops.aten.sym_size.int,
    torch.ops.aten.sym_numel.default,
    torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_storage_offset.default,
    torch.ops.aten._assert_tensor_metadata.default,
}


@dataclass
class Traced:
    """The exported graph plus everything later stages need to name its tensors."""

    gm: fx.GraphModule
    params: dict[str, fx.Node]  # qualified name -> get_attr node
    buffers: dict[str, fx.Node]
    inputs: dict[str, fx.Node]  # forward() argument name -> placeholder
    example: dict[fx.Node, Any] = field(default_factory=dict)  # concrete value per node
    dynamic: bool = True


def _bind_inputs(model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    try:
        sig = inspect.signature(model.forward)
        return dict(sig.bind(*args, **kwargs).arguments)
    except (TypeError, ValueError) as e:
        raise TraceError(
            f"the example inputs do not fit {type(model).__name__}.forward: {e}. Pass "
            f"example_inputs as a tuple of positional arguments (and example_kwargs as a dict)."
        ) from None


def _dynamic_spec(bound: Mapping[str, Any]) -> dict[str, Any]:
    """Batch (dim 0) and sequence (dim 1) of tensor inputs dynamic, everything else static."""
    spec: dict[str, Any] = {}
    for name, v in bound.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            dims = {0: Dim.AUTO}
            if v.dim() >= 2 and not v.is_floating_point():
                dims[1] = Dim.AUTO  # token ids (B, T)
            elif v.dim() == 3:
                dims[1] = Dim.AUTO  # (B, T, hidden) activations
            spec[name] = dims
        else:
            spec[name] = None
    return spec


def _export(model, args, kwargs, dynamic_shapes):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)


def trace(
    model: torch.nn.Module,
    example_inputs: tuple,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic: bool = True,
) -> Traced:
    """Export ``model`` and record a concrete example value for every node."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"sparta needs a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    bound = _bind_inputs(model, example_inputs, kwargs)
    was_training = model.training
    model.eval()
    try:
        ep, dynamic = _try_export(model, example_inputs, kwargs, bound, dynamic)
    finally:
        model.train(was_training)
    gm = ep.module()
    traced = Traced(gm=gm, params={}, buffers={}, inputs={}, dynamic=dynamic)
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    linear_from_matmuls(gm, param_names)  # x @ W.t() and addmm(b, x, W.t()) -> linear
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            target = str(node.target)
            (traced.params if target in param_names else traced.buffers)[target] = node
        elif node.op == "placeholder":
            traced.inputs[node.name] = node
    traced.example = record_values(gm, example_inputs, kwargs)
    return traced


def _try_export(model, args, kwargs, bound, dynamic):
    if dynamic:
        try:
            return _export(model, args, kwargs, _dynamic_spec(bound)), True
        except Exception:
            pass  # some models specialise their shapes; export them static below
    try:
        return _export(model, args, kwargs, None), False
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
            f"{reason[:500]}. sparta traces with torch.export: make forward() free of "
            f"data-dependent Python control flow (use torch.where / torch.cond), of calls into "
            f"non-PyTorch code, and of in-place mutation of inputs; check the model with "
            f"torch.export.export(model, example_inputs) directly for the full report."
        ) from e


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n] = out
        return out


def record_values(gm: fx.GraphModule, args: tuple, kwargs: Mapping[str, Any]) -> dict:
    """Run the graph once on the example and keep every node's value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args) + [kwargs[p.name] for p in placeholders[len(args) :] if p.name in kwargs]
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*flat)
    return rec.values
