"""Block-sparse linear kernels against a dense fp32 reference (CPU: Triton interpreter)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sparta.codegen import triton_gen as tg  # noqa: E402
from sparta.codegen.triton_load import interpreting  # noqa: E402
from sparta.codegen.triton_pack import plan_tiles  # noqa: E402
from sparta.errors import BackendError  # noqa: E402
from sparta.kernels import triton_bsmm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
pytestmark = pytest.mark.skipif(not tg.available(DEVICE), reason="Triton cannot run here")

# Relative Frobenius error allowed per dtype (fp32 dots run as tf32 on GPU).
TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DTYPES = list(TOL)
SMALL = tg.LinearConfig(bn=32, bk=32, block_m=32, small_block_m=16)
GPU = tg.LinearConfig(bn=64, bk=64, block_m=256, warps=8, swap=True, small_block_m=64)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any(), "NaN in output (an element left unwritten?)"
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-6))


def random_mask(n: int, k: int, density: float, block: tuple[int, int] = (1, 1)) -> torch.Tensor:
    bh, bw = block
    coarse = torch.rand(-(-n // bh), -(-k // bw)) < density
    return coarse.repeat_interleave(bh, 0).repeat_interleave(bw, 1)[:n, :k].contiguous()


def check(n, k, m, density, dtype, *, bias=True, act=None, block=(1, 1), config=SMALL, lead=()):
    w = torch.randn(n, k, dtype=dtype, device=DEVICE)
    mask = random_mask(n, k, density, block).to(DEVICE)
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    mod = tg.build_block_sparse_linear(w, mask, b, act, node="t", config=config)
    x = torch.randn(*lead, m, k, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        y = mod(x)
    ref = triton_bsmm.reference(x, w, mask, b, act)
    assert y.shape == (*lead, m, n) and y.dtype == dtype
    if not bias and density == 0:
        assert torch.count_nonzero(y) == 0
    else:
        assert rel_err(y, ref) < TOL[dtype]
    return mod


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_dtypes_densities(dtype, density):
    check(70, 90, 17, density, dtype)


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_token_counts_and_bias(m, bias):
    check(45, 50, m, 0.5, torch.float16, bias=bias)


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_activations(act):
    check(40, 48, 9, 0.5, torch.float32, act=act)


def test_zero_mask_writes_activation_of_bias():
    w = torch.randn(33, 20, device=DEVICE)
    b = torch.randn(33, device=DEVICE)
    mask = torch.zeros(33, 20, dtype=torch.bool, device=DEVICE)
    mod = tg.build_block_sparse_linear(w, mask, b, "gelu", config=SMALL)
    y = mod(torch.randn(5, 20, device=DEVICE))
    assert torch.allclose(y, torch.nn.functional.gelu(b).expand(5, 33), atol=1e-5)


@pytest.mark.parametrize("bn,bk,swap", [(16, 16, 0), (64, 16, 1), (16, 64, 0), (64, 32, 1)])
def test_tile_shapes_ragged_block_masks(bn, bk, swap):
    cfg = tg.LinearConfig.single(bn, bk, (bool(swap), 16, 4, 3))
    check(100, 75, 20, 0.4, torch.float32, block=(8, 8), config=cfg, lead=(2,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_features_as_rows_orientation(dtype):
    cfg = tg.LinearConfig.single(32, 16, (True, 16, 4, 3))
    check(50, 70, 19, 0.5, dtype, act="gelu_tanh", config=cfg)


def test_block_mask_with_32_blocks_and_default_config():
    mod = check(96, 128, 7, 0.3, torch.float16, block=(32, 32), config=None)
    assert mod.source and mod.key


def test_clustering_permutes_rows_and_stays_exact():
    # Rows with two interleaved column patterns: grouping them halves the listed slabs.
    n, k = 64, 64
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[0::2, :32] = True
    mask[1::2, 32:] = True
    plain = plan_tiles(mask, 32, 32, cluster=False)
    clustered = plan_tiles(mask, 32, 32, cluster=True)
    assert clustered.clustered and clustered.n_slabs < plain.n_slabs
    w = torch.randn(n, k, device=DEVICE)
    mod = tg.build_block_sparse_linear(w, mask.to(DEVICE), None, None, config=SMALL)
    x = torch.randn(6, k, device=DEVICE)
    assert rel_err(mod(x), triton_bsmm.reference(x, w, mask.to(DEVICE))) < TOL[torch.float32]


@pytest.mark.parametrize("seed", range(5))
def test_plan_covers_every_kept_element(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 37 + seed * 11, 29 + seed * 7
    mask = torch.rand(n, k, generator=g) < 0.2
    for bn, bk in [(16, 16), (32, 16), (64, 32)]:
        plan = plan_tiles(mask, bn, bk)
        rows = plan.rows.view(plan.n_tiles, bn)
        assert sorted(r for r in plan.rows.tolist() if r < n) == list(range(n))
        assert len(set(plan.rows.tolist())) == len(plan.rows)
        for t in range(plan.n_tiles):
            real = rows[t][rows[t] < n]
            need = torch.zeros(plan.tile_chunks.shape[1], dtype=torch.bool)
            for c in mask[real].any(dim=0).nonzero().flatten().tolist():
                need[c // bk] = True
            assert torch.equal(plan.tile_chunks[t], need)


def test_debug_dump_and_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARTA_DEBUG", "2")
    w = torch.randn(40, 40, device=DEVICE)
    mask = random_mask(40, 40, 0.5).to(DEVICE)
    mod = tg.build_block_sparse_linear(w, mask, None, "relu", node="enc.fc1", config=SMALL)
    err = capsys.readouterr().err
    assert "node: enc.fc1" in err and f"key: {mod.key}" in err and "pattern:" in err
    dumped = tmp_path / "cache" / "debug" / f"{mod.key}.py"
    assert dumped.exists() and "sparta_bsmm_kernel" in dumped.read_text()
    again = tg.build_block_sparse_linear(w, mask, None, "relu", node="enc.fc1", config=SMALL)
    assert again.key == mod.key and again.source == mod.source


def test_errors_are_clear():
    w = torch.randn(20, 20, device=DEVICE)
    mask = torch.ones(20, 20, dtype=torch.bool, device=DEVICE)
    with pytest.raises(BackendError, match="activation"):
        tg.build_block_sparse_linear(w, mask, None, "swish")
    with pytest.raises(BackendError, match="same shape"):
        tg.build_block_sparse_linear(w, mask[:5], None)
    mod = tg.build_block_sparse_linear(w, mask, None, config=SMALL)
    with pytest.raises(BackendError, match="expects"):
        mod(torch.randn(3, 20, dtype=torch.float64, device=DEVICE))
    with pytest.raises(BackendError, match="inference-only"):
        mod(torch.randn(3, 20, device=DEVICE, requires_grad=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_gpu_large(dtype, density, act):
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    for m in (1, 300, 1000):
        check(1000, 776, m, density, dtype, act=act, block=(32, 32), config=GPU)
    check(768, 3000, 257, density, dtype, act=act, config=GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("density", [0.05, 0.5])
def test_gpu_tuned(density):
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    for m in (1, 700, 5000):
        check(1024, 1000, m, density, torch.float16, act="relu", block=(32, 32), config=None)


@pytest.mark.gpu
def test_gpu_op_under_torch_compile_and_cuda_graphs_matches_eager():
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    w = torch.randn(512, 384, device=DEVICE, dtype=torch.float16)
    mask = random_mask(512, 384, 0.3, (32, 32)).to(DEVICE)
    mod = tg.build_block_sparse_linear(w, mask, torch.randn(512, device=DEVICE).half(), "gelu",
                                       config=GPU)  # fmt: skip
    call = mod.op_call()

    def f(x):
        return torch.relu(call(x)) + 1.0  # Inductor fuses the dense ops after the kernel

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    graphs = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    base = torch.randn(2000 * 384 + 8, device=DEVICE, dtype=torch.float16)
    for m, off in ((1, 0), (300, 0), (300, 3), (1000, 0), (7, 5)):
        x = base[off : off + m * 384].view(m, 384)  # ragged counts, a misaligned view
        want = torch.relu(mod(x)) + 1.0
        assert torch.equal(compiled(x), want)
        if off == 0:  # misaligned views fault inside Inductor's CUDA-graph path (torch 2.11):
            assert torch.equal(graphs(x).clone(), want)  # a known limit, see docs/design.md


def test_fp32_dots_follow_torchs_float32_matmul_precision():
    """fp32 kernels use TF32 only where PyTorch's own fp32 matmuls would (a silent precision
    change against the dense model otherwise)."""
    from sparta.kernels.triton_bsmm import render
    from sparta.kernels.triton_common import fp32_precision

    src = render(bn=32, bk=32, k=64, dtype=torch.float32, has_bias=False, activation=None)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fp32_precision(src, torch.float32).count('input_precision="ieee"') == 2
        torch.set_float32_matmul_precision("high")
        assert fp32_precision(src, torch.float32).count('input_precision="tf32"') == 2
    finally:
        torch.set_float32_matmul_precision(before)
    assert fp32_precision(src, torch.float16) == src
