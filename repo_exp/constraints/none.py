"""``constraint=none``: plain PPO on the reward. The cost model is still run, and its figures logged, but the cost
never enters the gradient, so no cost critic is trained."""

from __future__ import annotations

import torch

from repo_exp.constraints.base import Comm, Constraint


class NoConstraint(Constraint):
    needs_cost_critic = False

    def __init__(self, threshold: float = 0.0, comm: Comm | None = None) -> None:
        super().__init__(threshold, comm)

    def cost_gate(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        return torch.zeros(costs.shape[0], dtype=torch.bool, device=costs.device)
