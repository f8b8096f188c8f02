"""Output-sparse (SDDMM) and sparse-input matmuls specialised to a fixed block pattern.

Typical use: attention scores ``q @ k^T`` computed only inside a fixed block pattern
(SDDMM), then probabilities ``p @ v`` reading only the pattern's blocks of ``p``.
Operands are taken through their strides (a transposed view costs no copy); batch dims
broadcast like torch.matmul.
"""

from __future__ import annotations

import torch

from sparta.errors import BackendError
from sparta.kernels import triton_sddmm, triton_spmm
from sparta.tesa import block_any

from . import triton_ops
from .cache import cache_key
from .op_call import OpCall
from .triton_load import device_name, inspect_source, kernel_id
from .triton_pack import block_tile, kept_tiles, mask_digest

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so that it compares equal to tensors' devices."""
    return torch.empty(0, device=device).device


def _check_batch(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.dim() < 2 or b.dim() < 2:
        raise BackendError(f"{what}: operands need at least 2 dims, got {a.shape} and {b.shape}.")
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as e:
        raise BackendError(f"{what}: batch dims {a.shape} and {b.shape} do not broadcast.") from e


def _check_operands(a, b, dtype, device, what: str) -> None:
    if a.dtype != dtype or b.dtype != dtype:
        raise BackendError(f"{what}: expects {dtype} operands, got {a.dtype} and {b.dtype}.")
    if a.device != device or b.device != device:
        raise BackendError(f"{what}: expects operands on {device}, got {a.device}/{b.device}.")
    if a.requires_grad and torch.is_grad_enabled():
        raise BackendError(f"{what} is inference-only; call it under torch.no_grad().")


class SDDMM(torch.nn.Module):
    """(..., M, K) @ (..., K, N) computed only in the pattern's kept blocks; zeros elsewhere."""

    def __init__(self, pattern: torch.Tensor, block: int, dtype, device, *, node: str) -> None:
        super().__init__()
        self.m, self.n = pattern.shape
        self.pattern = pattern.to("cpu")  # what it is built from (saved plans rebuild it)
        device = resolve_device(device)
        self.block, self.tile, self.dtype, self.device = block, block_tile(block), dtype, device
        kb = block_any(pattern.to("cpu"), block, block)
        kept_el = kb.repeat_interleave(block, 0).repeat_interleave(block, 1)[: self.m, : self.n]
        tiles = kept_tiles(kept_el, self.tile)
        order = torch.argsort(tiles.flatten().to(torch.int8), descending=True, stable=True)
        nt_cols = tiles.shape[1]
        self.n_kept = int(tiles.sum())
        self.n_tiles = tiles.numel()
        self.kept_fraction = float(kept_el.float().mean()) if kept_el.numel() else 1.0
        self.register_buffer("ti", (order // nt_cols).to(torch.int32).to(device), persistent=False)
        self.register_buffer("tj", (order % nt_cols).to(torch.int32).to(device), persistent=False)
        self.register_buffer("kb", kb.flatten().to(torch.int8).to(device), persistent=False)
        self.bk = 64 if self.tile <= 64 else 32
        self.source = triton_sddmm.render(
            tile=self.tile, block=block, n_block_cols=kb.shape[1], dtype=dtype
        )
        self.key = cache_key("triton-sddmm", mask_digest(pattern), block, dtype,
                             device_name(torch.device(device)))  # fmt: skip
        self.kernel = kernel_id(self.source, triton_sddmm.KERNEL_NAME, dtype)
        desc = f"sddmm block={block} tile={self.tile} kept_tiles={self.n_kept}/{self.n_tiles}"
        inspect_source(self.source, node=node, pattern=desc, key=self.key)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        what = "SDDMM"
        _check_operands(a, b, self.dtype, self.device, what)
        if a.shape[-2] != self.m or b.shape[-1] != self.n or a.shape[-1] != b.shape[-2]:
            raise BackendError(f"{what}: pattern is ({self.m}, {self.n}); got operands "
                               f"{tuple(a.shape)} @ {tuple(b.shape)}.")  # fmt: skip
        _check_batch(a, b, what)
        return self.op_call()(a, b)

    def op_call(self) -> OpCall:
        tables = (("ti", self.ti), ("tj", self.tj), ("kb", self.kb))
        static = (("kernel", self.kernel), ("n_kept", self.n_kept), ("bk", self.bk))
        return OpCall(triton_ops.SDDMM, tables, static)


class SparseInputMatmul(torch.nn.Module):
    """(..., M, K) @ (..., K, N) with the left operand zero outside a (M, K) pattern."""

    def __init__(self, pattern: torch.Tensor, block: int, dtype, device, *, node: str) -> None:
        super().__init__()
        self.m, self.k = pattern.shape
        self.pattern = pattern.to("cpu")  # what it is built from (saved plans rebuild it)
        device = resolve_device(device)
        self.block, self.tile, self.dtype, self.device = block, block_tile(block), dtype, device
        tiles = kept_tiles(pattern, self.tile)
        counts = tiles.sum(dim=1)
        ptr = torch.zeros(tiles.shape[0] + 1, dtype=torch.int32)
        ptr[1:] = torch.cumsum(counts, 0)
        kidx = torch.cat([tiles.nonzero()[:, 1], torch.zeros(1, dtype=torch.int64)])
        self.n_row_tiles = tiles.shape[0]
        self.kept_fraction = float(tiles.float().mean()) if tiles.numel() else 1.0
        self.register_buffer("tile_ptr", ptr.to(device), persistent=False)
        self.register_buffer("kidx", kidx.to(torch.int32).to(device), persistent=False)
        self.source = triton_spmm.render(tile=self.tile, dtype=dtype)
        self.key = cache_key("triton-spmm", mask_digest(pattern), block, dtype,
                             device_name(torch.device(device)))  # fmt: skip
        self.kernel = kernel_id(self.source, triton_spmm.KERNEL_NAME, dtype)
        desc = f"sparse-input block={block} tile={self.tile} kept_tiles={int(counts.sum())}"
        inspect_source(self.source, node=node, pattern=desc, key=self.key)

    def forward(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        what = "sparse-input matmul"
        _check_operands(p, v, self.dtype, self.device, what)
        if p.shape[-2] != self.m or p.shape[-1] != self.k or v.shape[-2] != self.k:
            raise BackendError(f"{what}: pattern is ({self.m}, {self.k}); got operands "
                               f"{tuple(p.shape)} @ {tuple(v.shape)}.")  # fmt: skip
        _check_batch(p, v, what)
        if p.numel() == 0 or v.numel() == 0:
            batch = torch.broadcast_shapes(p.shape[:-2], v.shape[:-2])
            return p.new_zeros((*batch, self.m, v.shape[-1]))
        return self.op_call()(p, v)

    def op_call(self) -> OpCall:
        tables = (("tile_ptr", self.tile_ptr), ("kidx", self.kidx))
        static = (("kernel", self.kernel), ("tile", self.tile))
        return OpCall(triton_ops.SPARSE_INPUT_MATMUL, tables, static)
