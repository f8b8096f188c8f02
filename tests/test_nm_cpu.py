"""nm_cpu backend: layout conversion, generated C++ kernels (every ISA path), kernel cache.

Real builds with g++ into a temporary SPARTA_CACHE_DIR; every check is against the float64
dense reference on fresh random data.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from sparta.codegen import cache, nm_cpu
from sparta.errors import BackendError
from sparta.kernels.nm_layout import dense_reference, pack_nm, pattern_ids, unpack_nm

pytestmark = pytest.mark.skipif(not nm_cpu.available(), reason="no C++ compiler")

NM = [(2, 4), (1, 4), (1, 8), (2, 8), (1, 10)]
TOKENS = [1, 2, 3, 4, 8, 9, 17, 64, 65, 130, 512]
ISAS = ["scalar", "avx2", "avx512"]


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


def random_nm_mask(rows: int, k: int, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """Any n:m mask: per row and chunk a random subset of 0..n positions (so some need padding)."""
    chunks = math.ceil(k / m)
    scores = torch.rand(rows, chunks, m, generator=gen)
    top = scores.topk(n, dim=-1).indices
    keep = torch.zeros(rows, chunks, m, dtype=torch.bool).scatter_(-1, top, True)
    drop = torch.rand(rows, chunks, m, generator=gen) < 0.15  # rows keeping fewer than n
    return (keep & ~drop).reshape(rows, chunks * m)[:, :k]


def make_case(rows: int, k: int, n: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, k, generator=gen)
    mask = random_nm_mask(rows, k, n, m, gen)
    bias = torch.randn(rows, generator=gen)
    return weight, mask, bias, gen


def check(mod: torch.nn.Module, weight, mask, bias, act, tokens, gen) -> None:
    for t in tokens:
        x = torch.randn(t, weight.shape[1], generator=gen)
        ref = dense_reference(x, weight, mask, bias, act)
        torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4, msg=f"{t} tokens")


@pytest.mark.parametrize("n,m", NM)
def test_layout_roundtrip_any_mask(n: int, m: int) -> None:
    weight, mask, _, _ = make_case(13, 37, n, m, seed=n * 100 + m)
    for rows_per_tile in (1, 3, 6):
        packed = pack_nm(weight, mask, n, m, rows_per_tile)
        assert packed.vals.shape == (
            math.ceil(13 / rows_per_tile),
            math.ceil(37 / m),
            n,
            rows_per_tile,
        )
        torch.testing.assert_close(unpack_nm(packed), weight * mask, rtol=0, atol=0)
    ids = pattern_ids(mask, m)
    assert ids.shape == (13, math.ceil(37 / m))
    assert int(ids.max()) < 2**m


def test_rejects_non_nm_mask() -> None:
    weight = torch.randn(8, 16)
    mask = torch.ones(8, 16, dtype=torch.bool)
    with pytest.raises(BackendError, match="not 2:4"):
        nm_cpu.build_nm_linear(weight, mask, n=2, m=4)
    with pytest.raises(BackendError, match="bool"):
        nm_cpu.build_nm_linear(weight, mask.float(), n=2, m=4)


@pytest.mark.parametrize("n,m", NM)
def test_patterns_ragged_tokens(n: int, m: int) -> None:
    weight, mask, bias, gen = make_case(37, 53, n, m, seed=7 * m + n)  # odd N, K % m != 0
    mod = nm_cpu.build_nm_linear(weight, mask, bias, n=n, m=m)
    check(mod, weight, mask, bias, None, TOKENS, gen)


def paths() -> list[str | None]:
    return ["tile", "perm"] if nm_cpu.detect_isa() == "avx512" else [None]


@pytest.mark.parametrize("path", paths())
@pytest.mark.parametrize("act", [None, "relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bias_and_activation(act: str | None, with_bias: bool, path: str | None) -> None:
    weight, mask, bias, gen = make_case(50, 64, 2, 4, seed=3)
    bias = bias if with_bias else None
    mod = nm_cpu.build_nm_linear(weight, mask, bias, act, n=2, m=4, path=path)
    check(mod, weight, mask, bias, act, [1, 3, 6, 20, 100], gen)


@pytest.mark.parametrize("path", ["tile", "perm"])
@pytest.mark.parametrize("n,m", NM)
def test_both_avx512_paths_ragged(path: str, n: int, m: int) -> None:
    """Each AVX-512 path forced: odd N, K % m != 0 and K % 16 != 0, every token count."""
    isa_or_skip("avx512")
    weight, mask, bias, gen = make_case(37, 53, n, m, seed=5 * m + n)
    mod = nm_cpu.build_nm_linear(weight, mask, bias, n=n, m=m, path=path)
    assert mod.path == path and f"path: {path}" in mod.source
    check(mod, weight, mask, bias, None, TOKENS, gen)


@pytest.mark.parametrize("n,m", [(1, 3), (1, 5), (1, 6), (2, 12), (1, 20), (1, 32), (4, 16)])
def test_perm_chunk_slots(n: int, m: int) -> None:
    """Perm path for m that is not the width of its x slot (3 -> 4, 5/6 -> 8, 12 -> 16,
    20 -> 32: two-source permutes; 32) and n = 4 (R = 4, four partial sums per row)."""
    isa_or_skip("avx512")
    weight, mask, bias, gen = make_case(45, 3 * m + 7, n, m, seed=m)
    mod = nm_cpu.build_nm_linear(weight, mask, bias, "relu", n=n, m=m, path="perm")
    check(mod, weight, mask, bias, "relu", [1, 2, 3, 7, 16, 40], gen)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 10), (1, 4)])
def test_perm_k_blocks_and_row_groups(monkeypatch: pytest.MonkeyPatch, n: int, m: int) -> None:
    """Perm path with several k blocks (accumulators spilled between them), one row tile per
    group, token blocks with tails, bias and activation, 1..3 threads."""
    isa_or_skip("avx512")
    monkeypatch.setattr(nm_cpu, "PERM_GROUP_BYTES", 1)
    weight, mask, bias, gen = make_case(301, 1000, n, m, seed=17 * m + n)
    mod = nm_cpu.build_nm_linear(weight, mask, bias, "gelu", n=n, m=m, path="perm")
    assert "#define NM_PGB 1\n" in mod.source
    chunks = math.ceil(1000 / m)
    pkb = int(mod.source.split("#define NM_PKB ")[1].split()[0])
    assert pkb < chunks  # several k blocks
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            check(mod, weight, mask, bias, "gelu", [1, 5, 16, 33, 130], gen)
    finally:
        torch.set_num_threads(old)


def test_path_choice() -> None:
    assert nm_cpu.choose_path(2, 4, "avx512") == "tile"
    assert nm_cpu.choose_path(1, 4, "avx512") == "perm"
    assert nm_cpu.choose_path(1, 10, "avx512") == "perm"
    assert nm_cpu.choose_path(2, 8, "avx512") == "perm"
    # between 1 in 4 and 1 in 8 kept, the token count decides; sparser is always perm
    big = nm_cpu.PERM_MAX_TOKENS + 1
    assert nm_cpu.choose_path(1, 4, "avx512", tokens=nm_cpu.PERM_MAX_TOKENS) == "perm"
    assert nm_cpu.choose_path(1, 4, "avx512", tokens=big) == "tile"
    assert nm_cpu.choose_path(2, 8, "avx512", tokens=big) == "tile"
    assert nm_cpu.choose_path(1, 8, "avx512", tokens=big) == "perm"
    assert nm_cpu.choose_path(2, 4, "avx512", tokens=1) == "tile"
    assert nm_cpu.choose_path(1, 40, "avx512") == "tile"  # m > 32
    assert nm_cpu.choose_path(3, 16, "avx512") == "tile"  # n does not divide 16
    assert nm_cpu.choose_path(1, 10, "avx2") == "tile"
    assert nm_cpu.choose_path(1, 10, "avx512", tiles=(6, 4, 8)) == "tile"
    with pytest.raises(BackendError, match="perm path needs"):
        nm_cpu.choose_path(3, 16, "avx512", "perm")
    with pytest.raises(BackendError, match="path must be"):
        nm_cpu.choose_path(1, 4, "avx512", "fast")
    with pytest.raises(BackendError, match="tiles"):
        nm_cpu.choose_path(1, 4, "avx512", "perm", (6, 4, 8))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 10)])
def test_forced_isa_paths(isa: str, n: int, m: int) -> None:
    isa_or_skip(isa)
    weight, mask, bias, gen = make_case(29, 45, n, m, seed=11)
    mod = nm_cpu.build_nm_linear(weight, mask, bias, "gelu", n=n, m=m, isa=isa)
    assert mod.isa == isa and f"isa: {isa}" in mod.source
    check(mod, weight, mask, bias, "gelu", [1, 2, 9, 33, 70], gen)


def test_batched_input_threads_and_attributes() -> None:
    weight, mask, bias, gen = make_case(96, 128, 1, 4, seed=5)
    mod = nm_cpu.build_nm_linear(weight, mask, bias, "relu", n=1, m=4, node="fc1")
    assert mod.key and "NM_N 1" in mod.source
    x = torch.randn(3, 41, 128, generator=gen)
    ref = dense_reference(x, weight, mask, bias, "relu")
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            torch.testing.assert_close(mod(x), ref, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(old)
    assert mod(x[:, :0]).shape == (3, 0, 96)
    with pytest.raises(BackendError, match="float32"):
        mod(x.double())


def test_debug_dump(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SPARTA_DEBUG", "2")
    weight, mask, _, _ = make_case(16, 32, 1, 8, seed=2)
    mod = nm_cpu.build_nm_linear(weight, mask, n=1, m=8, node="layers.0.fc2")
    err = capsys.readouterr().err
    assert f"node: layers.0.fc2 | pattern: 1:8 | key: {mod.key}" in err
    assert "nm_forward" in err


def test_no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARTA_CXX", "/nonexistent/g++")
    assert not nm_cpu.available()
    weight, mask, _, _ = make_case(8, 16, 2, 4, seed=1)
    with pytest.raises(BackendError, match="compiler"):
        nm_cpu.build_nm_linear(weight, mask, n=2, m=4)


def _count_compiles(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    calls: list[list[str]] = []
    real = nm_cpu.subprocess.run

    def spy(cmd, *args, **kwargs):
        if "-o" in cmd:
            calls.append(cmd)
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(nm_cpu.subprocess, "run", spy)
    return calls


def test_cache_hit_and_corrupt_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_compiles(monkeypatch)
    weight, mask, bias, gen = make_case(21, 33, 2, 8, seed=9)
    mod = nm_cpu.build_nm_linear(weight, mask, bias, "gelu_tanh", n=2, m=8)
    assert len(calls) == 1
    cache._MEMO.clear()  # as a new process would: the entry is found on disk
    again = nm_cpu.build_nm_linear(weight, mask, bias, "gelu_tanh", n=2, m=8)
    assert len(calls) == 1 and again.key == mod.key

    # A truncated library (never loaded by this process) is detected and rebuilt.
    source = nm_cpu.render(2, 8, 23, 35, nm_cpu.detect_isa(), True, None)
    path, _ = nm_cpu.compile_source(source, nm_cpu.detect_isa())
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    cache._MEMO.clear()
    path2, _ = nm_cpu.compile_source(source, nm_cpu.detect_isa())
    assert path2 == path and path.stat().st_size == size and len(calls) == 3
    weight, mask, bias, gen = make_case(23, 35, 2, 8, seed=4)
    check(nm_cpu.build_nm_linear(weight, mask, bias, n=2, m=8), weight, mask, bias, None, [5], gen)


def _build_in_child(cache_root: str, queue) -> None:
    os.environ["SPARTA_CACHE_DIR"] = cache_root
    weight, mask, bias, gen = make_case(40, 72, 1, 4, seed=123)
    mod = nm_cpu.build_nm_linear(weight, mask, bias, "relu", n=1, m=4)
    x = torch.randn(19, 72, generator=gen)
    err = (mod(x) - dense_reference(x, weight, mask, bias, "relu")).abs().max().item()
    queue.put((mod.key, err))


def test_two_processes_build_same_kernel(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [queue.get(timeout=5) for _ in procs]
    assert results[0][0] == results[1][0]
    assert all(err < 1e-4 for _, err in results)
    assert len(list(tmp_path.glob("*.so"))) == 1
