"""``sparta.propagate``: trace, resolve attributes, run the engine, build the report."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import propagation_rules  # noqa: F401  (registers the built-in rules)
from .calls import bound_arguments
from .engine import Propagation, propagate_graph
from .errors import AttrError
from .flops import matmul_flops
from .report import NodeEntry, Report, TensorEntry
from .tesa import Pattern, TeSA, as_tesa, count_kept, surviving_pattern
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
    patterns: dict[fx.Node, Pattern] = field(default_factory=dict)  # computed once, by the report

    def pattern_of(self, node: fx.Node) -> Pattern:
        """The pattern of a node's propagated mask (a given n:m or block pattern survives)."""
        if node not in self.patterns:
            tesa = given_by_node(self.traced, self.given).get(node)
            mask = self.result.masks[node]
            self.patterns[node] = surviving_pattern(tesa.pattern if tesa else None, mask)
        return self.patterns[node]


def given_by_node(traced: Traced, given: Mapping[str, TeSA]) -> dict[fx.Node, TeSA]:
    out: dict[fx.Node, TeSA] = {}
    for name, tesa in given.items():
        node = _node_of(traced, name)
        if node is not None:
            out.setdefault(node, tesa)
    return out


def resolve_attrs(
    traced: Traced, attrs: Attrs
) -> tuple[dict[str, TeSA], dict[fx.Node, torch.Tensor]]:
    """Map each attribute name to its graph node, checking names, types and shapes.

    Any alias of a tied tensor reaches its one node; two different masks for one tensor are an
    error. A parameter that forward() never reads takes its mask with a warning (it changes
    nothing).
    """
    if not isinstance(attrs, Mapping):
        raise AttrError(
            f"attrs must be a dict from parameter or input names to masks, got "
            f"{type(attrs).__name__}."
        )
    given: dict[str, TeSA] = {}
    nodes: dict[fx.Node, torch.Tensor] = {}
    named: dict[fx.Node, str] = {}
    for name, value in attrs.items():
        node = _node_of(traced, name)
        tesa = as_tesa(value, name)
        given[name] = tesa
        if node is None:
            warnings.warn(
                f"sparta: parameter {name!r} is not read by forward() on the example inputs; "
                f"its mask changes nothing.",
                stacklevel=3,
            )
            continue
        v = traced.example[node]
        if not isinstance(v, torch.Tensor):
            raise AttrError(f"attribute {name!r} names a non-tensor argument ({type(v).__name__}).")
        if tuple(tesa.shape) != tuple(v.shape):
            raise AttrError(
                f"attribute {name!r}: the mask has shape {tuple(tesa.shape)} but the tensor has "
                f"shape {tuple(v.shape)}; give a bool mask of exactly the tensor's shape."
            )
        if node in nodes:
            if not torch.equal(nodes[node], tesa.mask):
                raise AttrError(
                    f"attributes {named[node]!r} and {name!r} name the same tensor (tied "
                    f"weights: {_all_names(traced, node)}) but give different masks; a tensor "
                    f"has one mask: give it under one name, or give equal masks."
                )
            continue
        nodes[node] = tesa.mask
        named[node] = name
    return given, nodes


def _node_of(traced: Traced, name: str) -> fx.Node | None:
    """The node an attribute name resolves to; None for a parameter forward() does not read."""
    if name in traced.inputs:
        return traced.inputs[name]
    names = traced.names
    primary = names.primary.get(name)
    if primary is not None and primary in names.parameters:
        return traced.params.get(primary)
    if name in names.underlying:
        effective = names.underlying[name]
        raise AttrError(
            f"attribute {name!r} names a tensor that the reparametrization of {effective!r} "
            f"reads (weight_norm, spectral_norm, a torch.nn.utils.parametrize "
            f"parametrization); the model uses {effective!r}, and sparta masks that effective "
            f"weight. Give the mask as {effective!r}, of its shape."
        )
    raise AttrError.unknown_name(name, [*sorted(names.parameter_names()), *traced.inputs])


def _all_names(traced: Traced, node: fx.Node) -> str:
    primary = next(q for q, n in traced.params.items() if n is node)
    return ", ".join(repr(n) for n in traced.names.groups.get(primary, [primary]))


def tensor_names(traced: Traced) -> dict[fx.Node, tuple[str, str]]:
    """Report name and kind of every tensor node (parameters by their primary name)."""
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
    traced: Traced,
    given_nodes: Mapping[fx.Node, torch.Tensor],
    result: Propagation,
    seconds: float,
    given: Mapping[str, TeSA] | None = None,
    patterns: dict[fx.Node, Pattern] | None = None,
) -> Report:
    """The report of a propagation; ``patterns`` (if given) receives each tensor's pattern."""
    names = tensor_names(traced)
    tesas = given_by_node(traced, given or {})
    tensors, masks = [], {}
    for n, (name, kind) in names.items():
        m = result.masks.get(n)
        if not isinstance(m, torch.Tensor):
            continue
        masks[name] = m
        pattern = surviving_pattern(tesas[n].pattern if n in tesas else None, m)
        if patterns is not None:
            patterns[n] = pattern
        g = given_nodes.get(n)
        tensors.append(
            TensorEntry(
                name=name,
                kind=kind,
                shape=list(m.shape),
                density_given=count_kept(g) / g.numel() if g is not None and g.numel() else None,
                density=count_kept(m) / m.numel() if m.numel() else 1.0,
                pattern=str(pattern),
                aliases=traced.names.aliases(name) if kind == "parameter" else [],
            )
        )
    params = {n: name for n, (name, kind) in names.items() if kind == "parameter"}
    nodes = [
        _node_entry(n, result, params)
        for n in traced.gm.graph.nodes
        if n.op == "call_function" and n in result.masks
    ]
    aliases = {a: p for p in traced.params for a in traced.names.aliases(p)}
    return Report(
        tensors=tensors,
        nodes=nodes,
        masks=masks,
        propagation_s=seconds,
        sweeps=result.sweeps,
        inferred_ops=list(result.inferred),
        conservative_ops=list(result.conservative),
        aliases=aliases,
    )


def _node_entry(n: fx.Node, result: Propagation, params: Mapping[fx.Node, str]) -> NodeEntry:
    weight = next((params[a] for a in n.all_input_nodes if a in params), "")
    entry = NodeEntry(
        name=n.name, target=str(n.target), rule=result.rules.get(n, "-"), weight=weight
    )
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
    dynamic: bool = True,
    on_traced: Callable[[], None] | None = None,
) -> Propagated:
    """Trace (with dynamic batch and sequence dims unless ``dynamic=False``), resolve the
    attributes, propagate, report. ``on_traced()`` is called between tracing and propagating
    (progress)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    traced = trace(model, example_inputs, example_kwargs, dynamic=dynamic)
    given, given_nodes = resolve_attrs(traced, attrs)
    if on_traced is not None:
        on_traced()
    start = time.perf_counter()
    result = propagate_graph(traced, given_nodes, strict=strict)
    seconds = time.perf_counter() - start
    patterns: dict[fx.Node, Pattern] = {}
    report = build_report(traced, given_nodes, result, seconds, given, patterns)
    return Propagated(traced, given, given_nodes, result, report, patterns)


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
