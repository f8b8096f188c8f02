"""Structured channel pruning that really shrinks: CNNs, sparta.compile vs. the baselines.

Cases (fp32, random weights, eval mode):

* ``vgg``: conv 3->64->64->64->10 (3x3, ReLU), 48 of 64 channels pruned in each hidden layer,
  batch 8, 32x32 (issue 15's example). Baselines: the masked dense model (masks folded into the
  weights) eager and under ``torch.compile``, and the same network built by hand with 16
  channels. Target: sparta within 0.8x of the hand-shrunk speed.
* ``resnet50`` / ``mobilenetv2``: transformers' ``ResNetModel`` / ``MobileNetV2Model`` (default
  configs = ResNet-50 / MobileNetV2 1.0), with 30% / 50% of the prunable channels removed:
  the inner channels of every bottleneck (its first two conv+BN layers) / the expanded
  channels of every inverted residual (expand conv+BN and the depthwise conv+BN after it),
  lowest L1 norm first. The masks cover the conv rows and their BN affine parameters.
  Torch-Pruning prunes the same channel indices (``DependencyGraph.get_pruning_group`` on each
  pruned conv's output channels), so both compute the same function; its latency and
  parameter count are reported beside sparta's (``export_pruned()``).

Every candidate is checked against the masked dense model on the benchmark input; timings are
interleaved rounds (median and inter-quartile range, ms). The physical floor is
FLOPs / peak with the peak measured as a large GEMM's rate on this machine.

Usage: ``python bench/bench_shrink_conv.py [--cases vgg,resnet50,mobilenetv2] [--ratios 0.3,0.5]
[--batches 1,32] [--size 224] [--size32 96] [--rounds 15] [--device cpu|cuda]
[--out bench/results/x.md]``. On the GPU every candidate is timed between synchronisations, and
``sparta.compile`` uses its default GPU runtime (Inductor).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

import sparta

DEVICE = torch.device("cpu")  # --device


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple]:
    """Median and quartiles (ms) of each candidate, measured round-robin."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
            f()
        for _ in range(rounds):
            for k, f in fns.items():
                sync()
                t0 = time.perf_counter()
                f()
                sync()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for k, v in samples.items():
        q = statistics.quantiles(v, n=4) if len(v) >= 4 else [min(v), 0, max(v)]
        out[k] = (statistics.median(v), q[0], q[2])
    return out


def folded(model: nn.Module, attrs: dict) -> nn.Module:
    """A copy with every mask multiplied into its parameter: the masked dense model."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, mask in attrs.items():
            params[name].mul_(mask.to(params[name].device))
    return m.eval()


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def gemm_peak_gflops() -> float:
    n = 1024 if DEVICE.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    t = interleaved({"mm": lambda: a @ b}, 10)["mm"][0]
    return 2 * n**3 / (t * 1e-3) / 1e9


def conv_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds x2 of the convolutions and linears of one forward pass."""
    total = [0.0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            k = mod.weight[0].numel()  # Cin/G * kh * kw
            total[0] += 2.0 * out.numel() * k
        elif isinstance(mod, nn.Linear):
            total[0] += 2.0 * out.numel() * mod.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return total[0]


# --- VGG -----------------------------------------------------------------------------------


def vgg(width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    chans = [3, width, width, width]
    for cin, cout in zip(chans[:-1], chans[1:], strict=True):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
    layers.append(nn.Conv2d(width, 10, 3, padding=1))
    return nn.Sequential(*layers).eval()


def vgg_case(rounds: int) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    model = vgg(64)
    keep = torch.zeros(64, dtype=torch.bool)
    keep[torch.randperm(64)[:16]] = True
    attrs = {}
    for i in (0, 2, 4):
        attrs[f"{i}.weight"] = keep[:, None, None, None].expand_as(model[i].weight).clone()
        attrs[f"{i}.bias"] = keep.clone()
    hand = vgg(16)
    with torch.no_grad():
        idx = keep.nonzero().flatten()
        for i in (0, 2, 4, 6):
            w, b = model[i].weight, model[i].bias
            w = w[idx] if i != 6 else w
            w = w[:, idx] if i != 0 else w
            hand[i].weight.copy_(w)
            hand[i].bias.copy_(b[idx] if i != 6 else b)
    x = torch.randn(8, 3, 32, 32, device=DEVICE)
    model, hand = model.to(DEVICE), hand.to(DEVICE)
    return run_candidates("vgg (48/64 pruned)", model, attrs, x, {"hand-shrunk": hand}, rounds)


# --- transformers CNNs ---------------------------------------------------------------------


class Features(nn.Module):
    """The model's last hidden state as a plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).last_hidden_state


def prunable_groups(name: str, model: nn.Module) -> list[tuple[str, list[str]]]:
    """(conv whose output channels are pruned, [conv/BN modules pruned along with it])."""
    groups = []
    mods = dict(model.named_modules())
    for q, m in mods.items():
        kind = type(m).__name__
        if name == "resnet50" and kind == "ResNetConvLayer" and q.endswith(("layer.0", "layer.1")):
            groups.append((f"{q}.convolution", [f"{q}.convolution", f"{q}.normalization"]))
        inverted = kind == "MobileNetV2InvertedResidual" and hasattr(m, "expand_1x1")
        if name == "mobilenetv2" and inverted:
            members = [
                f"{q}.{s}.{t}"
                for s in ("expand_1x1", "conv_3x3")
                for t in ("convolution", "normalization")
            ]
            groups.append((f"{q}.expand_1x1.convolution", members))
    return groups


def channel_attrs(model: nn.Module, groups, ratio: float) -> tuple[dict, dict]:
    """Masks pruning ``ratio`` of each group's channels (lowest L1 norm of the conv's rows)."""
    mods = dict(model.named_modules())
    attrs, idxs = {}, {}
    for conv, members in groups:
        w = mods[conv].weight
        k = int(round(ratio * w.shape[0]))
        pruned = torch.argsort(w.abs().flatten(1).sum(1))[:k]
        idxs[conv] = sorted(pruned.tolist())
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[pruned] = False
        for mname in members:
            for pname, p in mods[mname].named_parameters(recurse=False):
                shape = [1] * p.dim()
                shape[0] = -1
                attrs[f"{mname}.{pname}"] = keep.reshape(shape).expand(p.shape).clone()
    return attrs, idxs


def torch_pruning(model: nn.Module, idxs: dict, x: torch.Tensor) -> nn.Module | None:
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
    for conv, ix in idxs.items():
        group = dg.get_pruning_group(mods[conv], tp.prune_conv_out_channels, idxs=ix)
        if dg.check_pruning_group(group):
            group.prune()
    return m.eval()


def cnn_case(name: str, ratio: float, batch: int, size: int, rounds: int):
    from transformers import MobileNetV2Config, MobileNetV2Model, ResNetConfig, ResNetModel

    torch.manual_seed(0)
    base = (
        ResNetModel(ResNetConfig()) if name == "resnet50" else MobileNetV2Model(MobileNetV2Config())
    )
    model = Features(base).eval()
    for m in model.modules():  # BN statistics as a trained model has them
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    model = model.to(DEVICE)
    groups = prunable_groups(name, model)
    attrs, idxs = channel_attrs(model, groups, ratio)
    x = torch.randn(batch, 3, size, size, device=DEVICE)
    extra = {}
    tp_model = torch_pruning(folded(model, attrs), idxs, x[:1])
    if tp_model is not None:
        extra["torch-pruning"] = tp_model
    label = f"{name} {ratio:.0%} channels, batch {batch}, {size}x{size}"
    return run_candidates(label, model, attrs, x, extra, rounds)


# --- the runner ----------------------------------------------------------------------------


def run_candidates(label, model, attrs, x, extra: dict, rounds: int):
    dense = folded(model, attrs)
    t0 = time.perf_counter()
    compiled = sparta.compile(model, attrs, (x,))
    compile_s = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inductor = torch.compile(dense)
        with torch.no_grad():
            inductor(x)
    fns = {
        "masked dense (eager)": lambda: dense(x),
        "masked dense (torch.compile)": lambda: inductor(x),
        "sparta.compile": lambda: compiled(x),
    }
    for k, m in extra.items():
        fns[k] = lambda m=m: m(x)
    with torch.no_grad():
        ref = dense(x)
        errs = {k: float((f() - ref).abs().max() / ref.abs().max()) for k, f in fns.items()}
    t = interleaved(fns, rounds)
    best_dense = min(t["masked dense (eager)"][0], t["masked dense (torch.compile)"][0])
    try:
        exported = n_params(compiled.export_pruned())
    except sparta.SpartaError:
        exported = None
    shrunk = sum(c.impl == "shrink" for c in compiled.plan.choices.values())
    params = {"dense": n_params(model), "sparta": exported}
    params.update({k: n_params(m) for k, m in extra.items()})
    rows = []
    for k, (med, q1, q3) in t.items():
        rows.append(
            {
                "case": label,
                "candidate": k,
                "ms": med,
                "iqr": (q1, q3),
                "vs_best_dense": best_dense / med,
                "rel_err": errs[k],
            }
        )
    info = {
        "case": label,
        "params": params,
        "shrunk_nodes": shrunk,
        "nodes": len(compiled.plan.choices),
        "compile_s": compile_s,
        "flops": conv_flops(dense, x),
        "flops_shrunk": conv_flops(extra[next(iter(extra))], x) if extra else None,
    }
    return rows, info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="vgg,resnet50,mobilenetv2")
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--size", type=int, default=224, help="image size at batch 1")
    ap.add_argument("--size32", type=int, default=96, help="image size at batches > 1")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = gemm_peak_gflops()
    results, infos = [], []
    for case in args.cases.split(","):
        if case == "vgg":
            r, i = vgg_case(args.rounds)
            results += r
            infos.append(i)
            print_rows(r, i, peak)
            continue
        for ratio in (float(v) for v in args.ratios.split(",")):
            for b in (int(v) for v in args.batches.split(",")):
                size = args.size if b == 1 else args.size32
                r, i = cnn_case(case, ratio, b, size, args.rounds)
                results += r
                infos.append(i)
                print_rows(r, i, peak)
    text = render(results, infos, peak, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def print_rows(rows, info, peak) -> None:
    for r in rows:
        print(f"{r['case']:48s} {r['candidate']:30s} {r['ms']:9.3f} ms  x{r['vs_best_dense']:.2f}")
    print(info, flush=True)


def render(rows, infos, peak, args) -> str:
    import transformers

    try:
        import torch_pruning

        tpv = torch_pruning.__version__
    except ImportError:
        tpv = "not installed"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    lines = [
        f"# Shrinking CNNs on {DEVICE.type} (bench/bench_shrink_conv.py)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {torch.get_num_threads()} torch threads"
        + (f"; GPU: {torch.cuda.get_device_name()} (fp32)" if DEVICE.type == "cuda" else ""),
        f"- python {sys.version.split()[0]}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, torch-pruning {tpv}",
        f"- command: `python bench/bench_shrink_conv.py {' '.join(sys.argv[1:])}`",
        f"- measured GEMM peak: {peak:.0f} GFLOP/s (floor = FLOPs / peak)",
        "",
        "| case | candidate | ms (median) | IQR | best dense / this | max rel. err |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        q1, q3 = r["iqr"]
        lines.append(
            f"| {r['case']} | {r['candidate']} | {r['ms']:.3f} | {q1:.3f}-{q3:.3f} | "
            f"{r['vs_best_dense']:.2f}x | {r['rel_err']:.1e} |"
        )
    lines += [
        "",
        "| case | params dense / sparta / other | shrunk nodes | compile s "
        "| floor ms dense / shrunk |",
        "|---|---|---|---|---|",
    ]
    for i in infos:
        p = i["params"]
        others = " / ".join(f"{k} {v:,}" for k, v in p.items() if k not in ("dense", "sparta"))
        fl = f"{i['flops'] / peak / 1e6:.3f}"
        if i["flops_shrunk"]:
            fl += f" / {i['flops_shrunk'] / peak / 1e6:.3f}"
        sp = "n/a" if p["sparta"] is None else f"{p['sparta']:,}"
        lines.append(
            f"| {i['case']} | {p['dense']:,} / {sp} / {others} | {i['shrunk_nodes']}/{i['nodes']} "
            f"| {i['compile_s']:.1f} | {fl} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
