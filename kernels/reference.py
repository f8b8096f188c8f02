"""Dense references shared by every backend: the fused activations and the masked linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparta.errors import BackendError

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


def activation(y: torch.Tensor, name: str | None) -> torch.Tensor:
    """The epilogue activation ``name`` applied to ``y`` (``None`` = identity; ``"silu"`` too,
    which only the Triton kernels fuse)."""
    if name is None:
        return y
    if name == "relu":
        return torch.relu(y)
    if name == "gelu":
        return F.gelu(y)
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if name == "silu":
        return F.silu(y)
    raise BackendError(f"activation must be one of {ACTIVATIONS}, got {name!r}.")


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    act: str | None = None,
    *,
    compute: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``act(x @ (weight * mask).T + bias)`` computed densely in ``compute`` precision."""
    w = (weight * mask).to(compute)
    y = F.linear(x.to(compute), w, None if bias is None else bias.to(compute))
    return activation(y, act)
