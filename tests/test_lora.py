"""LoRA adapters (``model.lora``, PEFT): only the adapters train and are saved, a resume restores them exactly, the
merged export is base + (alpha / rank)·B·A, the reference is the base, an adapter folder loads on its base, and bad
settings are refused by name. Two ZeRO-3 ranks with adapters reproduce one process (slow)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from repo_exp.config import ConfigError, validate
from repo_exp.rollout import Timings, sequence_logprobs

from reliability_support import make_trainer, metric_rows

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "constraint=average", "trainer.deterministic=true")


def _adapters(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if "lora_" in k}


def _base(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if "lora_" not in k}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    """A small Llama saved as an ordinary folder (config, safetensors, the world's tokenizer): a base adapters can name."""
    from transformers import LlamaForCausalLM

    from repo_exp.config import ArchConfig
    from repo_exp.models.policy import tiny_llama_config
    from repo_exp.world import world_tokenizer

    folder = tmp_path_factory.mktemp("base") / "llama"
    tokenizer = world_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(ArchConfig(), tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_only_the_adapters_train_and_are_saved(smoke_cfg, tmp_path):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", *LORA, "trainer.total_steps=2")
    policy = trainer.models.policy.module
    base, adapters = _base(policy), _adapters(policy)
    assert adapters and all(v.abs().sum() == 0 for k, v in adapters.items() if "lora_B" in k)  # B starts at zero
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained == set(adapters)
    optimized = [p for g in trainer.models.policy.optimizer.param_groups for p in g["params"]]
    assert len(optimized) == len(adapters)  # the optimizer (and its states) hold the adapters only
    trainer.fit()
    assert all(torch.equal(p, base[n]) for n, p in _base(policy).items())
    changed = {n for n, p in _adapters(policy).items() if not torch.equal(p, adapters[n])}
    assert changed == set(adapters)  # A moves once B is no longer zero: two steps move both

    folder = tmp_path / "run" / "checkpoints" / "step_000002"
    saved = load_file(str(folder / "policy" / "adapter_model.safetensors"))
    assert not (folder / "policy" / "model.safetensors").exists()
    assert len(saved) == len(adapters) and all("lora_" in k for k in saved)
    actor = torch.load(folder / "actor.optim.pt", weights_only=True)
    assert len(actor["optimizer"]["state"]) == len(adapters)


def test_the_reference_is_the_base_with_the_adapters_disabled(smoke_cfg, tmp_path):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", *LORA, "trainer.total_steps=2")
    models = trainer.models
    initial = copy.deepcopy(models.policy.module.get_base_model())  # before training: B = 0, so base = policy
    for step in range(2):
        trainer.train_step(step)
    exp = trainer.rollout(2, Timings())
    with torch.no_grad():
        ref = sequence_logprobs(models.ref, exp.sequences, exp.attention_mask, exp.prompt_width)
        base = sequence_logprobs(initial.eval(), exp.sequences, exp.attention_mask, exp.prompt_width)
        policy = sequence_logprobs(models.policy.module.eval(), exp.sequences, exp.attention_mask, exp.prompt_width)
    mask = exp.response_mask.bool()
    torch.testing.assert_close(ref[mask], base[mask], rtol=0, atol=1e-6)
    assert float((policy - ref)[mask].abs().max()) > 1e-4  # the adapters moved the policy away from it
    torch.testing.assert_close(exp.ref_logprobs[mask], base[mask], rtol=0, atol=1e-6)
    assert not list(models.ref.parameters())  # no second copy: it holds no parameters of its own


def test_sampling_with_trained_adapters_keeps_the_forward_passs_logprobs(smoke_cfg, tmp_path):
    """The rollout of an adapter-wrapped policy (the fast Llama decoder with the adapters folded into its weights):
    the kept log-probabilities are the update's forward pass's."""
    from repo_exp.rollout.generate import LlamaDecoder

    trainer = make_trainer(smoke_cfg, tmp_path / "run", *LORA, "trainer.total_steps=2")
    policy = trainer.models.policy.module
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # trained-looking adapters: the policy is no longer its base
    assert LlamaDecoder.supports(policy.eval())
    exp = trainer.rollout(0, Timings())
    with torch.no_grad():
        fresh = sequence_logprobs(policy, exp.sequences, exp.attention_mask, exp.prompt_width)
    mask = exp.response_mask.bool()
    torch.testing.assert_close(exp.logprobs[mask], fresh[mask], rtol=0, atol=1e-5)


@pytest.mark.parametrize("critics", [False, True])
def test_a_resume_restores_the_adapters_exactly(smoke_cfg, tmp_path, critics):
    extra = (*LORA, "trainer.save_every=1", "trainer.keep_last=3", f"model.lora.critics={str(critics).lower()}")
    whole = make_trainer(smoke_cfg, tmp_path / "whole", *extra, "trainer.total_steps=3")
    if critics:
        critic = whole.models.critics.reward.module
        trained = {n for n, p in critic.named_parameters() if p.requires_grad}
        assert trained and all("lora_" in n or n.startswith("score_head.") for n in trained)
    whole.fit()
    # the run continued from its step-2 checkpoint in a folder of its own (a run writes only into its own folder)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_000002"
    resumed = make_trainer(smoke_cfg, tmp_path / "resumed", *extra, "trainer.total_steps=3",
                           f"trainer.resume={checkpoint}")
    resumed.fit()
    a, b = metric_rows(tmp_path / "whole")[-1], metric_rows(tmp_path / "resumed")[-1]
    assert a["step"] == b["step"] == 3
    for key in ("loss/actor", "loss/reward_critic", "constraint/lambda", "reward/mean", "grad_norm/actor"):
        assert a[key] == b[key], key
    for model_a, model_b in ((whole.models.policy.module, resumed.models.policy.module),
                             (whole.models.critics.reward.module, resumed.models.critics.reward.module)):
        for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
            assert torch.equal(p, q), name
    if critics:  # the critic's checkpoint holds its adapters and value head only
        saved = load_file(str(tmp_path / "whole" / "checkpoints" / "step_000003" / "reward_critic" /
                              "model.safetensors"))
        assert saved and all("lora_" in k or k.startswith("score_head.") for k in saved)


def test_the_merged_export_is_base_plus_the_scaled_adapter_product(smoke_cfg, tmp_path, base_folder):
    from transformers import AutoModelForCausalLM

    from repo_exp.models.adapters import main as export

    make_trainer(smoke_cfg, tmp_path / "run", *LORA, "model.source=hub", f"model.path={base_folder}",
                 "model.tokenizer=null", "trainer.total_steps=2").fit()
    adapter = tmp_path / "run" / "checkpoints" / "step_000002" / "policy"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_folder)
    assert export([str(adapter), str(tmp_path / "merged")]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    base = load_file(str(base_folder / "model.safetensors"))
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    scale = 8 / 4  # alpha / rank
    prefix = "base_model.model."
    checked = 0
    for key, weight in base.items():
        a_key = prefix + key.replace(".weight", ".lora_A.weight")
        expected = weight + scale * lora[a_key.replace("lora_A", "lora_B")] @ lora[a_key] if a_key in lora else weight
        checked += a_key in lora
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-5)
    assert checked == 2 * 7  # two layers, seven projections each
    # the merged folder is an ordinary model: the adapter folder given as model.path computes the same
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    trainer = make_trainer(smoke_cfg, tmp_path / "again", "model.source=hub", f"model.path={adapter}",
                           "model.tokenizer=null", "trainer.total_steps=1")
    exp = trainer.rollout(0, Timings())
    with torch.no_grad():
        torch.testing.assert_close(
            sequence_logprobs(plain, exp.sequences, exp.attention_mask, exp.prompt_width),
            sequence_logprobs(trainer.models.policy.module, exp.sequences, exp.attention_mask, exp.prompt_width),
            rtol=0, atol=1e-5)


def test_an_adapter_folder_as_model_path_trains_its_adapters_on_its_base(smoke_cfg, tmp_path, base_folder):
    make_trainer(smoke_cfg, tmp_path / "first", *LORA, "model.source=hub", f"model.path={base_folder}",
                 "model.tokenizer=null", "trainer.total_steps=1").fit()
    adapter = tmp_path / "first" / "checkpoints" / "step_000001" / "policy"
    trainer = make_trainer(smoke_cfg, tmp_path / "next", "model.source=hub", f"model.path={adapter}",
                           "model.tokenizer=null", "constraint=average", "trainer.total_steps=2")
    policy = trainer.models.policy.module
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = _adapters(policy)
    assert len(loaded) == len(saved) and {n for n, p in policy.named_parameters() if p.requires_grad} == set(loaded)
    base = _base(policy)
    trainer.fit()  # its first checkpoint is written (the adapters only) and the base never moves
    assert all(torch.equal(p, base[n]) for n, p in _base(policy).items())
    written = load_file(str(tmp_path / "next" / "checkpoints" / "step_000002" / "policy" /
                            "adapter_model.safetensors"))
    assert set(written) == set(saved) and any(not torch.equal(written[k], saved[k]) for k in saved)


def test_bad_adapter_settings_are_refused_by_name(smoke_cfg, compose, tmp_path, base_folder):
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: LlamaForCausalLM has no linear module named "
                                          r"\['qkv_proj'\]"):
        make_trainer(smoke_cfg, tmp_path / "a", "model.lora.rank=4", "model.lora.target_modules=[qkv_proj]")
    with pytest.raises(ConfigError, match="model.lora.dropout=0.1"):
        validate(smoke_cfg("model.lora.rank=4", "model.lora.dropout=0.1"))
    orphan = tmp_path / "orphan"
    shutil.copytree(base_folder, tmp_path / "moved_base")
    make_trainer(smoke_cfg, tmp_path / "b", *LORA, "model.source=hub", f"model.path={tmp_path / 'moved_base'}",
                 "model.tokenizer=null", "trainer.total_steps=1").fit()
    shutil.copytree(tmp_path / "b" / "checkpoints" / "step_000001" / "policy", orphan)
    shutil.rmtree(tmp_path / "moved_base")
    with pytest.raises(ValueError, match=r"model.path=.*orphan: its base model .*moved_base.*no such file or folder"):
        make_trainer(smoke_cfg, tmp_path / "c", "model.source=hub", f"model.path={orphan}", "model.tokenizer=null")
    assert not (tmp_path / "c" / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="leave model.lora.rank at 0"):
        make_trainer(smoke_cfg, tmp_path / "d", "model.source=hub", f"model.path={orphan}", "model.lora.rank=4")


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_two_zero_ranks_with_adapters_reproduce_one_process(tmp_path, stage):
    """fp32: two gloo ranks under ZeRO-3 (base and adapters partitioned together, the reference the base with adapters
    disabled), or ZeRO-2, take the one-process steps; the saved adapters, gathered from the ranks' shards, agree within 1e-6.

    Only the order of the gradient sums differs (gloo's all-reduce against one process). Adam divides each element's
    step by its own gradient scale, so an element whose gradient is nearly zero can move by up to the learning rate
    on rounding alone: the learning rates here (2e-5) keep that below 1e-6 over three steps (at the world's 3e-4 one
    element in a thousand differed by 1.01e-6)."""
    import math
    import os
    import subprocess
    import sys

    from conftest import repo_root

    common = ["experiment=smoke", "logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
              "trainer.total_steps=3", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.critics=true",
              "constraint=rectified", "constraint.multiplier=learned", "constraint.lambda_lr=0.5",
              "optimizer.actor.lr=2e-5", "optimizer.critic.lr=2e-5"]

    def run(args: list[str], run_dir: Path, ranks: int) -> list[dict]:
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                    if ranks > 1 else [sys.executable])
        done = subprocess.run([*launcher, "-m", "repo_exp", *args, f"hydra.run.dir={run_dir}"], cwd=repo_root(),
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
                                   "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        return metric_rows(run_dir)

    single = run(common, tmp_path / "single", 1)
    double = run([*common, f"deepspeed={stage}", "deepspeed.bf16=false", "trainer.micro_batch_size=4"],
                 tmp_path / "double", 2)
    assert len({row["constraint/lambda"] for row in single}) == 3
    for one, two in zip(single, double):
        for key in ("constraint/lambda", "reward/mean", "cost/violation_mean", "kl/mean", "loss/actor",
                    "loss/reward_critic", "loss/cost_critic"):
            assert math.isclose(two[key], one[key], rel_tol=1e-5, abs_tol=1e-6), (one["step"], key, one[key], two[key])
    last = "checkpoints/step_000003"
    for part, name in (("policy", "adapter_model.safetensors"), ("reward_critic", "model.safetensors"),
                       ("cost_critic", "model.safetensors")):
        a = load_file(str(tmp_path / "single" / last / part / name))
        b = load_file(str(tmp_path / "double" / last / part / name))
        assert sorted(a) == sorted(b) and all("lora_" in k or k.startswith("score_head.") for k in a)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_fast_decoder_folds_plain_lora_adapters_into_its_weights(autocast):
    """A LoRA-wrapped Llama decodes through the fast decoder with W + (alpha/rank)·B·A: the same tokens and
    log-probabilities as its own forward pass (bf16 rounding under autocast); an adapter variant it does not
    reproduce (DoRA) falls back to the model's forward."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    from repo_exp.rollout.generate import LlamaDecoder, generate, sampling_generator

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=3)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(LlamaForCausalLM(config), lora).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    assert LlamaDecoder.supports(model)
    ids = torch.randint(4, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    runs = {}
    context = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
    for fast in (True, False):
        with context:
            runs[fast] = generate(model, ids, mask, 12, eos_token_id=3, pad_token_id=0,
                                  generator=sampling_generator(0, 0, 0), rows=slice(0, 3), global_batch=3,
                                  fast_decoder=fast)
    with context, torch.no_grad():
        fresh = sequence_logprobs(model, runs[True].sequences, runs[True].attention_mask, 6) * runs[True].response_mask
    tolerance = 2e-2 if autocast else 1e-5
    assert float((runs[True].logprobs - fresh).abs().max()) < tolerance
    if not autocast:
        assert torch.equal(runs[True].sequences, runs[False].sequences)
    dora = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                         use_dora=True, task_type="CAUSAL_LM")).eval()
    assert not LlamaDecoder.supports(dora)
    with model.disable_adapter():
        assert LlamaDecoder.supports(model)  # the base alone: no adapter folded in
