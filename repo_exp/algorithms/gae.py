"""Generalised advantage estimation over masked token sequences (SPEC §2).

    δ_t = r_t + γ · V_{t'} − V_t,    A_t = δ_t + γ λ · A_{t'}

where ``t'`` is the next position whose mask is 1 (so holes in a mask are skipped, and the value after the last
response token is 0). Returns are ``A_t + V_t``. The loop runs over time and is vectorised over the batch, which is
what every PPO trainer does; a plain per-row Python loop in the tests checks it.
"""

from __future__ import annotations

import torch


def gae_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns.

    Args:
        values: (B, T) critic values V_t of the state before token t.
        rewards: (B, T) per-token rewards (a reward or a cost stream).
        mask: (B, T) 1 on the tokens that count.
    Returns:
        advantages (B, T), returns (B, T); both 0 where mask is 0.
    """
    mask_b = mask.bool()
    values = values.detach() * mask_b
    rewards = rewards.detach() * mask_b
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        valid = mask_b[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_advantage = torch.where(valid, advantage, next_advantage)
        next_value = torch.where(valid, values[:, t], next_value)
        advantages[:, t] = torch.where(valid, advantage, torch.zeros_like(advantage))
    returns = (advantages + values) * mask_b
    return advantages, returns
