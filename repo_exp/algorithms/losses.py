"""PPO losses (SPEC §2), named as in the PPO paper and cleanrl.

- policy: ``ratio = exp(logπ − logπ_old)``, ``pg_loss1 = −A·ratio``, ``pg_loss2 = −A·clip(ratio, 1±ε)``,
  loss = masked mean of ``max(pg_loss1, pg_loss2)``;
- critic: ``0.5 · masked_mean(max((V − G)², (clip(V, V_old ± ε_v) − G)²))``;
- PTX: next-token negative log-likelihood on pre-training text, mixed in with ``ptx_coeff``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repo_exp.algorithms.masked import masked_mean


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for logits (B, T, V) and tokens (B, T) → (B, T), computed in float32."""
    logits = logits.float()
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
    aggregation: str = "seq_mean_token_mean",
    count: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss. All inputs (B, T). Returns the loss and detached statistics (token means over these
    inputs). ``count``: the whole batch's ``aggregation_count`` when these inputs are a part of it (``masked_mean``)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg_loss1, pg_loss2), mask, aggregation, count)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def critic_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 5.0,
    aggregation: str = "seq_mean_token_mean",
    count: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Clipped value loss. All inputs (B, T); ``count`` as for ``policy_loss``."""
    values_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(vf_loss1, vf_loss2), mask, aggregation, count)


def ptx_tokens(mask: torch.Tensor) -> torch.Tensor:
    """The tokens ``ptx_loss`` learns over ``mask`` (B, L): every marked position but the first column (nothing
    predicts it). A scalar; summed over the parts of a batch it is the batch's count."""
    return mask[:, 1:].float().sum()


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
             count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Next-token NLL. logits (B, L, V) predict labels (B, L) shifted by one; mask (B, L) marks tokens to learn.
    A mean over the marked tokens, or with ``count`` (the whole batch's ``ptx_tokens``) this part's share of it."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    shift_mask = mask[:, 1:].to(shift_logits.dtype)
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none")
    count = shift_mask.sum() if count is None else torch.as_tensor(count, dtype=shift_logits.dtype)
    return (nll * shift_mask.reshape(-1)).sum() / count.clamp(min=1.0)
