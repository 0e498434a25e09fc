"""The RL loop on tiny models: metrics, checkpoints, parameter updates, λ dynamics, and what the loss sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import repo_exp.train as train_module
from repo_exp.config import validate
from repo_exp.models.weights import load_state_dict_safely

from conftest import repo_root
from reliability_support import make_trainer, metric_rows

ROOT = repo_root()
STEP_KEYS = ["reward/mean", "cost/mean", "cost/unsafe_rate", "cost/violation_mean", "constraint/lambda",
             "constraint/active_rate", "kl/mean", "loss/actor", "timing/step"]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in metric_rows(run_dir) if "reward/mean" in r]


def test_smoke_cli_writes_metrics_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "repo_exp", "experiment=smoke", "logger=none",
                           "trainer.progress=false", f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = train_rows(run)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in STEP_KEYS:
        assert all(key in r for r in steps), key
    ckpt = run / "checkpoints" / "step_000004"
    for name in ("policy/model.safetensors", "reward_critic/model.safetensors", "cost_critic/model.safetensors",
                 "actor.optim.pt", "state.json", "rng.pt", "manifest.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 4 and "log_lambda" not in state["constraint"] and "lambda" in state["constraint"]
    assert (run / "eval" / "summary.json").is_file() and (run / "eval" / "initial" / "per_prompt.jsonl").is_file()


def test_short_run_changes_every_trainable_actor_parameter(smoke_cfg, tmp_path):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", "constraint=average", "trainer.total_steps=2",
                           "optimizer.actor.lr=1e-3", "optimizer.actor_scheduler.name=constant",
                           "optimizer.actor_scheduler.warmup_ratio=0")
    before = {n: p.detach().clone() for n, p in trainer.models.policy.module.named_parameters() if p.requires_grad}
    critic_before = {n: p.detach().clone() for n, p in trainer.models.critics.cost.module.named_parameters()}
    trainer.fit()
    after = dict(trainer.models.policy.module.named_parameters())
    unchanged = [n for n, p in before.items() if torch.equal(p, after[n].detach())]
    assert not unchanged, unchanged
    critic_after = dict(trainer.models.critics.cost.module.named_parameters())
    assert [n for n, p in critic_before.items() if torch.equal(p, critic_after[n].detach())] == []
    # the frozen reference did not move
    ref = dict(trainer.models.ref.named_parameters())
    assert all(torch.equal(before[n], ref[n]) for n in before)


@pytest.mark.parametrize("threshold,direction", [(-3.0, "up"), (3.0, "down")])
def test_average_lambda_follows_the_window_cost(smoke_cfg, tmp_path, threshold, direction):
    make_trainer(smoke_cfg, tmp_path / "run", "constraint=average", f"constraint.threshold={threshold}",
                 "trainer.total_steps=3").fit()
    lams = [r["constraint/lambda"] for r in train_rows(tmp_path / "run")]
    pairs = list(zip([1.0] + lams, lams))
    assert all((b > a) if direction == "up" else (b < a) for a, b in pairs), lams


@pytest.mark.parametrize("normalize", [False, True])
def test_rectified_safe_samples_get_exactly_the_reward_advantage(smoke_cfg, tmp_path, monkeypatch, normalize):
    seen = []
    original = train_module.policy_loss

    def recording(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        seen.append(advantages.detach().clone())
        return original(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    captured = []
    original_compute = train_module.compute_advantages

    def capture(exp, constraint, cfg):
        original_compute(exp, constraint, cfg)
        captured.append((exp.costs.clone(), exp.reward_advantages.clone(), exp.cost_advantages.clone(),
                         exp.cost_active.clone(), constraint.multiplier, constraint.threshold,
                         exp.cost_signal.clone()))

    monkeypatch.setattr(train_module, "policy_loss", recording)
    monkeypatch.setattr(train_module, "compute_advantages", capture)
    # threshold 0 on random tiny cost models: both safe and unsafe samples occur
    make_trainer(smoke_cfg, tmp_path / "run", "constraint=rectified_gated", "constraint.lambda_init=3.0",
                 f"constraint.normalize={normalize}", "trainer.total_steps=2").fit()
    assert len(seen) == len(captured) == 2
    n_safe = n_unsafe = 0
    for fed, (costs, a_r, a_c, gate, lam, d, signal) in zip(seen, captured):
        safe = costs <= d
        assert torch.equal(gate, ~safe)
        assert torch.equal(signal, costs.float())  # the gated form estimates A_c on the raw cost
        assert torch.equal(fed[safe], a_r[safe])  # no cost term at all
        penalised = a_r[~safe] - lam * a_c[~safe]
        torch.testing.assert_close(fed[~safe], penalised / (1 + lam) if normalize else penalised)
        n_safe += int(safe.sum())
        n_unsafe += int((~safe).sum())
    assert n_safe > 0 and n_unsafe > 0


@pytest.mark.parametrize("normalize", [False, True])
def test_rectified_unbiased_every_sample_gets_the_mix_on_the_rectified_signal(smoke_cfg, tmp_path, monkeypatch,
                                                                             normalize):
    seen, captured = [], []
    original, original_compute = train_module.policy_loss, train_module.compute_advantages

    def recording(logprobs, old_logprobs, advantages, mask, *args, **kwargs):
        seen.append(advantages.detach().clone())
        return original(logprobs, old_logprobs, advantages, mask, *args, **kwargs)

    def capture(exp, constraint, cfg):
        original_compute(exp, constraint, cfg)
        captured.append((exp.costs.clone(), exp.reward_advantages.clone(), exp.cost_advantages.clone(),
                         exp.cost_signal.clone(), constraint.multiplier, constraint.threshold))

    monkeypatch.setattr(train_module, "policy_loss", recording)
    monkeypatch.setattr(train_module, "compute_advantages", capture)
    make_trainer(smoke_cfg, tmp_path / "run", "constraint=rectified", "constraint.lambda_init=3.0",
                 f"constraint.normalize={normalize}", "trainer.total_steps=2").fit()
    assert len(seen) == len(captured) == 2
    for fed, (costs, a_r, a_c, signal, lam, d) in zip(seen, captured):
        torch.testing.assert_close(signal, (costs.float() - d).clamp(min=0.0))  # (C − d)⁺
        mixed = a_r - lam * a_c
        torch.testing.assert_close(fed, mixed / (1 + lam) if normalize else mixed)
        assert a_c[costs <= d].abs().sum() > 0  # safe samples are credited too (A_c = 0 − V_c)


def test_accumulation_invariance(smoke_cfg, tmp_path):
    """Batch 8 × accumulation 1 gives the same update as batch 1 × accumulation 8."""
    results = []
    initial = None
    for micro in (16, 1):
        trainer = make_trainer(smoke_cfg, tmp_path / f"m{micro}" / "run", "constraint=average",
                               "trainer.total_steps=1", f"trainer.micro_batch_size={micro}", "optimizer.actor.lr=1e-3",
                               "optimizer.actor_scheduler.name=constant", "optimizer.actor_scheduler.warmup_ratio=0")
        initial = {n: p.detach().clone() for n, p in trainer.models.policy.module.named_parameters()}
        trainer.fit()
        results.append({n: p.detach().clone() for n, p in trainer.models.policy.module.named_parameters()})
    moved = max((results[0][n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 5e-4  # an Adam step of lr 1e-3 moved the weights far more than the tolerance below
    for name, p in results[0].items():
        # Adam divides by √v: parameters with near-zero gradients amplify float summation-order noise
        torch.testing.assert_close(p, results[1][name], rtol=0, atol=1e-5)


def test_init_from_final_checkpoint_continues(smoke_cfg, tmp_path):
    first = make_trainer(smoke_cfg, tmp_path / "a" / "run", "constraint=average", "constraint.threshold=-3",
                         "trainer.total_steps=2")
    first.fit()
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "step_000002"
    lam = first.constraint.multiplier
    assert lam > 1.0
    second = make_trainer(smoke_cfg, tmp_path / "b" / "run", "constraint=average", "constraint.threshold=-3",
                          "trainer.total_steps=1", f"trainer.init_from={ckpt}")
    assert second.constraint.multiplier == pytest.approx(lam)
    saved = load_state_dict_safely(ckpt / "policy")
    for name, p in second.models.policy.module.state_dict().items():
        assert torch.equal(p, saved[name]), name
    saved_critic = load_state_dict_safely(ckpt / "cost_critic")
    for name, p in second.models.critics.cost.module.state_dict().items():
        if not name.startswith("normalizer."):
            assert torch.equal(p, saved_critic[name]), name


def test_ptx_loss_is_mixed_into_the_actor_update(smoke_cfg, tmp_path):
    """With ppo.ptx_coeff > 0 the actor also learns the SFT text: its NLL on that text falls faster than without."""
    from repo_exp.data.ptx import PtxStream, load_ptx_pairs
    from repo_exp.train import ptx_step_loss

    def nll_after(coeff: float, folder: str) -> float:
        trainer = make_trainer(smoke_cfg, tmp_path / folder / "run", "constraint=none", "trainer.total_steps=3",
                               f"ppo.ptx_coeff={coeff}", "ptx.source=world", "optimizer.actor.lr=3e-3",
                               "optimizer.actor_scheduler.name=constant", "optimizer.actor_scheduler.warmup_ratio=0")
        trainer.fit()
        config = trainer.config
        probe = PtxStream(load_ptx_pairs(config.ptx, config.world), trainer.models.tokenizer, config.model.template,
                          64, seed=99).next(64)
        with torch.no_grad():
            return ptx_step_loss(trainer.models.policy.module, probe, "cpu").item()

    with_ptx, without = nll_after(1.0, "with"), nll_after(0.0, "without")
    assert with_ptx < without - 0.5, (with_ptx, without)
    metrics = train_rows(tmp_path / "with" / "run")
    assert all(r["loss/ptx"] > 0 for r in metrics)


def test_separate_ptx_takes_its_own_steps_on_the_ptx_gradient_alone(smoke_cfg, tmp_path):
    """``ppo.ptx_mode=separate``: after the RL update, one optimizer step per RL step (2 minibatches → 2), each on an
    RL minibatch's worth of PTX samples (12 / 2 = 6, in micro-batches of 4 and 2), whose gradient is exactly
    ``ptx_coeff`` × the gradient of the NLL's mean over the 6 rows' tokens taken as one batch — nothing of the RL
    loss, nothing of how the rows were split — and the actor's schedule doubles."""
    import types

    from repo_exp.setup import _optimizer_steps
    from repo_exp.train import ptx_step_loss, ptx_update

    trainer = make_trainer(smoke_cfg, tmp_path / "run", "constraint=none", "ppo.ptx_coeff=2.0", "ptx.source=world",
                           "ppo.ptx_mode=separate", "ppo.num_minibatches=2", "trainer.micro_batch_size=4")
    config, module = trainer.config, trainer.models.policy.module
    assert _optimizer_steps(config, actor=True) == 2 * _optimizer_steps(config) == 2 * 4 * 2
    steps: list[dict[str, torch.Tensor]] = []

    class Recorder:  # an engine that keeps each step's gradient instead of moving the weights
        def __init__(self):
            self.module = module

        def backward(self, loss):
            loss.backward()

        def zero_grad(self):
            module.zero_grad(set_to_none=True)

        def step(self):
            steps.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
            self.zero_grad()
            return {"grad_norm": 1.0, "lr": 0.0, "skipped": 0.0}

    start = trainer.ptx.state_dict()
    models = types.SimpleNamespace(policy=Recorder(), autocast=trainer.models.autocast)
    metrics = ptx_update(models, config, trainer.ptx, 12, lambda ok: ok)
    assert len(steps) == 2 and metrics["loss/ptx"] > 0 and metrics["loss/ptx_skipped"] == 0.0
    trainer.ptx.load_state_dict(start)  # the same batches again, by hand
    for recorded in steps:
        module.zero_grad(set_to_none=True)
        loss = 2.0 * ptx_step_loss(module, trainer.ptx.next(6), "cpu")  # the same 6 rows in one batch
        loss.backward()
        for name, p in module.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(recorded[name], p.grad, rtol=1e-5, atol=1e-7)
    # a real run logs the separate PTX loss and its own gradient norm
    trainer.config.trainer.total_steps = 1
    trainer.fit()
    row = train_rows(tmp_path / "run")[0]
    assert row["loss/ptx"] > 0 and "grad_norm/actor_ptx" in row


def test_ptx_needs_data(smoke_cfg):
    from repo_exp.config import ConfigError

    with pytest.raises(ConfigError, match="ptx.source"):
        validate(smoke_cfg("ppo.ptx_coeff=1.0"))


def test_max_length_counts_the_prompt_and_ranks_agree_on_the_budget(smoke_cfg, tmp_path):
    """``trainer.max_length``: a batch generates max_length − its prompt width; over ranks the smallest budget."""
    from repo_exp.rollout import Timings
    from repo_exp.rollout.budget import generation_budget

    assert generation_budget(64, None, 30) == 64
    assert generation_budget(64, 512, 130) == 382
    widths_of_two_ranks = lambda x: torch.cat([x, torch.tensor([512 - 300])])  # the other rank's prompts: 300 wide
    assert generation_budget(64, 512, 130, widths_of_two_ranks) == 212
    with pytest.raises(ValueError, match="trainer.max_length"):
        generation_budget(64, 100, 100)
    from repo_exp.config import ConfigError

    with pytest.raises(ConfigError, match="must exceed trainer.max_prompt_length"):
        validate(smoke_cfg("trainer.max_length=40", "trainer.max_prompt_length=40"))
    trainer = make_trainer(smoke_cfg, tmp_path / "run", "trainer.max_length=48", "trainer.max_new_tokens=2")
    exp = trainer.rollout(0, Timings())
    budget = 48 - exp.prompt_width
    assert budget > 2  # max_new_tokens no longer limits
    assert exp.sequences.shape[1] <= 48 and int(exp.response_mask.sum(-1).max()) == budget


def test_the_update_reasons_about_the_distribution_sampled_from(smoke_cfg, tmp_path):
    """At temperature 0.5 with top-k and top-p, the batch keeps the behaviour policy's log-probabilities (the truncated,
    tempered distribution each token was drawn from) and the reference's at the same temperature without truncation,
    each checked against an independent computation; the first update's forward pass agrees with them (the check
    before the first update passes and the first PPO ratio is 1)."""
    from repo_exp.models.score_model import position_ids_from_mask
    from repo_exp.rollout import Timings
    from test_generate import sampling_distribution

    settings = dict(temperature=0.5, top_k=8, top_p=0.9)
    trainer = make_trainer(smoke_cfg, tmp_path / "run", *(f"trainer.{k}={v}" for k, v in settings.items()))
    exp = trainer.rollout(0, Timings())
    width = exp.prompt_width
    with torch.no_grad():
        logits = {name: model(input_ids=exp.sequences, attention_mask=exp.attention_mask,
                              position_ids=position_ids_from_mask(exp.attention_mask)).logits[:, width - 1: -1]
                  for name, model in (("policy", trainer.models.policy.module), ("ref", trainer.models.ref))}
    positions = exp.response_mask.nonzero().tolist()
    assert len(positions) > 50
    truncated = 0
    for b, t in positions[::3]:
        token = int(exp.sequences[b, width + t])
        behaviour = sampling_distribution(logits["policy"][b, t], **settings)
        reference = torch.log_softmax(logits["ref"][b, t].double() / settings["temperature"], dim=-1)
        assert abs(float(exp.logprobs[b, t]) - float(behaviour[token].log())) < 1e-5
        assert abs(float(exp.ref_logprobs[b, t]) - float(reference[token])) < 1e-5
        truncated += int((behaviour == 0).any())
    assert truncated > 0, "top-k / top-p cut some distribution, so the truncation is exercised"
    metrics = trainer.train_step(0)
    assert trainer.logprobs_checked
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["policy/clipfrac"] == 0.0
    # the policy starts as the reference: the KL of a truncated distribution to the full one is −log(kept mass) > 0
    assert metrics["kl/mean"] > 0
