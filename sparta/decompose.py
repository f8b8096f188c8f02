"""Decomposition of mixed masks: one weight run as two sparse kernels whose outputs are summed.

SparTA (OSDI'22) plans a mask that mixes patterns — mostly whole blocks or n:m groups, plus a
scattered remainder — as the sum of one kernel per pattern: ``x @ (W*M).T = x @ (W*P).T +
x @ (W*R).T`` for any split of the kept set ``M = P | R`` into disjoint parts. Exact by
construction (every kept weight is in exactly one part; the bias goes to the first part). The
planner times a decomposition like any other candidate and picks it only where it measures
faster than each family alone and dense.

The splits (each a pure function of the mask, so a saved plan rebuilds the same parts):

- ``split_nm(mask, n, m)``: per group of m consecutive inputs, the first ≤ n kept weights go to
  the n:m part; the rest is the residual (CPU: ``nm_cpu`` + ``sparse_cpu``).
- ``split_blocks(mask)``: (TILE x TILE) tiles at least ``BLOCK_FILL`` kept go to the block part,
  then every group of 4 where the rest breaks 2:4 pulls its tile in too; the residual is 2:4
  (GPU: ``triton`` + ``cusparselt``).

Families are named by their parts: ``"nm_cpu+sparse_cpu"``, ``"triton+cusparselt"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import families
from .families import TILE, skips_tiles
from .tesa import Pattern, block_any, group_counts

BLOCK_FILL = 0.25  # a tile at least this full goes to the block part
NM_CHOICES = ((1, 4), (2, 4), (1, 8), (2, 8), (3, 8), (4, 8))
SPARSE_COST = 1.25  # a kept weight in sparse_cpu's tables against one in nm_cpu's, per FMA


@dataclass(frozen=True)
class Split:
    """A decomposition of one weight's mask: ``parts[i]`` runs on family ``families[i]``."""

    families: tuple[str, ...]
    masks: tuple[torch.Tensor, ...]  # disjoint bool (N, K) masks whose union is the mask
    patterns: tuple[Pattern, ...]

    @property
    def name(self) -> str:
        return "+".join(self.families)


def split_nm(mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n:m part, residual) of a bool (N, K) mask: per group of m along K the first ≤ n kept."""
    k = mask.shape[-1]
    padded = F.pad(mask, (0, -k % m)).reshape(*mask.shape[:-1], -1, m)
    rank = padded.cumsum(-1)
    part = (padded & (rank <= n)).reshape(*mask.shape[:-1], -1)[..., :k]
    return part, mask & ~part


def cpu_split(mask: torch.Tensor) -> Split | None:
    """The n:m + unstructured split worth timing for ``mask``, or None.

    Each (n, m) of ``NM_CHOICES`` is scored by its work per weight, n/m for the n:m part plus
    ``SPARSE_COST`` x the residual's density, against ``SPARSE_COST`` x the density for
    ``sparse_cpu`` alone; the best is proposed only when it scores lower (the timing decides).
    """
    density = float(mask.float().mean())
    best, best_cost = None, SPARSE_COST * density
    for n, m in NM_CHOICES:
        part, rest = split_nm(mask, n, m)
        if not bool(rest.any()) or not bool(part.any()):
            continue  # all n:m (nm_cpu alone covers it) or nothing n:m
        cost = n / m + SPARSE_COST * float(rest.float().mean())
        if cost < best_cost:
            best, best_cost = (n, m, part, rest), cost
    if best is None:
        return None
    n, m, part, rest = best
    return Split(
        ("nm_cpu", "sparse_cpu"),
        (part, rest),
        (Pattern("nm", n=n, m=m, dim=1), Pattern("unstructured")),
    )


def _fits_24(mask: torch.Tensor) -> torch.Tensor:
    """Per group of 4 along the last dim: keeps at most 2."""
    return group_counts(mask, 4) <= 2


def split_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block part, 2:4 residual) of a bool (N, K) mask, see the module docstring."""
    rows, cols = mask.shape
    fill = F.avg_pool2d(
        F.pad(mask[None].float(), (0, -cols % TILE, 0, -rows % TILE)), TILE, ceil_mode=True
    )[0]
    tiles = fill >= BLOCK_FILL

    def kept_in(tiles: torch.Tensor) -> torch.Tensor:
        return tiles.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)[:rows, :cols] & mask

    for _ in range(2):  # the tiles of groups that break 2:4 join the block part
        bad = ~_fits_24(mask & ~kept_in(tiles))  # (N, ceil(K/4))
        bad = bad.repeat_interleave(4, 1)[:, :cols] & mask
        tiles = tiles | block_any(bad, TILE, TILE)
    part = kept_in(tiles)
    return part, mask & ~part


def gpu_split(mask: torch.Tensor) -> Split | None:
    """The block + 2:4 split of ``mask``, or None when it does not apply: no 2:4 residual, or a
    block part whose kernel would skip too little (``families.skips_tiles``)."""
    if mask.dim() != 2 or mask.shape[-1] % 4:
        return None
    part, rest = split_blocks(mask)
    if not bool(rest.any()) or not bool(part.any()) or not bool(_fits_24(rest).all()):
        return None
    if not skips_tiles(part):
        return None
    return Split(
        ("triton", "cusparselt"),
        (part, rest),
        (Pattern("block", block=(TILE, TILE)), Pattern("nm", n=2, m=4, dim=1)),
    )


class Decomposed(torch.nn.Module):
    """``sum(part(x) for part in parts)``: the kernels of a split; the first part carries the
    bias. Emitted as one op call per part and adds (``sparta/emit.py``)."""

    def __init__(self, split: Split, parts: list[torch.nn.Module]) -> None:
        super().__init__()
        self.split = split  # the part masks: a saved plan stores each part as its own kernel
        self.families = split.families
        self.parts = torch.nn.ModuleList(parts)

    def extra_repr(self) -> str:
        return "+".join(self.families)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.parts[0](x)
        for part in self.parts[1:]:
            y = y + part(x)
        return y


def build(
    split: Split, weight: torch.Tensor, bias: torch.Tensor | None, node: str, tokens: int
) -> Decomposed | None:
    """The kernels of ``split`` for the masked ``weight`` (N, K) and ``bias`` (N,) or None, by
    each part's family builder (``families.builder``); None when a family does not apply on
    ``weight``'s device. Raises what a builder raises (BackendError)."""
    parts = []
    for i, (family, m, pattern) in enumerate(zip(split.families, split.masks, split.patterns)):
        make = families.builder(family, pattern, weight.device)
        if make is None:
            return None
        m = m.to(weight.device)
        b = bias if i == 0 else None
        parts.append(make(weight * m, m, b, None, node=f"{node} ({family} part)", tokens=tokens))
    return Decomposed(split, parts)
