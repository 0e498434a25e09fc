"""Numerical guards: a NaN or Inf in a reward, a cost, a loss or λ skips the step (no parameter, λ or cost window
moves), is logged, and after ``trainer.max_nonfinite_in_a_row`` skips in a row stops the run with a checkpoint of the
last good state. λ never becomes NaN, infinite or negative, whatever the costs are."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file

import repo_exp.train as train_module
from repo_exp.checkpoint import CheckpointManager, verify
from repo_exp.constraints import AverageConstraint, NoConstraint, RectifiedConstraint, ShapingConstraint
from repo_exp.train import NonFiniteError

from reliability_support import make_trainer, metric_rows

# one rollout chunk and one micro-batch per step (16 samples): call number n of a scorer or a loss is step n + 1
RUN = ("trainer.save_every=1", "trainer.keep_last=10", "trainer.max_nonfinite_in_a_row=2", "constraint=average",
       "constraint.window=24")


class Poisoned:
    """Wraps a scorer or a loss function; calls whose number is in ``calls`` (0-based) get ``value`` in their first
    element."""

    def __init__(self, inner, value: float, calls) -> None:
        self.inner, self.value, self.calls, self.count = inner, value, calls, 0

    def _poison(self, x: torch.Tensor) -> torch.Tensor:
        hit = self.count in self.calls
        self.count += 1
        if not hit:
            return x
        x = x.clone()
        x.view(-1)[0] = self.value
        return x

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):  # policy_loss: (loss, stats)
            return (self._poison(out[0]), *out[1:])
        return self._poison(out)


def inject(trainer, monkeypatch, where: str, value: float, calls) -> str:
    """Poison ``where`` (reward, cost, loss or lambda) at the given calls; returns the reason the trainer logs."""
    if where in ("reward", "cost"):
        setattr(trainer.models, where, Poisoned(getattr(trainer.models, where), value, calls))
        return "a reward or cost is not finite"
    if where == "loss":
        monkeypatch.setattr(train_module, "policy_loss", Poisoned(train_module.policy_loss, value, calls))
        return "a loss, an advantage or a gradient is not finite"
    constraint, update, count = trainer.constraint, trainer.constraint.update, iter(range(10**6))

    def update_then_break(costs, prompt_index, step):
        metrics = update(costs, prompt_index, step)
        if next(count) in calls:
            constraint.log_lambda = value  # as a bug in an update rule would leave it
        return metrics

    monkeypatch.setattr(constraint, "update", update_then_break)
    return "λ is not finite"


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("policy", "reward_critic", "cost_critic"):
        out.update({f"{part}.{k}": v for k, v in load_file(folder / part / "model.safetensors").items()})
    return out


def assert_same_state(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "parameters moved on a skipped step"
    state = [json.loads((f / "state.json").read_text())["constraint"] for f in (a, b)]
    assert state[0] == state[1], "λ or the cost window moved on a skipped step"


@pytest.mark.parametrize("where", ["reward", "cost", "loss", "lambda"])
def test_nonfinite_steps_are_skipped_logged_and_stop_the_run_with_the_last_good_state(
        where, smoke_cfg, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    trainer = make_trainer(smoke_cfg, run_dir, *RUN, "trainer.total_steps=6")
    why = inject(trainer, monkeypatch, where, math.nan, calls=range(1, 100))
    with caplog.at_level(logging.WARNING, logger="repo_exp"), pytest.raises(NonFiniteError) as stop:
        trainer.fit()
    manager = CheckpointManager(run_dir / "checkpoints")
    assert str(stop.value) == (f"2 steps in a row were skipped ({why}); the last good state is saved in "
                               f"{manager.folder(3)}")
    assert f"step 2 skipped: {why} (1 in a row, the run stops at 2)" in caplog.text
    assert f"step 3 skipped: {why} (2 in a row, the run stops at 2)" in caplog.text
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "guard/skipped" not in rows[0]
    assert [(r["guard/skipped"], r["guard/nonfinite_in_a_row"]) for r in rows[1:]] == [(1.0, 1.0), (1.0, 2.0)]
    lambdas = [r["constraint/lambda"] for r in rows]
    assert all(math.isfinite(x) and x >= 0 for x in lambdas)
    assert lambdas[0] == lambdas[1] == lambdas[2]  # the skipped steps left λ where step 1 put it
    # the stop checkpoint is complete and holds the state after step 1, the last good one
    assert verify(manager.folder(3)) is None
    assert_same_state(manager.folder(3), manager.folder(1))


@pytest.mark.parametrize("where, value", [("cost", math.inf), ("reward", -math.inf), ("loss", math.nan)])
def test_one_nonfinite_step_is_skipped_and_the_run_goes_on(where, value, smoke_cfg, tmp_path, monkeypatch, caplog):
    run_dir = tmp_path / "run"
    trainer = make_trainer(smoke_cfg, run_dir, *RUN, "trainer.total_steps=4")
    why = inject(trainer, monkeypatch, where, value, calls={1})
    with caplog.at_level(logging.WARNING, logger="repo_exp"):
        trainer.fit()
    assert f"step 2 skipped: {why} (1 in a row, the run stops at 2)" in caplog.text
    rows = metric_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r.get("guard/skipped", 0.0) for r in rows] == [0.0, 1.0, 0.0, 0.0]
    assert trainer.nonfinite_in_a_row == 0  # a good step resets the count
    assert all(math.isfinite(r["reward/mean"]) for r in rows if "reward/mean" in r)
    manager = CheckpointManager(run_dir / "checkpoints")
    assert_same_state(manager.folder(2), manager.folder(1))


# ------------------------------------------------------------------------------------- the constraints directly


CONSTRAINTS = {
    "average": lambda: AverageConstraint(threshold=0.0, window=8),
    "average_capped": lambda: AverageConstraint(threshold=0.0, window=8, lambda_max=5.0),
    "rectified_learned": lambda: RectifiedConstraint(threshold=0.0, multiplier="learned", lambda_max=10.0),
    "rectified_prompt": lambda: RectifiedConstraint(threshold=-0.5, multiplier="learned", granularity="prompt"),
    "rectified_fixed": lambda: RectifiedConstraint(threshold=0.0),
    "shaping": lambda: ShapingConstraint(multiplier=2.0),
    "none": lambda: NoConstraint(),
}
BATCHES = [
    [0.5, -0.2, 1.0, 0.3],
    [math.nan, 0.1, 0.2, 0.3],
    [math.inf, 0.0, 0.0, 0.0],
    [-math.inf, 1.0, 1.0, 1.0],
    [3e38, 3e38, 3e38, 3e38],  # finite, near the float32 maximum
    [-3e38, -3e38, -3e38, -3e38],
    [math.inf, -math.inf, 0.0, 0.0],
    [math.nan] * 4,
    [0.5, 0.5, 0.5, 0.5],
]


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_lambda_stays_finite_and_non_negative_under_any_costs(name):
    constraint = CONSTRAINTS[name]()
    prompt_index = torch.tensor([0, 0, 1, 1])
    for step, batch in enumerate(BATCHES * 3):
        costs = torch.tensor(batch, dtype=torch.float32)
        before = constraint.state_dict()
        constraint.update(costs, prompt_index, step)
        lam = constraint.multiplier
        assert math.isfinite(lam) and lam >= 0.0, (step, batch, lam)
        if any(math.isnan(c) for c in batch):  # a NaN tells nothing about safety: the state must not move
            assert constraint.state_dict() == before
        if isinstance(constraint, AverageConstraint):
            assert all(math.isfinite(c) for c in constraint.window)
            assert constraint.multiplier <= (5.0 if name == "average_capped" else math.exp(30.0)) * (1 + 1e-9)
        if isinstance(constraint, RectifiedConstraint):
            assert lam <= constraint.lambda_max
        # whatever λ became, mixing finite advantages gives finite ones
        gate = constraint.cost_gate(costs, prompt_index)
        assert torch.isfinite(constraint.mix_advantages(torch.randn(4, 3), torch.randn(4, 3), gate)).all()
