"""Dense and mask-aware FLOPs of matmul-like nodes, for the report (the planner never uses them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .tesa import broadcast_dims, core

aten = torch.ops.aten


def _f32(m: torch.Tensor) -> torch.Tensor:
    return m.view(torch.uint8).to(torch.float32)  # from bool directly is ~20x slower


def _pairs(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-adds a (.., M, K) @ b (.., K, N) must do for kept outputs with both factors kept.
    A compact 2-D ``b`` (whole rows or columns of a weight, ``sparta.tesa.compact``) is read as
    its stored slice."""
    flat = broadcast_dims(b) if b.dim() == 2 else ()
    if 0 in flat:  # b[k, n] = r[n]: counts[m, n] = (kept in a[m]) * r[n]
        counts = _f32(a).sum(dim=-1, keepdim=True) * _f32(core(b))
    elif 1 in flat:  # b[k, n] = c[k]: counts[m, n] = (a @ c)[m]
        counts = torch.matmul(_f32(a), _f32(core(b)))
    else:
        counts = torch.matmul(_f32(a), _f32(b))
    return int((counts * _f32(out)).sum())


def matmul_flops(
    op: Any, masks: Mapping[str, torch.Tensor | None], out: torch.Tensor
) -> tuple[int, int]:
    """(dense, sparse) FLOPs; (0, 0) for ops that are not matmul-like."""
    if op in (aten.linear.default,):
        x, w = masks["input"], masks["weight"]
        dense = 2 * out.numel() * w.shape[1]
        return dense, 2 * _pairs(x.reshape(-1, x.shape[-1]), w.T, out.reshape(-1, w.shape[0]))
    if op in (aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default):
        a = masks["mat1"] if "mat1" in masks else masks.get("self")
        b = masks["mat2"] if "mat2" in masks else masks.get("other")
        if a is None or b is None:
            return 0, 0
        dense = 2 * out.numel() * a.shape[-1]
        return dense, 2 * _pairs(a, b, out)
    if op in (aten.conv2d.default, aten.convolution.default, aten.conv1d.default):
        w = masks["weight"]
        per_out = w.reshape(w.shape[0], -1).float().sum(dim=1)  # kept weights per out channel
        spatial = out[0, 0].numel() if out.dim() > 2 else 1
        dense = 2 * out.numel() * w[0].numel()
        kept_out = out.reshape(out.shape[0], out.shape[1], -1).any(dim=2).float()  # (N, C_out)
        sparse = 2 * spatial * int((kept_out * per_out).sum())
        return dense, sparse
    return 0, 0
