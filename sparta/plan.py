"""The execution plan: per linear node, candidate implementations chosen by measured latency.

Families: ``dense`` (masks folded into the weight), ``shrink`` (pruned rows/columns/heads
sliced away: a smaller dense op), ``triton`` (generated block-sparse GPU kernels),
``nm_cpu`` (grouped n:m C++ kernels), ``sparse_cpu`` (unstructured C++ kernels). A family is
a candidate only where it applies; the fastest measured candidate wins, so a sparse path slower
than dense is never picked unless the user leaves ``dense`` out.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from .errors import BackendError, PlanError
from .kernels import reference
from .propagate import Propagated
from .shrink import LINEAR, analyse, linear_keep
from .tesa import detect_pattern
from .timing import compare_ms

FAMILIES = ("dense", "shrink", "triton", "cusparselt", "nm_cpu", "sparse_cpu")
SHRINK_TIE = 1.05  # shrink is kept when within 5% of the fastest candidate
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
        if gpu:
            return ("dense", "shrink", "triton", "cusparselt")
        return ("dense", "shrink", "nm_cpu", "sparse_cpu")
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


MATMULS = {torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


def matmul_nodes(p: Propagated) -> list[fx.Node]:
    """Activation x activation products (attention scores, probabilities @ values)."""
    return [
        n
        for n in p.traced.gm.graph.nodes
        if n.op == "call_function"
        and n.target in MATMULS
        and all(
            isinstance(p.traced.example.get(a), torch.Tensor) and p.traced.example[a].dim() >= 3
            for a in n.args[:2]
        )
    ]


def _pattern2d(mask: torch.Tensor) -> torch.Tensor:
    """Union over batch dims of a (..., R, C) mask."""
    return mask.reshape(-1, *mask.shape[-2:]).any(dim=0)


def _block_for(pattern: torch.Tensor) -> int:
    p = detect_pattern(pattern)
    return p.block[0] if p.kind == "block" and p.block[0] >= 16 else 16


def _choose_matmul(
    p: Propagated, n: fx.Node, device: torch.device, backends: tuple[str, ...]
) -> Choice | None:
    """Output-sparse (SDDMM) or sparse-input Triton kernels for a matmul whose output, or
    whose left operand, carries a sparse pattern; None when neither is sparse."""
    from .codegen import triton_gen

    if not triton_gen.available(device):
        return None
    a = p.traced.example[n.args[0]].detach().to(device)
    b = p.traced.example[n.args[1]].detach().to(device)
    out_pat = _pattern2d(p.result.masks[n])
    in_pat = _pattern2d(p.result.masks[n.args[0]])
    try:
        if not bool(out_pat.all()):
            mod = triton_gen.build_sddmm(
                out_pat, _block_for(out_pat), dtype=a.dtype, device=device, node=n.name
            )
            family = "triton-sddmm"
        elif not bool(in_pat.all()):
            mod = triton_gen.build_sparse_input_matmul(
                in_pat, _block_for(in_pat), dtype=a.dtype, device=device, node=n.name
            )
            family = "triton-sparse-input"
        else:
            return None
    except BackendError as e:
        warnings.warn(f"sparta: triton cannot implement {n.name}: {e}", stacklevel=2)
        return None
    t = compare_ms({"dense": lambda: torch.matmul(a, b), family: lambda: mod(a, b)}, device)
    allowed = {k: v for k, v in t.items() if k != "dense" or "dense" in backends}
    impl = min(allowed, key=allowed.get)
    return Choice(impl, t[impl], t["dense"], mod if impl != "dense" else None, None, t)


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
    if "triton" in backends:
        for n in matmul_nodes(p):
            choice = _choose_matmul(p, n, device, backends)
            if choice is not None:
                choices[n] = choice
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
    act_fn = functools.partial(reference.activation, name=act)
    candidates: dict[str, Callable[[], object]] = {"dense": lambda: act_fn(F.linear(x, w, b))}
    if "shrink" in backends:
        sub = _shrunk_call(p, n, layout, x, w, b, act_fn)
        if sub is not None:
            candidates["shrink"] = sub
    pattern = None if bool(wm.all()) else detect_pattern(wm.cpu())
    modules: dict[str, torch.nn.Module] = {}
    for family in ("triton", "cusparselt", "nm_cpu", "sparse_cpu"):
        builder = _builder(family, pattern, device) if family in backends and pattern else None
        if builder is None:
            continue
        try:
            modules[family] = builder(w, wm, b, act, node=n.name, tokens=x.numel() // x.shape[-1])
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
    if "shrink" in allowed and allowed["shrink"] <= SHRINK_TIE * allowed[impl]:
        # A tie (host-bound timings on a GPU, noise) goes to the compact layout: mixing compact
        # and full layouts along a chain costs gathers/scatters that no single node's timing sees.
        impl = "shrink"
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
    out_keep = linear_keep(p.result.masks[n]).to(x.device)
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
        return lambda w, wm, b, act, node, tokens: nm_cpu.build_nm_linear(
            w, wm, b, act, n=pattern.n, m=pattern.m, node=node, tokens=tokens
        )
    if family == "sparse_cpu":
        if device.type != "cpu" or pattern.kind in ("dense", "empty"):
            return None
        from .codegen import sparse_cpu

        if not sparse_cpu.available():
            _warn_once("no C++ compiler found: the sparse_cpu backend is off, dense is used")
            return None
        return lambda w, wm, b, act, node, tokens: sparse_cpu.build_sparse_linear(
            w, wm, b, act, node=node, tokens=tokens
        )
    if family == "cusparselt":
        if device.type != "cuda" or pattern.kind != "nm" or (pattern.n, pattern.m) != (2, 4):
            return None
        return _semi_structured_linear
    if family == "triton":
        from .codegen import triton_gen

        if not triton_gen.available(device):
            return None
        return lambda w, wm, b, act, node, tokens: triton_gen.build_block_sparse_linear(
            w, wm, b, act, node=node, tokens=tokens
        )
    return None


class _SemiStructuredLinear(torch.nn.Module):
    """2:4 weights through PyTorch's semi-structured sparse tensors (cuSPARSELt/CUTLASS)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, act: str | None) -> None:
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.weight = to_sparse_semi_structured(w.contiguous())
        self.bias = b
        self.act = functools.partial(reference.activation, name=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return self.act(y.reshape(*lead, -1))


def _semi_structured_linear(w, wm, b, act, node, tokens):
    try:
        return _SemiStructuredLinear(w, b, act)
    except (RuntimeError, ValueError) as e:  # dtype/shape limits of the 2:4 kernels
        raise BackendError(f"2:4 semi-structured weights not usable here: {e}") from e


_WARNED: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(f"sparta: {msg}", stacklevel=3)
