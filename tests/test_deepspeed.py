"""DeepSpeed across ranks: the generated DeepSpeed config, the reductions that must be global, and (slow) a 2-rank
ZeRO run that reproduces a one-process run with the same global batch."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repo_exp.config import ConfigError, validate

from conftest import repo_root

REPO = repo_root()


# ------------------------------------------------------------------------------------------ the DeepSpeed config


@pytest.mark.parametrize("name,stage,offload", [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_train_config_follows_conf_deepspeed_and_the_trainer_batch(smoke_cfg, name, stage, offload):
    from repo_exp.deepspeed_engine import inference_config, train_config

    config = validate(smoke_cfg(f"deepspeed={name}", "trainer.prompts_per_step=8", "trainer.samples_per_prompt=2",
                                "trainer.micro_batch_size=4", "ppo.max_grad_norm=0.5"))
    ds = train_config(config, world_size=2, opt=config.optimizer.actor)
    # 16 samples over 2 ranks: 8 per rank in micro-batches of 4, so 2 backward passes per optimizer step
    micro = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert micro == (4, 2, 16)
    assert ds["managed_gradient_accumulation"] is False  # the trainer weighs micro-batches and calls step() itself
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload and ("offload_param" in zero) == offload
    assert ("optimizer" in ds) == offload  # offloaded steps run DeepSpeed's CPU AdamW at the configured settings
    if offload:
        assert ds["optimizer"]["params"]["lr"] == config.optimizer.actor.lr
        assert ds["optimizer"]["params"]["betas"] == list(config.optimizer.actor.betas)
    frozen = inference_config(config)["zero_optimization"]
    assert frozen["stage"] == (3 if stage == 3 else 0) and "offload_optimizer" not in frozen


def test_extra_settings_merge_into_the_generated_config(smoke_cfg):
    from repo_exp.deepspeed_engine import train_config

    config = validate(smoke_cfg("deepspeed=zero3", "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000",
                                "+deepspeed.extra.wall_clock_breakdown=true"))
    ds = train_config(config, world_size=1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["zero_optimization"]["stage"] == 3
    assert ds["wall_clock_breakdown"] is True


def test_zero3_reduce_buckets_are_hidden_squared_unless_set(smoke_cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    from repo_exp.deepspeed_engine import model_train_config

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    zero3 = validate(smoke_cfg("deepspeed=zero3"))
    ds = model_train_config(zero3, 1, zero3.optimizer.actor, model)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 256  # transformers' "auto": hidden_size²
    own = validate(smoke_cfg("deepspeed=zero3", "+deepspeed.extra.zero_optimization.reduce_bucket_size=1000"))
    assert model_train_config(own, 1, own.optimizer.actor, model)["zero_optimization"]["reduce_bucket_size"] == 1000
    zero2 = validate(smoke_cfg("deepspeed=zero2"))
    assert "reduce_bucket_size" not in model_train_config(zero2, 1, zero2.optimizer.actor, model)["zero_optimization"]


FREED_PAGES = """
import json, sys, torch
from repo_exp.runtime import _libc, map_large_blocks, release_free_memory

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

mode = sys.argv[1]
if mode == "mapped":
    assert map_large_blocks()
else:  # what glibc does after freeing a large block: blocks below 16 MiB then come from the heap and stay there
    assert _libc().mallopt(-3, 16 << 20)  # (at most 32 MiB)
blocks = [torch.ones(256 * 1024) for _ in range(400)]  # 400 blocks of 1 MiB
before = rss_mib()
del blocks[::2]  # every other one: 200 MiB of holes between blocks that stay
freed = rss_mib()
trimmed = rss_mib() if mode == "mapped" else (release_free_memory(), rss_mib())[1]
print(json.dumps({"before": before, "freed": freed, "trimmed": trimmed}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
@pytest.mark.parametrize("mode", ["heap", "mapped"])
def test_freed_host_memory_goes_back_to_the_system(mode):
    """ZeRO-3 loading and gathering free many blocks of a few MiB: ``release_free_memory`` hands their pages back
    after the fact, ``map_large_blocks`` as they are freed."""
    done = subprocess.run([sys.executable, "-c", FREED_PAGES, mode], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    rss = json.loads(done.stdout.strip().splitlines()[-1])
    if mode == "heap":
        assert rss["before"] - rss["freed"] < 50  # freed, but kept by the allocator
    else:
        assert rss["before"] - rss["freed"] > 150  # each block its own mapping: unmapped when freed
    assert rss["before"] - rss["trimmed"] > 150


def test_a_batch_that_does_not_split_over_ranks_is_a_config_error(smoke_cfg):
    from repo_exp.deepspeed_engine import micro_batching

    config = validate(smoke_cfg("deepspeed=zero2", "trainer.prompts_per_step=6", "trainer.samples_per_prompt=1"))
    assert micro_batching(config, 2) == (3, 1)
    with pytest.raises(ConfigError, match="4 rank"):
        micro_batching(config, 4)


def test_the_deepspeed_launchers_local_rank_never_reaches_hydra(monkeypatch):
    from repo_exp.__main__ import _strip_local_rank

    for argv in (["prog", "--local_rank=3", "experiment=smoke"], ["prog", "--local_rank", "3", "experiment=smoke"]):
        # a copy of the environment: the LOCAL_RANK set here must not reach later tests (transformers' training
        # arguments would take this process for rank 3 of a distributed job)
        monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"})
        monkeypatch.setattr(sys, "argv", list(argv))
        _strip_local_rank()
        assert sys.argv == ["prog", "experiment=smoke"] and os.environ["LOCAL_RANK"] == "3"


def test_several_processes_without_deepspeed_are_refused(smoke_cfg, monkeypatch, tmp_path):
    """Plain torch engines do not average gradients: each rank would train its own policy."""
    import repo_exp.train as train
    from repo_exp.runtime import LocalRuntimeComm, Runtime

    monkeypatch.setattr(train, "init_runtime", lambda _: Runtime(0, 0, 2, torch.device("cpu"), LocalRuntimeComm()))
    cfg = smoke_cfg()
    with pytest.raises(ConfigError, match="deepspeed=none"):
        train.Trainer(validate(cfg), cfg, tmp_path)


# ------------------------------------------------------------------------------------------- global reductions


def test_each_prompts_k_samples_stay_on_one_rank():
    """granularity=prompt judges a prompt by the mean of its k samples: all k must be on the rank that has it."""
    from repo_exp.data.prompts import PromptEncoder, PromptSet, PromptStream
    from repo_exp.models import build_word_tokenizer

    texts = [f"prompt number {i}" for i in range(12)]
    encoder = PromptEncoder(PromptSet(texts), build_word_tokenizer(texts), "{input}", 16)
    k, world = 3, 2
    seen: dict[int, set[int]] = {}
    global_order = PromptStream(12, 8, seed=5).next_global()
    for rank in range(world):
        local, offset = PromptStream(12, 8, seed=5, rank=rank, world_size=world).next_local()
        batch = encoder.batch(local, repeats=k, prompt_offset=offset)
        for idx in batch.prompt_index.tolist():
            seen.setdefault(idx, set()).add(rank)
        assert batch.prompt_index.tolist() == [offset + j for j in range(len(local)) for _ in range(k)]
        assert local == global_order[offset: offset + len(local)]
    assert sorted(seen) == list(range(8)) and all(len(ranks) == 1 for ranks in seen.values())


COSTS = torch.tensor([0.5, -1.0, 2.0, 1.0, -3.0, -2.0, 0.2, 0.6])  # 4 prompts × k = 2, in global order
PROMPTS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def _rectified_on_ranks(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from repo_exp.constraints import RectifiedConstraint
    from repo_exp.runtime import DistComm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    constraint = RectifiedConstraint(granularity="prompt", multiplier="learned", lambda_init=0.5, lambda_lr=0.5,
                                     comm=DistComm(world))
    rows = slice(rank * 4, rank * 4 + 4)  # the rank's two prompts with both their samples
    trajectory = []
    for step in range(3):
        metrics = constraint.update(COSTS[rows] * (step + 1), PROMPTS[rows], step)
        trajectory.append((metrics["constraint/violation"], constraint.multiplier))
    gate = constraint.penalised(COSTS[rows], PROMPTS[rows]).tolist()  # the prompts judged violating
    Path(out, f"rank{rank}.json").write_text(json.dumps({"trajectory": trajectory, "gate": gate}))
    dist.destroy_process_group()


def test_rectified_prompt_granularity_is_global_over_ranks(tmp_path):
    """Two gloo ranks holding two prompts each give the violation, λ trajectory and gate of one process with all
    four — and the violation is a mean over prompts, checked by hand."""
    import torch.multiprocessing as mp

    from repo_exp.constraints import RectifiedConstraint

    from reliability_support import free_port

    mp.start_processes(_rectified_on_ranks, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    single = RectifiedConstraint(granularity="prompt", multiplier="learned", lambda_init=0.5, lambda_lr=0.5)
    expected, lam = [], 0.5
    for step in range(3):
        prompt_means = (COSTS * (step + 1)).reshape(4, 2).mean(-1)  # 1 prompt per row: -0.25, 1.5, -2.5, 0.4
        violation = prompt_means.clamp(min=0).mean().item()  # (0 + 1.5 + 0 + 0.4)/4 × (step + 1)
        lam = min(max(lam + 0.5 * violation, 0.0), 10.0)
        metrics = single.update(COSTS * (step + 1), PROMPTS, step)
        assert metrics["constraint/violation"] == pytest.approx(violation)
        expected.append((violation, lam))
    flat = [x for pair in expected for x in pair]
    for r in ranks:
        assert [x for pair in r["trajectory"] for x in pair] == pytest.approx(flat, rel=1e-6)
    gate = ranks[0]["gate"] + ranks[1]["gate"]
    assert gate == single.penalised(COSTS, PROMPTS).tolist() == [False, False, True, True, False, False, True, True]


# ---------------------------------------------------------------- 2 ranks under ZeRO equal one process (slow)

COMMON = ("experiment=smoke", "logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
          "trainer.total_steps=3")
CASES = {
    "zero2-average": ("constraint=average", "deepspeed=zero2"),
    # critic-free: each prompt's k samples on one rank, its group baseline computed there
    "zero2-rectified-prompt-rloo": ("constraint=rectified", "constraint.granularity=prompt",
                                    "constraint.multiplier=learned", "constraint.lambda_lr=0.5", "estimator=rloo",
                                    "deepspeed=zero2"),
    "zero3-rectified-prompt": ("constraint=rectified", "constraint.granularity=prompt",
                               "constraint.multiplier=learned", "constraint.lambda_lr=0.5", "deepspeed=zero3"),
}
# the update's shape on one rank (its micro-batches and their padding) and the clock: every other figure is the
# global batch's (tests/test_global_batch.py checks them one by one)
LOCAL_DIAGNOSTICS = ("timing/", "throughput/", "update/")
RTOL, ATOL = 1e-4, 1e-6  # fp32 on CPU: only the order of the sums differs (gloo all-reduce vs one process)


def _run(args: list[str], run_dir: Path, ranks: int) -> list[dict]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                if ranks > 1 else [sys.executable])
    result = subprocess.run([*launcher, "-m", "repo_exp", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.deepspeed
@pytest.mark.parametrize("case", [pytest.param(case, marks=() if case.startswith("zero2") else pytest.mark.slow)
                                  for case in sorted(CASES)])  # ZeRO-2 in the fast suite, ZeRO-3 in make test-slow
def test_two_zero_ranks_reproduce_one_process(tmp_path, case):
    from safetensors.torch import load_file

    base = [*COMMON, *(a for a in CASES[case] if not a.startswith("deepspeed="))]
    single = _run(base, tmp_path / "single", ranks=1)  # plain torch, the whole batch in one process
    # 8 samples per rank in micro-batches of 4: gradient accumulation under DeepSpeed is exercised too
    double = _run([*COMMON, *CASES[case], "deepspeed.bf16=false", "trainer.micro_batch_size=4"], tmp_path / "double",
                  ranks=2)

    lambdas = [row["constraint/lambda"] for row in single]
    assert len(set(lambdas)) == 3, "λ must move for the comparison to mean anything"
    assert [row["constraint/lambda"] for row in double] == pytest.approx(lambdas, rel=1e-6)
    for one, two in zip(single, double):
        keys = {k for k in one if isinstance(one[k], (int, float)) and not k.startswith(LOCAL_DIAGNOSTICS)}
        assert keys == {k for k in two if isinstance(two[k], (int, float)) and not k.startswith(LOCAL_DIAGNOSTICS)}
        critics = () if "estimator=rloo" in CASES[case] else ("loss/cost_critic",)
        assert {"reward/mean", "cost/violation_mean", "loss/actor", "grad_norm/actor", *critics} <= keys
        for key in sorted(keys):
            assert math.isclose(two[key], one[key], rel_tol=RTOL, abs_tol=ATOL), (one["step"], key, one[key], two[key])

    # the final policy and critics, gathered from the ranks' shards into safetensors, are the one-process weights
    last = "checkpoints/step_000003"
    parts = ("policy",) if "estimator=rloo" in CASES[case] else ("policy", "reward_critic", "cost_critic")
    assert not (tmp_path / "double" / last / "reward_critic").exists() or len(parts) == 3
    for part in parts:
        a = load_file(str(tmp_path / "single" / last / part / "model.safetensors"))
        b = load_file(str(tmp_path / "double" / last / part / "model.safetensors"))
        assert sorted(a) == sorted(b)
        for key in a:
            assert a[key].shape == b[key].shape, key
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_zero3_resume_continues_exactly(tmp_path):
    """Stopped after step 2 (its DeepSpeed shards, λ and data position saved), a 2-rank ZeRO-3 run resumed from that
    checkpoint (in a folder of its own: a run folder is never written among files it did not make) takes the same
    step 3 as the run that never stopped."""
    args = [*COMMON, "constraint=average", "deepspeed=zero3", "deepspeed.bf16=false", "trainer.save_every=2"]
    whole = _run(args, tmp_path / "whole", ranks=2)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step_000002"
    resumed = _run([*args, f"trainer.resume={checkpoint}"], tmp_path / "resumed", ranks=2)
    assert [r["step"] for r in resumed] == [3]
    for key in ("constraint/lambda", "reward/mean", "cost/mean", "loss/actor", "loss/reward_critic", "grad_norm/actor",
                "lr/actor"):
        assert resumed[0][key] == pytest.approx(whole[2][key], rel=1e-6, abs=1e-9), key


_DISCARD = """
import torch, deepspeed
from repo_exp.config import AdamWConfig, SchedulerConfig
from repo_exp.deepspeed_engine import DeepSpeedEngine
from repo_exp.runtime import init_runtime

init_runtime(use_deepspeed=True)  # a group of one
def engine():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "managed_gradient_accumulation": False, "bf16": {"enabled": False}, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": %d}}
    return DeepSpeedEngine(model, AdamWConfig(lr=0.1), SchedulerConfig(), 10, config, "m")
x, y = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), torch.randn(2, 4)
abandoned, clean = engine(), engine()
abandoned.backward(abandoned.module(y).pow(2).sum() * 100)  # a minibatch given up half-way
abandoned.zero_grad()
for e in (abandoned, clean):
    e.backward(e.module(x).pow(2).mean())
    e.step()
for a, b in zip(abandoned.model.parameters(), clean.model.parameters()):
    torch.testing.assert_close(a, b)
print("same")
"""


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_grad_discards_an_abandoned_minibatch(stage):
    """The trainer gives up a minibatch whose loss is not finite: gradients already reduced into ZeRO's partitions
    must not leak into the next step."""
    result = subprocess.run([sys.executable, "-c", _DISCARD % stage], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "same" in result.stdout, result.stderr[-3000:]
