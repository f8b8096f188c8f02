"""The runtime contract: kernels are registered ops (no graph break, no recompiles across batch
sizes), ``torch.compile(compiled, fullgraph=True)`` equals the masked model, compiling with
no masks adds no node, and masks proven useless are dropped (CPU; Triton in its interpreter)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import MODELS

import sparta
from sparta import masked_model
from sparta.sparsifiers import NM
from sparta.trace import trace


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1.0))


class MLP4(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 64)
        self.fc3, self.fc4 = nn.Linear(64, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc4(self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x))))))


def kernel_model() -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """fc1 2:4 (nm_cpu), fc2 with half its units pruned (shrink), fc4 in 16x16 blocks (triton)."""
    torch.manual_seed(0)
    model = MLP4().eval()
    attrs = dict(sparta.sparsify(model, {"fc1.weight": NM(2, 4)}))
    units = torch.rand(64) < 0.5
    attrs["fc2.weight"] = units[:, None].expand(64, 64).clone()
    attrs["fc2.bias"] = units.clone()
    blocks = torch.eye(2, dtype=torch.bool)  # every row and column keeps a block: no shrink
    attrs["fc4.weight"] = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    return model, attrs, torch.randn(4, 32)


@pytest.fixture(scope="module")
def compiled_kernels():
    pytest.importorskip("triton")
    from sparta.codegen import nm_cpu, triton_gen

    if not nm_cpu.available() or not triton_gen.available(torch.device("cpu")):
        pytest.skip("needs a C++ compiler and Triton's interpreter")
    model, attrs, x = kernel_model()
    backends = ["shrink", "nm_cpu", "triton"]  # dense left out: every sparse family is used
    compiled = sparta.compile(model, attrs, (x,), backends=backends, measure=False)
    return model, attrs, x, compiled


def test_kernels_are_registered_ops_and_dynamo_sees_one_graph(compiled_kernels) -> None:
    from sparta.codegen.cpu_ops import NM_LINEAR
    from sparta.codegen.triton_ops import BLOCK_SPARSE_LINEAR

    model, attrs, x, compiled = compiled_kernels
    impls = {c.impl for c in compiled.plan.choices.values()}
    assert {"shrink", "nm_cpu", "triton"} <= impls
    targets = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert NM_LINEAR in targets and BLOCK_SPARSE_LINEAR in targets
    assert not any(n.op == "call_module" for n in compiled.graph_module.graph.nodes)
    explained = torch._dynamo.explain(compiled)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_fullgraph_compile_equals_masked_model_without_recompiles(compiled_kernels) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    model, attrs, x, compiled = compiled_kernels
    ref = masked_model(model, attrs)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # fake implementations, functionalization
    f = torch.compile(compiled, fullgraph=True, dynamic=True, backend=counter)
    with torch.no_grad():
        for batch in (2, 3, 5, 9):
            fresh = torch.randn(batch, 32)
            assert close(f(fresh), ref(fresh)), batch
    assert counter.frame_count == 1


def test_inductor_fullgraph_equals_masked_model(compiled_kernels) -> None:
    model, attrs, x, compiled = compiled_kernels
    ref = masked_model(model, attrs)
    torch._dynamo.reset()
    f = torch.compile(compiled, fullgraph=True, dynamic=True)  # Inductor, the kernels opaque
    with torch.no_grad():
        for batch in (3, 6):
            fresh = torch.randn(batch, 32)
            assert close(f(fresh), ref(fresh)), batch


@pytest.mark.slow
def test_inductor_runtime_equals_masked_model(compiled_kernels) -> None:
    model, attrs, x, _ = compiled_kernels
    backends = ["shrink", "nm_cpu", "triton"]
    compiled = sparta.compile(model, attrs, (x,), backends=backends, measure=False, mode="inductor")
    assert compiled.runtime.kind == "inductor" and "inductor" in compiled.report.runtime
    ref = masked_model(model, attrs)
    with torch.no_grad():
        for batch in (4, 7):
            fresh = torch.randn(batch, 32)
            assert close(compiled(fresh), ref(fresh)), batch


def test_a_higher_order_op_body_is_carried_over() -> None:
    class Autocast(nn.Module):  # Llama's rotary embedding runs in such a region
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                y = torch.cos(x.float()) * 2
            return self.fc(y)

    model, x = Autocast().eval(), torch.randn(3, 8)
    compiled = sparta.compile(model, {}, (x,), measure=False)
    assert any(isinstance(m, torch.fx.GraphModule) for m in compiled.graph_module.children())
    with torch.no_grad():
        fresh = torch.randn(5, 8)
        assert close(compiled(fresh), model(fresh))


def test_modes_and_the_cpu_default() -> None:
    lin = nn.Linear(8, 8).eval()
    x = torch.randn(3, 8)
    default = sparta.compile(lin, {}, (x,), measure=False)
    assert default.runtime.kind == "eager" and "eager on cpu" in default.report.runtime
    assert default.report.to_dict()["runtime"] == default.report.runtime
    graphs = sparta.compile(lin, {}, (x,), measure=False, mode="reduce-overhead")
    assert graphs.runtime.kind == "inductor"  # no CUDA graphs on the CPU
    with pytest.raises(sparta.PlanError, match="unknown mode"):
        sparta.compile(lin, {}, (x,), measure=False, mode="max-speed")


def _call_targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert", "bert_mask", "gpt2", "vit"])
def test_no_masks_adds_no_node(name: str) -> None:
    model, inputs = MODELS[name]()
    exported = _call_targets(trace(model, inputs).gm)
    compiled = sparta.compile(model, {}, inputs, measure=False)
    emitted = _call_targets(compiled.graph_module)
    assert set(emitted) <= set(exported)
    for t in set(emitted):
        assert emitted.count(t) <= exported.count(t), t
    with torch.no_grad():
        out, want = compiled(*inputs), model(*inputs)
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(want)):
        if isinstance(b, torch.Tensor):
            assert close(a, b, 1e-5)


def test_bert_all_true_attention_mask_is_dropped_and_outputs_match() -> None:
    model, (ids,) = MODELS["bert"]()
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    exported = trace(model, (ids,)).gm
    assert any(len(n.args) > 3 for n in exported.graph.nodes if n.target is sdpa)
    compiled = sparta.compile(model, {}, (ids,), measure=False)
    calls = [n for n in compiled.graph_module.graph.nodes if n.target is sdpa]
    assert calls and all(
        (len(n.args) <= 3 or n.args[3] is None) and n.kwargs.get("attn_mask") is None for n in calls
    )
    assert any("attn_mask" in note for note in compiled.report.rewrites)
    emitted = _call_targets(compiled.graph_module)
    assert torch.ops.aten.ge.Scalar not in emitted and torch.ops.aten.arange.default not in emitted
    vocab = model.config.vocab_size
    with torch.no_grad():
        for shape in [(2, 16), (3, 9), (5, 31)]:  # other batch sizes and sequence lengths
            fresh = torch.randint(0, vocab, shape)
            assert close(compiled(fresh).last_hidden_state, model(fresh).last_hidden_state, 1e-5)


def test_a_user_attention_mask_is_kept() -> None:
    model, inputs = MODELS["bert_mask"]()
    compiled = sparta.compile(model, {}, inputs, measure=False)
    assert not compiled.report.rewrites  # a mask from the inputs is never proven all-True
    ids, mask = inputs
    mask = mask.clone()
    mask[:, -3:] = 0
    with torch.no_grad():
        got = compiled(ids, mask).last_hidden_state
        want = model(ids, mask).last_hidden_state
    assert close(got, want, 1e-5)
