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

from .cache import cache_key
from .triton_launch import Launcher
from .triton_load import device_name, inspect_source, load_kernel
from .triton_pack import block_tile, kept_tiles, mask_digest

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_device(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` so that it compares equal to tensors' devices."""
    return torch.empty(0, device=device).device


def _batched(
    a: torch.Tensor, b: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Broadcast the batch dims of a and b and flatten them to one (views where possible)."""
    if a.dim() < 2 or b.dim() < 2:
        raise BackendError(f"{what}: operands need at least 2 dims, got {a.shape} and {b.shape}.")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError as e:
        raise BackendError(f"{what}: batch dims {a.shape} and {b.shape} do not broadcast.") from e
    a3 = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b3 = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return a3, b3, tuple(batch)


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
        kernel = load_kernel(self.source, triton_sddmm.KERNEL_NAME, dtype)
        self._launcher = Launcher(kernel, n_constexpr=1, out_index=2)
        desc = f"sddmm block={block} tile={self.tile} kept_tiles={self.n_kept}/{self.n_tiles}"
        inspect_source(self.source, node=node, pattern=desc, key=self.key)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        what = "SDDMM"
        _check_operands(a, b, self.dtype, self.device, what)
        if a.shape[-2] != self.m or b.shape[-1] != self.n or a.shape[-1] != b.shape[-2]:
            raise BackendError(f"{what}: pattern is ({self.m}, {self.n}); got operands "
                               f"{tuple(a.shape)} @ {tuple(b.shape)}.")  # fmt: skip
        a3, b3, batch = _batched(a, b, what)
        nb, k = a3.shape[0], a3.shape[-1]
        c = torch.empty((nb, self.m, self.n), dtype=self.dtype, device=a.device)
        if nb and self.n_tiles:
            args = (a3, b3, c, self.ti, self.tj, self.kb, self.n_kept, self.m, self.n, k,
                    a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1),
                    b3.stride(2), c.stride(0), c.stride(1), self.bk)  # fmt: skip
            self._launcher.launch((self.n_tiles, nb, 1), args, 4, 3)
        return c.view(*batch, self.m, self.n)


class SparseInputMatmul(torch.nn.Module):
    """(..., M, K) @ (..., K, N) with the left operand zero outside a (M, K) pattern."""

    def __init__(self, pattern: torch.Tensor, block: int, dtype, device, *, node: str) -> None:
        super().__init__()
        self.m, self.k = pattern.shape
        device = resolve_device(device)
        self.tile, self.dtype, self.device = block_tile(block), dtype, device
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
        kernel = load_kernel(self.source, triton_spmm.KERNEL_NAME, dtype)
        self._launcher = Launcher(kernel, n_constexpr=1, out_index=2)
        desc = f"sparse-input block={block} tile={self.tile} kept_tiles={int(counts.sum())}"
        inspect_source(self.source, node=node, pattern=desc, key=self.key)

    def forward(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        what = "sparse-input matmul"
        _check_operands(p, v, self.dtype, self.device, what)
        if p.shape[-2] != self.m or p.shape[-1] != self.k or v.shape[-2] != self.k:
            raise BackendError(f"{what}: pattern is ({self.m}, {self.k}); got operands "
                               f"{tuple(p.shape)} @ {tuple(v.shape)}.")  # fmt: skip
        p3, v3, batch = _batched(p, v, what)
        nb, n = p3.shape[0], v3.shape[-1]
        c = torch.empty((nb, self.m, n), dtype=self.dtype, device=p.device)
        bn = min(128, max(16, 1 << max(0, n - 1).bit_length()))
        if nb and n and self.m:
            grid = (self.n_row_tiles, -(-n // bn), nb)
            args = (p3, v3, c, self.tile_ptr, self.kidx, self.m, n, self.k,
                    p3.stride(0), p3.stride(1), p3.stride(2), v3.stride(0), v3.stride(1),
                    v3.stride(2), c.stride(0), c.stride(1), bn)  # fmt: skip
            self._launcher.launch(grid, args, 4, 3)
        return c.view(*batch, self.m, n)
