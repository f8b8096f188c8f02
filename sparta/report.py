"""The propagated-sparsity report: every named tensor and every op node, as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import AttrError


@dataclass
class TensorEntry:
    name: str
    kind: str  # "parameter" | "input" | "activation" | "output"
    shape: list[int]
    density_given: float | None
    density: float
    pattern: str
    aliases: list[str] = field(default_factory=list)  # other names of a tied parameter


@dataclass
class NodeEntry:
    name: str
    target: str
    rule: str
    weight: str = ""  # the first parameter among the node's inputs (its primary name), if any
    impl: str = "dense"
    latency_ms: float | None = None
    dense_latency_ms: float | None = None
    flops_dense: int = 0
    flops_sparse: int = 0
    reason: str = ""  # why the planner chose ``impl`` (measured candidates, back-off)


@dataclass
class Report:
    tensors: list[TensorEntry]
    nodes: list[NodeEntry]
    masks: dict[str, torch.Tensor] = field(repr=False)
    propagation_s: float = 0.0
    sweeps: int = 0
    inferred_ops: list[str] = field(default_factory=list)
    conservative_ops: list[str] = field(default_factory=list)  # no rule, nothing inferred
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> name in ``masks``
    latency_dense_ms: float | None = None
    latency_compiled_ms: float | None = None
    runtime: str = ""  # what runs the compiled graph (sparta.compile's mode)
    rewrites: list[str] = field(default_factory=list)  # graph rewrites beyond the plan
    whole: dict[str, Any] | None = None  # whole graph vs dense graph, timed the same way
    origin: str = ""  # where a loaded plan came from ("" when compiled in this process)

    # ------------------------------------------------------------- queries

    def mask(self, name: str) -> torch.Tensor:
        """The propagated bool mask (True = kept) of a parameter (by any of its names), input,
        activation or output."""
        name = self.aliases.get(name, name)
        if name not in self.masks:
            from .sparsify import plain_parameter_name

            plain = {plain_parameter_name(k): k for k in self.masks}
            if name not in plain:
                raise AttrError.unknown_name(name, self.masks, what="tensor")
            name = plain[name]
        return self.masks[name].clone()

    def tensor(self, name: str) -> TensorEntry:
        for t in self.tensors:
            if t.name == name:
                return t
        raise AttrError.unknown_name(name, [t.name for t in self.tensors], what="tensor")

    def node(self, name: str) -> NodeEntry:
        for n in self.nodes:
            if n.name == name:
                return n
        raise AttrError.unknown_name(name, [n.name for n in self.nodes], what="node")

    def weight_density(self) -> tuple[float, float]:
        """(given, propagated) kept fraction over all parameters, by element count."""
        params = [t for t in self.tensors if t.kind == "parameter"]
        total = sum(_numel(t.shape) for t in params) or 1
        given = sum(
            _numel(t.shape) * (t.density_given if t.density_given is not None else 1.0)
            for t in params
        )
        after = sum(_numel(t.shape) * t.density for t in params)
        return given / total, after / total

    def summary(self) -> str:
        given, after = self.weight_density()
        fd = sum(n.flops_dense for n in self.nodes)
        fs = sum(n.flops_sparse for n in self.nodes)
        origin = f"{self.origin} (the timings are those of the compile that saved it)"
        parts = [origin] if self.origin else []
        parts += [
            f"weights kept {given:.1%} given -> {after:.1%} after propagation (all parameters)",
            f"matmul FLOPs {fd / 1e6:.1f}M dense -> {fs / 1e6:.1f}M sparse"
            + (f" ({fd / fs:.2f}x fewer)" if fs else ""),
            f"propagation {self.propagation_s * 1e3:.0f} ms in {self.sweeps} sweeps",
        ]
        if self.latency_dense_ms and self.latency_compiled_ms:
            timer = f", {self.whole['timer']}" if self.whole else ""
            parts.append(
                f"latency {self.latency_dense_ms:.3f} ms dense -> {self.latency_compiled_ms:.3f} "
                f"ms compiled ({self.latency_dense_ms / self.latency_compiled_ms:.2f}x{timer})"
            )
        if self.runtime:
            parts.append(f"runtime {self.runtime}")
        if self.inferred_ops:
            parts.append(f"rules inferred by scrambling for: {', '.join(self.inferred_ops)}")
        if self.conservative_ops:
            parts.append(
                f"no rule, treated conservatively (nothing pruned through them): "
                f"{', '.join(self.conservative_ops)}"
            )
        return "; ".join(parts)

    # ------------------------------------------------------------- output

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensors": [asdict(t) for t in self.tensors],
            "nodes": [asdict(n) for n in self.nodes],
            "summary": self.summary(),
            "latency_dense_ms": self.latency_dense_ms,
            "latency_compiled_ms": self.latency_compiled_ms,
            "propagation_s": self.propagation_s,
            "inferred_ops": list(self.inferred_ops),
            "conservative_ops": list(self.conservative_ops),
            "runtime": self.runtime,
            "rewrites": list(self.rewrites),
            "whole": self.whole,
            "origin": self.origin,
        }

    def to_json(self, path: str | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def __str__(self) -> str:
        from .report_render import render_text

        return render_text(self)

    def plot(self, path: str) -> None:
        """A PNG of given vs propagated density per parameter (needs matplotlib)."""
        from .report_render import plot_densities

        plot_densities(self, path)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
