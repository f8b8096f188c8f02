"""Pattern detection rejects large masks on a corner first: the same answers as without."""

from __future__ import annotations

import torch

from sparta import tesa


def _masks():
    g = torch.Generator().manual_seed(0)
    for lead in ((),):
        for rows, cols in ((300, 260), (70, 1024)):
            yield torch.rand(*lead, rows, cols, generator=g) < 0.5
            for b in (4, 16, 64):
                kb = torch.rand(*lead, -(-rows // b), -(-cols // b), generator=g) < 0.4
                m = kb.repeat_interleave(b, -2).repeat_interleave(b, -1)[..., :rows, :cols].clone()
                m[..., torch.rand(rows, generator=g) < 0.1, :] = False
                yield m
                flipped = m.clone()
                flipped.view(-1)[-1] = ~flipped.view(-1)[-1]  # one element off, far from the corner
                yield flipped
            for n, mm in ((2, 4), (1, 8)):
                k = cols - cols % mm
                idx = torch.rand(*lead, rows, k // mm, mm, generator=g).argsort(-1)[..., :n]
                m = torch.zeros(*lead, rows, k // mm, mm, dtype=torch.bool)
                m = m.scatter_(-1, idx, True).reshape(*lead, rows, k)
                yield m
                far = m.clone()
                far[..., -1, :mm] = True  # the last row breaks n:m
                yield far
            yield (torch.rand(cols, generator=g) < 0.3).expand(*lead, rows, cols).clone()


def test_corner_rejection_is_exact(monkeypatch) -> None:
    masks = list(_masks())
    assert all(m.numel() > 4 * tesa.CORNER**2 for m in masks)
    masks.append(masks[1].expand(2, *masks[1].shape))  # a batch dim  # large enough for corners
    fast = [str(tesa.detect_pattern(m)) for m in masks]
    monkeypatch.setattr(tesa, "_corner", lambda mask, full=(), size=0: mask)
    slow = [str(tesa.detect_pattern(m)) for m in masks]
    assert fast == slow
    assert {p.split("(")[0] for p in fast} >= {"unstructured", "block", "2:4", "1:8", "column"}
