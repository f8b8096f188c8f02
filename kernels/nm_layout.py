"""Packed n:m layout for the CPU kernels of ``kernels/nm_linear.cpp``, and its dense reference.

A weight ``W`` of shape (N, K) (``nn.Linear``: N outputs, K inputs) with an n:m mask along K:
K is cut into ``C = ceil(K / m)`` chunks of m consecutive inputs (the last one padded), and in
each chunk each output row keeps at most n inputs. The packed form stores, for each tile of
``R`` output rows, each chunk and each pick ``j < n``, the R values densely::

    vals[rt, c, j, r]  float32   weight of row rt*R + r at input c*m + idx[rt, c, j, r]
    idx[rt, c, j, r]   uint8     position of that pick inside its chunk (0 <= idx < m)

A row that keeps fewer than n inputs in a chunk gets zero-valued picks at unused positions, so
any n:m mask converts (grouped or not); rows past N are zero. The conversion runs once, when a
kernel is built. See ``docs/nm_cpu.md`` for why rows are tiled this way and tokens vectorised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparta.errors import BackendError
from sparta.tesa import group_counts

from . import reference


@dataclass(frozen=True)
class NMPacked:
    """A packed n:m weight: see the module docstring for the meaning of each array."""

    vals: torch.Tensor  # (NT, C, n, R) float32
    idx: torch.Tensor  # (NT, C, n, R) uint8
    n: int
    m: int
    out_features: int  # N
    in_features: int  # K

    @property
    def chunks(self) -> int:
        return self.vals.shape[1]

    @property
    def rows_per_tile(self) -> int:
        return self.vals.shape[3]


def check_nm(mask: torch.Tensor, n: int, m: int) -> None:
    """Raise BackendError unless ``mask`` (N, K) keeps at most n of every m along K."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise BackendError(
            f"an n:m mask must be a 2-D bool tensor (N, K), got {mask.dtype} of shape "
            f"{tuple(mask.shape)}; pass `mask != 0` for a 0/1 mask."
        )
    if not (1 <= n < m <= 255):
        raise BackendError(f"n:m needs 1 <= n < m <= 255, got {n}:{m}.")
    k = mask.shape[1]
    counts = group_counts(mask, m)  # (N, chunks)
    if counts.numel() and int(counts.max()) > n:
        r, c = divmod(int(counts.argmax()), counts.shape[1])
        raise BackendError(
            f"the mask is not {n}:{m} along its last dim: row {r} keeps {int(counts.max())} of "
            f"inputs {c * m}..{min(c * m + m, k) - 1}, at most {n} allowed. Prune it with an n:m "
            f"sparsifier (keep the n largest of every m) or build with a larger n."
        )


def pack_nm(
    weight: torch.Tensor, mask: torch.Tensor, n: int, m: int, rows_per_tile: int
) -> NMPacked:
    """Convert ``weight * mask`` (N, K) to the packed layout; any n:m mask is accepted."""
    if weight.shape != mask.shape:
        raise BackendError(
            f"weight and mask must have the same shape, got {tuple(weight.shape)} and "
            f"{tuple(mask.shape)}."
        )
    check_nm(mask, n, m)
    rows, k = weight.shape
    chunks = math.ceil(k / m)
    tiles = math.ceil(rows / rows_per_tile)
    pad_rows, pad_k = tiles * rows_per_tile - rows, chunks * m - k
    w = F.pad(weight.detach().to("cpu", torch.float32), (0, pad_k, 0, pad_rows))
    keep = F.pad(mask.detach().to("cpu"), (0, pad_k, 0, pad_rows)).reshape(-1, chunks, m)
    w = w.reshape(-1, chunks, m)
    # Kept positions first (in input order), then the unused ones: the first n are the picks.
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :n]
    vals = torch.gather(w, -1, order) * torch.gather(keep, -1, order)
    shape = (tiles, rows_per_tile, chunks, n)
    vals = vals.reshape(shape).permute(0, 2, 3, 1).contiguous()
    idx = order.to(torch.uint8).reshape(shape).permute(0, 2, 3, 1).contiguous()
    return NMPacked(vals=vals, idx=idx, n=n, m=m, out_features=rows, in_features=k)


def unpack_nm(packed: NMPacked) -> torch.Tensor:
    """The dense (N, K) weight a packed layout represents (zeros where pruned)."""
    tiles, chunks, n, r = packed.vals.shape
    m = packed.m
    vals = packed.vals.permute(0, 3, 1, 2).reshape(tiles * r, chunks, n)
    idx = packed.idx.permute(0, 3, 1, 2).reshape(tiles * r, chunks, n).long()
    dense = torch.zeros(tiles * r, chunks, m, dtype=torch.float32)
    dense.scatter_add_(-1, idx, vals)
    return dense.reshape(tiles * r, chunks * m)[: packed.out_features, : packed.in_features]


def pattern_ids(mask: torch.Tensor, m: int) -> torch.Tensor:
    """(N, C) int64: the kept-position bitmask of every row in every chunk (its n-of-m pattern).

    Rows sharing an id in a chunk form one group of the grouped n:m view of the mask.
    """
    rows, k = mask.shape
    chunks = math.ceil(k / m)
    bits = F.pad(mask, (0, chunks * m - k)).reshape(rows, chunks, m).long()
    return (bits << torch.arange(m)).sum(dim=-1)


def dense_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """``act(x @ (weight * mask).T + bias)`` computed densely in float64, returned as x.dtype."""
    return reference.linear(x, weight, mask, bias, activation, compute=torch.float64).to(x.dtype)
