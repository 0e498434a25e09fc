"""Constraint types: multiplier updates against hand computations, and which samples get a cost term."""

from __future__ import annotations

import math

import pytest
import torch

from repo_exp.constraints import AverageConstraint, NoConstraint, RectifiedConstraint, ShapingConstraint


def adv(B=4, T=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)


def test_average_log_space_sgd_step_by_hand():
    c = AverageConstraint(threshold=0.0, lambda_init=1.0, lambda_lr=0.1, window=128)
    c.update(torch.tensor([1.0, 3.0]), torch.arange(2), step=0)  # J_c = 2
    # log λ ← 0 + 0.1 · 1 · (2 − 0) = 0.2
    assert c.multiplier == pytest.approx(math.exp(0.2))
    c.update(torch.tensor([-4.0, -4.0]), torch.arange(2), step=1)  # window [1, 3, −4, −4] → J_c = −1
    assert c.multiplier == pytest.approx(math.exp(0.2 + 0.1 * math.exp(0.2) * (-1.0)))


def test_average_lambda_rises_above_threshold_and_falls_below():
    c = AverageConstraint(threshold=0.5, lambda_init=1.0, lambda_lr=0.1, window=4)
    lams = [c.multiplier]
    for _ in range(5):
        c.update(torch.full((4,), 1.0), torch.arange(4), step=10)
        lams.append(c.multiplier)
    assert all(b > a for a, b in zip(lams, lams[1:]))
    for _ in range(5):
        c.update(torch.full((4,), 0.0), torch.arange(4), step=10)
        lams.append(c.multiplier)
    assert all(b < a for a, b in zip(lams[5:], lams[6:]))


def test_average_window_keeps_the_last_episodes():
    c = AverageConstraint(window=3)
    c.update(torch.tensor([10.0, 10.0]), torch.arange(2), 0)
    c.update(torch.tensor([1.0, 2.0]), torch.arange(2), 0)
    assert list(c.window) == [10.0, 1.0, 2.0]
    assert c.window_cost() == pytest.approx(13.0 / 3)


def test_average_delay_and_cap():
    c = AverageConstraint(lambda_init=1.0, lambda_lr=1.0, lambda_max=2.0, delay=2)
    c.update(torch.tensor([5.0]), torch.arange(1), step=0)
    c.update(torch.tensor([5.0]), torch.arange(1), step=1)
    assert c.multiplier == pytest.approx(1.0)  # no update before `delay` steps
    c.update(torch.tensor([5.0]), torch.arange(1), step=2)
    assert c.multiplier == pytest.approx(2.0)  # log λ = 0 + 1·1·5 = 5, capped at log 2


def test_average_mixes_every_sample_with_normalisation():
    c = AverageConstraint(lambda_init=3.0)
    ar, ac = adv()
    out = c.mix_advantages(ar, ac, c.cost_gate(torch.zeros(4), torch.arange(4)))
    torch.testing.assert_close(out, (ar - 3.0 * ac) / 4.0)


def test_average_ignores_nonfinite_costs():
    c = AverageConstraint()
    c.update(torch.tensor([float("nan"), 1.0]), torch.arange(2), 0)
    c.update(torch.tensor([float("inf")]), torch.arange(1), 1)
    assert c.multiplier == 1.0 and len(c.window) == 0


def test_average_state_round_trip():
    c = AverageConstraint(window=5)
    c.update(torch.tensor([0.3, 0.7]), torch.arange(2), 0)
    d = AverageConstraint(window=5)
    d.load_state_dict(c.state_dict())
    assert d.multiplier == c.multiplier and list(d.window) == list(c.window)


def test_rectified_gated_sample_gate_safe_samples_get_exactly_reward_advantage():
    c = RectifiedConstraint(threshold=0.0, lambda_init=2.0, form="gated")
    ar, ac = adv()
    costs = torch.tensor([-1.0, 0.0, 0.5, 3.0])  # C ≤ d is safe: samples 0 and 1
    gate = c.cost_gate(costs, torch.arange(4))
    assert gate.tolist() == [False, False, True, True]
    out = c.mix_advantages(ar, ac, gate)
    assert torch.equal(out[:2], ar[:2])
    torch.testing.assert_close(out[2:], (ar[2:] - 2.0 * ac[2:]) / 3.0)


def test_rectified_gated_prompt_gate_treats_a_prompt_alike():
    c = RectifiedConstraint(threshold=0.0, granularity="prompt", lambda_init=1.0, normalize=False, form="gated")
    ar, ac = adv(B=6)
    # prompt 7: costs (1, −3) → mean −1: safe; prompt 2: (−0.5, 1.5) → mean 0.5: unsafe; prompt 9: (0, 0) → safe
    costs = torch.tensor([1.0, -3.0, -0.5, 1.5, 0.0, 0.0])
    prompts = torch.tensor([7, 7, 2, 2, 9, 9])
    gate = c.cost_gate(costs, prompts)
    assert gate.tolist() == [False, False, True, True, False, False]
    out = c.mix_advantages(ar, ac, gate)
    assert torch.equal(out[[0, 1, 4, 5]], ar[[0, 1, 4, 5]])
    torch.testing.assert_close(out[2:4], ar[2:4] - ac[2:4])


def test_rectified_unbiased_sample_signal_by_hand():
    c = RectifiedConstraint(threshold=0.25, lambda_init=2.0, normalize=False)
    costs = torch.tensor([-1.0, 0.0, 0.5, 3.0])
    assert c.cost_signal(costs, torch.arange(4)).tolist() == [0.0, 0.0, 0.25, 2.75]  # (C − d)⁺
    assert c.cost_gate(costs, torch.arange(4)).all()  # every sample gets A_r − λ·A_c
    assert c.penalised(costs, torch.arange(4)).tolist() == [False, False, True, True]
    ar, ac = adv()
    torch.testing.assert_close(c.mix_advantages(ar, ac, c.cost_gate(costs, torch.arange(4))), ar - 2.0 * ac)


def test_rectified_unbiased_prompt_signal_by_hand():
    c = RectifiedConstraint(threshold=0.0, granularity="prompt")
    # k = 2, d = 0. Prompt 7: (1, −3), mean −1 → 0; without sample 0: −3 → 0; without sample 1: 1 → 1.
    # Prompt 2: (−0.5, 1.5), mean 0.5; without 0: 1.5; without 1: −0.5 → 0. Prompt 9: (0, 0) → 0.
    costs = torch.tensor([1.0, -3.0, -0.5, 1.5, 0.0, 0.0])
    prompts = torch.tensor([7, 7, 2, 2, 9, 9])
    expected = [2 * (0 - 0), 2 * (0 - 1), 2 * (0.5 - 1.5), 2 * (0.5 - 0), 0.0, 0.0]
    torch.testing.assert_close(c.cost_signal(costs, prompts), torch.tensor(expected))
    assert c.cost_signal_centred
    assert c.penalised(costs, prompts).tolist() == [False, False, True, True, False, False]


def test_rectified_learned_multiplier_dual_ascent_and_cap():
    c = RectifiedConstraint(threshold=0.5, multiplier="learned", lambda_init=1.0, lambda_lr=0.5, lambda_max=2.0)
    c.update(torch.tensor([1.5, 0.0, 0.5, 2.5]), torch.arange(4), 0)  # (C − d)⁺ = 1, 0, 0, 2 → 0.75
    assert c.multiplier == pytest.approx(1.0 + 0.5 * 0.75)
    c.update(torch.tensor([10.0]), torch.arange(1), 1)
    assert c.multiplier == pytest.approx(2.0)  # capped
    fixed = RectifiedConstraint(multiplier="fixed", lambda_init=1.5)
    fixed.update(torch.tensor([10.0]), torch.arange(1), 0)
    assert fixed.multiplier == 1.5


def test_rectified_prompt_violation_counts_prompts_not_samples():
    c = RectifiedConstraint(threshold=0.0, granularity="prompt")
    # prompt 0: 3 samples with mean 1 → 1; prompt 1: 1 sample cost −1 → 0; mean over prompts 0.5
    v = c.violation(torch.tensor([0.0, 1.0, 2.0, -1.0]), torch.tensor([0, 0, 0, 1]))
    assert v.item() == pytest.approx(0.5)


def test_lambda_never_negative_or_nan():
    c = RectifiedConstraint(multiplier="learned", lambda_init=0.0, tolerance=1.0)
    c.update(torch.tensor([0.0]), torch.arange(1), 0)  # violation 0 − tolerance 1 → would go negative
    assert c.multiplier == 0.0
    c.update(torch.tensor([float("nan")]), torch.arange(1), 1)
    assert c.multiplier == 0.0
    a = AverageConstraint(lambda_lr=10.0)
    for _ in range(20):
        a.update(torch.tensor([1e6]), torch.arange(1), 0)
    assert math.isfinite(a.multiplier) and a.multiplier > 0


def test_shaping_penalises_every_sample_and_none_never():
    ar, ac = adv()
    costs = torch.tensor([-1.0, -1.0, 2.0, 2.0])
    s = ShapingConstraint(multiplier=0.5)
    torch.testing.assert_close(s.mix_advantages(ar, ac, s.cost_gate(costs, torch.arange(4))), ar - 0.5 * ac)
    n = NoConstraint()
    assert not n.needs_cost_critic
    assert torch.equal(n.mix_advantages(ar, ac, n.cost_gate(costs, torch.arange(4))), ar)
    assert (n.kl_reward_weight, n.kl_cost_weight) == (1.0, 0.0)
    # the KL is on the cost signal exactly when the mix divides by 1 + λ
    assert (AverageConstraint().kl_cost_weight, ShapingConstraint().kl_cost_weight) == (1.0, 0.0)
    assert RectifiedConstraint(normalize=True).kl_cost_weight == 1.0
    assert RectifiedConstraint(normalize=False).kl_cost_weight == 0.0


def test_bad_constraint_values_are_refused():
    with pytest.raises(ValueError, match="granularity"):
        RectifiedConstraint(granularity="token")
    with pytest.raises(ValueError, match="threshold"):
        AverageConstraint(threshold=float("nan"))
    with pytest.raises(ValueError, match="lambda_init"):
        AverageConstraint(lambda_init=0.0)


def test_average_projected_update_by_hand():
    c = AverageConstraint(threshold=0.0, lambda_init=0.5, lambda_lr=0.2, lambda_update="projected", lambda_max=3.0,
                          lambda_min=0.0)
    c.update(torch.tensor([-1.0, -3.0]), torch.arange(2), 0)  # J_c = −2: 0.5 − 0.4 = 0.1
    assert c.multiplier == pytest.approx(0.1)
    c.update(torch.tensor([-10.0, -10.0]), torch.arange(2), 1)  # J_c = −5.5: clipped at 0
    assert c.multiplier == 0.0
    c.update(torch.tensor([100.0] * 20), torch.arange(20), 2)  # capped at 3
    assert c.multiplier == 3.0
    d = AverageConstraint(lambda_update="projected", lambda_init=0.0, lambda_min=0.0)
    d.load_state_dict(c.state_dict())
    assert d.multiplier == 3.0


class ThreadComm:
    """Two ranks in one process, one thread each: every collective waits for both and sees both ranks' tensors."""

    world_size = 2

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.shared = rank, shared

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared["slots"][self.rank] = x.clone()
        self.shared["barrier"].wait()
        parts = list(self.shared["slots"])
        self.shared["barrier"].wait()  # nobody overwrites a slot before both have read
        return parts

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(x))

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._exchange(x)
        return (a + b) / 2


def run_two_ranks(scope: str, costs_per_rank, lambda_max=100.0, steps=2):
    import threading

    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=30)}
    constraints = [AverageConstraint(window=4, window_scope=scope, lambda_max=lambda_max, comm=ThreadComm(r, shared))
                   for r in range(2)]
    metrics: list[list[dict]] = [[], []]

    def rank(r: int) -> None:
        for step in range(steps):
            costs = torch.tensor(costs_per_rank[r](step + 1))
            metrics[r].append(constraints[r].update(costs, torch.arange(len(costs)), step))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return constraints, metrics


def test_two_rank_cost_window_per_rank_and_global():
    """Step t: rank 0 sees costs [t, t], rank 1 [10t, 10t, 10t] (unequal batches); window 4.

    rank scope (published): step 1 windows [1, 1] and [10, 10, 10] → J_c = (1 + 10)/2 = 5.5;
      step 2 windows [1, 1, 2, 2] (1.5) and [10, 20, 20, 20] (17.5) → J_c = 9.5.
    global scope: the last 4 of all gathered episodes: step 1 [1, 10, 10, 10] → 7.75; step 2 [2, 20, 20, 20] → 15.5.
    """
    costs = [lambda t: [float(t)] * 2, lambda t: [10.0 * t] * 3]
    for scope, expected in (("rank", (5.5, 9.5)), ("global", (7.75, 15.5))):
        constraints, metrics = run_two_ranks(scope, costs)
        for r in range(2):  # every rank agrees on J_c and λ
            assert [m["constraint/window_cost"] for m in metrics[r]] == pytest.approx(expected), (scope, r)
        log_lambda = 0.0
        for j_c in expected:
            log_lambda += 0.1 * math.exp(log_lambda) * j_c
        assert constraints[0].log_lambda == pytest.approx(log_lambda) == constraints[1].log_lambda


def test_lambda_cap_and_floor_are_reported_and_warned_once(caplog):
    from repo_exp.constraints import bounds

    bounds._WARNED.clear()
    costs = [lambda t: [float(t)] * 2, lambda t: [10.0 * t] * 3]
    # rank scope, λ_max 5: log λ 0.55 after step 1, then 0.55 + 0.1·e^0.55·9.5 > log 5 → capped at step 2
    constraints, metrics = run_two_ranks("rank", costs, lambda_max=5.0)
    assert constraints[0].multiplier == pytest.approx(5.0)
    assert [m["constraint/lambda_at_bound"] for m in metrics[0]] == [0.0, 1.0]
    c = AverageConstraint(lambda_max=5.0, lambda_min=0.1)
    with caplog.at_level("WARNING", logger="repo_exp.constraints.bounds"):
        assert c.update(torch.tensor([-1e6]), torch.tensor([0]), 0)["constraint/lambda_at_bound"] == -1.0
        assert c.multiplier == pytest.approx(0.1)  # the floor, not 0: the update climbs back from it
        assert c.update(torch.tensor([-1.0]), torch.tensor([0]), 1)["constraint/lambda_at_bound"] == -1.0
    floor_warnings = [r for r in caplog.records if "floor" in r.getMessage()]
    assert len(floor_warnings) == 1  # once, although λ stayed there
    r = RectifiedConstraint(multiplier="learned", lambda_init=1.0, lambda_lr=1.0, lambda_max=2.0)
    assert r.update(torch.tensor([5.0]), torch.tensor([0]), 0)["constraint/lambda_at_bound"] == 1.0
    assert "constraint/lambda_at_bound" not in RectifiedConstraint().update(torch.tensor([5.0]), torch.tensor([0]), 0)


PHASES = ((5.0, 60), (-5.0, 200), (5.0, 60))  # the batch cost far above d = 0, far below, above again


def drive(c: AverageConstraint, phases=PHASES) -> list[list[float]]:
    """λ after every step of each phase; the window holds one batch, so J_c is the batch's cost."""
    out = []
    for cost, steps in phases:
        lams = []
        for step in range(steps):
            c.update(torch.full((8,), cost), torch.arange(8), step)
            lams.append(c.multiplier)
        out.append(lams)
    return out


@pytest.mark.parametrize("rule", ["log_sgd", "projected"])
def test_average_lambda_stays_within_its_bounds_and_is_enforced_again_after_each_switch(rule):
    """Far above d, far below, above again: λ never leaves [floor, cap], reaches the cap while the constraint is
    violated, and after the switch back is at λ ≥ 1 (the cost weighs as much as the reward) within the stated
    number of steps: ``climb_steps(floor, 1, lr, gap)`` for log-space SGD, ``(1 − floor)/(lr·gap)`` for projected."""
    from repo_exp.constraints.average import climb_steps

    c = AverageConstraint(threshold=0.0, window=8, lambda_update=rule, lambda_min=0.1 if rule == "log_sgd" else 0.0)
    assert (c.lambda_max, c.lambda_lr) == (5.0, 0.1)  # the published cap and learning rate are the defaults
    above, below, again = drive(c)
    everything = above + below + again
    assert min(everything) >= c.lambda_min and max(everything) <= c.lambda_max + 1e-12
    assert above[-1] == pytest.approx(5.0) and below[-1] == pytest.approx(c.lambda_min)
    bound = climb_steps(0.1, 1.0, 0.1, 5.0) if rule == "log_sgd" else math.ceil(1.0 / (0.1 * 5.0))
    first = next(i for i, lam in enumerate(again) if lam >= 1.0) + 1
    assert first <= bound, (first, bound)
    assert again[-1] == pytest.approx(5.0)  # and held at the cap while the violation lasts


def test_average_without_bounds_switches_itself_off():
    """The failure the bounds remove: with no cap λ runs up exponentially, the first step below d throws log λ to the
    numeric floor, and from there a step proportional to λ never brings it back within the run."""
    c = AverageConstraint(threshold=0.0, window=8, lambda_max=1e13, lambda_min=math.exp(-30.0))
    above, below, again = drive(c, ((1.5, 66), (-1.0, 4), (5.0, 60)))
    assert above[-1] > 1e6 and below[-1] == pytest.approx(math.exp(-30.0))
    assert max(again) < 1e-10  # 60 steps far above d and λ has not moved


def test_climb_steps_is_an_upper_bound_by_hand():
    from repo_exp.constraints.average import climb_steps

    # per step 1/λ falls by at least 0.1·5/(1 + 0.1·1·5) = 1/3; from 1/0.1 = 10 to 1: ⌈9 · 3⌉ = 27
    assert climb_steps(0.1, 1.0, 0.1, 5.0) == 27
    lam, steps = 0.1, 0
    while lam < 1.0:
        lam, steps = lam * math.exp(0.1 * lam * 5.0), steps + 1
    assert steps <= 27


def test_lambda_trace_records_the_range_and_the_steps_at_each_bound():
    from repo_exp.constraints.bounds import LambdaTrace

    c = AverageConstraint(threshold=0.0, window=8)
    trace = LambdaTrace()
    trace.observe(c.multiplier)
    for cost, steps in PHASES:
        for step in range(steps):
            metrics = c.update(torch.full((8,), cost), torch.arange(8), step)
            trace.observe(c.multiplier, metrics["constraint/lambda_at_bound"])
    summary = trace.summary()
    assert summary["train/lambda_min"] == pytest.approx(0.1) and summary["train/lambda_max"] == pytest.approx(5.0)
    assert summary["train/updated_steps"] == 320
    assert 0 < summary["train/steps_at_floor"] < 200 and 0 < summary["train/steps_at_cap"] < 120
    again = LambdaTrace()
    again.load_state_dict(trace.state_dict())
    assert again.summary() == summary
