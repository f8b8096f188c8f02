"""Soundness fuzzing: random small graphs, random masks of every pattern; applying every
propagated mask must leave the outputs unchanged. And the scrambling oracle: on structured
masks, each exact rule finds at least what tensor scrambling finds.

CI runs a small derandomized profile; ``pytest -m slow tests/test_fuzz_soundness.py`` runs
the long one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparta
from sparta import registry, scramble
from sparta.calls import make_call
from sparta.registry import Call, Refined
from sparta.scramble import ScrambleWarning
from sparta.soundness import check_soundness

B, S = 2, 4
LAYERS = (
    "linear", "conv2d", "matmul", "relu", "gelu", "sigmoid", "mul", "add", "permute",
    "sdpa", "layer_norm", "residual", "cat_split",
)  # fmt: skip
PATTERNS = ("unstructured", "rows", "columns", "blocks", "nm", "channels")


# ------------------------------------------------------------------------ random graphs


class Fuzz(nn.Module):
    """A chain of drawn layers over a (B, S, D) activation."""

    def __init__(self, layers: list[tuple[str, int]], d: int) -> None:
        super().__init__()
        self.kinds: list[str] = []
        self.mods = nn.ModuleList()
        for kind, width in layers:
            self.mods.append(self._make(kind, d, width))
            self.kinds.append(kind)
            if kind in ("linear", "matmul"):
                d = width
        self.d_out = d

    @staticmethod
    def _make(kind: str, d: int, width: int) -> nn.Module:
        m = nn.Module()
        if kind == "linear":
            m.fc = nn.Linear(d, width)
        elif kind == "matmul":
            m.w = nn.Parameter(torch.randn(d, width) / d**0.5)
        elif kind == "conv2d":
            m.c1 = nn.Conv2d(1, 4, 3, padding=1)
            m.c2 = nn.Conv2d(4, 1, 3, padding=1)
        elif kind in ("mul", "add"):
            m.p = nn.Parameter(torch.randn(d))
        elif kind == "permute":
            m.fc = nn.Linear(S, S)
        elif kind == "sdpa":
            m.q, m.k, m.v, m.o = (nn.Linear(d, d) for _ in range(4))
        elif kind == "layer_norm":
            m.ln = nn.LayerNorm(d)
            nn.init.normal_(m.ln.weight)
            nn.init.normal_(m.ln.bias)
        elif kind in ("residual", "cat_split"):
            m.fc = nn.Linear(d, d)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, m in zip(self.kinds, self.mods):
            x = _apply(kind, m, x)
        return x


def _apply(kind: str, m: Any, x: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return m.fc(x)
    if kind == "matmul":
        return torch.matmul(x, m.w)
    if kind == "conv2d":
        return m.c2(torch.relu(m.c1(x.unsqueeze(1)))).squeeze(1)
    if kind in ("relu", "gelu", "sigmoid"):
        return getattr(torch, kind)(x) if kind != "gelu" else F.gelu(x)
    if kind == "mul":
        return x * m.p
    if kind == "add":
        return x + m.p
    if kind == "permute":
        return m.fc(x.permute(0, 2, 1)).permute(0, 2, 1)
    if kind == "sdpa":
        d = x.shape[-1]
        h = 2 if d % 2 == 0 else 1

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(B, S, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(m.q(x)), heads(m.k(x)), heads(m.v(x)))
        return m.o(y.transpose(1, 2).reshape(B, S, d))
    if kind == "layer_norm":
        return m.ln(x)
    if kind == "residual":
        return x + m.fc(torch.relu(x))
    if kind == "cat_split":
        y = torch.cat([x, m.fc(x)], dim=-1)
        a, b = torch.split(y, x.shape[-1], dim=-1)
        return a * torch.relu(b)
    raise AssertionError(kind)


# ------------------------------------------------------------------------ random masks


def pattern_mask(
    shape: torch.Size, pattern: str, density: float, g: torch.Generator
) -> torch.Tensor:
    """A bool mask (True = kept) of the pattern; falls back to unstructured where the
    pattern does not fit the shape."""

    def keep(n: int) -> torch.Tensor:
        return torch.rand(n, generator=g) < density

    nd = len(shape)
    if pattern == "rows" and nd >= 2:
        return keep(shape[0]).reshape(-1, *([1] * (nd - 1))).expand(shape).clone()
    if pattern == "columns" and nd >= 2:
        return keep(shape[1]).reshape(1, -1, *([1] * (nd - 2))).expand(shape).clone()
    if pattern == "channels":
        dim = int(torch.randint(0, nd, (1,), generator=g))
        view = [1] * nd
        view[dim] = shape[dim]
        return keep(shape[dim]).reshape(view).expand(shape).clone()
    if pattern == "blocks" and nd == 2 and shape[0] % 2 == 0 and shape[1] % 2 == 0:
        blocks = keep((shape[0] // 2) * (shape[1] // 2)).reshape(shape[0] // 2, shape[1] // 2)
        return blocks.repeat_interleave(2, 0).repeat_interleave(2, 1)
    if pattern == "nm" and shape[-1] % 4 == 0:
        scores = torch.rand(shape, generator=g).reshape(-1, 4)
        top = scores.topk(2, dim=1).indices
        m = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        return m.reshape(shape)
    return torch.rand(shape, generator=g) < density


@st.composite
def fuzz_cases(draw: st.DrawFn, max_layers: int) -> tuple[Fuzz, dict, torch.Tensor, int]:
    seed = draw(st.integers(0, 2**16))
    d = draw(st.sampled_from([4, 6, 8]))
    n = draw(st.integers(1, max_layers))
    layers = [(draw(st.sampled_from(LAYERS)), draw(st.sampled_from([4, 6, 8]))) for _ in range(n)]
    torch.manual_seed(seed)
    model = Fuzz(layers, d).eval()
    g = torch.Generator().manual_seed(seed)
    attrs: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if draw(st.booleans()):
            pattern = draw(st.sampled_from(PATTERNS))
            attrs[name] = pattern_mask(p.shape, pattern, draw(st.sampled_from([0.3, 0.6])), g)
    x = torch.randn(B, S, d, generator=g)
    if draw(st.booleans()):
        attrs["x"] = pattern_mask(x.shape, draw(st.sampled_from(PATTERNS)), 0.6, g)
    return model, attrs, x, seed


def _check(case: tuple[Fuzz, dict, torch.Tensor, int]) -> None:
    model, attrs, x, seed = case
    report = sparta.propagate(model, attrs, (x,), strict=True)
    for name, given_mask in attrs.items():  # propagation only grows pruned sets
        assert not bool((report.mask(name) & ~given_mask).any()), name
    check_soundness(model, attrs, (x,), trials=2, seed=seed)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fuzz_cases(max_layers=4))
def test_random_graphs_are_sound(case: tuple[Fuzz, dict, torch.Tensor, int]) -> None:
    _check(case)


@pytest.mark.slow
@settings(
    max_examples=400,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fuzz_cases(max_layers=8))
def test_random_graphs_are_sound_long(case: tuple[Fuzz, dict, torch.Tensor, int]) -> None:
    _check(case)


# Layers through which zero input features 2-4 prune more parameters (the layer's own or the
# next linear's columns). The others mix features (conv over the feature axis, normalisation,
# a bias added after the permuted linear) or do not keep zeros (sigmoid, add).
PROPAGATING = {"linear", "matmul", "relu", "gelu", "mul", "sdpa", "residual", "cat_split"}


@pytest.mark.parametrize("kind", LAYERS)
def test_each_layer_kind_propagates_what_it_should(kind: str) -> None:
    """Not vacuous: where propagation is possible it happens, and it is sound everywhere."""
    torch.manual_seed(0)
    model = Fuzz([("linear", 8), (kind, 8), ("linear", 8)], 8).eval()
    w = torch.ones(8, 8, dtype=torch.bool)
    w[2:5] = False  # rows of the first linear, with its bias: features 2-4 are zero
    b = torch.ones(8, dtype=torch.bool)
    b[2:5] = False
    attrs = {"mods.0.fc.weight": w, "mods.0.fc.bias": b}
    report = sparta.propagate(model, attrs, (torch.randn(B, S, 8),))
    pruned = sum(int((~report.mask(n)).sum()) for n, _ in model.named_parameters())
    beyond = pruned - 3 * 9  # pruned beyond the given rows and bias elements
    assert (beyond > 0) == (kind in PROPAGATING), (kind, beyond)
    check_soundness(model, attrs, (torch.randn(B, S, 8),))


# ------------------------------------------------------------------------ the checker itself


@pytest.fixture
def optimistic_sigmoid() -> Iterator[None]:
    """Replace sigmoid's rule by a wrong one that claims sigmoid(0) == 0."""
    op = torch.ops.aten.sigmoid.default
    key = op if op in registry.registered_ops() else op.overloadpacket
    entry = registry.lookup(op)
    assert entry is not None
    registry.unregister_rule(key)
    registry.register_rule(key, name="wrong")(registry.elementwise("any", "self"))
    try:
        yield
    finally:
        registry.unregister_rule(key)
        registry.register_rule(key, name=entry.name)(entry.fn)


def test_fuzz_check_catches_an_unsound_rule(optimistic_sigmoid: None) -> None:
    torch.manual_seed(0)
    model = Fuzz([("linear", 8), ("sigmoid", 8), ("linear", 8)], 8).eval()
    w = torch.ones(8, 8, dtype=torch.bool)
    w[2:5] = False
    b = torch.ones(8, dtype=torch.bool)
    b[2:5] = False
    with pytest.raises(AssertionError, match="unsound"):
        _check((model, {"mods.0.fc.weight": w, "mods.0.fc.bias": b}, torch.randn(B, S, 8), 0))


# ------------------------------------------------------------------------ scrambling oracle


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g)


aten = torch.ops.aten
OracleCase = Callable[[torch.Generator], tuple[Any, tuple, dict]]
ORACLE: dict[str, OracleCase] = {
    "linear": lambda g: (aten.linear.default, (_r(g, 4, 8), _r(g, 6, 8), _r(g, 6)), {}),
    "mm": lambda g: (aten.mm.default, (_r(g, 4, 8), _r(g, 8, 6)), {}),
    "bmm": lambda g: (aten.bmm.default, (_r(g, 2, 4, 8), _r(g, 2, 8, 6)), {}),
    "addmm": lambda g: (aten.addmm.default, (_r(g, 6), _r(g, 4, 8), _r(g, 8, 6)), {}),
    "matmul": lambda g: (aten.matmul.default, (_r(g, 2, 4, 8), _r(g, 8, 6)), {}),
    "conv2d": lambda g: (aten.conv2d.default, (_r(g, 1, 4, 6, 6), _r(g, 6, 4, 3, 3), _r(g, 6)),
                         {"padding": [1, 1]}),
    "relu": lambda g: (aten.relu.default, (_r(g, 4, 8),), {}),
    "gelu": lambda g: (aten.gelu.default, (_r(g, 4, 8),), {}),
    "sigmoid": lambda g: (aten.sigmoid.default, (_r(g, 4, 8),), {}),
    "mul": lambda g: (aten.mul.Tensor, (_r(g, 4, 8), _r(g, 8)), {}),
    "add": lambda g: (aten.add.Tensor, (_r(g, 4, 8), _r(g, 4, 8)), {}),
    "permute": lambda g: (aten.permute.default, (_r(g, 2, 4, 8), [2, 0, 1]), {}),
    "transpose": lambda g: (aten.transpose.int, (_r(g, 2, 4, 8), 1, 2), {}),
    "view": lambda g: (aten.view.default, (_r(g, 4, 8), [2, 2, 8]), {}),
    "cat": lambda g: (aten.cat.default, ([_r(g, 4, 8), _r(g, 4, 4)], 1), {}),
    "split": lambda g: (aten.split.Tensor, (_r(g, 4, 8), 4, 1), {}),
    "sdpa": lambda g: (aten.scaled_dot_product_attention.default,
                       (_r(g, 1, 2, 4, 8), _r(g, 1, 2, 4, 8), _r(g, 1, 2, 4, 8)), {}),
    "layer_norm": lambda g: (aten.layer_norm.default, (_r(g, 4, 8), [8], _r(g, 8), _r(g, 8)),
                             {}),
    "softmax": lambda g: (aten._softmax.default, (_r(g, 4, 8), -1, False), {}),
    "sum": lambda g: (aten.sum.dim_IntList, (_r(g, 4, 8), [1]), {}),
    "mean": lambda g: (aten.mean.dim, (_r(g, 2, 4, 8), [0, 2], True), {}),
    "amax": lambda g: (aten.amax.default, (_r(g, 4, 8), [0]), {}),
    "max.dim": lambda g: (aten.max.dim, (_r(g, 4, 8), 1), {}),
    "var": lambda g: (aten.var.correction, (_r(g, 4, 8), [1]), {}),
    "log_softmax": lambda g: (aten._log_softmax.default, (_r(g, 4, 8), 0, False), {}),
    "tanh": lambda g: (aten.tanh.default, (_r(g, 4, 8),), {}),
    "silu": lambda g: (aten.silu.default, (_r(g, 4, 8),), {}),
    "div": lambda g: (aten.div.Tensor, (_r(g, 4, 8), _r(g, 4, 8).abs() + 1), {}),
    "pow": lambda g: (aten.pow.Tensor_Scalar, (_r(g, 4, 8), 2), {}),
    "clamp": lambda g: (aten.clamp.default, (_r(g, 4, 8), -0.5, 0.5), {}),
    "where": lambda g: (aten.where.self, (_r(g, 4, 8) > 0, _r(g, 4, 8), _r(g, 4, 8)), {}),
    "masked_fill": lambda g: (aten.masked_fill.Scalar, (_r(g, 4, 8), _r(g, 4, 8) > 0, 0.0), {}),
    "tril": lambda g: (aten.tril.default, (_r(g, 8, 8),), {}),
    "cumsum": lambda g: (aten.cumsum.default, (_r(g, 4, 8), 1), {}),
    "expand": lambda g: (aten.expand.default, (_r(g, 4, 1), [4, 8]), {}),
    "unsqueeze": lambda g: (aten.unsqueeze.default, (_r(g, 4, 8), 1), {}),
    "slice": lambda g: (aten.slice.Tensor, (_r(g, 4, 8), 1, 2, 7, 2), {}),
    "select": lambda g: (aten.select.int, (_r(g, 4, 8), 0, 2), {}),
    "stack": lambda g: (aten.stack.default, ([_r(g, 4, 8), _r(g, 4, 8)], 1), {}),
    "embedding": lambda g: (aten.embedding.default,
                            (_r(g, 10, 8), torch.randint(0, 10, (2, 3), generator=g)), {}),
    "index_select": lambda g: (aten.index_select.default,
                               (_r(g, 6, 8), 0, torch.randint(0, 6, (4,), generator=g)), {}),
    "gather": lambda g: (aten.gather.default,
                         (_r(g, 4, 8), 1, torch.randint(0, 8, (4, 3), generator=g)), {}),
    "baddbmm": lambda g: (aten.baddbmm.default, (_r(g, 2, 4, 6), _r(g, 2, 4, 8), _r(g, 2, 8, 6)),
                          {}),
    "group_norm": lambda g: (aten.group_norm.default, (_r(g, 2, 4, 3, 3), 2, _r(g, 4), _r(g, 4)),
                             {}),
    "batch_norm_eval": lambda g: (aten._native_batch_norm_legit_no_training.default,
                                  (_r(g, 2, 4, 3, 3), _r(g, 4), _r(g, 4), _r(g, 4),
                                   _r(g, 4).abs() + 0.5, 0.1, 1e-5), {}),
    "avg_pool2d": lambda g: (aten.avg_pool2d.default, (_r(g, 1, 2, 6, 6), [2, 2]), {}),
    "max_pool2d": lambda g: (aten.max_pool2d.default, (_r(g, 1, 2, 6, 6), [2, 2]), {}),
    "adaptive_avg_pool2d": lambda g: (aten.adaptive_avg_pool2d.default, (_r(g, 1, 2, 6, 6), [1, 1]),
                                      {}),
}  # fmt: skip

# Where a rule is conservative on purpose, scrambling may find more: (case, output or argument)
# -> the reason.
CONSERVATIVE: dict[tuple[str, str], str] = {
    ("max.dim", "output 1"): "the index of an all-pruned row is always 0 (the first maximum); "
    "the rule claims nothing about integer outputs",
}


def _structured(shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    pattern = PATTERNS[int(torch.randint(1, len(PATTERNS), (1,), generator=g))]  # not random
    return pattern_mask(shape, pattern, 0.6, g)


def _final(call_mask: Any, refined: Any) -> Any:
    if refined is None:
        return call_mask
    if isinstance(call_mask, tuple):
        return tuple(c if r is None else c & r for c, r in zip(call_mask, refined))
    return call_mask & refined


def _pruned_subset(small: Any, big: Any) -> bool:
    """Pruned elements of ``small`` are pruned in ``big`` (masks: True = kept)."""
    if isinstance(small, tuple):
        return all(_pruned_subset(s, b) for s, b in zip(small, big))
    return not bool((big & ~small).any())


def _oracle_call(name: str, seed: int) -> Call:
    g = torch.Generator().manual_seed(seed)
    op, args, kwargs = ORACLE[name](g)
    res = op(*args, **kwargs)
    outs = tuple(res) if isinstance(res, (list, tuple)) else (res,)
    masks: dict[int, torch.Tensor] = {}

    def mask_of(v: Any) -> torch.Tensor | None:
        if not isinstance(v, torch.Tensor):
            return None
        if not v.is_floating_point():  # an index or a condition: known, kept
            return torch.ones(v.shape, dtype=torch.bool)
        if id(v) not in masks:
            masks[id(v)] = _structured(v.shape, g)
        return masks[id(v)]

    used = tuple(_structured(o.shape, g) for o in outs)
    return make_call(op, args, kwargs, used, mask_of=mask_of,
                     const_of=lambda v: None if v.is_floating_point() else v,
                     out_dtypes=tuple(o.dtype for o in outs))  # fmt: skip


@pytest.mark.parametrize("name", sorted(ORACLE))
def test_exact_rules_find_what_scrambling_finds(name: str) -> None:
    for seed in range(6):
        call = _oracle_call(name, seed)
        entry = registry.lookup(call.op)
        assert entry is not None, f"no rule for {call.op}"
        rule: Refined = entry.fn(call)
        scramble.clear_cache()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ScrambleWarning)
            scr = scramble.infer(call)
        for i, out in enumerate(call.outputs):
            if (name, f"output {i}") in CONSERVATIVE:
                continue
            got_rule = _final(out, rule.outputs[i] if i < len(rule.outputs) else None)
            got_scr = _final(out, scr.outputs[i] if i < len(scr.outputs) else None)
            assert _pruned_subset(got_scr, got_rule), (name, seed, f"output {i}")
        for arg, m in call.inputs.items():
            if m is None or (name, arg) in CONSERVATIVE:
                continue
            got_rule = _final(m, rule.inputs.get(arg))
            got_scr = _final(m, scr.inputs.get(arg))
            assert _pruned_subset(got_scr, got_rule), (name, seed, arg)
