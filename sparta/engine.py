"""The propagation engine: forward and backward sweeps over the traced graph to a fixpoint.

Each tensor value ``v`` carries ``mask(v) = fwd(v) & OR(use(v, u) for every use u)``:
``fwd`` is what its producer's rule (or the user's attribute) says may be nonzero, and each
use is what one consumer needs of it. A value is pruned where it is zero or where no
consumer needs it. Rules only shrink masks, so the sweeps terminate; a node is re-run only
when a mask it sees has changed, which keeps the cost roughly linear in graph size.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import registry
from .calls import bound_arguments, check_refined, make_call
from .known import known_values, known_zeros
from .registry import Mask, Refined
from .signs import Sign, sign_facts
from .tesa import all_kept_view, and_, compact, ones, or_, same
from .trace import METADATA_OPS, Traced

Value = Mask | tuple[Mask, ...]
CONST_LIMIT = 1 << 22  # fold constants up to 4M elements


@dataclass
class Propagation:
    """Result: a mask per tensor node and which rule fired on each op node."""

    masks: dict[fx.Node, Value]
    rules: dict[fx.Node, str]
    sweeps: int
    rule_calls: int = 0
    inferred: list[str] = field(default_factory=list)
    conservative: list[str] = field(default_factory=list)  # ops without a rule, nothing inferred
    signs: dict[fx.Node, Sign] = field(default_factory=dict)  # value-range facts (sparta.signs)


def _is_op(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)


def _tensor_like(v: Any) -> bool:
    return isinstance(v, torch.Tensor) or (
        isinstance(v, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in v)
    )


def _ones(v: Any) -> Value:
    """All-kept mask(s) for a value (compact: ``sparta.tesa.ones``)."""
    if isinstance(v, torch.Tensor):
        return ones(v.shape)
    return tuple(ones(t.shape) if isinstance(t, torch.Tensor) else None for t in v)


class Engine:
    def __init__(self, traced: Traced, given: Mapping[fx.Node, Mask], strict: bool) -> None:
        self.t = traced
        self.strict = strict
        self.values = traced.example
        self.nodes = [
            n
            for n in traced.gm.graph.nodes
            if n.op != "output" and _tensor_like(self.values.get(n))
        ]
        self.consts = self._fold_constants()
        self.signs = sign_facts(traced.gm, self.values, bind=bound_arguments)
        self.fwd: dict[fx.Node, Value] = {}
        self.uses: dict[fx.Node, dict[tuple, Mask]] = {n: {} for n in self.nodes}
        self.mask: dict[fx.Node, Value] = {}
        self.rules: dict[fx.Node, str] = {}
        self.inferred: list[str] = []
        self.conservative: list[str] = []
        self.rule_calls = 0
        zeros = known_zeros(known_values(traced.gm, self.values, self.consts))
        for n in self.nodes:
            v = self.values[n]
            if n in given:
                self.fwd[n] = compact(given[n])  # masks are never written: no copy needed
            elif n in self.consts and self.consts[n].is_floating_point():
                self.fwd[n] = compact(self.consts[n] != 0)  # known zeros of a constant are pruned
            else:
                self.fwd[n] = _ones(v)
            if n in zeros:  # fixed zeros, e.g. softmax over a constant -inf pattern
                self.fwd[n] = and_(self.fwd[n], ~zeros[n])
        self._seed_uses()
        for n in self.nodes:
            self._recompute(n)

    # ------------------------------------------------------------------ setup

    def _fold_constants(self) -> dict[fx.Node, torch.Tensor]:
        """Buffers and anything computed only from buffers and literals (e.g. ``~pattern``)."""
        consts: dict[fx.Node, torch.Tensor] = {}
        buffers = set(self.t.buffers.values())
        for n in self.t.gm.graph.nodes:
            v = self.values.get(n)
            if not isinstance(v, torch.Tensor) or v.numel() > CONST_LIMIT:
                continue
            is_buffer = n in buffers
            folded = (
                _is_op(n)
                and not _nondeterministic(n.target)
                and all(i in consts for i in n.all_input_nodes)
            )
            if is_buffer or folded:
                consts[n] = v.detach().cpu()  # masks live on the CPU; so do the facts rules read
        return consts

    def _seed_uses(self) -> None:
        for n in self.nodes:
            for u in n.users:
                if u.op == "output":
                    for key, m in self._output_uses(u, n):
                        self.uses[n][key] = m
                elif u.op == "call_module" or (
                    u.op == "call_function" and u.target in METADATA_OPS
                ):
                    continue  # guards and size queries read metadata only
                elif u.op == "call_function" and u.target is operator.getitem:
                    idx = u.args[1]
                    item = self.values[n][idx]
                    self.uses[n][(u, idx)] = ones(item.shape)
                else:
                    for key in _arg_keys(u, n):
                        self.uses[n][(u, *key)] = _ones(self.values[n])

    def _output_uses(self, out: fx.Node, n: fx.Node) -> list[tuple[tuple, Mask]]:
        flat = torch.utils._pytree.tree_leaves(out.args)
        return [((out, i),) + (_ones(self.values[n]),) for i, a in enumerate(flat) if a is n]

    # ------------------------------------------------------------------ fixpoint

    def _recompute(self, n: fx.Node) -> bool:
        fwd = self.fwd[n]
        uses = list(self.uses[n].values())
        if isinstance(fwd, torch.Tensor):
            used = _union(uses, fwd.shape)
            new: Value = and_(fwd, used)
        else:
            new = tuple(
                None
                if f is None
                else and_(f, _union([m for (k, m) in self.uses[n].items() if k[1] == i], f.shape))
                for i, f in enumerate(fwd)
            )
        old = self.mask.get(n)
        self.mask[n] = new
        return old is None or not _equal(old, new)

    def run(self) -> Propagation:
        order = [n for n in self.nodes if _is_op(n) or n.target is operator.getitem]
        pending = set(order)
        runnable = set(order)
        sweeps = 0
        while pending:
            sweeps += 1
            for n in order if sweeps % 2 else reversed(order):
                if n not in pending:
                    continue
                pending.discard(n)
                for changed in self._apply(n):
                    # Re-run every rule that sees this value: its producer and its consumers.
                    pending.update(u for u in (changed, *changed.users) if u in runnable)
            if sweeps > 4 * len(order) + 8:
                raise RuntimeError("propagation did not converge: a rule is not monotone")
        for n in self.nodes:
            self.rules.setdefault(n, n.op if not _is_op(n) else "-")
        return Propagation(
            self.mask,
            self.rules,
            sweeps,
            self.rule_calls,
            self.inferred,
            self.conservative,
            self.signs,
        )

    def _apply(self, n: fx.Node) -> list[fx.Node]:
        """Run the rule of ``n``; return the values whose mask changed."""
        if n.target is operator.getitem:
            src, idx = n.args[0], n.args[1]
            self.fwd[n] = and_(self.fwd[n], self.mask[src][idx])
            self.uses[src][(n, idx)] = and_(self.uses[src][(n, idx)], self.mask[n])
            return [t for t in (n, src) if self._recompute(t)]
        refined = self._rule(n)
        touched = [n]
        outs = refined.outputs
        if outs:
            cur = self.fwd[n]
            if isinstance(cur, torch.Tensor):
                if outs[0] is not None:
                    self.fwd[n] = and_(cur, compact(outs[0]))
            else:
                self.fwd[n] = tuple(
                    c
                    if (i >= len(outs) or outs[i] is None or c is None)
                    else and_(c, compact(outs[i]))
                    for i, c in enumerate(cur)
                )
        for name, m in refined.inputs.items():
            for key, node, mask in _input_uses(n, name, m):
                if node in self.uses and (n, *key) in self.uses[node]:
                    old = self.uses[node][(n, *key)]
                    self.uses[node][(n, *key)] = and_(old, compact(mask))
                    touched.append(node)
        return [t for t in dict.fromkeys(touched) if self._recompute(t)]

    def _rule(self, n: fx.Node) -> Refined:
        op = n.target
        out_v = self.values[n]
        outputs = (self.mask[n],) if isinstance(out_v, torch.Tensor) else tuple(self.mask[n])
        out_dtypes = (
            (out_v.dtype,)
            if isinstance(out_v, torch.Tensor)
            else tuple(getattr(t, "dtype", None) for t in out_v)
        )
        # Size arguments computed in the graph (SymInts) enter rules as their example values.
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), self._concrete)
        call = make_call(
            op,
            args,
            kwargs,
            outputs,
            mask_of=lambda a: self.mask.get(a) if isinstance(a, fx.Node) else None,
            dtype_of=lambda a: (
                getattr(self.values.get(a), "dtype", None) if isinstance(a, fx.Node) else None
            ),
            const_of=lambda a: self.consts.get(a) if isinstance(a, fx.Node) else None,
            out_dtypes=out_dtypes,
            signs_of=lambda a: self.signs.get(a) if isinstance(a, fx.Node) else None,
        )
        entry = registry.lookup(op)
        self.rule_calls += 1
        if entry is None:
            return self._no_rule(n, call)
        refined = entry.fn(call)
        check_refined(call, refined, entry.name)
        self.rules[n] = entry.name
        return refined

    def _concrete(self, a: fx.Node) -> Any:
        v = self.values.get(a)
        return a if _tensor_like(v) else v

    def _no_rule(self, n: fx.Node, call: registry.Call) -> Refined:
        if self.strict:
            raise registry.missing_rule_error(n.target)
        from . import scramble

        op = str(n.target)
        if scramble.can_scramble(n.target, call.params):
            refined = scramble.infer(call)
            if refined.inputs or refined.outputs:
                self.rules[n] = scramble.INFERRED_RULE_NAME
                if op not in self.inferred:
                    self.inferred.append(op)
                return refined
        self.rules[n] = "conservative (no rule)"
        if op not in self.conservative:
            self.conservative.append(op)
        return Refined()


def _nondeterministic(op: Any) -> bool:
    tags = getattr(op, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _union(masks: list[Mask], shape: torch.Size) -> Mask:
    if not masks:
        return torch.zeros(shape, dtype=torch.bool)  # nobody reads it
    for m in masks:
        if all_kept_view(m) and tuple(m.shape) == tuple(shape):
            return m  # everything is read
    out = masks[0]
    for m in masks[1:]:
        out = or_(out, m)
    return out


def _equal(a: Value, b: Value) -> bool:
    if isinstance(a, torch.Tensor):
        return a is b or same(a, b)
    return all(x is y or (x is not None and y is not None and same(x, y)) for x, y in zip(a, b))


def _bound(node: fx.Node) -> dict[str, Any]:
    """Schema-bound arguments, cached on the node (it lives and dies with its graph)."""
    if "sparta_bound" not in node.meta:
        node.meta["sparta_bound"] = bound_arguments(node.target, node.args, node.kwargs)
    return node.meta["sparta_bound"]


def _arg_keys(user: fx.Node, n: fx.Node) -> list[tuple]:
    """Every (argument name, list index) at which ``user`` reads ``n``."""
    if not isinstance(user.target, torch._ops.OpOverload):
        return [("?", None)]
    keys = []
    for name, value in _bound(user).items():
        if value is n:
            keys.append((name, None))
        elif isinstance(value, (list, tuple)):
            keys.extend((name, i) for i, v in enumerate(value) if v is n)
    return keys


def _input_uses(user: fx.Node, name: str, mask: Any) -> list[tuple[tuple, fx.Node, Mask]]:
    value = _bound(user).get(name)
    if isinstance(value, fx.Node) and isinstance(mask, torch.Tensor):
        return [((name, None), value, mask)]
    if isinstance(value, (list, tuple)) and isinstance(mask, tuple):
        return [
            ((name, i), v, m)
            for i, (v, m) in enumerate(zip(value, mask))
            if isinstance(v, fx.Node) and m is not None
        ]
    return []


def propagate_graph(
    traced: Traced, given: Mapping[fx.Node, Mask], *, strict: bool = True
) -> Propagation:
    if strict:
        _check_rules(traced)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return Engine(traced, given, strict).run()


def _check_rules(traced: Traced) -> None:
    """Strict mode: fail before any work on the first op without a rule."""
    for n in traced.gm.graph.nodes:
        needs_rule = _is_op(n) and n.target not in METADATA_OPS
        if needs_rule and registry.lookup(n.target) is None and _tensor_like(traced.example.get(n)):
            raise registry.missing_rule_error(n.target)
