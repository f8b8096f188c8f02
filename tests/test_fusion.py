"""The gated-MLP SwiGLU kernel: exact against its reference and through sparta.compile (CPU:
Triton interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("triton")

import sparta  # noqa: E402
from sparta.codegen import triton_gen  # noqa: E402
from sparta.codegen.triton_swiglu import build_block_sparse_swiglu  # noqa: E402
from sparta.codegen.triton_tune import LinearConfig  # noqa: E402
from sparta.kernels import triton_swiglu  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_gen.available(DEVICE), reason="Triton cannot run here")
TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))


def blocks(n: int, k: int, b: int, density: float) -> torch.Tensor:
    coarse = torch.rand(-(-n // b), -(-k // b)) < density
    return coarse.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k].to(DEVICE)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize(
    "cfg",
    [
        # the default: INTERPRETER_CONFIG in the interpreter, a tile that fits these sizes on a GPU
        None if DEVICE.type == "cpu" else LinearConfig.single(64, 32, (False, 64, 4, 3)),
        LinearConfig.single(32, 16, (True, 16, 4, 3)),
        LinearConfig.single(16, 32, (False, 16, 4, 3)),
    ],
)
def test_swiglu_kernel_matches_reference(dtype, cfg) -> None:
    for n, k, m, bias in ((64, 96, 5, True), (70, 50, 17, False)):  # ragged N and K too
        wg, wu = (torch.randn(n, k, dtype=dtype, device=DEVICE) for _ in range(2))
        mg, mu = blocks(n, k, 8, 0.4), blocks(n, k, 8, 0.4)  # different masks, one tiling
        bg = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
        mod = build_block_sparse_swiglu(wg, mg, bg, wu, mu, None, config=cfg)
        x = torch.randn(2, m, k, dtype=dtype, device=DEVICE)
        ref = triton_swiglu.reference(x, wg, mg, bg, wu, mu, None)
        y = mod(x)
        assert y.shape == ref.shape and not torch.isnan(y).any()
        assert float((y.float() - ref).norm() / ref.norm()) < TOL[dtype]


def covering(n: int, k: int, b: int = 16) -> torch.Tensor:
    """Random b x b blocks, with every block row and column keeping one (nothing shrinks)."""
    nb, kb = n // b, k // b
    coarse = torch.rand(nb, kb) < 0.3
    coarse[torch.arange(max(nb, kb)) % nb, torch.arange(max(nb, kb)) % kb] = True
    return coarse.repeat_interleave(b, 0).repeat_interleave(b, 1)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(32, 64, bias=False), nn.Linear(32, 64, bias=False)
        self.down = nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_gated_mlp_runs_one_swiglu_kernel_through_compile(monkeypatch, tmp_path) -> None:
    import sparta.fusion as fusion
    from sparta.codegen.triton_ops import BLOCK_SPARSE_SWIGLU

    real = fusion.compare_ms

    def fused_fastest(fns, dev, **kw):
        real(fns, dev, **kw)  # run every candidate once: they must all work
        return {k: {"triton-swiglu": 1.0}.get(k, 2.0) for k in fns}

    monkeypatch.setattr(fusion, "compare_ms", fused_fastest)
    torch.manual_seed(0)
    model = Gated().to(DEVICE).eval()
    attrs = {f"{n}.weight": covering(*m.weight.shape) for n, m in model.named_children()}
    x = torch.randn(6, 32, device=DEVICE)
    compiled = sparta.compile(model, attrs, (x,), backends=["triton"], measure=False)
    impls = {n.name: c.impl for n, c in compiled.plan.choices.items()}
    assert sorted(impls.values()) == ["fused", "triton", "triton-swiglu"]
    targets = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count(BLOCK_SPARSE_SWIGLU) == 1
    assert torch.ops.aten.silu.default not in targets and torch.ops.aten.mul.Tensor not in targets
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        for rows in (1, 6, 9):
            fresh = torch.randn(rows, 32, device=DEVICE)
            want = ref(fresh)
            assert float((compiled(fresh) - want).norm() / want.norm()) < 1e-4
    explained = torch._dynamo.explain(compiled)(x)
    assert explained.graph_break_count == 0
    # a saved plan holds the SwiGLU kernel: loaded without planning, the same answers
    path = tmp_path / "gated.sparta"
    compiled.save(path)
    loaded = sparta.load(path, model)
    assert {n.name: n.impl for n in loaded.report.nodes} == {
        n.name: n.impl for n in compiled.report.nodes
    }
    with torch.no_grad():
        fresh = torch.randn(5, 32, device=DEVICE)
        torch.testing.assert_close(loaded(fresh), compiled(fresh), rtol=0, atol=0)
