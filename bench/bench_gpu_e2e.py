"""End to end through ``sparta.compile``, the call a user makes, against the best dense PyTorch.

Models (random weights from their configs, eval, fp16 on CUDA): HF BERT-base (batch 32, seq 128)
and ViT-B/16 (batch 32) with cases (a) 90% 32x32 blocks on every encoder linear, (b) half the FFN
units and a quarter of the heads, (c) 2:4 on every encoder linear, (d) no masks; and (e) a
Llama-style decoder (hidden 2048, MLP 8192, 16 layers, 32 heads, 8 KV heads; ``LlamaModel``
from ``transformers.LlamaConfig``) at prefill, batch 4 x 1024, 90% 32x32 blocks on every MLP
weight.

Columns: dense eager, ``torch.compile`` dense (default and ``reduce-overhead``), sparta in its
three runtimes (``mode="eager"``, ``"default"`` = Inductor, ``"reduce-overhead"`` = Inductor +
CUDA graphs), the best sparta mode against the best dense mode (like with like: graphs against
graphs) and against eager dense, the target, relative error against ``sparta.masked_model``
(fresh inputs), and compile time: cold (``sparta.compile`` + the first call, which runs
Inductor; kernel and Inductor caches start empty for the run, but a case reuses what earlier
cases of the run built for equal shapes) and warm (the same compile again). Every latency is
the median per call of calls back to back between CUDA events (``sparta.timing.measure_ms``):
host overhead is paid where a runtime pays it. A missed target is explained by a
``torch.profiler`` table: kernels and GPU time per call by kind, best sparta vs best dense.

    python bench/bench_gpu_e2e.py [--models bert,vit,llama] [--cases a,b,c,d,e] [--out DIR]
    python bench/bench_gpu_e2e.py --tiny   # CPU, Triton interpreter, tiny configs: the code path
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

TARGETS = {"a": 1.3, "b": 1.15, "c": 1.05, "d": 1.0, "e": 1.8}
TARGET_A_EAGER = 2.5
CASE_NAMES = {
    "a": "90% 32x32 blocks, every encoder linear",
    "b": "half the FFN units + a quarter of the heads",
    "c": "2:4, every encoder linear",
    "d": "no masks",
    "e": "90% 32x32 blocks, every MLP weight",
}


@dataclass
class Setup:
    dev: torch.device
    dtype: torch.dtype
    tiny: bool
    backends: tuple[str, ...] | None
    modes: dict[str, str]  # column -> sparta mode
    budget_ms: float
    compile_backend: str
    warm: bool = True


def _linear_weights(model: torch.nn.Module) -> list[str]:
    return [
        f"{name}.weight" for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
    ]


ROLES = ("q", "k", "v", "attn_out", "fc1", "fc2")


def encoder_layers(model: torch.nn.Module) -> list[dict[str, str]]:
    """Weight names of each encoder layer by role, from the order every HF encoder declares its
    linears in (q, k, v, attention output, FFN in, FFN out), whatever they are called."""
    names = _linear_weights(model)
    params = dict(model.named_parameters())
    if len(names) % len(ROLES):
        raise SystemExit(f"expected {len(ROLES)} linears per encoder layer, got {names}")
    layers = [dict(zip(ROLES, names[i : i + 6])) for i in range(0, len(names), 6)]
    for layer in layers:
        h, f = params[layer["attn_out"]].shape[0], params[layer["fc1"]].shape[0]
        if params[layer["fc2"]].shape != (h, f) or params[layer["attn_out"]].shape != (h, h):
            raise SystemExit(f"unexpected encoder layer layout: {layer}")
    return layers


def encoder_cases(heads: int) -> dict[str, Callable[[torch.nn.Module], dict]]:
    import sparta
    from sparta.sparsifiers import NM, BlockMagnitude, Channels, Heads

    def each(model, sparsifier):
        return sparta.sparsify(model, dict.fromkeys(_linear_weights(model), sparsifier))

    def units_heads(model):
        layers = encoder_layers(model)
        attn_out = [layer["attn_out"] for layer in layers]
        ffn_out = [layer["fc2"] for layer in layers]
        spec = dict.fromkeys(ffn_out, Channels(0.5, dim=1))
        spec.update(dict.fromkeys(attn_out, Heads(heads, 0.25, dim=1)))
        return sparta.sparsify(model, spec)

    return {
        "a": lambda m: each(m, BlockMagnitude((32, 32), 0.9)),
        "b": units_heads,
        "c": lambda m: each(m, NM(2, 4)),
        "d": lambda m: {},
    }


def llama_cases() -> dict[str, Callable[[torch.nn.Module], dict]]:
    import sparta
    from sparta.sparsifiers import BlockMagnitude

    def mlp(model):
        names = [n for n in _linear_weights(model) if ".mlp." in n]
        return sparta.sparsify(model, dict.fromkeys(names, BlockMagnitude((32, 32), 0.9)))

    return {"e": mlp}


def build(name: str, s: Setup):
    """(model, example inputs, fresh inputs maker, cases) of one benchmark model."""
    import transformers as tf

    torch.manual_seed(0)
    if name == "bert":
        cfg = tf.BertConfig() if not s.tiny else tf.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=100, max_position_embeddings=64)  # fmt: skip
        model = tf.BertModel(cfg, add_pooling_layer=False)
        b, t = (32, 128) if not s.tiny else (2, 16)

        def inputs():
            return (torch.randint(0, cfg.vocab_size, (b, t), device=s.dev),)

        cases = encoder_cases(cfg.num_attention_heads)
    elif name == "vit":
        cfg = tf.ViTConfig() if not s.tiny else tf.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=32, patch_size=8)  # fmt: skip
        model = tf.ViTModel(cfg, add_pooling_layer=False)
        b = 32 if not s.tiny else 2

        def inputs():
            shape = (b, 3, cfg.image_size, cfg.image_size)
            return (torch.randn(shape, device=s.dev, dtype=s.dtype),)

        cases = encoder_cases(cfg.num_attention_heads)
    elif name == "llama":
        kw = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                  max_position_embeddings=2048)  # fmt: skip
        if s.tiny:
            kw = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      max_position_embeddings=64)  # fmt: skip
        cfg = tf.LlamaConfig(**kw, use_cache=False)
        model = tf.LlamaModel(cfg)
        b, t = (4, 1024) if not s.tiny else (2, 32)

        def inputs():
            return (torch.randint(0, cfg.vocab_size, (b, t), device=s.dev),)

        cases = llama_cases()
    else:
        raise SystemExit(f"unknown model {name!r}")
    model = model.to(s.dev, s.dtype).eval()
    return model, inputs(), inputs, cases


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def ms(fn, s: Setup) -> float:
    from sparta.timing import measure_ms

    return measure_ms(fn, s.dev, budget_ms=s.budget_ms)


def first_call_s(fn, s: Setup) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
    _sync(s.dev)
    return time.perf_counter() - t0


def out_tensor(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def rel_err(got, want) -> float:
    g, w = out_tensor(got).float(), out_tensor(want).float()
    return float((g - w).norm() / w.norm().clamp_min(1e-12))


KINDS = (
    ("sparta kernels", ("sparta_",)),
    ("attention", ("flash", "fmha", "cudnn", "attention", "efficient", "sdpa")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "sm90", "addmm", "mm")),
    ("inductor fused", ("triton_",)),
    ("copy/gather/scatter", ("copy", "gather", "index", "scatter", "cat", "fill")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("eager elementwise", ("elementwise", "vectorized", "reduce", "unrolled", "gelu", "silu")),
)


def _kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def profile(fns: dict[str, Callable[[], object]], s: Setup, calls: int = 5) -> str:
    """Kernels and GPU time per call by kind for each callable (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    cuda = s.dev.type == "cuda"
    act = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    table: dict[str, dict[str, tuple[int, float]]] = {}
    for label, fn in fns.items():
        with torch.no_grad():
            fn()
            _sync(s.dev)
            with tprofile(activities=act) as prof:
                for _ in range(calls):
                    fn()
                _sync(s.dev)
        agg: dict[str, list[float]] = {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None) if cuda else e.self_cpu_time_total
            if cuda and t is None:
                t = getattr(e, "self_cuda_time_total", 0.0)
            on_device = getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
            if not t or (cuda and not on_device):
                continue
            k = agg.setdefault(_kind(e.key), [0, 0.0])
            k[0] += e.count
            k[1] += t
        table[label] = {k: (int(v[0] / calls), v[1] / calls / 1e3) for k, v in agg.items()}
    kinds = sorted({k for t in table.values() for k in t})
    head = "| kind | " + " | ".join(f"{lb} kernels | {lb} ms" for lb in table) + " |"
    lines = [head, "|---|" + "---|---|" * len(table)]
    for k in kinds:
        cells = [f"{table[lb].get(k, (0, 0.0))[0]} | {table[lb].get(k, (0, 0.0))[1]:.3f}"
                 for lb in table]  # fmt: skip
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    tot = [f"{sum(v[0] for v in t.values())} | {sum(v[1] for v in t.values()):.3f}"
           for t in table.values()]  # fmt: skip
    lines.append("| total | " + " | ".join(tot) + " |")
    return "\n".join(lines)


@dataclass
class Row:
    model: str
    case: str
    dense: dict[str, float] = field(default_factory=dict)
    sparta: dict[str, float] = field(default_factory=dict)
    err: float = float("nan")
    cold_s: float = float("nan")
    warm_s: float = float("nan")
    picked: str = ""
    whole: dict | None = None
    runtime: str = ""
    profile: str = ""
    notes: list[str] = field(default_factory=list)

    def best(self) -> tuple[float, float, float]:
        # the best dense a user has: torch.compile loses to eager on some models (HF ViT)
        bd = min(self.dense["eager"], self.dense["compile"], self.dense["compile-ro"])
        bs = min(self.sparta.get("default", float("inf")), self.sparta.get("ro", float("inf")))
        return bd, bs, self.dense["eager"]


def dense_times(model, inputs, s: Setup, log) -> tuple[dict, dict]:
    times, fns = {}, {}
    with torch.no_grad():
        fns["eager"] = lambda: model(*inputs)
        times["eager"] = ms(fns["eager"], s)
        for col, mode in (("compile", None), ("compile-ro", "reduce-overhead")):
            torch._dynamo.reset()
            f = torch.compile(model, mode=mode, backend=s.compile_backend)
            cold = first_call_s(lambda f=f: f(*inputs), s)
            fns[col] = lambda f=f: f(*inputs)
            times[col] = ms(fns[col], s)
            times[f"{col}-cold-s"] = cold
            log(f"  dense {col}: {times[col]:.3f} ms (first call {cold:.1f} s)")
    return times, fns


def sparta_case(model, inputs, fresh, attrs, s: Setup, row: Row, log) -> dict:
    import sparta

    ref = sparta.masked_model(model, attrs)
    x_new = fresh()
    with torch.no_grad():
        want = ref(*x_new)
    fns = {}
    for col, mode in s.modes.items():
        torch._dynamo.reset()
        t0 = time.perf_counter()
        compiled = sparta.compile(model, attrs, inputs, mode=mode, backends=s.backends)
        plan_s = time.perf_counter() - t0
        first = first_call_s(lambda c=compiled: c(*inputs), s)
        with torch.no_grad():
            row.err = max(row.err if row.err == row.err else 0.0, rel_err(compiled(*x_new), want))
        fns[col] = lambda c=compiled: c(*inputs)
        row.sparta[col] = ms(fns[col], s)
        if col == "default":
            row.cold_s = plan_s + first
            impls: dict[str, int] = {}
            for c in compiled.plan.choices.values():
                impls[c.impl] = impls.get(c.impl, 0) + 1
            row.picked = ", ".join(f"{k} {v}" for k, v in sorted(impls.items()))
            row.whole, row.runtime = compiled.report.whole, compiled.report.runtime
            row.notes += compiled.report.rewrites[:2]
        log(f"  sparta {col}: {row.sparta[col]:.3f} ms (compile {plan_s:.1f} s + first call "
            f"{first:.1f} s) err {row.err:.1e}")  # fmt: skip
    if not s.warm:
        return fns
    torch._dynamo.reset()
    t0 = time.perf_counter()
    again = sparta.compile(model, attrs, inputs, mode=s.modes["default"], backends=s.backends)
    row.warm_s = time.perf_counter() - t0 + first_call_s(lambda: again(*inputs), s)
    return fns


def fmt(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def table(rows: list[Row]) -> str:
    head = ("| model | case | eager dense | compile dense | compile dense RO | sparta eager "
            "| sparta default | sparta RO | best vs best dense | vs eager dense | target | met "
            "| rel err | compile cold s | warm s | picked (default) |")  # fmt: skip
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        bd, bs, eager = r.best()
        target = TARGETS[r.case]
        met = bs * target <= bd
        extra = ""
        if r.case == "a":
            met = met and bs * TARGET_A_EAGER <= eager
            extra = f" & {TARGET_A_EAGER}x eager"
        lines.append(
            f"| {r.model} | ({r.case}) {CASE_NAMES[r.case]} | {fmt(r.dense['eager'])} "
            f"| {fmt(r.dense['compile'])} | {fmt(r.dense['compile-ro'])} "
            f"| {fmt(r.sparta.get('eager', float('nan')))} "
            f"| {fmt(r.sparta.get('default', float('nan')))} "
            f"| {fmt(r.sparta.get('ro', float('nan')))} | {bd / bs:.2f}x | {eager / bs:.2f}x "
            f"| {target}x{extra} | {'yes' if met else '**no**'} | {r.err:.1e} "
            f"| {r.cold_s:.1f} | {r.warm_s:.1f} | {r.picked} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="bert,vit,llama")
    ap.add_argument("--cases", default="a,b,c,d,e")
    ap.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, tiny configs")
    ap.add_argument("--out", default="", help="directory for table.md, rows.json, log.txt")
    ap.add_argument("--compile-backend", default="inductor", help="for quick checks only")
    ap.add_argument("--deadline-s", type=float, default=0.0, help="start no case after this")
    ap.add_argument("--modes", default="default,eager,ro", help="sparta runtimes to run")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm (second) compile")
    args = ap.parse_args()
    start = time.perf_counter()
    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    for var in ("SPARTA_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        os.environ.setdefault(var, tempfile.mkdtemp(prefix=var.lower() + "_"))
    import transformers

    import sparta  # noqa: F401  (after the environment is set)

    cuda = torch.cuda.is_available() and not args.tiny
    s = Setup(
        dev=torch.device("cuda" if cuda else "cpu"),
        dtype=torch.float16 if cuda else torch.float32,
        tiny=args.tiny,
        backends=None if cuda else ("dense", "shrink", "triton", "nm_cpu"),
        modes={  # default first: its compile is the cold one (tuning, Inductor caches empty)
            k: v
            for k, v in (
                ("default", "default" if cuda else "inductor"),
                ("eager", "eager"),
                ("ro", "reduce-overhead"),
            )
            if k in args.modes.split(",")
        },
        warm=not args.no_warm,
        budget_ms=300 if cuda else 50,
        compile_backend=args.compile_backend,
    )
    out_dir = args.out
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    import triton

    dev_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    header = (f"device: {dev_name} | date: {time.strftime('%Y-%m-%d %H:%M')} | torch "
              f"{torch.__version__} | triton {triton.__version__} | transformers "
              f"{transformers.__version__} | {str(s.dtype).replace('torch.', '')}")  # fmt: skip
    log(header)
    rows: list[Row] = []
    cases_wanted = args.cases.split(",")
    for name in args.models.split(","):
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            log(f"{name}: not run (past the --deadline-s of {args.deadline_s:.0f} s)")
            continue
        model, inputs, fresh, cases = build(name, s)
        todo = [c for c in cases if c in cases_wanted]
        if not todo:
            continue
        log(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
        dense, dense_fns = dense_times(model, inputs, s, log)
        for case in todo:
            if args.deadline_s and time.perf_counter() - start > args.deadline_s:
                log(f" case ({case}): not run (past the --deadline-s of {args.deadline_s:.0f} s)")
                continue
            log(f" case ({case}) {CASE_NAMES[case]}")
            row = Row(name, case, dense=dense)
            try:
                attrs = cases[case](model)
                fns = sparta_case(model, inputs, fresh, attrs, s, row, log)
                bd, bs, eager = row.best()
                missed = bs * TARGETS[case] > bd or (case == "a" and bs * TARGET_A_EAGER > eager)
                if missed:
                    best_s = min(fns, key=lambda c: row.sparta[c] if c != "eager" else 1e9)
                    best_d = min(("eager", "compile", "compile-ro"), key=lambda c: dense[c])
                    row.profile = profile(
                        {f"dense {best_d}": dense_fns[best_d], f"sparta {best_s}": fns[best_s]}, s
                    )
                    log(row.profile)
                del fns
            except Exception as e:  # noqa: BLE001 - one case's failure is reported, not fatal
                import traceback

                row.notes.append(f"FAILED: {type(e).__name__}: {e}")
                log(traceback.format_exc())
                row.sparta = {k: float("nan") for k in ("eager", "default", "ro")}
            rows.append(row)
            log(table(rows[-1:]))
            write(rows, header, log_lines, out_dir)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        del model, dense_fns
        torch._dynamo.reset()
        gc.collect()
    print("\n" + write(rows, header, log_lines, out_dir))
    sys.stdout.flush()


def write(rows: list[Row], header: str, log_lines: list[str], out_dir: str) -> str:
    """The report so far (written after every case, so a run cut short keeps its rows)."""
    text = [header, "", table(rows), ""]
    for r in rows:
        if r.whole or r.notes or r.profile:
            text.append(f"### {r.model} ({r.case})\n")
            text.append(f"runtime: {r.runtime}; whole graph: {json.dumps(r.whole)}")
            text += [f"- {n}" for n in r.notes]
            if r.profile:
                text += ["", r.profile]
            text.append("")
    report = "\n".join(text)
    if out_dir:
        with open(os.path.join(out_dir, "table.md"), "w") as f:
            f.write(report + "\n")
        with open(os.path.join(out_dir, "log.txt"), "w") as f:
            f.write("\n".join(log_lines) + "\n")
        with open(os.path.join(out_dir, "rows.json"), "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1, default=str)
    return report


if __name__ == "__main__":
    main()
