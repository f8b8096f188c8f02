"""Block-sparse SwiGLU: Y = silu(X @ (Wg*Mg).T + bg) * (X @ (Wu*Mu).T + bu) in one kernel.

The gate and up projections of a gated MLP (Llama's ``act(gate_proj(x)) * up_proj(x)``) share
one output tiling: both weights are packed as in ``triton_bsmm`` (slabs of ``[BN, BK]``, a chunk
list per tile) under one row permutation (``cols``), so a program accumulates both products for
the same ``BN`` output features and writes only their SwiGLU product: the two full-size
intermediates are never written to memory nor read back. Two orientations as in ``triton_bsmm``.
"""

from __future__ import annotations

import torch

from .triton_bsmm import _X_EDGE, _X_EVEN, _XT_EDGE, _XT_EVEN
from .triton_common import HEADER, TL_DTYPE

KERNEL_NAME = "sparta_swiglu_kernel"

_TEMPLATE = """
@triton.jit(do_not_specialize=["M"])
def {name}(x_ptr, wg_ptr, gptr_ptr, gidx_ptr, wu_ptr, uptr_ptr, uidx_ptr, cols_ptr, bg_ptr,
           bu_ptr, y_ptr, M, N, stride_xm, stride_ym, BLOCK_M: tl.constexpr):
    # specialised: BN={bn} BK={bk} K={k} dtype={tl_dtype} bias={bias} unit={unit}
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, {bn})
    offs_k = tl.arange(0, {bk})
    m_ok = offs_m < M
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_off = offs_n[None, :] * {bk} + offs_k[:, None]
    acc_g = tl.zeros((BLOCK_M, {bn}), dtype=tl.float32)
    for j in range(tl.load(gptr_ptr + pid_n), tl.load(gptr_ptr + pid_n + 1)):
        k = tl.load(gidx_ptr + j) * {bk} + offs_k
{x_load}
        b = tl.load(wg_ptr + w_off + j * {slab})
        acc_g = tl.dot(a, b, acc_g)
    acc_u = tl.zeros((BLOCK_M, {bn}), dtype=tl.float32)
    for j in range(tl.load(uptr_ptr + pid_n), tl.load(uptr_ptr + pid_n + 1)):
        k = tl.load(uidx_ptr + j) * {bk} + offs_k
{x_load}
        b = tl.load(wu_ptr + w_off + j * {slab})
        acc_u = tl.dot(a, b, acc_u)
    cols = tl.load(cols_ptr + pid_n * {bn} + offs_n)
    cols = tl.max_contiguous(tl.multiple_of(cols, {unit}), {unit})
{bias_src}    acc = acc_g / (1.0 + tl.exp(tl.minimum(-acc_g, 80.0))) * acc_u
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(y, acc.to({tl_dtype}), mask=m_ok[:, None] & (cols[None, :] < N))
"""

_TEMPLATE_T = """
@triton.jit(do_not_specialize=["M"])
def {name}_t(x_ptr, wg_ptr, gptr_ptr, gidx_ptr, wu_ptr, uptr_ptr, uidx_ptr, cols_ptr, bg_ptr,
             bu_ptr, y_ptr, M, N, stride_xm, stride_ym, BLOCK_M: tl.constexpr):
    # features as rows: acc[BN, BLOCK_M] = W_slab @ X^T, tokens on the wide MMA side
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, {bn})
    offs_k = tl.arange(0, {bk})
    m_ok = offs_m < M
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    w_off = offs_n[:, None] * {bk} + offs_k[None, :]
    acc_g = tl.zeros(({bn}, BLOCK_M), dtype=tl.float32)
    for j in range(tl.load(gptr_ptr + pid_n), tl.load(gptr_ptr + pid_n + 1)):
        k = tl.load(gidx_ptr + j) * {bk} + offs_k
        a = tl.load(wg_ptr + w_off + j * {slab})
{xt_load}
        acc_g = tl.dot(a, b, acc_g)
    acc_u = tl.zeros(({bn}, BLOCK_M), dtype=tl.float32)
    for j in range(tl.load(uptr_ptr + pid_n), tl.load(uptr_ptr + pid_n + 1)):
        k = tl.load(uidx_ptr + j) * {bk} + offs_k
        a = tl.load(wu_ptr + w_off + j * {slab})
{xt_load}
        acc_u = tl.dot(a, b, acc_u)
    cols = tl.load(cols_ptr + pid_n * {bn} + offs_n)
    cols = tl.max_contiguous(tl.multiple_of(cols, {unit}), {unit})
{bias_src_t}    acc = acc_g / (1.0 + tl.exp(tl.minimum(-acc_g, 80.0))) * acc_u
    y = y_ptr + offs_m.to(tl.int64)[None, :] * stride_ym + cols[:, None]
    tl.store(y, acc.to({tl_dtype}), mask=m_ok[None, :] & (cols[:, None] < N))
"""


def _bias(which: str, bn: int, axis: str) -> str:
    return (
        f"    acc_{which} += tl.load(b{which}_ptr + pid_n * {bn} + offs_n).to(tl.float32){axis}\n"
    )


def render(*, bn: int, bk: int, k: int, dtype: torch.dtype, bias: tuple[bool, bool],
           unit: int = 1) -> str:  # fmt: skip
    """Triton source specialised to one tile shape, K, dtype and (gate, up) bias presence."""
    even = k % bk == 0
    bias_src = "".join(_bias(w, bn, "[None, :]") for w, on in zip("gu", bias) if on)
    bias_src_t = "".join(_bias(w, bn, "[:, None]") for w, on in zip("gu", bias) if on)
    fields = dict(
        name=KERNEL_NAME, bn=bn, bk=bk, k=k, slab=bn * bk, tl_dtype=TL_DTYPE[dtype], bias=bias,
        unit=unit, x_load=(_X_EVEN if even else _X_EDGE).format(k=k),
        xt_load=(_XT_EVEN if even else _XT_EDGE).format(k=k), bias_src=bias_src,
        bias_src_t=bias_src_t,
    )  # fmt: skip
    return HEADER + _TEMPLATE.format(**fields) + "\n" + _TEMPLATE_T.format(**fields)


def reference(
    x: torch.Tensor,
    wg: torch.Tensor,
    mg: torch.Tensor,
    bg: torch.Tensor | None,
    wu: torch.Tensor,
    mu: torch.Tensor,
    bu: torch.Tensor | None,
) -> torch.Tensor:
    """Dense fp32 reference: silu(x @ (wg*mg).T + bg) * (x @ (wu*mu).T + bu)."""
    f = torch.float32
    g = torch.nn.functional.linear(x.to(f), (wg * mg).to(f), None if bg is None else bg.to(f))
    u = torch.nn.functional.linear(x.to(f), (wu * mu).to(f), None if bu is None else bu.to(f))
    return torch.nn.functional.silu(g) * u
