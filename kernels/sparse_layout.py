"""Packed unstructured layout for the CPU kernel of ``kernels/sparse_linear.cpp``.

A weight ``W`` of shape (N, K) with any mask: K is cut into ``NB`` blocks of ``KB`` inputs. The
kept weights of row r inside block b are stored contiguously, blocks outermost, inputs in
order::

    vals[rowptr[b*N + r] : rowptr[b*N + r + 1]]   float32  the kept values
    offs[...]                                     uint16   (k - b*KB) * TT / 2: offset of the
                                                           input in the block's slice of a
                                                           transposed x panel of TT tokens, in
                                                           8-byte units
    rowtot[r]                                     int32    kept weights of rows < r

so the kernel reads each kept weight as one value and one ready-made address offset: 6 bytes per
kept weight, no index arithmetic. See ``docs/sparse_cpu.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparta.errors import BackendError


@dataclass(frozen=True)
class SparsePacked:
    """A packed unstructured weight: see the module docstring for each array."""

    vals: torch.Tensor  # (nnz,) float32
    offs: torch.Tensor  # (nnz,) uint16
    rowptr: torch.Tensor  # (NB * N + 1,) int32
    rowtot: torch.Tensor  # (N + 1,) int32
    k_block: int  # KB
    blocks: int  # NB
    panel_tokens: int  # TT
    out_features: int  # N
    in_features: int  # K

    @property
    def nnz(self) -> int:
        return int(self.vals.numel())


def k_blocking(in_features: int, most: int) -> tuple[int, int]:
    """(KB, NB): at most ``most`` inputs a block (a multiple of 8), the blocks as even as
    possible, KB a multiple of 8."""
    most = max(8, most // 8 * 8)
    blocks = max(1, math.ceil(in_features / most))
    kb = math.ceil(math.ceil(in_features / blocks) / 8) * 8
    return kb, blocks


def check_mask(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise BackendError unless ``mask`` is a 2-D bool tensor of ``weight``'s shape."""
    if mask.dtype != torch.bool:
        raise BackendError(
            f"a sparse_cpu mask must be a bool tensor (True = kept), got {mask.dtype}; "
            f"pass `mask != 0` for a 0/1 mask."
        )
    if weight.dim() != 2 or weight.shape != mask.shape:
        raise BackendError(
            f"weight and mask must be 2-D of one shape (N, K), got {tuple(weight.shape)} and "
            f"{tuple(mask.shape)}."
        )


def pack_sparse(
    weight: torch.Tensor, mask: torch.Tensor, k_block: int, panel_tokens: int
) -> SparsePacked:
    """Convert ``weight * mask`` (N, K) to the packed layout with blocks of ``k_block`` inputs
    and offsets for panels of ``panel_tokens`` tokens. Explicit zeros of the weight are kept
    (the mask, not the values, says what is pruned)."""
    check_mask(weight, mask)
    rows, k = weight.shape
    if k_block * panel_tokens // 2 > 65536 or k_block % 8 or panel_tokens % 2:
        raise BackendError(
            f"k_block * panel_tokens / 2 must fit 16 bits, k_block be a multiple of 8 and "
            f"panel_tokens even, got {k_block} x {panel_tokens}."
        )
    blocks = max(1, math.ceil(k / k_block))
    pad = blocks * k_block - k
    w = F.pad(weight.detach().to("cpu", torch.float32), (0, pad))
    keep = F.pad(mask.detach().to("cpu"), (0, pad))
    # (NB, N, KB): nonzero() walks blocks, then rows, then inputs: the storage order
    keep_b = keep.reshape(rows, blocks, k_block).permute(1, 0, 2)
    w_b = w.reshape(rows, blocks, k_block).permute(1, 0, 2)
    nnz = int(keep_b.sum())
    if nnz >= 2**31:
        raise BackendError(f"{nnz} kept weights: the sparse_cpu tables hold fewer than 2**31.")
    vals = w_b[keep_b].contiguous()
    kl = keep_b.nonzero()[:, 2]
    offs = torch.from_numpy((kl * (panel_tokens // 2)).numpy().astype(np.uint16))
    counts = keep_b.sum(dim=2).reshape(-1)
    rowptr = torch.zeros(blocks * rows + 1, dtype=torch.int64)
    rowptr[1:] = counts.cumsum(0)
    rowtot = torch.zeros(rows + 1, dtype=torch.int64)
    rowtot[1:] = keep.sum(dim=1).cumsum(0)
    return SparsePacked(
        vals=vals,
        offs=offs,
        rowptr=rowptr.to(torch.int32),
        rowtot=rowtot.to(torch.int32),
        k_block=k_block,
        blocks=blocks,
        panel_tokens=panel_tokens,
        out_features=rows,
        in_features=k,
    )


def unpack_sparse(packed: SparsePacked) -> torch.Tensor:
    """The dense (N, K) weight a packed layout represents (zeros where pruned)."""
    n, kb, nb = packed.out_features, packed.k_block, packed.blocks
    counts = (packed.rowptr[1:] - packed.rowptr[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(nb * n), counts)  # b * N + r per kept weight
    b, r = seg // n, seg % n
    k = b * kb + torch.from_numpy(packed.offs.numpy().astype(np.int64)) // (
        packed.panel_tokens // 2
    )
    dense = torch.zeros(n, nb * kb, dtype=torch.float32)
    dense[r, k] = packed.vals
    return dense[:, : packed.in_features]
