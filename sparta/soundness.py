"""Check propagation: zero every pruned element of every tensor; the outputs must not change.

The reference is the model with the *given* masks applied (parameters and inputs), as the
contract defines it. The checked run multiplies every parameter, input and intermediate
value of the traced graph by its *propagated* mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from .propagate import Attrs, Propagated, run_propagation

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class _Masked(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, masks: Mapping[fx.Node, Any]) -> None:
        super().__init__(gm)
        self.masks = masks

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        m = self.masks.get(n)
        if (
            isinstance(out, torch.Tensor)
            and isinstance(m, torch.Tensor)
            and out.is_floating_point()
        ):
            return out * m.to(out.device)
        if isinstance(out, (tuple, list)) and isinstance(m, tuple):
            return type(out)(
                o * mm
                if isinstance(o, torch.Tensor) and mm is not None and o.is_floating_point()
                else o
                for o, mm in zip(out, m)
            )
        return out


def _fresh_like(v: Any, gen: torch.Generator) -> Any:
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return torch.randn(v.shape, generator=gen, dtype=v.dtype)
    return v


def masked_outputs(p: Propagated, inputs: tuple, *, propagated: bool) -> list[torch.Tensor]:
    """Run the traced graph with the given (or all propagated) masks applied."""
    masks = p.result.masks if propagated else p.given_nodes
    placeholders = [n for n in p.traced.gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        out = _Masked(p.traced.gm, masks).run(*inputs[: len(placeholders)])
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def max_violation(p: Propagated, inputs: tuple) -> float:
    """Largest relative change of any output when all propagated masks are applied."""
    ref = masked_outputs(p, inputs, propagated=False)
    got = masked_outputs(p, inputs, propagated=True)
    worst = 0.0
    for r, g in zip(ref, got):
        if not r.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(r, g) else float("inf"))
            continue
        scale = r.abs().max().item() or 1.0
        worst = max(worst, ((r - g).abs().max().item()) / scale)
    return worst


def check_soundness(
    model: torch.nn.Module,
    attrs: Attrs,
    example_inputs: Any,
    *,
    trials: int = 2,
    seed: int = 0,
    strict: bool = True,
) -> float:
    """Propagate, then verify on the example and on fresh random float inputs of the same
    shapes that zeroing every pruned element leaves the outputs unchanged. Returns the worst
    relative deviation; raises AssertionError past the dtype's tolerance."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    p = run_propagation(model, attrs, example_inputs, strict=strict)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for t in range(trials + 1):
        inputs = example_inputs if t == 0 else tuple(_fresh_like(v, gen) for v in example_inputs)
        worst = max(worst, max_violation(p, inputs))
    params = [p.traced.example[n] for n in p.traced.params.values()]
    dtype = next((v.dtype for v in params if v.is_floating_point()), torch.float32)
    tol = TOLERANCE.get(dtype, 1e-4)
    if worst > tol:
        raise AssertionError(
            f"propagation is unsound: zeroing the propagated masks changed the outputs by "
            f"{worst:.3g} (relative), tolerance {tol:g}."
        )
    return worst
