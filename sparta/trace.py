"""Capture a model as an ATen-level fx graph with torch.export, and resolve attribute names.

Parameters and buffers appear as ``get_attr`` nodes, one per tensor (tied weights share one),
forward() arguments as placeholders named by the argument names. Reparametrized weights
(weight_norm, spectral_norm, parametrizations, torch.nn.utils.prune) are folded into plain
parameters first (``sparta.reparam``). In-place ops are made functional and products with a
transposed 2-D parameter are rewritten as ``aten.linear`` (``sparta.normalize``). The batch and
sequence dims of tensor inputs are exported as dynamic where the model allows it, so the
compiled module accepts other sizes than the example.
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
from .normalize import functional_from_inplace, linear_from_matmuls, mutating_nodes
from .reparam import ParamNames, fold_reparametrizations

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
    params: dict[str, fx.Node]  # primary qualified name -> get_attr node
    buffers: dict[str, fx.Node]
    inputs: dict[str, fx.Node]  # forward() argument name -> placeholder
    example: dict[fx.Node, Any] = field(default_factory=dict)  # concrete value per node
    dynamic: bool = True
    names: ParamNames = field(default_factory=ParamNames)  # aliases, reparametrized weights


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


def specialised_sizes(
    traced: Traced, model: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> dict[int | str, tuple[int | None, ...]]:
    """Per tensor argument of the example (by position, or by name for keyword arguments), the
    dims torch.export fixed because the example had size 0 or 1 there (its 0/1 specialisation:
    the graph may have baked that size into views), as that size; None for every other dim.
    Arguments with no such dim are left out."""
    names = list(_bind_inputs(model, args, kwargs))
    out: dict[int | str, tuple[int | None, ...]] = {}
    for key, value in [*enumerate(args), *kwargs.items()]:
        name = names[key] if isinstance(key, int) and key < len(names) else key
        ph = traced.inputs.get(name) if isinstance(value, torch.Tensor) else None
        val = ph.meta.get("val") if ph is not None else None
        if not isinstance(val, torch.Tensor):
            continue
        sizes = tuple(s if isinstance(s, int) and s in (0, 1) else None for s in val.shape)
        if any(s is not None for s in sizes):
            out[key] = sizes
    return out


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
        source, names = fold_reparametrizations(model)
        ep, dynamic = _try_export(source, example_inputs, kwargs, bound, dynamic)
    finally:
        model.train(was_training)
    gm = _functional_module(ep, type(model).__name__)
    traced = Traced(gm=gm, params={}, buffers={}, inputs={}, dynamic=dynamic, names=names)
    linear_from_matmuls(gm, names.parameter_names())  # x @ W.t() and addmm(b, x, W.t()) -> linear
    _one_node_per_tensor(traced)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            traced.inputs[node.name] = node
    traced.example = record_values(gm, example_inputs, kwargs)
    return traced


def _functional_module(ep: torch.export.ExportedProgram, model_name: str) -> fx.GraphModule:
    """``ep.module()`` without in-place ops: fresh tensors are updated out of place
    (``sparta.normalize``), anything else through torch.export's functionalization."""
    gm = ep.module()
    functional_from_inplace(gm)
    if not mutating_nodes(gm):
        return gm
    try:
        gm = ep.run_decompositions({}).module()
    except Exception as e:  # noqa: BLE001  (export's own verifier may refuse the program)
        reason = f" ({type(e).__name__}: {str(e).strip()[:200]})"
    else:
        functional_from_inplace(gm)
        reason = ""
    left = mutating_nodes(gm)
    if left:
        ops = sorted({str(n.target) for n in left})
        raise TraceError(
            f"{model_name}.forward() mutates tensors that sparta cannot make functional: {ops} "
            f"(an input, a parameter or buffer, or a view of one is written){reason}. sparta "
            f"compiles the inference graph without side effects: write the update out of place "
            f"(y = x + 1 instead of x += 1), or keep state updates outside forward()."
        )
    return gm


def _one_node_per_tensor(traced: Traced) -> None:
    """Index get_attr nodes by primary name; uses of a tied tensor's aliases go to one node,
    and alias nodes nothing reads are erased (torch.export reads a tied tensor once)."""
    gm, names = traced.gm, traced.names
    by_primary: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            primary = names.primary.get(str(node.target), str(node.target))
            by_primary.setdefault(primary, []).append(node)
    changed = False
    for primary, nodes in by_primary.items():
        nodes.sort(key=lambda n: len(n.users) == 0)  # a read node first
        keep = nodes[0]
        for other in nodes[1:]:
            other.replace_all_uses_with(keep)
            gm.graph.erase_node(other)
            changed = True
        is_param = primary in names.parameters
        (traced.params if is_param else traced.buffers)[primary] = keep
    if changed:
        gm.graph.lint()
        gm.recompile()


def _try_export(model, args, kwargs, bound, dynamic):
    try:
        return _export_specialising(model, args, kwargs, bound, dynamic)
    except Exception as e:
        if _register_output_pytrees(e):
            return _export_specialising(model, args, kwargs, bound, dynamic)
        raise


def _register_output_pytrees(e: Exception) -> bool:
    """transformers' ``DynamicCache`` (returned with ``use_cache=True``, the default of its
    decoder configs) is no pytree until transformers' own export support registers it; do that
    and say whether to retry."""
    if "DynamicCache" not in str(e.__cause__ or e):
        return False
    try:
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        return False
    register_dynamic_cache_export_support()
    return True


def _export_specialising(model, args, kwargs, bound, dynamic):
    if dynamic:
        try:
            return _export(model, args, kwargs, _dynamic_spec(bound)), True
        except Exception:
            pass  # some models specialise their shapes; export them static below
    try:
        return _export(model, args, kwargs, None), False
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            " forward() returns an object torch.export cannot flatten: register its type with "
            "torch.utils._pytree.register_pytree_node, or return tensors, tuples and dicts."
            if "not a known type" in str(e)
            else ""
        )
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
            f"{reason[:500]}.{hint} sparta traces with torch.export: make forward() free of "
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
