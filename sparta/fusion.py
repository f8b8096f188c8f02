"""Choices that span several nodes: a gated MLP's gate and up projections as one SwiGLU kernel,
and sibling linears (one input, several weights: attention's q, k, v) as one kernel.

A group ``mul(silu(linear(x, Wg)), linear(x, Wu))`` (Llama's MLP), where each intermediate has
no other user, can run as one block-sparse kernel that never writes the two intermediates
(``codegen/triton_swiglu.py``). The planner times that kernel against what the per-node plan
already runs for the group (the chosen gate and up implementations and the elementwise
product) and against dense, the same way as every other candidate, and keeps the fastest.
The gate node then carries the kernel; the up node is marked ``"fused"`` into it.

Sibling linears, each planned to the same generated CPU kernel family (``sparse_cpu`` or
``nm_cpu``), can run as one kernel over their weights stacked along the output features (a
horizontal fusion, as TVM and TensorRT do for q, k and v): the shared input is read and
transposed once, and one call replaces several. The first sibling in graph order carries the
kernel (``Choice.splits`` holds each sibling's output width); the others are marked ``"fused"``
and read their slice of its output. It is kept only where it measured faster than the siblings'
own kernels.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import families
from .choice import Choice, masked_weight, stacked_weight, timer_label
from .errors import BackendError
from .propagate import Propagated
from .shrink import LINEAR
from .timing import compare_ms

aten = torch.ops.aten


def swiglu_groups(p: Propagated, linears: list[fx.Node]) -> list[tuple[fx.Node, ...]]:
    """(gate, up, silu, mul) groups of the graph."""
    lin = set(linears)
    groups = []
    for n in p.traced.gm.graph.nodes:
        if n.target is not aten.mul.Tensor or len(n.args) != 2:
            continue
        for act, up in (n.args, n.args[::-1]):
            if not (isinstance(act, fx.Node) and isinstance(up, fx.Node)):
                continue
            if act.target is not aten.silu.default or up not in lin:
                continue
            gate = act.args[0]
            if gate not in lin or gate is up or gate.args[0] is not up.args[0]:
                continue
            if any(len(v.users) != 1 for v in (gate, act, up)):
                continue
            groups.append((gate, up, act, n))
            break
    return groups


def _call(choice: Choice, x, w, b):
    if choice.impl == "dense":
        return lambda: F.linear(x, w, b)
    call = choice.module.op_call()
    return lambda: call(x)


def choose_swiglu(
    p: Propagated,
    group: tuple[fx.Node, ...],
    choices: dict[fx.Node, Choice],
    device: torch.device,
    device_time: bool,
) -> dict[fx.Node, Choice]:
    """New choices for the group's gate and up nodes when the fused kernel is fastest."""
    from .codegen.triton_swiglu import build_block_sparse_swiglu

    gate, up, act, mul = group
    cg, cu = choices[gate], choices[up]
    if cg.shrunk or cu.shrunk or gate.target is not LINEAR:
        return {}  # compact layouts already skip the pruned units
    x = p.traced.example[gate.args[0]].detach().to(device)
    wg, mg, bg = masked_weight(p, gate, device)
    wu, mu, bu = masked_weight(p, up, device)
    tokens = x.numel() // x.shape[-1]
    try:
        mod = build_block_sparse_swiglu(wg, mg, bg, wu, mu, bu, node=gate.name, tokens=tokens)
    except BackendError as e:
        warnings.warn(f"sparta: no SwiGLU kernel for {gate.name}: {e}", stacklevel=2)
        return {}
    g, u = _call(cg, x, wg, bg), _call(cu, x, wu, bu)
    g_act = g if cg.fused else (lambda: F.silu(g()))  # the gate kernel may fuse silu already
    fused = mod.op_call()
    t = compare_ms(
        {
            "dense": lambda: F.silu(F.linear(x, wg, bg)) * F.linear(x, wu, bu),
            "per-node": lambda: g_act() * u(),
            "triton-swiglu": lambda: fused(x),
        },
        device,
        device_time=device_time,
    )
    if t["triton-swiglu"] >= t["per-node"]:
        return {}
    timer = timer_label(device_time)
    ranked = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t.items(), key=lambda kv: kv[1]))
    why = f"fastest for silu({gate.name}) * {up.name}: {ranked} ms ({timer})"
    return {
        gate: Choice("triton-swiglu", t["triton-swiglu"], t["dense"], mod, (act, up, mul), t, why),
        up: Choice("fused", 0.0, 0.0, None, (), {}, f"computed in {gate.name}'s SwiGLU kernel"),
    }


# The kernel families whose kernels of one input may be stacked into one.
SIBLING_FAMILIES = ("sparse_cpu", "nm_cpu")


def sibling_groups(p: Propagated, choices: dict[fx.Node, Choice]) -> list[tuple[fx.Node, ...]]:
    """Linears reading one input, each planned to one kernel of the same family in
    ``SIBLING_FAMILIES`` on its full weight with no activation absorbed (for ``nm_cpu``, of one
    n:m pattern): groups of two or more, each in graph order."""
    groups: dict[tuple, list[fx.Node]] = {}
    for n in p.traced.gm.graph.nodes:
        c = choices.get(n)
        if c is None or n.target is not LINEAR or c.impl not in SIBLING_FAMILIES or c.fused:
            continue
        pat = p.pattern_of(n.args[1])
        key = (n.args[0], c.impl, (pat.n, pat.m) if c.impl == "nm_cpu" else None)
        groups.setdefault(key, []).append(n)
    return [tuple(g) for g in groups.values() if len(g) > 1]


def choose_siblings(
    p: Propagated,
    group: tuple[fx.Node, ...],
    choices: dict[fx.Node, Choice],
    device: torch.device,
    device_time: bool,
) -> dict[fx.Node, Choice]:
    """New choices for ``group`` (see ``sibling_groups``) when one stacked kernel measures
    faster than the siblings' own kernels; else none."""
    lead = group[0]
    family = choices[lead].impl
    w, wm, b, sizes = stacked_weight(p, group, device)
    x = p.traced.example[lead.args[0]].detach().to(device)
    name = "+".join(n.name for n in group)
    try:
        build = families.builder(family, p.pattern_of(lead.args[1]), device)
        mod = build(w, wm, b, None, node=name, tokens=x.numel() // x.shape[-1])
    except BackendError as e:
        warnings.warn(f"sparta: no stacked {family} kernel for {name}: {e}", stacklevel=2)
        return {}
    own = [choices[n].module.op_call() for n in group]
    stacked = mod.op_call()
    t = compare_ms(
        {
            "per-node": lambda: [c(x) for c in own],
            # timed as emitted: each sibling's slice made contiguous
            "stacked": lambda: [s.contiguous() for s in stacked(x).split(list(sizes), -1)],
        },
        device,
        device_time=device_time,
    )
    timer = timer_label(device_time)
    timed = f"stacked {t['stacked']:.4f} ms vs {t['per-node']:.4f} ms as separate kernels ({timer})"
    if t["stacked"] >= t["per-node"]:  # say so: "not stacked" is then a measured decision
        c = choices[lead]
        return {lead: replace(c, reason=f"{c.reason}; one kernel with {name}: {timed}, not kept")}
    dense_ms = sum(choices[n].dense_latency_ms for n in group)
    why = (
        f"one {family} kernel for the linears sharing their input ({name}): {timed}; "
        f"dense {dense_ms:.4f} ms for them together"
    )
    out = {
        lead: Choice(
            family, t["stacked"], dense_ms, mod, group[1:], {**choices[lead].candidates, **t},
            why, splits=sizes,
        )
    }  # fmt: skip
    for n in group[1:]:
        out[n] = Choice("fused", 0.0, 0.0, None, (), {}, f"computed in {lead.name}'s kernel: {why}")
    return out
