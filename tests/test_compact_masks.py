"""Compact masks (``sparta.tesa.compact``): stride-0 views of a mask's distinct slice.

The mask arithmetic must give what plain bool tensor ops give on every mix of compact and full
operands, and propagation must find the same masks with compaction on and off, while holding
structured weight masks in a fraction of their size.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sparta import tesa
from sparta.engine import propagate_graph
from sparta.propagate import resolve_attrs
from sparta.trace import trace

SHAPE = (300, 260)  # 78000 elements: above COMPACT_MIN


def _variants(g: torch.Generator) -> list[torch.Tensor]:
    rows = torch.rand(SHAPE[0], 1, generator=g) < 0.5
    cols = torch.rand(1, SHAPE[1], generator=g) < 0.5
    return [
        torch.rand(SHAPE, generator=g) < 0.5,  # unstructured
        rows.expand(SHAPE).clone(),  # rows: constant along dim 1
        cols.expand(SHAPE).clone(),  # columns
        rows & cols,  # both: constant along neither
        torch.ones(SHAPE, dtype=torch.bool),
        torch.zeros(SHAPE, dtype=torch.bool),
    ]


def test_compact_holds_the_same_mask_in_less_memory() -> None:
    g = torch.Generator().manual_seed(1)
    unstructured, rows, cols, both, kept, pruned = _variants(g)
    for m, dims in ((unstructured, ()), (rows, (1,)), (cols, (0,)), (both, ()),
                    (kept, (0, 1)), (pruned, (0, 1))):  # fmt: skip
        c = tesa.compact(m)
        assert torch.equal(c, m)
        assert tesa.broadcast_dims(c) == dims
        assert tesa.core(c).shape == tuple(1 if d in dims else s for d, s in enumerate(SHAPE))
        if dims:
            assert c.untyped_storage().nbytes() < m.numel() // 100  # no view of the full mask
    assert tesa.all_kept_view(tesa.compact(kept))
    small = torch.ones(10, 10, dtype=torch.bool)
    assert tesa.compact(small) is small  # below COMPACT_MIN: left alone
    assert torch.equal(tesa.reduced(small), torch.ones(1, 1, dtype=torch.bool))
    assert tesa.reduced(rows).shape == (SHAPE[0], 1)


@pytest.mark.parametrize("compact_a,compact_b", list(itertools.product((False, True), repeat=2)))
def test_mask_arithmetic_matches_plain_tensor_ops(compact_a: bool, compact_b: bool) -> None:
    g = torch.Generator().manual_seed(2)
    masks = _variants(g)
    for a, b in itertools.product(masks, repeat=2):
        ca = tesa.compact(a) if compact_a else a
        cb = tesa.compact(b) if compact_b else b
        assert torch.equal(tesa.and_(ca, cb), a & b)
        assert torch.equal(tesa.or_(ca, cb), a | b)
        assert tesa.same(ca, cb) == torch.equal(a, b)
    for a in masks:
        c = tesa.compact(a)
        assert tesa.all_(c) == bool(a.all())
        assert tesa.count_kept(c) == int(a.sum())
        assert torch.equal(tesa.any_(c), a.any())
        for dim in (0, 1, (0,), (1,), (0, 1)):
            for keep in (False, True):
                assert torch.equal(
                    tesa.any_(c, dim=dim, keepdim=keep), a.any(dim=dim, keepdim=keep)
                )
        assert str(tesa.detect_pattern(c)) == str(tesa.detect_pattern(a))
    col, row = masks[1][:, :1], masks[2][:1]
    for x, y in itertools.product((col, torch.ones_like(col)), (row, torch.ones_like(row))):
        assert torch.equal(tesa.outer_and(x, y), x & y)


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(256, 512)
        self.down = torch.nn.Linear(512, 256)
        self.out = torch.nn.Linear(256, 384)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.down(torch.relu(self.up(x)))) + x)


def test_propagation_is_the_same_with_compaction_off(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    model = _Mlp().eval()
    x = torch.randn(2, 64, 256, generator=g)
    units = torch.rand(512, 1, generator=g) < 0.5
    attrs = {
        "up.weight": units.expand(512, 256).clone(),  # pruned units: rows of up, and biases
        "up.bias": units[:, 0].clone(),
        "out.weight": torch.rand(384, 256, generator=g) < 0.3,  # unstructured
    }
    traced = trace(model, (x,), None)
    _, given = resolve_attrs(traced, attrs)
    on = propagate_graph(traced, given).masks
    monkeypatch.setattr(tesa, "COMPACT_MIN", 1 << 60)
    monkeypatch.setattr(tesa.compact, "__defaults__", (1 << 60,))
    off = propagate_graph(traced, given).masks
    assert on.keys() == off.keys()
    for n in on:
        a, b = on[n], off[n]
        pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
        for p, q in pairs:
            assert (p is None) == (q is None)
            if p is not None:
                assert torch.equal(p, q), n.name
    down = traced.params["down.weight"]
    assert tesa.broadcast_dims(on[down]) == (0,)  # dead input columns: held as one row
    assert not torch.equal(on[down], torch.ones_like(on[down]))
