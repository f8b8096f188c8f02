"""Views and layout ops: every output element is one input element, so masks move exactly.

view/reshape/flatten/unsqueeze/squeeze keep the row-major order (a mask reshape both ways, e.g.
splitting hidden features into heads); transpose/permute/movedim permute the mask; expand and
repeat broadcast forward and reduce with "any" backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule
from sparta.shrink_ops import Compact, first, register_through

from ._util import broadcast_back, broadcast_fwd

aten = torch.ops.aten


def _ops(*names: str) -> list:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


@register_rule(
    *_ops("view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze",
          "view_as", "reshape_as", "_reshape_alias", "view_copy", "squeeze_copy",
          "unsqueeze_copy", "ravel"),
)  # fmt: skip
def reshape(call: Call) -> Refined:
    """Same elements in the same (row-major) order, in a new shape."""
    x, out = call.inputs["self"], call.out
    if call.op == getattr(aten.view, "dtype", None):
        return Refined()  # reinterprets bytes: conservative
    return refine(out=x.reshape(out.shape), self=out.reshape(x.shape), other=_unused(call))


def _unused(call: Call) -> Mask | None:
    m = call.inputs.get("other")
    return torch.zeros(m.shape, dtype=torch.bool) if isinstance(m, torch.Tensor) else None


def _perm(call: Call) -> list[int]:
    """The permutation of input dims that gives the output (output dim i = input dim p[i])."""
    nd = call.inputs["self"].dim()
    name = call.op._schema.name.split("::")[-1]
    p = list(range(nd))
    if name in ("permute", "permute_copy"):
        return [d % nd for d in call.params["dims"]]
    if name == "numpy_T":
        return p[::-1]
    if name in ("t", "t_copy", "mT"):
        if nd >= 2:
            p[-1], p[-2] = p[-2], p[-1]
        return p
    if name == "movedim":
        src, dst = call.params["source"], call.params["destination"]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [s % nd for s in src], [d % nd for d in dst]
        rest = [d for d in range(nd) if d not in src]
        out: list[int | None] = [None] * nd
        for s, d in zip(src, dst):
            out[d] = s
        it = iter(rest)
        return [o if o is not None else next(it) for o in out]
    d0 = call.params.get("dim0", call.params.get("axis0"))
    d1 = call.params.get("dim1", call.params.get("axis1"))
    if nd:
        d0, d1 = d0 % nd, d1 % nd
        p[d0], p[d1] = p[d1], p[d0]
    return p


@register_rule(*_ops("transpose", "t", "permute", "movedim", "swapaxes", "swapdims", "mT",
                     "numpy_T", "permute_copy", "transpose_copy", "t_copy"))  # fmt: skip
def permute(call: Call) -> Refined:
    """Exact permutation of the mask, and its inverse backward."""
    p = _perm(call)
    inv = [0] * len(p)
    for i, d in enumerate(p):
        inv[d] = i
    x = call.inputs["self"]
    return refine(out=x.permute(p), self=call.out.permute(inv))


@register_rule(*_ops("expand", "expand_as", "broadcast_to", "expand_copy"))
def expand(call: Call) -> Refined:
    """Broadcast forward; an input element is used if any of its copies is kept."""
    x, out = call.inputs["self"], call.out
    return refine(out=broadcast_fwd(x, out.shape), self=broadcast_back(out, x.shape),
                  other=_unused(call))  # fmt: skip


@register_rule(aten.repeat)
def repeat(call: Call) -> Refined:
    """Tile forward; an input element is used if any tile keeps it."""
    x, out = call.inputs["self"], call.out
    reps: Sequence[int] = list(call.params["repeats"])
    fwd = x.repeat(*reps)
    lead = len(reps) - x.dim()
    shape = [1] * lead + list(x.shape)
    tiled = out.reshape([v for r, s in zip(reps, shape) for v in (r, s)])
    back = tiled.any(dim=tuple(range(0, 2 * len(reps), 2))).reshape(x.shape)
    return refine(out=fwd, self=back)


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


def _transpose_layout(a, n, v):
    c = first(a, n, v)
    if c is None:
        return None
    d0, d1 = (d % v.dim() for d in n.args[1:3])
    return Compact({d0: d1, d1: d0}.get(c.dim, c.dim), c.keep, c.full)


def _permute_layout(a, n, v):
    c = first(a, n, v)
    if c is None:
        return None
    return Compact([d % v.dim() for d in n.args[1]].index(c.dim), c.keep, c.full)


register_through(aten.transpose.int)(_transpose_layout)
register_through(aten.permute.default)(_permute_layout)


def view_layout(src: torch.Tensor, out: torch.Tensor, c: Compact) -> Compact | None:
    """The layout of ``src.reshape(out.shape)``: a compact dim merged with others (flatten into
    a linear: its column blocks) or split into dims of which exactly one carries the kept set
    (heads)."""
    m = torch.zeros(src.shape[: c.dim + 1], dtype=torch.bool)
    m.index_fill_(c.dim, c.keep, True)
    m = m.reshape(*m.shape, *([1] * (src.dim() - c.dim - 1))).expand(src.shape)
    try:
        mo = m.reshape(out.shape)
    except RuntimeError:
        return None
    for j in range(out.dim()):
        if out.shape[j] == 1:
            continue
        others = [d for d in range(out.dim()) if d != j]
        proj = mo.any(dim=others) if others else mo
        shape = [1] * out.dim()
        shape[j] = out.shape[j]
        if torch.equal(proj.reshape(shape).expand(out.shape), mo):
            keep = proj.nonzero().flatten()
            return Compact(j, keep, out.shape[j])
    return None


def _view_layout(a, n, v):
    c = first(a, n, v)
    if c is None or not len(c.keep):
        # Zero width (every unit pruned) fits any dim of the view and makes a -1 ambiguous:
        # the view gets the full (zero-filled) value.
        return None
    return view_layout(a.value(n.args[0]), v, c)


def _view_shape(em, n, args, kwargs, c):
    """A view/reshape of a compact value: its size along the compact dim is the kept count."""
    shape = list(args[1])
    if not (isinstance(shape[c.dim], int) and shape[c.dim] == -1):
        shape[c.dim] = len(c.keep)
    return (args[0], shape, *args[2:]), kwargs


VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


register_through(*VIEWS, emit=_view_shape)(_view_layout)
register_through(
    aten.flatten.using_ints, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims
)(_view_layout)
