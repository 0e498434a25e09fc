"""``constraint=rectified``: RePO's per-prompt constraint through the rectified Lagrangian

    L(θ, λ) = E[R] − β·KL − λ · E_x E_y[(C(x, y) − d)⁺]

Because ``(·)⁺`` is zero exactly when a sample (or prompt) is safe, safe samples are optimised for helpfulness
alone and get exactly ``A_r``; unsafe ones get ``(A_r − λ·A_c) / (1 + λ)`` (the normalisation is switchable).
Safe samples cannot pay for unsafe ones, which is what removes safety compensation.

Choice points the paper leaves open, each a config field:
- ``granularity=sample`` (default): a sample is unsafe when its own ``C > d`` — the strict ("critical") form;
  ``granularity=prompt``: samples are grouped by prompt (``k`` responses each, kept on one rank) and a prompt is
  unsafe when the mean cost of its responses exceeds ``d`` — the per-prompt expectation form.
- ``multiplier=fixed``: λ is a penalty weight (its right size depends on the cost model's scale);
  ``multiplier=learned``: projected dual ascent ``λ ← clip(λ + lr·(V − tolerance), 0, lambda_max)`` on the batch
  violation ``V = mean (C − d)⁺`` (mean over prompts of ``(C̄(x) − d)⁺`` for ``granularity=prompt``). Under a
  softmax policy V never reaches 0, so a learned λ climbs to its cap: ``lambda_max`` is the real knob.
- ``threshold`` below 0 gives a margin for a noisy learned cost model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from repo_exp.constraints.base import LOG_LAMBDA_BOUNDS, Comm, Constraint, group_mean, group_means, projected_ascent

GRANULARITIES = ("sample", "prompt")
MULTIPLIERS = ("fixed", "learned")


class RectifiedConstraint(Constraint):
    def __init__(
        self,
        threshold: float = 0.0,
        multiplier: str = "fixed",
        lambda_init: float = 1.0,
        lambda_lr: float = 0.1,
        lambda_max: float = 10.0,
        tolerance: float = 0.0,
        granularity: str = "sample",
        normalize: bool = True,
        kl_reward_weight: float = 0.5,
        kl_cost_weight: float = 0.5,
        comm: Comm | None = None,
    ) -> None:
        super().__init__(threshold, kl_reward_weight, kl_cost_weight, comm)
        if granularity not in GRANULARITIES:
            raise ValueError(f"constraint.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if multiplier not in MULTIPLIERS:
            raise ValueError(f"constraint.multiplier must be one of {MULTIPLIERS}, got {multiplier!r}")
        if not lambda_init >= 0.0:
            raise ValueError(f"constraint.lambda_init must be >= 0, got {lambda_init}")
        if not lambda_max > 0.0 or not math.isfinite(lambda_max):
            raise ValueError(f"constraint.lambda_max must be finite and > 0, got {lambda_max}")
        if lambda_init > lambda_max:  # clipping it silently would start the run at another λ than asked
            raise ValueError(f"constraint.lambda_init ({lambda_init}) exceeds constraint.lambda_max ({lambda_max})")
        self.granularity = granularity
        self.learned = multiplier == "learned"
        self.lam = min(float(lambda_init), float(lambda_max))
        self.lambda_lr = float(lambda_lr)
        self.lambda_max = float(lambda_max)
        self.tolerance = float(tolerance)
        self.normalize = normalize

    @property
    def multiplier(self) -> float:
        return self.lam

    def judged_costs(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """The cost each sample is judged by (B,): its own, or its prompt's mean for ``granularity=prompt``."""
        if self.granularity == "prompt":
            return group_mean(costs.float(), prompt_index)
        return costs.float()

    def cost_gate(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples that violate the constraint and so receive a cost gradient."""
        return self.judged_costs(costs, prompt_index) > self.threshold

    def violation(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """Mean rectified violation of the batch over the whole data-parallel group: E[(C − d)⁺]."""
        if self.granularity == "prompt":
            judged, _ = group_means(costs.float(), prompt_index)  # one term per prompt, not per sample
        else:
            judged = costs.float()
        local = (judged - self.threshold).clamp(min=0.0)
        counts = torch.tensor([float(local.numel())], device=local.device)
        sums = torch.stack([local.sum()]).to(counts.dtype)
        total = self.comm.all_reduce_mean(torch.cat([sums, counts]))
        return total[0] / total[1].clamp(min=1.0)

    def update(self, costs: torch.Tensor, prompt_index: torch.Tensor, step: int) -> dict[str, float]:
        violation = float(self.violation(costs.detach(), prompt_index))
        if self.learned and math.isfinite(violation):
            self.lam = projected_ascent(self.lam, self.lambda_lr, violation - self.tolerance,
                                        min(self.lambda_max, math.exp(LOG_LAMBDA_BOUNDS[1])))
        return {"constraint/violation": violation}

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state["lambda"])
