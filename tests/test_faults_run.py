"""Fault injection, second part: the C++ compiler, training mode, inputs, threads, the GPU.

Same record as ``test_faults.py`` (``fault_log``): each test injects one fault for real (a
missing, failing or hanging compiler on PATH; a model in training mode; inputs the compiled
model was not built for; concurrent callers; on the GPU, out-of-memory and a kernel config
that does not compile) and states what must happen.
"""

from __future__ import annotations

import stat
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from fault_log import record

import sparta
from sparta.codegen import cache, nm_cpu

needs_cxx = pytest.mark.skipif(not nm_cpu.available(), reason="needs a C++ compiler")


class ThreeLayer(torch.nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(48, 64)
        self.fc2 = torch.nn.Linear(64, 32)
        self.fc3 = torch.nn.Linear(32, 24)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.drop(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


def masks(seed: int = 0) -> dict[str, torch.Tensor]:
    """fc1 2:4 (n:m kernels), fc2 25% unstructured (sparse_cpu), fc3 half its inputs pruned."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(64, 12, 4, generator=gen)
    keep = scores.argsort(-1, descending=True)[..., :2]
    nm = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, keep, True).reshape(64, 48)
    unstructured = torch.rand(32, 64, generator=gen) < 0.25
    cols = torch.ones(24, 32, dtype=torch.bool)
    cols[:, ::2] = False
    return {"fc1.weight": nm, "fc2.weight": unstructured, "fc3.weight": cols}


def error_vs_masked(compiled, model, attrs, x: torch.Tensor) -> float:
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        out, want = compiled(x), ref(x)
    assert out.shape == want.shape
    return float((out - want).abs().max()) if out.numel() else 0.0


def compile_caught(model, attrs, example, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = sparta.compile(model, attrs, (example,), measure=False, **kw)
    return compiled, [str(w.message) for w in caught]


def impls(compiled) -> list[str]:
    return [c.impl for c in compiled.plan.choices.values()]


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kernel cache, so every kernel is built by the compiler under test."""
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))
    cache._MEMO.clear()
    yield tmp_path / "cache"
    cache._MEMO.clear()


def fake_compiler(tmp_path: Path, body: str) -> Path:
    """An executable named like a compiler: answers ``--version``, runs ``body`` otherwise."""
    path = tmp_path / "fake-cxx"
    path.write_text(
        f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "fake-cxx 1.0"; exit 0; fi\n{body}\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def kernel_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "kernels could not be built" in m]


# ---------------------------------------------------------------- the C++ compiler


def test_no_cxx_compiler_on_path(monkeypatch, fresh_cache, tmp_path) -> None:
    monkeypatch.delenv("SPARTA_CXX", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run here
    model, attrs = ThreeLayer().eval(), masks()
    compiled, messages = compile_caught(model, attrs, torch.randn(4, 48))
    found = kernel_warnings(messages)
    err = error_vs_masked(compiled, model, attrs, torch.randn(6, 48))
    names = all(n.name in found[0] for n in compiled.plan.choices) if found else False
    record(
        "no C++ compiler on PATH",
        "dense fallback, one warning naming the nodes",
        f"impls {sorted(set(impls(compiled)))}, {len(found)} warning(s) naming every node: "
        f"{names}, error {err:.1e}",
        len(found) == 1 and names and "C++ compiler" in found[0],
        wrong=err > 1e-5,
    )


@needs_cxx
def test_cxx_compiler_that_fails(monkeypatch, fresh_cache, tmp_path) -> None:
    cxx = fake_compiler(tmp_path, 'echo "internal compiler error: injected" >&2; exit 1')
    monkeypatch.setenv("SPARTA_CXX", str(cxx))
    model, attrs = ThreeLayer().eval(), masks()
    compiled, messages = compile_caught(model, attrs, torch.randn(4, 48))
    found = kernel_warnings(messages)
    err = error_vs_masked(compiled, model, attrs, torch.randn(6, 48))
    record(
        "the C++ compiler fails (exit 1)",
        "dense fallback, one warning naming the nodes and the compiler's message",
        f"impls {sorted(set(impls(compiled)))}, {len(found)} warning(s), compiler message "
        f"shown: {bool(found) and 'injected' in found[0]}, error {err:.1e}",
        len(found) == 1 and "injected" in found[0] and "linear" in found[0],
        wrong=err > 1e-5,
    )


@needs_cxx
def test_cxx_compiler_that_hangs(monkeypatch, fresh_cache, tmp_path) -> None:
    cxx = fake_compiler(tmp_path, "exec sleep 120")
    monkeypatch.setenv("SPARTA_CXX", str(cxx))
    monkeypatch.setenv("SPARTA_CXX_TIMEOUT", "1")
    model, attrs = ThreeLayer().eval(), masks()
    start = time.monotonic()
    compiled, messages = compile_caught(model, attrs, torch.randn(4, 48))
    took = time.monotonic() - start
    found = kernel_warnings(messages)
    err = error_vs_masked(compiled, model, attrs, torch.randn(6, 48))
    record(
        "the C++ compiler hangs",
        "killed after $SPARTA_CXX_TIMEOUT, not retried per node; dense fallback, one warning",
        f"compile took {took:.1f} s with a 1 s limit, {len(found)} warning(s), impls "
        f"{sorted(set(impls(compiled)))}, error {err:.1e}",
        len(found) == 1 and "timed out" in found[0] and took < 30,
        wrong=err > 1e-5,
    )


# ---------------------------------------------------------------- training mode


def test_model_in_training_mode() -> None:
    attrs = masks()
    with_dropout = ThreeLayer(dropout=0.1).train()
    try:
        sparta.compile(with_dropout, attrs, (torch.randn(4, 48),), measure=False)
        raised = "nothing raised"
    except sparta.TrainModeError as e:
        raised = str(e)
    without = ThreeLayer().train()  # training mode changes nothing here
    compiled = sparta.compile(without, attrs, (torch.randn(4, 48),), measure=False)
    err = error_vs_masked(compiled, without, attrs, torch.randn(5, 48))
    try:
        compiled.train()
        to_train = "nothing raised"
    except sparta.TrainModeError:
        to_train = "TrainModeError"
    compiled.eval()
    still = with_dropout.training and without.training  # the user's modules untouched
    record(
        "model in training mode; compiled.train()",
        "TrainModeError naming the module and model.eval() when training mode changes the "
        "result; compiles otherwise; compiled.train() raises",
        f"with dropout: {'TrainModeError' if 'model.eval()' in raised else raised}; without: "
        f"compiled, error {err:.1e}; compiled.train(): {to_train}; user's modules still in "
        f"training mode: {still}",
        "drop" in raised and "model.eval()" in raised and to_train == "TrainModeError" and still
        and not compiled.training,
        wrong=err > 1e-5,
    )  # fmt: skip


# ---------------------------------------------------------------- inputs


class SmallConvNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@needs_cxx
def test_inputs_unlike_the_example() -> None:
    model, attrs = ThreeLayer().eval(), masks()
    compiled = sparta.compile(model, attrs, (torch.randn(4, 48),), measure=False)
    gen = torch.Generator().manual_seed(11)
    same = {
        "3-D (2, 7, 48)": torch.randn(2, 7, 48, generator=gen),
        "1-D (48,)": torch.randn(48, generator=gen),
        "non-contiguous (a transposed view)": torch.randn(48, 9, generator=gen).t(),
        "zero-size batch (0, 48)": torch.randn(0, 48, generator=gen),
        "8192 tokens": torch.randn(8192, 48, generator=gen),
    }
    errs = {k: error_vs_masked(compiled, model, attrs, x) for k, x in same.items()}
    rejected = {}
    for name, x in {
        "float64": torch.randn(4, 48, dtype=torch.float64),
        "bfloat16": torch.randn(4, 48).bfloat16(),
        "device meta": torch.empty(4, 48, device="meta"),
    }.items():
        try:
            compiled(x)
            rejected[name] = "accepted"
        except sparta.InputError as e:
            rejected[name] = "InputError" if "argument 0" in str(e) else f"unclear: {e}"
    conv = SmallConvNet().eval()
    conv_attrs = {"fc.weight": torch.rand(16, 288, generator=gen) < 0.3}
    cc = sparta.compile(conv, conv_attrs, (torch.randn(2, 3, 6, 6),), measure=False)
    cl = torch.randn(3, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    errs["channels_last (conv net)"] = error_vs_masked(cc, conv, conv_attrs, cl)
    worst = max(errs.values())
    record(
        "inputs of another rank, layout, size, dtype or device than the example",
        "the masked model's answer, or an InputError naming the argument",
        f"{len(errs)} shapes/layouts max error {worst:.1e}; "
        + ", ".join(f"{k}: {v}" for k, v in rejected.items()),
        all(v == "InputError" for v in rejected.values()),
        wrong=worst > 1e-5,
    )


def test_long_sequences_through_a_compiled_encoder() -> None:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=100, max_position_embeddings=512,
    )  # fmt: skip
    model = BertModel(cfg).eval()
    cols = torch.ones(64, 64, dtype=torch.bool)
    cols[:, 16:32] = False  # head 1 unused by the first attention output
    attrs = {"encoder.layer.0.attention.output.dense.weight": cols}
    compiled = sparta.compile(model, attrs, (torch.randint(0, 100, (2, 16)),), measure=False)
    ref = sparta.masked_model(model, attrs)
    errs = {}
    for batch, seq in ((1, 512), (3, 200), (5, 16)):
        ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            out = compiled(ids).last_hidden_state
            want = ref(ids).last_hidden_state
        errs[(batch, seq)] = float((out - want).abs().max())
    record(
        "sequences up to the model's limit (16 -> 512 tokens), other batches",
        "the masked model's answer",
        ", ".join(f"{b}x{s}: {e:.1e}" for (b, s), e in errs.items()),
        True,
        wrong=max(errs.values()) > 1e-4,
    )


# ---------------------------------------------------------------- threads


@needs_cxx
def test_threads_call_one_compiled_model_and_compile_meanwhile() -> None:
    model, attrs = ThreeLayer().eval(), masks()
    compiled = sparta.compile(model, attrs, (torch.randn(4, 48),), measure=False)
    ref = sparta.masked_model(model, attrs)
    errors: list[float] = []
    failures: list[str] = []

    def caller(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            for i in range(15):
                x = torch.randn(1 + (seed + i) % 9, 48, generator=gen)
                with torch.no_grad():
                    errors.append(float((compiled(x) - ref(x)).abs().max()))
        except Exception as e:  # noqa: BLE001 - any failure is the observation
            failures.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    other, other_attrs = ThreeLayer().eval(), masks(seed=7)  # compiled while the others run
    second = sparta.compile(other, other_attrs, (torch.randn(4, 48),), measure=False)
    for t in threads:
        t.join()
    err2 = error_vs_masked(second, other, other_attrs, torch.randn(5, 48))
    worst = max(errors + [err2])
    record(
        "4 threads call one compiled model while a 5th compiles another",
        "every call the masked model's answer; the compile succeeds",
        f"{len(errors)} calls, {len(failures)} failures, max error {worst:.1e}; second model "
        f"{sorted(set(impls(second)))}",
        not failures and len(errors) == 60,
        wrong=worst > 1e-5,
    )


# ---------------------------------------------------------------- the GPU


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _block_model(dev: torch.device):
    torch.manual_seed(0)
    layers = (torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512))
    model = torch.nn.Sequential(*layers).to(dev, torch.float16).eval()
    gen = torch.Generator().manual_seed(1)
    attrs = {
        f"{i}.weight": (torch.rand(w.shape[0] // 32, w.shape[1] // 32, generator=gen) < 0.1)
        .repeat_interleave(32, 0)
        .repeat_interleave(32, 1)
        .to(dev)
        for i, w in ((0, model[0].weight), (2, model[2].weight))
    }
    return model, attrs


@pytest.mark.gpu
@gpu
def test_out_of_memory_while_timing_a_candidate(monkeypatch) -> None:
    import sparta.families as families

    dev = torch.device("cuda")
    model, attrs = _block_model(dev)
    real = families.builder

    def hungry(family, pattern, device):
        build = real(family, pattern, device)
        if family != "triton" or build is None:
            return build

        def built(*args, **kw):
            mod = build(*args, **kw)
            call = mod.op_call()

            class Hungry(torch.nn.Module):  # a candidate that needs more than the GPU has
                def forward(self, x):
                    torch.empty(1 << 45, dtype=torch.uint8, device=x.device)  # 32 TiB: real OOM
                    return call(x)

            return Hungry()

        return built

    monkeypatch.setattr(families, "builder", hungry)
    x = torch.randn(256, 512, device=dev, dtype=torch.float16)
    compiled, messages = compile_caught(model, attrs, x, backends=["dense", "triton"])
    dropped = [m for m in messages if "ran out of device memory" in m]
    err = error_vs_masked(compiled, model, attrs, torch.randn(64, 512, device=dev).half())
    record(
        "GPU out of memory while timing a candidate",
        "the candidate is dropped (warning), not the compile",
        f"{len(dropped)} candidate(s) dropped, impls {sorted(set(impls(compiled)))}, "
        f"error {err:.1e}",
        len(dropped) >= 1 and set(impls(compiled)) <= {"dense"},
        wrong=err > 2e-2,
    )


@pytest.mark.gpu
@gpu
def test_a_kernel_config_that_does_not_compile(monkeypatch, fresh_cache) -> None:
    from sparta.codegen import triton_gen

    dev = torch.device("cuda")
    model, attrs = _block_model(dev)
    real = triton_gen.triton_bsmm.render
    broken: list[tuple[int, int]] = []

    def render(**kw):
        source = real(**kw)
        if not broken or broken[0] == (kw["bn"], kw["bk"]):
            broken[:1] = [(kw["bn"], kw["bk"])]
            return source.replace("tl.dot(", "tl.dot_not_a_function(", 1)  # fails to compile
        return source

    monkeypatch.setattr(triton_gen.triton_bsmm, "render", render)
    x = torch.randn(256, 512, device=dev, dtype=torch.float16)
    compiled, _ = compile_caught(model, attrs, x, backends=["triton"])
    err = error_vs_masked(compiled, model, attrs, torch.randn(64, 512, device=dev).half())
    record(
        "a Triton kernel config that fails to compile while tuning",
        "that config is skipped; the others are tuned and used",
        f"broken config {broken[0] if broken else None}, impls {sorted(set(impls(compiled)))}, "
        f"error {err:.1e}",
        bool(broken) and set(impls(compiled)) == {"triton"},
        wrong=err > 2e-2,
    )
