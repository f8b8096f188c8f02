"""Block-sparse kernels at the shapes of real models, with their epilogues, against the floor.

BERT-base (4096 tokens: 768->768, 768->3072 + GELU, 3072->768) and a Llama-style MLP (4096
tokens: gate and up 2048->8192 with the SwiGLU product, down 8192->2048), 90% 32x32 blocks,
fp16. Every point is device time (``sparta.timing.device_ms``: CUDA-graph replays, warm L2, no
host launch cost), dense = the same computation under ``torch.compile`` (cuBLAS + Inductor's
fused epilogue), beside the floor max(FLOPs/peak, bytes/bandwidth) with the peak and copy
bandwidth measured in the same run. Then the host cost of one kernel call per runtime (eager
op, Inductor, Inductor + CUDA graphs) and of dense ``F.linear``.

    python bench/bench_triton_model_shapes.py [--sparsity 0.9] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

DT = torch.float16


def ceilings(dev) -> tuple[float, float]:
    """(matrix FLOP/s, bytes/s) measured here: an 8192^3 fp16 product and a 1 GiB copy."""
    from sparta.timing import device_ms

    a = torch.randn(8192, 8192, dtype=DT, device=dev)
    b = torch.randn(8192, 8192, dtype=DT, device=dev)
    peak = 2 * 8192**3 / (device_ms(lambda: a @ b, dev) * 1e-3)
    src = torch.empty(2**29, dtype=DT, device=dev).normal_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (device_ms(lambda: dst.copy_(src), dev) * 1e-3)
    return peak, bw


def block_mask(n: int, k: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    nb, kb = n // 32, k // 32
    keep = torch.zeros(nb * kb, dtype=torch.bool)
    keep[torch.randperm(nb * kb, generator=gen)[: round((1 - sparsity) * nb * kb)]] = True
    return keep.view(nb, kb).repeat_interleave(32, 0).repeat_interleave(32, 1)


POINTS = (  # (label, M, N, K, epilogue)
    ("BERT qkv/out", 4096, 768, 768, None),
    ("BERT fc1+gelu", 4096, 3072, 768, "gelu"),
    ("BERT fc2", 4096, 768, 3072, None),
    ("Llama gate,up+swiglu", 4096, 8192, 2048, "swiglu"),
    ("Llama down", 4096, 2048, 8192, None),
)


def point(label, m, n, k, epi, sparsity, peak, bw, dev, gen) -> str:
    from sparta.codegen import triton_gen as tg
    from sparta.codegen.triton_swiglu import build_block_sparse_swiglu
    from sparta.timing import device_ms

    x = torch.randn(m, k, dtype=DT, device=dev)
    w = torch.randn(n, k, dtype=DT, device=dev) / k**0.5
    mask = block_mask(n, k, sparsity, gen).to(dev)
    b = torch.randn(n, dtype=DT, device=dev) if epi != "swiglu" else None
    wm = w * mask
    t0 = time.perf_counter()
    if epi == "swiglu":
        wu = torch.randn(n, k, dtype=DT, device=dev) / k**0.5
        mu = block_mask(n, k, sparsity, gen).to(dev)
        wum = wu * mu
        mod = build_block_sparse_swiglu(w, mask, None, wu, mu, None, tokens=m)
        g = tg.build_block_sparse_linear(w, mask, None, "silu", tokens=m).op_call()
        u = tg.build_block_sparse_linear(wu, mu, None, None, tokens=m).op_call()

        def dense(x):
            return F.silu(F.linear(x, wm)) * F.linear(x, wum)

        def unfused(x):
            return g(x) * u(x)

        want = dense(x)
        mats, outs = 2, 1
    else:
        mod = tg.build_block_sparse_linear(w, mask, b, epi, tokens=m)

        def dense(x):
            y = F.linear(x, wm, b)
            return F.gelu(y) if epi == "gelu" else y

        unfused = None
        want = dense(x)
        mats, outs = 1, 1
    build_s = time.perf_counter() - t0
    call = mod.op_call()
    got = call(x)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    dense_c = torch.compile(dense)
    dense_ms = device_ms(lambda: dense_c(x), dev)
    ours_ms = device_ms(lambda: call(x), dev)
    unfused_ms = float("nan")
    if unfused is not None:
        unfused_c = torch.compile(unfused)
        unfused_ms = device_ms(lambda: unfused_c(x), dev)
    dens = 1 - sparsity
    flops = 2 * m * n * k * dens * mats
    bytes_ = 2 * (m * k + mats * n * k * dens + outs * m * n)
    floor_ms = max(flops / peak, bytes_ / bw) * 1e3
    c = mod.config
    swap, bm, warps, stages = c.launch(m)
    tile = f"{c.bn}x{c.bk}{'T' if swap else ''} m{bm}w{warps}s{stages}"
    return (
        f"| {label} | {m},{n},{k} | {epi or '-'} | {dense_ms:.4f} | {ours_ms:.4f} "
        f"| **{dense_ms / ours_ms:.2f}x** | {unfused_ms:.4f} | {floor_ms:.4f} "
        f"| {dense_ms / floor_ms:.1f}x | {floor_ms / ours_ms:.0%} | {err:.1e} | {tile} "
        f"| {build_s:.1f} |"
    )


def host_costs(dev) -> list[str]:
    """Host us per call without syncing (the launch path) and device us, per runtime."""
    from sparta.codegen import triton_gen as tg
    from sparta.timing import device_ms

    gen = torch.Generator().manual_seed(1)
    m, n, k = 256, 4096, 4096
    w = torch.randn(n, k, dtype=DT, device=dev)
    mask = block_mask(n, k, 0.9, gen).to(dev)
    wm = w * mask
    call = tg.build_block_sparse_linear(w, mask, tokens=m).op_call()
    x = torch.randn(m, k, dtype=DT, device=dev)
    paths = {
        "F.linear (dense, eager)": lambda x: F.linear(x, wm),
        "sparta op, eager (triton_op -> kernel[grid])": lambda x: call(x),
        "sparta op, torch.compile (Inductor launcher)": torch.compile(lambda x: call(x)),
        "sparta op, torch.compile reduce-overhead": torch.compile(
            lambda x: call(x), mode="reduce-overhead"
        ),
    }
    rows = ["| call path (256x4096x4096, 90%, 32x32) | host us/call | device us |", "|---|---|---|"]
    for name, f in paths.items():
        for _ in range(5):
            f(x)
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for _ in range(1000):
            f(x)
        host = (time.perf_counter() - t) / 1000 * 1e6
        torch.cuda.synchronize(dev)
        dev_us = device_ms(lambda f=f: f(x), dev) * 1e3 if "reduce" not in name else float("nan")
        rows.append(f"| {name} | {host:.1f} | {dev_us:.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--md", default="")
    args = ap.parse_args()
    import triton

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    peak, bw = ceilings(dev)
    head = (f"device: {torch.cuda.get_device_name()} | date: {time.strftime('%Y-%m-%d')} | torch "
            f"{torch.__version__} | triton {triton.__version__} | measured peak "
            f"{peak / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s | {args.sparsity:.0%} 32x32 "
            f"blocks, fp16, device time")  # fmt: skip
    print(head, flush=True)
    rows = ["| point | M,N,K | epilogue | dense (Inductor) ms | sparta ms | speedup | unfused "
            "sparta ms | floor ms | floor speedup | of floor | rel err | tile | build s |",
            "|" + "---|" * 13]  # fmt: skip
    for label, m, n, k, epi in POINTS:
        try:
            rows.append(point(label, m, n, k, epi, args.sparsity, peak, bw, dev, gen))
        except Exception as e:  # noqa: BLE001 - one point's failure is reported
            rows.append(f"| {label} | {m},{n},{k} | {epi} | FAILED: {type(e).__name__}: {e} |")
        print(rows[-1], flush=True)
    try:
        host = host_costs(dev)
    except Exception as e:  # noqa: BLE001
        host = [f"host costs FAILED: {type(e).__name__}: {e}"]
    text = "\n".join([head, "", *rows, "", *host])
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    main()
