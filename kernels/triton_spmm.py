"""Sparse-input matmul: C = P @ V where P is zero outside a block pattern (e.g. attention
probabilities under a fixed pattern), reading only the kept blocks of P.

Rows of P are cut into tiles of ``T`` rows (T a power of two, at least 16); for each row tile
the ``T``-wide column chunks of P that hold a kept element are listed at compile time
(``tile_ptr``/``kidx``). A program computes a ``[T, BN]`` tile of C with one ``tl.dot`` per
listed chunk; a row tile with no chunk writes zeros.
"""

from __future__ import annotations

import torch

from .triton_common import HEADER, TL_DTYPE

KERNEL_NAME = "sparta_spmm_kernel"

_TEMPLATE = """
@triton.jit
def {name}(p_ptr, v_ptr, c_ptr, tile_ptr, kidx_ptr, M, N, K,
           s_pb, s_pm, s_pk, s_vb, s_vk, s_vn, s_cb, s_cm, BN: tl.constexpr):
    # specialised: tile={t} dtype={tl_dtype}
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bz = tl.program_id(2).to(tl.int64)
    rows = pid_m * {t} + tl.arange(0, {t})
    cols = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, {t})
    r_ok = rows < M
    c_ok = cols < N
    start = tl.load(tile_ptr + pid_m)
    end = tl.load(tile_ptr + pid_m + 1)
    p_base = p_ptr + bz * s_pb + rows[:, None] * s_pm
    v_base = v_ptr + bz * s_vb + cols[None, :] * s_vn
    acc = tl.zeros(({t}, BN), dtype=tl.float32)
    for j in range(start, end):
        k = tl.load(kidx_ptr + j) * {t} + offs_k
        p = tl.load(p_base + k[None, :] * s_pk, mask=r_ok[:, None] & (k[None, :] < K), other=0.0)
        v = tl.load(v_base + k[:, None] * s_vk, mask=(k[:, None] < K) & c_ok[None, :], other=0.0)
        acc = tl.dot(p, v, acc)
    c = c_ptr + bz * s_cb + rows[:, None] * s_cm + cols[None, :]
    tl.store(c, acc.to({tl_dtype}), mask=r_ok[:, None] & c_ok[None, :])
"""


def render(*, tile: int, dtype: torch.dtype) -> str:
    """Triton source for one pattern's tile size and dtype."""
    return HEADER + _TEMPLATE.format(name=KERNEL_NAME, t=tile, tl_dtype=TL_DTYPE[dtype])


def reference(p: torch.Tensor, v: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Dense fp32 reference: (p * pattern) @ v (p is zero outside the pattern by contract)."""
    return (p.float() * pattern) @ v.float()
