"""``sparta.compile``: propagate, plan, emit a new graph module, run it in a runtime.

The user's model is untouched. Stages: ``run_propagation`` -> ``make_plan`` (candidates timed
as the runtime will run them) -> ``Emitter`` (``sparta/emit.py``) -> whole-graph check against
dense with back-off -> ``runtime.build`` (eager fx, Inductor, Inductor + CUDA graphs).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import plan_cache
from .choice import Plan, timer_label
from .emit import Emitter, pruned_module
from .errors import InputError, TrainModeError
from .plan import back_off, dense_plan, make_plan
from .progress import Progress
from .propagate import Attrs, Propagated, run_propagation
from .reference import copy_module
from .report import Report
from .runtime import Runtime, build, resolve
from .saved import signature
from .timing import compare_ms
from .trace import specialised_sizes

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

    def __init__(
        self,
        gm: fx.GraphModule,
        report: Report,
        plan: Plan | None,
        runtime: Runtime,
        propagated: Propagated | None = None,
        source: Any = None,
        input_signature: InputSignature | None = None,
    ) -> None:
        super().__init__()
        self.graph_module = gm
        self.report = report
        self.__dict__["_plan"] = plan
        self.runtime = runtime
        self.input_signature = input_signature or InputSignature({})
        self.__dict__["_run"] = build(gm, runtime)  # not a submodule: no duplicate state
        # The propagation the plan was made on (for measure and save); a loaded plan keeps its
        # saved document instead and rebuilds the propagation only when asked (``planned``).
        self.__dict__["_propagated"] = propagated
        self.__dict__["_source"] = source
        super().train(False)

    def planned(self) -> tuple[Propagated, Plan]:
        """The propagation and the plan this module was built from (a loaded plan traces its
        model again for them, without propagating or tuning)."""
        if self.__dict__["_propagated"] is None:
            from .saved import replan

            self.__dict__["_propagated"], self.__dict__["_plan"] = replan(self.__dict__["_source"])
        return self.__dict__["_propagated"], self.__dict__["_plan"]

    @property
    def plan(self) -> Plan:
        """The plan: a choice (implementation, timings, reason) per planned graph node."""
        return self.planned()[1]

    def save(self, path: str) -> None:
        """Write the plan to ``path`` (one safetensors file: tensors, and the plan as JSON in
        its metadata; no pickle). ``sparta.load(path, model)`` rebuilds this module."""
        from .saved import save

        save(self, path)

    def train(self, mode: bool = True) -> CompiledModel:
        """Only ``train(False)`` (``eval()``): a compiled model computes inference.

        Raises:
            TrainModeError: for ``train(True)``.
        """
        if mode:
            raise TrainModeError(
                "a compiled model computes inference (eval-mode) semantics only and cannot be "
                "put in training mode; train the original model (e.g. sparta.masked_model(model, "
                "attrs)) and compile it again."
            )
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            if torch.compiler.is_compiling():
                return self.graph_module(*args, **kwargs)
            self.input_signature.check(args, kwargs)
            return self.__dict__["_run"](*args, **kwargs)

    def export_pruned(self) -> torch.nn.Module:
        """The shrunk dense model, trainable (``sparta.emit.pruned_module``)."""
        return pruned_module(self.graph_module, self.plan)


# Modules whose result depends on ``training`` (the rest of torch.nn computes the same in both).
TRAIN_DEPENDENT = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.RNNBase,
    torch.nn.MultiheadAttention,
)


def check_eval_mode(model: torch.nn.Module) -> None:
    """Raise ``TrainModeError`` when ``model`` is in training mode and that changes its result.

    Compiled models compute eval-mode semantics. A module in training mode whose result does
    not depend on it (linears, convolutions, layer norms...) compiles as it is.
    """
    for name, m in model.named_modules():
        if not m.training or not isinstance(m, TRAIN_DEPENDENT):
            continue
        instance_norm = torch.nn.InstanceNorm1d | torch.nn.InstanceNorm2d | torch.nn.InstanceNorm3d
        if isinstance(m, instance_norm) and not m.track_running_stats:
            continue  # no running statistics: the same in both modes
        if isinstance(m, torch.nn.RNNBase | torch.nn.MultiheadAttention) and not m.dropout:
            continue
        if getattr(m, "p", None) == 0:  # dropout with p=0 keeps everything
            continue
        raise TrainModeError(
            f"the model is in training mode and {name or 'the model'} "
            f"({type(m).__name__}) computes differently there; sparta.compile builds inference "
            f"graphs (eval-mode semantics). Call model.eval() before compiling."
        )


@dataclass(frozen=True)
class InputSignature:
    """The device and dtype of each tensor argument of the example (integer ids may be any
    integer dtype), and the dims torch.export fixed to the example's size 1
    (``trace.specialised_sizes``): generated kernels are specialised to the first, and the
    graph may have baked the second into its views (a batch of 2 folded into another dim), so a
    call with another is an ``InputError`` naming the argument instead of a failure inside a
    kernel or a wrong answer. Other shapes are not checked: the graph takes any batch, sequence
    or rank the model takes (a feature size a generated kernel does not take is an
    ``InputError`` from that kernel)."""

    expected: Mapping[int | str, tuple[torch.dtype, torch.device]]  # position or name
    sizes: Mapping[int | str, tuple[int | None, ...]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        example_inputs: tuple,
        example_kwargs: Mapping[str, Any],
        sizes: Mapping[int | str, tuple[int | None, ...]] | None = None,
    ) -> InputSignature:
        items = [*enumerate(example_inputs), *example_kwargs.items()]
        expected = {k: (v.dtype, v.device) for k, v in items if isinstance(v, torch.Tensor)}
        return cls(expected, dict(sizes or {}))

    def check(self, args: tuple, kwargs: Mapping[str, Any]) -> None:
        for key, (dtype, device) in self.expected.items():  # per call: only the example's
            if isinstance(key, int):
                value = args[key] if key < len(args) else None
            else:
                value = kwargs.get(key)
            if not isinstance(value, torch.Tensor):
                continue
            if dtype.is_floating_point or dtype == torch.bool:
                mismatch = value.dtype != dtype
            else:  # integer ids: any integer dtype
                mismatch = value.dtype.is_floating_point or value.dtype == torch.bool
            if value.device != device or mismatch:
                raise InputError(
                    f"{_argument(key)} is {value.dtype} on {value.device}, but the model was "
                    f"compiled for {dtype} on {device} (its kernels are specialised to the "
                    f"example). Pass .to({dtype}, {str(device)!r}) or compile again with an "
                    f"example of this dtype and device."
                )
            self._check_sizes(key, value)

    def _check_sizes(self, key: int | str, value: torch.Tensor) -> None:
        fixed = self.sizes.get(key)
        if fixed is None or value.dim() != len(fixed):
            return
        bad = [d for d, f in enumerate(fixed) if f is not None and value.shape[d] != f]
        if not bad:
            return
        d = bad[0]
        raise InputError(
            f"{_argument(key)} has shape {tuple(value.shape)}, but the example had size "
            f"{fixed[d]} in dim {d}, which torch.export fixed (the compiled graph may hold that "
            f"size in its views): compile again with an example of size 2 or more there (e.g. a "
            f"batch of 2)."
        )


def _argument(key: int | str) -> str:
    """How errors name a forward() argument: by position, or by name for a keyword."""
    return f"argument {key}" if isinstance(key, int) else f"argument {key!r}"


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
    progress: bool | None = None,
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
        TrainModeError: the model is in training mode and that changes its result (dropout,
            batch norm...): call ``model.eval()`` first.

    A call of the compiled model with a tensor argument on another device, or floating point
    of another dtype, than the example raises ``InputError``.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kw = dict(example_kwargs or {})
    check_eval_mode(model)
    dev = torch.device(device) if device is not None else _device_of(model, example_inputs)
    runtime = resolve(mode, dev)
    key = sig = None
    if plan_cache.enabled() and isinstance(attrs, Mapping):
        sig = signature(model)
        options = {"device": str(dev), "backends": None if backends is None else tuple(backends),
                   "mode": mode, "strict": strict, "measure": measure}  # fmt: skip
        key = plan_cache.plan_key(model, attrs, example_inputs, kw, options, sig)
        hit = plan_cache.lookup(key, model, sig)
        if hit is not None:
            return hit
    if dev != _device_of(model, example_inputs):
        model = copy_module(model).to(dev)  # the user's model stays where it is
        example_inputs = tuple(
            e.to(dev) if isinstance(e, torch.Tensor) else e for e in example_inputs
        )
    bar = Progress(progress)
    try:
        p = run_propagation(
            model, attrs, example_inputs, example_kwargs=example_kwargs, strict=strict,
            on_traced=lambda: bar.advance("propagating"),
        )  # fmt: skip
        plan = make_plan(p, dev, backends, device_time=runtime.device_time, on_node=bar.node)
        bar.advance("checking the whole graph")
        gm, notes = emit(p, plan)
        whole = None
        if measure:
            plan, gm, notes, whole = _check_whole(p, plan, gm, notes, runtime, example_inputs, kw)
        bar.advance("done")
    finally:
        bar.close()
    report = _fill_report(p.report, plan, runtime, notes, whole)
    sizes = specialised_sizes(p.traced, model, example_inputs, kw)
    inputs = InputSignature.of(example_inputs, kw, sizes)
    out = CompiledModel(gm, report, plan, runtime, p, input_signature=inputs)
    out.__dict__["_example"] = (example_inputs, kw)
    out.__dict__["_model"] = model
    out.__dict__["_signature"] = sig
    if key is not None:
        plan_cache.store(key, out)
    return out


def time_graphs(
    graphs: dict[str, Callable[..., Any]], runtime: Runtime, inputs: tuple, kwargs: dict
) -> dict[str, float]:
    fns = {k: (lambda g=g: g(*inputs, **kwargs)) for k, g in graphs.items()}
    return compare_ms(fns, runtime.device, device_time=runtime.device_time, budget_ms=400)


def _check_whole(p, plan, gm, notes, runtime, inputs, kwargs):
    """Time the compiled graph against the dense graph in the same way; while it loses, turn
    back to dense the sparse nodes that saved least alone (half of them per step)."""
    timer = timer_label(runtime.device_time)
    if runtime.device_time:
        timer += ", CUDA-graph replay"
    if runtime.kind != "eager":
        timer += ", without Inductor"  # both sides lose the same fusions (docs/design.md)
    if not plan.sparse():  # the compiled graph is the dense graph
        t = time_graphs({"dense": gm}, runtime, inputs, kwargs)
        return plan, gm, notes, WholeGraph(t["dense"], t["dense"], f"{timer} of the fx graph")
    dense_gm, _ = emit(p, dense_plan(plan))
    t = time_graphs({"dense": dense_gm, "compiled": gm}, runtime, inputs, kwargs)
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
            f"{whole.dense_ms:.3f} ms ({whole.timer})"
        )
        plan = back_off(p, plan, worst, reason)
        whole.backed_off += [n.name for n in worst]
        gm, notes = emit(p, plan)
        whole.compiled_ms = time_graphs({"c": gm}, runtime, inputs, kwargs)["c"]
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
