"""The epilogue table (``kernels/epilogue.py``): each activation is found in a traced graph as
the planner sees it, and its dense reference is the torch function it stands for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparta.families import FUSES
from sparta.kernels import epilogue
from sparta.plan import fusable_activation

TORCH = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


@pytest.mark.parametrize("name", list(epilogue.EPILOGUES))
def test_each_epilogue_is_matched_in_the_traced_graph_and_computes_its_function(name) -> None:
    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return TORCH[name](self.fc(x))

    gm = torch.export.export(Layer().eval(), (torch.randn(2, 8),)).run_decompositions({}).module()
    (linear,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    node, found = fusable_activation(linear)
    assert found == name and node is not None
    y = torch.randn(64, 33, dtype=torch.float64) * 4
    torch.testing.assert_close(epilogue.apply(y, name), TORCH[name](y))
    assert name in FUSES["triton"] and (name in FUSES["nm_cpu"]) == (
        epilogue.EPILOGUES[name].cpu is not None
    )


def test_an_activation_a_family_does_not_fuse_is_a_clear_error() -> None:
    with pytest.raises(epilogue.BackendError, match="silu"):
        epilogue.cpu_code("silu")
    with pytest.raises(epilogue.BackendError, match="tanh"):
        epilogue.triton_source("tanh", 4)
    assert epilogue.cpu_code(None) == 0 and epilogue.triton_source(None, 4) == ""
