"""sparsify() over models, masks_from() over torch.nn.utils.prune / torch.ao.pruning models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import parametrize, prune

import sparta
from sparta import AttrError
from sparta import sparsifiers as S
from sparta.sparsify import masks_from, plain_parameter_name, sparsify


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({f"grad:{n}": torch.tensor(p.requires_grad) for n, p in model.named_parameters()})
    return state


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- sparsify


def test_sparsify_globs_order_and_untouched_model() -> None:
    model = _net()
    before = _snapshot(model)
    spec = {"fc[12].weight": S.NM(2, 4), "fc3.weight": S.Magnitude(0.5), "*.bias": S.Threshold(0.1)}
    masks = sparsify(model, spec)
    assert list(masks) == [n for n, _ in model.named_parameters()]
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in masks.values())
    assert torch.equal(masks["fc1.weight"], S.NM(2, 4).mask(model.fc1.weight))
    assert torch.equal(masks["fc3.bias"], model.fc3.bias.abs() > 0.1)
    assert _same(before, _snapshot(model))
    again = sparsify(model, spec)
    assert all(torch.equal(masks[k], again[k]) for k in masks)


def test_sparsify_global_ranks_across_matched() -> None:
    model = _net()
    with torch.no_grad():
        model.fc2.weight.mul_(10)
    masks = sparsify(model, {"fc*.weight": S.GlobalMagnitude(0.5)})
    assert set(masks) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    # fc1 and fc3 (768 small elements) go almost entirely before the scaled-up fc2 loses much
    assert float(masks["fc2.weight"].float().mean()) > 0.8
    assert float(masks["fc1.weight"].float().mean()) < 0.1
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)


def test_sparsify_star_matches_across_dots_on_bert() -> None:
    from models import bert

    model, (ids,) = bert()
    spec = {
        # '*' spans dots; '?' is one character, so this does not match attention.output
        "encoder.layer.?.output.dense.weight": S.Channels(0.5, dim=1),
        "encoder.*.attention.output.dense.weight": S.Heads(4, 0.5, dim=1),
    }
    masks = sparsify(model, spec)
    assert sorted(masks) == [
        f"encoder.layer.{i}.{p}.dense.weight"
        for i in range(2)
        for p in ("attention.output", "output")
    ]
    assert str(sparta.TeSA(masks["encoder.layer.0.output.dense.weight"]).pattern) == "column"
    report = sparta.propagate(model, masks, (ids,))
    # unused input columns of output.dense prune the rows and bias of intermediate.dense,
    # unused head columns of attention.output.dense prune the heads' value rows
    for name in (
        "intermediate.dense.weight",
        "intermediate.dense.bias",
        "attention.self.value.weight",
    ):
        assert float(report.mask(f"encoder.layer.0.{name}").float().mean()) == 0.5, name
    with pytest.raises(AttrError, match="matched by two"):
        sparsify(model, {**spec, "encoder.layer.*.output.dense.weight": S.NM(2, 4)})


def test_sparsify_errors() -> None:
    model = _net()
    with pytest.raises(AttrError, match=r"'fc4\.weight'.*Did you mean.*'fc[123]\.weight'"):
        sparsify(model, {"fc4.weight": S.Magnitude(0.5)})
    with pytest.raises(AttrError, match=r"'fx\*\.weigth'.*Did you mean"):
        sparsify(model, {"fx*.weigth": S.Magnitude(0.5)})
    with pytest.raises(AttrError, match=r"'fc1\.weight' is matched by two.*'fc\*'.*'\*\.weight'"):
        sparsify(model, {"fc*": S.Magnitude(0.5), "*.weight": S.NM(2, 4)})
    with pytest.raises(AttrError, match="must map to a sparta.sparsifiers.Sparsifier"):
        sparsify(model, {"fc1.weight": 0.5})  # type: ignore[dict-item]


def test_sparsify_bad_glob_suggests_layer_globs() -> None:
    from models import bert

    model, _ = bert()
    with pytest.raises(AttrError, match=r"Did you mean 'encoder\.layer\.\*\.intermediate"):
        sparsify(model, {"encoder.*.intermediat.dense.weight": S.NM(2, 4)})


def test_five_lines_from_dense_to_compiled() -> None:
    """The README snippet (docs/sparsifiers.md), verbatim but for the model and measure=False."""
    from sparta.sparsifiers import Magnitude

    model = _net()
    x = torch.randn(4, 16)  # (seeded by _net)

    attrs = sparta.sparsify(model, {"fc*.weight": Magnitude(0.8)})  # {name: bool mask}
    compiled = sparta.compile(model, attrs, (x,), measure=False)
    y = compiled(x)  # == model with each matched weight multiplied by its mask

    ref = sparta.masked_model(model, attrs)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
    fresh = torch.randn(9, 16)
    torch.testing.assert_close(compiled(fresh), ref(fresh), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- masks_from


def test_plain_parameter_name() -> None:
    assert plain_parameter_name("fc1.weight_orig") == "fc1.weight"
    assert plain_parameter_name("fc1.parametrizations.weight.original") == "fc1.weight"
    assert plain_parameter_name("parametrizations.weight.original0") == "weight"
    assert plain_parameter_name("a.b.bias") == "a.b.bias"
    assert plain_parameter_name("_orig") == "_orig"


def test_masks_from_torch_prune() -> None:
    model = _net()
    prune.l1_unstructured(model.fc1, "weight", amount=0.6)
    prune.random_structured(model.fc2, "weight", amount=0.5, dim=0)
    prune.l1_unstructured(model.fc2, "weight", amount=0.3)  # combined into one buffer
    prune.l1_unstructured(model.fc3, "bias", amount=0.5)
    names = [n for n, _ in model.named_parameters()]
    assert "fc1.weight_orig" in names and "fc1.weight" not in names
    assert plain_parameter_name("fc1.weight_orig") == "fc1.weight"
    before = _snapshot(model)

    masks = masks_from(model)
    assert list(masks) == ["fc1.weight", "fc2.weight", "fc3.bias"]
    assert torch.equal(masks["fc1.weight"], model.fc1.weight_mask.bool())
    assert torch.equal(masks["fc2.weight"], model.fc2.weight_mask.bool())
    assert int((~masks["fc1.weight"]).sum()) == round(0.6 * 16 * 32)
    assert float(masks["fc2.weight"].float().mean()) < 0.5  # rows and then elements
    assert torch.equal(masks["fc3.bias"], model.fc3.bias != 0)
    assert masks["fc1.weight"].data_ptr() != model.fc1.weight_mask.data_ptr()
    assert _same(before, _snapshot(model))
    assert {plain_parameter_name(n) for n in names} >= set(masks)


def test_masks_from_torch_ao_pruning() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sparsifier = WeightNormSparsifier(
        sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2
    )
    sparsifier.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    assert "0.parametrizations.weight.original" in dict(model.named_parameters())
    before = _snapshot(model)

    masks = masks_from(model)
    assert list(masks) == ["0.weight", "2.weight"]
    assert torch.equal(masks["0.weight"], model[0].parametrizations.weight[0].mask.bool())
    assert str(sparta.TeSA(masks["0.weight"]).pattern) == "2:4"
    assert _same(before, _snapshot(model))
    with torch.no_grad():
        assert torch.equal(model[0].weight != 0, masks["0.weight"])


class _RowMask(nn.Module):
    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", rows)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask.unsqueeze(1)


def test_masks_from_row_mask_parametrization_and_clean_model() -> None:
    model = _net()
    rows = torch.arange(32) % 3 != 0
    parametrize.register_parametrization(model.fc2, "weight", _RowMask(rows))
    masks = masks_from(model)
    assert list(masks) == ["fc2.weight"]
    assert torch.equal(masks["fc2.weight"], rows.unsqueeze(1).expand(32, 32))
    assert masks_from(_net()) == {}


def test_pruned_models_compile_with_masks_from() -> None:
    """masks_from's plain names are accepted for the renamed parameters of pruned models. The
    reference is the unpruned model times the pruning tools' own mask buffers, built by
    sparta.masked_model: never the pruned model itself, whose graph applies the masks anyway.
    The same masks on an unpruned copy must give the same function (compile applies them)."""
    gen = torch.Generator().manual_seed(0)
    x, fresh = torch.randn(4, 16, generator=gen), torch.randn(7, 16, generator=gen)
    model = _net()
    clean = copy.deepcopy(model)
    prune.ln_structured(model.fc2, "weight", amount=0.5, n=2, dim=1)  # input columns
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    masks = masks_from(model)
    ref = sparta.masked_model(
        clean,
        {"fc1.weight": model.fc1.weight_mask.bool(), "fc2.weight": model.fc2.weight_mask.bool()},
    )
    with torch.no_grad():
        assert (ref(fresh) - clean(fresh)).abs().max() > 1e-2  # the masks matter
    for target in (model, clean):
        compiled = sparta.compile(target, masks, (x,), measure=False)
        torch.testing.assert_close(compiled(fresh), ref(fresh))
        # unused input features of fc2 spread back to fc1's rows and bias
        assert float(compiled.report.mask("fc1.bias").float().mean()) == 0.5

    torch.manual_seed(1)
    seq = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    clean_seq = copy.deepcopy(seq)
    sparsifier = WeightNormSparsifier(
        sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2
    )
    sparsifier.prepare(seq, [{"tensor_fqn": "0.weight"}])
    sparsifier.step()
    ref = sparta.masked_model(
        clean_seq, {"0.weight": seq[0].parametrizations.weight[0].mask.bool()}
    )
    with torch.no_grad():
        assert (ref(fresh) - clean_seq(fresh)).abs().max() > 1e-2
    for target in (seq, clean_seq):
        compiled = sparta.compile(target, masks_from(seq), (x,), measure=False)
        torch.testing.assert_close(compiled(fresh), ref(fresh))
