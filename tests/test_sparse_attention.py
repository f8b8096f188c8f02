"""A fixed attention pattern applied with masked_fill(~pattern, -inf): scores and probabilities
are pruned outside it, and triton compiles the two matmuls into SDDMM / sparse-input kernels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import sparta

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter


class PatternAttention(nn.Module):
    def __init__(self, d: int = 16, length: int = 48, block: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        n = length // block
        blocks = torch.eye(n, dtype=torch.bool)
        blocks[:, 0] = True  # a global first block
        pattern = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
        self.register_buffer("pattern", pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~self.pattern, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


def test_scores_and_probabilities_pruned_outside_pattern() -> None:
    model = PatternAttention().eval()
    x = torch.randn(2, 48, 16)
    report = sparta.propagate(model, {}, (x,))
    pattern = model.pattern.expand(2, 48, 48)
    assert torch.equal(report.mask("softmax"), pattern)
    assert torch.equal(report.mask("matmul"), pattern)  # q @ k^T only needed inside
    assert report.tensor("softmax").pattern == "block(16x16)"
    assert sparta.check_soundness(model, {}, (x,)) < 1e-5


def test_all_minus_inf_row_is_not_claimed_zero() -> None:
    model = PatternAttention().eval()
    model.pattern[5] = False  # softmax of an all -inf row is NaN, not zero
    report = sparta.propagate(model, {}, (torch.randn(1, 48, 16),))
    assert bool(report.mask("softmax")[0, 5].all())


@pytest.mark.parametrize("dtype", [torch.float32])
def test_compiles_into_sddmm_and_sparse_input_kernels(dtype) -> None:
    pytest.importorskip("triton")
    model = PatternAttention().eval().to(DEVICE, dtype)
    x = torch.randn(2, 48, 16, dtype=dtype, device=DEVICE)
    compiled = sparta.compile(model, {}, (x,), backends=["triton"], measure=False)
    impls = {n.name: n.impl for n in compiled.report.nodes}
    assert impls["matmul"] == "triton-sddmm" and impls["matmul_1"] == "triton-sparse-input"
    fresh = torch.randn(2, 48, 16, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        assert torch.allclose(compiled(fresh), model(fresh), atol=1e-4, rtol=1e-4)


def test_saved_plan_holds_sddmm_and_sparse_input_kernels(tmp_path, monkeypatch) -> None:
    pytest.importorskip("triton")
    model = PatternAttention().eval().to(DEVICE)
    x = torch.randn(2, 48, 16, device=DEVICE)
    compiled = sparta.compile(model, {}, (x,), backends=["triton"], measure=False)
    compiled.save(tmp_path / "plan.sparta")
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "empty"))  # kernels generated again
    loaded = sparta.load(tmp_path / "plan.sparta", model)
    impls = {n.name: n.impl for n in loaded.report.nodes}
    assert impls["matmul"] == "triton-sddmm" and impls["matmul_1"] == "triton-sparse-input"
    fresh = torch.randn(3, 48, 16, device=DEVICE)  # another batch size
    with torch.no_grad():
        assert torch.equal(loaded(fresh), compiled(fresh))
        assert torch.allclose(loaded(fresh), model(fresh), atol=1e-4, rtol=1e-4)
