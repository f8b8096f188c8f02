"""End to end, with each backend forced: whole units pruned with their biases, the chosen
implementation asserted, outputs compared with ``sparta.masked_model`` (the user's module with
its parameters and inputs multiplied by the masks, built without the compiler) at the example
and at another batch size and sequence length."""

from __future__ import annotations

import copy

import pytest
import torch
from models import MODELS, other_inputs, unit_masks

import sparta
from sparta.sparsifiers import NM, BlockMagnitude, RandomFraction

TOL = 1e-4  # relative to the largest output element, fp32


def leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_rel_error(a, b) -> float:
    la, lb = leaves(a), leaves(b)
    assert len(la) == len(lb) and la
    return max(
        ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(la, lb)
    )


def linear_impls(compiled: sparta.CompiledModel) -> list[str]:
    return [n.impl for n in compiled.report.nodes if n.target == "aten.linear.default"]


def check_outputs(name: str, model, attrs, compiled, inputs: tuple) -> None:
    """compiled == masked model at the example and at another size, and the masks matter."""
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        for args in (inputs, other_inputs(name, inputs)):
            assert max_rel_error(compiled(*args), ref(*args)) < TOL, args[0].shape
        assert max_rel_error(model(*inputs), ref(*inputs)) > 100 * TOL  # not a vacuous check


def n_linears(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Linear) for m in model.modules())


# bert and gpt2 without an attention mask trace to the same ops as their _mask variants
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"bert", "gpt2"}))
def test_shrink_forced_on_unit_pruned_models(name: str) -> None:
    model, inputs = MODELS[name]()
    attrs = unit_masks(model, seed=3)
    before = copy.deepcopy(model.state_dict())
    compiled = sparta.compile(model, attrs, inputs, backends=["shrink"], measure=False)
    for k, v in model.state_dict().items():  # the user's model is bit-identical
        assert torch.equal(v, before[k]), k
    # every nn.Linear lost units with their biases, so every one of them is shrunk
    assert linear_impls(compiled) == ["shrink"] * n_linears(model)
    check_outputs(name, model, attrs, compiled, inputs)


@pytest.mark.parametrize("tokens_dims", [1, 2])  # (batch, features), (batch, seq, features)
def test_shrink_removes_the_pruned_units_from_the_graph(tokens_dims: int) -> None:
    model, inputs = MODELS["mlp"]()
    if tokens_dims == 2:
        inputs = (torch.randn(2, 3, 32),)
    attrs = unit_masks(model, keep=0.3, seed=1)
    compiled = sparta.compile(model, attrs, inputs, backends=["shrink"], measure=False)
    shapes = {tuple(b.shape) for b in compiled.graph_module.buffers()}
    kept = [int(attrs[f"{f}.bias"].sum()) for f in ("fc1", "fc2", "fc3")]
    assert all(k < 0.6 * full for k, full in zip(kept, (64, 64, 16)))
    for shape in ((64, 32), (64, 64), (16, 64)):  # no full-size weight is left
        assert shape not in shapes
    aligned = [k + (-k % 8) for k in kept]
    # every weight is compact on both sides: kept units only, reading kept inputs only
    assert (aligned[0], 32) in shapes and (aligned[1], aligned[0]) in shapes
    assert (aligned[2], aligned[1]) in shapes
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        for shape in ((3, 32), (5, 32)) if tokens_dims == 1 else ((2, 3, 32), (3, 7, 32)):
            x = torch.randn(shape)
            assert max_rel_error(compiled(x), ref(x)) < TOL


NM_CASES = {
    "mlp": ({"fc*.weight": NM(2, 4)}, 3),
    "bert_mask": ({"encoder.*.weight": NM(2, 4)}, 12),  # the pooler stays dense
}


@pytest.mark.parametrize("name", sorted(NM_CASES))
def test_nm_cpu_forced(name: str) -> None:
    from sparta.codegen import nm_cpu

    if not nm_cpu.available():
        pytest.skip("no C++ compiler")
    model, inputs = MODELS[name]()
    spec, n_sparse = NM_CASES[name]
    attrs = sparta.sparsify(model, spec)
    compiled = sparta.compile(model, attrs, inputs, backends=["nm_cpu"], measure=False)
    impls = linear_impls(compiled)
    # siblings (q, k, v) may share one stacked kernel: "fused" into its carrier
    assert impls.count("nm_cpu") + impls.count("fused") == n_sparse
    assert set(impls) <= {"nm_cpu", "fused", "dense"}
    from sparta.codegen.cpu_ops import NM_LINEAR

    calls = [n for n in compiled.graph_module.graph.nodes if n.target is NM_LINEAR]
    assert len(calls) == impls.count("nm_cpu")  # the emitted graph calls the n:m kernel op
    check_outputs(name, model, attrs, compiled, inputs)


SPARSE_CASES = {  # unstructured masks: no pattern, so only sparse_cpu applies
    "mlp": ({"fc*.weight": RandomFraction(0.7, seed=5)}, 3),
    "bert_mask": ({"encoder.*.intermediate.dense.weight": RandomFraction(0.8, seed=5)}, 2),
}


@pytest.mark.parametrize("name", sorted(SPARSE_CASES))
def test_sparse_cpu_forced(name: str) -> None:
    """README: "sparse_cpu" (unstructured C++ kernels that read only the kept weights, for any
    mask); the emitted graph calls its op, and ``report.runtime`` says what ran."""
    from sparta.codegen import sparse_cpu
    from sparta.codegen.cpu_ops import SPARSE_LINEAR

    if not sparse_cpu.available():
        pytest.skip("no C++ compiler")
    model, inputs = MODELS[name]()
    spec, n_sparse = SPARSE_CASES[name]
    attrs = sparta.sparsify(model, spec)
    compiled = sparta.compile(
        model, attrs, inputs, backends=["sparse_cpu"], measure=False, mode="eager"
    )
    impls = linear_impls(compiled)
    assert impls.count("sparse_cpu") == n_sparse and set(impls) <= {"sparse_cpu", "dense"}
    calls = [n for n in compiled.graph_module.graph.nodes if n.target is SPARSE_LINEAR]
    assert len(calls) == n_sparse
    assert compiled.report.runtime.startswith("eager on cpu (mode='eager'")
    check_outputs(name, model, attrs, compiled, inputs)


TRITON_CASES = {
    "mlp": ({"fc*.weight": BlockMagnitude((16, 16), 0.5)}, 3),
    "bert_mask": ({"encoder.*.intermediate.dense.weight": BlockMagnitude((16, 16), 0.5)}, 2),
}


@pytest.mark.parametrize("name", sorted(TRITON_CASES))
def test_triton_forced_in_interpreter(name: str) -> None:
    pytest.importorskip("triton")
    from sparta.codegen import triton_gen

    if not triton_gen.available(torch.device("cpu")):
        pytest.skip("TRITON_INTERPRET is not set")
    model, inputs = MODELS[name]()
    spec, n_sparse = TRITON_CASES[name]
    attrs = sparta.sparsify(model, spec)
    compiled = sparta.compile(model, attrs, inputs, backends=["triton"], measure=False)
    impls = linear_impls(compiled)
    assert impls.count("triton") == n_sparse and set(impls) <= {"triton", "dense"}
    check_outputs(name, model, attrs, compiled, inputs)


def test_default_backends_mix_shrink_and_folded_masks() -> None:
    """Unit masks on some layers, elementwise masks on the others, the planner free to choose:
    the masks that do not shrink are folded into the weights or run by a CPU sparse kernel."""
    model, inputs = MODELS["bert_mask"]()
    units = unit_masks(model, seed=5)
    gen = torch.Generator().manual_seed(5)
    attrs = {}
    for i, (name, p) in enumerate(model.named_parameters()):
        if name in units and i % 4 < 2:
            attrs[name] = units[name]
        elif p.dim() == 2 and "embeddings" not in name:
            attrs[name] = torch.rand(p.shape, generator=gen) < 0.6
    compiled = sparta.compile(model, attrs, inputs, measure=False)
    # "fused": q, k, v stacked into one kernel where that measured faster
    assert set(linear_impls(compiled)) <= {"dense", "shrink", "nm_cpu", "sparse_cpu", "fused"}
    check_outputs("bert_mask", model, attrs, compiled, inputs)


def test_shrink_forced_without_biases() -> None:
    """Bias-free layers: pruned rows alone make their units zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64, bias=False), torch.nn.GELU(), torch.nn.Linear(64, 24, bias=False)
    ).eval()
    gen = torch.Generator().manual_seed(0)
    rows = [torch.rand(n, generator=gen) < 0.4 for n in (64, 24)]
    attrs = {
        "0.weight": rows[0][:, None].expand(64, 32).clone(),
        "2.weight": rows[1][:, None].expand(24, 64).clone(),
    }
    x = torch.randn(6, 32)
    compiled = sparta.compile(model, attrs, (x,), backends=["shrink"], measure=False)
    assert linear_impls(compiled) == ["shrink", "shrink"]
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        for rows_in in (6, 2):
            fresh = torch.randn(rows_in, 32)
            assert max_rel_error(compiled(fresh), ref(fresh)) < TOL
