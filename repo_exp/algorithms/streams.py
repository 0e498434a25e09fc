"""Token-level reward and cost streams (SPEC §2).

For a response of T tokens with per-token log-ratio ``k_t = log π_θ(y_t|·) − log π_ref(y_t|·)``:

    r_t = −β · k_t · w_r   (+ R(x, y) at the last response token)
    c_t = +β · k_t · w_c   (+ C(x, y) at the last response token)

The KL penalty is split between the streams by ``w_r`` and ``w_c``; Safe RLHF uses halves, plain PPO puts all of it
on the reward stream. The end scores are clipped to ``±clip_range_score`` before they are added, as in the published
Safe RLHF trainer (``reward_clipped = clamp(reward, -clip_range_score, clip_range_score)``).
"""

from __future__ import annotations

import torch


def end_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where ``mask`` (B, T) is 1, per row → (B,). Rows with no 1 give 0."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return (positions * mask.to(positions.dtype)).amax(dim=-1)


def token_streams(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    costs: torch.Tensor | None,
    kl_coeff: float,
    kl_reward_weight: float,
    kl_cost_weight: float,
    clip_range_score: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token reward and cost streams.

    Args:
        logprobs, ref_logprobs: (B, T) log-probabilities of the sampled response tokens under π_θ and π_ref.
        mask: (B, T) 1 on response tokens (up to and including EOS).
        rewards, costs: (B,) end scores R(x, y) and C(x, y); ``costs`` may be None (no cost stream).
    Returns:
        reward_stream (B, T), cost_stream (B, T) or None, kl (B, T) = masked log-ratio ``k_t``.
    """
    mask_f = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask_f
    last = end_index(mask).unsqueeze(-1)  # (B, 1)
    reward_stream = (-kl_coeff * kl_reward_weight) * kl
    reward_end = rewards.clamp(-clip_range_score, clip_range_score).to(reward_stream.dtype)
    reward_stream = reward_stream.scatter_add(-1, last, reward_end.unsqueeze(-1))
    cost_stream = None
    if costs is not None:
        cost_stream = (kl_coeff * kl_cost_weight) * kl
        cost_end = costs.clamp(-clip_range_score, clip_range_score).to(cost_stream.dtype)
        cost_stream = cost_stream.scatter_add(-1, last, cost_end.unsqueeze(-1))
        cost_stream = cost_stream * mask_f
    return reward_stream * mask_f, cost_stream, kl
