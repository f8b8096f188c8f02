"""Planning shrunk nodes: the operands of a kernel on a shrunk weight, the smaller dense call,
convolutions (whole channels, whole groups), and the final compact layout of a plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn.functional as F

from .choice import SHRINK_TIE, Choice, masked_weight, why
from .shrink import CONVS, analyse, conv_args, conv_rows, conv_shrink, linear_out_keep
from .tesa import surviving_pattern
from .timing import compare_ms

if TYPE_CHECKING:
    from .propagate import Propagated


def shrunk_operands(p: Propagated, n: fx.Node, layout: dict, x, w, wm, b):
    """The operands of a kernel on the shrunk weight of linear ``n``: (input, weight, weight
    mask, bias, reads the compact input, pattern), or None when nothing shrinks. Dropping
    output rows keeps any n:m/block pattern; dropping input columns too is done only where the
    pattern survives it, else the kernel reads the full input."""
    out_keep = linear_out_keep(p.result.masks, n).to(x.device)
    src = layout.get(n.args[0])
    narrower = src is not None and src.dim == x.dim() - 1 and len(src.keep) < src.full
    if len(out_keep) == w.shape[0] and not narrower:
        return None
    given = p.pattern_of(n.args[1])
    ws, wms = w[out_keep], wm[out_keep]
    bs = b[out_keep] if b is not None else None
    if narrower and src.fill is None:
        keep = src.keep.to(x.device)
        pat = surviving_pattern(given, wms[:, keep])
        if pat.kind in STRUCTURED:
            return None  # what is left after shrinking is dense: plain shrink covers it
        if pat.kind == given.kind or given.kind not in ("nm", "block"):
            xs = x.index_select(-1, keep)
            return xs, ws[:, keep], wms[:, keep], bs, True, pat
    pat = surviving_pattern(given, wms)
    return None if pat.kind in STRUCTURED else (x, ws, wms, bs, False, pat)


# Patterns whose pruned elements shrinking removes entirely.
STRUCTURED = ("dense", "empty", "row", "column", "channel")


def choose_conv(
    p: Propagated,
    n: fx.Node,
    layout: dict,
    device: torch.device,
    backends: tuple[str, ...],
    device_time: bool,
) -> Choice | None:
    """Dense or shrunk (fewer channels, whole groups) for a convolution; None when nothing
    shrinks."""
    x = p.traced.example[n.args[0]].detach().to(device)
    in_c = layout.get(n.args[0])
    in_c = in_c if in_c is not None and in_c.dim == 1 else None
    s = conv_shrink(n, x, p.result.masks[n], in_c, conv_rows(p.result.masks, n))
    if s is None:
        return None
    w, _, b = masked_weight(p, n, device)
    args = conv_args(n)
    dense_args = {**args, "input": x, "weight": w, "bias": b}
    xc = x.index_select(1, in_c.keep.to(device)) if s.reads_compact else x
    xs = s.compact_input(xc, in_c)
    bs = None if b is None else b[s.out_keep.to(device)]
    small = {**args, "input": xs, "weight": s.weight(w), "bias": bs, "groups": s.groups}
    op = n.target
    t = compare_ms(
        {
            "dense": lambda: op(*dense_args.values()),
            "shrink": lambda: op(s.compact_input(xc, in_c), *list(small.values())[1:]),
        },
        device,
        device_time=device_time,
    )
    allowed = {k: v for k, v in t.items() if k != "dense" or "dense" in backends}
    impl = min(allowed, key=allowed.get)
    if "shrink" in allowed and allowed["shrink"] <= SHRINK_TIE * allowed[impl]:
        impl = "shrink"
    return Choice(impl, t[impl], t["dense"], None, (), t, why(impl, t, allowed, device_time))


def shrunk_call(p, n, layout, x, w, b, act_fn):
    """The smaller dense linear of a shrunk node, timed on compact inputs; None if nothing to
    shrink."""
    out_keep = linear_out_keep(p.result.masks, n).to(x.device)
    src = layout.get(n.args[0])
    narrower = src is not None and src.dim == x.dim() - 1 and len(src.keep) < src.full
    in_keep = src.keep.to(x.device) if narrower else None
    if len(out_keep) == w.shape[0] and in_keep is None:
        return None
    ws = w[out_keep]
    xs = x
    if in_keep is not None:
        ws, xs = ws[:, in_keep], x.index_select(-1, in_keep)
    bs = b[out_keep] if b is not None else None
    return lambda: act_fn(F.linear(xs, ws, bs))


def same_input(c, keep: torch.Tensor) -> bool:
    """Whether a kernel built for the compact input ``keep`` still gets exactly that."""
    return c is not None and c.fill is None and torch.equal(c.keep, keep)


def final_layout(p: Propagated, choices: dict[fx.Node, Choice]) -> dict:
    """The layout of the chosen shrunk nodes. A convolution left with nothing to shrink, or a
    kernel built for a compact input that is no longer compact, once its input's producer runs
    dense, turns dense too."""
    while True:
        shrunk = {n for n, c in choices.items() if c.shrunk}
        layout = analyse(p.traced, p.result.masks, shrunk) if shrunk else {}
        ex, masks = p.traced.example, p.result.masks
        lost = [
            n
            for n in shrunk
            if n.target in CONVS
            and conv_shrink(n, ex[n.args[0]], masks[n], layout.get(n.args[0]), conv_rows(masks, n))
            is None
            or choices[n].reads_compact
            and not same_input(layout.get(n.args[0]), choices[n].in_keep)
        ]
        if not lost:
            return layout
        for n in lost:
            c = choices[n]
            choices[n] = Choice(
                "dense", c.dense_latency_ms, c.dense_latency_ms, None, (), c.candidates,
                "its input's producer runs dense: nothing left to shrink, or not the input "
                "its kernel was built for",
            )  # fmt: skip
