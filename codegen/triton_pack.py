"""Build-time mask analysis and packing for the Triton kernels (pure torch, no Triton).

Everything mask-related happens here, once: chunk patterns, row clustering, tile tables and
the packed weight slabs. The kernels only read the resulting tables.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

UNIT_SIZES = (32, 16, 8, 4, 2, 1)


def mask_digest(mask: torch.Tensor) -> str:
    """Stable digest of a bool mask: shape + packed bits."""
    bits = np.packbits(mask.detach().to("cpu").flatten().numpy())
    h = hashlib.sha256(repr(tuple(mask.shape)).encode())
    h.update(bits.tobytes())
    return h.hexdigest()[:16]


def chunk_pattern(mask: torch.Tensor, bk: int) -> torch.Tensor:
    """(rows, ceil(cols / bk)) bool: does row r keep anything in column chunk c."""
    rows, cols = mask.shape
    kc = -(-cols // bk)
    padded = torch.zeros(rows, kc * bk, dtype=torch.bool, device=mask.device)
    padded[:, :cols] = mask
    return padded.view(rows, kc, bk).any(dim=2)


def row_unit(chunks: torch.Tensor, bn: int) -> int:
    """Largest aligned row group (dividing bn) whose rows share one chunk pattern."""
    rows = chunks.shape[0]
    for g in UNIT_SIZES:
        if g > bn or bn % g or rows % g:
            continue
        grouped = chunks.view(rows // g, g, -1)
        if torch.equal(grouped.all(dim=1), grouped.any(dim=1)):
            return g
    return 1


def _greedy_tiles(units: torch.Tensor, per_tile: int) -> list[list[int]]:
    """Group units (rows of ``units``, bool) into tiles, each keeping its chunk union small."""
    counts = units.sum(dim=1)
    order = torch.argsort(counts, descending=True, stable=True)
    pat = units[order]
    free = torch.ones(len(order), dtype=torch.bool)
    tiles: list[list[int]] = []
    for seed in range(len(order)):
        if not free[seed]:
            continue
        free[seed] = False
        tile = [seed]
        cur = pat[seed].clone()
        for _ in range(per_tile - 1):
            cand = free.nonzero().flatten()
            if len(cand) == 0:
                break
            growth = (pat[cand] & ~cur).sum(dim=1)
            pick = int(cand[int(torch.argmin(growth))])
            free[pick] = False
            tile.append(pick)
            cur |= pat[pick]
        tiles.append([int(order[i]) for i in tile])
    return tiles


@dataclass
class TilePlan:
    """Permutation and per-tile chunk lists of one (BN, BK) choice for one mask."""

    bn: int
    bk: int
    rows: torch.Tensor  # (n_tiles * bn,) int64 source row per packed row, >= N = padding
    tile_chunks: torch.Tensor  # (n_tiles, kc) bool
    clustered: bool
    unit: int = 1  # packed rows come in aligned runs of ``unit`` contiguous output columns

    @property
    def n_tiles(self) -> int:
        return self.tile_chunks.shape[0]

    @property
    def n_slabs(self) -> int:
        return int(self.tile_chunks.sum())


def _plan_from_tiles(chunks: torch.Tensor, tiles: list[list[int]], g: int, bn: int) -> TilePlan:
    """Packed rows per tile; empty slots get virtual rows (>= N, never stored) so that every
    aligned run of ``g`` packed rows maps to ``g`` contiguous output columns."""
    n_units = chunks.shape[0] // g
    per_tile = bn // g
    rows = torch.empty(len(tiles), bn, dtype=torch.int64)
    tc = torch.zeros(len(tiles), chunks.shape[1], dtype=torch.bool)
    spare = n_units
    for t, units in enumerate(tiles):
        for slot in range(per_tile):
            if slot < len(units):
                u = units[slot]
            else:
                u, spare = spare, spare + 1
            rows[t, slot * g : slot * g + g] = torch.arange(u * g, u * g + g)
        real = torch.cat([torch.arange(u * g, u * g + g) for u in units])
        tc[t] = chunks[real].any(dim=0)
    # Heaviest tiles first: better balance over the waves of the grid.
    order = torch.argsort(tc.sum(dim=1), descending=True, stable=True)
    return TilePlan(0, 0, rows[order].flatten(), tc[order], False, g)


def plan_tiles(mask: torch.Tensor, bn: int, bk: int, cluster: bool = True) -> TilePlan:
    """Tile the output rows of ``mask`` (N, K) into ``bn``-row tiles listing active chunks.

    With ``cluster``, rows (in units of identical aligned groups) are regrouped greedily so
    that each tile's chunk union is small; the result is kept only if it lists fewer slabs
    than the identity order.
    """
    chunks = chunk_pattern(mask.to("cpu"), bk)
    n = chunks.shape[0]
    g = row_unit(chunks, bn)
    per_tile = bn // g
    n_units = -(-n // g)
    if n % g:
        chunks = torch.cat([chunks, chunks.new_zeros(n_units * g - n, chunks.shape[1])])
    units = chunks.view(n_units, g, -1).any(dim=1)
    ident = [list(range(i, min(i + per_tile, n_units))) for i in range(0, n_units, per_tile)]
    best = _plan_from_tiles(chunks, ident, g, bn)
    if cluster and per_tile > 1 and n_units > per_tile:
        alt = _plan_from_tiles(chunks, _greedy_tiles(units, per_tile), g, bn)
        if alt.n_slabs < best.n_slabs:
            alt.clustered = True
            best = alt
    best.bn, best.bk = bn, bk
    return best


@dataclass
class PackedLinear:
    """Device tables and packed slabs of one block-sparse weight."""

    slabs: torch.Tensor  # (n_slabs, bn, bk) weight dtype
    tile_ptr: torch.Tensor  # (n_tiles + 1,) int32
    kidx: torch.Tensor  # (n_slabs,) int32 chunk index per slab
    cols: torch.Tensor  # (n_tiles * bn,) int32 output column per packed row, >= N = padding
    bias: torch.Tensor | None  # (n_tiles * bn,) packed bias


def pack_linear(
    weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, plan: TilePlan
) -> PackedLinear:
    """Gather the weight into the plan's slabs (weight * mask, zeros elsewhere)."""
    dev = weight.device
    n, k = weight.shape
    bn, bk = plan.bn, plan.bk
    kc = plan.tile_chunks.shape[1]
    w = torch.zeros(plan.n_tiles * bn + 1, kc * bk, dtype=weight.dtype, device=dev)
    w[:n, :k] = weight.detach() * mask.to(dev)
    rows = plan.rows.to(dev)
    src = torch.where(rows < n, rows, torch.full_like(rows, w.shape[0] - 1))
    wp = w[src].view(plan.n_tiles, bn, kc, bk).permute(0, 2, 1, 3)
    active = plan.tile_chunks.to(dev)
    # One trailing zero slab / index so that no table is empty (an all-pruned mask).
    slabs = torch.cat([wp[active], w.new_zeros(1, bn, bk)])
    counts = plan.tile_chunks.sum(dim=1)
    tile_ptr = torch.zeros(plan.n_tiles + 1, dtype=torch.int32)
    tile_ptr[1:] = torch.cumsum(counts, 0)
    kidx = torch.cat([plan.tile_chunks.nonzero()[:, 1], torch.zeros(1, dtype=torch.int64)])
    kidx = kidx.to(torch.int32)
    packed_bias = None
    if bias is not None:
        b = torch.cat([bias.detach().to(dev), bias.new_zeros(1, device=dev)])
        packed_bias = b[torch.where(rows < n, rows, torch.full_like(rows, n))].contiguous()
    return PackedLinear(
        slabs=slabs,
        tile_ptr=tile_ptr.to(dev),
        kidx=kidx.to(dev),
        cols=plan.rows.to(torch.int32).to(dev),
        bias=packed_bias,
    )


def block_tile(block: int) -> int:
    """Tile edge for a pattern block: a power of two, at least 16 (tl.dot's minimum)."""
    t = 16
    while t < block:
        t *= 2
    return t


def kept_tiles(pattern: torch.Tensor, t: int) -> torch.Tensor:
    """(ceil(M/t), ceil(N/t)) bool: does tile (i, j) hold a kept element."""
    rows, cols = pattern.shape
    p = torch.zeros(-(-rows // t) * t, -(-cols // t) * t, dtype=torch.bool)
    p[:rows, :cols] = pattern.to("cpu")
    return p.view(p.shape[0] // t, t, p.shape[1] // t, t).any(dim=3).any(dim=1)
