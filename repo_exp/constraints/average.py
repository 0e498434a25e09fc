"""``constraint=average``: Safe RLHF's CMDP, ``max E[R] s.t. E_x E_y[C] ≤ d``, solved with one Lagrange multiplier.

Every sample gets ``(A_r − λ·A_c) / (1 + λ)``. ``J_c`` is the mean end cost over the last ``window`` (128)
episodes. Two update rules for λ (``lambda_update``):

- ``log_sgd`` (default; the published Safe RLHF trainer): λ is stored as ``log λ`` (λ = 1 at the start) and moved by
  plain SGD with learning rate 0.1 on the loss ``−λ·(J_c − d)``: ``log λ ← log λ + lr · λ · (J_c − d)``. Its step is
  proportional to λ, so once a satisfied constraint has shrunk λ towards 0 it takes many steps to grow back when the
  cost rises again;
- ``projected`` (the Safe RLHF paper's dual ascent): ``λ ← clip(λ + lr · (J_c − d), 0, lambda_max)``, whose step
  does not depend on λ.

The cost window (``window_scope``): ``rank`` is the published trainer's, ``window`` episodes *per rank* and ``J_c`` the
mean of the ranks' window means (with 8 ranks × 16 prompts, 8 steps of history); ``global`` (the default outside the
paper preset) holds the last ``window`` episodes of the whole data-parallel group (all-gathered), so a run gives the
same λ on any number of ranks. On one rank the two are identical. A checkpoint keeps rank 0's window, which every rank
resumes from. Updates start after ``delay`` steps; ``lambda_max`` caps λ (the published script: 5). λ at the cap or
the log-space floor is reported as ``constraint/lambda_at_bound`` and warned about once.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from repo_exp.constraints.base import LOG_LAMBDA_BOUNDS, Comm, Constraint, projected_ascent
from repo_exp.constraints.bounds import lambda_at_bound


class AverageConstraint(Constraint):
    def __init__(
        self,
        threshold: float = 0.0,
        lambda_init: float = 1.0,
        lambda_lr: float = 0.1,
        lambda_max: float | None = None,
        window: int = 128,
        delay: int = 0,
        lambda_update: str = "log_sgd",
        window_scope: str = "global",
        comm: Comm | None = None,
    ) -> None:
        super().__init__(threshold, comm)
        if lambda_update not in ("log_sgd", "projected"):
            raise ValueError(f"constraint.lambda_update must be log_sgd or projected, got {lambda_update!r}")
        if not (lambda_init > 0.0 or (lambda_update == "projected" and lambda_init == 0.0)):
            raise ValueError(f"constraint.lambda_init must be > 0 (λ is kept in log space), got {lambda_init}")
        if not lambda_lr > 0.0:
            raise ValueError(f"constraint.lambda_lr must be > 0, got {lambda_lr}")
        if lambda_max is not None and not lambda_max > 0.0:
            raise ValueError(f"constraint.lambda_max must be > 0 or null, got {lambda_max}")
        if window_scope not in ("global", "rank"):
            raise ValueError(f"constraint.window_scope must be global or rank, got {window_scope!r}")
        if lambda_max is not None and lambda_init > lambda_max:
            raise ValueError(f"constraint.lambda_init ({lambda_init}) exceeds constraint.lambda_max ({lambda_max})")
        if window < 1:
            raise ValueError(f"constraint.window must be >= 1, got {window}")
        self.projected = lambda_update == "projected"
        self.lam = float(lambda_init)  # λ itself under `projected`
        self.log_lambda = math.log(lambda_init) if lambda_init > 0 else LOG_LAMBDA_BOUNDS[0]  # under `log_sgd`
        self.lambda_max = lambda_max
        self.lambda_lr = float(lambda_lr)
        self.log_lambda_max = math.log(lambda_max) if lambda_max is not None else None
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
            upper = self.lambda_max if self.lambda_max is not None else math.exp(LOG_LAMBDA_BOUNDS[1])
            self.lam = projected_ascent(self.lam, self.lambda_lr, j_c - self.threshold, upper)
        elif updated:
            lam = math.exp(self.log_lambda)
            # d(−λ(J_c − d))/d log λ = −λ(J_c − d); one SGD step on log λ.
            self.log_lambda += self.lambda_lr * lam * (j_c - self.threshold)
            upper = LOG_LAMBDA_BOUNDS[1] if self.log_lambda_max is None else min(self.log_lambda_max, LOG_LAMBDA_BOUNDS[1])
            self.log_lambda = min(max(self.log_lambda, LOG_LAMBDA_BOUNDS[0]), upper)
        # projected ascent's floor 0 only means the constraint holds; the log-space floor means λ switched itself off
        cap = self.lambda_max if self.lambda_max is not None else math.exp(LOG_LAMBDA_BOUNDS[1])
        bound = lambda_at_bound("average", self.multiplier, None if self.projected else math.exp(LOG_LAMBDA_BOUNDS[0]),
                                cap)
        return {"constraint/window_cost": j_c, "constraint/lambda_updated": float(updated), **bound}

    def state_dict(self) -> dict[str, Any]:
        return {"log_lambda": self.log_lambda, "lambda": self.lam, "window": list(self.window),
                "window_size": self.window.maxlen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_lambda = float(state["log_lambda"])
        self.lam = float(state.get("lambda", math.exp(self.log_lambda)))
        self.window = deque((float(c) for c in state["window"]), maxlen=self.window.maxlen)
