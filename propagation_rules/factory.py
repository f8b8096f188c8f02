"""Factories: outputs made from sizes and scalars, not from input values.

Their outputs are dense (nothing known) unless the fill is exactly zero (zeros, new_zeros,
zeros_like, full(..., 0), scalar_tensor(0)), then entirely pruned. A ``*_like`` / ``new_*``
input is read only for its shape and dtype: none of its elements is used.
"""

from __future__ import annotations

import torch

from sparta.registry import Call, Refined, refine, register_rule

from ._util import full, is_mask, scalar_is_zero

aten = torch.ops.aten

_ZERO = {"zeros", "new_zeros", "zeros_like"}
_FILL = {"full", "new_full", "full_like", "scalar_tensor"}

FACTORIES = [
    getattr(aten, n)
    for n in (
        "arange", "full", "ones", "zeros", "empty", "empty_strided", "rand", "randn", "randint",
        "randperm", "scalar_tensor", "eye", "linspace", "logspace", "full_like", "ones_like",
        "zeros_like", "empty_like", "rand_like", "randn_like", "randint_like", "new_ones",
        "new_zeros", "new_full", "new_empty", "new_empty_strided", "tril_indices",
        "triu_indices",
    )
    if hasattr(aten, n)
]  # fmt: skip


@register_rule(*FACTORIES)
def factory(call: Call) -> Refined:
    name = call.op._schema.name.split("::")[-1]
    fill = call.params.get("fill_value", call.params.get("s"))
    zero = name in _ZERO or (name in _FILL and fill is not None and scalar_is_zero(fill))
    outs = tuple(full(o.shape, False) for o in call.outputs) if zero else None
    unused = {n: full(m.shape, False) for n, m in call.inputs.items() if is_mask(m)}
    return refine(out=outs, **unused)
