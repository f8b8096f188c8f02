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
    (True, 256, 8, 3),  # M >> N: 256 tokens on the wide MMA side, fewer re-reads of W slabs
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


def _fits(plan: TilePlan, launch: Launch) -> bool:
    swap, block_m = launch[0], launch[1]
    return block_m * plan.bn <= 256 * 128 and not (swap and plan.bn < 64)


def sweep(plans: list[TilePlan], timer: Timer, tokens: int = TUNE_M[0]) -> LinearConfig:
    """Measure plans x launch configs at ``tokens``, then the other regime's launch config.

    The packing is chosen at the caller's token count: few tokens favour small tiles that
    skip more of the weight, many tokens favour wide tiles that re-read less of x. At few
    tokens every plan is measured (each run is short); at many, the 3 best modelled ones.
    """
    small_first = tokens <= SMALL_M
    primary = SMALL_LAUNCH if small_first else LARGE_LAUNCH
    best: tuple[float, TilePlan, Launch] | None = None
    for plan in plans if small_first else plans[:3]:
        for launch in (lc for lc in primary if _fits(plan, lc)):
            t = timer(plan, tokens, launch)
            if debug_level() >= 1:
                print(f"sparta tune {plan.bn}x{plan.bk} slabs={plan.n_slabs} "
                      f"launch={launch} M={tokens}: {t:.4f} ms", file=sys.stderr)  # fmt: skip
            if best is None or t < best[0]:
                best = (t, plan, launch)
    if best is None or not math.isfinite(best[0]):
        raise RuntimeError("no tile configuration could be compiled and run for this mask")
    _, plan, first = best
    other_m = TUNE_M[0] if small_first else TUNE_M[1]
    others = [lc for lc in (LARGE_LAUNCH if small_first else SMALL_LAUNCH) if _fits(plan, lc)]
    second = min(others, key=lambda launch: timer(plan, other_m, launch))
    large, small = (second, first) if small_first else (first, second)
    return LinearConfig(
        plan.bn, plan.bk, plan.clustered, *large[1:], large[0], *small[1:], small[0]
    )


def token_class(tokens: int | None) -> int:
    """The token count a sweep measures for a caller expecting ``tokens`` rows of x."""
    if tokens is None:
        return TUNE_M[0]
    return min(TUNE_M[0], max(64, 1 << max(0, int(tokens) - 1).bit_length()))


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
    tokens: int = TUNE_M[0],
) -> LinearConfig:
    """The cached config of this mask; on a miss, the cached or freshly measured class one.

    ``tokens`` (a :func:`token_class`) must be part of ``mask_key``.
    """

    def per_class() -> LinearConfig:
        plans = candidate_plans(mask)
        sig = _class_signature(plans, mask)
        key = cache_key("triton-linear-tune", *class_parts, tokens, sig)
        return _json_entry(key, lambda: sweep(plans, timer_for(), tokens))

    return _json_entry(mask_key, per_class)


def time_ms(fn: Callable[[], object]) -> float:
    """Median time of ``fn`` in ms (CUDA events through triton's do_bench)."""
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=3, rep=12, return_mode="median"))
    except Exception:  # a config that does not compile or fit (out of shared memory)
        return float("inf")
