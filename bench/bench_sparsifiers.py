"""Time every sparsifier on BERT-large weight shapes (random data) and print a Markdown table.

    python bench/bench_sparsifiers.py [--layers 24] [--threads 1] [--out FILE]

Per layer BERT-large has four (1024, 1024) attention projections, the (4096, 1024)
intermediate and the (1024, 4096) output weight: 12.6M parameters, 302M over 24 layers.
Each sparsifier runs once over all of them through ``sparta.sparsify`` (one glob per shape, so
the per-shape time is measured too); GlobalMagnitude ranks all 144 tensors at once. One
thread by default: the machines these numbers come from are shared, and one thread is steadier.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch
from torch import nn

import sparta
from sparta import sparsifiers as S

SHAPES = {"attn (1024x1024) x4": (1024, 1024), "inter (4096x1024)": (4096, 1024),
          "out (1024x4096)": (1024, 4096)}  # fmt: skip
GLOBS = {
    "attn (1024x1024) x4": "*.attn*",
    "inter (4096x1024)": "*.inter",
    "out (1024x4096)": "*.out",
}

SPARSIFIERS: list[S.Sparsifier] = [
    S.Magnitude(0.9),
    S.GlobalMagnitude(0.9),
    S.BlockMagnitude((32, 32), 0.9),
    S.NM(2, 4),
    S.GroupedNM(2, 4, 8),
    S.GroupedNM(2, 4, 16),
    S.GroupedNM(4, 8, 8),
    S.Threshold(1.5),
    S.RandomFraction(0.9, seed=0),
    S.Channels(0.5),
    S.Heads(16, 0.5, dim=1),
]


class Layer(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        for name in ("attn_q", "attn_k", "attn_v", "attn_o"):
            setattr(self, name, nn.Parameter(torch.randn(1024, 1024, generator=gen)))
        self.inter = nn.Parameter(torch.randn(4096, 1024, generator=gen))
        self.out = nn.Parameter(torch.randn(1024, 4096, generator=gen))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the Markdown report to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = nn.ModuleList(Layer(gen) for _ in range(args.layers)).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())

    head = [
        "# Sparsifier timings on BERT-large weight shapes",
        "",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"sparta {sparta.__version__}",
        f"- CPU: {_cpu_name()} ({os.cpu_count()} cores), torch threads: {args.threads}; "
        f"load average at start: {os.getloadavg()[0]:.1f} (shared machine)",
        f"- {args.layers} layers, {n_params / 1e6:.0f}M fp32 parameters of random N(0, 1) data; "
        f"each cell is one run through `sparta.sparsify` (seconds for the whole model, "
        f"milliseconds per tensor for the shape columns)",
        "",
        "| sparsifier | whole model s | " + " | ".join(f"{k} ms" for k in SHAPES) + " | density |",
        "|---|---|" + "---|" * len(SHAPES) + "---|",
    ]
    print("\n".join(head), flush=True)
    rows = []
    for sp in SPARSIFIERS:
        per_shape: dict[str, float] = {}
        kept = 0
        start = time.perf_counter()
        if isinstance(sp, S.GlobalMagnitude):
            masks = sparta.sparsify(model, {"*": sp})
            kept += sum(int(m.sum()) for m in masks.values())
        else:
            for label, glob in GLOBS.items():
                t0 = time.perf_counter()
                masks = sparta.sparsify(model, {glob: sp})
                per_shape[label] = (time.perf_counter() - t0) * 1e3 / len(masks)
                kept += sum(int(m.sum()) for m in masks.values())
                del masks
        total = time.perf_counter() - start
        cells = [f"{per_shape[k]:.0f}" if k in per_shape else "-" for k in SHAPES]
        row = f"| `{sp!r}` | {total:.1f} | " + " | ".join(cells) + f" | {kept / n_params:.3f} |"
        rows.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(head + rows) + "\n")


if __name__ == "__main__":
    main()
