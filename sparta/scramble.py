"""Tensor scrambling: infer the propagation rule of an op that has none.

Used by the engine in non-strict mode for an op without a registered rule. The op is run on
random inputs of the right shapes and dtypes, pruned input positions zeroed, and:

* forward: an output element is pruned if it is exactly zero in every trial;
* backward: an input element is pruned if no kept output element depends on it. Candidates
  come from autograd (gradient of a random weighting of the kept outputs is zero in every
  trial); each candidate set is then confirmed by perturbation (replace the candidates by
  zero, by large positive, large negative and random values: the kept outputs must stay
  bit-identical), split in halves where it is not, within a fixed budget of op runs.
  Without autograd (no formula, integer outputs) every kept input position is a candidate:
  perturbation alone decides, as in SparTA's tensor scrambling, first slice by slice along
  every dim (structured unused sets: features, channels, heads), then by the group test.

It is an inference, not a proof, and it only ever claims what every trial agrees on:

* integer or bool tensor inputs are used as their known values (``call.consts`` or
  ``example``); when such an input has no known value nothing is inferred (``Refined()``),
  because drawing indices at random cannot cover the values the op meets at run time;
* ops with side effects, mutating schemas, random or uninitialised outputs, or non-tensor
  results are never run (``can_scramble``);
* calls larger than ``MAX_ELEMENTS`` elements are skipped (nothing inferred) with a warning;
* results are cached per (op, shapes, dtypes, params, mask and const digests, trials, seed)
  and deterministic (a seeded ``torch.Generator``); a warning is emitted once per op.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .registry import Call, InputMask, Mask, Refined

INFERRED_RULE_NAME = "inferred (scrambling)"
MAX_ELEMENTS = 1 << 20  # inputs + outputs of one call; larger calls are not scrambled
MAX_PROBES = 64  # group tests per input tensor (each runs the op `rounds` times)
MAX_SLICE_PROBES = 256  # slice tests per input tensor when autograd proposes no candidates
_CACHE_SIZE = 1024

_RANDOM_NAME_PARTS = (
    "dropout",
    "rand",
    "bernoulli",
    "normal",
    "uniform",
    "multinomial",
    "poisson",
    "exponential",
    "geometric",
    "cauchy",
    "log_normal",
    "random",
    "rrelu",
)
_GARBAGE_NAME_PARTS = ("empty",)  # uninitialised memory
_SIDE_EFFECT_NAME_PARTS = (
    "_print",
    "_assert",
    "assert_",
    "sym_constrain",
    "record_",
    "profiler",
    "_set_",
    "check_",
    "_foreach",
    "_local_scalar",
)


class ScrambleWarning(UserWarning):
    """A rule was inferred by scrambling, or scrambling was skipped (nothing inferred)."""


# ----------------------------------------------------------------------------- which ops


def _randomness_off(params: Mapping[str, Any] | None) -> bool:
    """A random op called with its randomness switched off (eval mode, or p = 0)."""
    if not params:
        return False
    if params.get("train", params.get("training")) is False:
        return True
    return any(params.get(k) == 0 for k in ("p", "dropout"))


def why_not_scramble(op: Any, params: Mapping[str, Any] | None = None) -> str | None:
    """The reason ``op`` must not be scrambled, or None if it may be. ``params``: the call's
    non-tensor arguments; a random op (dropout, lstm) called with ``train=False`` or ``p=0`` is
    deterministic and may be scrambled (``infer`` still checks that two runs agree)."""
    schema = getattr(op, "_schema", None)
    if schema is None or not callable(op):
        return "it is not a torch operator with a schema"
    name = str(getattr(op, "_name", schema.name)).lower()
    base = name.split("::", 1)[-1]
    tags = set(getattr(op, "tags", ()) or ())
    random = torch.Tag.nondeterministic_seeded in tags or any(p in base for p in _RANDOM_NAME_PARTS)
    if random and not _randomness_off(params):
        return "its output is random"
    if any(p in base for p in _GARBAGE_NAME_PARTS):
        return "its output is uninitialised memory"
    if schema.is_mutable or any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments
    ):
        return "it mutates an argument"
    if any(p in base for p in _SIDE_EFFECT_NAME_PARTS):
        return "it has side effects"
    if not schema.returns:
        return "it returns nothing"
    for r in schema.returns:
        t = str(r.type)
        if t not in ("Tensor", "List[Tensor]", "Tensor[]"):
            return f"it returns a non-tensor ({t})"
        if r.alias_info is not None and r.alias_info.is_write:
            return "it writes to an output alias"
    return None


def can_scramble(op: Any, params: Mapping[str, Any] | None = None) -> bool:
    """Whether ``infer`` may run ``op``: no side effects, no mutation, not random, tensors out."""
    return why_not_scramble(op, params) is None


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Slot:
    """One tensor input: a schema argument, or one element of a Tensor[] argument."""

    name: str
    index: int | None
    mask: Mask
    dtype: torch.dtype
    const: torch.Tensor | None

    @property
    def float_like(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


def _dtype(d: Any) -> torch.dtype:
    return d if isinstance(d, torch.dtype) else torch.float32


def _slots(call: Call, known: Mapping[str, Any]) -> list[_Slot]:
    slots: list[_Slot] = []
    for name, m in call.inputs.items():
        if isinstance(m, Mask):
            c = known.get(name)
            slots.append(
                _Slot(
                    name,
                    None,
                    m.bool(),
                    _dtype(call.dtypes.get(name)),
                    c if isinstance(c, torch.Tensor) else None,
                )
            )
        elif isinstance(m, tuple):
            dts = call.dtypes.get(name) or (None,) * len(m)
            cs = known.get(name)
            for i, mi in enumerate(m):
                if isinstance(mi, Mask):
                    ci = cs[i] if isinstance(cs, (list, tuple)) else None
                    slots.append(
                        _Slot(
                            name,
                            i,
                            mi.bool(),
                            _dtype(dts[i]),
                            ci if isinstance(ci, torch.Tensor) else None,
                        )
                    )
    return slots


def _random(
    shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator, kind: int
) -> torch.Tensor:
    """Non-zero random values. kind 0: positive, 1: negative, 2: mixed signs and magnitudes
    over two decades, 3: large mixed, else: mixed over four decades."""
    shape = tuple(shape)
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if kind == 0:
        v = 1.0 + u
    elif kind == 1:
        v = -(1.0 + u)
    else:
        sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.int64) * 2 - 1
        if kind == 2:
            mag = (0.5 + u) * torch.pow(
                10.0, torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
            )
        elif kind == 3:
            mag = 4.0 + 4.0 * u
        else:
            mag = torch.pow(10.0, torch.rand(shape, generator=gen, dtype=torch.float64) * 4 - 2)
        v = sign * mag
    if dtype.is_complex:
        im = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5
        return torch.complex(v, im).to(dtype)
    return v.to(dtype)


def _draw(slots: list[_Slot], gen: torch.Generator, kind: int) -> list[torch.Tensor]:
    out = []
    for s in slots:
        if s.const is not None:
            v = s.const.detach().to("cpu", s.dtype).clone()
        else:
            v = _random(s.mask.shape, s.dtype, gen, kind)
        out.append(torch.where(s.mask, v, torch.zeros((), dtype=s.dtype)))
    return out


# ----------------------------------------------------------------------------- running


def _run(call: Call, slots: list[_Slot], values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    by_name: dict[str, Any] = {}
    for s, v in zip(slots, values):
        if s.index is None:
            by_name[s.name] = v
        else:
            by_name.setdefault(s.name, [None] * len(call.inputs[s.name]))[s.index] = v
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for a in call.op._schema.arguments:
        if a.name in by_name:
            value = by_name[a.name]
        elif a.name in call.params:
            value = call.params[a.name]
        else:
            value = None
        if a.kwarg_only:
            kwargs[a.name] = value
        else:
            args.append(value)
    res = call.op(*args, **kwargs)
    outs = tuple(res) if isinstance(res, (list, tuple)) else (res,)
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise TypeError(f"{call.op} returned a non-tensor")
    return outs


def _same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], kept: tuple[Mask, ...]) -> bool:
    """Kept output elements are bit-identical (NaN equals NaN), and no output element became
    inf or NaN: a non-finite value in an unused element still reaches the model's outputs
    through the zero weights that make it unused (0 * inf = NaN)."""
    for x, y, k in zip(a, b, kept):
        if x.shape != y.shape:
            return False
        eq = x == y
        if x.dtype.is_floating_point or x.dtype.is_complex:
            eq = eq | (torch.isnan(x) & torch.isnan(y))
            if bool((torch.isfinite(x) & ~torch.isfinite(y)).any()):
                return False
        if not bool(eq[k].all()):
            return False
    return True


def _grad_candidates(
    call: Call, slots: list[_Slot], kept: tuple[Mask, ...], gen: torch.Generator, trials: int
) -> list[Mask] | None:
    """Per slot, positions whose gradient is zero in every trial; None if autograd cannot say."""
    diff = [i for i, s in enumerate(slots) if s.float_like]
    seen = [torch.zeros(s.mask.shape, dtype=torch.bool) for s in slots]
    for t in range(trials):
        values = _draw(slots, gen, t)
        leaves = [values[i].requires_grad_(True) for i in diff]
        try:
            with torch.enable_grad():
                outs = _run(call, slots, values)
                if any(
                    k.any() and not (o.dtype.is_floating_point or o.dtype.is_complex)
                    for o, k in zip(outs, kept)
                ):
                    return None  # a kept integer/bool output: gradients miss its dependence
                loss = None
                for o, k in zip(outs, kept):
                    if not o.requires_grad or not k.any():
                        continue
                    w = _random(o.shape, o.dtype, gen, 4)
                    term = torch.where(k, o * w, torch.zeros((), dtype=o.dtype)).sum()
                    loss = term.real if loss is None else loss + term.real
                if loss is None:
                    return None
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        except Exception:  # no autograd formula, non-differentiable op, ...
            return None
        for i, g in zip(diff, grads):
            if g is not None:
                seen[i] |= g != 0
    return [
        s.mask & ~seen[i] if s.float_like else torch.zeros_like(s.mask) for i, s in enumerate(slots)
    ]


def _perturbed(v: torch.Tensor, g: torch.Tensor, how: int, gen: torch.Generator) -> torch.Tensor:
    """``v`` with the flat positions ``g`` set to zero (how 0), far above (1) or far below (2)
    every value of ``v``, or to fresh mixed values (3)."""
    v = v.clone()
    flat = v.view(-1)
    if how == 0:
        flat[g] = 0
        return v
    p = _random((g.numel(),), v.dtype, gen, 0 if how < 3 else 2)
    if how < 3 and not v.dtype.is_complex:
        big = 10.0 * (float(v.abs().max()) + 1.0)
        p = p * big if how == 1 else -p * big
    flat[g] = p
    return v


def _slices(candidates: Mask, budget: int) -> list[torch.Tensor]:
    """Flat indices of the candidates in each slice along each dim, last dim first (where
    structured pruning lives: features, channels), for the dims that fit in ``budget``."""
    flat = torch.arange(candidates.numel()).view(candidates.shape)
    groups: list[torch.Tensor] = []
    for d in reversed(range(candidates.dim())):
        size = candidates.shape[d]
        if size < 2 or len(groups) + size > budget:
            continue
        for i in range(size):
            g = flat.select(d, i)[candidates.select(d, i)]
            if g.numel():
                groups.append(g)
    return groups


def _confirm_unused(
    call: Call,
    slots: list[_Slot],
    j: int,
    candidates: Mask,
    bases: list[tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]],
    kept: tuple[Mask, ...],
    gen: torch.Generator,
    *,
    slices: bool,
) -> Mask:
    """Group test: the subset of ``candidates`` of slot ``j`` that perturbation confirms unused.

    A group is unused if, from every base trial, setting it to zero, far above, far below and
    to fresh values changes no kept output and makes no output non-finite. Moving a group
    both above and below every other value catches selections (max, topk, sort, argmax).
    With ``slices`` (no autograd to propose candidates), every slice along every dim is tested
    first (up to ``MAX_SLICE_PROBES``), which finds structured unused sets (pruned features,
    channels, heads) in a number of probes linear in the dims' sizes. Then the remaining
    candidates are tested as one group, split in halves where it moves; after ``MAX_PROBES``
    groups the rest stays used.
    """
    unused = torch.zeros(candidates.numel(), dtype=torch.bool)

    def stable(g: torch.Tensor) -> bool:
        return all(
            _same(outs, _run(call, slots, [*values[:j], _perturbed(values[j], g, how, gen),
                                           *values[j + 1:]]), kept)
            for values, outs in bases
            for how in range(4)
        )  # fmt: skip

    for g in _slices(candidates, MAX_SLICE_PROBES) if slices else []:
        g = g[~unused[g]]
        if g.numel() and stable(g):
            unused[g] = True
    queue = [(candidates.flatten() & ~unused).nonzero().flatten()]
    probes = 0
    while queue and probes < MAX_PROBES:
        g = queue.pop(0)
        if g.numel() == 0:
            continue
        probes += 1
        if stable(g):
            unused[g] = True
        elif g.numel() > 1:
            half = g.numel() // 2
            queue += [g[:half], g[half:]]
    return unused.view(candidates.shape)


# ----------------------------------------------------------------------------- inference


_CACHE: OrderedDict[tuple, Refined] = OrderedDict()
_WARNED: set[tuple[str, str]] = set()


def clear_cache() -> None:
    _CACHE.clear()
    _WARNED.clear()


def _digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _freeze(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"T{_digest(v)}"
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_freeze(x) for x in v) + ")"
    return repr(v)


def _key(call: Call, slots: list[_Slot], trials: int, seed: int) -> tuple:
    return (
        str(call.op),
        tuple(
            (
                s.name,
                s.index,
                tuple(s.mask.shape),
                str(s.dtype),
                _digest(s.mask),
                None if s.const is None else _digest(s.const),
            )
            for s in slots
        ),
        tuple(_digest(m.bool()) for m in call.outputs),
        tuple(sorted((k, _freeze(v)) for k, v in call.params.items())),
        trials,
        seed,
    )


def _warn(op: Any, text: str, depth: int = 0, kind: str = "skipped") -> None:
    """Once per (op, kind); points at the caller of ``infer`` (``depth``: frames below it)."""
    if (str(op), kind) not in _WARNED:
        _WARNED.add((str(op), kind))
        warnings.warn(ScrambleWarning(text), stacklevel=3 + depth)


def infer(
    call: Call, example: Mapping[str, Any] | None = None, *, trials: int = 4, seed: int = 0
) -> Refined:
    """Infer what a rule for ``call.op`` would return on ``call`` by tensor scrambling.

    ``example``: values of tensor arguments (by schema name; a list for Tensor[]) that are the
    same on every run, used as they are like ``call.consts`` (which they extend). Returns
    ``Refined()`` (nothing learned, i.e. conservative) when the op cannot be scrambled, an
    integer or bool input has no known value, the call is too large, or the op fails.
    """
    op = call.op
    reason = why_not_scramble(op, call.params)
    if reason is not None:
        _warn(op, f"{op} is not scrambled ({reason}); it is treated conservatively.")
        return Refined()
    trials = max(int(trials), 1)
    known = {**call.consts, **(example or {})}
    slots = _slots(call, known)
    key = _key(call, slots, trials, seed)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    result = _infer(call, slots, trials, seed)
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def _infer(call: Call, slots: list[_Slot], trials: int, seed: int) -> Refined:
    op = call.op

    def warn(text: str, kind: str = "skipped") -> None:
        _warn(op, text, depth=2, kind=kind)

    size = sum(s.mask.numel() for s in slots) + sum(m.numel() for m in call.outputs)
    if size > MAX_ELEMENTS:
        warn(
            f"{op}: {size} elements exceed the scrambling limit ({MAX_ELEMENTS}); "
            f"treated conservatively. Register a rule with sparta.register_rule."
        )
        return Refined()
    unknown = [s.name for s in slots if not s.float_like and s.const is None]
    if unknown:
        warn(
            f"{op}: integer/bool inputs {sorted(set(unknown))} have no known value, so "
            f"scrambling cannot cover them; treated conservatively. Register a rule."
        )
        return Refined()
    gen = torch.Generator().manual_seed(seed)
    kept = tuple(m.bool() for m in call.outputs)

    # forward: outputs exactly zero in every trial (pruned inputs zero, kept ones random)
    bases: list[tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]] = []
    try:
        with torch.no_grad():
            for t in range(max(trials, 4)):
                values = _draw(slots, gen, t)
                outs = _run(call, slots, values)
                bases.append((values, outs))
            again = _run(call, slots, bases[0][0])
    except Exception as e:
        warn(
            f"{op} failed on random inputs ({type(e).__name__}: {e}); treated "
            f"conservatively. Register a rule with sparta.register_rule."
        )
        return Refined()
    shapes = [tuple(o.shape) for o in bases[0][1]]
    if shapes != [tuple(m.shape) for m in kept]:
        warn(
            f"{op} returned shapes {shapes}, the graph says "
            f"{[tuple(m.shape) for m in kept]}; treated conservatively."
        )
        return Refined()
    if not _same(bases[0][1], again, tuple(torch.ones_like(k) for k in kept)):
        warn(f"{op} is not deterministic; treated conservatively.")
        return Refined()
    warn(
        f"no propagation rule for {op}: {INFERRED_RULE_NAME} from {trials} random "
        f"trials. Register a rule with sparta.register_rule for an exact result.",
        "inferred",
    )
    zero = [torch.ones(m.shape, dtype=torch.bool) for m in kept]
    for _, outs in bases[:trials]:
        for i, o in enumerate(outs):
            zero[i] &= o == 0
    out_masks = tuple(~z for z in zero)

    # backward: autograd proposes, perturbation confirms
    cand = _grad_candidates(call, slots, kept, gen, trials)
    perturbation_only = cand is None
    if cand is None:
        cand = [s.mask.clone() if s.float_like else torch.zeros_like(s.mask) for s in slots]
    new: list[Mask] = []
    with torch.no_grad():
        for j, s in enumerate(slots):
            if bool(cand[j].any()):
                unused = _confirm_unused(
                    call, slots, j, cand[j], bases, kept, gen, slices=perturbation_only
                )
                new.append(s.mask & ~unused)
            else:
                new.append(s.mask)
    return Refined(inputs=_group(call, slots, new), outputs=out_masks)


def _group(call: Call, slots: list[_Slot], masks: list[Mask]) -> dict[str, InputMask]:
    out: dict[str, InputMask] = {}
    for s, m in zip(slots, masks):
        if s.index is None:
            out[s.name] = m
        else:
            prev = out.get(s.name)
            lst = list(prev) if isinstance(prev, tuple) else list(call.inputs[s.name])
            lst[s.index] = m
            out[s.name] = tuple(lst)
    return out
