"""Propagation time and peak memory against depth and width, for a Llama-style model.

``python bench/bench_propagation_scale.py [--grid 2x256,4x512,...] [--tokens 64]
[--dtype float32|bfloat16] [--vocab 1000] [--out FILE]``

Each point runs in a fresh process (its own peak RSS): transformers' ``LlamaModel`` (random
weights, SwiGLU FFN of 2.75x the width), half of every FFN's units pruned
(gate and up rows) and a quarter of every layer's heads (columns of ``o_proj``), batch 1 x
``--tokens``. Times (s): torch.export with the recorded example values (``trace``), the engine
(``propagate_graph``) and the report (``build_report``, pattern detection included); the
engine per layer is the figure the issue targets (< 0.1 s at 16 x 1024). Weights are built on
the meta device and filled by tiling one random block (``init_s``, not part of propagation), so
that a 7B point (``--grid 32x4096 --dtype bfloat16 --vocab 32000``) does not spend minutes in
random number generation.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _fill(model, gen) -> None:
    """Random-looking weights at memcpy speed: one random block tiled over every parameter;
    norm weights 1; rotary buffers recomputed (``to_empty`` leaves them uninitialised)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    block = torch.randn(1 << 20, generator=gen) * 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                part = flat[start : start + block.numel()]
                part.copy_(block[: part.numel()])
    model.rotary_emb = LlamaRotaryEmbedding(model.config)


def one(layers: int, width: int, tokens: int, dtype: str, vocab: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaModel

    from sparta.engine import propagate_graph
    from sparta.propagate import build_report, resolve_attrs
    from sparta.trace import trace

    torch.manual_seed(0)
    heads = max(1, width // 64)
    cfg = LlamaConfig(
        hidden_size=width,
        intermediate_size=int(width * 2.75) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max(128, tokens),
    )
    t_init = time.perf_counter()
    with torch.device("meta"):
        model = LlamaModel(cfg).to(getattr(torch, dtype)).eval()
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    _fill(model, gen)
    init_s = time.perf_counter() - t_init
    params = sum(p.numel() for p in model.parameters())
    attrs = {}
    for i, layer in enumerate(model.layers):
        ffn = layer.mlp.gate_proj.weight.shape[0]
        units = torch.rand(ffn, generator=gen) < 0.5
        for name in ("gate_proj", "up_proj"):
            attrs[f"layers.{i}.mlp.{name}.weight"] = units[:, None].expand(ffn, width).clone()
        d = width // heads
        cols = torch.ones(width, dtype=torch.bool)
        for h in torch.randperm(heads, generator=gen)[: heads // 4].tolist():
            cols[h * d : (h + 1) * d] = False
        attrs[f"layers.{i}.self_attn.o_proj.weight"] = cols[None, :].expand(width, width).clone()
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    kw = {"use_cache": False}
    t0 = time.perf_counter()
    traced = trace(model, (ids,), kw)
    t1 = time.perf_counter()
    given, given_nodes = resolve_attrs(traced, attrs)
    result = propagate_graph(traced, given_nodes)
    t2 = time.perf_counter()
    build_report(traced, given_nodes, result, t2 - t1, given)
    t3 = time.perf_counter()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "layers": layers,
        "width": width,
        "params_M": params / 1e6,
        "dtype": dtype,
        "init_s": init_s,
        "nodes": len(traced.gm.graph.nodes),
        "trace_s": t1 - t0,
        "engine_s": t2 - t1,
        "report_s": t3 - t2,
        "engine_per_layer_s": (t2 - t1) / layers,
        "peak_rss_MB": peak_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grid", default="2x256,4x256,8x256,2x512,2x1024,4x1024")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one:
        layers, width = map(int, args.one.split("x"))
        print(json.dumps(one(layers, width, args.tokens, args.dtype, args.vocab)))
        return
    rows = []
    for point in args.grid.split(","):
        cmd = [sys.executable, __file__, "--one", point, "--tokens", str(args.tokens),
               "--dtype", args.dtype, "--vocab", str(args.vocab)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{point}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    head = ["layers", "width", "params_M", "dtype", "nodes", "init_s", "trace_s", "engine_s",
            "engine_per_layer_s", "report_s", "peak_rss_MB"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r[h]:.3f}" if isinstance(r[h], float) else str(r[h]) for h in head]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
