"""Latency measurement used by the planner and the report (never FLOPs)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def measure_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    budget_ms: float = 60.0,
    min_reps: int = 5,
    max_reps: int = 200,
) -> float:
    """Median latency of ``fn()`` in milliseconds after warm-up."""
    if device.type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(
                fn, warmup=10, rep=max(25, int(budget_ms)), return_mode="median"
            )
        )
    with torch.no_grad():
        fn()
        start = time.perf_counter()
        fn()
        one = max(time.perf_counter() - start, 1e-6)
        reps = int(min(max_reps, max(min_reps, budget_ms / 1e3 / one)))
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def compare_ms(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    budget_ms: float = 120.0,
    max_reps: int = 100,
) -> dict[str, float]:
    """Median latency of each candidate, measured round-robin so that background load
    affects all candidates alike."""
    if device.type == "cuda":
        return {
            k: measure_ms(f, device, budget_ms=budget_ms / max(len(fns), 1)) for k, f in fns.items()
        }
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()  # warm-up (and first-call builds)
        start = time.perf_counter()
        for f in fns.values():
            f()
        one_round = max(time.perf_counter() - start, 1e-6)
        reps = int(min(max_reps, max(5, budget_ms / 1e3 / one_round)))
        for _ in range(reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}
