"""The kernel families: what each can build for a linear, what it fuses, and why not.

``builder(family, pattern, device)`` is the one place that maps a family to its generator
(``codegen/``): a callable ``(weight, mask, bias, activation, node=, tokens=) -> module`` for a
weight of that pattern on that device, or None when the family does not apply there. The
planner (``sparta/plan.py``) times what these build; the warnings say which named families
could not implement which nodes, and why.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F

from .errors import BackendError, BuildTimeout, PlanError
from .kernels import epilogue, reference
from .tesa import block_any

if TYPE_CHECKING:
    from .choice import Choice
    from .propagate import Propagated

FAMILIES = ("dense", "shrink", "triton", "cusparselt", "nm_cpu", "sparse_cpu")

# The epilogue activations each generated-kernel family fuses (``kernels/epilogue.py``); the
# 2:4 module applies any of them to the cuSPARSELt product.
FUSES = {
    "triton": epilogue.TRITON_ACTIVATIONS,
    "nm_cpu": epilogue.CPU_ACTIVATIONS,
    "sparse_cpu": epilogue.CPU_ACTIVATIONS,
    "cusparselt": epilogue.ALL_ACTIVATIONS,
}


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


TILE = 16  # the smallest tile a block-sparse kernel can skip (tl.dot's minimum)
MIN_SKIPPED = 0.1  # fraction of TILE x TILE weight tiles that must be empty for them to pay


def skips_tiles(mask: torch.Tensor) -> bool:
    """Whether a block-sparse kernel could skip anything worth it: at least ``MIN_SKIPPED`` of
    the weight's ``TILE x TILE`` tiles are empty. Below that (2:4, unstructured masks) it does
    the dense MMA work on worse tiles: measured 0.14-0.41x of cuBLAS on an H200
    (bench/results/triton_linear_h200_2026-11-21.md), so it is not even built."""
    return float(block_any(mask, TILE, TILE).float().mean()) <= 1.0 - MIN_SKIPPED


def builder(family: str, pattern, device: torch.device):
    """The generator of ``family`` for a weight of ``pattern`` on ``device``, or None; raises
    BackendError when the family applies but cannot build here (no C++ compiler)."""
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


def why_not(family: str, mask: torch.Tensor, pattern, device: torch.device) -> str:
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


def warn_unapplied(
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
            f"{why_not(family, p.result.masks[n.args[1]], p.pattern_of(n.args[1]), device)}"
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


def timed_out(errors) -> bool:
    return any(isinstance(e, BuildTimeout) for _, e in errors)


def warn_failed(failed: dict[str, list[tuple[str, BackendError]]]) -> None:
    """One warning for every family that could not be built for some nodes: which, and why."""
    if not failed:
        return
    parts = []
    for family, errors in failed.items():
        names = ", ".join(name for name, _ in errors)
        first = str(errors[0][1])
        first = first if len(first) <= 2000 else first[:2000] + " ..."
        again = "; not tried again after the build timed out" if timed_out(errors) else ""
        parts.append(f"{family} for {names} ({first}{again})")
    warnings.warn(
        "sparta: kernels could not be built; these nodes run dense or another family instead: "
        + "; ".join(parts),
        stacklevel=4,  # the caller of sparta.compile
    )
