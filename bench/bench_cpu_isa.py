"""The CPU kernels at each vector ISA this CPU has, against dense, one linear layer, fp32.

For each shape and mask: ``sparse_cpu`` (any mask) and, for n:m masks, ``nm_cpu``, built for
every ISA the CPU runs (``avx512``, ``avx2``), timed interleaved (``bench_nm_cpu.time_interleaved``)
with the dense layer in eager and under ``torch.compile``. Prints ms and the speedup over the
best dense, and the floor ``2 * tokens * kept / dense GEMM rate`` (the kept multiply-adds at the
rate this process's dense GEMM reaches). Masks by magnitude: unstructured at a fraction kept, or
n:m per group of m inputs. Every module is checked against the masked dense layer first.

    python bench/bench_cpu_isa.py [--threads 2] [--budget 1.0]
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
from bench_cpu_deepsparse import gemm_rate
from bench_nm_cpu import magnitude_nm_mask, time_interleaved

from sparta.codegen import nm_cpu, sparse_cpu

SHAPES = [(128, 768, 3072), (128, 3072, 768), (1024, 768, 3072)]  # tokens, K, N
MASKS = ["10%", "30%", "50%", "1:4", "2:4"]  # kept fraction (unstructured) or n:m


def make_mask(weight: torch.Tensor, spec: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
    if ":" in spec:
        n, m = map(int, spec.split(":"))
        return magnitude_nm_mask(weight, n, m), (n, m)
    keep = float(spec.rstrip("%")) / 100
    threshold = weight.abs().flatten().kthvalue(int(weight.numel() * (1 - keep))).values
    return weight.abs() > threshold, None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def isas() -> list[str]:
    best = nm_cpu.ISAS.index(nm_cpu.detect_isa())
    return [i for i in ("avx512", "avx2") if nm_cpu.ISAS.index(i) >= best]


def row(shape: tuple[int, int, int], spec: str, budget_s: float, rate: float) -> str:
    tokens, k, n_out = shape
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(n_out, k, generator=gen), torch.randn(tokens, k, generator=gen)
    bias = torch.randn(n_out, generator=gen)
    mask, nm = make_mask(weight, spec)
    dense = torch.nn.Linear(k, n_out)
    with torch.no_grad():
        dense.weight.copy_(weight * mask)
        dense.bias.copy_(bias)
        compiled = torch.compile(dense)
        ref = dense(x)
        fns: dict[str, Callable[[], object]] = {"eager": lambda: dense(x)}
        fns["compile"] = lambda: compiled(x)
        for isa in isas():
            mods = {"sparse_cpu": sparse_cpu.build_sparse_linear(weight, mask, bias, isa=isa)}
            if nm is not None:
                mods["nm_cpu"] = nm_cpu.build_nm_linear(weight, mask, bias, n=nm[0], m=nm[1],
                                                        isa=isa)  # fmt: skip
            for family, mod in mods.items():
                torch.testing.assert_close(mod(x), ref, rtol=1e-3, atol=1e-3)
                fns[f"{family} {isa}"] = lambda md=mod: md(x)
        ms = time_interleaved(fns, budget_s)
    best = min(ms["eager"], ms["compile"])
    floor = 2 * tokens * int(mask.sum()) / rate * 1e3
    cells = " | ".join(
        f"{k} {v:.3f} ({best / v:.2f}x)" for k, v in ms.items() if k not in ("eager", "compile")
    )
    return (
        f"| {tokens}x{k}->{n_out} | {spec} | {ms['eager']:.3f} | {ms['compile']:.3f} | {cells} "
        f"| {floor:.3f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of rounds per point")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rate = gemm_rate(args.threads)
    print(
        f"# {cpu_name()}, {args.threads} threads, ISAs "
        f"{isas()}, torch {torch.__version__}, dense GEMM {rate / 1e9:.0f} GFLOP/s"
    )
    print("| tokens x K -> N | mask | dense eager ms | torch.compile ms | kernels ms "
          "(speedup over best dense) | floor ms |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        for spec in MASKS:
            print(row(shape, spec, args.budget, rate), flush=True)


if __name__ == "__main__":
    main()
