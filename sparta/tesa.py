"""TeSA: a tensor's sparsity attribute — a bool mask (True = kept) plus a pattern descriptor.

An element is *pruned* when forcing it to zero does not change the model's outputs. The
pattern says how the pruned elements are arranged, so that planners can pick kernels
(a block-sparse matmul for ``block``, a smaller dense op for ``row``/``column``/``channel``,
the grouped n:m CPU kernels for ``nm``).
"""

from __future__ import annotations

import hashlib
import operator
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import AttrError

BLOCK_SIZES = (64, 32, 16, 8, 4)
NM_GROUPS = (4, 8, 16, 10, 2)

KINDS = ("dense", "empty", "row", "column", "channel", "block", "nm", "unstructured")


@dataclass(frozen=True)
class Pattern:
    """How the pruned elements of a mask are arranged.

    kind: one of ``KINDS``. ``row``/``column`` are whole rows/columns of a 2-D tensor;
    ``channel`` is whole slices along ``dim`` of any tensor; ``block`` uses ``block`` =
    (bh, bw) over the last two dims; ``nm`` keeps at most ``n`` of every ``m`` consecutive
    elements along ``dim``.
    """

    kind: str
    block: tuple[int, int] | None = None
    n: int | None = None
    m: int | None = None
    dim: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AttrError(f"pattern kind must be one of {KINDS}, got {self.kind!r}.")

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block({self.block[0]}x{self.block[1]})"
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "channel":
            return f"channel(dim={self.dim})"
        return self.kind

    @staticmethod
    def parse(text: str) -> Pattern:
        """Parse ``"block(32x32)"``, ``"2:4"``, ``"row"``, ``"channel(dim=1)"`` ..."""
        t = text.strip().lower()
        if mt := re.fullmatch(r"block\((\d+)\s*[x,]\s*(\d+)\)", t):
            return Pattern("block", block=(int(mt[1]), int(mt[2])))
        if mt := re.fullmatch(r"(\d+):(\d+)", t):
            return Pattern("nm", n=int(mt[1]), m=int(mt[2]), dim=-1)
        if mt := re.fullmatch(r"channel\(dim=(-?\d+)\)", t):
            return Pattern("channel", dim=int(mt[1]))
        if t in KINDS:
            return Pattern(t)
        raise AttrError(
            f"cannot read the pattern {text!r}: use 'dense', 'unstructured', 'row', 'column', "
            f"'channel(dim=D)', 'block(BHxBW)' or 'N:M'."
        )


# Mask arithmetic. Masks are never written in place, so a mask that is constant along some dims
# (a pruned row or column of a weight, one pattern at every token) is held *compactly*: as a
# stride-0 view (``expand``) of its one distinct slice. A row mask of a (4096, 11008) weight then
# costs 4096 bytes, not 45 MB, and the operations below work on the slice alone. Every consumer
# still sees a plain bool tensor of the full shape.

COMPACT_MIN = 1 << 16  # masks with fewer elements are left as they are
_TRUE = torch.ones((), dtype=torch.bool)


def ones(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """An all-kept mask of ``shape``, compact (one stored element)."""
    return _TRUE.expand(tuple(shape))


def all_kept_view(m: torch.Tensor) -> bool:
    """Whether ``m`` was made by ``ones`` (true in O(1); other all-kept masks answer False)."""
    return m.data_ptr() == _TRUE.data_ptr() and not any(m.stride())


def broadcast_dims(m: torch.Tensor) -> tuple[int, ...]:
    """The dims (of size > 1) along which ``m`` is a stride-0 view: constant by construction."""
    return tuple(d for d in range(m.dim()) if m.stride(d) == 0 and m.shape[d] > 1)


def _core(m: torch.Tensor, dims: tuple[int, ...] | set[int]) -> torch.Tensor:
    """``m`` narrowed to its first slice along ``dims``."""
    for d in dims:
        m = m.narrow(d, 0, 1)
    return m


def core(m: torch.Tensor) -> torch.Tensor:
    """The stored slice of a compact mask: ``m`` narrowed to size 1 along its stride-0 dims
    (``core(m).expand(m.shape)`` equals ``m``)."""
    return _core(m, broadcast_dims(m))


def _constant_along(m: torch.Tensor, d: int) -> bool:
    n = m.shape[d]
    if not (torch.equal(m.select(d, 0), m.select(d, n - 1))
            and torch.equal(m.select(d, 0), m.select(d, n // 2))):  # fmt: skip
        return False  # the common miss, at the cost of three slices
    u = m.view(torch.uint8)
    return torch.equal(u.amax(dim=d), u.amin(dim=d))


def compact(m: torch.Tensor, min_numel: int = COMPACT_MIN) -> torch.Tensor:
    """``m`` held compactly: a stride-0 view of its one slice along every dim it is constant
    along (see above). Masks of fewer than ``min_numel`` elements and masks with no such dim
    are returned as they are; an all-kept mask becomes ``ones``. Costs at most a pass over
    ``m`` per dim; the result does not share memory with ``m`` where it is smaller."""
    if m.numel() < min_numel or not m.dim():
        return m
    c = core(m)
    if c.numel() < min_numel:
        return m  # compact enough already
    tested = False
    for d in range(c.dim()):
        if c.shape[d] > 1 and _constant_along(c, d):
            c, tested = c.narrow(d, 0, 1), True
    if not tested:
        return m
    if all_(c):
        return ones(m.shape)
    return c.clone().expand(m.shape)


def reduced(m: torch.Tensor) -> torch.Tensor:
    """``m`` collapsed to size 1 along every dim it is constant along, contiguous: what a
    compiled graph or a saved plan stores (it broadcasts back to ``m``, and to other batch
    sizes)."""
    return core(compact(m, min_numel=0)).contiguous()


def _shared_core(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if a.shape != b.shape or a.is_contiguous() or b.is_contiguous():
        return a, b, False  # a contiguous mask has no stride-0 dim
    dims = set(broadcast_dims(a)) & set(broadcast_dims(b))
    return _core(a, dims), _core(b, dims), bool(dims)


def _pointwise(op, a: torch.Tensor, b: torch.Tensor, kept_wins: bool) -> torch.Tensor:
    if a.shape == b.shape:
        if a is b:
            return a
        if all_kept_view(a):  # ``ones`` absorbs (or) or is the identity (and): no work
            return a if kept_wins else b
        if all_kept_view(b):
            return b if kept_wins else a
    ca, cb, shared = _shared_core(a, b)
    return op(ca, cb).expand(a.shape) if shared else op(a, b)


def and_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a & b``; an all-kept side costs nothing, compact sides stay compact."""
    return _pointwise(operator.and_, a, b, kept_wins=False)


def or_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a | b``; an all-kept side is the answer, compact sides stay compact."""
    return _pointwise(operator.or_, a, b, kept_wins=True)


def outer_and(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``col & row`` for ``col`` (m, 1) and ``row`` (1, n): the (m, n) mask, compact when either
    side keeps everything (a weight whose rows or columns alone are pruned)."""
    shape = (col.shape[0], row.shape[1])
    if all_(col):
        return row.expand(shape)
    if all_(row):
        return col.expand(shape)
    return col & row


def any_(
    m: torch.Tensor, dim: int | tuple[int, ...] | None = None, keepdim: bool = False
) -> torch.Tensor:
    """``m.any(dim, keepdim)``, reduced as uint8: bool reductions run ~20-30x slower on the CPU
    (torch 2.13: ``any(dim=0)`` of a 2816x1024 mask 2.5 ms, ``amax`` of its uint8 view 0.05).
    Compact dims are not read."""
    if dim == ():
        return m
    if m.numel() == 0:  # amax cannot reduce an empty dim
        return m.any() if dim is None else m.any(dim=dim, keepdim=keepdim)
    dims = range(m.dim()) if dim is None else [dim] if isinstance(dim, int) else dim
    u = _core(m, set(broadcast_dims(m)) & {d % m.dim() for d in dims}).view(torch.uint8)
    return (u.amax() if dim is None else u.amax(dim=dim, keepdim=keepdim)).view(torch.bool)


def all_(m: torch.Tensor) -> bool:
    """``bool(m.all())``, reduced as uint8 (see ``any_``); compact dims are not read."""
    return m.numel() == 0 or bool(core(m).view(torch.uint8).amin())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two bool masks of one shape are equal (compared as uint8, see ``any_``); dims
    compact in both are compared once."""
    if a is b:
        return True
    ca, cb, _ = _shared_core(a, b)
    return not bool(any_(ca ^ cb))


def private_copy(m: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of a mask that shares no memory with it; compact dims stay compact."""
    return core(m).detach().to("cpu", copy=True).expand(m.shape)


def count_kept(m: torch.Tensor) -> int:
    """Kept elements of ``m``, counted on its compact core."""
    c = core(m)
    return int(torch.count_nonzero(c)) * (m.numel() // c.numel()) if c.numel() else 0


# Detection on large masks (activations) first checks a corner of the mask: every test below
# holds on a corner (a prefix along some dims) whenever it holds on the whole mask, so a corner
# that fails rejects the whole mask exactly, at the cost of the corner.
CORNER = 128


def _corner(mask: torch.Tensor, full: tuple[int, ...] = (), size: int = CORNER) -> torch.Tensor:
    """The mask narrowed to its first ``size`` indices along every dim not in ``full``."""
    for d in range(mask.dim()):
        if d not in full and mask.shape[d] > size:
            mask = mask.narrow(d, 0, size)
    return mask


def _slices_along(mask: torch.Tensor, d: int) -> bool:
    others = tuple(i for i in range(mask.dim()) if i != d)
    return same(any_(mask, dim=others, keepdim=True).expand_as(mask), mask)


def _structured_dim(mask: torch.Tensor) -> int | None:
    """The dim along which the mask is all-or-nothing slices, or None."""
    if mask.dim() < 2:
        return None
    flat = set(broadcast_dims(mask))
    for d in range(mask.dim()):
        if all(i in flat or mask.shape[i] == 1 for i in range(mask.dim()) if i != d):
            return d  # constant along every other dim (a compact row or column mask)
    c = _core(mask, flat)  # slices along a non-compact dim: the same test on the stored slice
    for d in range(mask.dim()):
        if d not in flat and _slices_along(_corner(c, (d,), 8), d) and _slices_along(c, d):
            return d
    return None


def block_any(mask: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Per (bh, bw) block of the last two dims: does it keep anything? Ragged edges padded."""
    rows, cols = mask.shape[-2:]
    m = mask.reshape(-1, rows, cols).float()
    m = torch.nn.functional.pad(m, (0, (-cols) % bw, 0, (-rows) % bh))
    return (
        torch.nn.functional.max_pool2d(m, (bh, bw))
        .bool()
        .reshape(*mask.shape[:-2], m.shape[-2] // bh, m.shape[-1] // bw)
    )


def live_lines(mask: torch.Tensor) -> torch.Tensor:
    """(..., R, C): True except on whole rows and whole columns (of the last two dims) that are
    entirely pruned. Propagation prunes such lines (a unit nobody reads, a dead input feature)
    on top of a weight's own pattern; the pattern is that of what remains."""
    rows = any_(mask, dim=-1, keepdim=True)
    cols = any_(mask, dim=-2, keepdim=True)
    return rows & cols


def _is_block(mask: torch.Tensor, bh: int, bw: int) -> bool:
    """Kept blocks of (bh, bw) fully kept, but for entirely pruned rows and columns."""
    rows, cols = mask.shape[-2:]
    if rows < bh or cols < bw:
        return False
    if mask.numel() > 4 * CORNER * CORNER and max(bh, bw) <= CORNER:
        corner = _corner(mask.reshape(-1, rows, cols)[:1])
        if not _block_exact(corner, bh, bw):
            return False
    return _block_exact(mask, bh, bw)


def _block_exact(mask: torch.Tensor, bh: int, bw: int) -> bool:
    rows, cols = mask.shape[-2:]
    kept = block_any(mask, bh, bw)
    full = kept.repeat_interleave(bh, dim=-2).repeat_interleave(bw, dim=-1)
    return torch.equal(full[..., :rows, :cols] & live_lines(mask), mask)


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Kept elements per group of ``m`` along the last dim; a last, shorter group (the last dim
    not a multiple of ``m``) is counted as it is, like the n:m layout pads it."""
    padded = F.pad(mask, (0, -mask.shape[-1] % m))
    return padded.reshape(*mask.shape[:-1], padded.shape[-1] // m, m).sum(dim=-1)


def _nm_fit(counts: torch.Tensor, m: int, loose: torch.Tensor) -> int | None:
    """n if every group keeps at most n = the largest count and exactly n unless ``loose``."""
    n = int(counts.max()) if counts.numel() else 0
    if not 0 < n < m or not bool((counts <= n).all()):
        return None
    return n if bool(((counts == n) | loose).all()) else None


def _nm(mask: torch.Tensor) -> tuple[int, int] | None:
    """(n, m) where every group of m consecutive elements of the last dim keeps at most n, and
    exactly n where the group is whole (a shorter last group may keep fewer) — entirely pruned
    rows aside (units nobody reads, which propagation prunes on top of an n:m weight)."""
    k = mask.shape[-1]
    flat = mask.reshape(-1, k) if mask.dim() >= 2 else mask
    corner = _corner(flat, (1,), 32) if flat.dim() == 2 and flat.shape[0] > 64 else None
    for m in NM_GROUPS:
        if k < m:
            continue
        if corner is not None and _nm_n(corner, m) is None:
            continue
        n = _nm_n(flat, m)
        if n is not None:
            return n, m
    return None


def _nm_n(mask: torch.Tensor, m: int) -> int | None:
    k = mask.shape[-1]
    counts = group_counts(mask, m)
    loose = torch.zeros(counts.shape[-1], dtype=torch.bool)
    loose[k // m :] = True
    if mask.dim() >= 2:
        loose = loose | ~mask.any(dim=-1, keepdim=True)
    return _nm_fit(counts, m, loose)


def detect_pattern(mask: torch.Tensor) -> Pattern:
    """The most specific pattern the mask satisfies (cheap checks first)."""
    if all_(mask):
        return Pattern("dense")
    if not bool(any_(mask)):
        return Pattern("empty")
    d = _structured_dim(mask)
    if d is not None:
        if mask.dim() == 2:
            return Pattern("row" if d == 0 else "column")
        return Pattern("channel", dim=d)
    if mask.dim() >= 2:
        # The block size whose kept blocks cover the least (pruned lines make larger blocks
        # fit too); ties go to the larger block.
        # Every kept (2b, 2b) block is four kept (b, b) blocks: a mask that is not blocks of b
        # is no blocks of 2b either, so sizes are tried from the smallest and stop at a miss.
        fits = []
        for b in sorted(BLOCK_SIZES):
            if not _is_block(mask, b, b):
                break
            fits.append(b)
        if fits:
            b = min(fits, key=lambda b: (int(block_any(mask, b, b).sum()) * b * b, -b))
            return Pattern("block", block=(b, b))
    nm = _nm(mask)
    if nm is not None:
        return Pattern("nm", n=nm[0], m=nm[1], dim=-1)
    return Pattern("unstructured")


def surviving_pattern(given: Pattern | None, mask: torch.Tensor) -> Pattern:
    """The pattern of a propagated mask. Propagation only prunes more; an n:m pattern ("at most
    n of every m") and a block pattern stay true when it does, also where detection alone could
    no longer tell (a dead input column leaves a group short of n): so the given pattern where
    the mask still satisfies it and detection finds nothing more structured, else the detected
    one."""
    detected = detect_pattern(mask)
    if (
        given is not None
        and given.kind in ("nm", "block")
        and detected.kind == "unstructured"
        and satisfies(mask, given)
    ):
        return given
    return detected


def satisfies(mask: torch.Tensor, pattern: Pattern) -> bool:
    """Whether the mask is consistent with a declared pattern."""
    k = pattern.kind
    if k in ("dense", "unstructured"):
        return k == "unstructured" or all_(mask)
    if k == "empty":
        return not bool(any_(mask))
    if k in ("row", "column", "channel"):
        dim = {"row": 0, "column": 1}.get(k, pattern.dim)
        return _slices_along(mask, dim % mask.dim())
    if k == "block":
        return mask.dim() >= 2 and _is_block(mask, *pattern.block)
    if k == "nm":
        counts = group_counts(mask.movedim(pattern.dim, -1), pattern.m)
        return bool((counts <= pattern.n).all())
    return False


class TeSA:
    """Tensor-with-Sparsity-Attribute: ``mask`` (bool, True = kept) and its ``pattern``."""

    __slots__ = ("mask", "pattern", "_digest")

    def __init__(self, mask: torch.Tensor, pattern: Pattern | str | None = None) -> None:
        if not isinstance(mask, torch.Tensor):
            raise AttrError(
                f"a sparsity mask must be a torch.Tensor of dtype bool, got {type(mask).__name__}. "
                f"Build it with e.g. `weight.abs() > threshold`."
            )
        if mask.dtype != torch.bool:
            raise AttrError(
                f"a sparsity mask must have dtype torch.bool (True = kept), got {mask.dtype}. "
                f"Convert with `mask != 0` if it holds 0/1 values."
            )
        # A private, detached CPU copy: the user's tensor is never aliased or modified.
        self.mask = private_copy(compact(mask.detach().cpu()))
        if isinstance(pattern, str):
            pattern = Pattern.parse(pattern)
        if pattern is None:
            pattern = detect_pattern(self.mask)
        elif not satisfies(self.mask, pattern):
            raise AttrError(
                f"the mask of shape {tuple(self.mask.shape)} does not satisfy the declared pattern "
                f"{pattern}; leave pattern=None to detect it, or fix the mask."
            )
        self.pattern = pattern
        self._digest: str | None = None

    @classmethod
    def from_mask(cls, mask: torch.Tensor, pattern: Pattern | str | None = None) -> TeSA:
        return cls(mask, pattern)

    @classmethod
    def dense(cls, shape: tuple[int, ...] | torch.Size) -> TeSA:
        return cls(torch.ones(tuple(shape), dtype=torch.bool), Pattern("dense"))

    @property
    def shape(self) -> torch.Size:
        return self.mask.shape

    @property
    def density(self) -> float:
        return count_kept(self.mask) / self.mask.numel() if self.mask.numel() else 1.0

    @property
    def digest(self) -> str:
        """Stable across processes: shape + packed bits (used in kernel cache keys)."""
        if self._digest is None:
            h = hashlib.sha256(repr(tuple(self.mask.shape)).encode())
            h.update(self.mask.flatten().numpy().tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def __repr__(self) -> str:
        return (
            f"TeSA(shape={tuple(self.shape)}, pattern={self.pattern}, density={self.density:.3f})"
        )


def as_tesa(value: TeSA | torch.Tensor, name: str) -> TeSA:
    """Accept a TeSA or a bool tensor as a user attribute."""
    if isinstance(value, TeSA):
        return value
    if isinstance(value, torch.Tensor):
        try:
            return TeSA(value)
        except AttrError as e:
            raise AttrError(f"attribute {name!r}: {e}") from None
    raise AttrError(
        f"attribute {name!r} must be a sparta.TeSA or a bool torch.Tensor, got "
        f"{type(value).__name__}."
    )
