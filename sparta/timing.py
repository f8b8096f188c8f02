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
    """Median latency of ``fn()`` in milliseconds after warm-up, as an eager caller sees it
    (``max_reps`` bounds the CPU samples; CUDA samples are rounds of back-to-back calls).

    On CUDA, calls run back to back between two events (median per-call time over rounds), so
    a call whose Python and launch overhead exceeds its kernel time is charged that overhead:
    the GPU waits for the host, as it does in an eager model. Timers that hide the host (an L2
    flush between calls, as triton's do_bench does) would let the planner pick launch-bound
    kernels that make the eager model slower.
    """
    if device.type == "cuda":
        return _cuda_eager_ms(fn, device, budget_ms=budget_ms, min_reps=min_reps)
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


def _cuda_eager_ms(
    fn: Callable[[], object], device: torch.device, *, budget_ms: float, min_reps: int
) -> float:
    with torch.no_grad(), torch.cuda.device(device):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):  # warm-up (first-call builds, allocator)
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        per_round = max(1, min(50, int(2.0 / one_ms)))  # rounds of >= ~2 ms
        rounds = int(max(min_reps, min(50, budget_ms / (per_round * one_ms))))
        samples = []
        for _ in range(rounds):
            begin.record()
            for _ in range(per_round):
                fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / per_round)
    return statistics.median(samples)


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
