"""The public contract: errors, report shape, masks, the user's inputs untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from models import MODELS

import sparta
from sparta.sparsifiers import NM
from sparta.tesa import Pattern


def mlp():
    return MODELS["mlp"]()


def test_unknown_attribute_suggests_close_matches() -> None:
    model, x = mlp()
    with pytest.raises(sparta.AttrError, match=r"Did you mean 'fc1\.weight'"):
        sparta.propagate(model, {"fc1.weigth": torch.ones(64, 32, dtype=torch.bool)}, x)


def test_wrong_shape_names_both_shapes() -> None:
    model, x = mlp()
    with pytest.raises(sparta.AttrError, match=r"\(3, 3\).*\(64, 32\)"):
        sparta.propagate(model, {"fc1.weight": torch.ones(3, 3, dtype=torch.bool)}, x)


def test_non_boolean_mask_is_rejected() -> None:
    model, x = mlp()
    with pytest.raises(sparta.AttrError, match="dtype torch.bool"):
        sparta.propagate(model, {"fc1.weight": torch.ones(64, 32)}, x)


def test_untraceable_model_raises_trace_error() -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent Python control flow
                return x * 2
            return x

    with pytest.raises(sparta.TraceError, match="torch.export"):
        sparta.propagate(DataDependent(), {}, (torch.randn(3),))


def test_missing_rule_in_strict_mode_prints_a_stub() -> None:
    class Renorm(torch.nn.Module):
        def forward(self, x):
            return torch.renorm(x, 2, 0, 1.0)

    with pytest.raises(sparta.MissingRuleError) as e:
        sparta.propagate(Renorm(), {}, (torch.randn(2, 5),))
    text = str(e.value)
    assert "aten.renorm" in text and "schema" in text and "@sparta.register_rule" in text


def test_report_contract_and_inputs_untouched() -> None:
    model, (x,) = mlp()
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(64, 32, generator=gen) < 0.5
    x_mask = (torch.rand(32, generator=gen) < 0.75).expand(4, 32).clone()  # prunes features
    mask_copy, x_copy, x_mask_copy = mask.clone(), x.clone(), x_mask.clone()
    report = sparta.propagate(model, {"fc1.weight": sparta.TeSA.from_mask(mask), "x": x_mask}, (x,))
    d = json.loads(json.dumps(report.to_dict()))
    kinds = {t["kind"] for t in d["tensors"]}
    assert kinds == {"parameter", "input", "activation", "output"}
    for t in d["tensors"]:
        assert set(t) >= {"name", "kind", "shape", "density_given", "density", "pattern"}
    for n in d["nodes"]:
        assert set(n) >= {"name", "target", "rule", "weight", "impl", "latency_ms"}
    linears = [n for n in report.nodes if n.target == "aten.linear.default"]
    assert [n.weight for n in linears][:2] == ["fc1.weight", "fc2.weight"]
    w = report.tensor("fc1.weight")
    assert w.density_given == pytest.approx(mask.float().mean().item())
    x_density = x_mask.float().mean().item()
    assert report.tensor("x").density_given == pytest.approx(x_density) and x_density < 1
    # pruned input features leave the matching weight columns unused
    assert torch.equal(report.mask("fc1.weight"), mask & x_mask[0])
    assert torch.equal(report.mask("x"), x_mask)
    assert (
        torch.equal(mask, mask_copy) and torch.equal(x, x_copy) and torch.equal(x_mask, x_mask_copy)
    )
    assert "weights kept" in str(report)
    assert any("linear_1 " in line and "fc2.weight" in line for line in str(report).splitlines())


def test_pruned_output_unit_propagates_backward_to_previous_layer() -> None:
    model, x = mlp()
    cols = torch.ones(64, 64, dtype=torch.bool)
    cols[:, :40] = False  # fc2 ignores 40 of fc1's units (after relu, dropout)
    report = sparta.propagate(model, {"fc2.weight": cols}, x)
    assert report.mask("fc1.weight")[:40].sum() == 0 and report.mask("fc1.bias")[:40].sum() == 0
    assert report.tensor("fc1.weight").pattern == "row"


def test_plot_writes_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model, x = mlp()
    mask = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) < 0.3
    report = sparta.propagate(model, {"fc1.weight": mask}, x)
    report.plot(str(tmp_path / "d.png"))
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_tesa_patterns_and_digest() -> None:
    torch.manual_seed(0)
    m = torch.zeros(128, 96, dtype=torch.bool)
    m[:32, 32:64] = True
    t = sparta.TeSA(m)
    assert t.pattern == Pattern("block", block=(32, 32))
    assert t.digest == sparta.TeSA(m.clone()).digest
    assert sparta.TeSA(torch.ones(4, 4, dtype=torch.bool)).pattern.kind == "dense"
    nm = (torch.rand(8, 16).reshape(-1, 4).argsort(1) < 2).reshape(8, 16)
    assert str(sparta.TeSA(nm).pattern) == "2:4"
    # K not a multiple of m: the last, shorter group keeps at most n (as NM makes it)
    ragged = NM(1, 10).mask(torch.randn(6, 768))
    assert str(sparta.TeSA(ragged).pattern) == "1:10"
    assert str(sparta.TeSA(NM(2, 4).mask(torch.randn(5, 18))).pattern) == "2:4"
    assert sparta.TeSA(ragged, "1:10").pattern.m == 10
    over = ragged.clone()
    over[0, -8:] = True  # the short last group keeps 8 > 1
    assert sparta.TeSA(over).pattern.kind == "unstructured"
    with pytest.raises(sparta.AttrError, match="does not satisfy"):
        sparta.TeSA(over, "1:10")
    with pytest.raises(sparta.AttrError, match="does not satisfy"):
        sparta.TeSA(torch.rand(8, 8) > 0.5, "block(4x4)")


def test_pruned_model_compiles_with_plain_names() -> None:
    import torch.nn.utils.prune as prune

    model, (x,) = mlp()
    clean = copy.deepcopy(model)
    prune.l1_unstructured(model.fc1, "weight", 0.5)
    compiled = sparta.compile(model, sparta.masks_from(model), (x,), measure=False)
    assert compiled.report.mask("fc1.weight").float().mean().item() == pytest.approx(0.5)
    # the reference: the unpruned model masked with prune's own buffer, not the pruned model
    ref = sparta.masked_model(clean, {"fc1.weight": model.fc1.weight_mask.bool()})
    with torch.no_grad():
        fresh = torch.randn(6, 32)
        assert torch.allclose(compiled(fresh), ref(fresh), atol=1e-5)
