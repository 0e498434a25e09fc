"""The shared interface of the constraint types (SPEC §3).

The constraint is the only thing that differs between plain PPO, reward shaping, Safe RLHF's average constraint
and RePO's per-prompt rectified constraint. Each is a small object chosen by ``_target_`` that
- names the per-sample cost signal its advantage is estimated from (``cost_signal``: the raw end cost, or RePO's
  rectified ``(C − d)⁺``), decides per sample whether the cost enters the advantage (``cost_gate``; every sample
  except under plain PPO and the gated rectified form), and mixes ``A_r`` and ``A_c`` accordingly: gated samples get
  ``A_r − λ·A_c`` (divided by ``1 + λ`` when ``normalize``), the others ``A_r``;
- places the KL penalty so that every sample's effective KL coefficient is the configured β whatever λ is
  (``kl_reward_weight``, ``kl_cost_weight``): the whole β in the reward signal, and the whole β in the cost signal too
  exactly when the mix divides by ``1 + λ`` — then ``(β + λβ)/(1 + λ) = β``, the convention of the published Safe
  RLHF trainer since April 2024 (β = 0.01 on both streams); without the division the cost signal carries no KL, so
  ``A_r − λ·A_c`` carries β as well;
- owns its multiplier λ and any statistics it keeps (the average constraint's cost window), with
  ``state_dict``/``load_state_dict`` so a resumed run continues exactly;
- reduces across data-parallel ranks through a ``comm`` object, so this package needs torch and nothing heavier.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch


class Comm(Protocol):
    """What a constraint needs from the process group."""

    world_size: int

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x`` (N, ...) of every rank along dim 0, in rank order."""

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``x`` over ranks."""


class LocalComm:
    """The single-process ``Comm``."""

    world_size = 1

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        return x


# λ is kept in log space or clamped to this range so that it never overflows, never becomes NaN and never
# becomes negative, whatever the costs do.
LOG_LAMBDA_BOUNDS = (-30.0, 30.0)


def group_means(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` (B,) within each group id of ``groups`` (B,).

    Returns the means (G,) in sorted group-id order and each sample's group position (B,), so that
    ``means[inverse]`` broadcasts them back.
    """
    _, inverse = torch.unique(groups, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, inverse, torch.ones_like(values))
    return sums / counts, inverse


def group_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B,) within each group id of ``groups`` (B,), broadcast back to (B,)."""
    means, inverse = group_means(values, groups)
    return means[inverse]


class Constraint:
    """Base class. Subclasses choose the gate, the multiplier and its update rule."""

    needs_cost_critic: bool = True  # the cost enters the gradient: a cost critic (or group baseline) is needed
    normalize: bool = True

    def __init__(self, threshold: float = 0.0, comm: Comm | None = None) -> None:
        if not math.isfinite(threshold):
            raise ValueError(f"constraint.threshold must be finite, got {threshold}")
        self.threshold = float(threshold)
        self.comm: Comm = comm or LocalComm()

    @property
    def kl_reward_weight(self) -> float:
        """w_r: the share of β on the reward signal — all of it."""
        return 1.0

    @property
    def kl_cost_weight(self) -> float:
        """w_c: the share of β on the cost signal — all of it when the mix divides by ``1 + λ``, else none, so that
        the mixed advantage carries exactly β for every sample and every λ."""
        return 1.0 if self.normalize and self.needs_cost_critic else 0.0

    @property
    def multiplier(self) -> float:
        """The current λ (0 where the cost never enters the gradient)."""
        return 0.0

    def update(self, costs: torch.Tensor, prompt_index: torch.Tensor, step: int) -> dict[str, float]:
        """Observe this step's end costs (B,) and update λ. Called once per step, before the advantages are mixed
        (the order of the published Safe RLHF trainer). Returns metrics."""
        return {}

    cost_signal_centred: bool = False  # True when cost_signal already subtracts an exact per-sample baseline

    def cost_signal(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """(B,) the end value of the cost signal whose advantage ``A_c`` is estimated (by a cost critic or a group
        baseline): the raw end cost ``C`` here."""
        return costs if costs.is_floating_point() else costs.float()

    def cost_gate(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples whose advantage carries the cost term."""
        return torch.ones(costs.shape[0], dtype=torch.bool, device=costs.device)

    def penalised(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples the constraint counts as violating (``constraint/active_rate``): all of them for a
        constraint on the raw cost."""
        return self.cost_gate(costs, prompt_index)

    def mix_advantages(
        self,
        reward_advantages: torch.Tensor,
        cost_advantages: torch.Tensor | None,
        gate: torch.Tensor,
    ) -> torch.Tensor:
        """The advantage fed to the policy loss (B, T): ``mixed`` where ``gate`` (B,) is set, else ``A_r``."""
        if cost_advantages is None or self.multiplier == 0.0 or not bool(gate.any()):
            return reward_advantages
        penalised = mixed(reward_advantages, cost_advantages, self.multiplier, self.normalize)
        return torch.where(gate.unsqueeze(-1), penalised, reward_advantages)

    def state_dict(self) -> dict[str, Any]:
        """A fresh snapshot (plain numbers and new lists): later ``update`` calls must not change it, since the
        trainer restores it to undo a skipped step."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def projected_ascent(lam: float, lr: float, gap: float, upper: float) -> float:
    """One step of projected dual ascent on λ: ``min(max(λ + lr · gap, 0), upper)``."""
    return min(max(lam + lr * gap, 0.0), upper)


def mixed(reward_advantages: torch.Tensor, cost_advantages: torch.Tensor, lam: float, normalize: bool) -> torch.Tensor:
    """``A_r − λ·A_c``, divided by ``1 + λ`` when ``normalize`` (Safe RLHF's normalisation)."""
    out = reward_advantages - lam * cost_advantages
    return out / (1.0 + lam) if normalize else out
