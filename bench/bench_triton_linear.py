"""Benchmark: mask-specialised Triton linear vs dense cuBLAS, torch BSR and torch 2:4 (fp16).

One run prints, last, a table of speedups over dense (timed through the call a user makes,
median of triton.testing.do_bench), the floor max(FLOPs/peak, bytes/bandwidth) of each point
(ceilings measured in the same run), the wrapper's Python overhead with and without CUDA-graph
capture, and the compile time of BERT-base's 72 weight matrices (cold and warm caches).

    PYTHONPATH=. python bench/bench_triton_linear.py [--shapes 4096,4096,4096] [--md out.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from sparta.codegen import triton_gen as tg

SHAPES = ((4096, 4096, 4096), (8192, 3072, 768), (8192, 768, 3072), (256, 4096, 4096))
SPARSITIES = (0.5, 0.75, 0.9, 0.95)
DT = torch.float16


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def ceilings() -> tuple[float, float]:
    """(matrix FLOP/s, bytes/s) measured here: an 8192^3 fp16 product and a 1 GiB copy."""
    a = torch.randn(8192, 8192, dtype=DT, device="cuda")
    b = torch.randn(8192, 8192, dtype=DT, device="cuda")
    peak = 2 * 8192**3 / (bench(lambda: a @ b) * 1e-3)
    src = torch.empty(2**29, dtype=DT, device="cuda").normal_()
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 2 / (bench(lambda: dst.copy_(src)) * 1e-3)
    return peak, bw


def block_mask(n: int, k: int, sparsity: float, block: int) -> torch.Tensor:
    """Exactly round((1-s) * blocks) kept (block x block) blocks, at random."""
    nb, kb = -(-n // block), -(-k // block)
    keep = torch.zeros(nb * kb, dtype=torch.bool)
    keep[torch.randperm(nb * kb)[: round((1 - sparsity) * nb * kb)]] = True
    m = keep.view(nb, kb).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return m[:n, :k].contiguous().cuda()


def two_four(w: torch.Tensor) -> torch.Tensor:
    """2:4 mask along K keeping the two largest magnitudes of every four."""
    g = w.abs().view(w.shape[0], -1, 4)
    idx = g.topk(2, dim=-1).indices
    return torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True).view_as(w)


def time_bsr(x, wm, block) -> float | str:
    try:
        wb = wm.to_sparse_bsr((block, block))
        F.linear(x, wb)
        return bench(lambda: F.linear(x, wb))
    except Exception as e:  # noqa: BLE001 - report, do not hide
        return f"unsupported ({type(e).__name__})"


def time_24(x, w) -> float | str:
    try:
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(w * two_four(w))
        F.linear(x, ws)
        return bench(lambda: F.linear(x, ws))
    except Exception as e:  # noqa: BLE001
        return f"unsupported ({type(e).__name__})"


def point(shape, sparsity, block, peak, bw) -> dict:
    m, n, k = shape
    w = torch.randn(n, k, dtype=DT, device="cuda") / k**0.5
    mask = (
        block_mask(n, k, sparsity, block)
        if block
        else (torch.rand(n, k, device="cuda") >= sparsity)
    )
    wm = w * mask
    x = torch.randn(m, k, dtype=DT, device="cuda")
    dense = bench(lambda: F.linear(x, wm))
    t0 = time.perf_counter()
    mod = tg.build_block_sparse_linear(w, mask, None, None, node=f"bench.{m}x{n}x{k}", tokens=m)
    build_s = time.perf_counter() - t0
    with torch.no_grad():
        y = mod(x)
    ref = F.linear(x.float(), wm.float())
    err = float((y.float() - ref).norm() / ref.norm())
    ours = bench(lambda: mod(x))
    bsr = time_bsr(x, wm, block or 32)
    dens = 1 - sparsity
    floor_ms = max(2 * m * n * k * dens / peak, 2 * (m * k + n * k * dens + m * n) / bw) * 1e3
    c = mod.config
    swap, bm, warps, stages = c.launch(m)
    tile = f"{c.bn}x{c.bk}{'T' if swap else ''} m{bm}w{warps}s{stages}"
    # bytes the kernel moves from L2 into the SMs: every listed slab and its x tile, per m-tile
    l2_bytes = mod.n_slabs * (bm + c.bn) * c.bk * x.element_size() * -(-m // bm)
    return dict(shape=shape, s=sparsity, block=block, dense=dense, ours=ours, bsr=bsr, err=err,
                floor=floor_ms, build=build_s, tile=tile, stored=mod.kept_fraction,
                l2=l2_bytes / (ours * 1e-3) / 1e12)  # fmt: skip


def fmt_speed(dense: float, t: float | str) -> str:
    return f"{dense / t:.2f}x" if isinstance(t, float) else t


def overhead(shape=(256, 4096, 4096), sparsity=0.9) -> list[str]:
    """Host time per call (no sync) and graph-replayed vs eager device time."""
    m, n, k = shape
    w = torch.randn(n, k, dtype=DT, device="cuda")
    mask = block_mask(n, k, sparsity, 32)
    mod = tg.build_block_sparse_linear(w, mask, tokens=m)
    x = torch.randn(m, k, dtype=DT, device="cuda")
    wm = w * mask

    def host_us(fn, reps=2000) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = (time.perf_counter() - t) / reps * 1e6
        torch.cuda.synchronize()
        return dt

    call = mod.op_call()
    graphed = torch.compile(lambda x: call(x), mode="reduce-overhead")
    for _ in range(3):
        graphed(x)
    assert torch.allclose(graphed(x), mod(x))
    calls = [
        ("F.linear (dense)", lambda: F.linear(x, wm)),
        ("sparta module forward", lambda: mod(x)),
        ("sparta op, torch.compile reduce-overhead", lambda: graphed(x)),
    ]
    return [f"| {name} | {host_us(fn):.1f} | {bench(fn) * 1e3:.1f} |" for name, fn in calls]


BERT_CHILD = r"""
import time, torch
t = time.perf_counter()
from sparta.codegen import triton_gen as tg
g = torch.Generator().manual_seed(0)
shapes = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]
mods = []
for layer in range(12):
    for n, k in shapes:
        keep = torch.rand(n // 32, k // 32, generator=g) >= 0.9
        mask = keep.repeat_interleave(32, 0).repeat_interleave(32, 1).cuda()
        w = torch.randn(n, k, generator=g).half().cuda()
        b = torch.randn(n, generator=g).half().cuda()
        mods.append(tg.build_block_sparse_linear(w, mask, b, node=f"layer{layer}"))
x = torch.randn(128, 768, dtype=torch.float16, device="cuda")
for mod in mods:
    if mod.in_features == 768:
        mod(x)
torch.cuda.synchronize()
print(f"BUILD_S {time.perf_counter() - t:.2f} {len(mods)}")
"""


def bert_compile() -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, SPARTA_CACHE_DIR=f"{d}/sparta", TRITON_CACHE_DIR=f"{d}/triton")
        out = []
        for _ in range(2):
            r = subprocess.run([sys.executable, "-c", BERT_CHILD], env=env, capture_output=True,
                               text=True, cwd=d)  # fmt: skip
            if r.returncode:
                raise RuntimeError(f"BERT compile child failed:\n{r.stderr[-3000:]}")
            out.append(float(r.stdout.split("BUILD_S")[1].split()[0]))
        return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=";".join(",".join(map(str, s)) for s in SHAPES))
    ap.add_argument("--md", default="")
    ap.add_argument("--no-bert", action="store_true")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    torch.manual_seed(0)
    peak, bw = ceilings()
    head = (f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | "
            f"triton {triton.__version__} | measured peak {peak / 1e12:.0f} TFLOP/s, "
            f"copy {bw / 1e12:.2f} TB/s")  # fmt: skip
    print(head, flush=True)
    rows = ["| M,N,K | mask | sparsity | dense ms | sparta ms | sparta | torch BSR | torch 2:4 "
            "| floor | rel err | tile | stored | L2 TB/s | build s |",
            "|" + "---|" * 14]  # fmt: skip
    for shape in shapes:
        x24 = torch.randn(shape[0], shape[2], dtype=DT, device="cuda")
        w24 = torch.randn(shape[1], shape[2], dtype=DT, device="cuda")
        t24 = time_24(x24, w24)
        wm24 = w24 * two_four(w24)  # the dense baseline times the masked weight, not the masking
        d24 = bench(lambda x24=x24, wm24=wm24: F.linear(x24, wm24))
        for block in (32, 64, 0):
            for s in SPARSITIES if block else (0.9, 0.95):
                p = point(shape, s, block, peak, bw)
                kind = f"{block}x{block}" if block else "unstructured"
                r = (f"| {','.join(map(str, shape))} | {kind} | {s:.0%} | {p['dense']:.4f} "
                     f"| {p['ours']:.4f} | **{p['dense'] / p['ours']:.2f}x** "
                     f"| {fmt_speed(p['dense'], p['bsr'])} "
                     f"| {fmt_speed(d24, t24) if s == 0.5 else ''} "
                     f"| {p['dense'] / p['floor']:.1f}x | {p['err']:.1e} | {p['tile']} "
                     f"| {p['stored']:.3f} | {p['l2']:.1f} | {p['build']:.1f} |")  # fmt: skip
                print(r, flush=True)
                rows.append(r)
    ov = ["| call path (256x4096x4096, 90%, 32x32) | host us/call | device us (do_bench) |",
          "|---|---|---|", *overhead()]  # fmt: skip
    bert = ""
    if not args.no_bert:
        cold, warm = bert_compile()
        bert = f"BERT-base 72 matrices, 90% 32x32 (+tuning): cold {cold:.1f} s, warm {warm:.1f} s"
    text = "\n".join([head, "", *rows, "", *ov, "", bert])
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
