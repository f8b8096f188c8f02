"""sparse_cpu backend: layout, generated unstructured C++ kernels (every ISA path), kernel cache,
and the CPU kernels as torch.library custom ops traced by torch.compile without graph breaks.

Real builds with g++ into a temporary SPARTA_CACHE_DIR; every check is against the float64
dense reference on fresh random data.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import sparta
from sparta.codegen import cache, cpu_ops, nm_cpu, sparse_cpu
from sparta.errors import BackendError, InputError
from sparta.kernels.nm_layout import dense_reference
from sparta.kernels.sparse_layout import k_blocking, pack_sparse, unpack_sparse

pytestmark = pytest.mark.skipif(not nm_cpu.available(), reason="no C++ compiler")

ISAS = ["scalar", "avx2", "avx512"]
TOKENS = [1, 2, 7, 8, 9, 31, 32, 33, 64, 100, 512]
DENSITIES = [0.0, 0.03, 0.3, 0.7, 1.0]


def isa_or_skip(isa: str) -> str:
    if isa != "scalar" and nm_cpu.ISAS.index(isa) < nm_cpu.ISAS.index(nm_cpu.detect_isa()):
        pytest.skip(f"this CPU lacks {isa}")
    return isa


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    old = os.environ.get("SPARTA_CACHE_DIR")
    path = tmp_path_factory.mktemp("sparta-cache")
    os.environ["SPARTA_CACHE_DIR"] = str(path)
    cache._MEMO.clear()
    yield path
    cache._MEMO.clear()
    if old is None:
        os.environ.pop("SPARTA_CACHE_DIR", None)
    else:
        os.environ["SPARTA_CACHE_DIR"] = old


def make_case(rows: int, k: int, density: float, seed: int):
    """A random mask of about ``density`` kept, with one all-pruned and one all-kept row."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, k, generator=gen)
    mask = torch.rand(rows, k, generator=gen) < density
    if rows >= 3:
        mask[1] = False
        mask[-1] = True
    bias = torch.randn(rows, generator=gen)
    return weight, mask, bias, gen


def check(mod, weight, mask, bias, act, tokens, gen) -> None:
    for t in tokens:
        x = torch.randn(t, weight.shape[1], generator=gen)
        ref = dense_reference(x, weight, mask, bias, act)
        torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4, msg=f"{t} tokens")


@pytest.mark.parametrize("density", DENSITIES)
def test_layout_roundtrip(density: float) -> None:
    weight, mask, _, _ = make_case(13, 45, density, seed=int(density * 100))
    for kb, tt in ((8, 32), (16, 8), (48, 64)):
        packed = pack_sparse(weight, mask, kb, tt)
        assert packed.blocks == math.ceil(45 / kb) and packed.nnz == int(mask.sum())
        assert packed.rowptr.shape == (packed.blocks * 13 + 1,)
        assert int(packed.rowtot[-1]) == packed.nnz
        torch.testing.assert_close(unpack_sparse(packed), weight * mask, rtol=0, atol=0)


def test_k_blocking_even() -> None:
    assert k_blocking(768, 192) == (192, 4)
    assert k_blocking(1000, 192) == (168, 6)  # 6 blocks as even as a multiple of 8 allows
    assert k_blocking(5, 192) == (8, 1)


@pytest.mark.parametrize("density", DENSITIES)
def test_densities_ragged_tokens(density: float) -> None:
    """Odd N and K (K % 8 != 0), every token count, all-pruned and all-kept rows."""
    weight, mask, bias, gen = make_case(37, 53, density, seed=3 + int(density * 10))
    mod = sparse_cpu.build_sparse_linear(weight, mask, bias)
    assert mod.nnz == int(mask.sum())
    check(mod, weight, mask, bias, None, TOKENS, gen)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_isa_bias_activation(isa: str, act: str | None, with_bias: bool) -> None:
    isa_or_skip(isa)
    weight, mask, bias, gen = make_case(29, 70, 0.4, seed=11)
    bias = bias if with_bias else None
    mod = sparse_cpu.build_sparse_linear(weight, mask, bias, act, isa=isa)
    assert mod.isa == isa and f"isa: {isa}" in mod.source
    check(mod, weight, mask, bias, act, [1, 3, 9, 33, 70], gen)


@pytest.mark.parametrize("isa", ISAS)
def test_k_blocks_threads_and_batched_input(isa: str) -> None:
    """Many k blocks (accumulators carried between them), thread splits that cut rows with no
    kept weight, 1..3 threads, a 3-D input."""
    isa_or_skip(isa)
    weight, mask, bias, gen = make_case(301, 1000, 0.1, seed=17)
    mask[100:140] = False
    mod = sparse_cpu.build_sparse_linear(weight, mask, bias, "gelu", isa=isa, k_block=40)
    assert "#define SP_NB 25\n" in mod.source
    old = torch.get_num_threads()
    try:
        # 130 tokens: few panels, threads split the rows; 300: panels split among threads
        for tokens in (65, 150):
            x = torch.randn(2, tokens, 1000, generator=gen)
            ref = dense_reference(x, weight, mask, bias, "gelu")
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(old)
    assert mod(x[:, :0]).shape == (2, 0, 301)


def test_rejects_bad_input() -> None:
    weight, mask, _, _ = make_case(8, 16, 0.5, seed=1)
    with pytest.raises(BackendError, match="bool"):
        sparse_cpu.build_sparse_linear(weight, mask.float())
    with pytest.raises(BackendError, match="same shape|one shape"):
        sparse_cpu.build_sparse_linear(weight, mask[:, :8])
    with pytest.raises(BackendError, match="activation"):
        sparse_cpu.build_sparse_linear(weight, mask, activation="swish")
    mod = sparse_cpu.build_sparse_linear(weight, mask)
    with pytest.raises(BackendError, match="float32"):
        mod(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(InputError, match=r"\(\.\.\., 16\)"):
        mod(torch.randn(3, 17))


def _count_compiles(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = nm_cpu.subprocess.run

    def spy(cmd, *args, **kwargs):
        if "-o" in cmd:
            calls.append(cmd)
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(nm_cpu.subprocess, "run", spy)
    return calls


def test_cache_hit_shared_library_and_corrupt_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_compiles(monkeypatch)
    weight, mask, bias, gen = make_case(21, 35, 0.3, seed=9)
    mod = sparse_cpu.build_sparse_linear(weight, mask, bias, "gelu_tanh")
    assert len(calls) == 1
    # another mask of the same shape and density class: same library, its own tables
    w2, m2, b2, _ = make_case(21, 35, 0.3, seed=10)
    other = sparse_cpu.build_sparse_linear(w2, m2, b2, "gelu_tanh")
    assert len(calls) == 1 and other.key == mod.key
    check(other, w2, m2, b2, "gelu_tanh", [5, 40], gen)
    check(mod, weight, mask, bias, "gelu_tanh", [5, 40], gen)

    # A truncated library (never loaded by this process) is detected and rebuilt.
    isa = nm_cpu.detect_isa()
    source = sparse_cpu.render(23, 37, isa, True, None, 0.3)
    path, _ = nm_cpu.compile_source(source, isa, "sparse_cpu")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    cache._MEMO.clear()
    path2, _ = nm_cpu.compile_source(source, isa, "sparse_cpu")
    assert path2 == path and path.stat().st_size == size and len(calls) == 3


def test_library_found_by_key_in_the_cache() -> None:
    """A process that did not build a kernel finds its library by key in the kernel cache."""
    weight, mask, bias, gen = make_case(19, 24, 0.5, seed=2)
    mod = sparse_cpu.build_sparse_linear(weight, mask, bias)
    cpu_ops._LIBS.pop(mod.key)
    check(mod, weight, mask, bias, None, [4], gen)
    with pytest.raises(BackendError, match="kernel cache"):
        cpu_ops.library("0" * 24, "sparse_cpu")


def test_debug_dump(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SPARTA_DEBUG", "2")
    weight, mask, _, _ = make_case(16, 32, 0.25, seed=2)
    mod = sparse_cpu.build_sparse_linear(weight, mask, node="layers.0.fc2")
    err = capsys.readouterr().err
    density = float(mask.sum()) / mask.numel()
    assert f"node: layers.0.fc2 | pattern: unstructured {density:.3f}" in err
    assert f"key: {mod.key}" in err and "sp_forward" in err


class _TwoKernels(torch.nn.Module):
    def __init__(self, first: torch.nn.Module, second: torch.nn.Module) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x)) * 2.0) + 1.0


def test_custom_ops_traced_by_torch_compile_without_graph_breaks() -> None:
    gen = torch.Generator().manual_seed(5)
    w1, m1 = torch.randn(48, 40, generator=gen), torch.rand(48, 40, generator=gen) < 0.3
    w2 = torch.randn(24, 48, generator=gen)
    m2 = torch.zeros(24, 48, dtype=torch.bool)
    m2[:, ::4] = True  # 1:4
    b2 = torch.randn(24, generator=gen)
    model = _TwoKernels(
        sparse_cpu.build_sparse_linear(w1, m1, None, "gelu"),
        nm_cpu.build_nm_linear(w2, m2, b2, n=1, m=4),
    )
    x = torch.randn(3, 7, 40, generator=gen)
    ref = dense_reference(dense_reference(x, w1, m1, None, "gelu").relu() * 2.0, w2, m2, b2) + 1
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    ops = {str(n.target) for g in explain.graphs for n in g.graph.nodes}
    assert {"sparta.sparse_linear.default", "sparta.nm_linear.default"} <= ops
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-4)
    x2 = torch.randn(5, 40, generator=gen)  # another shape through the same compiled graph
    ref2 = dense_reference(dense_reference(x2, w1, m1, None, "gelu").relu() * 2.0, w2, m2, b2) + 1
    torch.testing.assert_close(compiled(x2), ref2, rtol=1e-4, atol=1e-4)


def test_fake_implementations() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight, mask, bias, _ = make_case(10, 24, 0.5, seed=8)
    mod = sparse_cpu.build_sparse_linear(weight, mask, bias)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = mod(torch.empty(2, 3, 24))
    assert tuple(y.shape) == (2, 3, 10) and y.dtype == torch.float32
    torch.library.opcheck(
        torch.ops.sparta.sparse_linear.default,
        (torch.randn(4, 24), mod.vals, mod.offs, mod.rowptr, mod.rowtot, mod.bias, mod.key, 24, 10),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_planner_picks_sparse_cpu_through_compile() -> None:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    attrs = {
        "0.weight": torch.rand(96, 64, generator=gen) < 0.1,
        "2.weight": torch.rand(32, 96, generator=gen) < 0.2,
    }
    x = torch.randn(4, 64, generator=gen)
    compiled = sparta.compile(model, attrs, (x,), backends=["sparse_cpu"], measure=False)
    impls = {node.impl for node in compiled.report.nodes if node.latency_ms}
    assert impls == {"sparse_cpu"}
    masked = sparta.masked_model(model, attrs)
    x2 = torch.randn(9, 64, generator=gen)
    torch.testing.assert_close(compiled(x2), masked(x2), rtol=1e-4, atol=1e-5)
    assert "sparse_cpu" in sparta.families.check_backends(None, torch.device("cpu"))


def test_small_calls_serial_large_parallel_both_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small calls run on one thread (the grain); with the grain at 0 every call is parallel.
    Both ways, 1..3 threads, nm_cpu and sparse_cpu match the reference."""
    assert cpu_ops._threads(10, 10) == 1
    assert cpu_ops._threads(1 << 20, 1) == torch.get_num_threads()
    weight, mask, bias, gen = make_case(45, 64, 0.3, seed=21)
    nm_mask = torch.zeros(45, 64, dtype=torch.bool)
    nm_mask[:, 1::4] = True
    sp = sparse_cpu.build_sparse_linear(weight, mask, bias, "relu")
    nm = nm_cpu.build_nm_linear(weight, nm_mask, bias, "relu", n=1, m=4)
    old = torch.get_num_threads()
    try:
        for grain in (cpu_ops.PARALLEL_MIN_MACS, 0):
            monkeypatch.setattr(cpu_ops, "PARALLEL_MIN_MACS", grain)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                check(sp, weight, mask, bias, "relu", [1, 17, 70], gen)
                check(nm, weight, nm_mask, bias, "relu", [1, 17, 70], gen)
    finally:
        torch.set_num_threads(old)
