"""How many tokens a batch may generate, and whether a step's batch fits in memory at all.

With ``trainer.max_length`` unset, ``max_new_tokens``. With it set, the published Safe RLHF convention: the limit
counts the prompt too (its generation ``max_length`` 512), so a batch whose left-padded prompts are ``width`` tokens
wide gets ``max_length − width`` new tokens. Across data-parallel ranks the smallest budget is taken, so that every
rank runs the same number of decoding steps (ZeRO-3 needs each forward pass on every rank) and no sequence exceeds
``max_length``.

Before anything is built, ``check_rollout_memory`` estimates the memory a step's batch needs on one rank and refuses,
naming the settings, a batch larger than the device's memory.
"""

from __future__ import annotations

from typing import Callable

import torch


def generation_budget(max_new_tokens: int, max_length: int | None, prompt_width: int,
                      all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      device: torch.device | str = "cpu") -> int:
    if max_length is None:
        return max_new_tokens
    budget = max_length - prompt_width
    if all_gather is not None:
        budget = int(all_gather(torch.tensor([budget], device=device)).min())
    if budget < 1:
        raise ValueError(f"prompts {prompt_width} tokens wide leave no room under trainer.max_length={max_length}: "
                         f"set trainer.max_prompt_length below trainer.max_length")
    return budget


# Bytes one sample holds per token position while the update runs: its (B, L) ids and attention mask (int64) and its
# (B, T) response mask (int64) and ten float32 fields (log-probabilities, reference log-probabilities, KL, two value
# streams, two advantages, two returns, the mixed advantage), as ``repo_exp.rollout.Experience`` keeps them.
BYTES_PER_POSITION = 16
BYTES_PER_RESPONSE_TOKEN = 8 + 10 * 4


def rollout_memory(samples: int, global_samples: int, positions: int, response_tokens: int, vocab_size: int | None,
                   copies: int) -> int:
    """The bytes a rank needs for one step's batch of ``samples`` (of ``global_samples`` over all ranks), each up to
    ``positions`` tokens of which ``response_tokens`` are generated: the larger of
    - sampling: the batch's ids and masks as it grows, plus the Gumbel noise drawn for the whole global batch at every
      token (``repo_exp.rollout.generate``: global_samples × vocabulary float32, when the vocabulary is known);
    - the update: the filled batch (``BYTES_PER_POSITION``, ``BYTES_PER_RESPONSE_TOKEN``) held ``copies`` times (the
      minibatch and the length-ordered micro-batches it selects are copies)."""
    kept = samples * (positions * BYTES_PER_POSITION + response_tokens * BYTES_PER_RESPONSE_TOKEN)
    noise = global_samples * (vocab_size or 0) * 4
    sampling = samples * (positions * BYTES_PER_POSITION + response_tokens * 16) + noise
    return max(sampling, kept * copies)


def device_memory(device: torch.device) -> int:
    """The total memory of ``device``: the GPU's, or the machine's for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def check_rollout_memory(prompts_per_step: int, samples_per_prompt: int, world_size: int, positions: int,
                         response_tokens: int, vocab_size: int | None, copies: int, device: torch.device) -> None:
    """Refuse a batch that cannot fit in the memory of ``device`` (``rollout_memory``), naming the settings that size
    it: a typo such as ``samples_per_prompt=1000000`` otherwise surfaces minutes later as a raw allocator error."""
    global_samples = prompts_per_step * samples_per_prompt
    samples = -(-global_samples // world_size)
    need, have = rollout_memory(samples, global_samples, positions, response_tokens, vocab_size, copies), \
        device_memory(device)
    if need > have:
        gib = 2**30
        from repo_exp.config import ConfigError

        raise ConfigError(
            f"trainer.prompts_per_step × trainer.samples_per_prompt = {prompts_per_step} × {samples_per_prompt} = "
            f"{global_samples} samples per step ({samples} on each of {world_size} rank(s), up to {positions} tokens "
            f"each) need about {need / gib:.1f} GiB of memory per rank for the rollout batch alone, more than the "
            f"{have / gib:.1f} GiB of the {device.type.upper()} memory here; lower trainer.samples_per_prompt or "
            f"trainer.prompts_per_step")
