"""Our trainer as users run it: the composed Hydra config, ``repo_exp.train.Trainer`` and its ``train_step``; and the
bare model passes one of its iterations needs, timed with nothing around them.

Models are random-initialised Llama-style (``model=tiny`` with an ``arch`` per size) over the world's word-level
tokenizer, on the world's prompts; random models rarely emit EOS, so nearly every response runs to the token limit
and the work per iteration is uniform.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from repo_exp.config import compose_config, validate
from repo_exp.rollout import Experience, Timings, sequence_logprobs
from repo_exp.rollout.generate import CacheDecoder, LlamaDecoder
from repo_exp.train import Trainer

# Llama shapes of about 1M, 10M and 30M parameters (vocabulary: the world tokenizer's 240 words; untied embeddings).
SIZES: dict[str, dict[str, int]] = {
    "1M": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=5, num_attention_heads=4,
               num_key_value_heads=4),
    "10M": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=8),
    "30M": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=9, num_attention_heads=8,
                num_key_value_heads=8),
}

# What the benchmark runs beyond the defaults, all of them config switches a user sets the same way:
FAST = (
    "trainer.mixed_precision=bf16",  # forward passes under bf16 autocast, float32 weights and optimizer
    "model.attn_implementation=eager",  # sdpa's CPU backward in bf16 is ~4x slower than eager's at these widths
)
SHARED_CRITIC = "trainer.shared_critic=true"  # average and rectified: both critics on one trunk, a 2-dim value head
# ``none`` is plain PPO on the four models trl's PPO uses (policy, reference, reward model, critic): no cost model.
# ``none_with_cost`` is the default of constraint=none, which also runs the cost model to log its figures.
PLAIN_PPO = "trainer.measure_cost=false"
CONSTRAINTS = {"none": "none", "none_with_cost": "none", "average": "average", "rectified": "rectified"}


def overrides(size: str, constraint: str, batch: int, new_tokens: int, threads: int, fast: bool = True) -> list[str]:
    """The command-line overrides of one benchmark configuration (``python -m repo_exp <these>`` runs it)."""
    out = [
        "experiment=smoke", "logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
        f"constraint={CONSTRAINTS[constraint]}", f"trainer.prompts_per_step={batch}", "trainer.samples_per_prompt=1",
        f"trainer.micro_batch_size={batch}", f"trainer.rollout_batch_size={batch}",
        f"trainer.max_new_tokens={new_tokens}", "trainer.total_steps=1000", f"trainer.num_threads={threads}",
    ]
    for group in ("model", "reward", "cost"):
        out += [f"{group}.arch.{key}={value}" for key, value in SIZES[size].items()]
    if constraint == "none":
        out.append(PLAIN_PPO)
    if fast:
        out += list(FAST)
        if constraint in ("average", "rectified"):
            out.append(SHARED_CRITIC)
    return out


class _Trainer(Trainer):
    """``Trainer`` keeping its last rollout, from which the bare passes take their sequences."""

    last_experience: Experience | None = None

    def rollout(self, step: int, timings: Timings) -> Experience:
        self.last_experience = super().rollout(step, timings)
        return self.last_experience


def build_trainer(overrides: list[str]) -> Trainer:
    cfg = compose_config(overrides)
    return _Trainer(validate(cfg), cfg, Path(tempfile.mkdtemp(prefix="bench_ours_")))


def parameter_count(trainer: Trainer) -> int:
    return sum(p.numel() for p in trainer.models.policy.module.parameters())


class Ours:
    """One of our trainers, stepped one iteration at a time."""

    def __init__(self, overrides: list[str]) -> None:
        self.trainer = build_trainer(overrides)
        self.step = 0

    def iteration(self) -> dict[str, float]:
        """One ``train_step``: seconds, tokens per second, and its timing sections."""
        start = time.perf_counter()
        metrics = self.trainer.train_step(self.step)
        seconds = time.perf_counter() - start
        self.step += 1
        out = {"seconds": seconds, "rollout_tokens_per_s": metrics["throughput/rollout_tokens_per_s"],
               "update_tokens_per_s": metrics["throughput/update_tokens_per_s"],
               "response_tokens": metrics["response/length"] * self.trainer.config.trainer.prompts_per_step}
        out.update({k: v for k, v in metrics.items() if k.startswith("timing/")})
        return out

    def bare(self) -> dict[str, float]:
        return bare_passes(self.trainer)

    def info(self) -> dict[str, Any]:
        return {"parameters": parameter_count(self.trainer)}


def _timed(timings: dict[str, float], name: str, fn) -> None:
    start = time.perf_counter()
    fn()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def bare_passes(trainer: Trainer) -> dict[str, float]:
    """Seconds of the model passes one iteration of ``trainer`` runs, on its last rollout's sequences, back to back:

    - ``generate``: the prompt's forward pass and one decoder step per further response token (the decoder the
      rollout uses), fed the sampled tokens: no sampling, no bookkeeping;
    - ``ref``, ``reward``, ``cost``: one forward pass of each frozen model (no cost pass where the run skips the cost
      model);
    - ``critic``, ``policy``: one forward and backward pass of each trained model (no optimizer step).
    Under the trainer's precision context. Gradients are dropped afterwards, untimed.
    """
    exp = trainer.last_experience
    if exp is None:
        raise RuntimeError("bare_passes needs a finished iteration (its sequences)")
    m = trainer.models
    width = exp.prompt_width
    sequences, mask = exp.sequences, exp.attention_mask
    prompt_ids, prompt_mask = sequences[:, :width], mask[:, :width]
    response = sequences[:, width:]
    policy = m.policy.module
    timings: dict[str, float] = {}

    def generation() -> None:
        from transformers import DynamicCache

        from repo_exp.models.score_model import position_ids_from_mask

        cache = DynamicCache()
        policy(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
               cache=cache, use_cache=True, logits_to_keep=1)
        decoder = (LlamaDecoder if LlamaDecoder.supports(policy) else CacheDecoder)(policy, cache, prompt_mask,
                                                                                    exp.response_width)
        position = prompt_mask.sum(-1)
        for t in range(exp.response_width - 1):
            decoder.step(response[:, t], position + t, exp.response_mask[:, t].bool())

    policy.eval()
    with torch.no_grad(), m.autocast():
        _timed(timings, "generate", generation)
        _timed(timings, "ref", lambda: sequence_logprobs(m.ref, sequences, mask, width))
        _timed(timings, "reward", lambda: m.reward.model.end_scores(sequences, mask))
        if trainer.config.trainer.measure_cost:
            _timed(timings, "cost", lambda: m.cost.model.end_scores(sequences, mask))
    policy.train()

    def critic() -> None:
        with m.autocast():
            reward_values, cost_values = m.critics.values(sequences, mask, width)
        m.critics.backward(reward_values.sum(), cost_values.sum() if cost_values is not None else None)

    def actor() -> None:
        with m.autocast():
            logprobs = sequence_logprobs(policy, sequences, mask, width)
        m.policy.backward(logprobs.sum())

    _timed(timings, "critic", critic)
    _timed(timings, "policy", actor)
    for engine in m.engines:
        engine.zero_grad()
    timings["total"] = sum(timings.values())
    return timings
