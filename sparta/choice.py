"""What the planner decides: a ``Choice`` per planned node, gathered in a ``Plan``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from .propagate import Propagated

SHRINK_TIE = 1.05  # shrink is kept when within 5% of the fastest candidate


@dataclass
class Choice:
    impl: str
    latency_ms: float
    dense_latency_ms: float
    module: torch.nn.Module | None = None  # for generated-kernel families
    fused: tuple[fx.Node, ...] = ()  # nodes folded into the kernel (activation, siblings)
    candidates: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    # "shrink+<family>": the kernel runs on the shrunk weight; whether it reads the compact
    # input (else the full one).
    reads_compact: bool = False
    in_keep: torch.Tensor | None = None  # the compact input it was built for
    # A kernel stacking sibling linears (``fusion.choose_siblings``): the output width of this
    # node and of each node in ``fused``, in order; the kernel's output is their concatenation.
    splits: tuple[int, ...] = ()

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


def masked_weight(p: Propagated, n: fx.Node, device: torch.device) -> tuple:
    w_node = n.args[1]
    b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    w = p.traced.example[w_node].detach().to(device)
    wm = p.result.masks[w_node].to(device)
    b = p.traced.example[b_node].detach().to(device) if isinstance(b_node, fx.Node) else None
    if b is not None:
        b = b * p.result.masks[b_node].to(device)
    return w * wm, wm, b


def stacked_weight(p: Propagated, nodes: tuple[fx.Node, ...], device: torch.device) -> tuple:
    """Sibling linears' masked weights, masks and biases stacked along the output features (a
    missing bias as zeros; None when none has one), and each one's output width."""
    parts = [masked_weight(p, n, device) for n in nodes]
    sizes = tuple(int(w.shape[0]) for w, _, _ in parts)
    w, wm = torch.cat([w for w, _, _ in parts]), torch.cat([m for _, m, _ in parts])
    biases = [b if b is not None else w.new_zeros(k) for (_, _, b), k in zip(parts, sizes)]
    has_bias = any(b is not None for _, _, b in parts)
    return w, wm, torch.cat(biases) if has_bias else None, sizes


def timer_label(device_time: bool) -> str:
    """How candidates were timed, as reasons and reports say it."""
    return "device time" if device_time else "host time per call"


def why(impl: str, t: dict[str, float], allowed: dict[str, float], device_time: bool) -> str:
    timer = timer_label(device_time)
    ranked = ", ".join(f"{k} {v:.4f}" for k, v in sorted(t.items(), key=lambda kv: kv[1]))
    if impl != min(allowed, key=allowed.get):
        tie = f"shrink within {SHRINK_TIE - 1:.0%} of the fastest, kept as a layout choice"
        return f"{tie}: {ranked} ms ({timer})"
    if len(allowed) == 1 and impl == "dense":
        return f"no sparse family applies: dense {t[impl]:.4f} ms ({timer})"
    return f"fastest: {ranked} ms ({timer})"
