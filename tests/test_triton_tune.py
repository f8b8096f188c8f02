"""The tile sweep: which plans and launches it measures, at which token counts, and what wins."""

import torch

from sparta.codegen import triton_tune as tt


def _mask() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(8, 8, generator=g) < 0.3
    return blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)


def _fake_timer(calls: list, fastest_bn: int):
    def timer(plan, m, launch):
        calls.append((plan.bn, plan.bk, m, launch))
        return 1.0 + (plan.bn != fastest_bn) + launch[1] / 1000

    return timer


def test_few_tokens_measure_every_plan_at_that_count():
    plans = tt.candidate_plans(_mask())
    calls: list = []
    cfg = tt.sweep(plans, _fake_timer(calls, fastest_bn=32), tokens=256)
    measured_at_256 = {(bn, bk) for bn, bk, m, _ in calls if m == 256}
    assert measured_at_256 == {(p.bn, p.bk) for p in plans}
    assert cfg.bn == 32
    # the small regime's launch was chosen at 256 tokens, the large one at TUNE_M[0]
    assert (cfg.small_swap, cfg.small_block_m) in {(s[0], s[1]) for s in tt.SMALL_LAUNCH}
    assert any(m == tt.TUNE_M[0] for *_, m, _ in calls)


def test_many_tokens_measure_the_three_best_modelled_plans():
    plans = tt.candidate_plans(_mask())
    calls: list = []
    cfg = tt.sweep(plans, _fake_timer(calls, fastest_bn=plans[0].bn), tokens=4096)
    assert {(bn, bk) for bn, bk, m, _ in calls if m == 4096} == {(p.bn, p.bk) for p in plans[:3]}
    assert cfg.bn == plans[0].bn
    assert (cfg.swap, cfg.block_m) in {(s[0], s[1]) for s in tt.LARGE_LAUNCH}


def test_token_class_rounds_up_to_a_power_of_two_within_limits():
    assert tt.token_class(None) == tt.TUNE_M[0]
    assert tt.token_class(1) == 64
    assert tt.token_class(200) == 256
    assert tt.token_class(256) == 256
    assert tt.token_class(10**6) == tt.TUNE_M[0]
