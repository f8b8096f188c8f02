"""Decomposition of mixed masks (``sparta/decompose.py``): the splits partition the kept set
exactly, and a decomposed node computes the masked model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparta
from sparta import decompose
from sparta.families import skips_tiles
from sparta.tesa import group_counts


def nm_plus_scattered(rows: int, cols: int, extra: float, seed: int = 0) -> torch.Tensor:
    """A 2:4 mask along the inputs with ``extra`` of the other weights kept too."""
    g = torch.Generator().manual_seed(seed)
    pad = -cols % 4
    idx = torch.rand(rows, (cols + pad) // 4, 4, generator=g).argsort(-1)[..., :2]
    nm = torch.zeros(rows, (cols + pad) // 4, 4, dtype=torch.bool).scatter_(-1, idx, True)
    return nm.reshape(rows, -1)[:, :cols] | (torch.rand(rows, cols, generator=g) < extra)


def blocks_plus_scattered(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A quarter of the 32x32 blocks kept whole, 2% of the other weights scattered."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(-(-rows // 32), -(-cols // 32), generator=g) < 0.25
    dense = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)[:rows, :cols]
    return dense | (torch.rand(rows, cols, generator=g) < 0.02)


@pytest.mark.parametrize("shape", [(64, 128), (37, 70), (1, 9)])
@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 8)])
def test_split_nm_partitions_the_mask(shape, n, m) -> None:
    mask = torch.rand(*shape) < 0.6
    part, rest = decompose.split_nm(mask, n, m)
    assert torch.equal(part | rest, mask) and not bool((part & rest).any())
    assert bool((group_counts(part, m) <= n).all())
    assert torch.equal(group_counts(part, m), group_counts(mask, m).clamp(max=n))


@pytest.mark.parametrize("shape", [(128, 256), (100, 196)])
def test_split_blocks_leaves_a_24_residual(shape) -> None:
    mask = blocks_plus_scattered(*shape)
    split = decompose.gpu_split(mask)
    assert split is not None and split.name == "triton+cusparselt"
    part, rest = split.masks
    assert torch.equal(part | rest, mask) and not bool((part & rest).any())
    assert bool((group_counts(rest, 4) <= 2).all()) and skips_tiles(part)
    assert decompose.gpu_split(torch.rand(64, 64) < 0.9) is None  # no 2:4 rest


def test_cpu_split_is_proposed_only_where_it_can_pay() -> None:
    split = decompose.cpu_split(nm_plus_scattered(64, 128, 0.04))
    assert split is not None and split.name == "nm_cpu+sparse_cpu"
    assert (split.patterns[0].n, split.patterns[0].m) == (2, 4)
    assert decompose.cpu_split(torch.rand(64, 128) < 0.1) is None  # unstructured 90%: no n:m core


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(96, 128), nn.Linear(128, 40)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _decomposition_wins(monkeypatch) -> None:
    from sparta import plan as planner

    def fixed(candidates, device, device_time=False):  # every candidate runs, the split wins
        for run in candidates.values():
            run()
        return {k: 1.0 if "+" in k.removeprefix("shrink+") else 2.0 for k in candidates}

    monkeypatch.setattr(planner, "compare_ms", fixed)


def test_decomposed_nodes_compute_the_masked_model(monkeypatch, tmp_path) -> None:
    from sparta.codegen import nm_cpu

    if not nm_cpu.available():
        pytest.skip("no C++ compiler")
    _decomposition_wins(monkeypatch)
    torch.manual_seed(0)
    model = Block().eval()
    attrs = {
        "fc1.weight": nm_plus_scattered(128, 96, 0.05),
        "fc2.weight": nm_plus_scattered(40, 128, 0.03, 1),
    }
    backends = ["dense", "nm_cpu", "sparse_cpu"]
    compiled = sparta.compile(model, attrs, (torch.randn(4, 96),), backends=backends, measure=False)
    impls = {n.name: n.impl for n in compiled.report.nodes}
    assert impls["linear"] == impls["linear_1"] == "nm_cpu+sparse_cpu", impls
    assert impls["gelu"] == "dense"  # the activation runs after the sum
    reference = sparta.masked_model(model, attrs)
    for shape in ((1, 96), (7, 96), (2, 33, 96)):
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x), reference(x), rtol=1e-5, atol=1e-5)
    compiled.save(tmp_path / "p.sparta")
    loaded = sparta.load(tmp_path / "p.sparta", model)
    assert {n.name: n.impl for n in loaded.report.nodes} == impls
    x = torch.randn(5, 96)
    torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_block_plus_24_decomposition_on_the_gpu(monkeypatch) -> None:
    _decomposition_wins(monkeypatch)
    torch.manual_seed(0)
    layer = nn.Linear(256, 512).cuda().half().eval()
    mask = blocks_plus_scattered(512, 256)
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    backends = ["dense", "triton", "cusparselt"]
    compiled = sparta.compile(
        layer, {"weight": mask}, (x,), backends=backends, mode="eager", measure=False
    )
    (choice,) = compiled.plan.choices.values()
    assert choice.impl == "triton+cusparselt", choice.candidates
    reference = sparta.masked_model(layer, {"weight": mask})
    for tokens in (1, 64, 300):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.half)
        torch.testing.assert_close(compiled(x), reference(x), rtol=2e-2, atol=2e-2)
