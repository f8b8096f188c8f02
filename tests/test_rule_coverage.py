"""Every ATen op in the exported graphs of the five reference models has a propagation rule."""

from __future__ import annotations

import functools

import pytest
import torch
from models import MODELS

import sparta.propagation_rules  # noqa: F401  (registers the rules)
from sparta.registry import lookup


@functools.cache
def graph_targets(name: str) -> frozenset:
    model, args = MODELS[name]()
    ep = torch.export.export(model.eval(), args)
    return frozenset(n.target for n in ep.graph_module.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_op_has_a_rule(name: str) -> None:
    import operator

    targets = graph_targets(name) - {operator.getitem}  # getitem is the engine's
    missing = sorted(str(t) for t in targets if lookup(t) is None)
    assert not missing, f"{name}: no propagation rule for {missing}"
