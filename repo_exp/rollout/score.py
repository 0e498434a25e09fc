"""Forward passes over finished sequences: policy log-probabilities, critic values, reward and cost scores.

A scorer whose tokenizer (or template) differs from the policy's re-tokenises: decode the response, apply the
scorer's template to the raw prompt, append the response and the scorer's EOS, encode with the scorer's tokenizer.
When they match, it scores the policy's tokens as they are (no decode, no encode).
"""

from __future__ import annotations

import torch

from repo_exp.algorithms.losses import token_logprobs
from repo_exp.models.score_model import ScoreModel, position_ids_from_mask, right_pad, score_input_ids
from repo_exp.models.tokenizers import same_tokenizer
from repo_exp.rollout.generate import sampled_logprobs


def sequence_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log π(y_t) of every response token (B, T) under a causal LM; logits are computed for response positions only.

    With ``temperature``, ``top_k`` and ``top_p``, π is the distribution the sampler draws from at those settings
    (``repo_exp.rollout.generate.sampled_logprobs``): the policy's log-probabilities in the update are the behaviour
    policy's, truncation recomputed from the current logits. The reference is given the temperature alone: its full
    support keeps the KL to it finite."""
    response_width = sequences.shape[1] - prompt_width
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=response_width + 1,
    )
    tokens = sequences[:, prompt_width:]
    if temperature == 1.0 and not top_k and top_p >= 1.0:
        return token_logprobs(out.logits[:, :-1], tokens)
    return sampled_logprobs(out.logits[:, :-1], tokens, temperature, top_k, top_p)


def logprob_gap(kept: torch.Tensor, fresh: torch.Tensor, response_mask: torch.Tensor) -> tuple[float, float]:
    """Mean and max |kept − fresh| over response tokens: kept (B, T) from sampling, fresh (B, T) from a forward pass."""
    gap = (kept.float() - fresh.float()).abs()[response_mask.bool()]
    if gap.numel() == 0:
        return 0.0, 0.0
    return float(gap.mean()), float(gap.max())


def critic_values(critic: ScoreModel, sequences: torch.Tensor, attention_mask: torch.Tensor,
                  prompt_width: int) -> torch.Tensor:
    """V(s_t) before each response token: (B, T, score_dim), the critic's scores at positions P − 1 … L − 2.

    Through ``critic(...)``, not its submodules, so that a DeepSpeed engine's forward hooks run (critics never
    normalise their scores)."""
    return critic(sequences, attention_mask)[:, prompt_width - 1 : -1]


class Scorer:
    """A reward or cost model with its own tokenizer and template."""

    def __init__(self, model: ScoreModel, tokenizer, template: str, policy_tokenizer, policy_template: str,
                 max_length: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.retokenize = not (same_tokenizer(tokenizer, policy_tokenizer) and template == policy_template)

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompts: list[str],
                 responses: list[str]) -> torch.Tensor:
        """End scores (B,) of the finished sequences (or of their re-tokenised text)."""
        if not self.retokenize:
            return self.model.end_scores(sequences, attention_mask)
        input_ids, mask = self.encode(prompts, responses, device=sequences.device)
        return self.model.end_scores(input_ids, mask)

    def encode(self, prompts: list[str], responses: list[str], device: torch.device | str = "cpu"):
        """The scorer's own tokens for (prompt, response) pairs, EOS appended, right-padded: (B, L') ids and mask."""
        rows = [score_input_ids(self.tokenizer, self.template, prompt, response, self.max_length)
                for prompt, response in zip(prompts, responses)]
        input_ids, mask = right_pad(rows, self.tokenizer.pad_token_id)
        return input_ids.to(device), mask.to(device)
