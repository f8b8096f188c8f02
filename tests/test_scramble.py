"""Tensor scrambling: inferred rules are sound, as exact as the trials allow, and cheap."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparta import scramble
from sparta.calls import make_call
from sparta.registry import Call, Refined
from sparta.scramble import INFERRED_RULE_NAME, ScrambleWarning, can_scramble, infer

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    scramble.clear_cache()


def ones(*shape: int) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool)


def build(
    op: Any,
    args: tuple,
    kwargs: Mapping[str, Any] | None = None,
    *,
    masks: Mapping[int, torch.Tensor] | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
    consts: Mapping[int, torch.Tensor] | None = None,
) -> Call:
    """A Call for ``op(*args)``; ``masks``/``consts`` are keyed by ``id`` of the argument."""
    kwargs = dict(kwargs or {})
    masks, consts = dict(masks or {}), dict(consts or {})
    res = op(*args, **kwargs)
    outs = tuple(res) if isinstance(res, (list, tuple)) else (res,)
    return make_call(
        op,
        args,
        kwargs,
        out if out is not None else tuple(ones(*o.shape) for o in outs),
        mask_of=lambda v: (
            masks.get(id(v), torch.ones(v.shape, dtype=torch.bool))
            if isinstance(v, torch.Tensor)
            else None
        ),
        const_of=lambda v: consts.get(id(v)),
        out_dtypes=tuple(o.dtype for o in outs),
    )


def quiet(call: Call, **kw: Any) -> Refined:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScrambleWarning)
        return infer(call, **kw)


# --------------------------------------------------------------------- which ops may run


def test_can_scramble_refuses_mutation_randomness_garbage_and_non_tensor_results() -> None:
    assert can_scramble(aten.linear.default)
    assert can_scramble(aten.split.Tensor)  # Tensor[] result
    assert not can_scramble(aten.add_.Tensor)  # in-place
    assert not can_scramble(aten.add.out)  # writes into `out`
    assert not can_scramble(aten.native_dropout.default)  # nondeterministic_seeded
    assert not can_scramble(aten.rand_like.default)
    assert not can_scramble(aten.bernoulli.default)
    assert not can_scramble(aten.empty_like.default)  # uninitialised memory
    assert not can_scramble(aten._local_scalar_dense.default)  # returns a Scalar
    assert not can_scramble(aten.sym_size.int)
    assert not can_scramble(lambda x: x)  # not an operator


def test_not_scramblable_op_learns_nothing_and_says_why() -> None:
    x = torch.randn(4)
    call = build(aten.add.Tensor, (x, x))
    call = Call(aten.add_.Tensor, call.inputs, call.outputs, call.params, call.dtypes)
    with pytest.warns(ScrambleWarning, match="mutates"):
        assert infer(call) == Refined()


# --------------------------------------------------------------------- forward and backward


def test_linear_forward_prunes_output_features_of_pruned_rows_and_bias() -> None:
    x, w, b = torch.randn(8, 16), torch.randn(12, 16), torch.randn(12)
    wm = ones(12, 16)
    wm[3] = False
    wm[7] = False
    wm[:, 5] = False
    bm = ones(12)
    bm[3] = False  # row 7 keeps its bias: output feature 7 is not zero
    r = quiet(build(aten.linear.default, (x, w, b), masks={id(w): wm, id(b): bm}))
    want = ones(8, 12)
    want[:, 3] = False
    assert torch.equal(r.outputs[0], want)
    # backward: column 5 of the weight is pruned, so input feature 5 is unused
    want_x = ones(8, 16)
    want_x[:, 5] = False
    assert torch.equal(r.inputs["input"], want_x)


def test_linear_backward_unused_output_feature_prunes_weight_row_and_bias() -> None:
    x, w, b = torch.randn(8, 16), torch.randn(12, 16), torch.randn(12)
    om = ones(8, 12)
    om[:, 7] = False
    r = quiet(build(aten.linear.default, (x, w, b), out=(om,)))
    want_w = ones(12, 16)
    want_w[7] = False
    assert torch.equal(r.inputs["weight"], want_w)
    assert torch.equal(r.inputs["bias"], om[0])
    assert bool(r.inputs["input"].all())


@pytest.mark.parametrize(
    ("op", "extra", "zero_keeps_zero"),
    [
        (aten.relu.default, (), True),
        (aten.gelu.default, (), True),
        (aten.hardshrink.default, (0.5,), True),
        (aten.sigmoid.default, (), False),
        (aten.cos.default, (), False),
    ],
)
def test_unary_ops_match_their_exact_rule(op: Any, extra: tuple, zero_keeps_zero: bool) -> None:
    g = torch.Generator().manual_seed(1)
    m = torch.rand(32, 32, generator=g) > 0.5
    om = torch.rand(32, 32, generator=g) > 0.3
    x = torch.randn(32, 32)
    fwd = quiet(build(op, (x, *extra), masks={id(x): m}))
    assert torch.equal(fwd.outputs[0], m if zero_keeps_zero else ones(32, 32))
    bwd = quiet(build(op, (x, *extra), out=(om,)))
    assert torch.equal(bwd.inputs["self"], om)


def test_discrete_dependence_is_not_missed_by_zero_gradients() -> None:
    # topk's gradient reaches only the selected elements, but every element can be selected.
    v = torch.randn(4, 10)
    r = quiet(build(aten.topk.default, (v, 2)))
    assert bool(r.inputs["self"].all())
    # floor has a zero gradient everywhere; the perturbation test must still see the use.
    x = torch.randn(6, 5)
    om = ones(6, 5)
    om[2] = False
    r = quiet(build(aten.floor.default, (x,), out=(om,)))
    assert bool(r.inputs["self"][om].all())  # every kept output's input stays kept
    assert torch.equal(r.inputs["self"], om)  # small enough for the group test to be exact


def test_tensor_list_inputs_and_outputs() -> None:
    a, b = torch.randn(3, 4), torch.randn(3, 6)
    am = ones(3, 4)
    am[:, 1] = False
    r = quiet(build(aten.cat.default, ([a, b], 1), masks={id(a): am}))
    want = ones(3, 10)
    want[:, 1] = False
    assert torch.equal(r.outputs[0], want)
    om = ones(3, 10)
    om[:, 6:] = False
    r = quiet(build(aten.cat.default, ([a, b], 1), out=(om,)))
    assert isinstance(r.inputs["tensors"], tuple)
    assert bool(r.inputs["tensors"][0].all())
    assert torch.equal(r.inputs["tensors"][1], torch.cat([ones(3, 2), ~ones(3, 4)], 1))
    x = torch.randn(6, 4)
    xm = ones(6, 4)
    xm[4:] = False
    r = quiet(build(aten.split.Tensor, (x, 2), masks={id(x): xm}))
    assert [bool(o.all()) for o in r.outputs] == [True, True, False]
    assert not bool(r.outputs[2].any())


def test_integer_inputs_use_known_values_or_stay_conservative() -> None:
    w = torch.randn(10, 4)
    idx = torch.tensor([[1, 3], [3, 8]])
    call = build(aten.embedding.default, (w, idx), consts={id(idx): idx})
    r = quiet(call)
    want = torch.zeros(10, 4, dtype=torch.bool)
    want[[1, 3, 8]] = True  # rows nobody indexes are unused *for these known indices*
    assert torch.equal(r.inputs["weight"], want)
    # the same op with run-time indices: nothing can be inferred
    with pytest.warns(ScrambleWarning, match="no known value"):
        assert infer(build(aten.embedding.default, (w, idx))) == Refined()
    # a known boolean condition
    cond = torch.tensor([True, False, True, False])
    a, b = torch.randn(4), torch.randn(4)
    am = torch.tensor([False, False, True, True])
    r = quiet(build(aten.where.self, (cond, a, b), masks={id(a): am}, consts={id(cond): cond}))
    assert torch.equal(r.outputs[0], torch.tensor([False, True, True, True]))
    assert torch.equal(r.inputs["self"], torch.tensor([False, False, True, False]))
    assert torch.equal(r.inputs["other"], ~cond)


def test_custom_op_without_autograd_falls_back_to_perturbation() -> None:
    @torch.library.custom_op("sparta_scramble_test::rowmax_scale", mutates_args=())
    def rowmax_scale(x: torch.Tensor, s: float) -> torch.Tensor:
        return x.amax(dim=1, keepdim=True) * s * torch.ones_like(x)

    @rowmax_scale.register_fake
    def _(x: torch.Tensor, s: float) -> torch.Tensor:
        return torch.empty_like(x)

    op = torch.ops.sparta_scramble_test.rowmax_scale.default
    x = torch.randn(4, 8)
    xm = ones(4, 8)
    xm[1] = False
    om = ones(4, 8)
    om[2] = False
    r = quiet(build(op, (x, 2.0), masks={id(x): xm}, out=(om,)))
    want_out = ones(4, 8)
    want_out[1] = False
    assert torch.equal(r.outputs[0], want_out)
    want_in = ones(4, 8)
    want_in[1] = False
    want_in[2] = False
    assert torch.equal(r.inputs["x"], want_in)


# --------------------------------------------------------------------- contract


def test_deterministic_cached_and_warns_once_per_op() -> None:
    runs = []

    @torch.library.custom_op("sparta_scramble_test::counted", mutates_args=())
    def counted(x: torch.Tensor) -> torch.Tensor:
        runs.append(1)
        return x * 2

    @counted.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    op = torch.ops.sparta_scramble_test.counted.default
    x = torch.randn(5, 3)
    m = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) > 0.5
    call = build(op, (x,), masks={id(x): m})
    runs.clear()
    with pytest.warns(ScrambleWarning, match="inferred"):
        first = infer(call)
    assert INFERRED_RULE_NAME == "inferred (scrambling)"
    n = len(runs)
    assert n > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScrambleWarning)  # a second warning would raise
        again = infer(call)
        assert len(runs) == n  # cached: the op did not run again
        other = infer(build(op, (x,), masks={id(x): ~m}))  # new masks: runs, no warning
        assert len(runs) > n
    assert again is first
    assert torch.equal(other.outputs[0], ~m)
    scramble.clear_cache()
    fresh = quiet(call)
    assert torch.equal(fresh.outputs[0], first.outputs[0])
    assert torch.equal(fresh.inputs["x"], first.inputs["x"])


def test_too_large_calls_are_skipped_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scramble, "MAX_ELEMENTS", 100)
    x = torch.randn(20, 20)
    with pytest.warns(ScrambleWarning, match="exceed"):
        assert infer(build(aten.relu.default, (x,))) == Refined()


def test_failing_or_lying_ops_learn_nothing() -> None:
    x = torch.randn(4, 4)
    call = build(aten.relu.default, (x,))
    wrong = Call(call.op, call.inputs, (ones(3, 3),), call.params, call.dtypes)
    with pytest.warns(ScrambleWarning, match="shapes"):
        assert infer(wrong) == Refined()

    @torch.library.custom_op("sparta_scramble_test::picky", mutates_args=())
    def picky(x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return x.clone()

    @picky.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    c = build(torch.ops.sparta_scramble_test.picky.default, (x.abs(),))
    with pytest.warns(ScrambleWarning, match="failed"):
        assert infer(c) == Refined()


# --------------------------------------------------------------------- soundness, randomised


def _ops() -> list[tuple[str, Callable[[torch.Generator], tuple[Any, tuple, dict]]]]:
    def r(g: torch.Generator, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    return [
        ("linear", lambda g: (aten.linear.default, (r(g, 5, 6), r(g, 4, 6), r(g, 4)), {})),
        ("mm", lambda g: (aten.mm.default, (r(g, 5, 6), r(g, 6, 7)), {})),
        ("sum", lambda g: (aten.sum.dim_IntList, (r(g, 5, 6), [1], True), {})),
        ("softmax", lambda g: (aten._softmax.default, (r(g, 5, 6), -1, False), {})),
        ("mul", lambda g: (aten.mul.Tensor, (r(g, 5, 6), r(g, 1, 6)), {})),
        ("add", lambda g: (aten.add.Tensor, (r(g, 5, 6), r(g, 5, 6)), {})),
        ("permute", lambda g: (aten.permute.default, (r(g, 2, 3, 4), [2, 0, 1]), {})),
        ("amax", lambda g: (aten.amax.default, (r(g, 5, 6), [0]), {})),
        (
            "layer_norm",
            lambda g: (aten.layer_norm.default, (r(g, 5, 6), [6], r(g, 6), r(g, 6)), {}),
        ),
    ]


OPS = _ops()


@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    which=st.integers(0, len(OPS) - 1),
    seed=st.integers(0, 2**16),
    density=st.sampled_from([0.3, 0.6, 0.9]),
)
def test_inferred_masks_are_sound(which: int, seed: int, density: float) -> None:
    """Zero every input the inferred rule prunes (and the given pruned inputs): kept outputs
    do not change, and outputs the rule prunes are zero."""
    g = torch.Generator().manual_seed(seed)
    _, make = OPS[which]
    op, args, kwargs = make(g)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    masks = {id(t): torch.rand(t.shape, generator=g) < density for t in tensors}
    res = op(*args, **kwargs)
    out_m = (torch.rand(res.shape, generator=g) < density,)
    call = build(op, args, kwargs, masks=masks, out=out_m)
    r = quiet(call)
    names = [n for n in call.inputs if isinstance(call.inputs[n], torch.Tensor)]
    for _ in range(3):
        fresh = [torch.randn(t.shape, generator=g) for t in tensors]
        given_args, inferred_args = list(args), list(args)
        k = 0
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                m = masks[id(a)]
                im = r.inputs.get(names[k], m) & m
                given_args[i] = fresh[k] * m
                inferred_args[i] = fresh[k] * im
                k += 1
        ref = op(*given_args, **kwargs)
        got = op(*inferred_args, **kwargs)
        keep = out_m[0]
        assert torch.allclose(ref[keep], got[keep], atol=1e-5, rtol=1e-5)
        if r.outputs:
            assert bool((ref[~r.outputs[0]] == 0).all())


def test_selection_ops_use_every_candidate() -> None:
    # argmax/max depend on every element of the row, though no gradient says so.
    for seed in range(4):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
        r = quiet(build(aten.max.dim, (x, 1), out=(ones(4), ones(4))), seed=seed)
        assert bool(r.inputs["self"].all()), seed
        scramble.clear_cache()


def test_a_zeroed_divisor_is_not_free_even_where_the_output_is_unused() -> None:
    # a / 0 is inf or NaN, and 0 * inf downstream is NaN: an unused quotient still needs its
    # divisor, while the dividend there is unused.
    a, b = torch.randn(4, 8), torch.randn(4, 8).abs() + 1
    om = ones(4, 8)
    om[2:] = False
    r = quiet(build(aten.div.Tensor, (a, b), out=(om,)))
    assert bool(r.inputs["other"].all())
    assert torch.equal(r.inputs["self"], om)
