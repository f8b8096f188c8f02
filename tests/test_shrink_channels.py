"""Shrinking through every op family that carries channels, against the masked model.

Each model has whole channels pruned (weights, biases and the affine parameters of the norms
after them); the compiled graph must compute the masked model on fresh random inputs at
several batch sizes, with its convolutions and linears really smaller.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparta
from sparta.shrink import CONVS, LINEAR

BATCHES = (1, 3, 5)


def channel_attrs(model: nn.Module, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Masks pruning whole output channels: ``keep[module] `` (bool, per channel) applied to the
    module's weight (dim 0, dim 1 for transposed convolutions) and bias."""
    attrs = {}
    for name, ch in keep.items():
        mod = model.get_submodule(name)
        for pname, p in mod.named_parameters(recurse=False):
            dim = 1 if isinstance(mod, nn.ConvTranspose2d) and pname == "weight" else 0
            shape = [1] * p.dim()
            shape[dim] = -1
            attrs[f"{name}.{pname}"] = ch.reshape(shape).expand(p.shape).clone()
    return attrs


def randomize_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for p in m.parameters(recurse=False):
            if p.dim() == 1:
                p.data.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def compiled_weights(compiled) -> list[tuple[int, ...]]:
    """Weight shapes of the linears and convolutions of the compiled graph, in order."""
    gm = compiled.graph_module
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in CONVS or n.target is LINEAR):
            out.append(tuple(getattr(gm, n.args[1].target).shape))
    return out


def check(model, attrs, shape, expected=None, tol=1e-5):
    torch.manual_seed(0)
    model = randomize_norms(model)
    compiled = sparta.compile(
        model, attrs, (torch.randn(2, *shape),), backends=["shrink"], measure=False
    )
    ref = sparta.masked_model(model, attrs)
    for b in BATCHES:
        x = torch.randn(b, *shape)
        torch.testing.assert_close(compiled(x), ref(x), atol=tol, rtol=tol)
    if expected is not None:
        assert compiled_weights(compiled) == expected
    return compiled


def ch(n: int, pruned) -> torch.Tensor:
    m = torch.ones(n, dtype=torch.bool)
    m[list(pruned)] = False
    return m


class Chain(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_conv_bn_relu_chain_shrinks_in_and_out(d: int) -> None:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[d]
    m = Chain(conv(3, 16, 3, padding=1), bn(16), nn.ReLU(), conv(16, 8, 3, padding=1))
    attrs = channel_attrs(m, {"layers.0": ch(16, range(0, 10)), "layers.1": ch(16, range(10))})
    k = (3,) * d
    check(m, attrs, (3, *(6,) * d), [(6, 3, *k), (8, 6, *k)])


def test_grouped_and_depthwise_convs_keep_whole_groups_with_the_group_count_rewritten() -> None:
    m = Chain(
        nn.Conv2d(4, 16, 1),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1, groups=4),  # 4 groups of 4 in, 2 out
        nn.Conv2d(8, 5, 1),
    )
    keep = ch(16, [0, 1, 2, 3, 9, 13])  # one whole group of 4 and two lone channels
    attrs = channel_attrs(m, {"layers.0": keep, "layers.1": keep, "layers.4": keep})
    attrs.update(channel_attrs(m, {"layers.6": ch(8, [0, 1])}))  # group 0 of the grouped conv
    compiled = check(m, attrs, (4, 7, 7))
    assert compiled_weights(compiled) == [(10, 4, 1, 1), (10, 1, 3, 3), (6, 4, 3, 3), (5, 6, 1, 1)]
    code = compiled.graph_module.code
    assert "[1, 1], 10)" in code and "[1, 1], 3)" in code  # depthwise: 10 groups; grouped: 3


def test_conv_transpose_shrinks_its_input_and_output_channels() -> None:
    m = Chain(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    attrs = channel_attrs(m, {"layers.0": ch(8, [1, 2, 3]), "layers.2": ch(8, [0, 5])})
    check(m, attrs, (3, 5, 5), [(5, 3, 3, 3), (5, 6, 2, 2), (4, 6, 1, 1)])


def test_group_norm_instance_norm_and_prelu_take_the_compact_channels() -> None:
    m = Chain(
        nn.Conv2d(3, 12, 3),
        nn.GroupNorm(3, 12),
        nn.PReLU(12),
        nn.Conv2d(12, 12, 1),
        nn.InstanceNorm2d(12, affine=True),
        nn.Conv2d(12, 2, 1),
    )
    g = ch(12, range(4, 8))  # one whole group of 4
    attrs = channel_attrs(m, {"layers.0": g, "layers.1": g, "layers.2": g})
    attrs.update(channel_attrs(m, {"layers.3": ch(12, [0, 7]), "layers.4": ch(12, [0, 7])}))
    check(m, attrs, (3, 6, 6), [(8, 3, 3, 3), (10, 8, 1, 1), (2, 10, 1, 1)])


def test_group_norm_with_part_of_a_group_pruned_stays_exact() -> None:
    m = Chain(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 2, 1))
    attrs = channel_attrs(m, {"layers.0": ch(8, [0]), "layers.1": ch(8, [0])})
    check(m, attrs, (3, 4, 4))


class Resample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.c = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.max_pool2d(y, 2)
        y = F.avg_pool2d(y, 2, stride=1)
        y = F.interpolate(y, scale_factor=2, mode="nearest")
        y = F.interpolate(y, size=(9, 9), mode="bilinear", align_corners=False)
        y = F.adaptive_avg_pool2d(self.b(y), 6)
        y = F.pad(y, (1, 1, 1, 1))
        return self.c(F.pixel_shuffle(y, 2))


def test_pooling_upsampling_padding_and_pixel_shuffle_keep_channels_compact() -> None:
    m = Resample()
    attrs = channel_attrs(m, {"a": ch(16, range(6)), "b": ch(8, [4, 5, 6, 7])})
    compiled = check(m, attrs, (3, 8, 8), [(10, 3, 3, 3), (4, 10, 3, 3), (3, 1, 1, 1)])
    assert "expand" not in compiled.graph_module.code


class Residual(nn.Module):
    def __init__(self, same: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)
        self.same = same

    def forward(self, x):
        y = self.stem(x)
        return self.head(F.relu(self.branch(y) + y))


@pytest.mark.parametrize("both", [True, False])
def test_residual_add_shrinks_only_channels_pruned_on_every_side(both: bool) -> None:
    m = Residual(both)
    keep = ch(8, [2, 3, 4])
    attrs = channel_attrs(m, {"branch": keep, **({"stem": keep} if both else {})})
    compiled = check(m, attrs, (3, 5, 5))
    shapes = compiled_weights(compiled)
    assert shapes[-1] == ((2, 5, 1, 1) if both else (2, 8, 1, 1))


class CatSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(16, 4, 1)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        p, q = torch.split(y, [10, 6], dim=1)
        return self.c(torch.cat([q, p], dim=1)) + self.d(q).sum(1, keepdim=True)


def test_cat_and_split_shift_their_offsets() -> None:
    m = CatSplit()
    attrs = channel_attrs(m, {"a": ch(8, [0, 1, 7]), "b": ch(8, [1, 4])})
    check(m, attrs, (3, 4, 4), [(5, 3, 1, 1), (6, 3, 1, 1), (4, 11, 1, 1), (2, 5, 1, 1)])


class FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_flatten_into_a_linear_drops_its_column_blocks() -> None:
    m = FlattenHead()
    attrs = channel_attrs(m, {"conv": ch(8, [0, 3, 5])})
    check(m, attrs, (3, 6, 6), [(5, 3, 3, 3), (5, 5 * 16)])


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        y = F.silu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.out(y * s)


def test_squeeze_excite_gate_shrinks_with_the_channels_it_gates() -> None:
    m = SqueezeExcite()
    attrs = channel_attrs(m, {"conv": ch(16, range(8))})
    check(m, attrs, (3, 5, 5), [(8, 3, 3, 3), (4, 8, 1, 1), (8, 4, 1, 1), (3, 8, 1, 1)])


def test_unpruned_convolutions_run_dense_and_the_graph_keeps_its_shapes() -> None:
    m = Chain(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    compiled = check(m, {}, (3, 7, 7), [(8, 3, 3, 3), (4, 8, 3, 3)])
    assert not compiled.plan.sparse()


def test_export_pruned_is_a_smaller_trainable_module_computing_the_same() -> None:
    m = FlattenHead()
    attrs = channel_attrs(m, {"conv": ch(8, [0, 3, 5])})
    compiled = check(m, attrs, (3, 6, 6))
    small = compiled.export_pruned()
    assert not isinstance(small, sparta.CompiledModel)
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small == 5 * 27 + 5 + 5 * 16 * 5 + 5
    assert n_small < sum(p.numel() for p in m.parameters())
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(small(x), sparta.masked_model(m, attrs)(x), atol=1e-5, rtol=1e-5)
    small(x).sum().backward()
    assert all(p.grad is not None for p in small.parameters())


@pytest.mark.parametrize("ffn_kept", [0.0, 0.5])
def test_every_head_or_unit_pruned_is_zero_width_not_a_crash(ffn_kept) -> None:
    """All heads of a layer pruned (and all FFN units): the compact values have zero width, the
    head-splitting views get the full zero-filled value, and the answer is the masked model's."""
    from sparta.demo import TinyBert, demo_masks

    torch.manual_seed(0)
    model = TinyBert(vocab=100, hidden=64, heads=4, ffn=128, layers=2, max_len=64).eval()
    attrs = demo_masks(model, ffn_kept=ffn_kept, heads_pruned=4)
    compiled = sparta.compile(model, attrs, (torch.randint(0, 100, (2, 16)),), measure=False)
    reference = sparta.masked_model(model, attrs)
    for batch, seq in ((1, 16), (3, 7), (5, 30)):
        ids = torch.randint(0, 100, (batch, seq))
        torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)
    assert compiled.report.node("linear").impl == "shrink"  # q of layer 0: zero rows computed
