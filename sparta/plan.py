"""The execution plan: per linear node, candidate implementations chosen by measured latency.

Families: ``dense`` (masks folded into the weight), ``shrink`` (pruned rows/columns/heads
sliced away: a smaller dense op), ``triton`` (generated block-sparse GPU kernels),
``nm_cpu`` (grouped n:m C++ kernels). A family is a candidate only where it applies; the
fastest measured candidate wins, so a sparse path slower than dense is never picked unless
the user leaves ``dense`` out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from .errors import BackendError, PlanError
from .propagate import Propagated
from .shrink import LINEAR, analyse, feature_keep
from .tesa import detect_pattern
from .timing import compare_ms

FAMILIES = ("dense", "shrink", "triton", "cusparselt", "nm_cpu")
ACTIVATIONS = {
    torch.ops.aten.relu.default: "relu",
    torch.ops.aten.gelu.default: "gelu",
}


@dataclass
class Choice:
    impl: str
    latency_ms: float
    dense_latency_ms: float
    module: torch.nn.Module | None = None  # for generated-kernel families
    fused: fx.Node | None = None  # activation node folded into the kernel
    candidates: dict[str, float] = field(default_factory=dict)


@dataclass
class Plan:
    choices: dict[fx.Node, Choice]
    layout: dict  # fx.Node -> Compact, for shrunk chains
    device: torch.device
    backends: tuple[str, ...]


def check_backends(backends: Iterable[str] | None, device: torch.device) -> tuple[str, ...]:
    if backends is None:
        gpu = device.type == "cuda"
        return ("dense", "shrink", "triton", "cusparselt") if gpu else ("dense", "shrink", "nm_cpu")
    backends = tuple(backends)
    for b in backends:
        if b not in FAMILIES:
            raise PlanError(f"unknown backend {b!r}: choose from {FAMILIES}.")
    if not backends:
        raise PlanError("backends is empty: name at least one of " + ", ".join(FAMILIES) + ".")
    return backends


def linear_nodes(p: Propagated) -> list[fx.Node]:
    params = set(p.traced.params.values())
    return [
        n
        for n in p.traced.gm.graph.nodes
        if n.op == "call_function"
        and n.target is LINEAR
        and n.args[1] in params
        and isinstance(p.traced.example.get(n), torch.Tensor)
    ]


def masked_weight(p: Propagated, n: fx.Node, device: torch.device) -> tuple:
    w_node = n.args[1]
    b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    w = p.traced.example[w_node].detach().to(device)
    wm = p.result.masks[w_node].to(device)
    b = p.traced.example[b_node].detach().to(device) if isinstance(b_node, fx.Node) else None
    if b is not None:
        b = b * p.result.masks[b_node].to(device)
    return w * wm, wm, b


def fusable_activation(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    if len(users) == 1 and users[0].target in ACTIVATIONS:
        u = users[0]
        if (
            u.target is torch.ops.aten.gelu.default
            and u.kwargs.get("approximate", "none") != "none"
        ):
            return None
        return u
    return None


def make_plan(p: Propagated, device: torch.device, backends: Iterable[str] | None) -> Plan:
    backends = check_backends(backends, device)
    linears = linear_nodes(p)
    layout = analyse(p.traced, p.result.masks, set(linears)) if "shrink" in backends else {}
    choices: dict[fx.Node, Choice] = {}
    for n in linears:
        choices[n] = _choose(p, n, layout, device, backends)
    shrunk = {n for n, c in choices.items() if c.impl == "shrink"}
    layout = analyse(p.traced, p.result.masks, shrunk) if shrunk else {}
    return Plan(choices, layout, device, backends)


def _choose(
    p: Propagated, n: fx.Node, layout: dict, device: torch.device, backends: tuple[str, ...]
) -> Choice:
    x = p.traced.example[n.args[0]].detach().to(device)
    w, wm, b = masked_weight(p, n, device)
    act_node = fusable_activation(n)
    act = ACTIVATIONS.get(act_node.target) if act_node is not None else None
    act_fn = {"relu": F.relu, "gelu": F.gelu, None: lambda t: t}[act]
    candidates: dict[str, Callable[[], object]] = {"dense": lambda: act_fn(F.linear(x, w, b))}
    if "shrink" in backends:
        sub = _shrunk_call(p, n, layout, x, w, b, act_fn)
        if sub is not None:
            candidates["shrink"] = sub
    pattern = None if bool(wm.all()) else detect_pattern(wm.cpu())
    modules: dict[str, torch.nn.Module] = {}
    for family in ("triton", "nm_cpu"):
        builder = _builder(family, pattern, device) if family in backends and pattern else None
        if builder is None:
            continue
        try:
            modules[family] = builder(w, wm, b, act, node=n.name)
        except BackendError as e:
            warnings.warn(f"sparta: {family} cannot implement {n.name}: {e}", stacklevel=2)
            continue
        candidates[family] = lambda m=modules[family]: m(x)
    timings = compare_ms(candidates, device)
    dense_ms = timings["dense"]
    allowed = {k: v for k, v in timings.items() if k != "dense" or "dense" in backends}
    if not allowed:
        allowed = {"dense": dense_ms}  # no sparse family applies to this node
    impl = min(allowed, key=allowed.get)
    return Choice(
        impl,
        timings[impl],
        dense_ms,
        modules.get(impl),
        act_node if impl in modules else None,
        timings,
    )


def _shrunk_call(p, n, layout, x, w, b, act_fn):
    """The smaller dense linear of a shrunk node, timed on compact inputs; None if nothing to
    shrink."""
    out_keep = feature_keep(p.result.masks[n], p.result.masks[n].dim() - 1).to(x.device)
    src = layout.get(n.args[0])
    in_keep = src.keep.to(x.device) if src is not None and src.dim == x.dim() - 1 else None
    if len(out_keep) == w.shape[0] and in_keep is None:
        return None
    ws = w[out_keep]
    xs = x
    if in_keep is not None:
        ws, xs = ws[:, in_keep], x.index_select(-1, in_keep)
    bs = b[out_keep] if b is not None else None
    return lambda: act_fn(F.linear(xs, ws, bs))


def _builder(family: str, pattern, device: torch.device):
    if family == "nm_cpu":
        if device.type != "cpu" or pattern.kind != "nm":
            return None
        from .codegen import nm_cpu

        if not nm_cpu.available():
            _warn_once("no C++ compiler found: the nm_cpu backend is off, dense is used instead")
            return None
        return lambda w, wm, b, act, node: nm_cpu.build_nm_linear(
            w, wm, b, act, n=pattern.n, m=pattern.m, node=node
        )
    if family == "triton":
        from .codegen import triton_gen

        if not triton_gen.available(device):
            return None
        return lambda w, wm, b, act, node: triton_gen.build_block_sparse_linear(
            w, wm, b, act, node=node
        )
    return None


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"sparta: {msg}", stacklevel=3)
