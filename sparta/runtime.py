"""The runtime that runs the emitted graph: eager fx, Inductor, or Inductor with CUDA graphs.

``sparta.compile(..., mode=...)``:

- ``"default"``: Inductor (``torch.compile``) on CUDA, so the dense remainder (layer norms,
  residual adds, softmax glue) is fused around the generated kernels as ``torch.compile`` fuses
  it for the dense model; on the CPU the eager fx graph (``CPU_DEFAULT``: the planner's CPU
  kernels are C++ ops either way, and Inductor's CPU code for the dense remainder has not been
  measured to win here — ``docs/design.md``).
- ``"eager"``: the emitted fx graph run op by op in Python (every launch paid on the host).
- ``"inductor"``: Inductor on any device.
- ``"reduce-overhead"``: Inductor with CUDA graphs, as ``torch.compile(mode="reduce-overhead")``
  (static shapes replay one graph per input shape; outputs live in a buffer that the next call
  overwrites, as there). On the CPU, where CUDA graphs do not apply, it is ``"inductor"``.

The planner reads ``Runtime.device_time``: in graph runtimes on CUDA candidates are timed by
device time (CUDA-graph replays, no host launch cost), eager they are timed per call on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .errors import PlanError

MODES = ("default", "eager", "inductor", "reduce-overhead")
CPU_DEFAULT = "eager"


@dataclass(frozen=True)
class Runtime:
    mode: str  # as asked
    kind: str  # what runs: "eager" | "inductor" | "inductor+cudagraphs"
    device: torch.device

    @property
    def device_time(self) -> bool:
        """Whether host launch cost is hidden (graph runtimes on CUDA): time by device time."""
        return self.device.type == "cuda" and self.kind != "eager"

    def describe(self) -> str:
        timer = "device time (CUDA-graph replay)" if self.device_time else "per call on the host"
        return f"{self.kind} on {self.device.type} (mode={self.mode!r}; planned by {timer})"


def resolve(mode: str, device: torch.device) -> Runtime:
    """The runtime ``mode`` means on ``device``; PlanError for an unknown mode."""
    if mode not in MODES:
        raise PlanError(f"unknown mode {mode!r}: choose one of {', '.join(map(repr, MODES))}.")
    cuda = device.type == "cuda"
    if mode == "default":
        kind = "inductor" if cuda else CPU_DEFAULT
    elif mode == "reduce-overhead":
        kind = "inductor+cudagraphs" if cuda else "inductor"
    else:
        kind = mode
    return Runtime(mode, kind, device)


def build(gm: torch.nn.Module, runtime: Runtime) -> Callable[..., Any]:
    """The callable that runs ``gm`` in ``runtime`` (``torch.compile`` is lazy: Inductor
    compiles at the first call, recompiling for new shapes as ``torch.compile`` does)."""
    if runtime.kind == "eager":
        return gm
    mode = "reduce-overhead" if runtime.kind == "inductor+cudagraphs" else None
    return torch.compile(gm, mode=mode)
