"""The paper-scale configuration: published names and revision, the Safe RLHF / RePO experiments at the published
hyperparameters (SPEC §5), another policy by one file, and launch scripts that compose offline."""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import yaml
from omegaconf import OmegaConf

from repo_exp.config import validate

from conftest import repo_root

REPO = repo_root()
PUBLISHED = ("model=alpaca7b", "reward=beaver7b", "cost=beaver7b", "data=pku_saferlhf", "deepspeed=zero3")


def test_published_configuration_composes_offline(compose):
    config = validate(compose(*PUBLISHED))
    assert config.model.path == "PKU-Alignment/alpaca-7b-reproduced" and config.model.source == "hub"
    assert config.reward.path == "PKU-Alignment/beaver-7b-v1.0-reward" and config.reward.kind == "reward"
    assert config.cost.path == "PKU-Alignment/beaver-7b-v1.0-cost" and config.cost.kind == "cost"
    assert config.data.path == "PKU-Alignment/PKU-SafeRLHF"
    assert config.data.revision == "d18ee9daa7f7a466c993213c84691b30c0e4c88d"  # the Safe RLHF-era data (SPEC §5)
    template = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
    assert config.model.template == config.reward.template == config.cost.template == template
    assert (config.deepspeed.zero_stage, config.deepspeed.bf16, config.deepspeed.enabled) == (3, True, True)


@pytest.mark.parametrize("method", ["safe_rlhf", "repo"])
def test_paper_experiments_use_the_published_hyperparameters(compose, method):
    c = validate(compose(f"experiment=paper/{method}"))
    assert c.model.name == "alpaca7b" and c.reward.name == c.cost.name == "beaver7b" and c.data.name == "pku_saferlhf"
    assert (c.deepspeed.zero_stage, c.deepspeed.bf16, c.deepspeed.offload) == (3, True, False)
    t = c.trainer
    assert t.max_prompt_length + t.max_new_tokens == 512 and t.temperature == 1.0
    assert (t.prompts_per_step, t.samples_per_prompt, t.micro_batch_size) == (16 * 8, 1, 16)  # 16 per GPU × 8
    assert t.epochs == 1  # one epoch over the prompts
    actor, critic = c.optimizer.actor, c.optimizer.critic
    assert (actor.lr, actor.weight_decay, list(actor.betas)) == (1e-5, 0.01, [0.9, 0.95])
    assert (critic.lr, critic.weight_decay, list(critic.betas)) == (5e-6, 0.0, [0.9, 0.95])
    assert (c.optimizer.actor_scheduler.name, c.optimizer.actor_scheduler.warmup_ratio) == ("cosine", 0.03)
    assert c.optimizer.critic_scheduler.name == "constant"
    assert 0.01 <= c.ppo.kl_coeff <= 0.02 and c.ppo.clip_range_ratio == 0.2 and c.ppo.epochs == 1
    assert c.model.gradient_checkpointing
    assert c.constraint.name == ("average" if method == "safe_rlhf" else "rectified")


def test_safe_rlhf_preset_has_each_published_baseline_setting(compose):
    """Each value as the published PPO-Lagrangian run has it (scripts/ppo-lag.sh, its trainer and score-model
    trainers); the framework's own behaviour stays the default outside the preset."""
    c = validate(compose("experiment=paper/safe_rlhf"))
    lam = c.constraint
    assert (lam.name, lam.lambda_init, lam.lambda_lr, lam.lambda_update) == ("average", 1.0, 0.1, "log_sgd")
    assert lam.lambda_max == 5.0  # --lambda_max 5.0
    assert (lam.window, lam.window_scope) == (128, "rank")  # --episode_cost_window_size 128, a deque per rank
    assert (lam.threshold, lam.delay) == (0.0, 0)  # --threshold 0.0, --lambda_update_delay_steps 0
    assert c.ppo.ptx_mode == "separate" and c.ppo.ptx_coeff == 16.0  # RLTrainer.ptx_step after rl_step
    assert c.trainer.max_length == 512  # --max_length 512: prompt and response together
    assert c.reward.normalize is False and c.cost.normalize is False  # --normalize_reward/--normalize_cost False
    assert (c.ppo.clip_range_ratio, c.ppo.clip_range_score, c.ppo.clip_range_value) == (0.2, 50.0, 5.0)
    world = c.world  # the reward and cost models' training (scripts/{reward,cost}-model.sh)
    for stage in (world.reward_model, world.cost_model):
        assert stage.score_regularization == 0.001 and stage.filter_inconsistent_pairs
    # elsewhere the framework's own behaviour stays the default (the published cap everywhere, with a floor)
    d = validate(compose("constraint=average"))
    assert (d.constraint.lambda_max, d.constraint.lambda_min, d.constraint.window_scope) == (5.0, 0.1, "global")
    assert (d.ppo.ptx_mode, d.trainer.max_length, d.reward.normalize, d.cost.normalize) == ("joint", None, None, None)


def test_the_two_paper_runs_differ_only_in_the_constraint(compose):
    safe, repo = (OmegaConf.to_container(compose(f"experiment=paper/{m}")) for m in ("safe_rlhf", "repo"))
    assert safe.pop("constraint")["name"] == "average" and repo.pop("constraint")["name"] == "rectified"
    assert safe == repo


def test_another_policy_is_one_yaml_file(compose):
    config = validate(compose("experiment=paper/repo", "model=qwen2_5_7b_instruct"))
    assert config.model.path == "Qwen/Qwen2.5-7B-Instruct" and config.model.template == "chat"
    assert config.model.template != config.reward.template  # so its responses are re-tokenised for the scorers


def test_epochs_sets_the_number_of_steps_from_the_prompt_set(smoke_cfg, tmp_path):
    from repo_exp.data import load_prompt_set
    from repo_exp.train import Trainer

    cfg = smoke_cfg("trainer.epochs=1.5", "trainer.prompts_per_step=8", "trainer.total_steps=1")
    config = validate(cfg)
    prompts = len(load_prompt_set(config.data, config.data.split, config.world))
    trainer = Trainer(config, cfg, tmp_path / "run")
    assert trainer.config.trainer.total_steps == math.ceil(1.5 * prompts / 8) > 1


def _dry_run(script: str, *args: str, **env: str) -> dict:
    result = subprocess.run(["bash", script, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "DRY_RUN": "1",
                                 "PYTHON": str(REPO / ".venv" / "bin" / "python"), **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("method,constraint", [("safe_rlhf", "average"), ("repo", "rectified")])
def test_paper_launch_script_composes_offline(method, constraint):
    cfg = _dry_run("experiments/paper/launch.sh", method, "trainer.save_every=10")
    assert cfg["constraint"]["name"] == constraint and cfg["trainer"]["save_every"] == 10
    assert cfg["model"]["path"] == "PKU-Alignment/alpaca-7b-reproduced" and cfg["logger"]["name"] == "wandb"
    assert cfg["deepspeed"]["zero_stage"] == 3


def test_launch_scripts_are_valid_bash_and_refuse_unknown_methods():
    for script in ("experiments/paper/launch.sh", "experiments/paper/slurm.sbatch", "experiments/gpu_smoke.sh"):
        assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0, script
    bad = subprocess.run(["bash", "experiments/paper/launch.sh", "ppo"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown method" in bad.stderr


def test_gpu_smoke_composes_a_bf16_zero2_run_of_a_few_hundred_million_parameters():
    import torch
    from transformers import LlamaForCausalLM

    from repo_exp.config import ArchConfig
    from repo_exp.models.policy import tiny_llama_config
    from repo_exp.world import world_tokenizer

    cfg = _dry_run("experiments/gpu_smoke.sh")
    assert (cfg["deepspeed"]["zero_stage"], cfg["deepspeed"]["bf16"]) == (2, True)
    assert cfg["model"]["source"] == "tiny" and 1 < cfg["trainer"]["total_steps"] <= 10
    arch = cfg["model"]["arch"]
    assert arch == cfg["reward"]["arch"] == cfg["cost"]["arch"]  # critics start from the scorers: same size
    with torch.device("meta"):
        policy = LlamaForCausalLM(tiny_llama_config(ArchConfig(**arch), world_tokenizer()))
    params = sum(p.numel() for p in policy.parameters())
    assert 100e6 <= params <= 1e9, params
    t = cfg["trainer"]
    assert t["max_prompt_length"] + t["max_new_tokens"] <= arch["max_position_embeddings"]


@pytest.mark.slow
@pytest.mark.deepspeed
def test_gpu_smoke_script_runs_end_to_end_on_a_cpu_at_toy_size(tmp_path):
    """The script itself (launch, metrics, the tokens/s report) at a size a CPU runs in seconds; bf16 ZeRO-2 as on
    the GPU. The figures it prints here are CPU figures and mean nothing for a GPU."""
    shrink = [f"{part}.arch.{k}={v}" for part in ("model", "reward", "cost")
              for k, v in (("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 1))]
    result = subprocess.run(
        ["bash", "experiments/gpu_smoke.sh", *shrink, "trainer.total_steps=2", "trainer.prompts_per_step=8",
         "trainer.rollout_batch_size=8", "trainer.micro_batch_size=4", "trainer.max_new_tokens=8"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RUN_DIR": str(tmp_path / "run"),
             "PYTHON": str(REPO / ".venv" / "bin" / "python")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout[result.stdout.index("gpu_smoke on"):]
    assert "generation:" in report and "update:" in report and "response tokens/s" in report
