"""``sparta.propagate``: trace, resolve attributes, run the engine, build the report."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from . import propagation_rules  # noqa: F401  (registers the built-in rules)
from .calls import bound_arguments
from .engine import Propagation, propagate_graph
from .errors import AttrError
from .flops import matmul_flops
from .report import NodeEntry, Report, TensorEntry
from .sparsify import plain_parameter_name
from .tesa import TeSA, as_tesa, detect_pattern
from .trace import Traced, trace

Attrs = Mapping[str, TeSA | torch.Tensor]


@dataclass
class Propagated:
    """Everything later stages need: the trace, the given attributes and the masks."""

    traced: Traced
    given: dict[str, TeSA]  # attribute name -> TeSA
    given_nodes: dict[fx.Node, torch.Tensor]
    result: Propagation
    report: Report


def resolve_attrs(
    traced: Traced, attrs: Attrs
) -> tuple[dict[str, TeSA], dict[fx.Node, torch.Tensor]]:
    """Map each attribute name to its graph node, checking names, types and shapes."""
    if not isinstance(attrs, Mapping):
        raise AttrError(
            f"attrs must be a dict from parameter or input names to masks, got "
            f"{type(attrs).__name__}."
        )
    by_name: dict[str, fx.Node] = {**traced.params, **traced.inputs}
    by_name.update(
        {
            plain_parameter_name(k): v
            for k, v in traced.params.items()
            if plain_parameter_name(k) != k
        }
    )
    given: dict[str, TeSA] = {}
    nodes: dict[fx.Node, torch.Tensor] = {}
    for name, value in attrs.items():
        if name not in by_name:
            known = [*traced.params, *traced.inputs]
            raise AttrError.unknown_name(name, known)
        tesa = as_tesa(value, name)
        node = by_name[name]
        v = traced.example[node]
        if not isinstance(v, torch.Tensor):
            raise AttrError(f"attribute {name!r} names a non-tensor argument ({type(v).__name__}).")
        if tuple(tesa.shape) != tuple(v.shape):
            raise AttrError(
                f"attribute {name!r}: the mask has shape {tuple(tesa.shape)} but the tensor has "
                f"shape {tuple(v.shape)}; give a bool mask of exactly the tensor's shape."
            )
        if node in nodes:
            raise AttrError(f"attribute {name!r} names a tensor that another attribute names too.")
        given[name] = tesa
        nodes[node] = tesa.mask
    return given, nodes


def tensor_names(traced: Traced) -> dict[fx.Node, tuple[str, str]]:
    """Report name and kind of every tensor node."""
    names: dict[fx.Node, tuple[str, str]] = {}
    for q, n in traced.params.items():
        names[n] = (q, "parameter")
    for q, n in traced.inputs.items():
        names[n] = (q, "input")
    for n in traced.gm.graph.nodes:
        if n.op == "call_function" and isinstance(traced.example.get(n), torch.Tensor):
            names.setdefault(n, (n.name, "activation"))
    out = next(n for n in traced.gm.graph.nodes if n.op == "output")
    leaves = [a for a in torch.utils._pytree.tree_leaves(out.args) if isinstance(a, fx.Node)]
    for i, a in enumerate(leaves):
        if a in names and names[a][1] == "activation":
            names[a] = ("output" if len(leaves) == 1 else f"output.{i}", "output")
    return names


def build_report(
    traced: Traced, given: dict[str, TeSA], result: Propagation, seconds: float
) -> Report:
    names = tensor_names(traced)
    given_by_node = {}
    for name, tesa in given.items():
        for n, (q, _) in names.items():
            if q == name or plain_parameter_name(q) == name:
                given_by_node[n] = tesa
    tensors, masks = [], {}
    for n, (name, kind) in names.items():
        m = result.masks.get(n)
        if not isinstance(m, torch.Tensor):
            continue
        masks[name] = m
        g = given_by_node.get(n)
        tensors.append(
            TensorEntry(
                name=name,
                kind=kind,
                shape=list(m.shape),
                density_given=g.density if g is not None else None,
                density=float(m.float().mean()) if m.numel() else 1.0,
                pattern=str(detect_pattern(m)),
            )
        )
    nodes = [
        _node_entry(traced, n, result)
        for n in traced.gm.graph.nodes
        if n.op == "call_function" and n in result.masks
    ]
    return Report(
        tensors=tensors,
        nodes=nodes,
        masks=masks,
        propagation_s=seconds,
        sweeps=result.sweeps,
        inferred_ops=list(result.inferred),
    )


def _node_entry(traced: Traced, n: fx.Node, result: Propagation) -> NodeEntry:
    entry = NodeEntry(name=n.name, target=str(n.target), rule=result.rules.get(n, "-"))
    out = result.masks[n]
    if isinstance(out, torch.Tensor) and isinstance(n.target, torch._ops.OpOverload):
        masks = {
            k: result.masks.get(v)
            for k, v in bound_arguments(n.target, n.args, n.kwargs).items()
            if isinstance(v, fx.Node)
        }
        entry.flops_dense, entry.flops_sparse = matmul_flops(n.target, masks, out)
    return entry


def run_propagation(
    model: torch.nn.Module,
    attrs: Attrs,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> Propagated:
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    traced = trace(model, example_inputs, example_kwargs)
    given, given_nodes = resolve_attrs(traced, attrs)
    start = time.perf_counter()
    result = propagate_graph(traced, given_nodes, strict=strict)
    seconds = time.perf_counter() - start
    report = build_report(traced, given, result, seconds)
    return Propagated(traced, given, given_nodes, result, report)


def propagate(
    model: torch.nn.Module,
    attrs: Attrs,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> Report:
    """Spread the given sparsity over the whole graph; return the report.

    ``strict=True`` raises ``MissingRuleError`` for an op without a rule; ``strict=False``
    infers its rule by tensor scrambling (or treats it conservatively) and says so.
    """
    return run_propagation(
        model, attrs, example_inputs, example_kwargs=example_kwargs, strict=strict
    ).report
