"""CPU, fp32: the dense remainder of a 4-layer BERT-base-width encoder, eager vs Inductor, and the
CPU kernels' custom ops called eagerly vs inside an Inductor graph.

1. Remainder: the encoder of ``bench_cpu_deepsparse.py`` with every encoder linear replaced by
   a stand-in that does no arithmetic (768->768: the input itself; 768->3072: the input repeated
   4 times; 3072->768: its first 768 features), so what is timed is embeddings, attention
   (SDPA), layer norms, GELU, residual adds and the reshapes: torch eager vs ``torch.compile``.
2. Ops: a ``sparse_cpu`` layer (768->3072, 90% pruned, fused GELU) and an ``nm_cpu`` layer
   (768->768, 1:4), each called eagerly and inside ``torch.compile(fullgraph=True)`` with a
   residual add after it, so a slowdown of the op inside an Inductor graph would show.
3. One n:m mask, three kernels: dense (``F.linear`` on the masked weight), ``nm_cpu`` and
   ``sparse_cpu`` (which treats the n:m mask as plain unstructured), at the encoder's shapes.
   Where ``sparse_cpu`` is at least as fast as ``nm_cpu`` on an n:m mask, splitting an
   unstructured mask into an n:m part plus a sparse residual cannot beat ``sparse_cpu`` alone.
4. Per-op profile of the pruned (90%) model, eager, one call (``torch.profiler``).

Interleaved repetitions with a short pause before each timed call; medians of ``--runs`` runs.

    python bench/bench_cpu_remainder.py [--threads 2] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_deepsparse import LINEARS, Encoder, make_attrs, pruned_copy  # noqa: E402

from sparta.codegen import nm_cpu, sparse_cpu  # noqa: E402
from sparta.sparsifiers import NM  # noqa: E402


class StandIn(torch.nn.Module):
    """A linear's shape without its arithmetic."""

    def __init__(self, lin: torch.nn.Linear) -> None:
        super().__init__()
        self.inp, self.out = lin.in_features, lin.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out == self.inp:
            return x
        if self.out > self.inp:
            return x.repeat(*([1] * (x.dim() - 1)), self.out // self.inp)
        return x[..., : self.out]


def remainder_model(layers: int) -> Encoder:
    model = Encoder(layers).eval()
    for i in range(layers):
        layer = model.bert.encoder.layer[i]
        for lin in LINEARS:
            parent_name, _, attr = lin.rpartition(".")
            parent = layer.get_submodule(parent_name)
            setattr(parent, attr, StandIn(getattr(parent, attr)))
    return model


def interleaved(fns: dict[str, Callable[[], object]], runs: int, reps: int, pause: float):
    meds: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(runs):
            samples: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(reps):
                for k, f in fns.items():
                    time.sleep(pause)
                    t0 = time.perf_counter()
                    f()
                    samples[k].append(time.perf_counter() - t0)
            for k, v in samples.items():
                meds[k].append(statistics.median(v) * 1e3)
    return meds


def fmt(ms: list[float]) -> str:
    return f"{statistics.median(ms):.2f} ({min(ms):.2f}–{max(ms):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--pause", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# torch {torch.__version__}, {args.threads} threads, load before: {load}")

    print("\n## 1. Dense remainder (linears replaced by stand-ins), ms\n")
    print("| batch | eager | torch.compile | compile vs eager |")
    print("|---|---|---|---|")
    model = remainder_model(args.layers)
    compiled = torch.compile(model, dynamic=False)
    for b in (int(v) for v in args.batches.split(",")):
        ids = torch.randint(0, 1000, (b, 128))
        t = interleaved(
            {"eager": lambda i=ids: model(i), "compile": lambda i=ids: compiled(i)},
            args.runs,
            args.reps,
            args.pause,
        )
        ratio = statistics.median(t["eager"]) / statistics.median(t["compile"])
        print(f"| {b} | {fmt(t['eager'])} | {fmt(t['compile'])} | {ratio:.2f}x |", flush=True)

    print("\n## 2. CPU kernel ops eager vs inside an Inductor graph, ms\n")
    print("| layer | tokens | eager | torch.compile(fullgraph) | inside vs eager |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    w1 = torch.randn(3072, 768, generator=gen)
    m1 = torch.rand(3072, 768, generator=gen) >= 0.9
    w2 = torch.randn(768, 768, generator=gen)
    m2 = torch.zeros(768, 768, dtype=torch.bool)
    m2[:, ::4] = True
    layers = {
        "sparse_cpu 768->3072 90% +gelu": sparse_cpu.build_sparse_linear(
            w1, m1, torch.randn(3072, generator=gen), "gelu"
        ),
        "nm_cpu 768->768 1:4": nm_cpu.build_nm_linear(w2, m2, n=1, m=4),
    }
    for name, layer in layers.items():
        out = layer.out_features

        def block(x, layer=layer, out=out):
            return layer(x) + x.repeat(1, 1, out // 768)

        inside = torch.compile(block, fullgraph=True, dynamic=False)
        for tokens in (128, 1024):
            x = torch.randn(1, tokens, 768, generator=gen)
            t = interleaved(
                {"eager": lambda x=x, f=block: f(x), "inside": lambda x=x, f=inside: f(x)},
                args.runs,
                args.reps,
                args.pause,
            )
            ratio = statistics.median(t["eager"]) / statistics.median(t["inside"])
            line = f"| {name} | {tokens} | {fmt(t['eager'])} | {fmt(t['inside'])} | {ratio:.2f}x |"
            print(line, flush=True)

    print("\n## 3. One n:m mask: dense vs nm_cpu vs sparse_cpu, ms\n")
    print("| shape | n:m | tokens | dense | nm_cpu | sparse_cpu | sparse_cpu vs nm_cpu |")
    print("|---|---|---|---|---|---|---|")
    for n_out, k_in in ((3072, 768), (768, 3072)):
        w = torch.randn(n_out, k_in, generator=gen)
        for n, m in ((2, 4), (1, 4)):
            keep = NM(n, m).mask(w)
            wm = w * keep
            for tokens in (1, 128, 1024):
                x = torch.randn(tokens, k_in, generator=gen)
                nm = nm_cpu.build_nm_linear(w, keep, n=n, m=m, tokens=tokens)
                sp = sparse_cpu.build_sparse_linear(w, keep)
                t = interleaved(
                    {
                        "dense": lambda x=x, wm=wm: torch.nn.functional.linear(x, wm),
                        "nm": lambda x=x, f=nm: f(x),
                        "sp": lambda x=x, f=sp: f(x),
                    },
                    args.runs,
                    args.reps,
                    args.pause,
                )
                med = {k: statistics.median(v) for k, v in t.items()}
                print(
                    f"| {k_in}->{n_out} | {n}:{m} | {tokens} | {fmt(t['dense'])} | "
                    f"{fmt(t['nm'])} | {fmt(t['sp'])} | {med['nm'] / med['sp']:.2f}x |",
                    flush=True,
                )

    print("\n## 4. Per-op profile, pruned 90% model, eager, batch 1 (one call)\n")
    base = Encoder(args.layers).eval()
    pruned = pruned_copy(base, make_attrs(base, "90%", args.layers))
    ids = torch.randint(0, 1000, (1, 128))
    with torch.no_grad():
        pruned(ids)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pruned(ids)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"# load after: {load}")


if __name__ == "__main__":
    main()
