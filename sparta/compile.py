"""``sparta.compile``: propagate, plan, emit a new graph module; the user's model is untouched."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from .cuda_graphs import capture
from .errors import AttrError
from .plan import MATMULS, Plan, make_plan
from .propagate import Attrs, Propagated, run_propagation
from .report import Report
from .shrink import LINEAR, VIEWS, expand, linear_keep
from .timing import compare_ms


def apply_input_mask(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Multiply a forward() argument by its attribute mask (reduced to the dims it varies on)."""
    try:
        return x * mask
    except RuntimeError:
        raise AttrError(
            f"input {name!r} has shape {tuple(x.shape)}, which its attribute mask of shape "
            f"{tuple(mask.shape)} does not broadcast to; compile again with an example of this "
            f"shape, or give a mask that is constant along the batch dims."
        ) from None


def _reduced(mask: torch.Tensor) -> torch.Tensor:
    """Collapse dims along which the mask is constant, so other batch sizes still work."""
    for d in range(mask.dim()):
        first = mask.narrow(d, 0, 1)
        if torch.equal(first.expand_as(mask), mask):
            mask = first
    return mask


class _Emitter:
    def __init__(self, p: Propagated, plan: Plan, root: torch.nn.Module) -> None:
        self.p, self.plan, self.root = p, plan, root
        self.layout = plan.layout
        self.g = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.expanded: dict[fx.Node, fx.Node] = {}
        self.attr_count = 0
        self.skip: dict[fx.Node, fx.Node] = {}  # fused activation -> kernel node

    def attr(self, value: torch.Tensor, hint: str) -> fx.Node:
        name = f"{hint.replace('.', '_')}_{self.attr_count}"
        self.attr_count += 1
        self.root.register_buffer(name, value.detach().to(self.plan.device))
        return self.g.get_attr(name)

    def full(self, a: fx.Node) -> fx.Node:
        """The value of ``a`` at full size (expanding a compact value with zeros)."""
        c = self.layout.get(a)
        if c is None or len(c.keep) == c.full:
            return self.env[a]
        if a not in self.expanded:
            keep = self.attr(c.keep, "keep")
            self.expanded[a] = self.g.call_function(expand, (self.env[a], c.dim, keep, c.full))
        return self.expanded[a]

    def arg(self, consumer: fx.Node, a: Any, compact_ok: bool) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a] if compact_ok and a in self.layout else self.full(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(consumer, x, compact_ok) for x in a)
        return a

    def emit(self) -> fx.GraphModule:
        traced = self.p.traced
        for n in traced.gm.graph.nodes:
            if n in self.skip:
                self.env[n] = self.env[self.skip[n]]
            elif n.op == "placeholder":
                self.env[n] = self._placeholder(n)
            elif n.op == "get_attr":
                self.env[n] = self._get_attr(n)
            elif n.op == "output":
                self.g.output(self.arg(n, n.args[0], False))
            elif n.op == "call_module":
                continue  # export's shape guards: the compiled graph re-checks nothing it needs
            elif n in self.plan.choices and self.plan.choices[n].impl not in ("dense", "shrink"):
                self.env[n] = self._kernel(n)
            elif (
                n.target is LINEAR
                and n in self.plan.choices
                and self.plan.choices[n].impl == "shrink"
            ):
                self.env[n] = self._shrunk_linear(n)
            else:
                self.env[n] = self._copy(n)
        # Same calling convention and output structure as the exported module.
        with warnings.catch_warnings():  # torch's own pytree deprecation, not the user's
            warnings.simplefilter("ignore", FutureWarning)
            self.g._codegen = copy.deepcopy(traced.gm.graph._codegen)
        gm = fx.GraphModule(self.root, self.g)
        gm.graph.eliminate_dead_code()  # drops the full-size weights that shrinking replaced
        return fx.GraphModule(self.root, gm.graph)  # keeps only the attributes still used

    def _placeholder(self, n: fx.Node) -> fx.Node:
        ph = self.g.placeholder(n.name)
        ph.meta = dict(n.meta)
        given = self.p.given_nodes.get(n)
        if given is None:
            return ph
        mask = self.attr(_reduced(given), f"mask_{n.name}")
        return self.g.call_function(apply_input_mask, (ph, mask, n.name))

    def _get_attr(self, n: fx.Node) -> fx.Node:
        value = self.p.traced.example[n]
        mask = self.p.result.masks.get(n)
        if isinstance(mask, torch.Tensor) and value.is_floating_point() and not bool(mask.all()):
            value = value * mask.to(value.device)
        return self.attr(value, str(n.target))

    def _kernel(self, n: fx.Node) -> fx.Node:
        choice = self.plan.choices[n]
        name = f"kernel_{n.name}"
        self.root.add_module(name, choice.module)
        if choice.fused is not None:
            self.skip[choice.fused] = n
        operands = n.args[:2] if n.target in MATMULS else n.args[:1]
        return self.g.call_module(name, tuple(self.full(a) for a in operands))

    def _shrunk_linear(self, n: fx.Node) -> fx.Node:
        """A smaller linear: kept output features only, compact input features if compact."""
        ex, masks = self.p.traced.example, self.p.result.masks
        w = ex[n.args[1]] * masks[n.args[1]].to(ex[n.args[1]].device)
        out_dim = masks[n].dim() - 1
        keep_out = linear_keep(masks[n]).to(w.device)
        src = self.layout.get(n.args[0])
        x_compact = src is not None and src.dim == ex[n.args[0]].dim() - 1
        w = w[keep_out][:, src.keep.to(w.device)] if x_compact else w[keep_out]
        args = [self.env[n.args[0]] if x_compact else self.full(n.args[0]), self.attr(w, "w")]
        b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if isinstance(b_node, fx.Node):
            b = ex[b_node] * masks[b_node].to(w.device)
            args.append(self.attr(b[keep_out], "b"))
        node = self.g.call_function(LINEAR, tuple(args))
        if n not in self.layout:  # consumers need it full-size: expand right here
            keep = self.attr(keep_out, "keep")
            node = self.g.call_function(expand, (node, out_dim, keep, masks[n].shape[-1]))
        return node

    def _copy(self, n: fx.Node) -> fx.Node:
        compact_ok = n in self.layout
        args = self.arg(n, n.args, compact_ok)
        kwargs = {k: self.arg(n, v, compact_ok) for k, v in n.kwargs.items()}
        if n.target in VIEWS and compact_ok:
            c = self.layout[n]
            shape = list(args[1])
            if not (isinstance(shape[c.dim], int) and shape[c.dim] == -1):
                shape[c.dim] = len(c.keep)
            args = (args[0], shape, *args[2:])
        new = self.g.call_function(n.target, tuple(args), kwargs)
        new.meta = {k: v for k, v in n.meta.items() if k in ("stack_trace", "nn_module_stack")}
        return new


class CompiledModel(torch.nn.Module):
    """The compiled module: same function as the masked model, and its report."""

    def __init__(self, gm: fx.GraphModule, report: Report, plan: Plan) -> None:
        super().__init__()
        self.graph_module = gm
        self.report = report
        self.plan = plan

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.graph_module(*args, **kwargs)

    def capture_cuda_graph(self, *example: Any):
        """For fixed shapes on CUDA: a callable replaying a captured CUDA graph of forward."""
        return capture(self, *example)


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
) -> CompiledModel:
    """Propagate sparsity, plan each node by measured latency, and build the compiled module.

    The compiled module computes the model with every parameter and input multiplied by its
    attribute mask. ``measure`` times the whole dense and compiled forward for the report.
    """
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    dev = torch.device(device) if device is not None else _device_of(model, example_inputs)
    if dev != _device_of(model, example_inputs):
        model = copy.deepcopy(model).to(dev)  # the user's model stays where it is
        example_inputs = tuple(
            e.to(dev) if isinstance(e, torch.Tensor) else e for e in example_inputs
        )
    p = run_propagation(model, attrs, example_inputs, example_kwargs=example_kwargs, strict=strict)
    plan = make_plan(p, dev, backends)
    gm = _Emitter(p, plan, torch.nn.Module()).emit()
    report = p.report
    for entry in report.nodes:
        for n, choice in plan.choices.items():
            if n.name == entry.name:
                entry.impl = choice.impl
                entry.latency_ms = choice.latency_ms
                entry.dense_latency_ms = choice.dense_latency_ms
    compiled = CompiledModel(gm, report, plan)
    if measure:
        kw = dict(example_kwargs or {})
        t = compare_ms(
            {
                "dense": lambda: model(*example_inputs, **kw),
                "compiled": lambda: compiled(*example_inputs, **kw),
            },
            dev,
            budget_ms=400,
        )
        report.latency_dense_ms, report.latency_compiled_ms = t["dense"], t["compiled"]
        if t["compiled"] > 1.05 * t["dense"]:
            # Every node was picked by its own measured latency, yet the whole graph can lose:
            # eager, more and smaller ops cost more launches than they save (GPU, small shapes).
            hint = (
                " Replay it as a CUDA graph: compiled.capture_cuda_graph(*inputs)."
                if dev.type == "cuda"
                else ""
            )
            warnings.warn(
                f"sparta: the compiled model measured slower than the dense one on {dev} "
                f"({t['compiled']:.3f} ms vs {t['dense']:.3f} ms per call at the example "
                f"inputs).{hint}",
                stacklevel=2,
            )
    return compiled
