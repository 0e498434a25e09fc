"""``constraint=average``: Safe RLHF's CMDP, ``max E[R] s.t. E_x E_y[C] ≤ d``, solved with one Lagrange multiplier.

Every sample gets ``(A_r − λ·A_c) / (1 + λ)``. ``J_c`` is the mean end cost over the last ``window`` (128)
episodes. Two update rules for λ (``lambda_update``), both kept within ``[lambda_min, lambda_max]``:

- ``log_sgd`` (default; the published Safe RLHF trainer): λ is stored as ``log λ`` (λ = 1 at the start) and moved by
  plain SGD with learning rate 0.1 on the loss ``−λ·(J_c − d)``: ``log λ ← log λ + lr · λ · (J_c − d)``, then
  clipped to ``[log lambda_min, log lambda_max]``;
- ``projected`` (the Safe RLHF paper's dual ascent): ``λ ← clip(λ + lr · (J_c − d), lambda_min, lambda_max)``, whose
  step does not depend on λ (``lambda_min`` may be 0 here).

Why both bounds. ``lambda_max`` (5, the published script's ``--lambda_max 5.0``): without a cap a binding constraint
runs log-space SGD's λ up exponentially (1e13 in 66 steps on the synthetic world at d = −1.5), and the first step
with ``J_c < d`` then moves ``log λ`` by ``lr · λ · (J_c − d)``, a step of that size, to the numeric floor.
``lambda_min`` (0.1): log-space SGD's step is proportional to λ, so from a tiny λ it never climbs back and the
constraint has switched itself off for the rest of the run. From the floor, while ``J_c − d ≥ gap > 0``, ``1/λ``
falls by at least ``lr·gap/(1 + lr·λ·gap)`` a step, so λ is back at a target within ``climb_steps(lambda_min,
target, lr, gap)`` steps of ``J_c`` crossing ``d`` (at most 27 steps to λ = 1 at gap 5, lr 0.1;
``tests/test_constraints.py``).
At the floor the cost still weighs ``λ/(1 + λ)`` ≈ 9 % of the mix.

The cost window (``window_scope``): ``rank`` is the published trainer's, ``window`` episodes *per rank* and ``J_c`` the
mean of the ranks' window means (with 8 ranks × 16 prompts, 8 steps of history); ``global`` (the default outside the
paper preset) holds the last ``window`` episodes of the whole data-parallel group (all-gathered), so a run gives the
same λ on any number of ranks. On one rank the two are identical. A checkpoint keeps rank 0's window, which every rank
resumes from. Updates start after ``delay`` steps. λ at a bound is reported as ``constraint/lambda_at_bound`` (1 at
the cap, −1 at the floor) and warned about once; the trainer puts the range λ took and the steps it spent at each
bound in the final summary (``train/lambda_min``, ``train/lambda_max``, ``train/steps_at_cap``,
``train/steps_at_floor``).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from repo_exp.constraints.base import Comm, Constraint, projected_ascent
from repo_exp.constraints.bounds import lambda_at_bound


def climb_steps(lambda_min: float, lambda_target: float, lr: float, gap: float) -> int:
    """An upper bound on the log-space SGD steps λ needs to climb from ``lambda_min`` to ``lambda_target`` while
    ``J_c − d ≥ gap > 0``: each step multiplies λ by ``exp(lr·λ·gap) ≥ 1 + lr·λ·gap``, so ``1/λ`` falls by at least
    ``lr·gap/(1 + lr·λ·gap)``, and by at least ``lr·gap/(1 + lr·lambda_target·gap)`` before λ passes the target."""
    if not (0 < lambda_min <= lambda_target and lr > 0 and gap > 0):
        raise ValueError("climb_steps needs 0 < lambda_min <= lambda_target, lr > 0 and gap > 0")
    per_step = lr * gap / (1.0 + lr * lambda_target * gap)
    return max(0, math.ceil((1.0 / lambda_min - 1.0 / lambda_target) / per_step))


class AverageConstraint(Constraint):
    def __init__(
        self,
        threshold: float = 0.0,
        lambda_init: float = 1.0,
        lambda_lr: float = 0.1,
        lambda_max: float = 5.0,
        lambda_min: float = 0.1,
        window: int = 128,
        delay: int = 0,
        lambda_update: str = "log_sgd",
        window_scope: str = "global",
        comm: Comm | None = None,
    ) -> None:
        super().__init__(threshold, comm)
        if lambda_update not in ("log_sgd", "projected"):
            raise ValueError(f"constraint.lambda_update must be log_sgd or projected, got {lambda_update!r}")
        projected = lambda_update == "projected"
        if not lambda_lr > 0.0:
            raise ValueError(f"constraint.lambda_lr must be > 0, got {lambda_lr}")
        if lambda_max is None or not (math.isfinite(lambda_max) and lambda_max > 0.0):
            raise ValueError(f"constraint.lambda_max must be a finite number > 0 (the published cap is 5), got "
                             f"{lambda_max}")
        if not (math.isfinite(lambda_min) and (lambda_min > 0.0 or (projected and lambda_min == 0.0))):
            raise ValueError(f"constraint.lambda_min must be > 0 under lambda_update=log_sgd (a step proportional to "
                             f"λ never leaves 0) and >= 0 under projected, got {lambda_min}")
        if lambda_min > lambda_max:
            raise ValueError(f"constraint.lambda_min ({lambda_min}) exceeds constraint.lambda_max ({lambda_max})")
        if not lambda_min <= lambda_init <= lambda_max:
            raise ValueError(f"constraint.lambda_init ({lambda_init}) must lie in [constraint.lambda_min, "
                             f"constraint.lambda_max] = [{lambda_min}, {lambda_max}]")
        if window_scope not in ("global", "rank"):
            raise ValueError(f"constraint.window_scope must be global or rank, got {window_scope!r}")
        if window < 1:
            raise ValueError(f"constraint.window must be >= 1, got {window}")
        self.projected = projected
        self.lam = float(lambda_init)  # λ itself under `projected`
        self.log_lambda = math.log(lambda_init) if lambda_init > 0 else -30.0  # under `log_sgd` (λ_init > 0 there)
        self.lambda_max = float(lambda_max)
        self.lambda_min = float(lambda_min)
        self.lambda_lr = float(lambda_lr)
        self.delay = int(delay)
        self.window: deque[float] = deque(maxlen=int(window))
        self.per_rank_window = window_scope == "rank"

    @property
    def multiplier(self) -> float:
        return self.lam if self.projected else math.exp(self.log_lambda)

    def window_cost(self) -> float:
        return sum(self.window) / len(self.window) if self.window else float("nan")

    def update(self, costs: torch.Tensor, prompt_index: torch.Tensor, step: int) -> dict[str, float]:
        episode_costs = self.comm.all_gather(costs.detach().float().reshape(-1))
        if not torch.isfinite(episode_costs).all():
            # A non-finite cost must not reach the window: it would poison λ for `window` episodes.
            return {"constraint/window_cost": self.window_cost(), "constraint/lambda_updated": 0.0}
        if self.per_rank_window:  # the published trainer: this rank's episodes, then the mean of the ranks' means
            self.window.extend(costs.detach().float().reshape(-1).tolist())
            local = torch.tensor([self.window_cost()], dtype=torch.float64, device=costs.device)  # NCCL: on the GPU
            j_c = float(self.comm.all_reduce_mean(local))
        else:
            self.window.extend(episode_costs.tolist())
            j_c = self.window_cost()
        updated = step >= self.delay
        if updated and self.projected:
            self.lam = max(self.lambda_min, projected_ascent(self.lam, self.lambda_lr, j_c - self.threshold,
                                                             self.lambda_max))
        elif updated:
            lam = math.exp(self.log_lambda)
            # d(−λ(J_c − d))/d log λ = −λ(J_c − d); one SGD step on log λ, then into [log λ_min, log λ_max]
            self.log_lambda += self.lambda_lr * lam * (j_c - self.threshold)
            self.log_lambda = min(max(self.log_lambda, math.log(self.lambda_min)), math.log(self.lambda_max))
        # projected ascent's floor 0 only means the constraint holds (its step can leave it); any other floor is a bound
        floor = None if self.projected and self.lambda_min == 0.0 else self.lambda_min
        bound = lambda_at_bound("average", self.multiplier, floor, self.lambda_max)
        return {"constraint/window_cost": j_c, "constraint/lambda_updated": float(updated), **bound}

    def state_dict(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda, "lambda": self.lam, "window": list(self.window),
                "window_size": self.window.maxlen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_lambda = float(state["log_lambda"])
        self.lam = float(state.get("lambda", math.exp(self.log_lambda)))
        if not self.lambda_min <= self.multiplier <= self.lambda_max * (1 + 1e-12):
            raise ValueError(f"the saved λ = {self.multiplier:.6g} lies outside this run's [constraint.lambda_min, "
                             f"constraint.lambda_max] = [{self.lambda_min:g}, {self.lambda_max:g}]")
        self.window = deque((float(c) for c in state["window"]), maxlen=self.window.maxlen)
