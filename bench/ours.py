"""Our trainer as users run it: the composed Hydra config, ``repo_exp.train.Trainer`` and its ``train_step``; and the
bare model passes one of its iterations needs, timed with nothing around them.

Models are random-initialised Llama-style (``model=tiny`` with an ``arch`` per size) over the world's word-level
tokenizer, on the world's prompts; random models rarely emit EOS, so nearly every response runs to the token limit
and the work per iteration is uniform (``bias_towards_eos`` makes a policy stop at varied positions instead).
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
    "trainer.mixed_precision=bf16",  # forward passes in bf16 (frozen models hold bf16 weights), float32 training state
    "model.attn_implementation=fastest",  # sdpa or eager, whichever this machine runs faster (timed once, cached)
)
SHARED_CRITIC = "trainer.shared_critic=true"  # average and rectified: both critics on one trunk, a 2-dim value head
# ``none`` is plain PPO on the four models trl's PPO uses (policy, reference, reward model, critic): no cost model.
# ``none_with_cost`` is the default of constraint=none, which also runs the cost model to log its figures.
PLAIN_PPO = "trainer.measure_cost=false"
# critic-free estimators: k samples per prompt (their group is the baseline), the same number of samples per batch
CRITIC_FREE_SAMPLES = 4
CONSTRAINTS = {"none": "none", "none_with_cost": "none", "average": "average", "rectified": "rectified",
               "rectified_rloo": "rectified", "rectified_grpo": "rectified", "average_rloo": "average",
               "average_grpo": "average"}
CRITIC_FREE = ("rectified_rloo", "rectified_grpo", "average_rloo", "average_grpo")


def estimator(row: str) -> str | None:
    """The critic-free estimator of a row (``rectified_rloo`` → ``rloo``), None for the critic-based rows."""
    return row.rsplit("_", 1)[1] if row in CRITIC_FREE else None


def overrides(size: str, constraint: str, batch: int, new_tokens: int, threads: int, fast: bool = True) -> list[str]:
    """The command-line overrides of one benchmark configuration (``python -m repo_exp <these>`` runs it).

    ``constraint`` is a row name: a constraint, ``none_with_cost``, or ``<constraint>_<estimator>`` for a
    critic-free estimator (``estimator=rloo|grpo``, ``batch`` samples as ``batch / 4`` prompts × 4 samples)."""
    free = estimator(constraint)
    k = CRITIC_FREE_SAMPLES if free else 1
    if batch % k:
        raise ValueError(f"batch {batch} is not a multiple of {k} samples per prompt")
    out = [
        "experiment=smoke", "logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
        f"constraint={CONSTRAINTS[constraint]}", f"trainer.prompts_per_step={batch // k}",
        f"trainer.samples_per_prompt={k}", f"trainer.micro_batch_size={batch}", f"trainer.rollout_batch_size={batch}",
        f"trainer.max_new_tokens={new_tokens}", "trainer.total_steps=1000", f"trainer.num_threads={threads}",
    ]
    for group in ("model", "reward", "cost"):
        out += [f"{group}.arch.{key}={value}" for key, value in SIZES[size].items()]
    if constraint == "none":
        out.append(PLAIN_PPO)
    if free:
        out.append(f"estimator={free}")
    if fast:
        out += list(FAST)
        if constraint in ("average", "rectified"):
            out.append(SHARED_CRITIC)
    return out


def composes(overrides: list[str]) -> str | None:
    """None when ``overrides`` compose into a valid config, else why not (one line)."""
    try:
        validate(compose_config(overrides))
    except Exception as exc:  # noqa: BLE001 - any failure to compose is reported, not raised
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    return None


@torch.no_grad()
def bias_towards_eos(model, eos_token_id: int, rate: float, weight: float | None = None) -> float:
    """Make a random Llama stop at EOS with probability about ``rate`` at every step, so that responses end at varied
    positions (a geometric length), as trained policies' do; random models otherwise run to the token limit.

    Hidden dimension 0 of the residual stream is held constant (the embeddings set it, no layer writes it: its rows
    of ``o_proj`` and ``down_proj`` are zero), and only EOS reads it from the final norm's output (``lm_head``
    column 0), which adds a near-constant logit to EOS. The rest of the model is untouched. ``weight`` (returned)
    is EOS's weight on that dimension: pass the policy's to its reference so that both stay the same model."""
    inner = model.model
    inner.embed_tokens.weight[:, 0] = 1.0
    for layer in inner.layers:
        layer.self_attn.o_proj.weight[0] = 0.0
        layer.mlp.down_proj.weight[0] = 0.0
    model.lm_head.weight[:, 0] = 0.0
    if weight is not None:
        model.lm_head.weight[eos_token_id, 0] = weight
        return weight
    # the constant dimension after the final norm, measured on a few random tokens
    ids = torch.randint(0, inner.embed_tokens.weight.shape[0], (4, 16), generator=torch.Generator().manual_seed(0))
    hidden = inner(input_ids=ids.to(model.lm_head.weight.device)).last_hidden_state[..., 0].float().mean()
    vocab = model.lm_head.weight.shape[0]
    # P(EOS) = e^b / (e^b + V − 1) with the other logits near 0 (random weights): b = log(rate (V − 1) / (1 − rate))
    target = torch.log(torch.tensor(rate * (vocab - 1) / (1 - rate)))
    model.lm_head.weight[eos_token_id, 0] = (target / hidden).to(model.lm_head.weight.dtype)
    return float(model.lm_head.weight[eos_token_id, 0])


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
    """One of our trainers, stepped one iteration at a time; with ``eos_rate`` its policy (and reference) stop at
    varied positions (``bias_towards_eos``)."""

    def __init__(self, overrides: list[str], eos_rate: float | None = None) -> None:
        self.trainer = build_trainer(overrides)
        self.step = 0
        if eos_rate is not None:
            eos = self.trainer.models.tokenizer.eos_token_id
            weight = bias_towards_eos(self.trainer.models.policy.module, eos, eos_rate)
            bias_towards_eos(self.trainer.models.ref, eos, eos_rate, weight)

    def iteration(self) -> dict[str, float]:
        """One ``train_step``: seconds, tokens per second, and its timing sections."""
        start = time.perf_counter()
        metrics = self.trainer.train_step(self.step)
        seconds = time.perf_counter() - start
        self.step += 1
        exp = self.trainer.last_experience
        lengths = exp.response_mask.sum(-1)
        out = {"seconds": seconds, "rollout_tokens_per_s": metrics["throughput/rollout_tokens_per_s"],
               "update_tokens_per_s": metrics["throughput/update_tokens_per_s"],
               "response_tokens": float(lengths.sum()), "longest_response": float(lengths.max()),
               "padded_response_tokens": float(exp.batch_size * exp.response_width),
               "sequence_tokens": float(exp.attention_mask.sum()),
               # absent when the step was skipped (a non-finite loss)
               "micro_batches": metrics.get("update/micro_batches", float("nan")),
               "padding": metrics.get("update/padding", float("nan"))}
        out.update({k: v for k, v in metrics.items() if k.startswith("timing/")})
        return out

    def bare(self) -> dict[str, float]:
        return bare_passes(self.trainer)

    def info(self) -> dict[str, Any]:
        # model.attn_implementation after ``auto`` was resolved for this machine
        return {"parameters": parameter_count(self.trainer),
                "attention": self.trainer.config.model.attn_implementation}


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
    - ``critic``, ``policy``: one forward and backward pass of each trained model (no optimizer step; no critic pass
      under a critic-free estimator).
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

    if m.critics.engines:  # critic-free estimators have none
        _timed(timings, "critic", critic)
    _timed(timings, "policy", actor)
    for engine in m.engines:
        engine.zero_grad()
    timings["total"] = sum(timings.values())
    return timings
