"""Graph-level checks of the rules through the engine on the reference models.

Structured masks (pruned FFN units, channels, heads) are propagated with ``sparta.propagate``;
``sparta.check_soundness`` zeroes every propagated mask in the traced graph and checks that the
outputs do not change, and the tests assert what propagation must find on the hard cases.
"""

from __future__ import annotations

import pytest
import torch
from models import MODELS

import sparta
from sparta.engine import propagate_graph
from sparta.propagate import Propagated, build_report, resolve_attrs
from sparta.soundness import max_violation
from sparta.trace import Traced, trace

H, DH = 64, 16  # hidden size and head dim of the transformer configs in tests/models.py


def keep_except(shape: tuple[int, ...], dim: int, pruned: list[int] | range) -> torch.Tensor:
    m = torch.ones(shape, dtype=torch.bool)
    m.index_fill_(dim, torch.tensor(list(pruned), dtype=torch.long), False)
    return m


_TRACED: dict[str, tuple[Traced, tuple, torch.nn.Module]] = {}


def _check(name: str, attrs: dict) -> sparta.Report:
    """Propagate (one trace per model for the whole module) and check soundness on the example
    and on fresh random float inputs, as sparta.check_soundness does."""
    if name not in _TRACED:
        model, args = MODELS[name]()
        _TRACED[name] = (trace(model, args), args, model)
    traced, args, model = _TRACED[name]
    given, nodes = resolve_attrs(traced, attrs)
    p = Propagated(traced, given, nodes, propagate_graph(traced, nodes), None)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    fresh = tuple(
        torch.randn(a.shape, generator=gen) if isinstance(a, torch.Tensor) and a.is_floating_point()
        else a
        for a in args
    )  # fmt: skip
    reference = sparta.masked_model(model, attrs).eval()
    for inputs in (args, fresh):
        worst = max_violation(p, reference, inputs, {})
        assert worst <= 1e-4, f"{name}: zeroing the propagated masks changed outputs by {worst:.3g}"
    return build_report(traced, nodes, p.result, 0.0)


def test_mlp_pruned_units_with_and_without_bias() -> None:
    units = range(0, 64, 2)
    attrs = {
        "fc1.weight": keep_except((64, 32), 0, units),
        "fc1.bias": keep_except((64,), 0, units),
    }
    rep = _check("mlp", attrs)
    assert not bool(rep.mask("fc2.weight")[:, list(units)].any())  # dead units: columns unused
    rep = _check("mlp", {"fc1.weight": attrs["fc1.weight"]})
    assert bool(rep.mask("fc2.weight").all())  # relu(bias) keeps the units alive
    # backward: output features fc3 never reads make fc2 rows, bias and fc1 nothing
    rep = _check("mlp", {"fc3.weight": keep_except((16, 64), 1, range(32))})
    assert not bool(rep.mask("fc2.weight")[:32].any()) and not bool(rep.mask("fc2.bias")[:32].any())


def test_cnn_channel_needs_conv_and_bn_shift_pruned() -> None:
    ch = [1, 5]
    conv_only = {
        "conv1.weight": keep_except((8, 3, 3, 3), 0, ch),
        "conv1.bias": keep_except((8,), 0, ch),
    }
    rep = _check("cnn", conv_only)
    assert bool(rep.mask("conv2.weight").all())  # batch norm's shift keeps the channels alive
    full = {
        **conv_only,
        "bn1.weight": keep_except((8,), 0, ch),
        "bn1.bias": keep_except((8,), 0, ch),
    }
    rep = _check("cnn", full)
    assert not bool(rep.mask("conv2.weight")[:, ch].any())
    assert bool(rep.mask("conv2.weight")[:, [0, 2, 3, 4, 6, 7]].all())
    # residual: conv2's output channels stay alive through the skip path, fc's pruned inputs not
    rep = _check("cnn", {"fc.weight": keep_except((10, 8), 1, [0, 3])})
    assert not bool(rep.mask("bn2.bias")[[0, 3]].any()) and not bool(
        rep.mask("conv2.bias")[[0, 3]].any()
    )


def qkv_name(model: str, layer: int, proj: str, p: str) -> str:
    if model == "vit":  # transformers 5 ViT: layers.N.attention.{q,k,v}_proj
        return f"layers.{layer}.attention.{proj[0]}_proj.{p}"
    return f"encoder.layer.{layer}.attention.self.{proj}.{p}"


def out_proj_name(model: str, layer: int) -> str:
    if model == "vit":
        return f"layers.{layer}.attention.o_proj.weight"
    return f"encoder.layer.{layer}.attention.output.dense.weight"


def ffn_names(model: str, layer: int) -> tuple[str, str]:
    if model == "vit":
        return f"layers.{layer}.mlp.fc1", f"layers.{layer}.mlp.fc2"
    return f"encoder.layer.{layer}.intermediate.dense", f"encoder.layer.{layer}.output.dense"


@pytest.mark.parametrize("name", ["bert_mask", "vit"])
def test_pruned_head_removes_its_qkv(name: str) -> None:
    head = range(DH, 2 * DH)  # head 1
    attrs = {out_proj_name(name, 0): keep_except((H, H), 1, head)}
    rep = _check(name, attrs)
    for proj in ("query", "key", "value"):
        for p in ("weight", "bias"):
            m = rep.mask(qkv_name(name, 0, proj, p))
            assert not bool(m[list(head)].any()), (proj, p)
            assert bool(m[:DH].all()), (proj, p)


@pytest.mark.parametrize("name", ["bert_mask", "vit"])
def test_pruned_ffn_units(name: str) -> None:
    units = list(range(0, 128, 4))
    fc1, fc2 = ffn_names(name, 1)
    attrs = {
        f"{fc1}.weight": keep_except((128, H), 0, units),
        f"{fc1}.bias": keep_except((128,), 0, units),
    }
    rep = _check(name, attrs)
    assert not bool(rep.mask(f"{fc2}.weight")[:, units].any())


@pytest.mark.parametrize("name", ["gpt2_mask"])
def test_gpt2_conv1d_units_and_heads(name: str) -> None:
    units = list(range(0, 128, 4))
    attrs = {
        "h.0.mlp.c_fc.weight": keep_except((H, 128), 1, units),  # Conv1D: (in, out)
        "h.0.mlp.c_fc.bias": keep_except((128,), 0, units),
        "h.1.attn.c_proj.weight": keep_except((H, H), 0, range(2 * DH, 3 * DH)),  # head 2
    }
    rep = _check(name, attrs)
    assert not bool(rep.mask("h.0.mlp.c_proj.weight")[units].any())
    qkv = rep.mask("h.1.attn.c_attn.weight")
    for third in range(3):  # q, k and v columns of head 2
        cols = [third * H + c for c in range(2 * DH, 3 * DH)]
        assert not bool(qkv[:, cols].any())
    assert bool(qkv[:, :DH].all())


def test_embedding_unused_feature_columns() -> None:
    """A hidden feature that nothing reads after the embeddings' LayerNorm shift is pruned
    only if the LayerNorm scale and shift are pruned too; the check must stay sound either way."""
    d = [3, 9]
    attrs = {
        "embeddings.word_embeddings.weight": keep_except((100, H), 1, d),
        "embeddings.position_embeddings.weight": keep_except((32, H), 1, d),
        "embeddings.token_type_embeddings.weight": keep_except((2, H), 1, d),
    }
    rep = _check("bert_mask", attrs)
    assert rep.mask("embeddings.LayerNorm.weight")[d].all()  # the group couples: still used
