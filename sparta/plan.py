"""The execution plan: per linear node, candidate implementations chosen by measured latency.

Families: ``dense`` (masks folded into the weight), ``shrink`` (pruned rows/columns/heads
sliced away: a smaller dense op), ``triton`` (generated block-sparse GPU kernels),
``nm_cpu`` (grouped n:m C++ kernels), ``sparse_cpu`` (unstructured C++ kernels). A family is
a candidate only where it applies; the fastest measured candidate wins, so a sparse path slower
than dense is never picked unless the user leaves ``dense`` out.

Candidates are timed the way the runtime will run them (``device_time``: CUDA-graph replays
for Inductor / CUDA-graph runtimes, per call on the host for eager), and every choice records
why it was made (``Choice.reason``). ``back_off`` turns chosen nodes back to dense when the
whole graph measures slower than dense (``sparta/compile.py``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import decompose
from .errors import BackendError, BuildTimeout, PlanError
from .kernels import epilogue, reference
from .propagate import Propagated
from .shrink import CONVS, LINEAR, analyse, conv_args, conv_rows, conv_shrink, linear_out_keep
from .tesa import block_any, detect_pattern, surviving_pattern
from .timing import compare_ms

FAMILIES = ("dense", "shrink", "triton", "cusparselt", "nm_cpu", "sparse_cpu")
SHRINK_TIE = 1.05  # shrink is kept when within 5% of the fastest candidate
# The epilogue activations each generated-kernel family fuses (``kernels/epilogue.py``); the
# 2:4 module applies any of them to the cuSPARSELt product.
FUSES = {
    "triton": epilogue.TRITON_ACTIVATIONS,
    "nm_cpu": epilogue.CPU_ACTIVATIONS,
    "sparse_cpu": epilogue.CPU_ACTIVATIONS,
    "cusparselt": epilogue.ALL_ACTIVATIONS,
}


@dataclass
class Choice:
    impl: str
    latency_ms: float
    dense_latency_ms: float
    module: torch.nn.Module | None = None  # for generated-kernel families
    fused: tuple[fx.Node, ...] = ()  # nodes folded into the kernel (its activation)
    candidates: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    # "shrink+<family>": the kernel runs on the shrunk weight; whether it reads the compact
    # input (else the full one).
    reads_compact: bool = False
    in_keep: torch.Tensor | None = None  # the compact input it was built for

    @property
    def shrunk(self) -> bool:
        """Computes only the kept units (``shrink``, or a kernel on the shrunk weight)."""
        return self.impl == "shrink" or self.impl.startswith("shrink+")

    @property
    def saving_ms(self) -> float:
        return self.dense_latency_ms - self.latency_ms


@dataclass
class Plan:
    choices: dict[fx.Node, Choice]
    layout: dict  # fx.Node -> Compact, for shrunk chains
    device: torch.device
    backends: tuple[str, ...]
    timer: str = "host"  # "device" (CUDA-graph replays) or "host" (per call)

    def sparse(self) -> list[fx.Node]:
        """Nodes that run anything but the dense op (not counting nodes fused into another)."""
        return [n for n, c in self.choices.items() if c.impl not in ("dense", "fused")]


def check_backends(
    backends: Iterable[str] | None, device: torch.device, graph_runtime: bool = False
) -> tuple[str, ...]:
    """The families to try: ``backends`` checked, or all that apply to ``device``.

    In a graph runtime (Inductor) the 2:4 family is left out by default: its weights are a
    tensor subclass that Dynamo cannot trace into the graph, so every such node breaks it
    (HF ViT-B 2:4 on an H200: 15.8 ms under Inductor against 3.5 ms for dense; 4.1 vs 3.4 ms
    with CUDA graphs, ``bench/results/gpu_e2e_h200_2026-12-01.md``). Naming it forces it.
    """
    if backends is None:
        gpu = device.type == "cuda"
        if gpu:
            return ("dense", "shrink", "triton") + (() if graph_runtime else ("cusparselt",))
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


def conv_nodes(p: Propagated) -> list[fx.Node]:
    """Batched convolutions with a parameter weight: the ones shrinking may make smaller."""
    params = set(p.traced.params.values())
    ex = p.traced.example
    return [
        n
        for n in p.traced.gm.graph.nodes
        if n.op == "call_function"
        and n.target in CONVS
        and n.args[1] in params
        and isinstance(ex.get(n), torch.Tensor)
        and ex[n].dim() == ex[n.args[1]].dim()
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
    p: Propagated, n: fx.Node, device: torch.device, backends: tuple[str, ...], device_time: bool
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
    call = mod.op_call()
    t = compare_ms(
        {"dense": lambda: torch.matmul(a, b), family: lambda: call(a, b)},
        device,
        device_time=device_time,
    )
    allowed = {k: v for k, v in t.items() if k != "dense" or "dense" in backends}
    impl = min(allowed, key=allowed.get)
    reason = _why(impl, t, allowed, device_time)
    return Choice(impl, t[impl], t["dense"], mod if impl != "dense" else None, (), t, reason)


def masked_weight(p: Propagated, n: fx.Node, device: torch.device) -> tuple:
    w_node = n.args[1]
    b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    w = p.traced.example[w_node].detach().to(device)
    wm = p.result.masks[w_node].to(device)
    b = p.traced.example[b_node].detach().to(device) if isinstance(b_node, fx.Node) else None
    if b is not None:
        b = b * p.result.masks[b_node].to(device)
    return w * wm, wm, b


def kernel_operands(p: Propagated, n: fx.Node, c: Choice, device: torch.device) -> tuple:
    """The masked weight, mask, bias and pattern the kernel of choice ``c`` for linear ``n``
    was built from: the full weight, or for ``shrink+<family>`` its kept output rows (and the
    compact input's columns when it reads the compact input)."""
    w, wm, b = masked_weight(p, n, device)
    pattern = p.pattern_of(n.args[1])
    if not c.impl.startswith("shrink+"):
        return w, wm, b, pattern
    rows = linear_out_keep(p.result.masks, n).to(device)
    w, wm, b = w[rows], wm[rows], (b[rows] if b is not None else None)
    if c.reads_compact:
        cols = c.in_keep.to(device)
        w, wm = w[:, cols], wm[:, cols]
    return w, wm, b, surviving_pattern(pattern, wm)


def fusable_activation(n: fx.Node) -> tuple[fx.Node | None, str | None]:
    """The activation node a kernel can absorb (the linear's only user) and its epilogue."""
    users = list(n.users)
    name = epilogue.of_node(users[0]) if len(users) == 1 else None
    return (users[0], name) if name is not None else (None, None)


def make_plan(
    p: Propagated,
    device: torch.device,
    backends: Iterable[str] | None,
    *,
    device_time: bool = False,
    on_node: Callable[[str, int, int], None] | None = None,
) -> Plan:
    """Choose an implementation per linear (and attention matmul) node by measured latency;
    ``device_time``: time candidates by device time (graph runtimes on CUDA); ``on_node(name,
    i, total)`` is called before each linear node is measured (progress)."""
    forced = backends is not None
    backends = check_backends(backends, device, graph_runtime=device_time)
    linears = linear_nodes(p)
    convs = conv_nodes(p) if "shrink" in backends else []
    shrinkable = set(linears) | set(convs)
    layout = analyse(p.traced, p.result.masks, shrinkable) if "shrink" in backends else {}
    choices: dict[fx.Node, Choice] = {}
    failed: dict[str, list[tuple[str, BackendError]]] = {}  # family -> (node, error)
    for n in p.traced.gm.graph.nodes:  # in order: a conv sees its input's compact layout
        if n in convs:
            choice = _choose_conv(p, n, layout, device, backends, device_time)
            if choice is not None:
                choices[n] = choice
        elif n in shrinkable:
            if on_node is not None:
                on_node(n.name, len(choices), len(shrinkable))
            choices[n] = _choose(p, n, layout, device, backends, device_time, failed)
    _warn_failed(failed)
    if forced:
        _warn_unapplied(p, choices, backends, device)
    if "triton" in backends:
        for n in matmul_nodes(p):
            choice = _choose_matmul(p, n, device, backends, device_time)
            if choice is not None:
                choices[n] = choice
        from .codegen import triton_gen

        if triton_gen.available(device):
            from .fusion import choose_swiglu, swiglu_groups

            for group in swiglu_groups(p, linears):
                choices.update(choose_swiglu(p, group, choices, device, device_time))
    layout = _final_layout(p, choices)
    timer = "device" if device_time and device.type == "cuda" else "host"
    return Plan(choices, layout, device, backends, timer)


def _same_input(c, keep: torch.Tensor) -> bool:
    """Whether a kernel built for the compact input ``keep`` still gets exactly that."""
    return c is not None and c.fill is None and torch.equal(c.keep, keep)


def _final_layout(p: Propagated, choices: dict[fx.Node, Choice]) -> dict:
    """The layout of the chosen shrunk nodes. A convolution left with nothing to shrink, or a
    kernel built for a compact input that is no longer compact, once its input's producer runs
    dense, turns dense too."""
    while True:
        shrunk = {n for n, c in choices.items() if c.shrunk}
        layout = analyse(p.traced, p.result.masks, shrunk) if shrunk else {}
        ex, masks = p.traced.example, p.result.masks
        lost = [
            n
            for n in shrunk
            if n.target in CONVS
            and conv_shrink(n, ex[n.args[0]], masks[n], layout.get(n.args[0]), conv_rows(masks, n))
            is None
            or choices[n].reads_compact
            and not _same_input(layout.get(n.args[0]), choices[n].in_keep)
        ]
        if not lost:
            return layout
        for n in lost:
            c = choices[n]
            choices[n] = Choice(
                "dense", c.dense_latency_ms, c.dense_latency_ms, None, (), c.candidates,
                "its input's producer runs dense: nothing left to shrink, or not the input "
                "its kernel was built for",
            )  # fmt: skip


def back_off(p: Propagated, plan: Plan, nodes: Iterable[fx.Node], reason: str) -> Plan:
    """``plan`` with ``nodes`` turned back to dense (their reason says why)."""
    choices = dict(plan.choices)
    nodes = list(nodes)
    nodes += [f for n in nodes for f in choices[n].fused if f in choices]  # nodes fused into n
    for n in nodes:
        c = choices[n]
        choices[n] = Choice(
            "dense", c.dense_latency_ms, c.dense_latency_ms, None, (), c.candidates,
            f"{reason} (alone: {c.impl} {c.latency_ms:.4f} ms vs dense {c.dense_latency_ms:.4f})",
        )  # fmt: skip
    return Plan(choices, _final_layout(p, choices), plan.device, plan.backends, plan.timer)


def dense_plan(plan: Plan) -> Plan:
    """Every node dense: the exported graph with the masks folded into the weights."""
    return Plan({}, {}, plan.device, plan.backends, plan.timer)


TILE = 16  # the smallest tile a block-sparse kernel can skip (tl.dot's minimum)
MIN_SKIPPED = 0.1  # fraction of TILE x TILE weight tiles that must be empty for them to pay


def skips_tiles(mask: torch.Tensor) -> bool:
    """Whether a block-sparse kernel could skip anything worth it: at least ``MIN_SKIPPED`` of
    the weight's ``TILE x TILE`` tiles are empty. Below that (2:4, unstructured masks) it does
    the dense MMA work on worse tiles: measured 0.14-0.41x of cuBLAS on an H200
    (bench/results/triton_linear_h200_2026-11-21.md), so it is not even built."""
    return float(block_any(mask, TILE, TILE).float().mean()) <= 1.0 - MIN_SKIPPED


def _why(impl: str, t: dict[str, float], allowed: dict[str, float], device_time: bool) -> str:
    timer = "device time" if device_time else "host time per call"
    ranked = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t.items(), key=lambda kv: kv[1]))
    if impl != min(allowed, key=allowed.get):
        tie = f"shrink within {SHRINK_TIE - 1:.0%} of the fastest, kept as a layout choice"
        return f"{tie}: {ranked} ms ({timer})"
    if len(allowed) == 1 and impl == "dense":
        return f"no sparse family applies: dense {t[impl]:.4f} ms ({timer})"
    return f"fastest: {ranked} ms ({timer})"


def _choose(
    p: Propagated,
    n: fx.Node,
    layout: dict,
    device: torch.device,
    backends: tuple[str, ...],
    device_time: bool = False,
    failed: dict[str, list[tuple[str, BackendError]]] | None = None,
) -> Choice:
    """``failed`` collects the families that could not be built for ``n`` (and why); a family
    whose build timed out is not tried again for later nodes."""
    failed = {} if failed is None else failed
    x = p.traced.example[n.args[0]].detach().to(device)
    w, wm, b = masked_weight(p, n, device)
    act_node, act = fusable_activation(n)
    act_fn = functools.partial(reference.activation, name=act)
    candidates: dict[str, Callable[[], object]] = {"dense": lambda: act_fn(F.linear(x, w, b))}
    if "shrink" in backends:
        sub = _shrunk_call(p, n, layout, x, w, b, act_fn)
        if sub is not None:
            candidates["shrink"] = sub
    pattern = None if bool(wm.all()) else p.pattern_of(n.args[1])
    modules: dict[str, torch.nn.Module] = {}
    fused: dict[str, bool] = {}
    # (key prefix, operands, pattern, label): the full weight, then the shrunk one
    variants = [("", (x, w, wm, b), pattern, n.name)]
    reads_compact = False
    shrunk = _shrunk_operands(p, n, layout, x, w, wm, b) if "shrink" in backends else None
    if shrunk is not None and pattern is not None:
        xs, ws, wms, bs, reads_compact, spat = shrunk
        variants.append(("shrink+", (xs, ws, wms, bs), spat, f"{n.name} (shrunk)"))
    for prefix, (xv, wv, wmv, bv), pat, label in variants:
        for family in ("triton", "cusparselt", "nm_cpu", "sparse_cpu"):
            errors = failed.get(family, ())
            if family not in backends or not pat or _timed_out(errors):
                continue
            if prefix and any(name == n.name for name, _ in errors):
                continue  # it could not be built for this node's full weight either
            key = prefix + family
            try:
                builder = _builder(family, pat, device)
                if builder is None or (family == "triton" and not skips_tiles(wmv)):
                    continue
                fused[key] = act in FUSES[family]
                own = act if fused[key] else None
                mod = builder(wv, wmv, bv, own, node=n.name, tokens=xv.numel() // xv.shape[-1])
            except BackendError as e:
                failed.setdefault(family, []).append((label, e))
                continue
            modules[key] = mod
            call = mod.op_call() if hasattr(mod, "op_call") else mod
            candidates[key] = (
                (lambda c=call, xv=xv: c(xv))
                if fused[key]
                else (lambda c=call, xv=xv: act_fn(c(xv)))
            )
        split = _split(pat, wmv, device, backends)
        if split is not None and not any(
            _timed_out(failed.get(f, ())) for f in (*split.families, split.name)
        ):
            key = prefix + split.name
            tokens = xv.numel() // xv.shape[-1]
            try:
                mod = decompose.build(
                    split, wv, bv, lambda f, pt: _builder(f, pt, device), label, tokens
                )
            except BackendError as e:
                failed.setdefault(split.name, []).append((label, e))
                mod = None
            if mod is not None:
                modules[key], fused[key] = mod, False
                candidates[key] = lambda c=mod, xv=xv: act_fn(c(xv))
    timings = compare_ms(candidates, device, device_time=device_time)
    dense_ms = timings["dense"]
    allowed = {k: v for k, v in timings.items() if k != "dense" or "dense" in backends}
    if not allowed:
        allowed = {"dense": dense_ms}  # no sparse family applies to this node
    impl = min(allowed, key=allowed.get)
    if "shrink" in allowed and allowed["shrink"] <= SHRINK_TIE * allowed[impl]:
        # A tie (host-bound timings on a GPU, noise) goes to the compact layout: mixing compact
        # and full layouts along a chain costs gathers/scatters that no single node's timing sees.
        impl = "shrink"
    absorbed = (act_node,) if impl in modules and fused[impl] and act_node is not None else ()
    compact_in = reads_compact and impl.startswith("shrink+")
    return Choice(
        impl,
        timings[impl],
        dense_ms,
        modules.get(impl),
        absorbed,
        timings,
        _why(impl, timings, allowed, device_time),
        compact_in,
        layout[n.args[0]].keep if compact_in else None,
    )


def _split(pattern, mask: torch.Tensor, device: torch.device, backends) -> decompose.Split | None:
    """The decomposition worth timing for a mixed ``mask`` (unstructured or block: an n:m or
    structured mask has one family that fits it whole), or None."""
    if pattern is None or pattern.kind not in ("unstructured", "block") or mask.dim() != 2:
        return None
    if device.type == "cpu" and {"nm_cpu", "sparse_cpu"} <= set(backends):
        return decompose.cpu_split(mask)
    if device.type == "cuda" and {"triton", "cusparselt"} <= set(backends):
        return decompose.gpu_split(mask, skips_tiles)
    return None


def _shrunk_operands(p: Propagated, n: fx.Node, layout: dict, x, w, wm, b):
    """The operands of a kernel on the shrunk weight of linear ``n``: (input, weight, weight
    mask, bias, reads the compact input, pattern), or None when nothing shrinks. Dropping
    output rows keeps any n:m/block pattern; dropping input columns too is done only where the
    pattern survives it, else the kernel reads the full input."""
    out_keep = linear_out_keep(p.result.masks, n).to(x.device)
    src = layout.get(n.args[0])
    narrower = src is not None and src.dim == x.dim() - 1 and len(src.keep) < src.full
    if len(out_keep) == w.shape[0] and not narrower:
        return None
    given = p.pattern_of(n.args[1])
    ws, wms = w[out_keep], wm[out_keep]
    bs = b[out_keep] if b is not None else None
    if narrower and src.fill is None:
        keep = src.keep.to(x.device)
        pat = surviving_pattern(given, wms[:, keep])
        if pat.kind in STRUCTURED:
            return None  # what is left after shrinking is dense: plain shrink covers it
        if pat.kind == given.kind or given.kind not in ("nm", "block"):
            xs = x.index_select(-1, keep)
            return xs, ws[:, keep], wms[:, keep], bs, True, pat
    pat = surviving_pattern(given, wms)
    return None if pat.kind in STRUCTURED else (x, ws, wms, bs, False, pat)


# Patterns whose pruned elements shrinking removes entirely.
STRUCTURED = ("dense", "empty", "row", "column", "channel")


def _choose_conv(
    p: Propagated,
    n: fx.Node,
    layout: dict,
    device: torch.device,
    backends: tuple[str, ...],
    device_time: bool,
) -> Choice | None:
    """Dense or shrunk (fewer channels, whole groups) for a convolution; None when nothing
    shrinks."""
    x = p.traced.example[n.args[0]].detach().to(device)
    in_c = layout.get(n.args[0])
    in_c = in_c if in_c is not None and in_c.dim == 1 else None
    s = conv_shrink(n, x, p.result.masks[n], in_c, conv_rows(p.result.masks, n))
    if s is None:
        return None
    w, _, b = masked_weight(p, n, device)
    args = conv_args(n)
    dense_args = {**args, "input": x, "weight": w, "bias": b}
    xc = x.index_select(1, in_c.keep.to(device)) if s.reads_compact else x
    xs = s.compact_input(xc, in_c)
    bs = None if b is None else b[s.out_keep.to(device)]
    small = {**args, "input": xs, "weight": s.weight(w), "bias": bs, "groups": s.groups}
    op = n.target
    t = compare_ms(
        {
            "dense": lambda: op(*dense_args.values()),
            "shrink": lambda: op(s.compact_input(xc, in_c), *list(small.values())[1:]),
        },
        device,
        device_time=device_time,
    )
    allowed = {k: v for k, v in t.items() if k != "dense" or "dense" in backends}
    impl = min(allowed, key=allowed.get)
    if "shrink" in allowed and allowed["shrink"] <= SHRINK_TIE * allowed[impl]:
        impl = "shrink"
    return Choice(impl, t[impl], t["dense"], None, (), t, _why(impl, t, allowed, device_time))


def _shrunk_call(p, n, layout, x, w, b, act_fn):
    """The smaller dense linear of a shrunk node, timed on compact inputs; None if nothing to
    shrink."""
    out_keep = linear_out_keep(p.result.masks, n).to(x.device)
    src = layout.get(n.args[0])
    narrower = src is not None and src.dim == x.dim() - 1 and len(src.keep) < src.full
    in_keep = src.keep.to(x.device) if narrower else None
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
            nm_cpu.compile_source("", "scalar")  # raises the no-compiler BackendError
        return lambda w, wm, b, act, node, tokens: nm_cpu.build_nm_linear(
            w, wm, b, act, n=pattern.n, m=pattern.m, node=node, tokens=tokens
        )
    if family == "sparse_cpu":
        if device.type != "cpu" or pattern.kind in ("dense", "empty"):
            return None
        from .codegen import nm_cpu, sparse_cpu

        if not sparse_cpu.available():
            nm_cpu.compile_source("", "scalar", "sparse_cpu")  # raises the no-compiler error
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


def _why_not(family: str, mask: torch.Tensor, pattern, device: torch.device) -> str:
    """Why a family named in ``backends`` is not a candidate for a linear with this mask."""
    if family == "shrink":
        return "propagation pruned no whole output feature and no input feature to drop"
    if bool(mask.all()) and family != "triton":
        return "its weight keeps every element"
    if family == "nm_cpu":
        if device.type != "cpu":
            return f"nm_cpu runs on the CPU, the model is on {device}"
        if pattern.kind != "nm":
            return (
                f"its weight's pattern is {pattern}, not n:m (at most n kept of every m "
                f"consecutive inputs, whole pruned rows and columns allowed)"
            )
    if family == "cusparselt" and (device.type != "cuda" or str(pattern) != "2:4"):
        return f"cusparselt needs a 2:4 weight on CUDA, got {pattern} on {device}"
    if family == "triton" and device.type != "cuda":
        return f"triton kernels run on CUDA, the model is on {device}"
    if family == "triton" and not skips_tiles(mask):
        return (
            f"fewer than {MIN_SKIPPED:.0%} of its {TILE}x{TILE} weight tiles are empty, so a "
            "block-sparse kernel would skip nothing worth it"
        )
    return "the backend refused it (see the warning above)"


def _warn_unapplied(
    p: Propagated, choices: dict[fx.Node, Choice], backends: tuple[str, ...], device: torch.device
) -> None:
    """One warning per family the caller named that cannot implement some linear node."""
    for family in backends:
        if family == "dense":
            continue
        missing = [n for n, c in choices.items() if family not in c.candidates]
        if not missing:
            continue
        names = {node: q for q, node in p.traced.params.items()}
        lines = [
            f"{n.name} (weight {names.get(n.args[1], n.args[1])!r}): "
            f"{_why_not(family, p.result.masks[n.args[1]], p.pattern_of(n.args[1]), device)}"
            for n in missing
        ]
        fallback = "dense" if "dense" in backends else "dense all the same"
        warnings.warn(
            f"sparta: backends={list(backends)} names {family!r}, which cannot implement "
            f"{len(missing)} linear node(s); they run {fallback}: " + "; ".join(lines),
            stacklevel=3,
        )


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


def _timed_out(errors) -> bool:
    return any(isinstance(e, BuildTimeout) for _, e in errors)


def _warn_failed(failed: dict[str, list[tuple[str, BackendError]]]) -> None:
    """One warning for every family that could not be built for some nodes: which, and why."""
    if not failed:
        return
    parts = []
    for family, errors in failed.items():
        names = ", ".join(name for name, _ in errors)
        first = str(errors[0][1])
        first = first if len(first) <= 2000 else first[:2000] + " ..."
        again = "; not tried again after the build timed out" if _timed_out(errors) else ""
        parts.append(f"{family} for {names} ({first}{again})")
    warnings.warn(
        "sparta: kernels could not be built; these nodes run dense or another family instead: "
        + "; ".join(parts),
        stacklevel=4,  # the caller of sparta.compile
    )
