"""Sparsifiers: turn dense weights into bool masks (True = kept), ready as ``sparta.compile`` attrs.

Every sparsifier is a small frozen dataclass. ``masks(tensors)`` sees all the tensors one
``sparsify`` entry matched at once (so global variants can rank across them); per-tensor
sparsifiers implement ``mask(t)`` and ``masks`` applies it to each tensor.

Shared conventions:

* scores are computed in float32 from ``t.detach()``; the input is never modified;
* "pruned count" ``round(sparsity * total)`` uses Python's ``round`` (half to even);
* ties are broken deterministically: among equal scores, the element (block, row, head)
  with the lower flat index is kept (for global ranking: the earlier tensor in the order
  given, then the lower flat index);
* the "reduction dim" of a weight is everything after its first dim: ``K`` for a Linear
  weight ``(N, K)``, ``I*kh*kw`` (flattened in that order, as im2col does) for a conv weight
  ``(O, I, kh, kw)``; a 1-D tensor is one row.
"""

from __future__ import annotations

import itertools
import math
import numbers
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import AttrError

__all__ = [
    "BlockMagnitude",
    "Channels",
    "GlobalMagnitude",
    "GroupedNM",
    "Heads",
    "Magnitude",
    "NM",
    "RandomFraction",
    "Sparsifier",
    "TensorSparsifier",
    "Threshold",
]

#: GroupedNM enumerates all C(m, n) patterns per chunk; beyond this the score matrix is too big.
MAX_PATTERNS = 256
#: GroupedNM processes chunks in batches of at most this many (row, pattern, chunk) scores.
_GROUPED_BATCH = 1 << 23


# ----------------------------------------------------------------------------- validation


def _fail(owner: str, requirement: str, got: object, fix: str) -> AttrError:
    return AttrError(f"{owner}: {requirement}, got {got!r}. {fix}")


def _check_sparsity(owner: str, sparsity: object) -> None:
    ok = isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool)
    if not ok or not 0.0 <= float(sparsity) < 1.0:  # type: ignore[arg-type]
        raise _fail(
            owner,
            "sparsity (the fraction of elements pruned) must be a number in [0, 1)",
            sparsity,
            "Pass e.g. sparsity=0.75 to prune three quarters; 1.0 would prune everything.",
        )


def _check_int(owner: str, what: str, value: object, minimum: int | None) -> None:
    is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_int or (minimum is not None and value < minimum):  # type: ignore[operator]
        bound = "" if minimum is None else f" >= {minimum}"
        raise _fail(owner, f"{what} must be an int{bound}", value, f"Pass an int {what}.")


def _check_dim(owner: str, t: torch.Tensor, dim: int) -> int:
    if t.dim() == 0 or not -t.dim() <= dim < t.dim():
        raise _fail(
            owner,
            f"dim must index the tensor's dims (shape {tuple(t.shape)})",
            dim,
            "Pass dim=0 for output rows/channels, dim=1 for input columns.",
        )
    return dim % t.dim()


def _pruned_count(sparsity: float, total: int) -> int:
    return min(total, round(sparsity * total))


def _scores(t: torch.Tensor) -> torch.Tensor:
    """|t| as float32 (a new tensor: never aliases the input)."""
    a = t.detach().float().abs()
    if bool(torch.isnan(a).any()):
        raise AttrError(
            f"cannot rank a tensor of shape {tuple(t.shape)} that holds NaN values; "
            f"clean the weights (e.g. torch.nan_to_num) before sparsifying."
        )
    return a


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """The GEMM view: (first dim, reduction dims flattened); a 1-D or 0-D tensor is one row."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


# ----------------------------------------------------------------------------- selection


def _top_k_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping the k largest of every row of ``x`` (R, L); ties keep lower indices."""
    r, length = x.shape
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= length:
        return torch.ones_like(x, dtype=torch.bool)
    thr = torch.topk(x, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    keep = x >= thr
    bad = (keep.sum(dim=1) != k).nonzero().squeeze(1)
    if bad.numel():  # ties at the threshold: keep the first ones in index order
        xb, tb = x[bad], thr[bad]
        gt, eq = xb > tb, xb == tb
        need = k - gt.sum(dim=1, keepdim=True)
        keep[bad] = gt | (eq & (eq.cumsum(dim=1) <= need))
    return keep


def _keep_largest(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep the k largest values across several non-negative float32 tensors (exact).

    Radix select on the float bits (non-negative floats order like their int32 bits): two
    histogram passes find the k-th largest value without concatenating or sorting anything.
    Ties at the threshold keep the earliest elements (tensor order, then flat index).
    """
    total = sum(s.numel() for s in scores)
    if k >= total:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    if k <= 0:
        return [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    bits = [s.contiguous().view(torch.int32).flatten() for s in scores]

    def select(hist: torch.Tensor, want: int) -> tuple[int, int]:
        above = hist.flip(0).cumsum(0).flip(0)  # above[b] = count of values in bins >= b
        b = int((above >= want).nonzero().max())
        strictly = int(above[b + 1]) if b + 1 < hist.numel() else 0
        return b, strictly

    h1 = sum(torch.bincount((b >> 16).cpu(), minlength=1 << 15) for b in bits)
    hi, above_hi = select(h1, k)
    lows = [(b[(b >> 16) == hi] & 0xFFFF).cpu() for b in bits]
    h2 = sum(torch.bincount(lo, minlength=1 << 16) for lo in lows)
    lo, above_lo = select(h2, k - above_hi)
    thr = (hi << 16) | lo
    need = k - above_hi - above_lo  # how many elements equal to the threshold to keep
    out = []
    for s, b in zip(scores, bits):
        keep = b > thr
        eq = b == thr
        n_eq = int(eq.sum())
        if need >= n_eq:
            keep |= eq
            need -= n_eq
        elif need > 0:
            keep |= eq & (eq.cumsum(0) <= need)
            need = 0
        out.append(keep.view(s.shape))
    return out


# ----------------------------------------------------------------------------- base classes


class Sparsifier:
    """Makes bool masks (True = kept) for the tensors one ``sparsify`` entry matched.

    Subclasses override ``masks`` (when they rank across tensors) or ``mask`` (per tensor,
    through ``TensorSparsifier``). Neither may modify its inputs.
    """

    def masks(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement masks()")

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        """The mask of a single tensor (for global sparsifiers: ranked within it alone)."""
        return self.masks({"tensor": t})["tensor"]


class TensorSparsifier(Sparsifier):
    """A sparsifier that decides each tensor on its own: implement ``mask(t)``."""

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement mask()")

    def masks(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self.mask(t) for name, t in tensors.items()}


# ----------------------------------------------------------------------------- unstructured


@dataclass(frozen=True)
class Magnitude(TensorSparsifier):
    """Per tensor, prune exactly ``round(sparsity * numel)`` elements of smallest |w|.

    Ties at the threshold keep the lower flat indices.
    """

    sparsity: float

    def __post_init__(self) -> None:
        _check_sparsity("Magnitude", self.sparsity)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        keep = t.numel() - _pruned_count(self.sparsity, t.numel())
        return _keep_largest([_scores(t)], keep)[0]


@dataclass(frozen=True)
class GlobalMagnitude(Sparsifier):
    """Across all matched tensors together, prune exactly ``round(sparsity * total)`` elements
    of smallest |w| (so layers end up with different densities).

    Ties keep the earlier tensor (in the order given: model order under ``sparsify``), then
    the lower flat index.
    """

    sparsity: float

    def __post_init__(self) -> None:
        _check_sparsity("GlobalMagnitude", self.sparsity)

    def masks(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        names = list(tensors)
        scores = [_scores(tensors[n]) for n in names]
        total = sum(s.numel() for s in scores)
        kept = _keep_largest(scores, total - _pruned_count(self.sparsity, total))
        return dict(zip(names, kept))


@dataclass(frozen=True)
class Threshold(TensorSparsifier):
    """Keep exactly the elements with ``|w| > threshold`` (the density follows from the data)."""

    threshold: float

    def __post_init__(self) -> None:
        t = self.threshold
        if not isinstance(t, numbers.Real) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise _fail(
                "Threshold",
                "threshold must be a finite number >= 0 (elements with |w| > threshold are kept)",
                t,
                "Pass e.g. Threshold(1e-3).",
            )

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        return _scores(t) > float(self.threshold)


@dataclass(frozen=True)
class RandomFraction(TensorSparsifier):
    """Prune exactly ``round(sparsity * numel)`` elements chosen uniformly at random.

    Reproducible: a ``torch.Generator`` seeded with ``seed`` (by ``mask``) or, under
    ``sparsify``/``masks``, with ``seed`` mixed with a CRC32 of the tensor's name, so that two
    same-shaped tensors get different masks and a tensor's mask does not depend on which
    other tensors the entry matched.
    """

    sparsity: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_sparsity("RandomFraction", self.sparsity)
        _check_int("RandomFraction", "seed", self.seed, 0)

    def _mask(self, t: torch.Tensor, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        pruned = torch.randperm(t.numel(), generator=gen)[: _pruned_count(self.sparsity, t.numel())]
        keep = torch.ones(t.numel(), dtype=torch.bool)
        keep[pruned] = False
        return keep.view(t.shape)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        return self._mask(t, int(self.seed))

    def masks(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mix = (int(self.seed) * 0x9E3779B1) % (1 << 62)
        return {n: self._mask(t, mix ^ zlib.crc32(n.encode())) for n, t in tensors.items()}


# ----------------------------------------------------------------------------- block / n:m


def _pair(owner: str, block: object) -> tuple[int, int]:
    if (
        not isinstance(block, Sequence)
        or len(block) != 2
        or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in block)
        or min(block) < 1
    ):
        raise _fail(
            owner,
            "block must be a pair (bh, bw) of ints >= 1",
            block,
            "Pass e.g. BlockMagnitude((32, 32), 0.9).",
        )
    return int(block[0]), int(block[1])


@dataclass(frozen=True)
class BlockMagnitude(TensorSparsifier):
    """Prune whole ``(bh, bw)`` blocks of the last two dims, those of smallest L2 norm.

    The last two dims are tiled from index 0; ragged edge blocks (when a dim is not a multiple
    of the block) are smaller and compete with their own (smaller) norm. Leading dims are
    independent matrices whose blocks are ranked together. Exactly
    ``round(sparsity * number_of_blocks)`` blocks are pruned; ties keep the lower block index.
    With ``bh == bw`` in ``sparta.tesa.BLOCK_SIZES``, ``TeSA(mask).pattern`` reads
    ``block(bh x bw)`` (unless the mask happens to be more structured, e.g. whole rows).
    """

    block: tuple[int, int]
    sparsity: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", _pair("BlockMagnitude", self.block))
        _check_sparsity("BlockMagnitude", self.sparsity)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() < 2:
            raise _fail(
                "BlockMagnitude",
                "the tensor must have at least 2 dims (blocks tile the last two)",
                tuple(t.shape),
                "Match only weight matrices in the sparsify spec, or use Magnitude for vectors.",
            )
        bh, bw = self.block
        rows, cols = t.shape[-2:]
        a = _scores(t).reshape(-1, rows, cols)
        a = torch.nn.functional.pad(a, (0, (-cols) % bw, 0, (-rows) % bh))
        nb, nr, nc = a.shape[0], a.shape[1] // bh, a.shape[2] // bw
        norms = a.square().reshape(nb, nr, bh, nc, bw).sum(dim=(2, 4))
        keep = _keep_largest([norms], norms.numel() - _pruned_count(self.sparsity, norms.numel()))
        full = keep[0].repeat_interleave(bh, dim=1).repeat_interleave(bw, dim=2)
        return full[:, :rows, :cols].reshape(t.shape)


def _check_nm(owner: str, n: object, m: object) -> None:
    _check_int(owner, "n", n, 1)
    _check_int(owner, "m", m, 2)
    if n >= m:  # type: ignore[operator]
        raise _fail(
            owner, "n must be smaller than m (n kept of every m)", (n, m), "Pass e.g. (2, 4)."
        )


def _chunked(t: torch.Tensor, m: int) -> torch.Tensor:
    """|t| in the GEMM view, the reduction dim padded with -1 to a multiple of m: (N, C, m)."""
    a = _as_rows(_scores(t))
    a = torch.nn.functional.pad(a, (0, (-a.shape[1]) % m), value=-1.0)
    return a.view(a.shape[0], -1, m)


def _unchunk(keep: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    k = _as_rows(t).shape[1]
    return keep.reshape(keep.shape[0], -1)[:, :k].reshape(t.shape)


@dataclass(frozen=True)
class NM(TensorSparsifier):
    """Keep the ``n`` largest |w| of every ``m`` consecutive elements along the reduction dim.

    Groups start at index 0 of each row of the GEMM view (see the module docstring); when the
    reduction size is not a multiple of ``m`` the last, shorter group keeps ``min(n, size)``.
    Ties keep the lower index within the group.
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        _check_nm("NM", self.n, self.m)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        a = _chunked(t, self.m)
        keep = _top_k_rows(a.view(-1, self.m), self.n).view(a.shape)
        return _unchunk(keep, t)


def _divisors_near(n: int, g: int) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divs, key=lambda d: (abs(d - g), d))[:4]


@dataclass(frozen=True)
class GroupedNM(TensorSparsifier):
    """n:m along the reduction dim, with patterns grouped for the CPU backend's layout.

    For a weight in its GEMM view ``(N, K)``, ``K`` is cut into chunks of ``m`` (the last one
    padded with virtual elements that are never kept, when ``K % m``). In each chunk every row
    keeps one of the ``C(m, n)`` n-subsets — its pattern — and every pattern is used by a
    multiple of ``g`` rows, so a kernel can process the rows of each pattern in vector groups
    of ``g`` with no padding. ``N`` must be a multiple of ``g`` (an error suggests ``g`` values
    that divide ``N``); partial groups are not made.

    Assignment (per chunk, vectorised over rows and chunks): every row starts at its best
    pattern (most kept |w|; ties: lexicographically first subset). Each pattern's count is
    then rounded to a multiple of ``g``: the ``sum(count % g) / g`` patterns whose rounding up
    looks cheapest (estimated from the cheapest moves in/out) are filled, the others give away
    their remainder rows; rows move one at a time, always the move (row, target) that loses
    the least kept magnitude (ties: lowest row, then lowest pattern).
    """

    n: int
    m: int
    g: int

    def __post_init__(self) -> None:
        _check_nm("GroupedNM", self.n, self.m)
        _check_int("GroupedNM", "g", self.g, 1)
        if math.comb(self.m, self.n) > MAX_PATTERNS:
            raise _fail(
                "GroupedNM",
                f"C(m, n) (the number of patterns per chunk) must be at most {MAX_PATTERNS}",
                (self.n, self.m),
                "Use a smaller m (e.g. 2:4, 4:8), or NM(n, m) without grouping.",
            )

    def patterns(self) -> torch.Tensor:
        """The ``C(m, n)`` patterns as a (P, m) bool tensor, in lexicographic order."""
        combos = list(itertools.combinations(range(self.m), self.n))
        pat = torch.zeros(len(combos), self.m, dtype=torch.bool)
        for i, c in enumerate(combos):
            pat[i, list(c)] = True
        return pat

    def assign(self, t: torch.Tensor) -> torch.Tensor:
        """The pattern index of every (row, chunk): an int64 tensor (N, C)."""
        a = _chunked(t, self.m)
        rows, chunks = a.shape[:2]
        if rows % self.g:
            raise _fail(
                "GroupedNM",
                f"the number of rows N must be a multiple of g={self.g} (weight shape "
                f"{tuple(t.shape)}, N={rows})",
                rows,
                f"Pick g dividing N, e.g. one of {_divisors_near(rows, self.g)}, or use NM.",
            )
        pat = self.patterns().float()
        per_batch = max(1, _GROUPED_BATCH // (rows * pat.shape[0]))
        out = [
            _assign_chunks(a[:, c : c + per_batch].transpose(0, 1), pat, self.g)
            for c in range(0, chunks, per_batch)
        ]
        return torch.cat(out, dim=0).t()

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        keep = self.patterns()[self.assign(t)]  # (N, C, m)
        return _unchunk(keep, t)


def _assign_chunks(a: torch.Tensor, pat: torch.Tensor, g: int) -> torch.Tensor:
    """Pattern per (chunk, row) for a batch of chunks ``a`` (C, N, m); see ``GroupedNM``."""
    c, n, _ = a.shape
    p = pat.shape[0]
    score = a @ pat.t()  # (C, N, P): magnitude kept by each pattern
    best, cur = score.max(dim=2)  # first maximum on ties
    loss = best.unsqueeze(2) - score  # (C, N, P) >= 0: cost of moving a row to a pattern
    in_pat = cur.unsqueeze(2) == torch.arange(p)  # (C, N, P)
    counts = in_pat.sum(dim=1)  # (C, P)
    rem = counts % g
    k_up = rem.sum(dim=1) // g  # per chunk: how many patterns round up
    if not bool(k_up.any()):
        return cur

    inf = torch.tensor(float("inf"))
    top = min(g - 1, n)
    # Estimated cost of rounding each pattern down (its cheapest `rem` rows leave for their
    # second-best pattern) and up (the cheapest `g - rem` outside rows join it).
    second = score.masked_fill(in_pat, -inf).amax(dim=2)
    leave = torch.where(in_pat, (best - second).unsqueeze(2), inf)
    join = torch.where(in_pat, inf, loss)
    down = _cheapest_sum(leave, rem, top)
    up = _cheapest_sum(join, torch.where(rem > 0, g - rem, 0), top)
    benefit = torch.where(rem > 0, down - up, -inf)
    order = torch.sort(benefit, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(p).expand(c, p))
    is_up = (rank < k_up.unsqueeze(1)) & (rem > 0)
    give = torch.where(is_up, 0, rem)
    need = torch.where(is_up, g - rem, 0)

    # Greedy moves, one per chunk per step. Per row, keep its cheapest still-open target;
    # when a target fills up, recompute only the rows that were aiming at it.
    open_ = need > 0
    row_loss, row_tgt = torch.where(open_.unsqueeze(1), loss, inf).min(dim=2)  # first min
    while True:
        active = (give.sum(dim=1) > 0).nonzero().squeeze(1)
        if not active.numel():
            return cur
        donor = give.gather(1, cur) > 0  # (C, N)
        row = torch.where(donor, row_loss, inf).argmin(dim=1)[active]  # lowest row on ties
        tgt = row_tgt[active, row]
        src = cur[active, row]
        give[active, src] -= 1
        need[active, tgt] -= 1
        cur[active, row] = tgt
        filled = need[active, tgt] == 0
        if bool(filled.any()):
            fc, fq = active[filled], tgt[filled]
            open_[fc, fq] = False
            hit, ri = (row_tgt[fc] == fq.unsqueeze(1)).nonzero(as_tuple=True)
            cc = fc[hit]
            sub = torch.where(open_[cc], loss[cc, ri], inf).min(dim=1)
            row_loss[cc, ri], row_tgt[cc, ri] = sub.values, sub.indices


def _cheapest_sum(cost: torch.Tensor, count: torch.Tensor, top: int) -> torch.Tensor:
    """Per (chunk, pattern): the sum of the ``count`` smallest costs over rows (count <= top)."""
    small = torch.topk(cost, top, dim=1, largest=False).values  # (C, top, P), ascending
    csum = torch.cat([torch.zeros_like(small[:, :1]), small.cumsum(dim=1)], dim=1)
    return csum.gather(1, count.clamp(max=top).unsqueeze(1)).squeeze(1)


# ----------------------------------------------------------------------------- structured


def _keep_slices(norms: torch.Tensor, sparsity: float) -> torch.Tensor:
    return _keep_largest([norms], norms.numel() - _pruned_count(sparsity, norms.numel()))[0]


@dataclass(frozen=True)
class Channels(TensorSparsifier):
    """Prune whole slices along ``dim`` (output rows/channels for ``dim=0``) of smallest L2 norm.

    Exactly ``round(sparsity * t.shape[dim])`` slices are pruned; ties keep the lower index.
    Structured sparsity pays off once propagation spreads it: a pruned output row of one layer
    prunes the matching bias element and input column of the next layer, and the planner can
    then run smaller dense ops.
    """

    sparsity: float
    dim: int = 0

    def __post_init__(self) -> None:
        _check_sparsity("Channels", self.sparsity)
        _check_int("Channels", "dim", self.dim, None)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        d = _check_dim("Channels", t, self.dim)
        a = _scores(t).movedim(d, 0)
        norms = a.reshape(a.shape[0], -1).square().sum(dim=1)
        keep = _keep_slices(norms, self.sparsity)
        shape = [1] * t.dim()
        shape[d] = t.shape[d]
        return keep.view(shape).expand(t.shape).contiguous()


@dataclass(frozen=True)
class Heads(TensorSparsifier):
    """Prune whole attention heads: along ``dim`` the tensor is ``num_heads`` groups of ``D``.

    For Q/K/V projection weights ``(H*D, hidden)`` and their biases use ``dim=0``; for the
    output projection weight ``(hidden, H*D)`` use ``dim=1``. Exactly
    ``round(sparsity * num_heads)`` heads of smallest L2 norm are pruned per tensor; ties keep
    the lower head. Each tensor is ranked on its own, so to drop the same heads everywhere
    prune one tensor per layer and let propagation spread it: pruned heads of the V or output
    projection make the matching rows/columns of the others unused.
    """

    num_heads: int
    sparsity: float
    dim: int = 0

    def __post_init__(self) -> None:
        _check_int("Heads", "num_heads", self.num_heads, 1)
        _check_sparsity("Heads", self.sparsity)
        _check_int("Heads", "dim", self.dim, None)

    def mask(self, t: torch.Tensor) -> torch.Tensor:
        d = _check_dim("Heads", t, self.dim)
        h = int(self.num_heads)
        if t.shape[d] % h:
            raise _fail(
                "Heads",
                f"the size of dim {d} must be a multiple of num_heads={h} (tensor shape "
                f"{tuple(t.shape)})",
                t.shape[d],
                "Pass the model's num_attention_heads and the dim that holds heads*head_dim "
                "(0 for Q/K/V weights and biases, 1 for the output projection weight).",
            )
        a = _scores(t).movedim(d, 0)
        norms = a.reshape(h, -1).square().sum(dim=1)
        keep = _keep_slices(norms, self.sparsity).repeat_interleave(t.shape[d] // h)
        shape = [1] * t.dim()
        shape[d] = t.shape[d]
        return keep.view(shape).expand(t.shape).contiguous()
