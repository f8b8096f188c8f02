"""The model zoo (tests/zoo.py): the models people prune, built as users build them, in strict
mode (Wav2Vec2 with a weight-normalised convolution, GPT-2 with tied weights and its cache,
ResNet with in-place residuals, Qwen3 with hand-written q/k norms). For each: propagation is
sound against ``sparta.masked_model`` on the example and on fresh inputs, and the compiled
module equals the masked model at another batch size (and sequence length); the user's model
is left as it was.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from zoo import HEADS, ZOO, build

import sparta

SLOW = {"mobilenet_v2", "efficientnet"}  # deep CNNs: hundreds of nodes


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _params():
    for name in ZOO:
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", _params())
def test_zoo_model(name: str) -> None:
    case = build(name)
    attrs = case.attrs()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own deprecation notes
        assert sparta.check_soundness(case.model, attrs, case.inputs, trials=1) < 1e-4
        # dense and shrink: the kernel families have tests of their own
        compiled = sparta.compile(
            case.model, attrs, case.inputs, backends=("dense", "shrink"), measure=False
        )
        reference = sparta.masked_model(case.model, attrs).eval()
        with torch.no_grad():
            got, want = compiled(*case.other), reference(*case.other)
    assert type(got) is type(want)
    got, want = _leaves(got), _leaves(want)
    assert len(got) == len(want) and want
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = w.abs().max().item() or 1.0
        assert (g - w).abs().max().item() / scale < 1e-4
    report = compiled.report
    given, after = report.weight_density()
    assert after <= given < 1.0
    assert not report.inferred_ops and not report.conservative_ops  # strict: every op has a rule
    now = case.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())
    CHECKS.get(name, lambda r, a: None)(report, attrs)


def _gpt2(report: sparta.Report, attrs: dict) -> None:
    """The LM head shares the token embedding: one tensor, both names, the given mask."""
    entry = report.tensor("transformer.wte.weight")
    assert entry.aliases == ["lm_head.weight"]
    assert entry.density_given == pytest.approx(
        float(attrs["transformer.wte.weight"].float().mean())
    )
    assert torch.equal(report.mask("lm_head.weight"), report.mask("transformer.wte.weight"))


def _qwen3(report: sparta.Report, attrs: dict) -> None:
    """Pruned heads of o_proj reach q_proj and k_proj through the hand-written q/k RMSNorm."""
    o = attrs["model.layers.0.self_attn.o_proj.weight"]
    head_dim = o.shape[1] // HEADS
    heads = o.any(dim=0).reshape(HEADS, head_dim).any(dim=1)
    assert not heads.all()
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows = report.mask(f"model.layers.0.self_attn.{proj}.weight").any(dim=1)
        assert torch.equal(rows.reshape(HEADS, head_dim).any(dim=1), heads), proj


def _resnet(report: sparta.Report, attrs: dict) -> None:
    assert not [n.target for n in report.nodes if n.target.split(".")[1].endswith("_")]


CHECKS = {"gpt2": _gpt2, "qwen3": _qwen3, "resnet": _resnet}
