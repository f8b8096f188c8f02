"""``sparta.compile``: propagate, plan, emit a new graph module, run it in a runtime.

The user's model is untouched. Stages: ``run_propagation`` -> ``make_plan`` (candidates timed
as the runtime will run them) -> ``Emitter`` (``sparta/emit.py``) -> whole-graph check against
dense with back-off -> ``runtime.build`` (eager fx, Inductor, Inductor + CUDA graphs).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .emit import Emitter, pruned_module
from .plan import Plan, back_off, dense_plan, make_plan
from .propagate import Attrs, Propagated, run_propagation
from .report import Report
from .runtime import Runtime, build, resolve
from .timing import compare_ms

WHOLE_TOL = 1.02  # the whole sparse graph may measure up to 2% slower (noise) before back-off
MAX_BACK_OFFS = 6


def emit(p: Propagated, plan: Plan) -> tuple[fx.GraphModule, list[str]]:
    """The compiled graph of ``plan`` and the notes of rewrites beyond the plan."""
    e = Emitter(p, plan, torch.nn.Module())
    return e.emit(), e.notes


@dataclass
class WholeGraph:
    """The whole compiled graph measured against the dense graph, both the same way."""

    dense_ms: float
    compiled_ms: float
    timer: str
    backed_off: list[str] = field(default_factory=list)


class CompiledModel(torch.nn.Module):
    """The compiled module: same function as the masked model, its report and plan.

    ``forward`` runs the emitted graph in the runtime chosen at compile time (``runtime``).
    Under an enclosing ``torch.compile`` (``torch.compile(compiled, fullgraph=True)``) it hands
    Dynamo the plain graph, whose generated kernels are registered ops: one graph, no break.
    """

    def __init__(self, gm: fx.GraphModule, report: Report, plan: Plan, runtime: Runtime) -> None:
        super().__init__()
        self.graph_module = gm
        self.report = report
        self.plan = plan
        self.runtime = runtime
        self.__dict__["_run"] = build(gm, runtime)  # not a submodule: no duplicate state

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            if torch.compiler.is_compiling():
                return self.graph_module(*args, **kwargs)
            return self.__dict__["_run"](*args, **kwargs)

    def export_pruned(self) -> torch.nn.Module:
        """The shrunk dense model, trainable (``sparta.emit.pruned_module``)."""
        return pruned_module(self.graph_module, self.plan)


def _device_of(model: torch.nn.Module, example_inputs: tuple) -> torch.device:
    for t in list(model.parameters()) + [e for e in example_inputs if isinstance(e, torch.Tensor)]:
        return t.device
    return torch.device("cpu")


def compile(
    model: torch.nn.Module,
    attrs: Attrs,
    example_inputs: Any,
    *,
    device: str | torch.device | None = None,
    backends: Iterable[str] | None = None,
    strict: bool = True,
    example_kwargs: Mapping[str, Any] | None = None,
    measure: bool = True,
    mode: str = "default",
) -> CompiledModel:
    """Propagate sparsity, plan each node by measured latency, and build the compiled module.

    The compiled module computes the model with every parameter and input multiplied by its
    attribute mask. ``mode`` picks the runtime (``sparta/runtime.py``): ``"default"`` (Inductor
    on CUDA, eager fx on the CPU), ``"eager"``, ``"inductor"``, ``"reduce-overhead"`` (Inductor
    with CUDA graphs); candidates are timed as that runtime runs them. ``measure`` times the
    whole compiled graph against the dense graph the same way and turns back to dense the
    nodes that save least while the whole is slower (``report.whole``).

    Raises:
        AttrError, TraceError, MissingRuleError: see ``sparta.propagate``.
        PlanError: an unknown backend or mode.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    dev = torch.device(device) if device is not None else _device_of(model, example_inputs)
    runtime = resolve(mode, dev)
    if dev != _device_of(model, example_inputs):
        model = copy.deepcopy(model).to(dev)  # the user's model stays where it is
        example_inputs = tuple(
            e.to(dev) if isinstance(e, torch.Tensor) else e for e in example_inputs
        )
    p = run_propagation(model, attrs, example_inputs, example_kwargs=example_kwargs, strict=strict)
    plan = make_plan(p, dev, backends, device_time=runtime.device_time)
    gm, notes = emit(p, plan)
    whole = None
    if measure:
        kw = dict(example_kwargs or {})
        plan, gm, notes, whole = _check_whole(p, plan, gm, notes, runtime, example_inputs, kw)
    report = _fill_report(p.report, plan, runtime, notes, whole)
    return CompiledModel(gm, report, plan, runtime)


def _time_graphs(
    graphs: dict[str, Callable[..., Any]], runtime: Runtime, inputs: tuple, kwargs: dict
) -> dict[str, float]:
    fns = {k: (lambda g=g: g(*inputs, **kwargs)) for k, g in graphs.items()}
    return compare_ms(fns, runtime.device, device_time=runtime.device_time, budget_ms=400)


def _check_whole(p, plan, gm, notes, runtime, inputs, kwargs):
    """Time the compiled graph against the dense graph in the same way; while it loses, turn
    back to dense the sparse nodes that saved least alone (half of them per step)."""
    timer = "device time, CUDA-graph replay" if runtime.device_time else "host time per call"
    if not plan.sparse():  # the compiled graph is the dense graph
        t = _time_graphs({"dense": gm}, runtime, inputs, kwargs)
        return plan, gm, notes, WholeGraph(t["dense"], t["dense"], f"{timer} of the fx graph")
    dense_gm, _ = emit(p, dense_plan(plan))
    t = _time_graphs({"dense": dense_gm, "compiled": gm}, runtime, inputs, kwargs)
    whole = WholeGraph(t["dense"], t["compiled"], f"{timer} of the fx graphs")
    for _ in range(MAX_BACK_OFFS):
        sparse = sorted(plan.sparse(), key=lambda n: plan.choices[n].saving_ms)
        if whole.compiled_ms <= WHOLE_TOL * whole.dense_ms or not sparse:
            break
        if "dense" not in plan.backends:
            break  # the caller forced sparse families: report, do not override
        worst = sparse[: max(1, len(sparse) // 2)]
        reason = (
            f"backed off: the whole graph measured {whole.compiled_ms:.3f} ms vs dense "
            f"{whole.dense_ms:.3f} ms"
        )
        plan = back_off(p, plan, worst, reason)
        whole.backed_off += [n.name for n in worst]
        gm, notes = emit(p, plan)
        whole.compiled_ms = _time_graphs({"c": gm}, runtime, inputs, kwargs)["c"]
    if whole.compiled_ms > WHOLE_TOL * whole.dense_ms:
        warnings.warn(
            f"sparta: the compiled graph measured slower than the dense graph on "
            f"{runtime.device} ({whole.compiled_ms:.3f} ms vs {whole.dense_ms:.3f} ms, "
            f"{whole.timer}); backed off: {', '.join(whole.backed_off) or 'nothing'}.",
            stacklevel=3,
        )
    return plan, gm, notes, whole


def _fill_report(
    report: Report, plan: Plan, runtime: Runtime, notes: list[str], whole: WholeGraph | None
) -> Report:
    by_name = {n.name: c for n, c in plan.choices.items()}
    for entry in report.nodes:
        c = by_name.get(entry.name)
        if c is not None:
            entry.impl, entry.reason = c.impl, c.reason
            entry.latency_ms, entry.dense_latency_ms = c.latency_ms, c.dense_latency_ms
    report.runtime = runtime.describe()
    report.rewrites = list(notes)
    if whole is not None:
        report.latency_dense_ms, report.latency_compiled_ms = whole.dense_ms, whole.compiled_ms
        report.whole = {
            "dense_ms": whole.dense_ms,
            "compiled_ms": whole.compiled_ms,
            "timer": whole.timer,
            "backed_off": whole.backed_off,
        }
    return report
