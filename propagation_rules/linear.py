"""Matrix products: linear, mm, bmm, matmul, addmm, baddbmm, addmv, einsum, dot.

An output element can be nonzero iff some product term has both factors kept, or its bias can be
nonzero (a pruned weight row with a kept bias keeps its output feature alive). Backward: an
input element is used iff it meets a kept output through a kept factor; a bias element is used
iff any output it is added to is kept. Computed exactly by running the product on 0/1 masks
(see ``_util.nonneg_masks``).
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule

from ._util import (
    Facts,
    bool_mm,
    broadcast_back,
    broadcast_fwd,
    full,
    is_mask,
    nonneg_masks,
    scalar_is_zero,
)

aten = torch.ops.aten


def _with_bias(
    call: Call, term: Mask | None, back: dict[str, Mask], bias: str, beta: object = 1
) -> Refined:
    """Combine the product's masks with an additive bias broadcast to the output."""
    b = call.inputs.get(bias)
    out = call.out
    if not is_mask(b):
        return refine(out=term, **back)
    if scalar_is_zero(beta):
        return refine(out=term, **back, **{bias: full(b.shape, False)})
    fwd = term | broadcast_fwd(b, out.shape) if term is not None else None
    return refine(out=fwd, **back, **{bias: broadcast_back(out, b.shape)})


def _mm_masks(x: Mask, w: Mask, out: Mask) -> tuple[Mask, Mask, Mask]:
    """y = x @ w for x (..., K), w (K, N): (forward, x used, w used), exact."""
    k, n = w.shape
    x2, o2 = x.reshape(-1, k), out.reshape(-1, n)
    fx, fw, fo = Facts(x2), Facts(w), Facts(o2)  # each structure test runs once
    fwd = bool_mm(x2, w, fx, fw).reshape(out.shape)
    x_used = bool_mm(o2, w.t(), fo, fw.t()).reshape(x.shape)
    w_used = bool_mm(x2.t(), o2, fx.t(), fo)
    return fwd, x_used, w_used


@register_rule(aten.linear)
def linear(call: Call) -> Refined:
    """y = x @ W^T + b with W (out_features, in_features)."""
    x, w = call.inputs["input"], call.inputs["weight"]
    if w.dim() != 2 or x.dim() < 1:
        term, back = nonneg_masks(aten.linear.default, call, ("input", "weight"),
                                  override={"bias": None})  # fmt: skip
        return _with_bias(call, term, back, "bias")
    fwd, x_used, wt_used = _mm_masks(x, w.t(), call.out)
    return _with_bias(call, fwd, {"input": x_used, "weight": wt_used.t()}, "bias")


@register_rule(aten.mm, aten.bmm, aten.matmul, aten.dot, aten.mv, aten.vdot, aten.inner,
               aten.outer, aten.ger)  # fmt: skip
def matmul(call: Call) -> Refined:
    names = tuple(n for n, m in call.inputs.items() if is_mask(m))
    term, back = nonneg_masks(call.op, call, names)
    return refine(out=term, **back)


_ADD_PRODUCTS = {
    "addmm": ("mat1", "mat2", torch.mm),
    "baddbmm": ("batch1", "batch2", torch.bmm),
    "addmv": ("mat", "vec", torch.mv),
    "addbmm": ("batch1", "batch2", lambda x, y: torch.bmm(x, y).sum(0)),
    "addr": ("vec1", "vec2", torch.outer),
}


@register_rule(aten.addmm, aten.baddbmm, aten.addmv, aten.addbmm, aten.addr)
def add_product(call: Call) -> Refined:
    """beta * self + alpha * (a @ b); GPT-2's Conv1D is addmm(bias, x, W) with W (in, out).
    beta == 0 drops self (ATen ignores it, even NaN); alpha == 0 drops the product."""
    a, b, product = _ADD_PRODUCTS[call.op._schema.name.split("::")[-1]]
    if scalar_is_zero(call.params.get("alpha", 1)):
        term = full(call.out.shape, False)
        back = {n: full(call.inputs[n].shape, False) for n in (a, b)}
    elif product is torch.mm:
        term, a_used, b_used = _mm_masks(call.inputs[a], call.inputs[b], call.out)
        back = {a: a_used, b: b_used}
    else:
        term, back = nonneg_masks(lambda **kw: product(kw[a], kw[b]), call, (a, b))
    return _with_bias(call, term, back, "self", call.params.get("beta", 1))


@register_rule(aten.einsum)
def einsum(call: Call) -> Refined:
    """A multilinear product of its operands: exact on 0/1 masks."""
    masks = call.inputs["tensors"]
    if not all(is_mask(m) for m in masks):
        return Refined()
    eq = call.params["equation"]
    with torch.inference_mode(False), torch.enable_grad():
        leaves = [m.to(torch.float32, copy=True).requires_grad_(True) for m in masks]
        y = torch.einsum(eq, *leaves)
        grads = torch.autograd.grad((y * call.out.to(y.dtype)).sum(), leaves, allow_unused=True)
    back = tuple(g > 0 if g is not None else full(m.shape, False) for g, m in zip(grads, masks))
    return refine(out=y.detach() > 0, tensors=back)
