"""Products with a transposed 2-D parameter become aten.linear (sparta.normalize)."""

from __future__ import annotations

import pytest
import torch

import sparta
from sparta import masked_model as masked_reference
from sparta.normalize import LINEAR
from sparta.trace import trace


class Spellings(torch.nn.Module):
    """Every spelling of x @ W^T (+ b) that export produces, plus products that must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(48, 64))
        self.b = torch.nn.Parameter(torch.randn(48))
        self.sq = torch.nn.Parameter(torch.randn(64, 64))
        self.b2d = torch.nn.Parameter(torch.randn(5, 48))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        linear = (
            x @ self.w.T
            + x @ self.w.t()
            + torch.mm(x, self.w.transpose(0, 1))
            + torch.addmm(self.b, x, self.w.t())
        )
        batched = torch.matmul(y, self.w.mT) + y @ self.w.permute(1, 0)
        kept = (
            x @ self.sq  # not transposed: W is (K, N) here
            + torch.addmm(self.b, x, self.w.t(), beta=2.0)[:, :1]  # scaled bias
            + torch.addmm(self.b2d, x, self.w.t())[:, :1]  # (M, N) bias
            + x @ x.t()[:, :1]  # no parameter
        )
        return linear, batched, kept


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_spellings_become_linear_and_others_stay() -> None:
    model = Spellings()
    x, y = torch.randn(5, 64), torch.randn(2, 3, 64)
    traced = trace(model, (x, y))
    targets = _targets(traced.gm)
    assert targets.count(LINEAR) == 6
    assert targets.count(torch.ops.aten.addmm.default) == 2
    assert targets.count(torch.ops.aten.matmul.default) == 2
    lin_args = [n.args for n in traced.gm.graph.nodes if n.target is LINEAR]
    assert all(a[1] is traced.params["w"] for a in lin_args)
    # transposes that fed only rewritten products are gone; the kept addmms' and x.t() stay
    aten = torch.ops.aten
    assert targets.count(aten.t.default) == 3
    gone = (aten.numpy_T.default, aten.mT.default, aten.transpose.int, aten.permute.default)
    assert not set(targets) & set(gone)
    with torch.no_grad():
        fresh = (torch.randn(5, 64), torch.randn(4, 3, 64))  # the (M, N) bias pins M = 5
        for got, want in zip(traced.gm(*fresh), model(*fresh)):
            torch.testing.assert_close(got, want)


class AddmmMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(96, 64) / 8)
        self.b1 = torch.nn.Parameter(torch.randn(96))
        self.w2 = torch.nn.Parameter(torch.randn(32, 96) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.addmm(self.b1, x, self.w1.t()))
        return torch.matmul(h, self.w2.T)


@pytest.mark.parametrize("backend", ["nm_cpu", "triton"])
def test_addmm_and_matmul_layers_reach_sparse_backends(backend: str) -> None:
    from sparta.sparsifiers import NM

    model = AddmmMLP().eval()
    if backend == "nm_cpu":
        from sparta.codegen import nm_cpu

        if not nm_cpu.available():
            pytest.skip("no C++ compiler")
        attrs = sparta.sparsify(model, {"w1": NM(1, 4), "w2": NM(2, 8)})
    else:
        pytest.importorskip("triton")
        blocks = torch.rand(6, 4) < 0.5
        attrs = {"w1": blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)}
    x = torch.randn(40, 64)
    compiled = sparta.compile(model, attrs, (x,), backends=[backend], measure=False)
    impls = [n.impl for n in compiled.report.nodes if n.target == str(LINEAR)]
    assert impls.count(backend) == len(attrs)  # each masked weight (w2 may see a sparse input)
    ref = masked_reference(model, attrs)
    with torch.no_grad():
        for rows in (3, 40):
            fresh = torch.randn(rows, 64)
            torch.testing.assert_close(compiled(fresh), ref(fresh), rtol=1e-4, atol=1e-4)
