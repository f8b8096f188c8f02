"""Choices that span several nodes: a gated MLP's gate and up projections as one SwiGLU kernel.

A group ``mul(silu(linear(x, Wg)), linear(x, Wu))`` (Llama's MLP), where each intermediate has
no other user, can run as one block-sparse kernel that never writes the two intermediates
(``codegen/triton_swiglu.py``). The planner times that kernel against what the per-node plan
already runs for the group (the chosen gate and up implementations and the elementwise
product) and against dense, the same way as every other candidate, and keeps the fastest.
The gate node then carries the kernel; the up node is marked ``"fused"`` into it.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

from .choice import Choice, masked_weight
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
    timer = "device time" if device_time else "host time per call"
    ranked = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t.items(), key=lambda kv: kv[1]))
    why = f"fastest for silu({gate.name}) * {up.name}: {ranked} ms ({timer})"
    return {
        gate: Choice("triton-swiglu", t["triton-swiglu"], t["dense"], mod, (act, up, mul), t, why),
        up: Choice("fused", 0.0, 0.0, None, (), {}, f"computed in {gate.name}'s SwiGLU kernel"),
    }
