"""What README.md and docs/ promise about ``sparta.compile``, each checked against
``sparta.masked_model`` (the user's module with parameters and inputs times their masks)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import MODELS, other_inputs, unit_masks
from torch import nn

import sparta
from sparta.sparsifiers import NM

ROOT = Path(__file__).resolve().parents[1]


def assert_matches(compiled, ref, *args, tol: float = 1e-4, **kwargs) -> None:
    with torch.no_grad():
        got, want = compiled(*args, **kwargs), ref(*args, **kwargs)
    got_l = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    want_l = [t for t in torch.utils._pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    assert len(got_l) == len(want_l) and got_l
    for g, w in zip(got_l, want_l):
        assert g.shape == w.shape
        assert (g - w).abs().max().item() <= tol * max(w.abs().max().item(), 1e-6)


# ------------------------------------------------------------------ masks on forward() inputs


class Residual(nn.Module):
    """y = fc(x) + x: the skip path reads x itself, so a masked input must really be masked."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


def _columns(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A feature mask (last dim), the same for every token; about half the features pruned."""
    gen = torch.Generator().manual_seed(seed)
    cols = torch.rand(shape[-1], generator=gen) < 0.5
    return cols.expand(shape).clone()


@pytest.mark.parametrize("shape", [(4, 16), (2, 5, 16)])
def test_input_mask_under_compile(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(shape)
    mask = _columns(shape)
    assert 0 < int(mask.sum()) < mask.numel()
    compiled = sparta.compile(model, {"x": mask}, (x,), measure=False)
    ref = sparta.masked_model(model, {"x": mask})
    assert torch.equal(compiled.report.mask("x"), mask)
    assert_matches(compiled, ref, x)
    other = torch.randn(shape[0] + 3, *shape[1:-1], shape[-1])  # another batch
    if len(shape) == 3:
        other = torch.randn(shape[0] + 1, shape[1] + 4, shape[-1])  # and sequence length
    assert_matches(compiled, ref, other)
    with torch.no_grad():  # the mask matters: zeroed features of x are gone from the skip path
        assert (model(other) - ref(other)).abs().max() > 0.1


def test_input_mask_that_does_not_broadcast_to_another_shape_is_an_error() -> None:
    torch.manual_seed(0)
    model = Residual().eval()
    x = torch.randn(4, 16)
    mask = torch.rand(4, 16, generator=torch.Generator().manual_seed(1)) < 0.5  # per token
    compiled = sparta.compile(model, {"x": mask}, (x,), measure=False)
    assert_matches(compiled, sparta.masked_model(model, {"x": mask}), torch.randn(4, 16))
    with pytest.raises(sparta.AttrError, match=r"input 'x' has shape \(6, 16\).*\(4, 16\)"):
        compiled(torch.randn(6, 16))


# ------------------------------------------------------------------ compile's arguments


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_device_argument(device) -> None:
    model, (x,) = MODELS["mlp"]()
    attrs = unit_masks(model, seed=2)
    compiled = sparta.compile(model, attrs, (x,), device=device, measure=False)
    assert compiled.plan.device == torch.device("cpu")
    assert all(b.device.type == "cpu" for b in compiled.graph_module.buffers())
    assert_matches(compiled, sparta.masked_model(model, attrs), torch.randn(7, 32))


@pytest.mark.gpu
def test_device_cuda_compiles_a_copy_and_leaves_the_model_on_the_cpu() -> None:
    model, (x,) = MODELS["mlp"]()
    attrs = unit_masks(model, seed=2)
    compiled = sparta.compile(model, attrs, (x,), device="cuda", measure=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    ref = sparta.masked_model(model, attrs).cuda()
    assert_matches(compiled, ref, torch.randn(7, 32, device="cuda"), tol=2e-3)


def test_example_kwargs() -> None:
    model, (ids, am) = MODELS["bert_mask"]()
    attrs = unit_masks(model, seed=4)
    compiled = sparta.compile(
        model,
        attrs,
        (ids,),
        example_kwargs={"attention_mask": am},
        backends=["shrink"],
        measure=False,
    )
    ref = sparta.masked_model(model, attrs)
    assert_matches(compiled, ref, ids, attention_mask=am)
    ids2, am2 = other_inputs("bert_mask", (ids, am))
    assert_matches(compiled, ref, ids2, attention_mask=am2)
    with torch.no_grad():  # the keyword really reaches the model
        ones = torch.ones_like(am2)
        assert (compiled(ids2, attention_mask=am2)[0] - compiled(ids2, ones)[0]).abs().max() > 1e-3


def test_strict_false_through_compile_with_a_custom_op() -> None:
    from test_custom_op import OP, Gated, _attrs

    from sparta import scramble
    from sparta.scramble import INFERRED_RULE_NAME, ScrambleWarning

    assert sparta.registry.lookup(OP) is None
    scramble.clear_cache()
    torch.manual_seed(0)
    model, x = Gated(), torch.randn(4, 8)
    with pytest.raises(sparta.MissingRuleError, match="sparta_test::scaled_relu"):
        sparta.compile(model, _attrs(), (x,), measure=False)
    with pytest.warns(ScrambleWarning, match="sparta_test.scaled_relu"):
        compiled = sparta.compile(model, _attrs(), (x,), strict=False, measure=False)
    node = next(n for n in compiled.report.nodes if "scaled_relu" in n.target)
    assert node.rule == INFERRED_RULE_NAME
    assert "sparta_test.scaled_relu" in " ".join(compiled.report.inferred_ops)
    pruned_x = ~compiled.report.mask("x")
    assert bool(pruned_x[:, :3].all()) and bool(pruned_x[:, 5:].all())
    assert_matches(compiled, sparta.masked_model(model, _attrs()), torch.randn(4, 8))


def test_compile_never_modifies_the_masks_passed() -> None:
    model, (x,) = MODELS["mlp"]()
    gen = torch.Generator().manual_seed(6)
    w1 = torch.rand(64, 32, generator=gen) < 0.5
    units = unit_masks(model, seed=6)
    xm = _columns((4, 32), seed=6)
    attrs = {
        "fc1.weight": sparta.TeSA.from_mask(w1),
        "fc2.weight": units["fc2.weight"],
        "fc2.bias": units["fc2.bias"],
        "x": xm,
    }
    copies = {k: (v.mask if isinstance(v, sparta.TeSA) else v).clone() for k, v in attrs.items()}
    compiled = sparta.compile(model, attrs, (x,), measure=False)
    for k, v in attrs.items():
        m = v.mask if isinstance(v, sparta.TeSA) else v
        assert m.dtype == torch.bool and torch.equal(m, copies[k]), k
    fresh = torch.randn(5, 32)
    with torch.no_grad():
        before = compiled(fresh)
        for v in (units["fc2.weight"], units["fc2.bias"], xm):  # the compiled module holds copies
            v.fill_(True)
        assert torch.equal(compiled(fresh), before)


# ------------------------------------------------------------------ slower families are not picked


def _only_choice(compiled: sparta.CompiledModel):
    (choice,) = compiled.plan.choices.values()
    return choice


def test_nm_cpu_slower_than_dense_is_not_picked() -> None:
    """A dense-ish 3:4 weight at 8x8 and two tokens: the kernel's call overhead exceeds the
    whole dense product, and the measured timings say so."""
    from sparta.codegen import nm_cpu

    if not nm_cpu.available():
        pytest.skip("no C++ compiler")
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).eval()
    attrs = sparta.sparsify(lin, {"weight": NM(3, 4)})
    x = torch.randn(2, 8)
    compiled = sparta.compile(lin, attrs, (x,), backends=["dense", "nm_cpu"], measure=False)
    choice = _only_choice(compiled)
    assert set(choice.candidates) == {"dense", "nm_cpu"}
    assert choice.candidates["nm_cpu"] > choice.candidates["dense"]
    assert choice.impl == "dense" and choice.module is None
    assert not any(isinstance(m, nm_cpu.NMLinear) for m in compiled.modules())
    node = next(n for n in compiled.report.nodes if n.target == "aten.linear.default")
    assert node.impl == "dense" and node.latency_ms == choice.candidates["dense"]
    assert node.dense_latency_ms == choice.candidates["dense"]
    assert_matches(compiled, sparta.masked_model(lin, attrs), torch.randn(3, 8))


def test_sparse_cpu_slower_than_dense_is_not_picked() -> None:
    """An unstructured 75%-kept weight at 8x8 and two tokens: the kernel's call costs more than
    the whole dense product, and the measured timings say so."""
    from sparta.codegen import sparse_cpu

    if not sparse_cpu.available():
        pytest.skip("no C++ compiler")
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).eval()
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(2)) < 0.75
    x = torch.randn(2, 8)
    compiled = sparta.compile(
        lin, {"weight": mask}, (x,), backends=["dense", "sparse_cpu"], measure=False
    )
    choice = _only_choice(compiled)
    assert set(choice.candidates) == {"dense", "sparse_cpu"}
    assert choice.candidates["sparse_cpu"] > choice.candidates["dense"]
    assert choice.impl == "dense" and choice.module is None
    assert_matches(compiled, sparta.masked_model(lin, {"weight": mask}), torch.randn(3, 8))


def test_triton_slower_than_dense_is_not_picked() -> None:
    """In the CPU interpreter a Triton kernel runs orders of magnitude slower than dense."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).eval()
    blocks = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    x = torch.randn(5, 64)
    compiled = sparta.compile(lin, {"weight": mask}, (x,), backends=["dense", "triton"])
    choice = _only_choice(compiled)
    assert set(choice.candidates) == {"dense", "triton"}
    assert choice.candidates["triton"] > choice.candidates["dense"]
    assert choice.impl == "dense"
    assert_matches(compiled, sparta.masked_model(lin, {"weight": mask}), torch.randn(3, 64))


def test_a_compiled_model_slower_than_dense_warns_with_real_timings() -> None:
    """Triton forced in the interpreter: the compiled model really is slower, and says so."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).eval()
    mask = torch.ones(48, 64, dtype=torch.bool)
    mask[:16, :32] = False
    with pytest.warns(UserWarning, match=r"compiled graph measured slower than the dense graph"):
        compiled = sparta.compile(lin, {"weight": mask}, (torch.randn(5, 64),), backends=["triton"])
    report = compiled.report
    assert report.latency_compiled_ms > report.latency_dense_ms > 0


# ------------------------------------------------------------------ the report and the demo


def test_report_to_json(tmp_path: Path) -> None:
    model, (x,) = MODELS["mlp"]()
    attrs = unit_masks(model, seed=7)
    compiled = sparta.compile(model, attrs, (x,), backends=["shrink"], measure=False)
    path = tmp_path / "report.json"
    text = compiled.report.to_json(str(path))
    assert path.read_text() == text
    d = json.loads(text)
    assert d == json.loads(json.dumps(compiled.report.to_dict()))
    by_name = {t["name"]: t for t in d["tensors"]}
    density = attrs["fc1.bias"].float().mean().item()
    assert by_name["fc1.bias"]["density_given"] == pytest.approx(density)
    assert by_name["fc1.bias"]["kind"] == "parameter" and by_name["x"]["kind"] == "input"
    assert {n["impl"] for n in d["nodes"] if n["target"] == "aten.linear.default"} == {"shrink"}


def test_demo_runs_as_a_module(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--out", str(out), "--batch", "2", "--seq", "16", "--device", "cpu"]
    done = subprocess.run(
        [sys.executable, "-m", "sparta.demo", *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pattern = r"max \|compiled - masked dense\| = (\S+) .*?, (\S+) \(another shape"
    errors = re.search(pattern, done.stdout)
    assert errors is not None, done.stdout[-2000:]
    assert float(errors.group(1)) < 1e-4 and float(errors.group(2)) < 1e-4
    report = json.loads((out / "report.json").read_text())
    impls = {n["impl"] for n in report["nodes"] if n["target"] == "aten.linear.default"}
    assert impls <= {"dense", "shrink", "nm_cpu", "sparse_cpu", "fused"}  # fused: stacked q/k/v
    assert report["latency_compiled_ms"] > 0
    if (out / "density.png").exists():
        assert (out / "density.png").read_bytes()[:4] == b"\x89PNG"
    assert "weights kept" in done.stdout
    assert "whole forward: dense" in done.stdout  # the measure table
    loaded = re.search(r"loaded in (\S+) s \(max \|loaded - compiled\| = (\S+)\)", done.stdout)
    assert loaded is not None and float(loaded.group(2)) < 1e-5, done.stdout[-2000:]
    assert (out / "plan.sparta").stat().st_size > 0


# ------------------------------------------------------------------ README's usage block


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(32, 64)}) for _ in range(1))
        self.layers[0]["fc2"] = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0]["fc2"](torch.relu(self.layers[0]["fc1"](x))) + x


def test_readme_usage_block_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Use\n\n```python\n(.*?)```", readme, re.S).group(1)
    torch.manual_seed(0)
    model = TwoLayers().eval()
    gen = torch.Generator().manual_seed(0)
    env = {
        "model": model,
        "x": torch.randn(4, 32, generator=gen),
        "mask": torch.rand(64, 32, generator=gen) < 0.5,
        "mask2": (torch.rand(64, generator=gen) < 0.5).expand(32, 64).clone(),
        "input_mask": _columns((4, 32), seed=1),
    }
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("matplotlib")
    exec(compile(code, "README.md", "exec"), env)
    attrs = {
        "layers.0.fc1.weight": env["mask"],
        "layers.0.fc2.weight": env["mask2"],
        "x": env["input_mask"],
    }
    assert_matches(env["compiled"], sparta.masked_model(model, attrs), torch.randn(6, 32))
    # fc2 ignores half of fc1's units: their rows and biases are pruned by propagation
    unused = ~env["mask2"][0]
    assert not bool(env["compiled"].report.mask("layers.0.fc1.bias")[unused].any())
    assert (tmp_path / "density.png").exists()


# ------------------------------------------------------------------ backends per device


def test_default_backends_on_the_cpu_are_dense_shrink_and_the_cpu_kernels() -> None:
    """backends=None means the families that apply to the device: Triton is not tried on the
    CPU even where its interpreter is available."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).eval()
    blocks = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    compiled = sparta.compile(lin, {"weight": mask}, (torch.randn(5, 64),), measure=False)
    assert compiled.plan.backends == ("dense", "shrink", "nm_cpu", "sparse_cpu")
    assert "triton" not in _only_choice(compiled).candidates
    assert_matches(compiled, sparta.masked_model(lin, {"weight": mask}), torch.randn(3, 64))


def test_cusparselt_applies_on_cuda_only() -> None:
    """Forced on the CPU, the 2:4 family does not apply: the node stays dense and correct."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).eval()
    attrs = sparta.sparsify(lin, {"weight": NM(2, 4)})
    compiled = sparta.compile(
        lin, attrs, (torch.randn(4, 64),), backends=["cusparselt"], measure=False
    )
    assert _only_choice(compiled).impl == "dense"
    assert_matches(compiled, sparta.masked_model(lin, attrs), torch.randn(3, 64))


@pytest.mark.gpu
def test_cusparselt_forced_on_cuda() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).half().cuda().eval()
    attrs = sparta.sparsify(lin, {"weight": NM(2, 4)})
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    compiled = sparta.compile(lin, attrs, (x,), backends=["cusparselt"], measure=False)
    assert _only_choice(compiled).impl == "cusparselt"
    ref = sparta.masked_model(lin, attrs)
    assert_matches(
        compiled, ref, torch.randn(32, 256, device="cuda", dtype=torch.float16), tol=1e-2
    )


def test_the_kernel_ops_named_in_readme_are_the_registered_ones() -> None:
    """README: "Generated kernels are torch.library ops (sparta::...)": each named op exists,
    and every op the kernel modules register is named there."""
    pytest.importorskip("triton")
    import sparta.codegen.cpu_ops  # noqa: F401  (registers the C++ kernels' ops)
    import sparta.codegen.triton_ops  # noqa: F401  (registers the Triton kernels' ops)

    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`sparta::(\w+)`", readme))
    registered = {n for n in dir(torch.ops.sparta) if not n.startswith("_")} - {"name"}
    assert named == registered
    for name in named:
        assert isinstance(getattr(torch.ops.sparta, name).default, torch._ops.OpOverload)


class AllTrueMaskAttention(nn.Module):
    """SDPA with an all-True mask built from positions and the arguments after it given."""

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        t = q.shape[2]
        mask = (torch.arange(t) >= 0)[None, None, None, :].expand(q.shape[0], 1, t, t)
        return nn.functional.scaled_dot_product_attention(q, q, q, mask, 0.5, False)


def test_a_mask_proven_all_true_is_dropped_and_the_other_arguments_kept() -> None:
    """README: masks proven to have no effect are dropped (report.rewrites); the call keeps
    every other argument: with the same random state the dropout draws are the model's."""
    model = AllTrueMaskAttention().eval()
    compiled = sparta.compile(model, {}, (torch.randn(2, 2, 6, 8),), measure=False)
    assert any("attn_mask" in note for note in compiled.report.rewrites)
    for seed, shape in [(3, (2, 2, 6, 8)), (4, (3, 2, 9, 8))]:
        q = torch.randn(shape)
        torch.manual_seed(seed)
        want = model(q)
        torch.manual_seed(seed)
        got = compiled(q)
        assert not torch.equal(model(q), want)  # dropout is on: another draw differs
        assert torch.allclose(got, want, atol=1e-6), shape


# ------------------------------------------------------------------ docs/custom_ops.md


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparta_test.scaled_relu(x * self.w, 3.0)


def test_a_rule_registered_by_op_name_shows_its_name_in_the_report() -> None:
    """register_rule accepts the op's name as a string; ``name=`` is the report's rule column;
    unregister_rule removes it."""
    from test_custom_op import OP, scaled_relu_rule

    sparta.register_rule("sparta_test::scaled_relu", name="relu times a scale")(scaled_relu_rule)
    try:
        model = Twice()
        w = torch.ones(4, 8, dtype=torch.bool)
        w[:, 2] = False
        compiled = sparta.compile(model, {"w": w}, (torch.randn(4, 8),), measure=False)
        node = next(n for n in compiled.report.nodes if "scaled_relu" in n.target)
        assert node.rule == "relu times a scale"
        assert not bool(compiled.report.mask("output")[:, 2].any())  # forward through the op
        assert_matches(compiled, sparta.masked_model(model, {"w": w}), torch.randn(4, 8))
    finally:
        sparta.unregister_rule("sparta_test::scaled_relu")
    assert sparta.registry.lookup(OP) is None


def test_compile_signature_keyword_only_options() -> None:
    """sparta.compile(model, attrs, example_inputs, *, device=None, backends=None, ...)."""
    model, (x,) = MODELS["mlp"]()
    compiled = sparta.compile(
        model=model, attrs={}, example_inputs=(x,), backends=["dense"], measure=False
    )
    assert_matches(compiled, model, torch.randn(3, 32))
    with pytest.raises(TypeError):
        sparta.compile(model, {}, (x,), "cpu")  # options are keyword-only
