"""The op families strict mode needs on common models: resampling, padding and shifting,
activations with parameters, recurrent layers, sorts and selections, scatters, weight norm;
and the value-range facts that let rules prune through ops not finite at zero.

Every case runs ``sparta.rulecheck.check_rule`` (the rule's claims hold on random data, with the
given masks and with random used-output masks); precision tests compare with hand derivations.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparta.propagation_rules  # noqa: F401  (registers the rules)
from sparta.registry import lookup
from sparta.rulecheck import check_rule, positive

aten = torch.ops.aten
GEN = torch.Generator().manual_seed(0)


def rm(*shape: int, p: float = 0.5) -> torch.Tensor:
    return torch.rand(shape, generator=GEN) > p


def rn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=GEN)


def channels(*shape: int, pruned: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    m = torch.ones(shape, dtype=torch.bool)
    m[:, list(pruned)] = False
    return m


X4 = rn(2, 8, 6, 6)

# (op, args, input masks) — each checked with the given masks, then with random used outputs.
CASES = [
    # resampling
    (aten.pixel_shuffle.default, (X4, 2), {"self": rm(2, 8, 6, 6)}),
    (aten.pixel_unshuffle.default, (X4, 2), {"self": channels(2, 8, 6, 6)}),
    (aten.channel_shuffle.default, (X4, 2), {"self": channels(2, 8, 6, 6)}),
    (aten.upsample_nearest2d.default, (X4, [12, 9]), {"self": rm(2, 8, 6, 6)}),
    (aten.upsample_nearest2d.vec, (X4, None, [2.0, 1.5]), {"input": rm(2, 8, 6, 6)}),
    (aten._upsample_nearest_exact2d.default, (X4, [11, 12]), {"self": rm(2, 8, 6, 6)}),
    (aten.upsample_bilinear2d.default, (X4, [12, 9], False), {"self": rm(2, 8, 6, 6)}),
    (aten.upsample_bilinear2d.vec, (X4, None, True, [2.0, 2.0]), {"input": rm(2, 8, 6, 6)}),
    (aten._upsample_bilinear2d_aa.default, (X4, [3, 4], False), {"self": rm(2, 8, 6, 6)}),
    (aten.upsample_linear1d.default, (rn(2, 3, 7), [13], False), {"self": rm(2, 3, 7)}),
    (aten.upsample_bicubic2d.default, (X4, [12, 9], False), {"self": channels(2, 8, 6, 6)}),
    (aten.im2col.default, (X4, [3, 3], [1, 1], [1, 1], [2, 2]), {"self": rm(2, 8, 6, 6)}),
    (aten.col2im.default, (rn(2, 72, 9), [6, 6], [3, 3], [1, 1], [1, 1], [2, 2]),
     {"self": rm(2, 72, 9)}),
    (aten.unfold.default, (X4, 3, 3, 2), {"self": rm(2, 8, 6, 6)}),
    (aten.diagonal.default, (X4, 1, 2, 3), {"self": rm(2, 8, 6, 6)}),
    (aten.grid_sampler_2d.default, (X4, torch.rand(2, 5, 5, 2, generator=GEN) * 2 - 1, 0, 0,
                                    False), {"input": channels(2, 8, 6, 6)}),
    (aten.affine_grid_generator.default, (rn(2, 2, 3), [2, 3, 4, 4], False), {}),
    # padding and shifting
    (aten.reflection_pad2d.default, (X4, [1, 2, 2, 1]), {"self": rm(2, 8, 6, 6)}),
    (aten.replication_pad2d.default, (X4, [1, 2, 2, 1]), {"self": rm(2, 8, 6, 6)}),
    (aten.constant_pad_nd.default, (X4, [1, 2, 2, 1], 0.5), {"self": rm(2, 8, 6, 6)}),
    (aten.constant_pad_nd.default, (X4, [1, 2, 2, 1]), {"self": rm(2, 8, 6, 6)}),
    (aten.pad.default, (X4, [1, 2, 2, 1], "reflect"), {"self": rm(2, 8, 6, 6)}),
    (aten.pad.default, (X4, [1, 2, 0, 1], "circular"), {"self": rm(2, 8, 6, 6)}),
    (aten.roll.default, (X4, [1, -2], [1, 3]), {"self": rm(2, 8, 6, 6)}),
    (aten.flip.default, (X4, [1, 2]), {"self": rm(2, 8, 6, 6)}),
    (aten.rot90.default, (X4, 1, [2, 3]), {"self": rm(2, 8, 6, 6)}),
    (aten.repeat_interleave.self_int, (X4, 2, 1), {"self": rm(2, 8, 6, 6)}),
    # activations with parameters, elementwise ops of several inputs
    (aten.prelu.default, (rn(3, 4, 5), rn(4)), {"self": rm(3, 4, 5), "weight": rm(4)}),
    (aten._prelu_kernel.default, (rn(3, 4, 5), rn(1)), {"self": rm(3, 4, 5)}),
    (aten.glu.default, (rn(3, 4, 6), -1), {"self": rm(3, 4, 6)}),
    (aten.threshold.default, (rn(3, 5), 0.1, 0.0), {"self": rm(3, 5)}),
    (aten.threshold.default, (rn(3, 5), -0.1, 2.0), {"self": rm(3, 5)}),
    (aten.threshold.default, (rn(3, 5), 0.1, 2.0), {"self": rm(3, 5)}),
    (aten.rrelu.default, (rn(3, 5),), {"self": rm(3, 5)}),
    (aten.log_sigmoid_forward.default, (rn(3, 5),), {"self": rm(3, 5)}),
    (aten.heaviside.default, (rn(3, 5), rn(5)), {"self": rm(3, 5), "values": rm(5)}),
    (aten.copysign.Tensor, (rn(3, 5), rn(5)), {"self": rm(3, 5), "other": rm(5)}),
    (aten.xlogy.Tensor, (rn(3, 5), rn(5)), {"self": rm(3, 5)}),
    (aten.lerp.Scalar, (rn(3, 5), rn(3, 5), 0.3), {"self": rm(3, 5), "end": rm(3, 5)}),
    (aten.lerp.Tensor, (rn(3, 5), rn(3, 5), rn(5)), {"self": rm(3, 5), "end": rm(3, 5)}),
    (aten.addcmul.default, (rn(3, 5), rn(3, 5), rn(5)),
     {"self": rm(3, 5), "tensor1": rm(3, 5), "tensor2": rm(5)}),
    (aten.addcdiv.default, (rn(3, 5), rn(3, 5), rn(5)), {"self": rm(3, 5), "tensor1": rm(3, 5)}),
    (aten.hypot.default, (rn(3, 5), rn(3, 5)), {"self": rm(3, 5), "other": rm(3, 5)}),
    (aten.atan2.default, (rn(3, 5), rn(3, 5)), {"self": rm(3, 5), "other": rm(3, 5)}),
    (aten.float_power.Tensor_Scalar, (rn(3, 5), 2), {"self": rm(3, 5)}),
    # sorts and selections
    (aten.sort.default, (rn(3, 4, 5), 1), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.argsort.default, (rn(3, 4, 5), 2), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.msort.default, (rn(3, 4, 5),), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.topk.default, (rn(3, 4, 5), 2, 1), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.kthvalue.default, (rn(3, 4, 5), 2, 1), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.kthvalue.default, (rn(3, 4, 5), 2, 1, True), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.median.dim, (rn(3, 4, 5), 2), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.median.default, (rn(3, 4, 5),), {"self": rm(3, 4, 5)}),
    (aten.mode.default, (rn(3, 4, 5), 0), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.take_along_dim.default, (rn(3, 4, 5), torch.randint(0, 4, (3, 2, 1), generator=GEN),
                                   1), {"self": rm(3, 4, 5, p=0.7)}),
    (aten.take_along_dim.default, (rn(3, 4, 5), torch.randint(0, 60, (7,), generator=GEN)),
     {"self": rm(3, 4, 5)}),
    # scatters and index writes
    (aten.scatter.src, (rn(3, 4, 5), 1, torch.randint(0, 4, (3, 2, 5), generator=GEN),
                        rn(3, 3, 5)), {"self": rm(3, 4, 5), "src": rm(3, 3, 5)}),
    (aten.scatter.value, (rn(3, 4, 5), 1, torch.randint(0, 4, (3, 2, 5), generator=GEN), 1.5),
     {"self": rm(3, 4, 5)}),
    (aten.scatter_add.default, (rn(3, 4, 5), 1, torch.randint(0, 4, (3, 2, 5), generator=GEN),
                                rn(3, 3, 5)), {"self": rm(3, 4, 5), "src": rm(3, 3, 5)}),
    (aten.scatter_reduce.two, (rn(3, 4, 5), 1, torch.randint(0, 4, (3, 2, 5), generator=GEN),
                               rn(3, 3, 5), "amax"), {"self": rm(3, 4, 5), "src": rm(3, 3, 5)}),
    (aten.index_add.default, (rn(3, 4, 5), 1, torch.tensor([0, 2, 2]), rn(3, 3, 5)),
     {"self": rm(3, 4, 5), "source": rm(3, 3, 5)}),
    (aten.index_copy.default, (rn(3, 4, 5), 1, torch.tensor([0, 3]), rn(3, 2, 5)),
     {"self": rm(3, 4, 5), "source": rm(3, 2, 5)}),
    (aten.index_fill.int_Scalar, (rn(3, 4, 5), 1, torch.tensor([0, 3]), 0.0),
     {"self": rm(3, 4, 5)}),
    (aten.index_fill.int_Tensor, (rn(3, 4, 5), 1, torch.tensor([0, 3]), torch.tensor(2.0)),
     {"self": rm(3, 4, 5)}),
    (aten.index_put.default, (rn(3, 4, 5), [torch.tensor([0, 2])], rn(4, 5)),
     {"self": rm(3, 4, 5), "values": rm(4, 5)}),
    (aten.masked_scatter.default, (rn(3, 4, 5), rm(3, 4, 5), rn(60)), {"self": rm(3, 4, 5)}),
    (aten.one_hot.default, (torch.randint(0, 6, (3, 4), generator=GEN), 6), {}),
    (aten.bucketize.Tensor, (rn(3, 5), torch.tensor([-1.0, 0.0, 1.0])), {"self": rm(3, 5)}),
    (aten.embedding_bag.default, (rn(10, 4), torch.randint(0, 10, (8,), generator=GEN),
                                  torch.tensor([0, 3, 5])),
     {"weight": channels(10, 4, pruned=(1,))}),
    # normalisation
    (aten._weight_norm.default, (rn(6, 4), rn(6, 1), 0), {"v": rm(6, 4, p=0.3), "g": rm(6, 1)}),
    (aten._weight_norm.default, (rn(6, 4), rn(1, 4), 1), {"v": rm(6, 4, p=0.3), "g": rm(1, 4)}),
    (aten._weight_norm_interface.default, (rn(6, 4), rn(6, 1), 0),
     {"v": rm(6, 4, p=0.3), "g": rm(6, 1)}),
    (aten.instance_norm.default, (rn(2, 3, 4, 4), rn(3), rn(3), None, None, True, 0.1, 1e-5,
                                  False), {"input": rm(2, 3, 4, 4), "weight": rm(3)}),
]  # fmt: skip


def _ids(case: tuple) -> str:
    return str(case[0])


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_rule_holds(case: tuple) -> None:
    op, args, masks = case
    assert lookup(op) is not None, op
    outs = op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    names = [a.name for a in op._schema.arguments]
    samplers = {"other": positive} if op is aten.xlogy.Tensor else None
    for const in ((), ("index",)) if "index" in names else ((),):
        check_rule(op, args, input_masks=masks, const_args=const, samplers=samplers)
        used = tuple(torch.rand(o.shape, generator=GEN) > 0.3 for o in outs)
        check_rule(op, args, input_masks=masks, used=used, const_args=const, samplers=samplers)


# ----------------------------------------------------------------------------- precision


def test_copying_ops_are_exact() -> None:
    x = channels(2, 8, 6, 6)
    ref = check_rule(aten.pixel_shuffle.default, (X4, 2), input_masks={"self": x})
    assert torch.equal(ref.outputs[0], torch.pixel_shuffle(x.float(), 2).bool())
    used = torch.zeros(2, 2, 12, 12, dtype=torch.bool)
    used[:, 1, :6, :6] = True  # one output channel, top-left quadrant
    ref = check_rule(aten.pixel_shuffle.default, (X4, 2), used=used)
    assert torch.equal(ref.inputs["self"], torch.pixel_unshuffle(used.float(), 2).bool())
    ref = check_rule(aten.constant_pad_nd.default, (X4, [1, 1], 0.0), input_masks={"self": x})
    assert not ref.outputs[0][..., 0].any() and not ref.outputs[0][:, [1, 5]].any()
    ref = check_rule(aten.constant_pad_nd.default, (X4, [1, 1], 2.0), input_masks={"self": x})
    assert ref.outputs[0][..., 0].all()  # a nonzero fill is kept
    ref = check_rule(aten.roll.default, (X4, [1], [1]), input_masks={"self": x})
    assert torch.equal(ref.outputs[0], x.roll(1, 1))


def test_resampling_keeps_pruned_channels_pruned() -> None:
    x = channels(2, 8, 6, 6)
    for op, args in [
        (aten.upsample_bilinear2d.default, (X4, [12, 12], False)),
        (aten.upsample_bicubic2d.default, (X4, [12, 12], True)),
        (aten.upsample_nearest2d.default, (X4, [12, 12])),
    ]:
        ref = check_rule(op, args, input_masks={"self": x})
        assert torch.equal(ref.outputs[0].any(dim=(0, 2, 3)), x.any(dim=(0, 2, 3))), op
        used = torch.ones(ref.outputs[0].shape, dtype=torch.bool)
        used[:, 3] = False
        ref = check_rule(op, args, used=used)
        assert not ref.inputs["self"][:, 3].any() and ref.inputs["self"][:, 2].all(), op


def test_sort_prunes_whole_lines_only() -> None:
    x = torch.ones(3, 5, dtype=torch.bool)
    x[1] = False  # a whole row (the sorted dim is 1)
    x[2, 0] = False  # one element: its row still sorts nonzero values
    ref = check_rule(aten.topk.default, (rn(3, 5), 2, 1), input_masks={"self": x})
    assert ref.outputs[0].tolist() == [[True, True], [False, False], [True, True]]
    used = (torch.ones(3, 2, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool))
    used[0][0], used[1][0] = False, False
    ref = check_rule(aten.topk.default, (rn(3, 5), 2, 1), used=used)
    assert not ref.inputs["self"][0].any() and ref.inputs["self"][1:].all()


def test_scatter_with_constant_index_is_exact() -> None:
    x = torch.zeros(2, 4, dtype=torch.bool)  # self entirely pruned
    index = torch.tensor([[0, 2], [1, 3]])
    src = torch.tensor([[True, False], [False, True]])
    ref = check_rule(aten.scatter.src, (rn(2, 4), 1, index, rn(2, 2)),
                     input_masks={"self": x, "src": src}, const_args=("index",))  # fmt: skip
    assert ref.outputs[0].tolist() == [[True, False, False, False], [False, False, False, True]]


def test_affine_grid_theta_used_per_sample() -> None:
    """Each sample's grid comes from its own theta: an unused sample leaves its theta unused."""
    used = torch.ones(3, 4, 5, 2, dtype=torch.bool)
    used[1] = False
    used[2, 0, 0, 1] = False  # one coordinate of sample 2: its theta is still read
    ref = check_rule(aten.affine_grid_generator.default, (rn(3, 2, 3), [3, 1, 4, 5], False),
                     used=used)  # fmt: skip
    assert ref.inputs["theta"].tolist() == [[[True] * 3] * 2, [[False] * 3] * 2, [[True] * 3] * 2]


def test_prelu_slope_used_per_channel() -> None:
    """A channel's slope (dim 1) is read where a kept output of that channel has x nonzero."""
    used = torch.ones(2, 3, 4, dtype=torch.bool)
    used[:, 1] = False  # no output of channel 1 is used
    x = torch.ones(2, 3, 4, dtype=torch.bool)
    x[:, 2] = False  # channel 2 pruned on the input
    ref = check_rule(aten.prelu.default, (rn(2, 3, 4), rn(3)), input_masks={"self": x}, used=used)
    assert ref.inputs["weight"].tolist() == [True, False, False]


def test_repeat_interleave_with_constant_repeats_copies_the_mask() -> None:
    x = torch.tensor([True, False, True])
    reps = torch.tensor([1, 2, 3])
    ref = check_rule(aten.repeat_interleave.self_Tensor, (rn(3), reps), input_masks={"self": x},
                     const_args=("repeats",))  # fmt: skip
    assert ref.outputs[0].tolist() == x.repeat_interleave(reps).tolist()


def test_prod_with_a_known_zero_reads_nothing() -> None:
    """A product over a row with a pruned element is zero: the row's other elements are unused."""
    x = torch.ones(3, 4, dtype=torch.bool)
    x[1, 2] = False
    ref = check_rule(aten.prod.dim_int, (rn(3, 4), 1), input_masks={"self": x})
    assert ref.outputs[0].tolist() == [True, False, True]
    assert ref.inputs["self"].tolist() == [[True] * 4, [False] * 4, [True] * 4]


def test_index_fill_with_zero_at_a_constant_index_prunes_the_filled_slices() -> None:
    ref = check_rule(aten.index_fill.int_Scalar, (rn(3, 4), 1, torch.tensor([0, 2]), 0.0),
                     const_args=("index",))  # fmt: skip
    filled = torch.tensor([[False, True, False, True]] * 3)
    assert ref.outputs[0].tolist() == filled.tolist()
    assert ref.inputs["self"].tolist() == filled.tolist()  # overwritten: never read


# ----------------------------------------------------------------------------- recurrent layers

KINDS = {"lstm": (nn.LSTM, 4, 2), "gru": (nn.GRU, 3, 2), "rnn_tanh": (nn.RNN, 1, 0),
         "rnn_relu": (nn.RNN, 1, 0)}  # fmt: skip
H, F_IN, T, B = 5, 6, 4, 2


def _recurrent(kind: str, bidirectional: bool, proj: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    cls, _, _ = KINDS[kind]
    kw = {"nonlinearity": kind[4:]} if kind.startswith("rnn") else {}
    if proj:
        kw["proj_size"] = proj
    net = cls(F_IN, H, num_layers=2, bidirectional=bidirectional, **kw)
    return net, [p.detach() for p in net._flat_weights]


def _args(kind: str, x, h0, c0, params, bidirectional: bool):
    hx = [h0, c0] if kind == "lstm" else h0
    return (x, hx, params, True, 2, 0.0, False, bidirectional, False)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_rules_hold_on_random_masks(kind: str, bidirectional: bool) -> None:
    d = 2 if bidirectional else 1
    for proj in (0, 3) if kind == "lstm" else (0,):
        _, params = _recurrent(kind, bidirectional, proj)
        p = proj or H
        x, h0, c0 = rn(T, B, F_IN), rn(2 * d, B, p), rn(2 * d, B, H)
        masks = {
            "input": rm(T, B, F_IN, p=0.2),
            "params": tuple(rm(*w.shape, p=0.3) for w in params),
            "hx": (rm(2 * d, B, p), rm(2 * d, B, H)) if kind == "lstm" else rm(2 * d, B, p),
        }
        op = getattr(aten, kind).input
        args = _args(kind, x, h0, c0, params, bidirectional)
        check_rule(op, args, input_masks=masks)
        outs = op(*args)
        check_rule(op, args, input_masks=masks, used=tuple(rm(*o.shape, p=0.3) for o in outs))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_dead_and_unused_units(kind: str, bidirectional: bool) -> None:
    """Layer 0's units 1 and 3 get nothing in their cell-input row and start at zero: their
    outputs are zero, so layer 1's input columns 1 and 3 are unused. Layer 1's forward unit 0
    is read by nobody (not the output, not h_n, no recurrent weight): its rows are unused."""
    _, gates, sel = KINDS[kind]
    d = 2 if bidirectional else 1
    _, params = _recurrent(kind, bidirectional)
    per = len(params) // (2 * d)
    pm = [torch.ones(w.shape, dtype=torch.bool) for w in params]
    dead = [1, 3]
    for k in range(d):  # layer 0, every direction
        for i in range(4):
            pm[k * per + i][[sel * H + u for u in dead]] = False
    top = d * per  # layer 1, forward direction
    pm[top + 1][:, 0] = False  # no recurrent weight reads unit 0
    hm = torch.ones(2 * d, B, H, dtype=torch.bool)
    hm[:, :, dead] = False
    used_out = torch.ones(T, B, d * H, dtype=torch.bool)
    used_out[..., 0] = False
    used_hn = torch.ones(2 * d, B, H, dtype=torch.bool)
    used_hn[d, :, 0] = False
    x, h0 = rn(T, B, F_IN), rn(2 * d, B, H)
    op = getattr(aten, kind).input
    args = _args(kind, x, h0, rn(2 * d, B, H), params, bidirectional)
    hx = (hm, hm.clone()) if kind == "lstm" else hm
    used = (used_out, used_hn, used_hn) if kind == "lstm" else (used_out, used_hn)
    ref = check_rule(op, args, input_masks={"params": tuple(pm), "hx": hx}, used=used)
    hn_fwd = ref.outputs[1]
    assert not hn_fwd[:d][..., dead].any() and hn_fwd[d:].all()  # layer 0's final states
    layer1_cols = ref.inputs["params"][top].any(dim=0)
    for k in range(d):
        assert not layer1_cols[[k * H + u for u in dead]].any()
    rows = ref.inputs["params"][top].any(dim=1).reshape(gates, H)
    assert not rows[:, 0].any() and rows[:, 1:].all()
    layer0_rows = ref.inputs["params"][0].any(dim=1).reshape(gates, H)
    assert not layer0_rows[:, dead].any()  # dead units: every row unused


def test_lstm_packed_sequence() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    net, params = _recurrent("lstm", False)
    packed = pack_padded_sequence(rn(T, 3, F_IN), torch.tensor([4, 3, 1]))
    x = torch.ones(packed.data.shape, dtype=torch.bool)
    x[:, 2] = False
    args = (packed.data, packed.batch_sizes, [rn(2, 3, H), rn(2, 3, H)], params, True, 2, 0.0,
            False, False)  # fmt: skip
    ref = check_rule(aten.lstm.data, args, input_masks={"data": x})
    assert not ref.inputs["params"][0][:, 2].any()  # the dead input feature's column


# ----------------------------------------------------------------------------- value-range facts


def test_sign_facts_of_a_hand_written_norm() -> None:
    from sparta.calls import bound_arguments
    from sparta.signs import ANY, NONNEG, Sign, sign_facts
    from sparta.trace import trace

    class Norm(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = x.pow(2).mean(-1, keepdim=True)
            r = torch.rsqrt(v + 1e-6)
            e = torch.exp(x) + 1.0
            z = torch.relu(x) - 1.0
            return x * r + torch.reciprocal(e) + z

    traced = trace(Norm(), (torch.randn(2, 4),))
    facts = sign_facts(traced.gm, traced.example, bind=bound_arguments)
    by_target = {}
    for n, s in facts.items():
        by_target.setdefault(str(n.target), []).append(s)
    assert by_target["aten.pow.Tensor_Scalar"] == [NONNEG]
    assert by_target["aten.mean.dim"] == [NONNEG]
    assert by_target["aten.rsqrt.default"] == [Sign.POS]
    assert Sign.POS in by_target["aten.add.Tensor"]  # v + eps and exp(x) + 1
    assert by_target["aten.reciprocal.default"] == [Sign.POS]
    assert by_target["aten.relu.default"] == [NONNEG]
    assert by_target["aten.sub.Tensor"] == [ANY]
    assert facts[traced.inputs["x"]] == ANY


def test_rules_use_sign_facts() -> None:
    from sparta.registry import Call
    from sparta.signs import ANY, NONNEG, Sign

    used = torch.tensor([True, False, True])
    for sign, pruned in ((Sign.POS, True), (NONNEG, False), (ANY, False), (None, False)):
        call = Call(aten.rsqrt.default, {"self": torch.ones(3, dtype=torch.bool)}, (used,), {},
                    signs={"self": sign} if sign is not None else {})  # fmt: skip
        got = lookup(aten.rsqrt.default).fn(call).inputs.get("self")
        assert (got is not None and torch.equal(got, used)) == pruned, sign
    ones = torch.ones(3, dtype=torch.bool)
    div = Call(aten.div.Tensor, {"self": used, "other": ones}, (ones,), {},
               signs={"other": Sign.POS})  # fmt: skip
    refined = lookup(aten.div.Tensor).fn(div)
    assert torch.equal(refined.outputs[0], used)  # 0 / d = 0 for a divisor never zero
    assert torch.equal(refined.inputs["other"], used)


@pytest.mark.parametrize(
    ("op", "args", "name"),
    [
        (aten.rsqrt.default, (rn(3, 5),), "self"),
        (aten.log.default, (rn(3, 5),), "self"),
        (aten.reciprocal.default, (rn(3, 5),), "self"),
        (aten.div.Tensor, (rn(3, 5), rn(5)), "other"),
        (aten.pow.Tensor_Scalar, (rn(3, 5), -0.5), "self"),
        (aten.addcdiv.default, (rn(3, 5), rn(3, 5), rn(5)), "tensor2"),
        (aten.xlogy.Tensor, (rn(3, 5), rn(5)), "other"),
    ],
)
def test_inputs_never_zero_are_pruned_where_unused(op, args, name: str) -> None:
    """With a positive fact the unused column of the input is pruned, and check_rule confirms
    the outputs hold (the input drawn positive, unforced); without one nothing is pruned."""
    from sparta.signs import Sign

    used = torch.ones(3, 5, dtype=torch.bool)
    used[:, 2] = False
    ref = check_rule(op, args, used=used, signs={name: Sign.POS})
    got = ref.inputs[name]
    assert not got[..., 2].any() and got[..., [0, 1, 3, 4]].all()
    plain = check_rule(op, args, used=used, samplers={name: positive})
    assert name not in plain.inputs or bool(plain.inputs[name].all())


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_recurrent_cells(kind: str) -> None:
    """One step, per (sample, unit): unit 1 gets nothing in its cell-input row and starts at
    zero, so its output is zero and its rows and recurrent column are unused."""
    gates, sel = {"lstm": (4, 2), "gru": (3, 2)}.get(kind, (1, 0))
    w = [rn(gates * H, F_IN), rn(gates * H, H), rn(gates * H), rn(gates * H)]
    wm = [torch.ones(t.shape, dtype=torch.bool) for t in w]
    for t in wm:
        t[sel * H + 1] = False
    hm = torch.ones(3, H, dtype=torch.bool)
    hm[:, 1] = False
    h, c = rn(3, H), rn(3, H)
    hx = [h, c] if kind == "lstm" else h
    masks = {"input": rm(3, F_IN, p=0.2), "w_ih": wm[0], "w_hh": wm[1], "b_ih": wm[2],
             "b_hh": wm[3], "hx": (hm, hm.clone()) if kind == "lstm" else hm}  # fmt: skip
    op = getattr(aten, f"{kind}_cell").default
    ref = check_rule(op, (rn(3, F_IN), hx, *w), input_masks=masks)
    assert not ref.outputs[0][:, 1].any() and ref.outputs[0][:, [0, 2, 3, 4]].all()
    assert not ref.inputs["w_ih"].reshape(gates, H, F_IN)[:, 1].any()
    n_out = 2 if kind == "lstm" else 1
    used = tuple(rm(3, H, p=0.3) for _ in range(n_out))
    check_rule(op, (rn(3, F_IN), hx, *w), input_masks=masks, used=used)
