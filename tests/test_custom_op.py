"""A torch.library custom op: its rule registered by the user, or inferred by scrambling.

The model and the rule below are the example of docs/custom_ops.md (keep them in step).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import sparta
from sparta import scramble
from sparta.calls import make_call
from sparta.propagate import propagate
from sparta.registry import Call, Refined, lookup, refine
from sparta.report import Report
from sparta.scramble import INFERRED_RULE_NAME, ScrambleWarning
from sparta.soundness import check_soundness


@torch.library.custom_op("sparta_test::scaled_relu", mutates_args=())
def scaled_relu(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.relu(x) * scale


@scaled_relu.register_fake
def _(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.empty_like(x)


OP = torch.ops.sparta_test.scaled_relu.default


def scaled_relu_rule(call: Call) -> Refined:
    # forward: relu(0) * scale == 0, so a pruned input element gives a pruned output element;
    # backward: output element i reads only input element i.
    return refine(out=call.inputs["x"], x=call.out)


class Gated(torch.nn.Module):
    """y = scaled_relu(x * a) * g: only elementwise ATen ops around the custom op."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(4, 8))
        self.g = torch.nn.Parameter(torch.randn(4, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparta_test.scaled_relu(x * self.a, 2.0) * self.g


def _attrs() -> dict[str, torch.Tensor]:
    a = torch.ones(4, 8, dtype=torch.bool)
    a[:, :3] = False  # forward: x * a is zero there, so is scaled_relu(...)
    g = torch.ones(4, 8, dtype=torch.bool)
    g[:, 5:] = False  # backward: nobody uses scaled_relu(...) there, hence neither x nor a
    return {"a": a, "g": g}


def _expected() -> torch.Tensor:
    want = torch.ones(4, 8, dtype=torch.bool)
    want[:, :3] = False
    want[:, 5:] = False
    return want


@pytest.fixture
def registered() -> Iterator[None]:
    sparta.register_rule(OP)(scaled_relu_rule)
    try:
        yield
    finally:
        sparta.unregister_rule(OP)


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    scramble.clear_cache()
    yield
    sparta.unregister_rule(OP)


def _node_rule(report: Report, target: str) -> str:
    return next(n["rule"] for n in report.to_dict()["nodes"] if n["target"] == target)


def test_registered_rule_propagates_both_ways(registered: None) -> None:
    assert lookup(OP).name == "scaled_relu_rule"
    model, x = Gated(), torch.randn(4, 8)
    report = propagate(model, _attrs(), (x,), strict=True)
    assert torch.equal(report.mask("scaled_relu"), _expected())
    assert torch.equal(report.mask("x"), _expected())
    assert torch.equal(report.mask("a"), _expected())
    assert _node_rule(report, "sparta_test.scaled_relu.default") == "scaled_relu_rule"
    assert check_soundness(model, _attrs(), (x,)) <= 1e-6


def test_registering_twice_names_the_first_registration(registered: None) -> None:
    with pytest.raises(sparta.SpartaError, match="scaled_relu_rule"):
        sparta.register_rule(OP)(scaled_relu_rule)


class Only(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparta_test.scaled_relu(x, 2.0)


def test_strict_mode_without_a_rule_raises_with_a_stub() -> None:
    with pytest.raises(sparta.MissingRuleError) as info:
        propagate(Only(), {}, (torch.randn(4, 8),), strict=True)
    text = str(info.value)
    assert "sparta_test::scaled_relu" in text
    assert "@sparta.register_rule(torch.ops.sparta_test.scaled_relu.default)" in text


def test_unregistered_custom_op_is_inferred_by_scrambling_in_the_engine() -> None:
    model, x = Gated(), torch.randn(4, 8)
    with pytest.warns(ScrambleWarning, match="sparta_test.scaled_relu"):
        report = propagate(model, _attrs(), (x,), strict=False)
    assert _node_rule(report, "sparta_test.scaled_relu.default") == INFERRED_RULE_NAME
    # scrambling finds exactly what the hand-written rule finds on this graph
    assert torch.equal(report.mask("scaled_relu"), _expected())
    assert torch.equal(report.mask("x"), _expected())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScrambleWarning)
        assert check_soundness(model, _attrs(), (x,), strict=False) <= 1e-6


def test_infer_directly_on_a_call_matches_the_rule() -> None:
    x = torch.randn(6, 5)
    g = torch.Generator().manual_seed(3)
    xm = torch.rand(6, 5, generator=g) > 0.4
    om = torch.rand(6, 5, generator=g) > 0.4
    call = make_call(
        OP, (x, 1.5), {}, (om,),
        mask_of=lambda v: xm if isinstance(v, torch.Tensor) else None,
    )  # fmt: skip
    assert call.params == {"scale": 1.5} and set(call.inputs) == {"x"}
    with pytest.warns(ScrambleWarning, match="inferred"):
        got = scramble.infer(call)
    want = scaled_relu_rule(call)
    assert torch.equal(got.outputs[0], want.outputs[0])
    assert torch.equal(got.inputs["x"] & xm, want.inputs["x"] & xm)


def test_docs_example_runs_as_written() -> None:
    """docs/custom_ops.md's first code block, run as is in a fresh interpreter."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "custom_ops.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    check = (
        "\nwant = torch.ones(4, 8, dtype=torch.bool); want[:, :3] = False; want[:, 5:] = False"
        "\nassert torch.equal(report.mask('x'), want), report.mask('x')"
        "\nassert torch.equal(report.mask('scaled_relu'), want)"
        "\nassert report.node('scaled_relu').rule == 'scaled_relu_rule'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code + check], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
