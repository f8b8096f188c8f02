"""The two nm_cpu kernel paths side by side: dense, perm and tile, fp32, 2 threads.

For each shape and pattern, fresh weights, masks, inputs and modules in every repetition;
within a repetition the three run round-robin. ``--cold`` runs another dense layer of the same
size before every timed call (as a model's previous layer would: the weights are no longer in
L2); without it the same calls run back to back (warm). Prints the speedup over dense of each
path, one column per repetition, so the spread between repetitions is visible.

    python bench/bench_nm_cpu_paths.py [--cold] [--reps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_nm_cpu import magnitude_nm_mask, time_interleaved

from sparta.codegen import nm_cpu

SHAPES = [(128, 768, 3072), (128, 3072, 768)]  # T, K, N
PATTERNS = [(2, 4), (1, 4), (1, 10)]


def speedups(
    shape: tuple[int, int, int], n: int, m: int, paths: list[str], cold: bool, budget_s: float
) -> dict[str, float]:
    """One repetition: fresh weight, mask, input and modules; speedup over dense per path."""
    tokens, k, n_out = shape
    isa = nm_cpu.detect_isa()
    weight, x = torch.randn(n_out, k) / k**0.5, torch.randn(tokens, k)
    mask = magnitude_nm_mask(weight, n, m)
    dense = torch.nn.Linear(k, n_out, bias=False)
    other = torch.nn.Linear(k, n_out)
    with torch.no_grad():
        dense.weight.copy_(weight * mask)
        fns: dict[str, Callable[[], object]] = {"dense": lambda: dense(x)}
        for p in paths:
            if p == "perm" and not nm_cpu.perm_eligible(n, m, isa):
                continue
            mod = nm_cpu.build_nm_linear(weight, mask, n=n, m=m, path=p)
            torch.testing.assert_close(mod(x), dense(x), rtol=1e-3, atol=1e-3)
            fns[p] = lambda md=mod: md(x)
        ms = time_interleaved(fns, budget_s, (lambda: other(x)) if cold else None)
    return {p: ms["dense"] / ms[p] for p in paths if p in ms}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of rounds per point")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isa = nm_cpu.detect_isa()
    paths = ["perm", "tile"] if isa == "avx512" else ["tile"]
    print(
        f"# nm_cpu paths, {'cold' if args.cold else 'warm'}, {args.threads} threads, {isa}, "
        f"torch {torch.__version__}; speedup over dense per repetition"
    )
    print("| T x K -> N | n:m | " + " | ".join(paths) + " |")
    print("|---|---|" + "---|" * len(paths))
    for tokens, k, n_out in SHAPES:
        for n, m in PATTERNS:
            ratios: dict[str, list[float]] = {p: [] for p in paths}
            for rep in range(args.reps):
                torch.manual_seed(rep)
                for p, r in speedups(
                    (tokens, k, n_out), n, m, paths, args.cold, args.budget
                ).items():
                    ratios[p].append(r)
            cells = [", ".join(f"{r:.2f}" for r in ratios[p]) or "-" for p in paths]
            row = f"| {tokens} x {k} -> {n_out} | {n}:{m} | " + " | ".join(cells) + " |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
