"""Check a propagation rule on random data: is what it claims true?

``check_rule(op, args, kwargs, input_masks=..., used=...)`` builds the ``Call`` a rule sees,
runs the registered rule, and tests both of its claims on fresh random inputs (never zeros):

* forward: every output element the rule prunes is exactly zero when the inputs are
  multiplied by their given masks (and still when also multiplied by the rule's input masks);
* backward: multiplying the inputs further by the rule's refined input masks changes no output
  element that is kept both in ``used`` and in the rule's output mask.

A failure raises ``AssertionError`` naming the op, the argument and a failing index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .calls import bound_arguments, check_refined, make_call, tensor_arg_names
from .registry import Call, Mask, Refined, lookup
from .signs import Sign

__all__ = ["DEFAULT_SAMPLERS", "TOLERANCE", "check_rule", "positive", "run_rule"]

# (rtol, atol) by dtype, for comparing outputs before and after pruning what a rule says is unused.
TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}

Sampler = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def positive(v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Values in [0.5, 1.5): for variances and other arguments that must be positive."""
    return (torch.rand(v.shape, generator=gen, dtype=torch.float64) + 0.5).to(v.dtype)


# Arguments that must be positive for the op to be finite, by schema name.
DEFAULT_SAMPLERS: dict[str, Sampler] = {"running_var": positive}


def _sampler_for(sign: Sign) -> Sampler | None:
    """Random values within a value-range fact (never zero where zero is excluded)."""
    if sign == Sign.POS:
        return positive
    if sign == Sign.NEG:
        return lambda v, gen: -positive(v, gen)
    if int(sign) & ~int(Sign.ZERO | Sign.POS) == 0:
        return lambda v, gen: positive(v, gen) - 0.5  # [0, 1)
    return None


def _flatten_out(y: Any) -> tuple[torch.Tensor | None, ...]:
    if y is None:
        return ()
    if isinstance(y, torch.Tensor):
        return (y,)
    return tuple(v if isinstance(v, torch.Tensor) else None for v in y)


def _as_masks(value: Any, given: Any) -> Any:
    """The mask(s) of one tensor (or tensor-list) argument: given, or all kept."""
    if isinstance(value, (list, tuple)):
        given = given if given is not None else (None,) * len(value)
        return tuple(_as_masks(v, g) for v, g in zip(value, given))
    if not isinstance(value, torch.Tensor):
        return None
    if given is None:
        return torch.ones(value.shape, dtype=torch.bool)
    if tuple(given.shape) != tuple(value.shape) or given.dtype != torch.bool:
        raise ValueError(
            f"mask of shape {tuple(given.shape)} / {given.dtype} does not fit an argument of "
            f"shape {tuple(value.shape)}; masks are bool tensors of the argument's shape."
        )
    return given


def run_rule(
    op: Any,
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    *,
    input_masks: Mapping[str, Any] | None = None,
    used: Mask | tuple[Mask, ...] | None = None,
    const_args: Iterable[str] = (),
    signs: Mapping[str, Sign] | None = None,
) -> tuple[Call, Refined]:
    """Build the Call from example args and masks, run the registered rule, validate shapes.
    ``signs``: value-range facts of inputs by schema name (``call.signs``)."""
    kwargs = dict(kwargs or {})
    entry = lookup(op)
    if entry is None:
        raise AssertionError(f"no rule registered for {op}")
    bound = bound_arguments(op, args, kwargs)
    names = tensor_arg_names(op)
    masks = {n: _as_masks(bound[n], (input_masks or {}).get(n)) for n in names}
    by_id: dict[int, Mask | None] = {}
    for n in names:
        vals, ms = bound[n], masks[n]
        if isinstance(vals, (list, tuple)):
            for v, m in zip(vals, ms):
                by_id[id(v)] = m
        elif isinstance(vals, torch.Tensor):
            by_id[id(vals)] = ms
    consts = {id(bound[n]): bound[n] for n in const_args}
    sign_of = {id(bound[n]): s for n, s in (signs or {}).items()}
    with torch.no_grad():
        outs = _flatten_out(op(*args, **kwargs))
    if used is None:
        out_masks = tuple(
            torch.ones(o.shape, dtype=torch.bool) if o is not None else None for o in outs
        )
    else:
        out_masks = used if isinstance(used, tuple) else (used,)
    call = make_call(
        op,
        args,
        kwargs,
        out_masks,
        mask_of=lambda v: by_id.get(id(v)) if isinstance(v, torch.Tensor) else None,
        const_of=lambda v: consts.get(id(v)),
        out_dtypes=tuple(getattr(o, "dtype", None) for o in outs),
        signs_of=lambda v: sign_of.get(id(v)),
    )
    refined = entry.fn(call)
    check_refined(call, refined, entry.name)
    return call, refined


def _sample(v: Any, mask: Any, gen: torch.Generator, sampler: Sampler | None) -> Any:
    """A fresh random value for a float tensor (never zero), the given value otherwise, times
    the mask."""
    if isinstance(v, (list, tuple)):
        return [_sample(x, m, gen, sampler) for x, m in zip(v, mask)]
    if not isinstance(v, torch.Tensor):
        return v
    if v.is_floating_point():
        if sampler is not None:
            x = sampler(v, gen)
        else:
            x = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype)
            x = torch.where(x == 0, torch.ones_like(x), x)
    else:
        x = v.clone()
    return _apply(x, mask)


def _apply(x: Any, mask: Any) -> Any:
    if isinstance(x, list):
        return [_apply(a, m) for a, m in zip(x, mask)]
    if not isinstance(x, torch.Tensor) or mask is None:
        return x
    return x & mask if x.dtype == torch.bool else x * mask.to(x.dtype)


def _first_index(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _run(op: Any, bound: dict[str, Any], seed: int) -> tuple:
    torch.manual_seed(seed)  # ops that draw random numbers (dropout) draw the same ones
    pos, kw = [], {}
    for a in op._schema.arguments:
        (kw.__setitem__(a.name, bound[a.name]) if a.kwarg_only else pos.append(bound[a.name]))
    with torch.no_grad():
        return _flatten_out(op(*pos, **kw))


def check_rule(
    op: Any,
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    *,
    input_masks: Mapping[str, Any] | None = None,
    used: Mask | tuple[Mask, ...] | None = None,
    trials: int = 3,
    seed: int = 0,
    const_args: Iterable[str] = (),
    samplers: Mapping[str, Sampler] | None = None,
    signs: Mapping[str, Sign] | None = None,
) -> Refined:
    """Check the registered rule of ``op`` on ``trials`` random draws; return what it refined.

    ``const_args`` names inputs whose example values the rule may see (``call.consts``); they,
    like integer and bool tensors, keep their given values. ``samplers`` draws a float argument
    differently (e.g. a positive running variance). ``signs`` gives inputs value-range facts
    (``call.signs``); such an input is drawn within its facts, and — as in a model, where a
    value that can never be zero is never forced to zero — it is not multiplied by its masks.
    """
    const_args = tuple(const_args)
    signs = dict(signs or {})
    call, refined = run_rule(
        op, args, kwargs, input_masks=input_masks, used=used, const_args=const_args, signs=signs
    )
    kwargs = dict(kwargs or {})
    bound = bound_arguments(op, args, kwargs)
    names = tensor_arg_names(op)
    rule_in = dict(refined.inputs)
    gen = torch.Generator().manual_seed(seed)
    outs_used = call.outputs
    for t in range(trials):
        base = dict(bound)
        for n in names:
            if n in const_args:
                base[n] = _apply(bound[n], call.inputs[n])
            else:
                s = {**DEFAULT_SAMPLERS, **(samplers or {})}.get(n)
                if n in signs and Sign.ZERO not in signs[n]:
                    s = s or _sampler_for(signs[n])
                    base[n] = _sample(bound[n], None, gen, s)  # never zero: never forced
                    continue
                s = s or (_sampler_for(signs[n]) if n in signs else None)
                base[n] = _sample(bound[n], call.inputs[n], gen, s)
        y0 = _run(op, base, seed + t)
        both = dict(base)
        for n, m in rule_in.items():
            if n in signs and Sign.ZERO not in signs[n]:
                continue  # pruned means unread here: it stays as computed
            both[n] = _apply(base[n], m)
        y1 = _run(op, both, seed + t)
        for i, (a, b) in enumerate(zip(y0, y1)):
            if a is None:
                continue
            fwd = refined.outputs[i] if i < len(refined.outputs) else None
            if fwd is not None:
                for tag, y in (("given", a), ("given and refined", b)):
                    bad = ~fwd & (y != 0)
                    if bool(bad.any()):
                        idx = _first_index(bad)
                        raise AssertionError(
                            f"{op}: output {i} element {idx} is pruned by the rule but is "
                            f"{y[idx].item()!r} with the {tag} input masks (trial {t})."
                        )
            keep = outs_used[i] if i < len(outs_used) and outs_used[i] is not None else None
            keep = torch.ones(a.shape, dtype=torch.bool) if keep is None else keep
            keep = keep & fwd if fwd is not None else keep
            bad = _changed(a, b) & keep
            if bool(bad.any()):
                name = _culprit(op, base, rule_in, i, keep, seed + t)
                idx = _first_index(bad)
                raise AssertionError(
                    f"{op}: pruning argument {name!r} to the rule's input mask changed kept "
                    f"output {i} at {idx}: {a[idx].item()!r} -> {b[idx].item()!r} (trial {t})."
                )
    return refined


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not a.is_floating_point():
        return a != b
    rtol, atol = TOLERANCE.get(a.dtype, (1e-4, 1e-5))
    scale = torch.maximum(a.abs(), b.abs())
    close = ((a - b).abs() <= atol + rtol * scale) | (a == b) | (a.isnan() & b.isnan())
    return ~close


def _culprit(
    op: Any,
    base: dict[str, Any],
    rule_in: Mapping[str, Any],
    i: int,
    keep: torch.Tensor,
    seed: int,
) -> str:
    """The first argument whose pruning alone changes a kept output."""
    y0 = _run(op, base, seed)[i]
    for n, m in rule_in.items():
        one = dict(base)
        one[n] = _apply(base[n], m)
        y = _run(op, one, seed)[i]
        if bool((_changed(y0, y) & keep).any()):
            return n
    return "+".join(rule_in) or "?"
