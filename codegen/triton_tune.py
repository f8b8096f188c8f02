"""Tile choice for the block-sparse linear kernel: a cost model, then a small measured sweep.

Packing choices (BN output rows x BK k-chunk) change the tables, so they are fixed at build
time; launch choices (BLOCK_M, warps, stages) are tuned for two token regimes (small M and
large M) and picked in forward() by one comparison. A measured result is cached twice through
``codegen/cache.py``: per mask (key: mask digest, shapes, dtype, epilogue, device name) and
per tuning class (shapes, dtype, device and the candidates' slab counts rounded to 2%), so
masks of one shape and density share one sweep.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cache import cache_key, cached_file, debug_level
from .triton_pack import TilePlan, plan_tiles

SMALL_M = 512  # forward() uses the small-M launch config at or below this many tokens
TUNE_M = (4096, 256)  # token counts the sweep measures (large, small)

PACK_CANDIDATES = ((128, 64), (128, 32), (64, 64), (64, 32), (32, 32))
# Relative cost of one slab element, by tile shape (smaller tiles feed the tensor cores worse).
_EFF = {128: 1.0, 64: 1.1, 32: 1.6}
_EFF_K = {64: 1.0, 32: 1.15}
# (features-as-rows orientation, BLOCK_M tokens, warps, stages)
Launch = tuple[bool, int, int, int]
LARGE_LAUNCH: tuple[Launch, ...] = (
    (False, 128, 4, 4),
    (False, 256, 8, 3),
    (False, 128, 4, 6),
    (True, 128, 4, 4),
)
SMALL_LAUNCH: tuple[Launch, ...] = ((False, 64, 4, 4), (True, 64, 4, 4), (False, 32, 4, 4))


@dataclass(frozen=True)
class LinearConfig:
    """Tile shape (packing) plus launch parameters for large and small token counts."""

    bn: int = 64
    bk: int = 32
    cluster: bool = True
    block_m: int = 128
    warps: int = 4
    stages: int = 3
    swap: bool = False
    small_block_m: int = 64
    small_warps: int = 4
    small_stages: int = 3
    small_swap: bool = False

    def launch(self, m: int) -> Launch:
        if m <= SMALL_M:
            return self.small_swap, self.small_block_m, self.small_warps, self.small_stages
        return self.swap, self.block_m, self.warps, self.stages

    @staticmethod
    def single(bn: int, bk: int, launch: Launch, cluster: bool = True) -> LinearConfig:
        """One launch config for every token count (used while measuring)."""
        swap, bm, warps, stages = launch
        return LinearConfig(bn, bk, cluster, bm, warps, stages, swap, bm, warps, stages, swap)


INTERPRETER_CONFIG = LinearConfig(bn=32, bk=32, block_m=32, small_block_m=16)


def model_cost(plan: TilePlan) -> float:
    return plan.n_slabs * plan.bn * plan.bk * _EFF[plan.bn] * _EFF_K[plan.bk] + plan.n_tiles


def candidate_plans(mask: torch.Tensor) -> list[TilePlan]:
    """Plans of every packing candidate that fits the mask, cheapest modelled cost first."""
    n, k = mask.shape
    plans = [plan_tiles(mask, bn, bk) for bn, bk in PACK_CANDIDATES if bn <= max(32, 2 * n)]
    return sorted(plans, key=model_cost)


def _class_signature(plans: list[TilePlan], mask: torch.Tensor) -> str:
    total = mask.numel()
    parts = [f"{p.bn}x{p.bk}:{round(50 * p.n_slabs * p.bn * p.bk / total)}" for p in plans]
    return ",".join(parts)


Timer = Callable[[TilePlan, int, Launch], float]


def sweep(plans: list[TilePlan], timer: Timer, top: int = 3) -> LinearConfig:
    """Measure the ``top`` modelled plans at large M, then launch configs at small M."""
    best: tuple[float, TilePlan, Launch] | None = None
    for plan in plans[:top]:
        for launch in LARGE_LAUNCH:
            if launch[1] * plan.bn > 256 * 128 or (launch[0] and plan.bn < 64):
                continue
            t = timer(plan, TUNE_M[0], launch)
            if debug_level() >= 1:
                print(f"sparta tune {plan.bn}x{plan.bk} slabs={plan.n_slabs} "
                      f"launch={launch} M={TUNE_M[0]}: {t:.4f} ms", file=sys.stderr)  # fmt: skip
            if best is None or t < best[0]:
                best = (t, plan, launch)
    if best is None or not math.isfinite(best[0]):
        raise RuntimeError("no tile configuration could be compiled and run for this mask")
    _, plan, large = best
    smalls = [s for s in SMALL_LAUNCH if not (s[0] and plan.bn < 64)]
    small = min(smalls, key=lambda launch: timer(plan, TUNE_M[1], launch))
    return LinearConfig(
        plan.bn, plan.bk, plan.clustered, *large[1:], large[0], *small[1:], small[0]
    )


def _json_entry(key: str, make: Callable[[], LinearConfig]) -> LinearConfig:
    def build(path: Path) -> None:
        path.write_text(json.dumps(asdict(make())))

    def check(path: Path) -> bool:
        LinearConfig(**json.loads(path.read_text()))
        return True

    path = cached_file(key, ".json", build, check=check)
    return LinearConfig(**json.loads(path.read_text()))


def tuned_config(
    mask: torch.Tensor,
    *,
    mask_key: str,
    class_parts: tuple[object, ...],
    timer_for: Callable[[], Timer],
) -> LinearConfig:
    """The cached config of this mask; on a miss, the cached or freshly measured class one."""

    def per_class() -> LinearConfig:
        plans = candidate_plans(mask)
        key = cache_key("triton-linear-tune", *class_parts, _class_signature(plans, mask))
        return _json_entry(key, lambda: sweep(plans, timer_for()))

    return _json_entry(mask_key, per_class)


def time_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in ms (CUDA events through triton's do_bench)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=3, rep=12, return_mode="median"))
    except Exception:  # a config that does not compile or fit (out of shared memory)
        return float("inf")
