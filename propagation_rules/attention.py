"""Attention: softmax, scaled_dot_product_attention, masked_fill, where.

softmax never gives a known zero from input zeros (exp(0) = 1); backward, the whole row of the
input is used if any output of that row is kept.

scaled_dot_product_attention, with P = softmax(q k^T * scale + mask) and out = P v:
* P[l, s] is known zero only where a known mask excludes it (is_causal, a pruned or constant-False
  boolean mask, a constant -inf float mask) and the row keeps some key;
* out[l, d] is zero unless some unmasked s has v[s, d] kept (a head whose V is pruned gives
  zeros);
* v[s, d] is used iff some kept out[l, d] sees s;
* a query row is used iff it has a kept output that can be nonzero; then q[l, e] is used iff
  some key it sees has k[s, e] kept, and k[s, e] iff some used row that sees s has q[l, e] kept
  (a head whose output is unused makes its Q, K and V unused);
* the attention mask is used where its row is used.
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Mask, Refined, refine, register_rule
from sparta.shrink_ops import register_through

from ._util import broadcast_back, broadcast_fwd, full, is_mask, scalar_is_zero

aten = torch.ops.aten


def _bmm(a: Mask, b: Mask) -> Mask:
    """Boolean matmul with broadcasting: (a @ b)[i, j] = any_k a[i, k] & b[k, j]."""
    f32 = torch.float32  # converted from uint8: from bool it is ~20x slower (sparta.tesa.any_)
    return torch.matmul(a.view(torch.uint8).to(f32), b.view(torch.uint8).to(f32)) > 0


@register_rule(
    *[getattr(aten, n) for n in ("softmax", "_softmax", "log_softmax", "_log_softmax",
                                 "_safe_softmax", "special_softmax", "special_log_softmax")
      if hasattr(aten, n)]
)  # fmt: skip
def softmax(call: Call) -> Refined:
    x = call.inputs["self"]
    dim = call.params["dim"] % max(x.dim(), 1)
    row = call.out.any(dim=dim, keepdim=True).expand(x.shape) if x.dim() else call.out
    return refine(self=row)


def _cond_sets(call: Call, name: str, shape: torch.Size) -> tuple[Mask, Mask]:
    """(may be True, may be False) of a boolean condition, broadcast to ``shape``. A pruned
    condition element is known False; a constant one is known exactly."""
    m = call.inputs.get(name)
    if not is_mask(m):
        v = call.params.get(name)
        t = full(shape, bool(v)) if v is not None else full(shape, True)
        return t, ~t if v is not None else full(shape, True)
    if name in call.consts:
        true = broadcast_fwd(m & call.consts[name].to(torch.bool), shape)
        return true, ~true
    return broadcast_fwd(m, shape), full(shape, True)


def _value_nz(call: Call, name: str, shape: torch.Size) -> Mask:
    m = call.inputs.get(name)
    if is_mask(m):
        return broadcast_fwd(m, shape)
    return full(shape, not scalar_is_zero(call.params.get(name)))


def _select(call: Call, cond: str, a: str, b: str) -> Refined:
    """out = cond ? a : b."""
    out = call.out
    may_t, may_f = _cond_sets(call, cond, out.shape)
    a_nz, b_nz = _value_nz(call, a, out.shape), _value_nz(call, b, out.shape)
    fwd = (may_t & a_nz) | (may_f & b_nz)
    back = {
        a: out & may_t,
        b: out & may_f,
        # If both sides are zero the choice does not matter. Where this rule claims a zero that
        # rests on the choice, the condition stays used even if the output is not: pruning it
        # (forcing False) would pick the other side and break the claim.
        cond: (out | ~fwd) & (a_nz | b_nz),
    }
    back = {n: broadcast_back(v, call.inputs[n].shape) for n, v in back.items()
            if is_mask(call.inputs.get(n))}  # fmt: skip
    return refine(out=fwd, **back)


@register_rule(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def where(call: Call) -> Refined:
    return _select(call, "condition", "self", "other")


@register_rule(aten.masked_fill)
def masked_fill(call: Call) -> Refined:
    """out = mask ? value : self. Filled positions make the input unused there; the output is
    pruned where (value == 0 and mask may be True) or (self pruned and mask may be False)."""
    return _select(call, "mask", "value", "self")


def _gqa(m: Mask, hq: int) -> Mask:
    """Repeat K/V heads (dim -3) to the query heads, as enable_gqa does."""
    hk = m.shape[-3]
    return m if hk == hq else m.repeat_interleave(hq // hk, dim=-3)


def _gqa_back(m: Mask, hk: int) -> Mask:
    hq = m.shape[-3]
    if hk == hq:
        return m
    return m.reshape(*m.shape[:-3], hk, hq // hk, *m.shape[-2:]).any(dim=-3)


def _probs_nz(call: Call, shape: torch.Size) -> Mask:
    """Where softmax(q k^T + mask) can be nonzero, shape (..., L, S)."""
    L, S = shape[-2], shape[-1]
    p = full(shape, True)
    if call.params.get("is_causal"):
        p = p & torch.ones(L, S, dtype=torch.bool).tril()
    m = call.inputs.get("attn_mask")
    if is_mask(m):
        const = call.consts.get("attn_mask")
        if const is not None and const.dtype == torch.bool:
            p = p & broadcast_fwd(m & const, shape)
        elif const is not None:
            p = p & broadcast_fwd(~(m & torch.isneginf(const)), shape)
        elif call.dtypes.get("attn_mask") == torch.bool:
            p = p & broadcast_fwd(m, shape)  # a pruned boolean mask element is False
    # A row with every key masked gives NaN or zeros depending on the kernel: claim nothing.
    return p | ~p.any(dim=-1, keepdim=True)


@register_rule(aten.scaled_dot_product_attention)
def sdpa(call: Call) -> Refined:
    q, k, v, out = call.inputs["query"], call.inputs["key"], call.inputs["value"], call.out
    hq = q.shape[-3] if q.dim() >= 3 else 1
    kx = _gqa(k, hq) if call.params.get("enable_gqa") and k.dim() >= 3 else k
    vx = _gqa(v, hq) if call.params.get("enable_gqa") and v.dim() >= 3 else v
    batch = torch.broadcast_shapes(q.shape[:-2], kx.shape[:-2], vx.shape[:-2])
    L, S = q.shape[-2], kx.shape[-2]
    q_, k_, v_ = (broadcast_fwd(t, batch + t.shape[-2:]) for t in (q, kx, vx))
    p = _probs_nz(call, batch + (L, S))
    fwd = _bmm(p, v_)
    row = (out & fwd).any(dim=-1, keepdim=True)  # (..., L, 1): this query row matters
    used_p = p & row
    v_used = _bmm(used_p.transpose(-1, -2), out)
    if scalar_is_zero(call.params.get("scale")):  # scores are all zero: q and k are not read
        q_used, k_used = full(q_.shape, False), full(k_.shape, False)
    else:
        q_used = _bmm(used_p, k_)
        k_used = _bmm(used_p.transpose(-1, -2), q_)
    if call.params.get("enable_gqa") and k.dim() >= 3:
        k_used, v_used = _gqa_back(k_used, k.shape[-3]), _gqa_back(v_used, v.shape[-3])
    back = {
        "query": broadcast_back(q_used, q.shape),
        "key": broadcast_back(k_used, k.shape),
        "value": broadcast_back(v_used, v.shape),
    }
    m = call.inputs.get("attn_mask")
    if is_mask(m) and call.dtypes.get("attn_mask") != torch.bool:
        # An additive mask is used where its row is. A boolean one is kept whole: pruning it
        # (forcing False) could mask every key of a row, which gives NaN.
        back["attn_mask"] = broadcast_back(row.expand(batch + (L, S)), m.shape)
    return refine(out=fwd, **back)


# --- Compact layout (shrink: sparta/shrink_ops.py) ----------------------------------------


def _sdpa_layout(a, n, v):
    """A pruned head disappears: q, k and v compact alike along the head dim, and an attention
    mask that is the same for every head."""
    q, k, vv = n.args[:3]
    c = a.layout.get(q)
    attn_mask = n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
    mask_ok = attn_mask is None or (
        attn_mask not in a.layout and _broadcasts_over_heads(a.value(attn_mask))
    )
    same = c is not None and c.same(a.layout.get(k)) and c.same(a.layout.get(vv))
    return c if same and c.dim == v.dim() - 3 and mask_ok else None


def _broadcasts_over_heads(mask: torch.Tensor) -> bool:
    """An attention mask of shape (..., [H,] L, S) that is the same for every head."""
    return mask.dim() < 3 or mask.shape[-3] == 1


register_through(aten.scaled_dot_product_attention.default)(_sdpa_layout)
