"""Helpers shared by the rule modules: broadcasting, dims, and exact masks of nonnegative ops.

The key trick: for an op that is a sum of products of its tensor arguments with positive
coefficients (matmul, linear, conv, avg-pool, sum, ...), running the op itself on 0/1 float
masks tells which outputs have a term whose factors are all kept (forward), and the gradient of
``sum(op(masks) * out_mask)`` tells which input elements reach a kept output through a term
whose other factors are kept (backward). Both are exact for such ops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from sparta.registry import Call, Mask
from sparta.tesa import all_, any_, broadcast_dims, outer_and, same

__all__ = [
    "Facts",
    "all_",
    "all_dims",
    "any_",
    "bool_mm",
    "copied_from",
    "copy_masks",
    "broadcast_back",
    "broadcast_fwd",
    "dims_of",
    "full",
    "is_mask",
    "nonneg_masks",
    "same",
    "scalar_is_zero",
]


def is_mask(m: Any) -> bool:
    return isinstance(m, torch.Tensor)


def full(shape: Sequence[int] | torch.Size, value: bool) -> Mask:
    return torch.full(tuple(shape), value, dtype=torch.bool)


def broadcast_back(mask: Mask, shape: Sequence[int] | torch.Size) -> Mask:
    """Reduce an output-shaped mask to an input of ``shape`` that was broadcast to it: an input
    element is kept if any output element it feeds is kept."""
    shape = tuple(shape)
    if tuple(mask.shape) == shape:
        return mask
    lead = mask.dim() - len(shape)
    m = any_(mask, dim=tuple(range(lead))) if lead > 0 else mask
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and m.shape[i] != 1)
    m = any_(m, dim=dims, keepdim=True) if dims else m
    return m.reshape(shape)


def broadcast_fwd(mask: Mask, shape: Sequence[int] | torch.Size) -> Mask:
    shape = tuple(shape)
    return mask if tuple(mask.shape) == shape else mask.expand(shape)


def dims_of(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """Normalised reduction dims; None or [] means all dims (ATen's convention)."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    dim = list(dim)
    if not dim:
        return tuple(range(ndim))
    return tuple(sorted({d % max(ndim, 1) for d in dim}))


def all_dims(ndim: int) -> tuple[int, ...]:
    return tuple(range(ndim))


def scalar_is_zero(v: Any) -> bool:
    """A python scalar (or a 0-d tensor constant) that is exactly zero."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and bool(v.reshape(()) == 0)
    if isinstance(v, bool):
        return v is False
    return isinstance(v, (int, float)) and v == 0


def nonneg_masks(
    op: Callable[..., torch.Tensor],
    call: Call,
    names: Iterable[str],
    *,
    override: Mapping[str, Any] | None = None,
    used: Mask | None = None,
) -> tuple[Mask, dict[str, Mask]]:
    """Run ``op`` (by schema kwargs) with the named tensor args replaced by 0/1 float masks.

    ``override`` replaces other arguments (e.g. ``bias=None``). Returns the forward mask (output
    can be nonzero) and, per named arg, the elements that reach an element kept in ``used``
    (default ``call.out``). Sound and exact for ops that are sums of products of the named
    args with positive coefficients.
    """
    names = list(names)
    kwargs: dict[str, Any] = {}
    for k, v in call.params.items():
        kwargs[k] = v
    for k, v in call.inputs.items():
        if k not in names and v is not None and k not in kwargs:
            kwargs[k] = None
    kwargs.update(override or {})
    used = call.out if used is None else used
    with torch.inference_mode(False), torch.enable_grad():
        leaves = {
            n: call.inputs[n].to(torch.float32, copy=True).requires_grad_(True) for n in names
        }
        kwargs.update(leaves)
        y = op(**kwargs)
        fwd = y.detach() > 0
        grads = torch.autograd.grad(
            (y * used.to(y.dtype)).sum(), [leaves[n] for n in names], allow_unused=True
        )
    back = {
        n: (g > 0) if g is not None else full(leaves[n].shape, False) for n, g in zip(names, grads)
    }
    return fwd, back


def _rows_equal(m: Mask) -> bool:
    """All rows of 2-D ``m`` identical: every column constant (max = min, as uint8)."""
    n = m.shape[0]
    if n < 2:
        return False  # nothing to gain (and bool_mm recurses on one row)
    if m.stride(0) == 0:
        return True
    if 1 in broadcast_dims(m):  # every row constant: test one column
        m = m[:, :1]
    if not torch.equal(m[0], m[-1]) or not torch.equal(m[0], m[n // 2]):
        return False  # cheap early exit before the full comparison
    u = m.view(torch.uint8)
    return torch.equal(u.amax(dim=0), u.amin(dim=0))


def _cols_equal(m: Mask) -> bool:
    """All columns of 2-D ``m`` identical: every row constant."""
    return _rows_equal(m.t())


class Facts:
    """Structure facts of one 2-D mask, computed at most once: all rows identical
    (``rows``), all columns identical (``cols``). ``t()`` is the transpose's, sharing them, so
    a rule that multiplies by a mask and by its transpose tests it once."""

    __slots__ = ("flipped", "m", "shared")

    def __init__(self, m: Mask, shared: dict | None = None, flipped: bool = False) -> None:
        self.m, self.shared, self.flipped = m, {} if shared is None else shared, flipped

    def _get(self, which: str) -> bool:
        key = which if not self.flipped else {"rows": "cols", "cols": "rows"}[which]
        if key not in self.shared:
            base = self.m.t() if self.flipped else self.m
            self.shared[key] = (_rows_equal if key == "rows" else _cols_equal)(base)
        return self.shared[key]

    @property
    def rows(self) -> bool:
        return self._get("rows")

    @property
    def cols(self) -> bool:
        return self._get("cols")

    def t(self) -> Facts:
        return Facts(self.m.t(), self.shared, not self.flipped)


def bool_mm(a: Mask, b: Mask, fa: Facts | None = None, fb: Facts | None = None) -> Mask:
    """Boolean matrix product of 2-D masks: ``out[i, j] = any_k a[i, k] & b[k, j]``.

    Structured masks (identical rows or columns, the common case for activations and
    structured weights) take an O(size) path instead of a float matmul. ``fa``/``fb``: the
    masks' ``Facts`` when the caller already has them.
    """
    fa, fb = fa or Facts(a), fb or Facts(b)
    m, n = a.shape[0], b.shape[1]
    if fa.rows:
        return bool_mm(a[:1], b, None, fb).expand(m, n)
    if n > 1 and fb.cols:
        return bool_mm(a, b[:, :1], fa, None).expand(m, n)
    if a.shape[1] > 1 and fa.cols:  # every k alike in a
        return outer_and(a[:, :1], any_(b, dim=0, keepdim=True))
    if b.shape[0] > 1 and fb.rows:  # every k alike in b
        return outer_and(any_(a, dim=1, keepdim=True), b[:1])
    f32 = torch.float32  # converted from uint8: from bool it is ~20x slower (see any_)
    return (a.view(torch.uint8).to(f32) @ b.view(torch.uint8).to(f32)) > 0


def copied_from(
    call: Call, name: str = "self", override: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """For an op each of whose output elements is a copy of one element of input ``name`` or a
    constant fill (shuffles, nearest upsampling, padding, rolls, flips, sliding windows): the
    flat index + 1 of the element each output element copies, 0 where it is the fill.

    Found by running the op on the values 1..numel in float64 (exact up to 2**53 elements), so
    the positions are the op's own, whatever its arguments. ``override`` replaces arguments
    (a padding value of 0, for one).
    """
    x = call.inputs[name]
    kwargs = {**call.params, **(override or {})}
    kwargs[name] = torch.arange(1, x.numel() + 1, dtype=torch.float64).reshape(x.shape)
    y = call.op(**kwargs)
    y = y[0] if isinstance(y, (tuple, list)) else y
    return y.round().long()


def copy_masks(
    call: Call,
    name: str = "self",
    *,
    fill_nonzero: bool = False,
    override: Mapping[str, Any] | None = None,
) -> tuple[Mask, Mask]:
    """(output mask, input used) of a copying op (see ``copied_from``), exact both ways: an
    output element is kept where the element it copies is (or the fill is nonzero), an input
    element is used where a kept output element copies it."""
    x = call.inputs[name]
    src = copied_from(call, name, override)
    from_x = src > 0
    flat = x.reshape(-1)
    fwd = torch.where(from_x, flat[(src - 1).clamp(min=0)], torch.tensor(fill_nonzero))
    used = torch.zeros(x.numel(), dtype=torch.bool)
    used[src[from_x & call.out] - 1] = True
    return fwd, used.reshape(x.shape)
