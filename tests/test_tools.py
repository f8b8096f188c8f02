"""The planner's tools for users: ``sparta.measure``, saved plans, the plan cache."""

from __future__ import annotations

import json
import time

import pytest
import torch
from models import mlp

import sparta
from sparta.demo import TinyBert, demo_masks


def _mlp_attrs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    units = torch.rand(64, generator=gen) < 0.4  # prune fc1's units with their biases
    nm = torch.zeros(64, 64, dtype=torch.bool)
    idx = torch.rand(64, 16, 4, generator=gen).argsort(-1)[..., :2]  # 2:4 on fc2
    nm.view(64, 16, 4).scatter_(-1, idx, True)
    return {
        "fc1.weight": units[:, None].expand(64, 32).clone(),
        "fc1.bias": units.clone(),
        "fc2.weight": nm,
    }


def _demo() -> tuple[torch.nn.Module, dict, tuple]:
    torch.manual_seed(0)
    model = TinyBert(vocab=100, hidden=64, heads=8, ffn=128, layers=1, max_len=64).eval()
    return model, demo_masks(model), (torch.randint(0, 100, (2, 16)),)


def _check_measurement(m: sparta.Measurement, compiled: sparta.CompiledModel | set) -> None:
    d = m.to_dict()
    assert set(d) == {"latency_ms", "dense_latency_ms", "nodes"}
    assert d["latency_ms"] > 0 and d["dense_latency_ms"] > 0
    if isinstance(compiled, set):
        planned = compiled
    else:
        planned = {n.name for n, c in compiled.plan.choices.items() if c.impl != "fused"}
    assert {n["name"] for n in d["nodes"]} == planned and planned
    for n in d["nodes"]:
        assert set(n) == {"name", "target", "impl", "latency_ms", "dense_latency_ms", "flops",
                          "dense_flops", "weight"}  # fmt: skip
        assert ".weight" in n["weight"]  # every planned node here is a linear
        assert n["latency_ms"] > 0 and n["dense_latency_ms"] > 0
        assert 0 < n["flops"] <= n["dense_flops"]
    json.dumps(d)
    assert any(n["flops"] < n["dense_flops"] for n in d["nodes"])  # the masks really prune


def test_measure_compiled_mlp(tmp_path) -> None:
    model, inputs = mlp()
    compiled = sparta.compile(model, _mlp_attrs(model), inputs, measure=False)
    m = sparta.measure(compiled, (torch.randn(7, 32),))
    _check_measurement(m, compiled)
    assert "speed-up" in str(m)
    m.plot(str(tmp_path / "m.png"))
    assert (tmp_path / "m.png").stat().st_size > 1000


def test_measure_demo_model_from_attrs() -> None:
    model, attrs, inputs = _demo()
    m = sparta.measure(model, inputs, attrs=attrs)
    _check_measurement(m, {"linear", *(f"linear_{i}" for i in range(1, 6))})  # the 6 linears
    with pytest.raises(sparta.SpartaError, match="CompiledModel"):
        sparta.measure("not a model", inputs)


@pytest.mark.parametrize("backends", [None, ["nm_cpu", "dense"], ["sparse_cpu"]])
def test_save_load_round_trip(tmp_path, backends) -> None:
    from sparta.codegen import nm_cpu

    if backends and not nm_cpu.available():
        pytest.skip("no C++ compiler")
    model, inputs = mlp()
    attrs = _mlp_attrs(model)
    compiled = sparta.compile(model, attrs, inputs, backends=backends, measure=backends is None)
    path = tmp_path / "plan.sparta"
    compiled.save(path)
    loaded = sparta.load(path, model)
    assert loaded.__dict__["_propagated"] is None  # no trace, no propagation, no measuring
    assert not compiled.report.origin and str(path) in loaded.report.summary()
    impls = {n.name: n.impl for n in compiled.report.nodes}
    assert {n.name: n.impl for n in loaded.report.nodes} == impls
    if backends:
        assert set(backends) & set(impls.values())  # the forced kernels really run
    reference = sparta.masked_model(model, attrs)
    for batch in (1, 4, 9):
        x = torch.randn(batch, 32)
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.report.mask("fc2.weight"), compiled.report.mask("fc2.weight"))
    # a loaded plan measures (tracing the model again, no propagation) and saves again
    _check_measurement(sparta.measure(loaded, (torch.randn(3, 32),)), loaded)
    loaded.save(tmp_path / "again.sparta")
    again = sparta.load(tmp_path / "again.sparta", model)
    x = torch.randn(5, 32)
    torch.testing.assert_close(again(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["nm_cpu", "sparse_cpu"])
def test_save_load_round_trip_of_kernels_on_shrunk_weights(tmp_path, monkeypatch, family) -> None:
    from sparta import plan as planner
    from sparta.codegen import nm_cpu

    if not nm_cpu.available():
        pytest.skip("no C++ compiler")

    def shrunk_kernels_win(candidates, device, device_time=False):  # the timings, fixed
        for run in candidates.values():
            run()
        return {k: 1.0 if k.startswith("shrink+") else 2.0 for k in candidates}

    monkeypatch.setattr(planner, "compare_ms", shrunk_kernels_win)
    model, inputs = mlp()
    attrs = _mlp_attrs(model)
    if family == "sparse_cpu":  # unstructured: the kernel reads fc1's compact output
        attrs["fc2.weight"] = torch.rand(64, 64) < 0.3
    attrs["fc2.weight"] &= torch.rand(64, 1) < 0.7  # rows fc2 drops
    compiled = sparta.compile(model, attrs, inputs, backends=["shrink", family], measure=False)
    impls = {n.name: n.impl for n in compiled.report.nodes}
    assert f"shrink+{family}" in impls.values(), impls
    compact = any(c.reads_compact for c in compiled.plan.choices.values())
    assert compact == (family == "sparse_cpu")
    compiled.save(tmp_path / "plan.sparta")
    loaded = sparta.load(tmp_path / "plan.sparta", model)
    assert {n.name: n.impl for n in loaded.report.nodes} == impls
    reference = sparta.masked_model(model, attrs)
    for batch in (1, 6):
        x = torch.randn(batch, 32)
        torch.testing.assert_close(loaded(x), reference(x), rtol=1e-5, atol=1e-5)
    # traced again (measure), saved again from the re-derived plan, loaded again: the same
    _check_measurement(sparta.measure(loaded, (torch.randn(3, 32),)), loaded)
    assert [c.reads_compact for c in loaded.plan.choices.values()] == [
        c.reads_compact for c in compiled.plan.choices.values()
    ]
    loaded.save(tmp_path / "again.sparta")
    x = torch.randn(5, 32)
    again = sparta.load(tmp_path / "again.sparta", model)
    torch.testing.assert_close(again(x), reference(x), rtol=1e-5, atol=1e-5)


def test_load_rejects_another_model(tmp_path) -> None:
    model, inputs = mlp()
    compiled = sparta.compile(model, _mlp_attrs(model), inputs, measure=False)
    compiled.save(tmp_path / "p.sparta")
    other = type(model)().eval()  # same shapes, other weights
    with pytest.raises(sparta.SpartaError, match="different weight values"):
        sparta.load(tmp_path / "p.sparta", other)
    wider = type(model)(hidden=48).eval()
    with pytest.raises(sparta.SpartaError, match="fc1.bias.*48"):
        sparta.load(tmp_path / "p.sparta", wider)
    with pytest.raises(sparta.SpartaError, match="lacks"):
        sparta.load(tmp_path / "p.sparta", torch.nn.Linear(3, 4))
    (tmp_path / "bad.sparta").write_bytes(b"not a plan")
    with pytest.raises(sparta.SpartaError, match="not a readable sparta plan"):
        sparta.load(tmp_path / "bad.sparta", model)


def test_saved_demo_model_at_other_sizes(tmp_path) -> None:
    model, attrs, inputs = _demo()
    compiled = sparta.compile(model, attrs, inputs, measure=False)
    compiled.save(tmp_path / "demo.sparta")
    loaded = sparta.load(tmp_path / "demo.sparta", model)
    reference = sparta.masked_model(model, attrs)
    for shape in ((1, 16), (3, 9)):
        ids = torch.randint(0, 100, shape)
        torch.testing.assert_close(loaded(ids), reference(ids), rtol=1e-4, atol=1e-4)


def test_plan_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SPARTA_CACHE", "1")
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path))
    model, attrs, inputs = _demo()
    start = time.perf_counter()
    first = sparta.compile(model, attrs, inputs)
    first_s = time.perf_counter() - start
    entries = list(tmp_path.glob("plan-*.sparta"))
    assert len(entries) == 1
    start = time.perf_counter()
    second = sparta.compile(model, attrs, inputs)
    second_s = time.perf_counter() - start
    assert second_s < first_s / 3, (second_s, first_s)
    assert [n.impl for n in second.report.nodes] == [n.impl for n in first.report.nodes]
    assert "plan cache" in second.report.summary() and not first.report.origin
    ids = torch.randint(0, 100, (3, 11))
    torch.testing.assert_close(second(ids), sparta.masked_model(model, attrs)(ids), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    # other masks, other weights, other options: other entries
    attrs2 = dict(attrs)
    attrs2["layers.0.fc1.bias"] = torch.ones_like(attrs["layers.0.fc1.bias"])
    sparta.compile(model, attrs2, inputs, measure=False)
    saved = model.layers[0].q.weight.detach().clone()
    with torch.no_grad():
        model.layers[0].q.weight[0, 0] += 1.0
    changed = sparta.compile(model, attrs, inputs, measure=False)
    assert changed.__dict__["_source"] is None  # compiled, not loaded
    assert len(list(tmp_path.glob("plan-*.sparta"))) == 3
    with torch.no_grad():
        model.layers[0].q.weight.copy_(saved)
    # a corrupt entry is rebuilt, with a warning
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    with pytest.warns(UserWarning, match="could not be used"):
        third = sparta.compile(model, attrs, inputs)
    torch.testing.assert_close(third(ids), second(ids), rtol=1e-5, atol=1e-5)
    assert entries[0].exists() and entries[0].stat().st_size > 100
    # other planner code (an upgrade, a local edit): not the old entry
    monkeypatch.setattr(sparta.plan_cache, "source_digest", lambda: "other sparta source")
    assert sparta.compile(model, attrs, inputs, measure=False).__dict__["_source"] is None
    monkeypatch.undo()
    # SPARTA_CACHE=0: nothing read
    monkeypatch.setenv("SPARTA_CACHE", "0")
    off = sparta.compile(model, attrs, inputs, measure=False)
    assert off.__dict__["_source"] is None


def test_progress_bar_only_when_asked_or_on_a_terminal(capsys, monkeypatch) -> None:
    pytest.importorskip("tqdm")
    from sparta import progress

    model, inputs = mlp()
    attrs = _mlp_attrs(model)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setenv("SPARTA_CACHE", "0")  # every compile measures its nodes
    sparta.compile(model, attrs, inputs, measure=False, progress=True)
    err = capsys.readouterr().err
    assert "sparta: " in err and "measuring linear" in err
    sparta.compile(model, attrs, inputs, measure=False)  # stderr is no terminal here
    sparta.compile(model, attrs, inputs, measure=False, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("SPARTA_PROGRESS", "0")
    assert not progress.wanted(None)


_LOAD_ELSEWHERE = """
import sys, torch, sparta
from safetensors.torch import load_file
sys.path.insert(0, {tests!r})
from models import MLP
torch.manual_seed(0)
model = MLP(d_in=256, hidden=512, d_out=256).eval().cuda().half()
loaded = sparta.load({plan!r}, model)
want = load_file({io!r}, device="cuda")
torch.testing.assert_close(loaded(want["x"]), want["y"], rtol=0, atol=0)
print("impls", sorted({{n.impl for n in loaded.report.nodes}}))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_save_load_on_cuda_with_an_empty_kernel_cache(tmp_path, monkeypatch) -> None:
    import os
    import subprocess
    import sys

    from models import MLP
    from safetensors.torch import save_file

    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = MLP(d_in=256, hidden=512, d_out=256).eval().cuda().half()
    gen = torch.Generator().manual_seed(0)
    units = torch.rand(512, generator=gen) < 0.5
    blocks = (torch.rand(16, 16, generator=gen) < 0.25).repeat_interleave(32, 0)
    attrs = {
        "fc1.weight": units[:, None].expand(512, 256).clone(),
        "fc1.bias": units.clone(),
        "fc2.weight": blocks.repeat_interleave(32, 1),
    }
    x = torch.randn(64, 256, device="cuda", dtype=torch.half)
    compiled = sparta.compile(model, attrs, (x,), backends=["triton"])
    assert "triton" in {n.impl for n in compiled.report.nodes}
    _check_measurement(sparta.measure(compiled, (torch.randn_like(x[:40]),)), compiled)
    compiled.save(tmp_path / "plan.sparta")
    x2 = torch.randn(33, 256, device="cuda", dtype=torch.half)
    loaded = sparta.load(tmp_path / "plan.sparta", model)
    torch.testing.assert_close(loaded(x2), compiled(x2), rtol=0, atol=0)
    reference = sparta.masked_model(model, attrs)
    torch.testing.assert_close(loaded(x2), reference(x2), rtol=2e-2, atol=2e-2)
    # Another process with an empty kernel cache: the kernels are generated again.
    save_file({"x": x2.cpu(), "y": loaded(x2).cpu()}, str(tmp_path / "io.safetensors"))
    script = _LOAD_ELSEWHERE.format(
        tests=os.path.dirname(__file__),
        plan=str(tmp_path / "plan.sparta"),
        io=str(tmp_path / "io.safetensors"),
    )
    env = {**os.environ, "SPARTA_CACHE_DIR": str(tmp_path / "empty")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "triton" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_saved_plan_holds_2to4_semi_structured_kernels(tmp_path) -> None:
    from models import MLP

    torch.manual_seed(0)
    model = MLP(d_in=256, hidden=512, d_out=256).eval().cuda().half()
    gen = torch.Generator().manual_seed(0)
    attrs = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:  # 2:4 along the input features of every linear
            idx = torch.rand(p.shape[0], p.shape[1] // 4, 4, generator=gen).argsort(-1)[..., :2]
            nm = torch.zeros(p.shape[0], p.shape[1] // 4, 4, dtype=torch.bool)
            attrs[name] = nm.scatter_(-1, idx, True).reshape(p.shape)
    x = torch.randn(128, 256, device="cuda", dtype=torch.half)
    compiled = sparta.compile(model, attrs, (x,), backends=["cusparselt"], measure=False)
    assert "cusparselt" in {n.impl for n in compiled.report.nodes}
    compiled.save(tmp_path / "plan.sparta")
    loaded = sparta.load(tmp_path / "plan.sparta", model)
    assert [n.impl for n in loaded.report.nodes] == [n.impl for n in compiled.report.nodes]
    x2 = torch.randn(96, 256, device="cuda", dtype=torch.half)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x2), compiled(x2), rtol=0, atol=0)
        want = sparta.masked_model(model, attrs)(x2)
        torch.testing.assert_close(loaded(x2), want, rtol=2e-2, atol=2e-2)


def test_plan_cache_keeps_the_most_recently_used_plans_within_its_budget(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("SPARTA_CACHE", "1")
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path))
    model, inputs = mlp()
    variants = []
    for seed in range(3):  # three mask sets: three entries
        attrs = _mlp_attrs(model)
        attrs["fc3.weight"] = (
            torch.rand(16, 64, generator=torch.Generator().manual_seed(seed)) < 0.5
        )
        variants.append(attrs)
    sparta.compile(model, variants[0], inputs, measure=False, backends=["dense", "shrink"])
    (first,) = tmp_path.glob("plan-*.sparta")
    size = first.stat().st_size
    monkeypatch.setenv("SPARTA_PLAN_CACHE_MB", str(2.5 * size / 2**20))  # room for two plans
    os.utime(first, (1, 1))  # long unused
    sparta.compile(model, variants[1], inputs, measure=False, backends=["dense", "shrink"])
    assert len(list(tmp_path.glob("plan-*.sparta"))) == 2
    second = max(tmp_path.glob("plan-*.sparta"), key=lambda p: p.stat().st_mtime)
    os.utime(second, (2, 2))
    hit = sparta.compile(model, variants[0], inputs, measure=False, backends=["dense", "shrink"])
    assert hit.__dict__["_source"] is not None and first.stat().st_mtime > 2  # a hit is a use
    sparta.compile(model, variants[2], inputs, measure=False, backends=["dense", "shrink"])
    left = set(tmp_path.glob("plan-*.sparta"))
    assert len(left) == 2 and first in left and second not in left  # the least recent went
    monkeypatch.setenv("SPARTA_PLAN_CACHE_MB", "lots")
    with pytest.warns(UserWarning, match="SPARTA_PLAN_CACHE_MB"):
        assert sparta.plan_cache.budget_bytes() == sparta.plan_cache.DEFAULT_BUDGET_MB * 2**20
