"""Normalisations: layer_norm, batch_norm (all its ATen variants), instance_norm, group_norm,
rms_norm, and weight normalisation (_weight_norm).

A normalisation subtracts a statistic of a whole group (a token's features for layer_norm, a
channel for batch_norm in training), so one pruned input element does not make its output zero:
an output is zero only when the scale is pruned or the whole group is pruned — and then only if
the shift (affine bias) is pruned or absent too. Backward couples the group: an input element is
used if any output of its group is kept through a kept scale. Weight/bias elements are used per
normalised feature. Batch norm in eval is a per-channel affine map and stays elementwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule
from sparta.shrink_ops import aten_op, channel_src, register_through, slice_params

from ._util import full, is_mask, scalar_is_zero

aten = torch.ops.aten

Expand = Callable[[Mask], Mask]  # a per-feature mask -> the input's shape
Reduce = Callable[[Mask], Mask]  # an input-shaped mask -> per feature (any)


def _group_norm_masks(
    x: Mask,
    out: Mask,
    red: tuple[int, ...],
    w: Mask | None,
    b: Mask | None,
    expand: Expand,
    reduce: Reduce,
) -> tuple[Mask, Mask, Mask | None, Mask | None, Mask]:
    """(out, x used, weight used, bias used, group nonzero) for out = norm(x) * w + b, where the
    statistics are taken over dims ``red`` of x."""
    gnz = x.any(dim=red, keepdim=True).expand(x.shape)
    wnz = expand(w) if w is not None else full(x.shape, True)
    fwd = wnz & gnz
    if b is not None:
        fwd = fwd | expand(b)
    x_used = (out & wnz).any(dim=red, keepdim=True).expand(x.shape)
    w_used = reduce(out & gnz) if w is not None else None
    b_used = reduce(out) if b is not None else None
    return fwd, x_used, w_used, b_used, gnz


def _opt(call: Call, name: str) -> Mask | None:
    m = call.inputs.get(name)
    return m if is_mask(m) else None


@register_rule(aten.layer_norm, aten.native_layer_norm)
def layer_norm(call: Call) -> Refined:
    """Normalised over the trailing ``normalized_shape`` dims; (out, mean, rstd) for native."""
    x = call.inputs["input"]
    k = len(call.params["normalized_shape"])
    red = tuple(range(x.dim() - k, x.dim()))
    lead = tuple(range(x.dim() - k))
    out = call.outputs[0]
    stats_used = None
    if len(call.outputs) == 3:  # native: mean and rstd of each group are outputs too
        stats_used = (call.outputs[1] | call.outputs[2]).reshape(x.shape[:-k] + (1,) * k)
    fwd, x_used, w_used, b_used, gnz = _group_norm_masks(
        x, out, red, _opt(call, "weight"), _opt(call, "bias"),
        expand=lambda m: m.expand(x.shape), reduce=lambda m: m.any(dim=lead) if lead else m,
    )  # fmt: skip
    if stats_used is not None:
        x_used = x_used | stats_used.expand(x.shape)
        mean_nz = gnz[(...,) + (slice(0, 1),) * k].reshape(call.outputs[1].shape)
        outs: Mask | tuple = (fwd, mean_nz, None)
    else:
        outs = fwd
    return refine(out=outs, input=x_used, weight=w_used, bias=b_used)


@register_rule(aten.rms_norm) if hasattr(aten, "rms_norm") else (lambda f: f)
def rms_norm(call: Call) -> Refined:
    """x * rsqrt(mean(x^2) + eps) * w: zero where x or w is pruned; backward couples the group."""
    x, out, w = call.inputs["input"], call.out, _opt(call, "weight")
    k = len(call.params["normalized_shape"])
    red = tuple(range(x.dim() - k, x.dim()))
    wnz = w.expand(x.shape) if w is not None else full(x.shape, True)
    fwd = x & wnz
    x_used = (out & wnz & x).any(dim=red, keepdim=True).expand(x.shape)
    w_used = (out & x).any(dim=tuple(range(x.dim() - k))) if w is not None else None
    return refine(out=fwd, input=x_used, weight=w_used)


def _per_channel(x: Mask) -> tuple[Expand, Reduce, tuple[int, ...]]:
    """Channel dim 1 (dim 0 for an unbatched 1-D/2-D input is not supported by ATen)."""
    shape = [1] * x.dim()
    shape[1] = x.shape[1]
    others = tuple(d for d in range(x.dim()) if d != 1)
    return (lambda m: m.reshape(shape).expand(x.shape)), (lambda m: m.any(dim=others)), others


_BN_TRAINING_ARG = {
    "batch_norm": "training",
    "native_batch_norm": "training",
    "_native_batch_norm_legit": "training",
    "_native_batch_norm_legit_functional": "training",
    "_native_batch_norm_legit_no_training": None,
    "instance_norm": "use_input_stats",
    "cudnn_batch_norm": "training",
    "miopen_batch_norm": "training",
}


@register_rule(*[getattr(aten, n) for n in _BN_TRAINING_ARG if hasattr(aten, n)])
def batch_norm(call: Call) -> Refined:
    """Eval: (x - mean[c]) * rsqrt(var[c] + eps) * w[c] + b[c], elementwise per channel.
    Training: batch statistics per channel, a group norm over every dim but the channel's.
    Extra outputs (saved statistics, updated running stats) are left as they are."""
    name = call.op._schema.name.split("::")[-1]
    flag = _BN_TRAINING_ARG[name]
    training = bool(call.params.get(flag)) if flag else False
    x, out = call.inputs["input"], call.outputs[0]
    expand, reduce, others = _per_channel(x)
    if name == "instance_norm" and training:
        others = tuple(range(2, x.dim()))  # statistics per sample and channel
    w, b = _opt(call, "weight"), _opt(call, "bias")
    extra = (None,) * (len(call.outputs) - 1)
    if training or _opt(call, "running_mean") is None:
        fwd, x_used, w_used, b_used, _ = _group_norm_masks(x, out, others, w, b, expand, reduce)
        if any(bool(o.any()) for o in call.outputs[1:] if o.numel()):
            x_used = None  # batch statistics are read (saved or updated running stats)
        return refine(out=(fwd, *extra), input=x_used, weight=w_used, bias=b_used)
    rm = _opt(call, "running_mean")
    rm_nz = rm if "running_mean" not in call.consts else rm & (call.consts["running_mean"] != 0)
    wnz = expand(w) if w is not None else full(x.shape, True)
    centred = x | expand(rm_nz)  # x - mean[c] can be nonzero
    fwd = centred & wnz
    if b is not None:
        fwd = fwd | expand(b)
    ch_used = reduce(out)
    scaled_used = reduce(out & wnz & centred)  # var[c] matters only where (x - mean) * w != 0
    eps = call.params.get("eps", 1e-5)
    return refine(
        out=(fwd, *extra),
        input=out & wnz,
        weight=reduce(out & centred) if w is not None else None,
        bias=ch_used if b is not None else None,
        running_mean=reduce(out & wnz),
        # var pruned to zero gives rsqrt(eps): finite only for eps > 0
        running_var=(scaled_used if not scalar_is_zero(eps) and eps > 0 else None),
    )


@register_rule(aten.group_norm, aten.native_group_norm)
def group_norm(call: Call) -> Refined:
    """Statistics over (channels of a group) x spatial, per sample; affine per channel."""
    x, out = call.inputs["input"], call.outputs[0]
    g = call.params.get("num_groups", call.params.get("group"))
    n = x.shape[0]
    expand, reduce, _ = _per_channel(x)

    def grouped(m: Mask) -> Mask:
        return m.reshape(n, g, -1)

    gx, gout = grouped(x), grouped(out)
    w, b = _opt(call, "weight"), _opt(call, "bias")
    wnz = expand(w) if w is not None else full(x.shape, True)
    gnz = gx.any(dim=2, keepdim=True).expand(gx.shape).reshape(x.shape)
    fwd = wnz & gnz
    if b is not None:
        fwd = fwd | expand(b)
    x_used = grouped(out & wnz).any(dim=2, keepdim=True).expand(gout.shape).reshape(x.shape)
    extra: tuple = ()
    if len(call.outputs) == 3:  # native: (out, mean, rstd) of shape (N, G)
        stats = (call.outputs[1] | call.outputs[2]).reshape(n, g, 1)
        x_used = x_used | stats.expand(gx.shape).reshape(x.shape)
        extra = (gx.any(dim=2).reshape(call.outputs[1].shape), None)
    return refine(
        out=(fwd, *extra) if extra else fwd,
        input=x_used,
        weight=reduce(out & gnz) if w is not None else None,
        bias=reduce(out) if b is not None else None,
    )


@register_rule(aten._weight_norm, aten._weight_norm_interface)
def weight_norm(call: Call) -> Refined:
    """w = v * g / ||v|| with the norm over every dim but ``dim`` (all dims for dim=-1); the
    interface also returns the norms. A slice of v that is entirely zero gives 0 / 0 = NaN, so
    nothing is claimed there, and v is never pruned backward: its every element enters the
    norm, and pruning a slice whose outputs are unused would still turn them into NaN. g[s] is
    used where slice s has a kept output."""
    v, g = call.inputs["v"], call.inputs["g"]
    dim = call.params.get("dim", 0)
    red = (
        tuple(range(v.dim()))
        if dim == -1
        else tuple(d for d in range(v.dim()) if d != dim % v.dim())
    )
    slice_nz = v.any(dim=red, keepdim=True) if red else v
    g_k = (
        g.reshape(slice_nz.shape)
        if g.numel() == slice_nz.numel()
        else g.any().expand(slice_nz.shape)
    )
    fwd = (v & g_k) | ~slice_nz
    out = call.outputs[0]
    g_used = out.any(dim=red, keepdim=True) if red else out
    outs: Mask | tuple = fwd
    if len(call.outputs) == 2:
        outs = (fwd, slice_nz.reshape(call.outputs[1].shape))
    return refine(out=outs, g=g_used.reshape(g.shape) if g.numel() == g_used.numel() else None)


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


register_through(
    aten.batch_norm.default,
    aten.instance_norm.default,
    aten_op("_native_batch_norm_legit_no_training", "default"),
    emit=slice_params(1, 2, 3, 4),
)(channel_src)


def _group_norm_layout(a, n, v):
    """Whole groups only: a group's statistics see all its channels."""
    c = channel_src(a, n, v)
    if c is None:
        return None
    per = c.full // n.args[1]
    groups = torch.unique(c.keep // per)
    whole = (groups[:, None] * per + torch.arange(per)).flatten()
    return c if torch.equal(whole, c.keep) else None


def _group_norm_emit(em, n, args, kwargs, c):
    per = c.full // n.args[1]
    args, kwargs = slice_params(2, 3)(em, n, args, kwargs, c)
    return (args[0], len(c.keep) // per, *args[2:]), kwargs


register_through(aten.group_norm.default, emit=_group_norm_emit)(_group_norm_layout)
