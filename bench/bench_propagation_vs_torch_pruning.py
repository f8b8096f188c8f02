"""Propagation power: SparTA-py's propagated masks vs. Torch-Pruning's dependency groups.

On BERT, GPT-2, ViT (transformers, small configs, random weights) and a small ResNet-style
CNN, the same structured units are pruned (FFN units, attention heads, query rows of a head,
conv channels with their BatchNorm affine). For each case:

* SparTA-py: ``run_propagation(model, attrs, inputs, strict=False)``; pruned parameters are
  counted from the propagated masks of every parameter; soundness = the largest relative
  output change when every propagated mask is applied (``sparta.soundness.max_violation``).
* Torch-Pruning: ``DependencyGraph.get_pruning_group`` on the pruned layer's output channels
  with the same indices, ``group.prune()`` on a copy; pruned parameters = parameters before
  minus after. Its correctness = the relative output change of the pruned copy against the
  model with the given masks applied (the meaning of the masks).

Usage: ``python bench/bench_propagation_vs_torch_pruning.py [--out results.md] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

import sparta
from sparta.propagate import run_propagation
from sparta.scramble import INFERRED_RULE_NAME
from sparta.soundness import max_violation

TOL = 1e-4


@dataclass(frozen=True)
class Unit:
    """Output units ``idxs`` of the layer ``layer`` (weight rows of a Linear/Conv, columns of
    a transformers Conv1D), with the same channels of ``extra`` parameters (BatchNorm affine)."""

    layer: str
    idxs: tuple[int, ...]
    extra: tuple[str, ...] = ()


@dataclass
class Case:
    model: str
    kind: str
    build: Callable[[], nn.Module]
    inputs: tuple
    units: list[Unit]
    tp_roots: list[Unit] = field(default_factory=list)  # default: ``units``
    note: str = ""


# ------------------------------------------------------------------------------ models


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.block1 = Block(16)
        self.block2 = Block(16)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(32)
        self.block3 = Block(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        x = self.block3(torch.relu(self.bn_down(self.down(x))))
        return self.fc(x.mean(dim=(2, 3)))


class FlipNet(nn.Module):
    """conv -> bn -> relu -> flip channels -> conv: an op that moves channels around."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x))).flip(1)
        return self.fc(self.conv2(y).mean(dim=(2, 3)))


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            nn.init.normal_(m.weight, 1.0, 0.1, generator=gen)
            nn.init.normal_(m.bias, 0.0, 0.1, generator=gen)
    return model.eval()


def _hf(name: str) -> nn.Module:
    import transformers as tr

    torch.manual_seed(0)
    if name == "bert":
        cfg = tr.BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=32,
        )
        return tr.BertModel(cfg, add_pooling_layer=False).eval()
    if name == "gpt2":
        cfg = tr.GPT2Config(
            vocab_size=100,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=32,
            use_cache=False,
            bos_token_id=0,
            eos_token_id=0,
        )
        return tr.GPT2Model(cfg).eval()
    cfg = tr.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return tr.ViTModel(cfg, add_pooling_layer=False).eval()


# ------------------------------------------------------------------------------ cases


def _pick(gen: torch.Generator, n: int, k: int) -> tuple[int, ...]:
    return tuple(sorted(torch.randperm(n, generator=gen)[:k].tolist()))


def _head(gen: torch.Generator, heads: int, d: int) -> tuple[int, ...]:
    h = int(torch.randint(0, heads, (1,), generator=gen))
    return tuple(range(h * d, (h + 1) * d))


def cases(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (1, 16), generator=g)
    img = torch.randn(1, 3, 32, 32, generator=g)
    out: list[Case] = []
    layouts = {
        "bert": (
            "encoder.layer.{i}.intermediate.dense",
            "encoder.layer.{i}.attention.self.{p}",
            ("query", "key", "value"),
            ids,
        ),
        "vit": (
            "layers.{i}.mlp.fc1",
            "layers.{i}.attention.{p}",
            ("q_proj", "k_proj", "v_proj"),
            img,
        ),
    }
    for name, (ffn, attn, qkv, x) in layouts.items():
        label = {"bert": "BERT", "vit": "ViT"}[name]
        ffn_units = [Unit(ffn.format(i=i), _pick(g, 128, 64)) for i in range(2)]
        heads = [_head(g, 4, 16) for _ in range(2)]
        head_units = [Unit(attn.format(i=i, p=p), heads[i]) for i in range(2) for p in qkv]
        q_units = [Unit(attn.format(i=i, p=qkv[0]), heads[i]) for i in range(2)]

        def build(n: str = name) -> nn.Module:
            return _hf(n)

        out += [
            Case(label, "FFN units 50%", build, (x,), ffn_units),
            Case(
                label,
                "1 head/layer (Q,K,V rows)",
                build,
                (x,),
                head_units,
                tp_roots=[u for u in head_units if u.layer.endswith(qkv[0])],
            ),
            Case(label, "Q rows of 1 head/layer", build, (x,), q_units),
        ]
    # GPT-2: transformers Conv1D (weight is in x out), fused c_attn = [q | k | v]
    ffn_units = [Unit(f"h.{i}.mlp.c_fc", _pick(g, 256, 128)) for i in range(2)]
    heads = [_head(g, 4, 16) for _ in range(2)]
    head_units = [
        Unit(f"h.{i}.attn.c_attn", tuple(j + 64 * p for p in range(3) for j in heads[i]))
        for i in range(2)
    ]
    q_units = [Unit(f"h.{i}.attn.c_attn", heads[i]) for i in range(2)]

    def gpt2() -> nn.Module:
        return _hf("gpt2")

    out += [
        Case("GPT-2", "FFN units 50%", gpt2, (ids,), ffn_units),
        Case("GPT-2", "1 head/layer (Q,K,V cols)", gpt2, (ids,), head_units),
        Case("GPT-2", "Q cols of 1 head/layer", gpt2, (ids,), q_units),
    ]

    def cnn() -> nn.Module:
        torch.manual_seed(0)
        return _randomise_bn(SmallResNet(), torch.Generator().manual_seed(1))

    inner = [
        Unit(f"{b}.conv1", _pick(g, c, c // 2), (f"{b}.bn1",))
        for b, c in (("block1", 16), ("block2", 16), ("block3", 32))
    ]
    stream = [Unit("stem", _pick(g, 16, 4), ("bn",))]
    out += [
        Case("ResNet-style CNN", "inner block channels 50%", cnn, (img,), inner),
        Case("ResNet-style CNN", "residual-stream channels 25% (stem only)", cnn, (img,), stream),
    ]

    def flipnet() -> nn.Module:
        torch.manual_seed(0)
        return _randomise_bn(FlipNet(), torch.Generator().manual_seed(1))

    out.append(
        Case(
            "CNN with channel flip",
            "conv1 channels 50%",
            flipnet,
            (img,),
            [Unit("conv1", _pick(g, 16, 8), ("bn1",))],
        )
    )
    return out


# ------------------------------------------------------------------------------ masks


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D"


def attrs_of(model: nn.Module, units: list[Unit]) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) of the parameters the units prune."""
    attrs: dict[str, torch.Tensor] = {}

    def prune(pname: str, dim: int, idxs: tuple[int, ...]) -> None:
        p = model.get_parameter(pname)
        m = attrs.setdefault(pname, torch.ones(p.shape, dtype=torch.bool))
        m.index_fill_(dim, torch.tensor(idxs), False)

    for u in units:
        layer = model.get_submodule(u.layer)
        prune(f"{u.layer}.weight", 1 if _is_conv1d(layer) else 0, u.idxs)
        if getattr(layer, "bias", None) is not None:
            prune(f"{u.layer}.bias", 0, u.idxs)
        for e in u.extra:
            prune(f"{e}.weight", 0, u.idxs)
            prune(f"{e}.bias", 0, u.idxs)
    return attrs


def masked_copy(model: nn.Module, attrs: dict[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in attrs.items():
            m.get_parameter(name).mul_(mask)
    return m


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


def rel_change(ref: torch.Tensor, got: torch.Tensor) -> float:
    if ref.shape != got.shape:
        return float("inf")
    return float((ref - got).abs().max() / (ref.abs().max() + 1e-12))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ the two tools


@dataclass
class Outcome:
    pruned: int | None
    change: float | None  # relative output change (soundness / correctness)
    note: str = ""
    seconds: float = 0.0


def run_sparta(case: Case, model: nn.Module, attrs: dict[str, torch.Tensor]) -> Outcome:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            p = run_propagation(model, attrs, case.inputs, strict=False)
        except Exception as e:  # report, don't hide
            return Outcome(None, None, f"failed: {type(e).__name__}: {str(e)[:120]}")
        seconds = time.perf_counter() - start
        pruned = sum(int((~p.report.mask(n)).sum()) for n, _ in model.named_parameters())
        change = max_violation(p, sparta.masked_model(model, attrs).eval(), case.inputs, {})
    nodes = p.report.to_dict()["nodes"]
    inferred = sorted({n["target"] for n in nodes if n["rule"] == INFERRED_RULE_NAME})
    conservative = sorted({n["target"] for n in nodes if str(n["rule"]).startswith("conserv")})
    note = []
    if inferred:
        note.append("scrambled: " + ", ".join(t.replace("aten.", "") for t in inferred))
    if conservative:
        note.append("no rule: " + ", ".join(t.replace("aten.", "") for t in conservative))
    return Outcome(pruned, change, "; ".join(note), seconds)


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace transformers' Conv1D (y = x @ W + b, W: in x out) by the equal nn.Linear,
    which Torch-Pruning can trace. Returns how many were replaced."""
    count = 0
    for mod in list(model.modules()):
        for cname, child in list(mod.named_children()):
            if _is_conv1d(child):
                lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    lin.weight.copy_(child.weight.t())
                    lin.bias.copy_(child.bias)
                setattr(mod, cname, lin)
                count += 1
    return count


def fix_head_attributes(model: nn.Module) -> None:
    """The manual step Torch-Pruning leaves to the user after pruning heads: GPT-2 splits its
    fused qkv projection by ``split_size``, which must follow the pruned width."""
    for m in model.modules():
        if hasattr(m, "split_size") and isinstance(getattr(m, "c_attn", None), nn.Linear):
            m.split_size = m.c_attn.out_features // 3


def run_tp(case: Case, model: nn.Module, attrs: dict[str, torch.Tensor]) -> Outcome:
    import torch_pruning as tp

    start = time.perf_counter()
    pruned_model = copy.deepcopy(model)
    replaced = conv1d_to_linear(pruned_model)
    before = n_params(pruned_model)
    inputs = case.inputs[0]
    example = {"input_ids": inputs} if inputs.dtype == torch.long else inputs
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(pruned_model, example_inputs=example)
            for u in case.tp_roots or case.units:
                layer = pruned_model.get_submodule(u.layer)
                if isinstance(layer, nn.Conv2d):
                    fn = tp.prune_conv_out_channels
                else:
                    fn = tp.prune_linear_out_channels
                group = dg.get_pruning_group(layer, fn, idxs=list(u.idxs))
                if not dg.check_pruning_group(group):
                    return Outcome(None, None, f"group of {u.layer} rejected by TP")
                group.prune()
    except Exception as e:
        return Outcome(None, None, f"failed: {type(e).__name__}: {str(e)[:120]}")
    seconds = time.perf_counter() - start
    pruned = before - n_params(pruned_model)
    fix_head_attributes(pruned_model)
    ref = first_tensor(masked_copy(model, attrs)(*case.inputs))
    try:
        with torch.no_grad():
            got = first_tensor(pruned_model(*case.inputs))
        change = rel_change(ref, got)
        note = "" if change <= TOL else "pruned model's outputs differ from the masked model"
        if replaced:
            note = "; ".join(
                filter(
                    None, [f"{replaced} Conv1D -> nn.Linear first (TP does not trace Conv1D)", note]
                )
            )
    except Exception as e:
        change, note = float("inf"), f"pruned model fails: {type(e).__name__}: {str(e)[:100]}"
    return Outcome(pruned, change, note, seconds)


# ------------------------------------------------------------------------------ report


def _pct(x: int | None, total: int) -> str:
    return "-" if x is None else f"{100 * x / total:.2f}% ({x})"


def _ok(change: float | None) -> str:
    if change is None:
        return "-"
    return f"yes ({change:.1e})" if change <= TOL else f"**no** ({change:.1e})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    import torch_pruning as tp
    import transformers as tr

    lines = [
        f"# Propagation power: SparTA-py vs Torch-Pruning ({datetime.date.today()})",
        "",
        f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
        f"transformers {tr.__version__}, torch-pruning {tp.__version__}, "
        f"python {platform.python_version()}, seed {args.seed}. Small configs, random weights "
        f"(BERT/ViT: hidden 64, 2 layers, 4 heads, FFN 128; GPT-2: n_embd 64, 2 layers, "
        f"4 heads; CNN: 3 basic blocks, 16/32 channels, eval-mode BatchNorm).",
        "",
        "Pruned = parameters that can be removed, as a share of all parameters "
        "(count). *Given* = what the masks prune themselves. *Sound* = applying everything "
        "the tool prunes leaves the outputs of the masked model unchanged (max relative "
        f"change, tolerance {TOL:g}).",
        "",
        "| model | masks | params | given | SparTA-py pruned | sound | Torch-Pruning pruned "
        "| sound | SparTA-py notes | Torch-Pruning notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases(args.seed):
        model = case.build()
        attrs = attrs_of(model, case.units)
        given = sum(int((~m).sum()) for m in attrs.values())
        total = n_params(model)
        s = run_sparta(case, model, attrs)
        t = run_tp(case, model, attrs)
        row = (
            f"| {case.model} | {case.kind} | {total} | {_pct(given, total)} | "
            f"{_pct(s.pruned, total)} | {_ok(s.change)} | {_pct(t.pruned, total)} | "
            f"{_ok(t.change)} | {s.note} | {t.note} |"
        )
        print(row, f"[{s.seconds:.1f}s / {t.seconds:.1f}s]", file=sys.stderr)
        lines.append(row)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
