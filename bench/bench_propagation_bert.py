"""Propagation time for a 12-layer BERT-base (transformers, random weights, seq 128).

Masks: 50% of every FFN's units and 4 of 12 heads per layer pruned. Reports export time,
propagation time (the fixpoint only), sweeps and rule calls, and the density it exposed.
"""

from __future__ import annotations

import time

import torch
from transformers import BertConfig, BertModel

import sparta
from sparta.propagate import run_propagation


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()  # BERT-base: 12 layers, hidden 768, 12 heads
    ids = torch.randint(0, 30522, (1, 128))
    gen = torch.Generator().manual_seed(0)
    attrs = {}
    for i in range(12):
        pre = f"encoder.layer.{i}."
        units = torch.rand(3072, generator=gen) < 0.5
        attrs[pre + "intermediate.dense.weight"] = units[:, None].expand(3072, 768).clone()
        attrs[pre + "intermediate.dense.bias"] = units.clone()
        cols = torch.ones(768, dtype=torch.bool)
        for h in torch.randperm(12, generator=gen)[:4].tolist():
            cols[h * 64 : (h + 1) * 64] = False
        attrs[pre + "attention.output.dense.weight"] = cols[None].expand(768, 768).clone()
    start = time.perf_counter()
    p = run_propagation(model, attrs, (ids,))
    total = time.perf_counter() - start
    r = p.report
    given, after = r.weight_density()
    nodes = len(p.traced.gm.graph.nodes)
    print(
        f"# BERT-base propagation, torch {torch.__version__}, sparta {sparta.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        "| graph nodes | trace+record s | propagation s | sweeps | rule calls | weights kept "
        "given -> propagated |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {nodes} | {total - r.propagation_s:.2f} | {r.propagation_s:.2f} | {r.sweeps} | "
        f"{p.result.rule_calls} | {given:.1%} -> {after:.1%} |"
    )


if __name__ == "__main__":
    main()
