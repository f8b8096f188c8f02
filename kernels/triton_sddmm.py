"""Output-sparse matmul (SDDMM): C = A @ B computed only inside the kept blocks of a pattern.

The output keeps its dense layout. Tiles of ``T x T`` output elements (T a power of two, at
least 16) are listed at compile time, kept tiles first: a program whose id is below the
number of kept tiles runs the K loop, every other program writes zeros, so each output
element is written exactly once. When the pattern's block ``b`` is smaller than ``T`` the
kept tile also holds pruned ``b``-blocks; a per-block table (``kb_ptr``) then zeroes them.
"""

from __future__ import annotations

import torch

from .triton_common import HEADER, TL_DTYPE

KERNEL_NAME = "sparta_sddmm_kernel"

_TEMPLATE = """
@triton.jit
def {name}(a_ptr, b_ptr, c_ptr, ti_ptr, tj_ptr, kb_ptr, n_kept, M, N, K,
           s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, BK: tl.constexpr):
    # specialised: tile={t} block={blk} dtype={tl_dtype} partial_blocks={partial}
    pid = tl.program_id(0)
    bz = tl.program_id(1).to(tl.int64)
    rows = tl.load(ti_ptr + pid) * {t} + tl.arange(0, {t})
    cols = tl.load(tj_ptr + pid) * {t} + tl.arange(0, {t})
    r_ok = rows < M
    c_ok = cols < N
    acc = tl.zeros(({t}, {t}), dtype=tl.float32)
    if pid < n_kept:
        offs_k = tl.arange(0, BK)
        a_base = a_ptr + bz * s_ab + rows[:, None] * s_am
        b_base = b_ptr + bz * s_bb + cols[None, :] * s_bn
        for k0 in range(0, K, BK):
            k = k0 + offs_k
            k_ok = k < K
            a = tl.load(a_base + k[None, :] * s_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_base + k[:, None] * s_bk, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
{partial_src}    c = c_ptr + bz * s_cb + rows[:, None] * s_cm + cols[None, :]
    tl.store(c, acc.to({tl_dtype}), mask=r_ok[:, None] & c_ok[None, :])
"""

_PARTIAL = (
    "        keep = tl.load(kb_ptr + (rows // {blk})[:, None] * {nbc} + (cols // {blk})[None, :],\n"
    "                       mask=r_ok[:, None] & c_ok[None, :], other=0)\n"
    "        acc = tl.where(keep != 0, acc, 0.0)\n"
)


def render(*, tile: int, block: int, n_block_cols: int, dtype: torch.dtype) -> str:
    """Triton source for one pattern's tile size, block size and dtype."""
    partial = tile != block
    return HEADER + _TEMPLATE.format(
        name=KERNEL_NAME,
        t=tile,
        blk=block,
        tl_dtype=TL_DTYPE[dtype],
        partial=partial,
        partial_src=_PARTIAL.format(blk=block, nbc=n_block_cols) if partial else "",
    )


def reference(a: torch.Tensor, b: torch.Tensor, kept_elements: torch.Tensor) -> torch.Tensor:
    """Dense fp32 reference: (a @ b) with the elements of pruned blocks set to zero."""
    return (a.float() @ b.float()) * kept_elements
