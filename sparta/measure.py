"""``sparta.measure``: latency of every planned node and of the whole forward, dense vs compiled.

Measured the way the planner measures (``sparta/timing.py``): each node's chosen implementation
and its dense op timed round-robin on the node's real input (recorded by running the traced graph
on the given inputs), by device time (CUDA-graph replays) in the graph runtimes on CUDA and per
call on the host otherwise; the whole compiled graph against the dense graph (the same emitted
graph with every node dense) timed the same way. FLOPs come from the propagated masks, so the
gap between the FLOPs a plan saves and the time it saves is visible per node (SparTA's "myth of
proxy metrics": FLOPs are no proxy for latency).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .choice import Plan, masked_weight, timer_label
from .errors import SpartaError
from .kernels import reference
from .plan import MATMULS, dense_plan, fusable_activation
from .plan_shrink import shrunk_call
from .timing import compare_ms
from .trace import record_values

if TYPE_CHECKING:
    from .propagate import Propagated


@dataclass
class NodeMeasurement:
    name: str
    target: str
    impl: str
    latency_ms: float
    dense_latency_ms: float
    flops: int  # multiply-adds x 2 the chosen implementation needs by the propagated masks
    dense_flops: int
    weight: str = ""  # the node's weight (report.nodes[i].weight); "+N stacked" for siblings


@dataclass
class Measurement:
    """Latencies (ms) and FLOPs of a compiled model, dense vs compiled (``sparta.measure``)."""

    latency_ms: float
    dense_latency_ms: float
    nodes: list[NodeMeasurement]
    timer: str = ""
    device: str = ""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """``{"latency_ms", "dense_latency_ms", "nodes": [{"name", "target", "impl",
        "latency_ms", "dense_latency_ms", "flops", "dense_flops", "weight"}]}`` (JSON-ready)."""
        return {
            "latency_ms": self.latency_ms,
            "dense_latency_ms": self.dense_latency_ms,
            "nodes": [asdict(n) for n in self.nodes],
        }

    def rows(self) -> list[list[str]]:
        rows = []
        for n in self.nodes:
            rows.append(
                [
                    n.name,
                    n.weight or "-",
                    n.impl,
                    f"{n.dense_latency_ms:.4f}",
                    f"{n.latency_ms:.4f}",
                    f"{n.dense_latency_ms / max(n.latency_ms, 1e-9):.2f}x",
                    f"{n.flops / max(n.dense_flops, 1):.1%}" if n.dense_flops else "-",
                ]
            )
        return rows

    def __str__(self) -> str:
        head = ["node", "weight", "impl", "dense ms", "ms", "speed-up", "FLOPs kept"]
        title = (
            f"whole forward: dense {self.dense_latency_ms:.3f} ms -> compiled "
            f"{self.latency_ms:.3f} ms ({self.dense_latency_ms / max(self.latency_ms, 1e-9):.2f}x"
            f", {self.timer} on {self.device})"
        )
        try:
            import io

            from rich.console import Console
            from rich.table import Table
        except ImportError:
            widths = [max(len(r[i]) for r in [head, *self.rows()]) for i in range(len(head))]
            lines = [title] + [
                "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *self.rows()]
            ]
            return "\n".join(lines)
        table = Table(title=title)
        for h in head:
            table.add_column(h, justify="left" if h in ("node", "weight", "impl") else "right")
        for r in self.rows():
            table.add_row(*r)
        buf = io.StringIO()
        Console(file=buf, width=120, force_terminal=False).print(table)
        return buf.getvalue()

    def __rich__(self) -> str:
        return str(self)

    def plot(self, path: str) -> None:
        """A PNG of FLOPs kept (fraction of dense) against latency (fraction of dense), one
        point per planned node; the diagonal is where time follows FLOPs. Needs matplotlib."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pts = [n for n in self.nodes if n.dense_flops and n.dense_latency_ms > 0]
        fig, ax = plt.subplots(figsize=(6, 5))
        impls = sorted({n.impl for n in pts})
        for impl in impls:
            xs = [n.flops / n.dense_flops for n in pts if n.impl == impl]
            ys = [n.latency_ms / n.dense_latency_ms for n in pts if n.impl == impl]
            ax.scatter(xs, ys, label=impl)
        top = max([1.0] + [n.latency_ms / n.dense_latency_ms for n in pts])
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="latency = FLOPs")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, top * 1.05)
        ax.set_xlabel("FLOPs kept (fraction of dense)")
        ax.set_ylabel("latency (fraction of dense)")
        ax.set_title(
            f"per node: FLOPs vs latency ({self.device}); whole "
            f"{self.dense_latency_ms / max(self.latency_ms, 1e-9):.2f}x"
        )
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def node_calls(
    p: Propagated, plan: Plan, n: fx.Node, values: Mapping[fx.Node, Any]
) -> tuple[Callable[[], object], Callable[[], object]]:
    """(dense, chosen) callables of planned node ``n`` on the recorded ``values``, computing the
    same thing (the activation a kernel absorbs is in both), as the planner times them."""
    c = plan.choices[n]
    dev = plan.device
    if n.target in MATMULS:
        a, b = (values[x].detach().to(dev) for x in n.args[:2])
        chosen = c.module.op_call() if c.module is not None else None
        dense = functools.partial(torch.matmul, a, b)
        return dense, (functools.partial(chosen, a, b) if chosen else dense)
    x = values[n.args[0]].detach().to(dev)
    if c.splits:  # sibling linears stacked into one kernel
        parts = [masked_weight(p, m, dev) for m in (n, *c.fused)]
        call = c.module.op_call()
        return (lambda: [F.linear(x, pw, pb) for pw, _, pb in parts]), (lambda: call(x))
    w, _, b = masked_weight(p, n, dev)
    if c.impl == "triton-swiglu":
        up = c.fused[1]
        wu, _, bu = masked_weight(p, up, dev)
        call = c.module.op_call()
        return (lambda: F.silu(F.linear(x, w, b)) * F.linear(x, wu, bu)), (lambda: call(x))
    act_node, act = fusable_activation(n)
    fused = act_node is not None and act_node in c.fused
    act_fn = functools.partial(reference.activation, name=act if fused else None)

    def dense() -> torch.Tensor:
        return act_fn(F.linear(x, w, b))

    if c.impl == "shrink":
        sub = shrunk_call(p, n, plan.layout, x, w, b, act_fn)
        return dense, (sub if sub is not None else dense)
    if c.module is None:
        return dense, dense
    call = c.module.op_call() if hasattr(c.module, "op_call") else c.module
    xk = x.index_select(-1, c.in_keep.to(dev)) if c.reads_compact else x  # as the graph feeds it
    return dense, (lambda: call(xk))


def measure(
    model_or_compiled: torch.nn.Module,
    example_inputs: Any,
    *,
    attrs: Mapping[str, Any] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
) -> Measurement:
    """Latency of every planned node, dense vs chosen, beside its FLOPs dense vs kept, and of
    the whole forward, dense graph vs compiled graph, measured as the planner measures.

    ``model_or_compiled``: a ``CompiledModel`` (its plan is measured on ``example_inputs``), or
    a model, compiled first with ``attrs`` (``None``: no attributes). Latencies in ms; FLOPs
    count a multiply-add as 2. Raises SpartaError for anything else, and what
    ``sparta.compile`` raises.
    """
    from .compile import CompiledModel, compile, time_graphs

    if isinstance(model_or_compiled, CompiledModel):
        compiled = model_or_compiled
    elif isinstance(model_or_compiled, torch.nn.Module):
        compiled = compile(
            model_or_compiled, dict(attrs or {}), example_inputs, example_kwargs=example_kwargs
        )
    else:
        raise SpartaError(
            f"sparta.measure takes a torch.nn.Module or a sparta CompiledModel, got "
            f"{type(model_or_compiled).__name__}."
        )
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    p, plan = compiled.planned()
    runtime = compiled.runtime
    dev = runtime.device
    inputs = tuple(e.to(dev) if isinstance(e, torch.Tensor) else e for e in example_inputs)
    kwargs = {
        k: v.to(dev) if isinstance(v, torch.Tensor) else v
        for k, v in (example_kwargs or {}).items()
    }
    values = record_values(p.traced.gm, inputs, kwargs)
    flops = {e.name: e for e in compiled.report.nodes}
    nodes = []
    for n, c in plan.choices.items():
        if c.impl == "fused":
            continue
        dense_fn, chosen_fn = node_calls(p, plan, n, values)
        if c.impl == "dense":
            t = compare_ms({"dense": dense_fn}, dev, device_time=runtime.device_time)
            t["chosen"] = t["dense"]
        else:
            fns = {"dense": dense_fn, "chosen": chosen_fn}
            t = compare_ms(fns, dev, device_time=runtime.device_time)
        e = flops.get(n.name)
        nodes.append(
            NodeMeasurement(
                name=n.name,
                target=str(n.target),
                impl=c.impl,
                latency_ms=t["chosen"],
                dense_latency_ms=t["dense"],
                flops=e.flops_sparse if e is not None else 0,
                dense_flops=e.flops_dense if e is not None else 0,
                weight=(e.weight if e is not None else "")
                + (f" (+{len(c.splits) - 1} stacked)" if c.splits else ""),
            )
        )
    from .compile import emit

    dense_gm, _ = emit(p, dense_plan(plan))
    whole = time_graphs(
        {"dense": dense_gm, "compiled": compiled.graph_module}, runtime, inputs, kwargs
    )
    timer = timer_label(runtime.device_time)
    return Measurement(whole["compiled"], whole["dense"], nodes, timer, str(dev))
