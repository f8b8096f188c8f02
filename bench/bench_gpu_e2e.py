"""GPU, end to end through ``sparta.compile`` (the call a user makes), fp16, one run.

Cases: a single nn.Linear 4096x4096 (tokens 4096) with 32x32 block masks at 75/90/95% and a
2:4 mask; the demo TinyBert (pruned FFN units and heads); a fixed block-sparse attention
pattern. For each: what the planner picked, max error vs the masked dense model, dense and
compiled latency (calls back to back, median per call: host overhead included, as in an eager
loop), also with a captured CUDA graph.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn as nn
import triton

import sparta
from sparta import masked_model as masked_reference
from sparta.cuda_graphs import capture
from sparta.demo import TinyBert, demo_masks
from sparta.timing import measure_ms

DEV = torch.device("cuda")
DT = torch.float16


def ms(fn) -> float:
    """Eager latency as a user's loop sees it: calls back to back, host overhead included."""
    return measure_ms(fn, DEV, budget_ms=300)


def block_mask(n: int, k: int, block: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    blocks = torch.rand(n // block, k // block, generator=gen) >= sparsity
    return blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)


def nm_mask(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    scores = torch.rand(n, k // 4, 4, generator=gen)
    return (scores.argsort(-1).argsort(-1) >= 2).reshape(n, k)


class PatternAttention(nn.Module):
    def __init__(self, d: int, length: int, block: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        n = length // block
        blocks = torch.eye(n, dtype=torch.bool) | torch.eye(n, dtype=torch.bool).roll(1, 1)
        blocks[:, 0] = True
        self.register_buffer(
            "pattern", blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.pattern, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def row(name: str, model: nn.Module, attrs: dict, inputs: tuple, ref: nn.Module) -> list:
    compiled = sparta.compile(model, attrs, inputs)
    picked = sorted({n.impl for n in compiled.report.nodes if n.latency_ms is not None})
    with torch.no_grad():
        fresh = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)
        out, want = compiled(*fresh), ref(*fresh)
        err = ((out - want).abs().max() / want.abs().max()).item()
        dense = ms(lambda: ref(*inputs))
        comp = ms(lambda: compiled(*inputs))
        replay = compiled.capture_cuda_graph(*inputs)
        graphed = ms(lambda: replay(*inputs))
        dense_replay = capture(ref, *inputs)
        dense_graphed = ms(lambda: dense_replay(*inputs))
    return [
        name,
        ",".join(picked),
        f"{err:.1e}",
        f"{dense:.4f}",
        f"{comp:.4f}",
        f"{dense / comp:.2f}x",
        f"{dense / graphed:.2f}x",
        f"{dense_graphed / graphed:.2f}x",
    ]


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = []
    x = torch.randn(4096, 4096, device=DEV, dtype=DT)
    for label, mask in [
        ("linear 4096^3 32x32 @75%", block_mask(4096, 4096, 32, 0.75, gen)),
        ("linear 4096^3 32x32 @90%", block_mask(4096, 4096, 32, 0.90, gen)),
        ("linear 4096^3 32x32 @95%", block_mask(4096, 4096, 32, 0.95, gen)),
        ("linear 4096^3 2:4", nm_mask(4096, 4096, gen)),
    ]:
        lin = nn.Linear(4096, 4096).to(DEV, DT).eval()
        ref = masked_reference(lin, {"weight": mask})
        rows.append(row(label, lin, {"weight": mask}, (x,), ref))
    torch.manual_seed(0)
    bert = TinyBert(hidden=768, heads=12, ffn=3072, layers=4).to(DEV, DT).eval()
    attrs = demo_masks(bert, heads_pruned=6)
    ids = torch.randint(0, 1000, (8, 256), device=DEV)
    rows.append(
        row(
            "TinyBert-768x4 (FFN 25%, 6/12 heads)",
            bert,
            attrs,
            (ids,),
            masked_reference(bert, attrs),
        )
    )
    attn = PatternAttention(768, 2048, 64, 12).to(DEV, DT).eval()
    xa = torch.randn(4, 2048, 768, device=DEV, dtype=DT)
    rows.append(row("pattern attention L=2048 64x64", attn, {}, (xa,), attn))
    head = ["case", "picked", "rel err", "dense ms", "compiled ms", "speedup",
            "compiled graph vs dense eager", "both as CUDA graphs"]  # fmt: skip
    print(
        f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton "
        f"{triton.__version__}, fp16"
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
