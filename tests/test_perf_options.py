"""Speed switches of the trainer, each off by default.

``trainer.mixed_precision=bf16``: every forward pass under bf16 autocast, float32 weights, gradients, optimizer
states, log-probabilities and losses; numerically sound (the PPO ratio starts at 1 within bf16 rounding); refused
under DeepSpeed. ``trainer.measure_cost=false``: ``constraint=none`` as plain PPO, without the cost model."""

from __future__ import annotations

import contextlib

import pytest
import torch

from repo_exp.config import ConfigError, validate

from reliability_support import make_trainer

FAST = ("trainer.mixed_precision=bf16", "model.attn_implementation=eager")


def test_default_is_float32_without_autocast(smoke_cfg, tmp_path):
    trainer = make_trainer(smoke_cfg, tmp_path / "run")
    assert trainer.config.trainer.mixed_precision == "no"
    assert isinstance(trainer.models.autocast(), contextlib.nullcontext)


def test_bf16_steps_keep_float32_state_and_start_the_ppo_ratio_at_one(smoke_cfg, tmp_path):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", *FAST, "constraint=rectified", "trainer.shared_critic=true",
                           "trainer.total_steps=2", "optimizer.actor.lr=1e-3",
                           "optimizer.actor_scheduler.name=constant")
    models = trainer.models
    # trained models share the policy's attention kernel
    assert all(e.module.model.config._attn_implementation == "eager" for e in models.critics.engines)
    before = {n: p.detach().clone() for n, p in models.policy.module.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in models.ref.named_parameters()}
    metrics = trainer.train_step(0)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    # the old log-probabilities come from bf16 sampling, the new ones from the bf16 update forward pass: before any
    # parameter moved they agree up to bf16 rounding, so the first ratio is 1 and nothing is clipped
    assert abs(metrics["policy/ratio"] - 1.0) < 1e-2
    assert metrics["policy/approx_kl"] < 1e-3
    assert metrics["policy/clipfrac"] == 0.0
    after = dict(models.policy.module.named_parameters())
    assert all(p.dtype == torch.float32 for p in after.values())
    assert [n for n, p in before.items() if torch.equal(p, after[n])] == []
    assert all(torch.equal(p, ref_before[n]) for n, p in models.ref.named_parameters())
    for engine in models.engines:
        for state in engine.optimizer.state.values():
            assert all(v.dtype == torch.float32 for v in state.values() if v.dim() > 0)


def test_bf16_forward_passes_really_run_in_bf16(smoke_cfg, tmp_path, monkeypatch):
    """The rollout's scoring and the update's forward passes see autocast on (and only under bf16)."""
    import repo_exp.rollout.make as make_module
    import repo_exp.train as train_module

    seen: dict[str, list[bool]] = {"ref": [], "update": []}
    original_ref = make_module.sequence_logprobs
    original_update = train_module.sequence_logprobs

    def ref_pass(*args, **kwargs):
        seen["ref"].append(torch.is_autocast_enabled("cpu"))
        return original_ref(*args, **kwargs)

    def update_pass(*args, **kwargs):
        seen["update"].append(torch.is_autocast_enabled("cpu"))
        return original_update(*args, **kwargs)

    monkeypatch.setattr(make_module, "sequence_logprobs", ref_pass)
    monkeypatch.setattr(train_module, "sequence_logprobs", update_pass)
    make_trainer(smoke_cfg, tmp_path / "bf16" / "run", *FAST, "constraint=none", "trainer.total_steps=1").train_step(0)
    assert seen == {"ref": [True], "update": [True]}
    seen = {"ref": [], "update": []}
    make_trainer(smoke_cfg, tmp_path / "fp32" / "run", "constraint=none", "trainer.total_steps=1").train_step(0)
    assert seen == {"ref": [False], "update": [False]}


@pytest.mark.parametrize("bad,message", [
    (("trainer.mixed_precision=fp16",), "trainer.mixed_precision must be one of"),
    (("trainer.mixed_precision=bf16", "deepspeed=zero2"), "deepspeed.bf16"),
])
def test_bad_mixed_precision_settings_are_refused_before_anything_loads(smoke_cfg, bad, message):
    with pytest.raises(ConfigError, match=message):
        validate(smoke_cfg(*bad))


def test_plain_ppo_never_runs_the_cost_model_and_logs_no_cost(smoke_cfg, tmp_path, monkeypatch):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", "constraint=none", "trainer.measure_cost=false",
                           "trainer.total_steps=1")
    calls = []
    cost_model = trainer.models.cost.model
    monkeypatch.setattr(cost_model, "end_scores", lambda *a, **k: calls.append(1))
    metrics = trainer.train_step(0)
    assert calls == []
    assert not [k for k in metrics if k.startswith("cost/")] and "timing/cost_forward" not in metrics
    assert "guard/skipped" not in metrics  # NaN placeholders for the costs do not trip the non-finite guard
    assert torch.isfinite(torch.tensor(metrics["reward/mean"])) and metrics["loss/actor"] == metrics["loss/actor"]


def test_constraint_none_measures_cost_by_default(smoke_cfg, tmp_path):
    metrics = make_trainer(smoke_cfg, tmp_path / "run", "constraint=none", "trainer.total_steps=1").train_step(0)
    assert {"cost/mean", "cost/unsafe_rate", "timing/cost_forward"} <= set(metrics)


@pytest.mark.parametrize("constraint", ["average", "rectified", "shaping"])
def test_only_constraint_none_may_skip_the_cost_model(smoke_cfg, constraint):
    with pytest.raises(ConfigError, match="measure_cost=false is only for constraint=none"):
        validate(smoke_cfg(f"constraint={constraint}", "trainer.measure_cost=false"))
