"""``python -m sparta.demo``: a small BERT-like encoder with pruned FFN units and heads.

Prints the propagation report, the plan with the reason for each choice, and ``sparta.measure``'s
table (latency dense vs compiled per node beside FLOPs, and the whole forward); writes the report
as JSON, a density plot, the FLOPs-vs-latency plot and the saved plan to ``--out`` (default
``out/``), and loads the plan back. Runs on whatever device is present. No downloads.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class EncoderLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.o = nn.Linear(hidden, hidden)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        a = F.scaled_dot_product_attention(q, k, v)
        b, _, s, _ = a.shape
        x = self.ln1(x + self.o(a.transpose(1, 2).reshape(b, s, -1)))
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))


class TinyBert(nn.Module):
    """The built-in default model: token + position embeddings and a stack of encoder layers."""

    def __init__(
        self,
        vocab: int = 1000,
        hidden: int = 256,
        heads: int = 8,
        ffn: int = 1024,
        layers: int = 4,
        max_len: int = 512,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_len, hidden)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)
        for layer in self.layers:
            x = layer(x)
        return x


def demo_masks(
    model: TinyBert, ffn_kept: float = 0.25, heads_pruned: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Prune 75% of every FFN's units (fc1 rows and bias) and half the heads (columns of
    the output projection); propagation finds the rest."""
    gen = torch.Generator().manual_seed(seed)
    attrs: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.layers):
        ffn, hidden = layer.fc1.weight.shape
        units = torch.rand(ffn, generator=gen) < ffn_kept
        attrs[f"layers.{i}.fc1.weight"] = units[:, None].expand(ffn, hidden).clone()
        attrs[f"layers.{i}.fc1.bias"] = units.clone()
        d = hidden // layer.heads
        cols = torch.ones(hidden, dtype=torch.bool)
        for h in torch.randperm(layer.heads, generator=gen)[:heads_pruned].tolist():
            cols[h * d : (h + 1) * d] = False
        attrs[f"layers.{i}.o.weight"] = cols[None, :].expand(hidden, hidden).clone()
    return attrs


def main(argv: list[str] | None = None) -> None:
    import sparta

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="out")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = TinyBert().eval().to(dev)
    ids = torch.randint(0, 1000, (args.batch, args.seq), device=dev)
    attrs = demo_masks(model)

    start = time.perf_counter()
    compiled = sparta.compile(model, attrs, (ids,))
    seconds = time.perf_counter() - start
    print(compiled.report)
    print("\nplan (why each node runs as it does):")
    for n in compiled.report.nodes:
        if n.reason:
            print(f"  {n.name}: {n.impl} - {n.reason}")
    measured = sparta.measure(compiled, (ids,))
    print(measured)
    with torch.no_grad():
        ref = sparta.masked_model(model, attrs)(ids)
        err = (compiled(ids) - ref).abs().max().item()
        other = torch.randint(0, 1000, (3, 50), device=dev)
        err_other = (compiled(other) - sparta.masked_model(model, attrs)(other)).abs().max().item()
    os.makedirs(args.out, exist_ok=True)
    compiled.report.to_json(os.path.join(args.out, "report.json"))
    try:
        compiled.report.plot(os.path.join(args.out, "density.png"))
        plotted = f" and {args.out}/density.png"
    except ImportError:
        plotted = " (install matplotlib for the density plot)"
    try:
        measured.plot(os.path.join(args.out, "measure.png"))
        plotted += f", {args.out}/measure.png"
    except ImportError:
        pass
    plan_path = os.path.join(args.out, "plan.sparta")
    compiled.save(plan_path)
    start = time.perf_counter()
    loaded = sparta.load(plan_path, model)
    load_s = time.perf_counter() - start
    with torch.no_grad():
        err_loaded = (loaded(other) - compiled(other)).abs().max().item()
    print(
        f"compiled in {seconds:.1f} s on {dev}; max |compiled - masked dense| = {err:.2e} "
        f"(batch {args.batch}x{args.seq}), {err_other:.2e} (another shape, 3x50)"
    )
    print(
        f"saved the plan to {plan_path}; loaded in {load_s:.2f} s "
        f"(max |loaded - compiled| = {err_loaded:.2e})"
    )
    print(f"wrote {args.out}/report.json{plotted}")


if __name__ == "__main__":
    main()
