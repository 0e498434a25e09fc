"""ZeRO-3 generation with the policy's parameters gathered once per rollout: the fast Llama decoder runs on whole
layers, samples the tokens and keeps the log-probabilities of the plain model and of the per-token (hooked) path,
and DeepSpeed's hooks are back afterwards (the parameters partitioned again, a forward pass still right).

One DeepSpeed process (its first start compiles for ~20 s), run in a subprocess so that its process group and
global state stay out of the test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_root


def _worker(out: str) -> None:
    import copy

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from test_generate import left_padded_prompts, sample, tiny_llama

    from repo_exp.config import AdamWConfig, SchedulerConfig
    from repo_exp.deepspeed_engine import DeepSpeedEngine
    from repo_exp.rollout.generate import LlamaDecoder
    from repo_exp.rollout.score import sequence_logprobs
    from repo_exp.runtime import init_runtime

    torch.set_num_threads(1)
    init_runtime(use_deepspeed=True)
    model = tiny_llama(2)
    plain = copy.deepcopy(model).eval()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": False},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "steps_per_print": 2**31 - 1}
    engine = DeepSpeedEngine(model, AdamWConfig(), SchedulerConfig(), 1, ds_config, "actor")
    ids, mask = left_padded_prompts()
    partitioned = sum(p.numel() for p in engine.model.parameters())
    engine.module.eval()
    with engine.for_generation() as policy:
        fast = LlamaDecoder.supports(policy)
        gathered = sample(policy, ids, mask, fast=True)
    per_token = sample(engine.module, ids, mask, fast=True)  # the engine: hooked forward passes, no fast decoder
    reference = sample(plain, ids, mask, fast=True)
    with torch.no_grad():
        after = sequence_logprobs(engine.module, reference.sequences, reference.attention_mask, ids.shape[1])
        expected = sequence_logprobs(plain, reference.sequences, reference.attention_mask, ids.shape[1])
    result = {
        "fast_decoder_under_gather": fast,
        "fast_decoder_on_the_engine": LlamaDecoder.supports(engine.module),
        "parameters_whole": sum(p.numel() for p in plain.parameters()),
        "parameters_partitioned_before": partitioned,
        "parameters_partitioned_after": sum(p.numel() for p in engine.model.parameters()),
        "same_tokens_gathered": torch.equal(gathered.sequences, reference.sequences),
        "same_tokens_per_token": torch.equal(per_token.sequences, reference.sequences),
        "logprob_gap_gathered": float((gathered.logprobs - reference.logprobs).abs().max()),
        "logprob_gap_per_token": float((per_token.logprobs - reference.logprobs).abs().max()),
        "forward_gap_after": float(((after - expected) * reference.response_mask).abs().max()),
    }
    Path(out).write_text(json.dumps(result))


@pytest.mark.deepspeed
@pytest.mark.slow  # DeepSpeed's start-up (op builds) alone takes minutes on a loaded two-core machine
def test_gathered_generation_under_zero3_equals_the_plain_model(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root())}
    done = subprocess.run([sys.executable, __file__, str(out)], cwd=repo_root(), env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["parameters_partitioned_before"] < r["parameters_whole"] / 2  # ZeRO-3 really partitioned them
    assert r["fast_decoder_under_gather"] and not r["fast_decoder_on_the_engine"]
    assert r["same_tokens_gathered"] and r["same_tokens_per_token"]
    assert r["logprob_gap_gathered"] < 1e-5 and r["logprob_gap_per_token"] < 1e-5
    assert r["parameters_partitioned_after"] == r["parameters_partitioned_before"]  # partitioned again
    assert r["forward_gap_after"] < 1e-5  # the hooks are back: the engine's forward pass still gathers


if __name__ == "__main__":
    _worker(sys.argv[1])
