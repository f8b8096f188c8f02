"""CPU, fp32: a 4-layer BERT-base-width encoder, pruned, through four engines in one run.

Engines: torch eager and ``torch.compile`` (Inductor) on the pruned model (weights multiplied
by the masks), DeepSparse 1.8.0 on an ONNX export of that pruned model (``torch.onnx.export``,
opset 14; optional, ``pip install -e '.[bench]'``), and ``sparta.compile`` on the dense model
with the masks as attributes. The model is transformers' ``BertModel`` from a ``BertConfig``
(hidden 768, 12 heads, FFN 3072; random weights), seq 128; masks on every encoder linear
(q, k, v, attention output, FFN in, FFN out): magnitude unstructured at 50 / 70 / 90%, 2:4 and
1:4 (magnitude n:m along K), and none.

Timing: every repetition calls each engine once, in turn (interleaved), after a short pause so
that the previous engine's worker threads have gone idle (without it DeepSparse reads ~2x slow);
the median over repetitions is one run, the table shows the median of ``--runs`` runs (with
the range of the run medians). Errors are max |engine - sparta.masked_model| on the last
hidden state. ``floor`` = kept FLOPs of the encoder linears + dense FLOPs of the rest, over the
dense GEMM rate measured in the same process (``torch.mm`` 2048^3).

    python bench/bench_cpu_deepsparse.py [--threads 2] [--batches 1,8] [--runs 3]
"""

from __future__ import annotations

import argparse
import collections
import copy
import datetime
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable

import torch

import sparta
from sparta.sparsifiers import NM, Magnitude

LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
MASKS = ("none", "50%", "70%", "90%", "2:4", "1:4")


class Encoder(torch.nn.Module):
    """``BertModel`` returning its last hidden state (one tensor: every engine returns it)."""

    def __init__(self, layers: int, attn: str = "sdpa") -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            hidden_size=768,
            num_hidden_layers=layers,
            num_attention_heads=12,
            intermediate_size=3072,
            attn_implementation=attn,
        )
        self.bert = BertModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


def make_attrs(model: Encoder, case: str, layers: int) -> dict[str, torch.Tensor]:
    if case == "none":
        return {}
    if case.endswith("%"):
        sparsifier = Magnitude(int(case[:-1]) / 100)
    else:
        n, m = (int(v) for v in case.split(":"))
        sparsifier = NM(n, m)
    params = dict(model.named_parameters())
    attrs = {}
    for i in range(layers):
        for lin in LINEARS:
            name = f"bert.encoder.layer.{i}.{lin}.weight"
            attrs[name] = sparsifier.mask(params[name].detach())
    return attrs


def pruned_copy(model: Encoder, attrs: dict[str, torch.Tensor]) -> Encoder:
    out = copy.deepcopy(model).eval()
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in attrs.items():
            params[name].mul_(mask)
    return out


def load_weights(dst: Encoder, src: Encoder) -> None:
    """Copy src's parameters into dst in place (a compiled dst keeps its graphs)."""
    with torch.no_grad():
        for p, q in zip(dst.parameters(), src.parameters()):
            p.copy_(q)


def deepsparse_engine(pruned: Encoder, ids: torch.Tensor, threads: int, tmp: str):
    from deepsparse import Engine

    path = os.path.join(tmp, f"encoder_b{ids.shape[0]}.onnx")
    export = copy.deepcopy(pruned).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            export,
            (ids,),
            path,
            opset_version=14,
            dynamo=False,
            input_names=["input_ids"],
            output_names=["last_hidden_state"],
        )
    engine = Engine(model=path, batch_size=ids.shape[0], num_cores=threads)
    feed = [ids.numpy()]
    return lambda: torch.from_numpy(engine(feed)[0])


def gemm_rate(threads: int) -> float:
    """Dense fp32 GEMM rate (FLOP/s) of this process: torch.mm 2048^3, best of 5."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def floor_ms(attrs: dict, model: Encoder, tokens: int, layers: int, rate: float) -> float:
    hidden, seq = 768, 128
    params = dict(model.named_parameters())
    kept = 0
    for i in range(layers):
        for lin in LINEARS:
            name = f"bert.encoder.layer.{i}.{lin}.weight"
            kept += 2 * tokens * int(attrs[name].sum() if name in attrs else params[name].numel())
    attention = layers * 2 * 2 * tokens * seq * hidden  # scores and probabilities @ values
    return (kept + attention) / rate * 1e3


def time_interleaved(
    engines: dict[str, Callable[[], object]], reps: int, pause: float
) -> dict[str, float]:
    """One run: each repetition calls every engine once, after ``pause`` seconds; medians."""
    samples: dict[str, list[float]] = {k: [] for k in engines}
    with torch.no_grad():
        for _ in range(reps):
            for name, fn in engines.items():
                time.sleep(pause)
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return model


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--masks", default=",".join(MASKS))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--pause", type=float, default=0.1, help="seconds before each timed call")
    ap.add_argument("--no-deepsparse", action="store_true")
    ap.add_argument("--sparta-mode", default="default", help="sparta.compile's runtime")
    ap.add_argument("--no-inductor", action="store_true", help="skip the torch.compile column")
    ap.add_argument(
        "--compile-per-batch",
        action="store_true",
        help="sparta.compile at each batch's example (default: once, at the largest batch; the "
        "compiled graph takes any batch)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    cases = args.masks.split(",")
    use_ds = not args.no_deepsparse
    if use_ds:
        try:
            import deepsparse  # noqa: F401
        except ImportError:
            print("# deepsparse not installed (pip install -e '.[bench]'): column skipped")
            use_ds = False

    model = Encoder(args.layers).eval()
    inputs = {b: torch.randint(0, model.bert.config.vocab_size, (b, 128)) for b in batches}
    rate = gemm_rate(args.threads)
    versions = f"torch {torch.__version__}"
    if use_ds:
        import deepsparse

        versions += f", deepsparse {deepsparse.__version__}"
    import transformers

    versions += f", transformers {transformers.__version__}"
    print(
        f"# {args.layers}-layer BERT-base-width encoder, seq 128, fp32, {args.threads} threads; "
        f"{machine()}; {versions}; {datetime.datetime.now().isoformat(timespec='minutes')}; "
        f"dense GEMM {rate / 1e9:.0f} GFLOP/s; sparta mode {args.sparta_mode}; "
        f"load before: {load()}",
        flush=True,
    )
    # One pruned module per batch size for torch.compile: the masks' weights are copied into
    # it, so Inductor compiles once per shape (parameters are graph inputs, not constants).
    inductor_model = pruned_copy(model, {})
    inductor = None if args.no_inductor else torch.compile(inductor_model, dynamic=False)

    rows = []
    setups: list[tuple[str, int, dict, dict]] = []
    with tempfile.TemporaryDirectory(prefix="sparta-bench-") as tmp:
        for case in cases:
            attrs = make_attrs(model, case, args.layers)
            pruned = pruned_copy(model, attrs)
            masked = sparta.masked_model(model, attrs)
            compiled, compile_s = None, 0.0
            for b in sorted(batches, reverse=True):
                ids = inputs[b]
                if compiled is None or args.compile_per_batch:
                    t0 = time.perf_counter()
                    compiled = sparta.compile(
                        model, attrs, (ids,), measure=False, mode=args.sparta_mode
                    )
                    compile_s = time.perf_counter() - t0
                engines: dict[str, Callable[[], object]] = {"eager": lambda p=pruned, i=ids: p(i)}
                if inductor is not None:
                    # the weights are loaded before each run of this case, not timed
                    engines["compile"] = lambda i=ids: inductor(i)
                    engines["_load"] = lambda p=pruned: load_weights(inductor_model, p)
                if use_ds:
                    engines["deepsparse"] = deepsparse_engine(pruned, ids, args.threads, tmp)
                engines["sparta"] = lambda c=compiled, i=ids: c(i)
                with torch.no_grad():
                    ref = masked(ids)
                    errs = {}
                    for name, fn in engines.items():
                        if name == "_load":
                            continue
                        if name == "compile":
                            load_weights(inductor_model, pruned)
                        errs[name] = (fn() - ref).abs().max().item()
                impls = collections.Counter(
                    n.impl  # "fused": a sibling linear computed in another's stacked kernel
                    for n in compiled.report.nodes
                    if n.impl and (n.latency_ms or n.impl == "fused")
                )
                setups.append((case, b, engines, {"errs": errs, "impls": impls, "s": compile_s}))
                print(f"# built {case} batch {b}: sparta.compile {compile_s:.0f} s", flush=True)
        setups.sort(key=lambda s: (s[1], cases.index(s[0])))

        runs: dict[tuple[str, int], list[dict[str, float]]] = collections.defaultdict(list)
        for _ in range(args.runs):
            for case, b, engines, _ in setups:
                if "compile" in engines:
                    engines["_load"]()
                timed = {k: v for k, v in engines.items() if k != "_load"}
                runs[(case, b)].append(time_interleaved(timed, args.reps, args.pause))

    print(f"# load after: {load()}")
    cols = ["compile", "deepsparse", "sparta"]
    head = "| batch | masks | torch eager ms |"
    head += "".join(f" {c} |" for c in cols if any(c in r[0] for r in runs.values()))
    head += " floor ms | max err (eager / compile / deepsparse / sparta) | SparTA-py linears |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for case, b, _, info in setups:
        rs = runs[(case, b)]
        eager = statistics.median(r["eager"] for r in rs)
        eager_rng = f"{min(r['eager'] for r in rs):.1f}–{max(r['eager'] for r in rs):.1f}"
        line = f"| {b} | {case} | {eager:.1f} ({eager_rng}) |"
        for c in cols:
            if c not in rs[0]:
                continue
            ms = [r[c] for r in rs]
            med = statistics.median(ms)
            line += f" {med:.1f} ms = {eager / med:.2f}x ({min(ms):.1f}–{max(ms):.1f}) |"
        attrs = make_attrs(model, case, args.layers)
        line += f" {floor_ms(attrs, model, b * 128, args.layers, rate):.1f} |"
        errs = info["errs"]
        line += " " + " / ".join(f"{errs[k]:.1e}" for k in errs) + " |"
        line += " " + ", ".join(f"{k} {v}" for k, v in sorted(info["impls"].items())) + " |"
        rows.append(line)
        print(line, flush=True)


if __name__ == "__main__":
    main()
