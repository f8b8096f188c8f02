"""Check propagation: zero every pruned element of every tensor; the outputs must not change.

The reference is ``sparta.masked_model``: the user's module with its parameters and inputs
multiplied by the *given* masks through ``named_parameters`` and ``parametrize`` — built from the
module alone, independently of the compiler's tracing and name resolution, so a mask that the
compiler puts on the wrong tensor (a tied weight's other alias, the direction of a
weight_norm) shows up as a difference. The checked run is the traced graph with every
parameter, input and intermediate value multiplied by its *propagated* mask — except values
that can never be zero (``sparta.signs``): those are never forced to zero anywhere, their pruned
elements are computed and unread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from .propagate import Attrs, Propagated, run_propagation
from .reference import masked_model
from .signs import Sign

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class _Masked(fx.Interpreter):
    def __init__(
        self, gm: fx.GraphModule, masks: Mapping[fx.Node, Any], signs: Mapping[fx.Node, Sign]
    ) -> None:
        super().__init__(gm)
        self.masks = masks
        self.signs = signs

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        m = self.masks.get(n)
        sign = self.signs.get(n)
        if sign is not None and Sign.ZERO not in sign:
            return out  # never zero: never forced, pruned elements are only unread
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
        return torch.randn(v.shape, generator=gen, dtype=v.dtype).to(v.device)
    return v


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def masked_outputs(p: Propagated, args: tuple, kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    """Run the traced graph with every propagated mask applied."""
    placeholders = [n for n in p.traced.gm.graph.nodes if n.op == "placeholder"]
    flat = list(args) + [kwargs[n.name] for n in placeholders[len(args) :] if n.name in kwargs]
    with torch.no_grad():
        out = _Masked(p.traced.gm, p.result.masks, p.result.signs).run(*flat)
    return _leaves(out)


def max_violation(
    p: Propagated, reference: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> float:
    """Largest change of any output (relative to its largest magnitude) between the masked
    reference and the traced graph with all propagated masks applied."""
    with torch.no_grad():
        ref = _leaves(reference(*args, **kwargs))
    got = masked_outputs(p, args, kwargs)
    if len(ref) != len(got):
        raise AssertionError(
            f"the traced graph returns {len(got)} tensors, the model {len(ref)}: the trace does "
            f"not compute the model's function."
        )
    worst = 0.0
    for r, g in zip(ref, got):
        if tuple(r.shape) != tuple(g.shape):
            return float("inf")
        if not r.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(r, g.to(r.device)) else float("inf"))
            continue
        g = g.to(r.device, r.dtype)
        if not bool((r.isfinite() == g.isfinite()).all()):
            return float("inf")
        finite = r.isfinite()
        scale = r[finite].abs().max().item() if bool(finite.any()) else 1.0
        diff = (r - g)[finite].abs().max().item() if bool(finite.any()) else 0.0
        worst = max(worst, diff / (scale or 1.0))
    return worst


def check_soundness(
    model: torch.nn.Module,
    attrs: Attrs,
    example_inputs: Any,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    trials: int = 2,
    seed: int = 0,
    strict: bool = True,
) -> float:
    """Propagate, then verify on the example and on fresh random float inputs of the same
    shapes that the traced graph with every propagated mask applied computes what
    ``sparta.masked_model(model, attrs)`` computes. Returns the worst relative deviation;
    raises AssertionError past the dtype's tolerance."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    # The check runs the example's shapes only: a static export is enough, and faster.
    p = run_propagation(
        model, attrs, example_inputs, example_kwargs=kwargs, strict=strict, dynamic=False
    )
    reference = masked_model(model, attrs).eval()
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for t in range(trials + 1):
        args = example_inputs if t == 0 else tuple(_fresh_like(v, gen) for v in example_inputs)
        kw = kwargs if t == 0 else {k: _fresh_like(v, gen) for k, v in kwargs.items()}
        worst = max(worst, max_violation(p, reference, args, kw))
    params = [p.traced.example[n] for n in p.traced.params.values()]
    dtype = next((v.dtype for v in params if v.is_floating_point()), torch.float32)
    tol = TOLERANCE.get(dtype, 1e-4)
    if worst > tol:
        raise AssertionError(
            f"propagation is unsound: the traced graph with the propagated masks applied differs "
            f"from the masked model (sparta.masked_model) by {worst:.3g} (relative), "
            f"tolerance {tol:g}."
        )
    return worst
