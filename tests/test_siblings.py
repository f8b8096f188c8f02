"""Sibling linears (one input, several weights: q, k, v) stacked into one CPU kernel: chosen only
when measured faster, exact against the masked model, saved and loaded, backed off together."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sparta
import sparta.fusion as fusion
from sparta.codegen import cpu_ops, nm_cpu
from sparta.sparsifiers import NM

pytestmark = pytest.mark.skipif(not nm_cpu.available(), reason="no C++ compiler")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))


class Attention(nn.Module):
    """q, k, v off one input (k without a bias, v wider), q viewed as heads; a linear on
    another input that must stay out of the group."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(48, 40)
        self.k = nn.Linear(48, 40, bias=False)
        self.v = nn.Linear(48, 56)
        self.other = nn.Linear(40, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(*x.shape[:-1], 5, 8).flatten(-2)  # a view of the linear's output
        k, v = self.k(x), self.v(x)
        return torch.cat([q * k, v], -1).sum(-1, keepdim=True) + self.other(q)


def masked_reference(model: nn.Module, attrs: dict[str, torch.Tensor]) -> nn.Module:
    """The user's module with its parameters times the masks, through named_parameters()."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in attrs:
                p.mul_(attrs[name])
    return ref


def stacked_wins(monkeypatch, wins: bool = True) -> list[dict]:
    """Make the stacked kernel measure fastest (or slowest); every candidate still runs once."""
    real, seen = fusion.compare_ms, []

    def timed(fns, dev, **kw):
        real(fns, dev, **kw)
        seen.append(dict(fns))
        return {"stacked": 1.0 if wins else 3.0, "per-node": 2.0}

    monkeypatch.setattr(fusion, "compare_ms", timed)
    return seen


def attention_case(density: float = 0.2):
    torch.manual_seed(0)
    model = Attention().eval()
    attrs = {f"{n}.weight": torch.rand(m.weight.shape) < density for n, m in model.named_children()}
    return model, attrs, torch.randn(2, 7, 48)


def check_against_reference(compiled, model, attrs) -> None:
    ref = masked_reference(model, attrs)
    with torch.no_grad():
        for shape in ((2, 7, 48), (4, 2, 48), (3, 33, 48)):  # ragged token counts
            fresh = torch.randn(shape)
            torch.testing.assert_close(compiled(fresh), ref(fresh), rtol=1e-4, atol=1e-4)


def test_siblings_run_as_one_kernel_and_match_the_masked_model(monkeypatch, tmp_path) -> None:
    seen = stacked_wins(monkeypatch)
    model, attrs, x = attention_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = sparta.compile(model, attrs, (x,), backends=["sparse_cpu"], measure=False)
    impls = {n.name: c.impl for n, c in compiled.plan.choices.items()}
    assert sorted(impls.values()) == ["fused", "fused", "sparse_cpu", "sparse_cpu"], impls
    lead = next(c for c in compiled.plan.choices.values() if c.splits)
    assert lead.splits == (40, 40, 56) and lead.module.out_features == 136
    assert "stacked" in lead.reason and len(seen) == 1  # one group: q, k, v
    calls = [n for n in compiled.graph_module.graph.nodes if n.target is cpu_ops.SPARSE_LINEAR]
    assert len(calls) == 2  # the stacked q/k/v kernel and `other`
    check_against_reference(compiled, model, attrs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    report = {e.name: e for e in compiled.report.nodes}
    fused = [e for e in report.values() if e.impl == "fused"]
    assert len(fused) == 2 and all("computed in" in e.reason for e in fused)
    m = sparta.measure(compiled, (x,))
    assert any(n.weight.endswith("(+2 stacked)") for n in m.nodes), [n.weight for n in m.nodes]
    # saved and loaded without planning: the same kernel, the same answers
    path = tmp_path / "siblings.sparta"
    compiled.save(path)
    loaded = sparta.load(path, model)
    assert {n.name: (c.impl, c.splits) for n, c in loaded.plan.choices.items()} == {
        n.name: (c.impl, c.splits) for n, c in compiled.plan.choices.items()
    }
    with torch.no_grad():
        fresh = torch.randn(4, 9, 48)
        torch.testing.assert_close(loaded(fresh), compiled(fresh), rtol=0, atol=0)


def test_siblings_stay_separate_when_stacking_measures_slower(monkeypatch) -> None:
    stacked_wins(monkeypatch, wins=False)
    model, attrs, x = attention_case()
    compiled = sparta.compile(model, attrs, (x,), backends=["sparse_cpu"], measure=False)
    assert {c.impl for c in compiled.plan.choices.values()} == {"sparse_cpu"}
    assert not any(c.splits for c in compiled.plan.choices.values())
    assert sum("not kept" in c.reason for c in compiled.plan.choices.values()) == 1  # q says why
    check_against_reference(compiled, model, attrs)


def test_nm_siblings_stack_and_an_activation_keeps_a_linear_out(monkeypatch) -> None:
    """n:m siblings stack into one nm_cpu kernel; a sibling whose kernel absorbed its
    activation is not stacked (its epilogue differs)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 24), nn.Linear(64, 40), nn.Linear(64, 16)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x), torch.relu(self.c(x))], -1)

    stacked_wins(monkeypatch)
    torch.manual_seed(1)
    model = Block().eval()
    attrs = {f"{n}.weight": NM(2, 4).mask(m.weight.detach()) for n, m in model.named_children()}
    x = torch.randn(5, 64)
    compiled = sparta.compile(model, attrs, (x,), backends=["nm_cpu"], measure=False)
    choices = {n.name: c for n, c in compiled.plan.choices.items()}
    leads = [c for c in choices.values() if c.splits]
    assert len(leads) == 1 and leads[0].splits == (24, 40) and leads[0].impl == "nm_cpu"
    assert sum(c.impl == "fused" for c in choices.values()) == 1
    absorbed = [c for c in choices.values() if c.fused and not c.splits]
    assert len(absorbed) == 1  # c's kernel absorbed its relu and runs alone
    check = masked_reference(model, attrs)
    with torch.no_grad():
        for rows in (2, 5, 40):
            fresh = torch.randn(rows, 64)
            torch.testing.assert_close(compiled(fresh), check(fresh), rtol=1e-4, atol=1e-4)


def test_back_off_turns_the_whole_group_dense(monkeypatch) -> None:
    from sparta.plan import back_off

    stacked_wins(monkeypatch)
    model, attrs, x = attention_case()
    compiled = sparta.compile(model, attrs, (x,), backends=["sparse_cpu"], measure=False)
    p, plan = compiled.planned()
    lead = next(n for n, c in plan.choices.items() if c.splits)
    off = back_off(p, plan, [lead], "test")
    group = [lead, *plan.choices[lead].fused]
    assert all(off.choices[n].impl == "dense" for n in group)
