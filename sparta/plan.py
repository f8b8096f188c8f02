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

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import decompose, families
from .choice import SHRINK_TIE, Choice, Plan, masked_weight, stacked_weight, why
from .errors import BackendError
from .families import FUSES, check_backends, skips_tiles
from .fusion import choose_siblings, choose_swiglu, sibling_groups, swiglu_groups
from .kernels import epilogue, reference
from .plan_shrink import choose_conv, final_layout, shrunk_call, shrunk_operands
from .propagate import Propagated
from .shrink import CONVS, LINEAR, analyse, linear_out_keep
from .tesa import detect_pattern, surviving_pattern
from .timing import compare_ms


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
    reason = why(impl, t, allowed, device_time)
    return Choice(impl, t[impl], t["dense"], mod if impl != "dense" else None, (), t, reason)


def kernel_operands(p: Propagated, n: fx.Node, c: Choice, device: torch.device) -> tuple:
    """The masked weight, mask, bias and pattern the kernel of choice ``c`` for linear ``n``
    was built from: the full weight, or for ``shrink+<family>`` its kept output rows (and the
    compact input's columns when it reads the compact input)."""
    pattern = p.pattern_of(n.args[1])
    if c.splits:  # sibling linears stacked along the output features
        w, wm, b, _ = stacked_weight(p, (n, *c.fused), device)
        return w, wm, b, pattern
    w, wm, b = masked_weight(p, n, device)
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
            choice = choose_conv(p, n, layout, device, backends, device_time)
            if choice is not None:
                choices[n] = choice
        elif n in shrinkable:
            if on_node is not None:
                on_node(n.name, len(choices), len(shrinkable))
            choices[n] = _choose(p, n, layout, device, backends, device_time, failed)
    families.warn_failed(failed)
    if forced:
        families.warn_unapplied(p, choices, backends, device)
    for group in sibling_groups(p, choices):
        choices.update(choose_siblings(p, group, choices, device, device_time))
    if "triton" in backends:
        for n in matmul_nodes(p):
            choice = _choose_matmul(p, n, device, backends, device_time)
            if choice is not None:
                choices[n] = choice
        from .codegen import triton_gen

        if triton_gen.available(device):
            for group in swiglu_groups(p, linears):
                choices.update(choose_swiglu(p, group, choices, device, device_time))
    layout = final_layout(p, choices)
    timer = "device" if device_time and device.type == "cuda" else "host"
    return Plan(choices, layout, device, backends, timer)


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
    return Plan(choices, final_layout(p, choices), plan.device, plan.backends, plan.timer)


def dense_plan(plan: Plan) -> Plan:
    """Every node dense: the exported graph with the masks folded into the weights."""
    return Plan({}, {}, plan.device, plan.backends, plan.timer)


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
        sub = shrunk_call(p, n, layout, x, w, b, act_fn)
        if sub is not None:
            candidates["shrink"] = sub
    pattern = None if bool(wm.all()) else p.pattern_of(n.args[1])
    modules: dict[str, torch.nn.Module] = {}
    fused: dict[str, bool] = {}
    # (key prefix, operands, pattern, label): the full weight, then the shrunk one
    variants = [("", (x, w, wm, b), pattern, n.name)]
    reads_compact = False
    shrunk = shrunk_operands(p, n, layout, x, w, wm, b) if "shrink" in backends else None
    if shrunk is not None and pattern is not None:
        xs, ws, wms, bs, reads_compact, spat = shrunk
        variants.append(("shrink+", (xs, ws, wms, bs), spat, f"{n.name} (shrunk)"))
    for prefix, (xv, wv, wmv, bv), pat, label in variants:
        for family in ("triton", "cusparselt", "nm_cpu", "sparse_cpu"):
            errors = failed.get(family, ())
            if family not in backends or not pat or families.timed_out(errors):
                continue
            if prefix and any(name == n.name for name, _ in errors):
                continue  # it could not be built for this node's full weight either
            key = prefix + family
            try:
                builder = families.builder(family, pat, device)
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
            families.timed_out(failed.get(f, ())) for f in (*split.families, split.name)
        ):
            key = prefix + split.name
            tokens = xv.numel() // xv.shape[-1]
            try:
                mod = decompose.build(split, wv, bv, label, tokens)
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
        why(impl, timings, allowed, device_time),
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
        return decompose.gpu_split(mask)
    return None
