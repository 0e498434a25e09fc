"""Making experience: sample responses, then score them with the frozen models (reference, reward, cost)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import torch

from repo_exp.data.prompts import PromptBatch
from repo_exp.rollout.experience import Experience
from repo_exp.rollout.generate import generate, sampling_generator, stop_token_ids
from repo_exp.rollout.score import Scorer, sequence_logprobs


class Timings(defaultdict):
    """Seconds per named section, summed."""

    def __init__(self) -> None:
        super().__init__(float)

    def section(self, name: str):
        timings = self

        class _Section:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] += time.perf_counter() - self.start

        return _Section()


def decode_responses(tokenizer, sequences: torch.Tensor, response_mask: torch.Tensor, prompt_width: int) -> list[str]:
    response = sequences[:, prompt_width:]
    return [
        tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=True)
        for row, mask in zip(response.cpu(), response_mask.cpu())
    ]


@torch.no_grad()
def make_experience(
    policy,
    ref,
    reward: Scorer,
    cost: Scorer,
    tokenizer,
    batch: PromptBatch,
    *,
    seed: int,
    step: int,
    row_offset: int,
    global_batch: int,
    chunk_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    recompute_logprobs: bool = False,
    missing_eos_penalty: float | None = None,
    all_finished=None,
    device: torch.device | str = "cpu",
    timings: Timings | None = None,
    stream: int = 0,
    measure_cost: bool = True,
) -> Experience:
    """One rollout batch on this rank.

    ``row_offset`` is the position of this rank's first sample in the global batch of ``global_batch`` samples; the
    sampling noise of each row depends only on (seed, step, stream, its global row). Without ``measure_cost`` the
    cost model is not run and ``costs`` are NaN.
    """
    timings = timings if timings is not None else Timings()
    policy.eval()
    parts = []
    for start in range(0, batch.input_ids.shape[0], chunk_size):
        stop = min(start + chunk_size, batch.input_ids.shape[0])
        ids = batch.input_ids[start:stop].to(device)
        mask = batch.attention_mask[start:stop].to(device)
        # drop the columns that are padding in every row of this chunk
        first = int(mask.any(0).long().argmax())
        ids, mask = ids[:, first:], mask[:, first:]
        with timings.section("generate"):
            gen = generate(
                policy, ids, mask, max_new_tokens,
                eos_token_id=stop_token_ids(policy, tokenizer), pad_token_id=tokenizer.pad_token_id,
                generator=sampling_generator(seed, step, stream, device=device),
                rows=slice(row_offset + start, row_offset + stop), global_batch=global_batch,
                temperature=temperature, top_k=top_k, top_p=top_p, all_finished=all_finished,
            )
        prompt_width = ids.shape[1]
        responses = decode_responses(tokenizer, gen.sequences, gen.response_mask, prompt_width)
        prompts = batch.texts[start:stop]
        logprobs = gen.logprobs
        if recompute_logprobs:
            with timings.section("policy_forward"):
                logprobs = sequence_logprobs(policy, gen.sequences, gen.attention_mask, prompt_width, temperature,
                                             top_k, top_p)
                logprobs = logprobs * gen.response_mask
        with timings.section("ref_forward"):  # the reference at the sampling temperature, untruncated
            ref_logprobs = sequence_logprobs(ref, gen.sequences, gen.attention_mask, prompt_width, temperature)
            ref_logprobs = ref_logprobs * gen.response_mask
        with timings.section("reward_forward"):
            rewards = reward(gen.sequences, gen.attention_mask, prompts, responses).float()
        if measure_cost:
            with timings.section("cost_forward"):
                costs = cost(gen.sequences, gen.attention_mask, prompts, responses).float()
        else:
            costs = torch.full_like(rewards, float("nan"))
        if missing_eos_penalty is not None:
            rewards = rewards + missing_eos_penalty * gen.truncated.float()
        parts.append(Experience(
            sequences=gen.sequences,
            attention_mask=gen.attention_mask,
            response_mask=gen.response_mask,
            prompt_index=batch.prompt_index[start:stop].to(device),
            logprobs=logprobs,
            ref_logprobs=ref_logprobs,
            rewards=rewards,
            costs=costs,
            truncated=gen.truncated,
            prompts=list(prompts),
            responses=responses,
        ))
    if len(parts) == 1:
        return parts[0]
    return _concat_left_aligned(parts)


def _concat_left_aligned(parts: list[Experience]) -> Experience:
    """Chunks may have different prompt widths: left-pad prompts to the widest, then join (``Experience.concat``
    right-pads the response widths)."""
    width = max(p.prompt_width for p in parts)
    aligned = []
    for p in parts:
        extra = width - p.prompt_width
        if extra:
            pad = torch.nn.functional.pad
            p = replace(p, sequences=pad(p.sequences, (extra, 0)), attention_mask=pad(p.attention_mask, (extra, 0)))
        aligned.append(p)
    return Experience.concat(aligned)
