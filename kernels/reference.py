"""Dense references shared by every backend: the fused activations and the masked linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .epilogue import apply as activation  # noqa: F401  (the epilogues' dense reference)


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
