"""Value ranges: what they prove holds on every run at every size, and they never guess."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparta.trace import trace
from sparta.value_range import all_true, value_ranges


class MaskFrom(nn.Module):
    """Builds a bool mask from positions (and buffers), then uses it."""

    def __init__(self, build) -> None:
        super().__init__()
        self.build = build
        self.register_buffer("tril", torch.ones(40, 40, dtype=torch.bool).tril())
        self.register_buffer("ones", torch.ones(40, 40, dtype=torch.bool))
        # real parts all 1, imaginary parts not: never equal to 1 where the imaginary part is not 0
        self.register_buffer("phase", torch.complex(torch.ones(40, 40), torch.rand(40, 40) + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, 2): B and T dynamic
        return torch.where(self.build(self, x[..., 0])[..., None], x, 0.0)


POSITIONS = {
    # name: (mask builder on x of shape (B, T), proven all-True?)
    "bert": (lambda m, x: (torch.arange(x.shape[1]) + 0 >= 0)[None, :].expand_as(x), True),
    "shifted": (lambda m, x: (torch.arange(x.shape[1]) - 1 >= 0)[None, :].expand_as(x), False),
    "bounded": (lambda m, x: (torch.arange(x.shape[1]) < 7)[None, :].expand_as(x), False),
    "times": (lambda m, x: (torch.arange(x.shape[1]) * 2 + 1 > 0)[None, :].expand_as(x), True),
    "negated": (lambda m, x: ~(torch.arange(x.shape[1]) < 0)[None, :].expand_as(x), True),
    "tril": (lambda m, x: m.tril[: x.shape[0], : x.shape[1]], False),
    "ones_buf": (lambda m, x: m.ones[: x.shape[0], : x.shape[1]], True),
    "and": (
        lambda m, x: m.ones[: x.shape[0], : x.shape[1]] & (torch.arange(x.shape[1]) >= 0),
        True,
    ),
    "complex": (lambda m, x: m.phase[: x.shape[0], : x.shape[1]] == 1, False),  # no range
    "input": (lambda m, x: x > -1e9, False),  # true on any sane input, but input-dependent
}


def _where_condition(gm):
    n = next(n for n in gm.graph.nodes if "where" in str(n.target))
    return n.args[0].args[0]  # the condition, before its [..., None]


@pytest.mark.parametrize("name", sorted(POSITIONS))
def test_proofs_hold_at_every_size_and_never_guess(name: str) -> None:
    build, proven = POSITIONS[name]
    t = trace(MaskFrom(build), (torch.randn(3, 9, 2),))
    assert t.dynamic
    consts = {n: v for n, v in t.example.items() if n.op == "get_attr"}
    dtypes = {n: v.dtype for n, v in t.example.items() if isinstance(v, torch.Tensor)}
    ranges = value_ranges(t.gm, consts, dtypes.get)
    cond = _where_condition(t.gm)
    assert all_true(cond, ranges, dtypes[cond]) == proven
    # Soundness: every bound holds on the values of other sizes than the example.
    from sparta.trace import record_values

    for shape in [(2, 2), (3, 9), (5, 33), (7, 39)]:
        values = record_values(t.gm, (torch.randn(*shape, 2),), {})
        for node, (lo, hi) in ranges.items():
            v = values.get(node)
            if isinstance(v, torch.Tensor) and v.numel():
                v = v.double()
                assert lo <= float(v.min()) and float(v.max()) <= hi, (node.name, shape)
