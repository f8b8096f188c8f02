"""Block-sparse linear: Y = act(X @ (W * mask).T + b), W pruned in (BN x BK) slabs.

Two orientations are generated: ``{name}`` computes [BLOCK_M tokens, BN features] tiles,
``{name}_t`` computes [BN features, BLOCK_M tokens] tiles (tokens on the wide side of the
tensor-core instruction); the tuner measures both.

Layout built at compile time (``codegen/triton_pack.py``): the output features are
permuted and cut into tiles of ``BN`` rows; for each tile only the ``BK``-wide chunks of K
where some row of the tile keeps a weight are listed (``tile_ptr``/``kidx``, CSR-like), and
the weight of each listed (tile, chunk) is stored as one dense ``[BN, BK]`` slab (zeros where
pruned). A program computes a ``[BLOCK_M, BN]`` output tile with one ``tl.dot`` per listed
chunk, adds the bias, applies the activation and scatters the tile's columns back through the
permutation (``cols``; values >= N mark padding rows; aligned runs of ``unit`` columns
are contiguous, which keeps the stores vectorised). A tile with no chunk writes act(bias) only.
"""

from __future__ import annotations

import torch

from .epilogue import triton_source
from .reference import linear as linear_reference
from .triton_common import HEADER, TL_DTYPE

KERNEL_NAME = "sparta_bsmm_kernel"

_TEMPLATE = """
@triton.jit(do_not_specialize=["M"])
def {name}(x_ptr, w_ptr, tile_ptr, kidx_ptr, cols_ptr, bias_ptr, y_ptr,
           M, N, stride_xm, stride_ym, BLOCK_M: tl.constexpr):
    # specialised: BN={bn} BK={bk} K={k} dtype={tl_dtype} bias={has_bias} act={act} unit={unit}
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(tile_ptr + pid_n)
    end = tl.load(tile_ptr + pid_n + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, {bn})
    offs_k = tl.arange(0, {bk})
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_tile = w_ptr + offs_n[None, :] * {bk} + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, {bn}), dtype=tl.float32)
    for j in range(start, end):
        k = tl.load(kidx_ptr + j) * {bk} + offs_k
{x_load}
        b = tl.load(w_tile + j * {slab})
        acc = tl.dot(a, b, acc)
    cols = tl.load(cols_ptr + pid_n * {bn} + offs_n)
    cols = tl.max_contiguous(tl.multiple_of(cols, {unit}), {unit})
{epilogue}    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to({tl_dtype}), mask=m_ok[:, None] & (cols[None, :] < N))
"""

_TEMPLATE_T = """
@triton.jit(do_not_specialize=["M"])
def {name}_t(x_ptr, w_ptr, tile_ptr, kidx_ptr, cols_ptr, bias_ptr, y_ptr,
             M, N, stride_xm, stride_ym, BLOCK_M: tl.constexpr):
    # features as rows: acc[BN, BLOCK_M] = W_slab @ X^T, so tokens feed the wide MMA side
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(tile_ptr + pid_n)
    end = tl.load(tile_ptr + pid_n + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, {bn})
    offs_k = tl.arange(0, {bk})
    m_ok = offs_m < M
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    w_tile = w_ptr + offs_n[:, None] * {bk} + offs_k[None, :]
    acc = tl.zeros(({bn}, BLOCK_M), dtype=tl.float32)
    for j in range(start, end):
        k = tl.load(kidx_ptr + j) * {bk} + offs_k
        a = tl.load(w_tile + j * {slab})
{xt_load}
        acc = tl.dot(a, b, acc)
    cols = tl.load(cols_ptr + pid_n * {bn} + offs_n)
    cols = tl.max_contiguous(tl.multiple_of(cols, {unit}), {unit})
{epilogue_t}    y = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + cols[:, None]
    tl.store(y, acc.to({tl_dtype}), mask=m_ok[None, :] & (cols[:, None] < N))
"""

_X_EVEN = "        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)"
_X_EDGE = (
    "        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k[None, :] < {k}), other=0.0)"
)
_XT_EVEN = "        b = tl.load(x_cols + k[:, None], mask=m_ok[None, :], other=0.0)"
_XT_EDGE = (
    "        b = tl.load(x_cols + k[:, None], mask=m_ok[None, :] & (k[:, None] < {k}), other=0.0)"
)
_BIAS = "    acc += tl.load(bias_ptr + pid_n * {bn} + offs_n).to(tl.float32)[None, :]\n"
_BIAS_T = "    acc += tl.load(bias_ptr + pid_n * {bn} + offs_n).to(tl.float32)[:, None]\n"


def render(
    *,
    bn: int,
    bk: int,
    k: int,
    dtype: torch.dtype,
    has_bias: bool,
    activation: str | None,
    unit: int = 1,
) -> str:
    """Triton source of the kernel specialised to one tile shape, K, dtype and epilogue."""
    act = triton_source(activation, 4)
    even = k % bk == 0
    fields = dict(
        name=KERNEL_NAME,
        bn=bn,
        bk=bk,
        k=k,
        slab=bn * bk,
        tl_dtype=TL_DTYPE[dtype],
        has_bias=has_bias,
        act=activation,
        unit=unit,
        x_load=(_X_EVEN if even else _X_EDGE).format(k=k),
        xt_load=(_XT_EVEN if even else _XT_EDGE).format(k=k),
        epilogue=(_BIAS.format(bn=bn) if has_bias else "") + act,
        epilogue_t=(_BIAS_T.format(bn=bn) if has_bias else "") + act,
    )
    return HEADER + _TEMPLATE.format(**fields) + "\n" + _TEMPLATE_T.format(**fields)


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Dense fp32 reference: act(x @ (weight * mask).T + bias)."""
    return linear_reference(x, weight, mask, bias, activation, compute=torch.float32)
