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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss. All inputs (B, T). Returns the loss and detached statistics."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg_loss1, pg_loss2), mask, aggregation)
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
) -> torch.Tensor:
    """Clipped value loss. All inputs (B, T)."""
    values_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (values_clipped - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(vf_loss1, vf_loss2), mask, aggregation)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token NLL. logits (B, L, V) predict labels (B, L) shifted by one; mask (B, L) marks tokens to learn."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    shift_mask = mask[:, 1:].to(shift_logits.dtype)
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none")
    return (nll * shift_mask.reshape(-1)).sum() / shift_mask.sum().clamp(min=1.0)
