"""SDDMM and sparse-input matmul kernels against a dense fp32 reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from sparta.codegen import triton_gen as tg  # noqa: E402
from sparta.codegen.triton_load import interpreting  # noqa: E402
from sparta.errors import BackendError  # noqa: E402
from sparta.kernels import triton_sddmm, triton_spmm  # noqa: E402
from sparta.tesa import block_any  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")
pytestmark = pytest.mark.skipif(not tg.available(DEVICE), reason="Triton cannot run here")
TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any()
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-6))


def pattern(m: int, n: int, density: float, block: int) -> torch.Tensor:
    coarse = torch.rand(-(-m // block), -(-n // block)) < density
    fine = coarse.repeat_interleave(block, 0).repeat_interleave(block, 1)[:m, :n]
    # Thin the kept blocks: the kernels must cover a pattern that is not block-shaped.
    return (fine & (torch.rand(m, n) < 0.7)).contiguous()


def kept_elements(pat: torch.Tensor, block: int) -> torch.Tensor:
    m, n = pat.shape
    kb = block_any(pat, block, block)
    return kb.repeat_interleave(block, 0).repeat_interleave(block, 1)[:m, :n]


def check_sddmm(m, n, k, density, dtype, block, batch=(2,), b_batch=None, transpose_b=False):
    pat = pattern(m, n, density, block)
    mod = tg.build_sddmm(pat.to(DEVICE), block, dtype=dtype, device=DEVICE, node="attn.scores")
    a = torch.randn(*batch, m, k, dtype=dtype, device=DEVICE)
    bb = b_batch if b_batch is not None else batch
    if transpose_b:
        b = torch.randn(*bb, n, k, dtype=dtype, device=DEVICE).transpose(-1, -2)
    else:
        b = torch.randn(*bb, k, n, dtype=dtype, device=DEVICE)
    c = mod(a, b)
    keep = kept_elements(pat, block).to(DEVICE)
    ref = triton_sddmm.reference(a, b, keep)
    assert c.shape == ref.shape and c.dtype == dtype
    assert torch.count_nonzero(c * ~keep) == 0, "pruned blocks must be written as zeros"
    if keep.any():
        assert rel_err(c, ref) < TOL[dtype]
    return mod


def check_spmm(m, k, n, density, dtype, block, batch=(2,)):
    pat = pattern(m, k, density, block).to(DEVICE)
    mod = tg.build_sparse_input_matmul(pat, block, dtype=dtype, device=DEVICE, node="attn.pv")
    p = torch.randn(*batch, m, k, dtype=dtype, device=DEVICE) * pat
    v = torch.randn(*batch, k, n, dtype=dtype, device=DEVICE)
    c = mod(p, v)
    ref = triton_spmm.reference(p, v, pat)
    assert c.shape == ref.shape and c.dtype == dtype
    if pat.any():
        assert rel_err(c, ref) < TOL[dtype]
    else:
        assert torch.count_nonzero(c) == 0
    return mod


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_sddmm_densities(density):
    check_sddmm(40, 50, 24, density, torch.float32, 16)


@pytest.mark.parametrize("dtype", list(TOL))
def test_sddmm_dtypes(dtype):
    check_sddmm(33, 47, 40, 0.5, dtype, 16)


@pytest.mark.parametrize("block", [8, 20, 32])
def test_sddmm_block_not_tile(block):
    # 8 and 20 are covered by larger tiles whose pruned sub-blocks must still read 0.
    check_sddmm(45, 41, 19, 0.4, torch.float32, block, transpose_b=True)


def test_sddmm_batch_broadcast_and_single_row():
    check_sddmm(1, 30, 17, 1.0, torch.float16, 16, batch=(2, 3), b_batch=(3,))
    check_sddmm(30, 30, 17, 0.5, torch.float16, 16, batch=(2, 3))


@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_spmm_densities(density):
    check_spmm(40, 50, 24, density, torch.float32, 16)


@pytest.mark.parametrize("dtype", list(TOL))
def test_spmm_dtypes(dtype):
    check_spmm(37, 45, 70, 0.5, dtype, 16)


@pytest.mark.parametrize("block", [8, 24, 32])
def test_spmm_blocks_and_ragged(block):
    check_spmm(45, 41, 3, 0.4, torch.float32, block, batch=(3,))


def test_sources_are_inspectable(monkeypatch, capsys):
    monkeypatch.setenv("SPARTA_DEBUG", "2")
    mod = check_sddmm(32, 32, 16, 0.5, torch.float32, 16)
    err = capsys.readouterr().err
    assert "node: attn.scores" in err and mod.key in err and "sparta_sddmm_kernel" in mod.source
    mod = check_spmm(32, 32, 16, 0.5, torch.float32, 16)
    assert "node: attn.pv" in capsys.readouterr().err and mod.key


def test_shape_errors():
    pat = torch.ones(16, 16, dtype=torch.bool, device=DEVICE)
    mod = tg.build_sddmm(pat, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(BackendError, match="pattern is"):
        mod(torch.randn(8, 4, device=DEVICE), torch.randn(4, 16, device=DEVICE))
    with pytest.raises(BackendError, match="bool"):
        tg.build_sparse_input_matmul(pat.float(), 16, dtype=torch.float32, device=DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_gpu_attention_sizes(dtype, density):
    if DEVICE.type != "cuda":
        pytest.skip("needs a CUDA GPU")
    check_sddmm(1000, 1000, 64, density, dtype, 64, batch=(2, 4), transpose_b=True)
    check_spmm(1000, 1000, 64, density, dtype, 64, batch=(2, 4))
    check_sddmm(520, 520, 80, density, dtype, 32)
    check_spmm(520, 520, 80, density, dtype, 32)
