"""Precision of the rules on the hard cases: the exact masks expected, not only soundness.

Each test builds the Call through sparta.rulecheck (which also checks soundness on random data)
and compares the refined masks with what a careful hand derivation says.
"""

from __future__ import annotations

import torch

import sparta.propagation_rules  # noqa: F401  (registers the rules)
from sparta.rulecheck import check_rule

aten = torch.ops.aten


def ones(*s: int) -> torch.Tensor:
    return torch.ones(s, dtype=torch.bool)


def zeros(*s: int) -> torch.Tensor:
    return torch.zeros(s, dtype=torch.bool)


def r(*s: int) -> torch.Tensor:
    return torch.randn(s)


def eq(a: torch.Tensor, b: torch.Tensor) -> bool:
    return tuple(a.shape) == tuple(b.shape) and torch.equal(a, b.expand(a.shape))


# ------------------------------------------------------------------ linear / addmm


def test_linear_bias_keeps_a_pruned_row_alive() -> None:
    w = ones(6, 8)
    w[2] = False  # FFN unit 2 pruned
    bias_pruned = ones(6)
    bias_pruned[2] = False
    ref = check_rule(aten.linear.default, (r(3, 8), r(6, 8), r(6)),
                     input_masks={"weight": w, "bias": bias_pruned})  # fmt: skip
    assert eq(ref.outputs[0], ones(3, 6).index_fill(1, torch.tensor([2]), False))
    ref = check_rule(aten.linear.default, (r(3, 8), r(6, 8), r(6)), input_masks={"weight": w})
    assert bool(ref.outputs[0].all())  # the kept bias keeps output feature 2 alive
    ref = check_rule(aten.linear.default, (r(3, 8), r(6, 8)), input_masks={"weight": w})
    assert eq(ref.outputs[0], ones(3, 6).index_fill(1, torch.tensor([2]), False))


def test_linear_backward_unused_feature_prunes_row_and_bias() -> None:
    used = ones(2, 3, 6)
    used[..., 4] = False  # output feature 4 unused by every token
    used[0, 0, 1] = False  # feature 1 unused by one token only
    w = ones(6, 8)
    w[:, 5] = False  # input feature 5 read by no output
    ref = check_rule(aten.linear.default, (r(2, 3, 8), r(6, 8), r(6)),
                     input_masks={"weight": w}, used=used)  # fmt: skip
    assert eq(ref.inputs["bias"], ones(6).index_fill(0, torch.tensor([4]), False))
    assert eq(ref.inputs["weight"], ones(6, 8).index_fill(0, torch.tensor([4]), False))
    assert eq(ref.inputs["input"], ones(2, 3, 8).index_fill(2, torch.tensor([5]), False))


def test_addmm_conv1d_orientation_and_beta() -> None:
    w = ones(8, 6)  # GPT-2 Conv1D: (in, out)
    w[:, 3] = False
    b = ones(6)
    b[3] = False
    ref = check_rule(aten.addmm.default, (r(6), r(4, 8), r(8, 6)),
                     input_masks={"self": b, "mat2": w})  # fmt: skip
    assert eq(ref.outputs[0], ones(4, 6).index_fill(1, torch.tensor([3]), False))
    ref = check_rule(aten.addmm.default, (r(6), r(4, 8), r(8, 6)), input_masks={"mat2": w})
    assert bool(ref.outputs[0].all())
    ref = check_rule(aten.addmm.default, (r(6), r(4, 8), r(8, 6)), {"beta": 0.0},
                     input_masks={"mat2": w})  # fmt: skip
    assert eq(ref.outputs[0], ones(4, 6).index_fill(1, torch.tensor([3]), False))
    assert not bool(ref.inputs["self"].any())  # beta = 0 drops the bias
    used = ones(4, 6)
    used[:, 0] = False
    ref = check_rule(aten.addmm.default, (r(6), r(4, 8), r(8, 6)), used=used)
    assert eq(ref.inputs["self"], ones(6).index_fill(0, torch.tensor([0]), False))
    assert eq(ref.inputs["mat2"], ones(8, 6).index_fill(1, torch.tensor([0]), False))


def test_matmul_and_bmm_are_exact() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 4, 8, generator=gen) > 0.7
    bm = torch.rand(2, 8, 5, generator=gen) > 0.7
    ref = check_rule(
        aten.bmm.default, (r(2, 4, 8), r(2, 8, 5)), input_masks={"self": a, "mat2": bm}
    )
    brute = (a[..., :, :, None] & bm[..., None, :, :]).any(dim=-2)
    assert eq(ref.outputs[0], brute)
    used = torch.rand(2, 4, 5, generator=gen) > 0.5
    ref = check_rule(aten.matmul.default, (r(2, 4, 8), r(2, 8, 5)),
                     input_masks={"self": a, "other": bm}, used=used)  # fmt: skip
    out = used & brute
    # (the engine intersects a returned input mask with the input's own mask)
    assert eq(ref.inputs["self"] & a, a & (out[:, :, None, :] & bm[:, None, :, :]).any(-1))
    assert eq(ref.inputs["other"] & bm, bm & (out[:, :, None, :] & a[:, :, :, None]).any(1))


# ------------------------------------------------------------------ normalisation


def test_layer_norm_shift_and_group_coupling() -> None:
    x = ones(2, 3, 8)
    x[0, 0, 3] = False  # one pruned element: its output is not zero (mean subtracted)
    x[1, 2, :] = False  # a whole token pruned: normalised value 0, output = bias
    w, b = ones(8), ones(8)
    w[5] = False  # scale pruned, bias kept -> output kept
    w[6], b[6] = False, False  # both pruned -> output pruned
    b[0] = False
    ref = check_rule(aten.layer_norm.default, (r(2, 3, 8), [8], r(8), r(8)),
                     input_masks={"input": x, "weight": w, "bias": b})  # fmt: skip
    expect = ones(2, 3, 8)
    expect[..., 6] = False
    expect[1, 2, :] = b  # whole token pruned: only the shift remains
    assert eq(ref.outputs[0], expect)
    assert bool(ref.outputs[0][0, 0, 3])

    used = zeros(2, 3, 8)
    used[0, 1, 2] = True  # one kept output: its whole token is used
    used[1, 0, 6] = True  # kept output through a pruned scale: token not used through it
    ref = check_rule(aten.layer_norm.default, (r(2, 3, 8), [8], r(8), r(8)),
                     input_masks={"weight": w, "bias": b}, used=used)  # fmt: skip
    expect_x = zeros(2, 3, 8)
    expect_x[0, 1, :] = True
    assert eq(ref.inputs["input"], expect_x)
    assert eq(ref.inputs["weight"] & w, zeros(8).index_fill(0, torch.tensor([2]), True))
    assert eq(ref.inputs["bias"] & b, zeros(8).index_fill(0, torch.tensor([2]), True))


def test_batch_norm_eval_shift() -> None:
    x = ones(2, 4, 3, 3)
    x[:, 1] = False  # channel 1 pruned
    x[:, 2] = False
    w, b = ones(4), ones(4)
    b[1] = False
    w[3], b[3] = False, False
    args = (r(2, 4, 3, 3), r(4), r(4), r(4), r(4).abs() + 0.5, False, 0.1, 1e-5, False)
    ref = check_rule(aten.batch_norm.default, args,
                     input_masks={"input": x, "weight": w, "bias": b})  # fmt: skip
    # channel 1: x pruned but (0 - running_mean) * w is not zero -> kept; channel 3 pruned
    assert eq(ref.outputs[0].any(dim=(0, 2, 3)), torch.tensor([True, True, True, False]))
    # with running_mean pruned too, channel 1 (bias pruned) is zero, channel 2 (bias kept) not
    rm = ones(4)
    rm[1] = rm[2] = False
    masks = {"input": x, "weight": w, "bias": b, "running_mean": rm}
    ref = check_rule(aten.batch_norm.default, args, input_masks=masks)
    assert eq(ref.outputs[0].any(dim=(0, 2, 3)), torch.tensor([True, False, True, False]))
    # backward: an unused channel makes its weight, bias and stats unused
    used = ones(2, 4, 3, 3)
    used[:, 0] = False
    ref = check_rule(aten._native_batch_norm_legit_no_training.default,
                     (r(2, 4, 3, 3), r(4), r(4), r(4), r(4).abs() + 0.5, 0.1, 1e-5),
                     used=(used, ones(0), ones(0)))  # fmt: skip
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert eq(ref.inputs[name], torch.tensor([False, True, True, True])), name
    assert eq(ref.inputs["input"], used)


# ------------------------------------------------------------------ residual and views


def test_residual_add_keeps_what_either_side_keeps() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 8, generator=gen) > 0.5, torch.rand(2, 8, generator=gen) > 0.5
    ref = check_rule(aten.add.Tensor, (r(2, 8), r(2, 8)), input_masks={"self": a, "other": b})
    assert eq(ref.outputs[0], a | b)
    used = torch.rand(2, 8, generator=gen) > 0.5
    ref = check_rule(aten.add.Tensor, (r(2, 8), r(2, 8)), used=used)
    assert eq(ref.inputs["self"], used) and eq(ref.inputs["other"], used)


def test_head_split_and_merge_are_exact() -> None:
    feat = ones(64)
    feat[16:32] = False  # head 1 of 4 (head dim 16)
    x = feat.expand(2, 8, 64).clone()
    ref = check_rule(aten.view.default, (r(2, 8, 64), [2, 8, 4, 16]), input_masks={"self": x})
    heads = ref.outputs[0]
    assert not bool(heads[:, :, 1].any()) and bool(heads[:, :, [0, 2, 3]].all())
    ref = check_rule(aten.transpose.int, (r(2, 8, 4, 16), 1, 2), input_masks={"self": heads})
    assert eq(ref.outputs[0], heads.transpose(1, 2))
    ref = check_rule(aten.permute.default, (r(2, 8, 4, 16), [0, 2, 1, 3]),
                     used=heads.permute(0, 2, 1, 3))  # fmt: skip
    assert eq(ref.inputs["self"], heads)
    ref = check_rule(aten.view.default, (r(2, 8, 4, 16), [2, 8, 64]), used=x)
    assert eq(ref.inputs["self"], heads)
    x = ones(2, 3, 4, 5).index_fill(1, torch.tensor([1]), False)
    ref = check_rule(aten.flatten.using_ints, (r(2, 3, 4, 5), 1), input_masks={"self": x})
    assert eq(ref.outputs[0], ones(2, 60).index_fill(1, torch.arange(20, 40), False))


# ------------------------------------------------------------------ attention


def _sdpa(q, k, v, used=None, **kw):  # noqa: ANN001, ANN202
    args = (r(*q.shape), r(*k.shape), r(*v.shape))
    return check_rule(aten.scaled_dot_product_attention.default, args, kw,
                      input_masks={"query": q, "key": k, "value": v}, used=used)  # fmt: skip


def test_sdpa_pruned_value_head_gives_pruned_output() -> None:
    v = ones(2, 4, 6, 8)
    v[:, 2] = False  # head 2's values pruned
    v[:, :, :, 5] = False  # value feature 5 pruned in every head
    ref = _sdpa(ones(2, 4, 5, 8), ones(2, 4, 6, 8), v)
    out = ref.outputs[0]
    assert not bool(out[:, 2].any()) and not bool(out[..., 5].any())
    assert bool(out[:, [0, 1, 3]][..., [0, 1, 2, 3, 4, 6, 7]].all())
    # that head's scores cannot matter either: its Q and K are unused
    assert not bool(ref.inputs["query"][:, 2].any()) and not bool(ref.inputs["key"][:, 2].any())


def test_sdpa_unused_head_prunes_qkv() -> None:
    used = ones(2, 4, 5, 8)
    used[:, 1] = False
    ref = _sdpa(ones(2, 4, 5, 8), ones(2, 4, 6, 8), ones(2, 4, 6, 8), used=used)
    for name in ("query", "key", "value"):
        m = ref.inputs[name]
        assert not bool(m[:, 1].any()) and bool(m[:, [0, 2, 3]].all()), name


def test_sdpa_qk_features_and_masks() -> None:
    q, k = ones(1, 2, 5, 8), ones(1, 2, 6, 8)
    q[..., 0] = False  # q feature 0 pruned: k feature 0 unused
    k[..., 7] = False  # k feature 7 pruned: q feature 7 unused
    ref = _sdpa(q, k, ones(1, 2, 6, 8))
    assert not bool(ref.inputs["key"][..., 0].any()) and not bool(ref.inputs["query"][..., 7].any())
    assert bool(ref.outputs[0].all())  # softmax weights are never known zero
    # causal: value row s is read only by queries l >= s; a pruned last value row ...
    v = ones(1, 1, 4, 3)
    v[..., 0, :] = False  # key 0 has zero values: query 0 sees only key 0 -> zero output
    ref = _sdpa(ones(1, 1, 4, 3), ones(1, 1, 4, 3), v, is_causal=True)
    assert not bool(ref.outputs[0][..., 0, :].any()) and bool(ref.outputs[0][..., 1:, :].all())
    used = zeros(1, 1, 4, 3)
    used[..., 1, :] = True  # only query 1 is used: keys/values 2, 3 are not read
    ref = _sdpa(ones(1, 1, 4, 3), ones(1, 1, 4, 3), ones(1, 1, 4, 3), used=used, is_causal=True)
    assert eq(ref.inputs["value"][0, 0].any(-1), torch.tensor([True, True, False, False]))
    assert eq(ref.inputs["key"][0, 0].any(-1), torch.tensor([True, True, False, False]))
    assert eq(ref.inputs["query"][0, 0].any(-1), torch.tensor([False, True, False, False]))


def test_sdpa_attn_mask_used_where_outputs_are() -> None:
    used = ones(2, 2, 5, 4)
    used[0] = False
    args = (r(2, 2, 5, 4), r(2, 2, 6, 4), r(2, 2, 6, 4), r(2, 1, 5, 6))
    ref = check_rule(aten.scaled_dot_product_attention.default, args, used=used)
    assert not bool(ref.inputs["attn_mask"][0].any()) and bool(ref.inputs["attn_mask"][1].all())


def test_sdpa_gqa() -> None:
    v = ones(1, 2, 6, 4)
    v[:, 1] = False  # kv head 1 serves query heads 2, 3
    ref = _sdpa(ones(1, 4, 5, 4), ones(1, 2, 6, 4), v, enable_gqa=True)
    assert eq(ref.outputs[0].any(dim=(0, 2, 3)), torch.tensor([True, True, False, False]))
    used = ones(1, 4, 5, 4)
    used[:, :2] = False  # query heads 0, 1 unused: kv head 0 unused
    ref = _sdpa(ones(1, 4, 5, 4), ones(1, 2, 6, 4), ones(1, 2, 6, 4), used=used, enable_gqa=True)
    assert eq(ref.inputs["key"].any(dim=(0, 2, 3)), torch.tensor([False, True]))
    assert eq(ref.inputs["value"].any(dim=(0, 2, 3)), torch.tensor([False, True]))


def test_softmax_has_no_forward_zeros_and_couples_rows() -> None:
    x = ones(3, 5)
    x[0] = False
    used = zeros(3, 5)
    used[1, 2] = True
    ref = check_rule(
        aten._softmax.default, (r(3, 5), -1, False), input_masks={"self": x}, used=used
    )
    assert len(ref.outputs) == 0 or ref.outputs[0] is None or bool(ref.outputs[0].all())
    assert eq(ref.inputs["self"], zeros(3, 5).index_fill(0, torch.tensor([1]), True))


def test_masked_fill_with_constant_condition() -> None:
    cond = torch.tensor([[True, False, False], [False, True, False]])
    x = torch.tensor([[True, True, False], [True, True, True]])
    ref = check_rule(aten.masked_fill.Scalar, (r(2, 3), cond, 0.0), input_masks={"self": x},
                     const_args=("mask",))  # fmt: skip
    assert eq(ref.outputs[0], ~cond & x)  # filled with 0 where cond; pruned input elsewhere
    assert eq(ref.inputs["self"], ~cond)  # filled positions do not read the input
    ref = check_rule(aten.masked_fill.Scalar, (r(2, 3), cond, -1e4), input_masks={"self": x},
                     const_args=("mask",))  # fmt: skip
    assert eq(ref.outputs[0], cond | x)


# ------------------------------------------------------------------ embedding and indexing


def test_embedding() -> None:
    w = ones(10, 6)
    w[:, 4] = False
    ids = torch.randint(0, 10, (2, 3))
    ref = check_rule(aten.embedding.default, (r(10, 6), ids), input_masks={"weight": w})
    assert eq(ref.outputs[0], ones(2, 3, 6).index_fill(2, torch.tensor([4]), False))
    assert bool(ref.inputs["indices"].all())
    used = ones(2, 3, 6)
    used[..., 1] = False
    ref = check_rule(aten.embedding.default, (r(10, 6), ids), used=used)
    assert eq(ref.inputs["weight"], ones(10, 6).index_fill(1, torch.tensor([1]), False))
    ref = check_rule(aten.embedding.default, (r(10, 6), ids), used=zeros(2, 3, 6))
    assert not bool(ref.inputs["indices"].any()) and not bool(ref.inputs["weight"].any())
    ids = torch.tensor([[1, 2], [2, 2]])  # constant indices: rows 0, 3.. are not read
    ref = check_rule(aten.embedding.default, (r(10, 6), ids), const_args=("indices",))
    assert eq(
        ref.inputs["weight"].any(1),
        torch.arange(10).unsqueeze(0).eq(torch.tensor([[1], [2]])).any(0),
    )


def test_cat_split_slice_select_exact() -> None:
    a, b = ones(2, 3), zeros(2, 4)
    ref = check_rule(aten.cat.default, ([r(2, 3), r(2, 4)], 1), input_masks={"tensors": (a, b)})
    assert eq(ref.outputs[0], torch.cat([a, b], 1))
    used = ones(2, 7)
    used[:, 1] = False
    ref = check_rule(aten.cat.default, ([r(2, 3), r(2, 4)], 1), used=used)
    assert eq(ref.inputs["tensors"][0], used[:, :3]) and eq(ref.inputs["tensors"][1], used[:, 3:])
    x = ones(2, 8, 192)
    x[..., 70] = False  # feature 6 of the K third
    ref = check_rule(aten.split.Tensor, (r(2, 8, 192), 64, 2), input_masks={"self": x})
    assert bool(ref.outputs[0].all()) and not bool(ref.outputs[1][..., 6].any())
    used = (ones(2, 8, 64), zeros(2, 8, 64), ones(2, 8, 64))  # K unused: its third unused
    ref = check_rule(aten.split.Tensor, (r(2, 8, 192), 64, 2), used=used)
    assert eq(ref.inputs["self"], torch.cat(used, 2))
    ref = check_rule(aten.slice.Tensor, (r(4, 9), 1, 2, 8, 2), used=ones(4, 3))
    expect = zeros(4, 9)
    expect[:, 2:8:2] = True  # positions the slice does not read are unused by it
    assert eq(ref.inputs["self"], expect)
    ref = check_rule(aten.select.int, (r(2, 8, 64), 1, 0), used=ones(2, 64))  # BERT pooler: CLS
    expect = zeros(2, 8, 64)
    expect[:, 0] = True
    assert eq(ref.inputs["self"], expect)
    ref = check_rule(aten.chunk.default, (r(6, 4), 3), used=(ones(2, 4), zeros(2, 4), ones(2, 4)))
    assert eq(ref.inputs["self"].any(1), torch.tensor([True, True, False, False, True, True]))


# ------------------------------------------------------------------ convolution and pooling


def test_conv2d_channels_and_bias() -> None:
    w = ones(4, 3, 3, 3)
    w[1] = False  # output channel 1: all weights pruned
    w[:, 2] = False  # input channel 2 read by no output channel
    b = ones(4)
    b[1] = False
    args = (r(2, 3, 6, 6), r(4, 3, 3, 3), r(4), [1, 1], [1, 1])
    ref = check_rule(aten.conv2d.default, args, input_masks={"weight": w, "bias": b})
    assert eq(ref.outputs[0].any(dim=(0, 2, 3)), torch.tensor([True, False, True, True]))
    assert bool(ref.outputs[0][:, [0, 2, 3]].all())  # no spatial zeros claimed from dense data
    assert eq(ref.inputs["input"].any(dim=(0, 2, 3)), torch.tensor([True, True, False]))
    ref = check_rule(aten.conv2d.default, args, input_masks={"weight": w})
    assert bool(ref.outputs[0].all())  # the bias keeps channel 1 alive
    used = ones(2, 4, 6, 6)
    used[:, 3] = False
    ref = check_rule(aten.conv2d.default, args, used=used)
    assert eq(ref.inputs["bias"], torch.tensor([True, True, True, False]))
    assert not bool(ref.inputs["weight"][3].any()) and bool(ref.inputs["weight"][:3].all())
    # a pruned input pixel gives no spatial zero under a dense 3x3 kernel (exact, not a guess)
    x = ones(1, 3, 6, 6)
    x[..., 2, 2] = False
    ref = check_rule(aten.conv2d.default, (r(1, 3, 6, 6), r(4, 3, 3, 3), None, [1, 1], [1, 1]),
                     input_masks={"input": x})  # fmt: skip
    assert bool(ref.outputs[0].all())
    x = zeros(1, 3, 6, 6)
    x[..., 0, 0] = True  # only the corner kept: outputs within reach of it are kept
    ref = check_rule(aten.conv2d.default, (r(1, 3, 6, 6), r(4, 3, 3, 3), None, [1, 1], [1, 1]),
                     input_masks={"input": x})  # fmt: skip
    expect = zeros(1, 4, 6, 6)
    expect[..., :2, :2] = True
    assert eq(ref.outputs[0], expect)


def test_pooling_channels() -> None:
    x = ones(2, 3, 6, 6)
    x[:, 1] = False  # a pruned channel gives a pruned output channel
    x[:, 2, :2, :2] = False  # one pruned window in channel 2
    ref = check_rule(aten.max_pool2d.default, (r(2, 3, 6, 6), [2, 2]), input_masks={"self": x})
    out = ref.outputs[0]
    assert not bool(out[:, 1].any()) and not bool(out[:, 2, 0, 0].any())
    assert int(out[:, 2].sum()) == 2 * 8 and bool(out[:, 0].all())
    used = ones(2, 3, 3, 3)
    used[:, 0] = False
    ref = check_rule(aten.max_pool2d.default, (r(2, 3, 6, 6), [2, 2]), used=used)
    assert not bool(ref.inputs["self"][:, 0].any()) and bool(ref.inputs["self"][:, 1:].all())
    ref = check_rule(aten.adaptive_avg_pool2d.default, (r(2, 3, 6, 6), [1, 1]),
                     input_masks={"self": x})  # fmt: skip
    assert eq(ref.outputs[0].reshape(2, 3), torch.tensor([True, False, True]).expand(2, 3))


def test_bool_mm_structured_paths_match_brute_force() -> None:
    from sparta.propagation_rules._util import bool_mm

    gen = torch.Generator().manual_seed(0)

    def variants(m: int, n: int) -> list[torch.Tensor]:
        return [
            torch.rand(m, n, generator=gen) > 0.6,  # unstructured
            (torch.rand(1, n, generator=gen) > 0.5).expand(m, n),  # identical rows
            (torch.rand(m, 1, generator=gen) > 0.5).expand(m, n),  # identical columns
            zeros(m, n),
            ones(m, n),
        ]

    for a in variants(5, 7):
        for b in variants(7, 4):
            brute = (a[:, :, None] & b[None, :, :]).any(dim=1)
            assert torch.equal(bool_mm(a, b), brute)


def test_checker_catches_optimistic_rules() -> None:
    """The checker itself: a rule that claims too much fails, naming the op, argument, index."""
    import pytest

    from sparta.registry import elementwise, lookup, refine, register_rule, unregister_rule

    op = aten.sigmoid.default
    original = lookup(op)
    packet = op.overloadpacket
    unregister_rule(packet)
    try:
        register_rule(op, name="wrong-forward")(elementwise("any", "self"))  # sigmoid(0) != 0
        x = torch.tensor([[True, False, True]])
        with pytest.raises(
            AssertionError, match=r"aten.sigmoid.default: output 0 element \(0, 1\)"
        ):
            check_rule(op, (r(1, 3),), input_masks={"self": x})
        unregister_rule(op)
        register_rule(op, name="wrong-backward")(lambda c: refine(self=zeros(1, 3)))
        with pytest.raises(AssertionError, match="pruning argument 'self'"):
            check_rule(op, (r(1, 3),))
    finally:
        unregister_rule(op)
        register_rule(packet, name=original.name)(original.fn)


# ------------------------------------------------------------------ einsum, rms_norm


def test_einsum_is_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(2, 4, 8, generator=gen) > 0.6
    b = torch.rand(8, 5, generator=gen) > 0.6
    args = ("bij,jk->bik", [r(2, 4, 8), r(8, 5)])
    brute = (a[:, :, :, None] & b[None, None]).any(dim=-2)
    ref = check_rule(aten.einsum.default, args, input_masks={"tensors": (a, b)})
    assert eq(ref.outputs[0], brute) and not bool(brute.all())
    used = torch.rand(2, 4, 5, generator=gen) > 0.5
    ref = check_rule(aten.einsum.default, args, input_masks={"tensors": (a, b)}, used=used)
    out = used & brute
    a_used = a & (out[:, :, None, :] & b[None, None]).any(dim=-1)
    b_used = b & (out[:, :, None, :] & a[..., None]).any(dim=(0, 1))
    got_a, got_b = ref.inputs["tensors"]
    assert eq(got_a & a, a_used) and eq(got_b & b, b_used)
    assert not bool(a_used.all()) and not bool(b_used.all())


def test_rms_norm_keeps_zeros_and_couples_the_group_backward() -> None:
    x = ones(2, 3, 8)
    x[0, 0, 3] = False  # no mean is subtracted: a zero input stays zero
    x[1, 2, :] = False
    w = ones(8)
    w[5] = False
    args = (r(2, 3, 8), [8], r(8))
    ref = check_rule(aten.rms_norm.default, args, input_masks={"input": x, "weight": w})
    assert eq(ref.outputs[0], x & w)
    used = zeros(2, 3, 8)
    used[0, 1, 2] = True  # one kept output: its whole token feeds the statistic
    used[1, 0, 5] = True  # a kept output through a pruned scale: the token is not used by it
    ref = check_rule(aten.rms_norm.default, args, input_masks={"weight": w}, used=used)
    expect_x = zeros(2, 3, 8)
    expect_x[0, 1, :] = True
    assert eq(ref.inputs["input"], expect_x)
    assert eq(ref.inputs["weight"] & w, zeros(8).index_fill(0, torch.tensor([2]), True))


def test_index_select_index_used_where_a_selected_line_is_kept() -> None:
    idx = torch.tensor([4, 0, 4, 2])
    for dim in (0, 1):
        shape = (6, 7) if dim == 0 else (7, 6)
        used = zeros(*((4, 7) if dim == 0 else (7, 4)))
        used.select(dim, 1).fill_(True)  # only the line selected by index entry 1 is used
        ref = check_rule(aten.index_select.default, (r(*shape), dim, idx), used=used,
                         const_args=("index",))  # fmt: skip
        assert eq(ref.inputs["index"], torch.tensor([False, True, False, False])), dim
        self_used = zeros(*shape)
        self_used.select(dim, 0).fill_(True)  # index entry 1 reads line 0
        assert eq(ref.inputs["self"], self_used), dim


def test_group_norm_groups_scale_and_shift() -> None:
    args = (r(2, 4, 3, 3), 2, r(4), r(4))  # 2 groups: channels (0, 1) and (2, 3)
    x = ones(2, 4, 3, 3)
    x[1, 2:4] = False  # sample 1: its whole second group is pruned
    w, b = ones(4), ones(4)
    w[1], b[1] = False, False  # scale and shift pruned: channel 1 is zero
    b[2] = False  # scale kept: channel 2 is zero only where its group is
    w[3], b[3] = False, False
    ref = check_rule(aten.group_norm.default, args,
                     input_masks={"input": x, "weight": w, "bias": b})  # fmt: skip
    expect = ones(2, 4, 3, 3)
    expect[:, 1] = False
    expect[1, 2] = False
    expect[:, 3] = False
    assert eq(ref.outputs[0], expect)
    used = zeros(2, 4, 3, 3)
    used[0, 0, 1, 1] = True  # one kept output: its sample's group 0 feeds the statistics
    ref = check_rule(aten.group_norm.default, args, used=used)
    expect_x = zeros(2, 4, 3, 3)
    expect_x[0, :2] = True
    assert eq(ref.inputs["input"], expect_x)
    channel0 = zeros(4).index_fill(0, torch.tensor([0]), True)
    assert eq(ref.inputs["weight"], channel0) and eq(ref.inputs["bias"], channel0)


def test_pow_by_a_positive_constant_keeps_zeros() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 5, generator=gen) > 0.4
    used = torch.rand(3, 5, generator=gen) > 0.4
    ref = check_rule(aten.pow.Tensor_Scalar, (r(3, 5), 2), input_masks={"self": x}, used=used)
    assert eq(ref.outputs[0], x) and eq(ref.inputs["self"], used)
    ref = check_rule(aten.pow.Tensor_Scalar, (r(3, 5), 0), input_masks={"self": x})
    assert bool(ref.outputs[0].all()) and not bool(ref.inputs["self"].any())  # x ** 0 == 1


def test_movedim_moves_the_mask() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 4, generator=gen) > 0.5
    for src, dst in ((1, 0), (-1, 0), (0, 2), ([0, 2], [2, 1])):
        want = x.movedim(src, dst)
        ref = check_rule(aten.movedim.intlist if isinstance(src, list) else aten.movedim.int,
                         (r(2, 3, 4), src, dst), input_masks={"self": x})  # fmt: skip
        assert eq(ref.outputs[0], want), (src, dst)
        ref = check_rule(aten.movedim.intlist if isinstance(src, list) else aten.movedim.int,
                         (r(2, 3, 4), src, dst), used=want)  # fmt: skip
        assert eq(ref.inputs["self"], x), (src, dst)


def test_native_group_norm_statistics_of_a_pruned_group() -> None:
    x = ones(2, 4, 3, 3)
    x[1, 2:4] = False  # sample 1, group 1: all pruned, so is its mean
    args = (r(2, 4, 3, 3), r(4), r(4), 2, 4, 9, 2, 1e-5)
    ref = check_rule(aten.native_group_norm.default, args, input_masks={"input": x})
    assert eq(ref.outputs[1], torch.tensor([[True, True], [True, False]]))


def test_sdpa_without_a_head_dim() -> None:
    q, k, v = r(2, 5, 8), r(2, 7, 8), r(2, 7, 6)  # (batch, tokens, features): S != features
    sdpa = aten.scaled_dot_product_attention.default
    vm = ones(2, 7, 6)
    vm[..., 2] = False
    ref = check_rule(sdpa, (q, k, v), input_masks={"value": vm})
    assert eq(ref.outputs[0], ones(2, 5, 6).index_fill(2, torch.tensor([2]), False))
    used = zeros(2, 5, 6)
    used[0, 1, 0] = True  # one output element of query 1 in batch 0
    ref = check_rule(sdpa, (q, k, v), used=used)
    v_used, q_used, k_used = zeros(2, 7, 6), zeros(2, 5, 8), zeros(2, 7, 8)
    v_used[0, :, 0] = True
    q_used[0, 1] = True
    k_used[0] = True
    assert eq(ref.inputs["value"], v_used) and eq(ref.inputs["query"], q_used)
    assert eq(ref.inputs["key"], k_used)


def test_all_and_any_over_several_dims() -> None:
    x = ones(3, 4)
    x[0, 1] = False  # one zero makes all() False: the output is zero
    x[2] = False
    for op, want in ((aten.all.dims, [False, True, False]), (aten.any.dims, [True, True, False])):
        ref = check_rule(op, (r(3, 4).abs() + 0.1, [1]), input_masks={"self": x})
        assert eq(ref.outputs[0], torch.tensor(want)), op


def test_cat_skips_legacy_empty_inputs() -> None:
    """ATen's cat ignores 1-D empty tensors beside higher-rank ones (legacy behaviour)."""
    a, b = ones(2, 3), ones(1, 3)
    a[0, 1] = False
    args = ([r(2, 3), torch.empty(0), r(1, 3)], 0)
    ref = check_rule(aten.cat.default, args, input_masks={"tensors": (a, ones(0), b)})
    assert eq(ref.outputs[0], torch.cat([a, b]))
    used = ones(3, 3)
    used[2] = False
    ref = check_rule(aten.cat.default, args, input_masks={"tensors": (a, ones(0), b)}, used=used)
    got_a, got_empty, got_b = ref.inputs["tensors"]
    assert eq(got_a, ones(2, 3)) and tuple(got_empty.shape) == (0,) and not bool(got_b.any())


def test_batch_norm_training_saved_statistics_read_every_input() -> None:
    """Training: a used saved mean (output 1) reads every element of the input, even in a
    channel whose normalised output nobody uses; with no statistic used, that channel is not."""
    args = (r(2, 4, 3, 3), r(4), r(4), r(4), r(4).abs() + 0.5, True, 0.1, 1e-5)
    used = ones(2, 4, 3, 3)
    used[:, 1] = False
    for stats in [(ones(4), zeros(4)), (zeros(4), ones(4))]:  # saved mean, or saved invstd
        ref = check_rule(aten.native_batch_norm.default, args, used=(used, *stats))
        assert bool(ref.inputs.get("input", ones(1)).all()), stats
    ref = check_rule(aten.native_batch_norm.default, args, used=(used, zeros(4), zeros(4)))
    assert eq(ref.inputs["input"], used)


def test_batch_norm_running_var_pruned_only_for_a_positive_eps() -> None:
    """Where (x - mean) * w is zero the variance is not read, but a zeroed variance gives
    rsqrt(eps): finite only for eps > 0."""
    x = ones(2, 4, 3, 3)
    x[:, 1] = False
    rm = ones(4)
    rm[1] = False  # channel 1: x and running_mean pruned, x - mean is zero
    masks = {"input": x, "running_mean": rm}
    for eps, var_pruned in ((1e-5, True), (-0.5, False)):
        args = (r(2, 4, 3, 3), r(4), r(4), r(4), r(4).abs() + 1.0, False, 0.1, eps, False)
        ref = check_rule(aten.batch_norm.default, args, input_masks=masks)
        var = ref.inputs.get("running_var")
        assert (var is not None and not bool(var[1])) == var_pruned, eps


def test_scalar_is_zero() -> None:
    from sparta.propagation_rules._util import scalar_is_zero

    assert scalar_is_zero(0) and scalar_is_zero(0.0) and scalar_is_zero(False)
    assert scalar_is_zero(torch.tensor(0.0)) and scalar_is_zero(torch.zeros(1, 1))
    assert not scalar_is_zero(torch.tensor(2.0)) and not scalar_is_zero(torch.zeros(2))
    assert not scalar_is_zero(1e-9) and not scalar_is_zero(True) and not scalar_is_zero(None)
