"""Latency measurement used by the planner and the report (never FLOPs).

Two timers, chosen by the runtime that will run the graph (``sparta/runtime.py``):

- host (eager runtime, and every CPU timing): calls back to back, the median per-call time as
  an eager caller sees it, Python and launch overhead included. A kernel whose host launch cost
  exceeds its device time is charged that cost, as an eager caller pays it.
- device (Inductor / CUDA-graph runtimes on CUDA): the call is captured ``reps`` times into one
  CUDA graph and the graph is replayed between two CUDA events; the median per call is device
  time with no launch gaps, on warm caches (L2 holds the operands as it does when the same
  layer runs in a model). That is what such a runtime pays: Inductor's launcher and graph
  replays keep the host off the critical path.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch


def measure_ms(
    fn: Callable[[], object],
    device: torch.device,
    *,
    device_time: bool = False,
    budget_ms: float = 60.0,
    min_reps: int = 5,
    max_reps: int = 200,
) -> float:
    """Median latency of ``fn()`` in milliseconds after warm-up (see the module docstring).

    ``device_time`` selects the device timer on CUDA (ignored on the CPU). A call that cannot
    be captured in a CUDA graph is timed on the host instead, with a warning.
    """
    if device.type == "cuda":
        if device_time:
            try:
                return device_ms(fn, device, budget_ms=budget_ms, min_reps=min_reps)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:
                warnings.warn(
                    f"sparta: a candidate could not be captured in a CUDA graph ({e}); timed on "
                    f"the host instead",
                    stacklevel=2,
                )
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


def _warm_up(fn: Callable[[], object], device: torch.device, calls: int = 3) -> float:
    """Run ``fn`` (first-call builds, allocator) on a side stream; return one call's ms."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return max((time.perf_counter() - t0) * 1e3, 1e-3)


def device_ms(
    fn: Callable[[], object], device: torch.device, *, budget_ms: float = 60.0, min_reps: int = 5
) -> float:
    """Device time of one ``fn()`` call in ms: CUDA-graph replays between events (median).

    Raises RuntimeError when ``fn`` cannot be captured (host syncs, CPU tensors...).
    """
    with torch.no_grad(), torch.cuda.device(device):
        one_ms = _warm_up(fn, device)
        reps = max(1, min(50, int(1.0 / one_ms)))  # about a millisecond of work per replay
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    fn()
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - report any capture failure the same way
            raise RuntimeError(f"{type(e).__name__}: {e}") from e
        graph.replay()
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        replay_ms = max(begin.elapsed_time(end), 1e-3)
        rounds = int(max(min_reps, min(100, budget_ms / replay_ms)))
        samples = []
        for _ in range(rounds):
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / reps)
        del graph
    return statistics.median(samples)


def _cuda_eager_ms(
    fn: Callable[[], object], device: torch.device, *, budget_ms: float, min_reps: int
) -> float:
    with torch.no_grad(), torch.cuda.device(device):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        one_ms = _warm_up(fn, device)
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


def _cuda_candidate_ms(
    name: str, fn: Callable[[], object], device: torch.device, device_time: bool, budget_ms: float
) -> float:
    """One candidate's time; a candidate other than ``"dense"`` that runs out of device memory
    is dropped (``inf``, with a warning) instead of failing the compile."""
    try:
        return measure_ms(fn, device, device_time=device_time, budget_ms=budget_ms)
    except torch.OutOfMemoryError as e:
        if name == "dense":
            raise
        torch.cuda.empty_cache()
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        warnings.warn(
            f"sparta: candidate {name!r} ran out of device memory while being timed and is "
            f"dropped ({first})",
            stacklevel=3,
        )
        return float("inf")


def compare_ms(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    device_time: bool = False,
    budget_ms: float = 120.0,
    max_reps: int = 100,
) -> dict[str, float]:
    """Median latency of each candidate. On the CPU they are measured round-robin so that
    background load affects all candidates alike."""
    if device.type == "cuda":
        each = budget_ms / max(len(fns), 1)
        return {k: _cuda_candidate_ms(k, f, device, device_time, each) for k, f in fns.items()}
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
