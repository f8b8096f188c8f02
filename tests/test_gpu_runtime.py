"""On a CUDA GPU: the runtimes against the masked model, the Triton kernels as triton_ops under
Inductor and CUDA graphs, device-time planning (``pytest -m gpu``; CPU runs skip these)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparta

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class Block(nn.Module):
    """An FFN with a residual and a norm: the dense remainder Inductor fuses."""

    def __init__(self, d: int = 512, f: int = 2048) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


def block_attrs(model: Block) -> dict[str, torch.Tensor]:
    from sparta.sparsifiers import BlockMagnitude

    return sparta.sparsify(model, {"fc*.weight": BlockMagnitude((32, 32), 0.9)})


@pytest.mark.parametrize("mode", ["eager", "default", "reduce-overhead"])
def test_runtimes_match_the_masked_model(mode: str) -> None:
    torch.manual_seed(0)
    model = Block().to(DEV, torch.float16).eval()
    attrs = block_attrs(model)
    x = torch.randn(8, 256, 512, device=DEV, dtype=torch.float16)
    compiled = sparta.compile(model, attrs, (x,), backends=["triton"], mode=mode)
    assert {c.impl for c in compiled.plan.choices.values()} == {"triton"}
    assert mode.split("-")[0] in compiled.report.runtime or mode == "default"
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        for batch in (8, 3):
            fresh = torch.randn(batch, 256, 512, device=DEV, dtype=torch.float16)
            assert rel(compiled(fresh).clone(), ref(fresh)) < 5e-3


def test_fullgraph_compile_of_the_compiled_model() -> None:
    torch.manual_seed(0)
    model = Block().to(DEV, torch.float16).eval()
    attrs = block_attrs(model)
    x = torch.randn(4, 128, 512, device=DEV, dtype=torch.float16)
    compiled = sparta.compile(model, attrs, (x,), backends=["triton"], mode="eager")
    assert torch._dynamo.explain(compiled)(x).graph_break_count == 0
    f = torch.compile(compiled, fullgraph=True, dynamic=True)
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        for batch in (4, 2, 7):
            fresh = torch.randn(batch, 128, 512, device=DEV, dtype=torch.float16)
            assert rel(f(fresh), ref(fresh)) < 5e-3


def test_bert_sdpa_keeps_a_fused_kernel_without_the_all_true_mask() -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2)
    model = BertModel(cfg, add_pooling_layer=False).to(DEV, torch.float16).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 128), device=DEV)
    compiled = sparta.compile(model, {}, (ids,), mode="eager", measure=False)
    with torch.no_grad():
        compiled(ids)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = compiled(ids)
            torch.cuda.synchronize()
        want = model(ids)
    names = " ".join(e.key.lower() for e in prof.key_averages())
    assert any(k in names for k in ("flash", "fmha", "cudnn", "efficient")), names[:2000]
    assert rel(out.last_hidden_state, want.last_hidden_state) < 5e-3


def test_device_time_planning_records_why() -> None:
    torch.manual_seed(0)
    model = Block().to(DEV, torch.float16).eval()
    attrs = block_attrs(model)
    x = torch.randn(16, 256, 512, device=DEV, dtype=torch.float16)
    compiled = sparta.compile(model, attrs, (x,), mode="default")
    assert compiled.plan.timer == "device"
    for entry in compiled.report.nodes:
        if entry.target == "aten.linear.default":
            assert "device time" in entry.reason, entry.reason
    whole = compiled.report.whole
    assert whole["dense_ms"] > 0 and "CUDA-graph" in whole["timer"]
