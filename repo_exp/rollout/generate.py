"""Batched sampling with a KV cache, keeping the log-probabilities of the sampled tokens.

Prompts are left-padded; position ids come from the attention mask. Sampling is Gumbel-max on noise drawn for the
*whole global batch* from a generator seeded by (seed, step), each rank taking its own rows: the samples of a row do
not depend on how the batch is split over ranks or chunks, so a run on two ranks draws exactly what a run on one rank
draws (the distribution is the same as ``torch.multinomial``'s). The kept log-probabilities are those of the
untempered policy, ``log softmax(logits)[y_t]``, which is what a later forward pass would compute; so no policy
forward pass is needed after generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from repo_exp.models.score_model import position_ids_from_mask


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # (B, T)
    logprobs: torch.Tensor  # (B, T) untempered log π(y_t), 0 where the response mask is 0
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens


def sampling_generator(seed: int, step: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, stream), identical on every rank."""
    mixed = (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**62)
    return torch.Generator(device=device).manual_seed(mixed)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to −inf every logit outside the top ``k`` and outside the nucleus of mass ``top_p``. (B, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator,
    rows: slice,
    global_batch: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    all_finished: Callable[[bool], bool] | None = None,
) -> Generation:
    """Sample up to ``max_new_tokens`` per prompt.

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        generator: draws the Gumbel noise for all ``global_batch`` rows; this call uses ``rows`` of it.
        all_finished: reduces the local "every row has ended" flag over ranks; under ZeRO-3 every rank must keep
            running forward passes until all have ended (synchronised GPUs).
    """
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    assert rows.stop - rows.start == batch, "rows must cover the local batch"
    attention_mask = prompt_mask.long()
    cache = DynamicCache()
    out = model(
        input_ids=prompt_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = attention_mask.sum(-1, keepdim=True)  # (B, 1)
    tokens, logprobs, alive_masks = [], [], []
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()  # (B, V)
        noise = torch.rand(global_batch, logits.shape[-1], generator=generator, device=device)[rows]
        gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
        scores = filter_logits(logits / temperature, top_k, top_p)
        token = torch.argmax(scores + gumbel, dim=-1)  # (B,)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
        token = torch.where(alive, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        logprobs.append(torch.where(alive, logp, torch.zeros_like(logp)))
        alive_masks.append(alive)
        alive = alive & (token != eos_token_id)
        done = not bool(alive.any())
        if all_finished is not None:
            done = all_finished(done)
        if done:
            break
        attention_mask = torch.cat([attention_mask, alive_masks[-1].long().unsqueeze(-1)], dim=-1)
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=attention_mask,
            position_ids=next_position,
            cache=cache,
            use_cache=True,
        )
        next_position = next_position + 1
    response = torch.stack(tokens, dim=1)  # (B, T)
    response_mask = torch.stack(alive_masks, dim=1).long()  # (B, T): 1 through EOS
    truncated = alive  # still alive after the last step: no EOS
    return Generation(
        sequences=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask.long(), response_mask], dim=1),
        response_mask=response_mask,
        logprobs=torch.stack(logprobs, dim=1),
        truncated=truncated,
    )
