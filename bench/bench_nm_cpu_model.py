"""CPU, fp32: a BERT-base-sized encoder with every linear pruned n:m, through ``sparta.compile``.

Four encoder layers (hidden 768, 12 heads, FFN 3072), batch 1 x 128 tokens; the six linears of
each layer (q, k, v, o, fc1, fc2) get magnitude n:m masks along K from ``sparta.sparsify`` with
``NM(n, m)``. The planner times dense and ``nm_cpu`` for every linear and keeps the faster; the
compiled model is timed against the masked dense model round-robin in one run. The weights of
the four layers (113 MB dense) do not fit the caches, so each layer starts cold, as in a real
model. Attention, layer norms and GELU stay dense, so the model speedup is below the per-layer
one.

    python bench/bench_nm_cpu_model.py [--threads 2] [--layers 4]
"""

from __future__ import annotations

import argparse
import collections
import platform
import time

import torch

import sparta
from sparta import masked_model as masked_reference
from sparta.demo import TinyBert
from sparta.sparsifiers import NM
from sparta.timing import compare_ms

PATTERNS = [(2, 4), (1, 4), (1, 10)]
LINEARS = ("q", "k", "v", "o", "fc1", "fc2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TinyBert(hidden=768, heads=12, ffn=3072, layers=args.layers).eval()
    ids = torch.randint(0, 1000, (1, args.tokens))
    print(
        f"# BERT-base-sized encoder, {args.layers} layers, 1 x {args.tokens} tokens, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    cols = "| n:m | dense ms | compiled ms | speedup | linears: impl (count) | compile s | err |"
    print(cols)
    print("|---|---|---|---|---|---|---|")
    for n, m in PATTERNS:
        spec = {f"layers.*.{name}.weight": NM(n, m) for name in LINEARS}
        attrs = sparta.sparsify(model, spec)
        start = time.perf_counter()
        compiled = sparta.compile(model, attrs, (ids,))
        seconds = time.perf_counter() - start
        masked = masked_reference(model, attrs)
        with torch.no_grad():
            err = (compiled(ids) - masked(ids)).abs().max().item()
            t = compare_ms(
                {"dense": lambda d=masked: d(ids), "compiled": lambda c=compiled: c(ids)},
                torch.device("cpu"),
                budget_ms=4000,
                max_reps=200,
            )
        linear_impls = collections.Counter(
            node.impl for node in compiled.report.nodes if node.latency_ms and node.impl
        )
        impls = ", ".join(f"{k} ({v})" for k, v in sorted(linear_impls.items()))
        print(
            f"| {n}:{m} | {t['dense']:.2f} | {t['compiled']:.2f} | "
            f"{t['dense'] / t['compiled']:.2f}x | {impls} | {seconds:.0f} | {err:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
