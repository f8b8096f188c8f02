"""Mixed masks planned as a decomposition (two sparse kernels summed) vs each family alone.

One ``nn.Linear`` per case, compiled by ``sparta.compile`` with the families of a split
available; the planner times every candidate (dense, each family that applies alone, the
decomposition) on the node's input — those are the per-node columns — and picks the fastest.
The model-level columns time, interleaved in one run: the masked dense layer eager and under
``torch.compile`` (the best dense baseline a user has) and the compiled module, with its error
against the masked layer. ``floor`` = max(kept FLOPs / peak, bytes / bandwidth) with the peak
the rate of a large dense GEMM measured at the start of the run and the bytes those of the
kept weights (values and indices, ~6 B each) plus the input and output.

CPU cases (fp32): a 2:4 mask with 3% / 10% of the other weights kept too, and a 1:4 mask with
5% more, on BERT-base FFN shapes, at 1, 128 and 1024 tokens: ``nm_cpu+sparse_cpu`` vs
``sparse_cpu`` alone (``nm_cpu`` cannot run a mask that is not n:m).
GPU cases (fp16): a quarter of the 32x32 blocks kept whole plus 2% scattered weights on a
4096x4096 layer, at 512 and 4096 tokens: ``triton+cusparselt`` vs ``triton`` alone.

Usage: ``python bench/bench_decompose.py [--device cpu|cuda] [--rounds 15] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn

import sparta


def nm_plus_scattered(rows: int, cols: int, n: int, m: int, extra: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(rows, cols // m, m, generator=g).argsort(-1)[..., :n]
    nm = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, idx, True)
    return nm.reshape(rows, cols) | (torch.rand(rows, cols, generator=g) < extra)


def blocks_plus_scattered(rows: int, cols: int, kept: float, extra: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(rows // 32, cols // 32, generator=g) < kept
    dense = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)
    return dense | (torch.rand(rows, cols, generator=g) < extra)


def timed(fns: dict, rounds: int, sync) -> dict[str, float]:
    """Median ms per call of each function, measured round-robin."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def peak_flops(device: torch.device, dtype: torch.dtype, sync) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    ms = timed({"mm": lambda: a @ a}, 5, sync)["mm"]
    return 2 * n**3 / (ms / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    dtype = torch.float16 if gpu else torch.float32
    peak = peak_flops(dev, dtype, sync)
    bandwidth = 4.0e12 if gpu else 20e9  # B/s: H200 HBM3e nominal 4.8; a 2-core VM's DRAM share
    if gpu:
        cases = [("25% blocks + 2%", 4096, 4096, blocks_plus_scattered(4096, 4096, 0.25, 0.02))]
        tokens_list, backends = (512, 4096), ["dense", "triton", "cusparselt"]
    else:
        cases = [
            ("2:4 + 3%", 3072, 768, nm_plus_scattered(3072, 768, 2, 4, 0.03)),
            ("2:4 + 10%", 3072, 768, nm_plus_scattered(3072, 768, 2, 4, 0.10)),
            ("1:4 + 5%", 768, 3072, nm_plus_scattered(768, 3072, 1, 4, 0.05)),
        ]
        tokens_list, backends = (1, 128, 1024), ["dense", "nm_cpu", "sparse_cpu"]
    rows = []
    for label, out_f, in_f, mask in cases:
        torch.manual_seed(0)
        layer = nn.Linear(in_f, out_f).to(dev, dtype).eval()
        masked = nn.Linear(in_f, out_f).to(dev, dtype).eval()
        with torch.no_grad():
            masked.weight.copy_(layer.weight * mask.to(dev))
            masked.bias.copy_(layer.bias)
        for tokens in tokens_list:
            x = torch.randn(tokens, in_f, device=dev, dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = sparta.compile(
                    layer, {"weight": mask}, (x,), backends=backends, measure=False, mode="eager"
                )
                best_dense = torch.compile(masked)
                best_dense(x)
            (choice,) = compiled.plan.choices.values()
            fns = {"eager": masked, "compile": best_dense, "sparta": compiled}
            t = timed({k: (lambda f=f, x=x: f(x)) for k, f in fns.items()}, args.rounds, sync)
            with torch.no_grad():
                err = float((compiled(x).float() - masked(x).float()).abs().max())
            kept = int(mask.sum())
            flops = 2 * kept * tokens
            nbytes = 6 * kept + (in_f + out_f) * tokens * x.element_size()
            floor = max(flops / peak, nbytes / bandwidth) * 1e3
            per_node = ", ".join(f"{k} {v:.3f}" for k, v in sorted(choice.candidates.items()))
            best = min(t["eager"], t["compile"])
            rows.append(
                f"| {label} | {out_f}x{in_f} | {tokens} | {per_node} | {choice.impl} | "
                f"{t['eager']:.3f} | {t['compile']:.3f} | {t['sparta']:.3f} = "
                f"{best / t['sparta']:.2f}x | {floor:.3f} | {err:.1e} |"
            )
            print(rows[-1], flush=True)
    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    if gpu:
        import triton

        versions += f", triton {triton.__version__}, {torch.cuda.get_device_name()}"
    head = [
        f"# Decomposition of mixed masks, {dev.type}, {datetime.date.today()}",
        "",
        f"`{' '.join(sys.argv)}`; {versions}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads; dense GEMM peak measured {peak / 1e9:.0f} GFLOP/s.",
        "",
        "| mask | N x K | tokens | planner's per-node timings, ms | chosen | dense eager ms | "
        "torch.compile ms | sparta ms (vs best dense) | floor ms | max err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(head + rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
