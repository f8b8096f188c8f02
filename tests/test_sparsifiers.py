"""Sparsifiers against slow dense references, exact densities, determinism, patterns, errors."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from torch import nn

from sparta import AttrError, TeSA
from sparta.sparsifiers import (
    NM,
    BlockMagnitude,
    Channels,
    GlobalMagnitude,
    GroupedNM,
    Heads,
    Magnitude,
    RandomFraction,
    Sparsifier,
    Threshold,
)
from sparta.sparsify import sparsify

# ----------------------------------------------------------------------------- references


def _keep_order(scores: list[float], k: int) -> list[bool]:
    """Keep the k largest; ties keep the lower index (the documented rule)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = [False] * len(scores)
    for i in order[:k]:
        keep[i] = True
    return keep


def ref_magnitude(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = t.abs().flatten().tolist()
    k = len(flat) - round(sparsity * len(flat))
    return torch.tensor(_keep_order(flat, k)).view(t.shape)


def ref_global(ts: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    flat = [v for t in ts for v in t.abs().flatten().tolist()]
    keep = _keep_order(flat, len(flat) - round(sparsity * len(flat)))
    out, start = [], 0
    for t in ts:
        out.append(torch.tensor(keep[start : start + t.numel()]).view(t.shape))
        start += t.numel()
    return out


def ref_block(t: torch.Tensor, bh: int, bw: int, sparsity: float) -> torch.Tensor:
    mats = t.reshape(-1, *t.shape[-2:]).double()
    rows, cols = t.shape[-2:]
    blocks = [
        (b, r, c)
        for b in range(mats.shape[0])
        for r in range(0, rows, bh)
        for c in range(0, cols, bw)
    ]
    norms = [float(mats[b, r : r + bh, c : c + bw].square().sum()) for b, r, c in blocks]
    keep = _keep_order(norms, len(blocks) - round(sparsity * len(blocks)))
    out = torch.zeros(mats.shape, dtype=torch.bool)
    for (b, r, c), k in zip(blocks, keep):
        out[b, r : r + bh, c : c + bw] = k
    return out.view(t.shape)


def ref_nm(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)
    out = torch.zeros(rows.shape, dtype=torch.bool)
    for i in range(rows.shape[0]):
        for s in range(0, rows.shape[1], m):
            group = rows[i, s : s + m].abs().tolist()
            out[i, s : s + m] = torch.tensor(_keep_order(group, min(n, len(group))))
    return out.view(t.shape)


def ref_slices(t: torch.Tensor, dim: int, groups: int, sparsity: float) -> torch.Tensor:
    moved = t.movedim(dim, 0).double()
    size = moved.shape[0] // groups
    norms = [float(moved[h * size : (h + 1) * size].square().sum()) for h in range(groups)]
    keep = _keep_order(norms, groups - round(sparsity * groups))
    out = torch.zeros(moved.shape, dtype=torch.bool)
    for h, k in enumerate(keep):
        out[h * size : (h + 1) * size] = k
    return out.movedim(0, dim)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("shape", [(37, 53), (8, 3, 5, 5), (101,)])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9])
def test_magnitude_matches_reference(shape: tuple[int, ...], sparsity: float) -> None:
    t = _rand(*shape, seed=len(shape))
    mask = Magnitude(sparsity).mask(t)
    assert mask.dtype == torch.bool and mask.shape == t.shape
    assert torch.equal(mask, ref_magnitude(t, sparsity))
    assert int((~mask).sum()) == round(sparsity * t.numel())


def test_magnitude_ties_keep_lower_index() -> None:
    t = torch.tensor([[1.0, -2.0, 2.0, 0.0], [2.0, 1.0, -2.0, 0.0]])
    mask = Magnitude(0.625).mask(t)  # keep 3 of the four 2s: the first three
    assert torch.equal(mask, ref_magnitude(t, 0.625))
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert torch.equal(Magnitude(0.5).mask(torch.zeros(3, 4)).flatten()[:6], torch.ones(6).bool())


def test_magnitude_half_precision_and_extreme_values() -> None:
    t = torch.tensor([1e-30, 3e38, float("inf"), -5.0, 0.0, -0.0, 1e-45, 7.0])
    assert torch.equal(Magnitude(0.5).mask(t), ref_magnitude(t, 0.5))
    h = _rand(33, 17).half()
    assert torch.equal(Magnitude(0.6).mask(h), ref_magnitude(h.float(), 0.6))


def test_global_magnitude_matches_reference_across_tensors() -> None:
    ts = {"a": _rand(20, 30, seed=1) * 0.5, "b": _rand(40, seed=2), "c": _rand(7, 9, seed=3) * 2}
    got = GlobalMagnitude(0.7).masks(ts)
    want = ref_global(list(ts.values()), 0.7)
    for name, w in zip(ts, want):
        assert torch.equal(got[name], w), name
    total = sum(t.numel() for t in ts.values())
    assert sum(int((~m).sum()) for m in got.values()) == round(0.7 * total)
    # the scaled-down tensor loses more than the scaled-up one: ranking really is global
    assert got["a"].float().mean() < got["c"].float().mean()


def test_global_magnitude_ties_prefer_earlier_tensor() -> None:
    got = GlobalMagnitude(0.5).masks({"x": torch.ones(4), "y": torch.ones(4)})
    assert got["x"].all() and not got["y"].any()


def test_threshold_and_random_fraction() -> None:
    t = _rand(64, 48)
    assert torch.equal(Threshold(0.7).mask(t), t.abs() > 0.7)
    rf = RandomFraction(0.65, seed=3)
    m1, m2 = rf.mask(t), rf.mask(t.clone())
    assert torch.equal(m1, m2) and int((~m1).sum()) == round(0.65 * t.numel())
    assert not torch.equal(m1, RandomFraction(0.65, seed=4).mask(t))
    both = rf.masks({"l1.weight": t, "l2.weight": t})
    assert not torch.equal(both["l1.weight"], both["l2.weight"])  # names seed differently
    assert torch.equal(rf.masks({"l1.weight": t})["l1.weight"], both["l1.weight"])


# ----------------------------------------------------------------------------- block / n:m


@pytest.mark.parametrize(
    ("shape", "block"), [((64, 96), (16, 16)), ((50, 70), (16, 8)), ((3, 20, 24), (8, 8))]
)
def test_block_magnitude_matches_reference(shape: tuple[int, ...], block: tuple[int, int]) -> None:
    t = _rand(*shape, seed=5)
    mask = BlockMagnitude(block, 0.6).mask(t)
    assert torch.equal(mask, ref_block(t, *block, 0.6))


@pytest.mark.parametrize("b", [4, 16, 32])
def test_block_magnitude_detected_as_block(b: int) -> None:
    t = _rand(256, 384, seed=b)
    mask = BlockMagnitude((b, b), 0.75).mask(t)
    assert str(TeSA(mask).pattern) == f"block({b}x{b})"
    blocks = (256 // b) * (384 // b)
    assert mask.float().mean().item() == pytest.approx((blocks - round(0.75 * blocks)) / blocks)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 10)])
@pytest.mark.parametrize("shape", [(16, 40), (8, 3, 3, 3), (5, 22)])
def test_nm_matches_reference(n: int, m: int, shape: tuple[int, ...]) -> None:
    t = _rand(*shape, seed=n * m)
    assert torch.equal(NM(n, m).mask(t), ref_nm(t, n, m))


def test_nm_ties_and_pattern() -> None:
    t = torch.tensor([[0.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0]])
    assert NM(2, 4).mask(t).tolist() == [[True, False, False, True, True, True, False, False]]
    assert str(TeSA(NM(2, 4).mask(_rand(64, 128))).pattern) == "2:4"


# ----------------------------------------------------------------------------- grouped n:m


def _kept(t: torch.Tensor, mask: torch.Tensor) -> float:
    return float((t.abs().double() * mask).sum())


def _check_grouped(mask: torch.Tensor, n: int, m: int, g: int) -> None:
    rows = mask.reshape(mask.shape[0], -1)
    k = rows.shape[1]
    for s in range(0, k, m):
        chunk = rows[:, s : s + m]
        assert bool((chunk.sum(dim=1) <= n).all())
        if k - s >= n:
            assert bool((chunk.sum(dim=1) == n).all())
        _, counts = torch.unique(chunk, dim=0, return_counts=True)
        assert bool((counts % g == 0).all()), (s, counts)


def naive_grouped(t: torch.Tensor, n: int, m: int, g: int) -> torch.Tensor:
    """Baseline: every run of g consecutive rows shares the pattern best for their sum."""
    pats = [list(c) for c in itertools.combinations(range(m), n)]
    out = torch.zeros(t.shape, dtype=torch.bool)
    a = t.abs()
    for r in range(0, t.shape[0], g):
        for s in range(0, t.shape[1], m):
            block = a[r : r + g, s : s + m].sum(dim=0)
            best = max(pats, key=lambda p: float(block[p].sum()))
            out[r : r + g, [s + j for j in best]] = True
    return out


@pytest.mark.parametrize(
    ("n", "m", "g", "rows", "frac"),
    [(2, 4, 4, 128, 0.99), (2, 4, 8, 128, 0.99), (1, 4, 16, 128, 0.99), (4, 8, 8, 256, 0.95)],
)
def test_grouped_nm_is_valid_and_keeps_magnitude(
    n: int, m: int, g: int, rows: int, frac: float
) -> None:
    t = _rand(rows, 96 if m == 4 else 64, seed=g)
    mask = GroupedNM(n, m, g).mask(t)
    _check_grouped(mask, n, m, g)
    assert str(TeSA(mask).pattern) == f"{n}:{m}"
    kept = _kept(t, mask)
    assert kept >= _kept(t, naive_grouped(t, n, m, g))
    assert kept >= frac * _kept(t, NM(n, m).mask(t))  # the price of grouping is small
    assert torch.equal(mask, GroupedNM(n, m, g).mask(t.clone()))


def test_grouped_nm_equals_nm_when_rows_already_grouped() -> None:
    t = _rand(8, 64).repeat_interleave(4, dim=0)  # every pattern count is a multiple of 4
    assert torch.equal(GroupedNM(2, 4, 4).mask(t), NM(2, 4).mask(t))


def test_grouped_nm_ragged_k_conv_and_ties() -> None:
    t = _rand(16, 3, 3, 3)  # K = 27: the last chunk has 3 real elements
    mask = GroupedNM(2, 4, 8).mask(t)
    assert mask.shape == t.shape
    _check_grouped(mask, 2, 4, 8)
    _check_grouped(GroupedNM(2, 4, 4).mask(torch.ones(12, 16)), 2, 4, 4)


def test_grouped_nm_rows_not_multiple_of_g() -> None:
    with pytest.raises(AttrError, match=r"multiple of g=8.*e\.g\. one of \[6, 4, 12"):
        GroupedNM(2, 4, 8).mask(_rand(12, 16))


def test_grouped_nm_near_optimal_on_tiny_instances() -> None:
    """Brute force over all assignments of one chunk (6 rows, g=3): the hardest regime, where
    only two patterns can be used; greedy is valid, never above the optimum, close on average."""
    pats = [list(c) for c in itertools.combinations(range(4), 2)]
    ratios = []
    for seed in range(10):
        t = _rand(6, 4, seed=seed)
        a = t.abs()
        best = 0.0
        for assign in itertools.product(range(len(pats)), repeat=6):
            if all(assign.count(p) % 3 == 0 for p in range(len(pats))):
                best = max(best, sum(float(a[i, pats[p]].sum()) for i, p in enumerate(assign)))
        mask = GroupedNM(2, 4, 3).mask(t)
        _check_grouped(mask, 2, 4, 3)
        got = _kept(t, mask)
        assert got <= best + 1e-5
        ratios.append(got / best)
    assert sum(ratios) / len(ratios) > 0.93


# ----------------------------------------------------------------------------- structured


@pytest.mark.parametrize(("shape", "dim"), [((24, 40), 0), ((24, 40), 1), ((6, 4, 3, 3), 0)])
def test_channels_matches_reference(shape: tuple[int, ...], dim: int) -> None:
    t = _rand(*shape, seed=dim)
    mask = Channels(0.5, dim=dim).mask(t)
    assert torch.equal(mask, ref_slices(t, dim, t.shape[dim], 0.5))
    want = {0: "row", 1: "column"}[dim] if t.dim() == 2 else "channel(dim=0)"
    assert str(TeSA(mask).pattern) == want


@pytest.mark.parametrize("dim", [0, 1])
def test_heads_matches_reference(dim: int) -> None:
    t = _rand(48, 48, seed=7)
    mask = Heads(6, 0.5, dim=dim).mask(t)
    assert torch.equal(mask, ref_slices(t, dim, 6, 0.5))
    kept_heads = mask.movedim(dim, 0).reshape(6, -1).all(dim=1)
    assert int(kept_heads.sum()) == 3
    assert torch.equal(Heads(6, 0.5).mask(_rand(48)), ref_slices(_rand(48), 0, 6, 0.5))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Magnitude(1.0), r"in \[0, 1\).*got 1\.0"),
        (lambda: Magnitude(-0.1), r"in \[0, 1\)"),
        (lambda: GlobalMagnitude("0.5"), r"sparsity"),
        (lambda: NM(4, 4), r"n must be smaller than m.*\(4, 4\)"),
        (lambda: NM(0, 4), r"n must be an int >= 1"),
        (lambda: GroupedNM(2, 4, 0), r"g must be an int >= 1"),
        (lambda: GroupedNM(8, 16, 8), r"C\(m, n\)"),
        (lambda: BlockMagnitude((32,), 0.5), r"pair \(bh, bw\)"),
        (lambda: BlockMagnitude((0, 4), 0.5), r"pair \(bh, bw\)"),
        (lambda: Threshold(-1.0), r"finite number >= 0"),
        (lambda: Threshold(float("nan")), r"finite number >= 0"),
        (lambda: RandomFraction(0.5, seed=-1), r"seed must be an int >= 0"),
        (lambda: Heads(0, 0.5), r"num_heads must be an int >= 1"),
        (lambda: Channels(0.5, dim=1.5), r"dim must be an int"),
    ],
)
def test_bad_arguments(make, match: str) -> None:  # noqa: ANN001
    with pytest.raises(AttrError, match=match):
        make()


def test_bad_tensors() -> None:
    with pytest.raises(AttrError, match="multiple of num_heads=5"):
        Heads(5, 0.5).mask(_rand(48, 8))
    with pytest.raises(AttrError, match="dim must index"):
        Channels(0.5, dim=2).mask(_rand(4, 4))
    with pytest.raises(AttrError, match="at least 2 dims"):
        BlockMagnitude((4, 4), 0.5).mask(_rand(16))
    with pytest.raises(AttrError, match="NaN"):
        Magnitude(0.5).mask(torch.tensor([1.0, float("nan")]))


def test_custom_sparsifier_through_sparsify() -> None:
    class Upper(Sparsifier):
        def masks(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: torch.ones_like(t, dtype=torch.bool).triu() for n, t in tensors.items()}

    model = nn.Linear(4, 4)
    assert torch.equal(
        sparsify(model, {"weight": Upper()})["weight"], torch.ones(4, 4).bool().triu()
    )
    assert math.isclose(float(Upper().mask(torch.ones(3, 3)).float().mean()), 6 / 9, rel_tol=1e-6)


def test_a_glob_catching_norm_scales_warns_and_an_exact_name_does_not() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    with pytest.warns(UserWarning, match=r"'\*\.weight' also matched 1 .* \(e\.g\. '1\.weight'\)"):
        masks = sparsify(model, {"*.weight": Magnitude(0.5)})
    assert set(masks) == {"0.weight", "1.weight", "2.weight"}  # still pruned as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(model, {"1.weight": Magnitude(0.5), "[02].weight": Magnitude(0.5)})
