"""The generated Triton kernels as ``torch.library`` ops (calling convention: ``op_call.py``).

On a GPU each op is a ``torch.library.triton_op``: eager calls launch the kernel directly;
under ``torch.compile`` the op is decomposed into its ``wrap_triton`` launch, so Inductor
sees the user-defined kernel, launches it from its own wrapper code (or a CUDA graph) and fuses
the dense ops around it. The op body is its own fake implementation (shapes only, no launch).
In Triton's CPU interpreter (CI) ``wrap_triton`` cannot trace interpreted kernels, so the same
bodies are registered as opaque ``custom_op``s with a shape-only fake implementation instead:
Dynamo and Inductor still see one node with no graph break.

Which kernel runs is the ``kernel`` string (``triton_load.kernel_id``); tile and launch sizes
are ints. Nothing here checks inputs: the modules in ``triton_gen``/``triton_attn`` do that
once, at build time and in eager calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .triton_load import interpreting, kernel_by_id

Tensor = torch.Tensor


def _launch(kernel: str, grid: tuple, args: tuple, warps: int, stages: int) -> None:
    """Launch; every kernel's last argument is its ``tl.constexpr`` tile size. Launch settings and
    that size are plain ints: under ``torch.compile(dynamic=True)`` they may arrive as SymInts,
    which Inductor cannot put in a launch config (they are constants: specialised here)."""
    fn = kernel_by_id(kernel)
    if not interpreting():
        fn = torch.library.wrap_triton(fn)
    args = (*args[:-1], int(args[-1]))
    fn[grid](*args, num_warps=int(warps), num_stages=int(stages))


def _define(name: str, body: Callable, fake: Callable) -> Callable:
    if interpreting():
        op = torch.library.custom_op(name, body, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, body, mutates_args=())


def _cdiv(a, b: int):
    return (a + b - 1) // b


# ------------------------------------------------------------------ block-sparse linear


def _linear_out(x: Tensor, out_features: int) -> tuple[Tensor, Tensor]:
    """x as rows (unit stride, 16-byte aligned: a kernel compiled by Inductor for aligned
    inputs faults on a misaligned view) and the output to fill."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1 or (x2.storage_offset() * x2.element_size()) % 16 != 0:
        x2 = torch.empty_like(x2, memory_format=torch.contiguous_format).copy_(x2)  # a new buffer
        # (not clone: Inductor drops a clone as a no-op and would pass the view on)
    return x2, x.new_empty((x2.shape[0], out_features))


def _block_sparse_linear(
    x: Tensor,
    slabs: Tensor,
    tile_ptr: Tensor,
    kidx: Tensor,
    cols: Tensor,
    bias: Tensor | None,
    kernel: str,
    out_features: int,
    block_m: int,
    warps: int,
    stages: int,
) -> Tensor:
    """act(x @ (W * mask).T + b) for x (..., K); W packed as ``triton_pack.pack_linear``."""
    x2, y = _linear_out(x, out_features)
    m = x2.shape[0]
    grid = (tile_ptr.shape[0] - 1, _cdiv(m, block_m), 1)
    b = bias if bias is not None else slabs  # never read when the source has no bias
    args = (x2, slabs, tile_ptr, kidx, cols, b, y, m, out_features, x2.stride(0), out_features,
            block_m)  # fmt: skip
    _launch(kernel, grid, args, warps, stages)
    return y.view(*x.shape[:-1], out_features)


def _block_sparse_linear_fake(x, slabs, tile_ptr, kidx, cols, bias, kernel, out_features,
                              block_m, warps, stages):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


_define("sparta::block_sparse_linear", _block_sparse_linear, _block_sparse_linear_fake)
BLOCK_SPARSE_LINEAR = torch.ops.sparta.block_sparse_linear.default


def _block_sparse_swiglu(
    x: Tensor,
    slabs_g: Tensor,
    tile_ptr_g: Tensor,
    kidx_g: Tensor,
    slabs_u: Tensor,
    tile_ptr_u: Tensor,
    kidx_u: Tensor,
    cols: Tensor,
    bias_g: Tensor | None,
    bias_u: Tensor | None,
    kernel: str,
    out_features: int,
    block_m: int,
    warps: int,
    stages: int,
) -> Tensor:
    """silu(x @ Wg.T + bg) * (x @ Wu.T + bu), both packed under one tiling (``triton_swiglu``)."""
    x2, y = _linear_out(x, out_features)
    m = x2.shape[0]
    grid = (tile_ptr_g.shape[0] - 1, _cdiv(m, block_m), 1)
    bg = bias_g if bias_g is not None else slabs_g  # never read when the source has no bias
    bu = bias_u if bias_u is not None else slabs_u
    args = (x2, slabs_g, tile_ptr_g, kidx_g, slabs_u, tile_ptr_u, kidx_u, cols, bg, bu, y, m,
            out_features, x2.stride(0), out_features, block_m)  # fmt: skip
    _launch(kernel, grid, args, warps, stages)
    return y.view(*x.shape[:-1], out_features)


def _block_sparse_swiglu_fake(
    x, slabs_g, tile_ptr_g, kidx_g, slabs_u, tile_ptr_u, kidx_u, cols, bias_g, bias_u, kernel,
    out_features, block_m, warps, stages
):  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


_define("sparta::block_sparse_swiglu", _block_sparse_swiglu, _block_sparse_swiglu_fake)
BLOCK_SPARSE_SWIGLU = torch.ops.sparta.block_sparse_swiglu.default


# ------------------------------------------------------------------ SDDMM / sparse-input


def _batched(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, tuple]:
    """Broadcast the batch dims of a and b and flatten them to one (views where possible)."""
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return a3, b3, tuple(batch)


def _sddmm(
    a: Tensor, b: Tensor, ti: Tensor, tj: Tensor, kb: Tensor, kernel: str, n_kept: int, bk: int
) -> Tensor:
    """(..., M, K) @ (..., K, N) computed only in the kept tiles listed in ``ti``/``tj``."""
    a3, b3, batch = _batched(a, b)
    nb, m, k = a3.shape
    n = b3.shape[-1]
    c = a.new_empty((nb, m, n))
    args = (a3, b3, c, ti, tj, kb, n_kept, m, n, k, a3.stride(0), a3.stride(1), a3.stride(2),
            b3.stride(0), b3.stride(1), b3.stride(2), c.stride(0), c.stride(1), bk)  # fmt: skip
    _launch(kernel, (ti.shape[0], nb, 1), args, 4, 3)
    return c.view(*batch, m, n)


def _sddmm_fake(a, b, ti, tj, kb, kernel, n_kept, bk):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


_define("sparta::sddmm", _sddmm, _sddmm_fake)
SDDMM = torch.ops.sparta.sddmm.default


def _sparse_input_matmul(
    p: Tensor, v: Tensor, tile_ptr: Tensor, kidx: Tensor, kernel: str, tile: int
) -> Tensor:
    """(..., M, K) @ (..., K, N) reading only the listed ``tile``-wide chunks of ``p``."""
    p3, v3, batch = _batched(p, v)
    nb, m, k = p3.shape
    n = v3.shape[-1]
    c = p.new_empty((nb, m, n))
    bn = min(128, max(16, 1 << max(0, int(n) - 1).bit_length()))  # n: the (static) head dim
    grid = (tile_ptr.shape[0] - 1, _cdiv(n, bn), nb)
    args = (p3, v3, c, tile_ptr, kidx, m, n, k, p3.stride(0), p3.stride(1), p3.stride(2),
            v3.stride(0), v3.stride(1), v3.stride(2), c.stride(0), c.stride(1), bn)  # fmt: skip
    _launch(kernel, grid, args, 4, 3)
    return c.view(*batch, m, n)


def _sparse_input_matmul_fake(p, v, tile_ptr, kidx, kernel, tile):
    batch = torch.broadcast_shapes(p.shape[:-2], v.shape[:-2])
    return p.new_empty((*batch, p.shape[-2], v.shape[-1]))


_define("sparta::sparse_input_matmul", _sparse_input_matmul, _sparse_input_matmul_fake)
SPARSE_INPUT_MATMUL = torch.ops.sparta.sparse_input_matmul.default
