"""λ at a bound: a multiplier pinned to its cap or to the log-space floor no longer does what its update rule says.

With log-space SGD and no cap, a large window cost runs λ up exponentially and, on the first step below ``d``, down to
any floor, where its step (proportional to λ) is too small to grow back: the constraint switches itself off. The
average constraint therefore has a cap (5, as published) and a floor it climbs back from (``constraints/average.py``);
``lambda_at_bound`` reports a λ at either as a metric every step and warns once per process, and ``LambdaTrace``
puts the range λ took and the steps at each bound into the final summary.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

_WARNED: set[tuple[str, str]] = set()  # (constraint, "cap" | "floor") already warned about in this process


def lambda_at_bound(constraint: str, lam: float, floor: float | None, cap: float | None) -> dict[str, float]:
    """``{"constraint/lambda_at_bound": 1.0 at the cap, −1.0 at the floor, 0.0 between}``; ``None`` for a bound that
    does not apply (e.g. the floor 0 of projected dual ascent, which only means the constraint holds)."""
    at_cap = cap is not None and lam >= cap * (1.0 - 1e-9)
    at_floor = floor is not None and lam <= floor * (1.0 + 1e-9)
    which = "cap" if at_cap else "floor" if at_floor else None
    if which is not None and (constraint, which) not in _WARNED:
        _WARNED.add((constraint, which))
        bound = cap if at_cap else floor
        log.warning("constraint=%s: λ = %.3g reached its %s %.3g; %s (logged as constraint/lambda_at_bound; "
                    "warned once)", constraint, lam, which, bound,
                    "raise lambda_max if the constraint still fails" if at_cap else
                    "λ climbs back from it when the cost rises above d (lower lambda_min to let the constraint "
                    "weigh less while it holds)")
    return {"constraint/lambda_at_bound": 1.0 if at_cap else -1.0 if at_floor else 0.0}


class LambdaTrace:
    """The range λ took over a run and the steps it spent at each bound, for the final summary (``train/…``).

    ``observe`` is called with the initial λ and after every step's update; ``at_bound`` is the step's
    ``constraint/lambda_at_bound`` (1 cap, −1 floor, 0 between). Kept in the checkpoint so that a resumed run reports
    the whole run's range."""

    def __init__(self) -> None:
        self.low = math.inf
        self.high = -math.inf
        self.steps_at_cap = 0
        self.steps_at_floor = 0
        self.steps = 0

    def observe(self, lam: float, at_bound: float | None = None) -> None:
        if math.isfinite(lam):
            self.low, self.high = min(self.low, lam), max(self.high, lam)
        if at_bound is not None:
            self.steps += 1
            self.steps_at_cap += int(at_bound > 0)
            self.steps_at_floor += int(at_bound < 0)

    def summary(self) -> dict[str, float]:
        if not math.isfinite(self.low):
            return {}
        return {"train/lambda_min": self.low, "train/lambda_max": self.high,
                "train/steps_at_cap": float(self.steps_at_cap), "train/steps_at_floor": float(self.steps_at_floor),
                "train/updated_steps": float(self.steps)}

    def state_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high, "steps_at_cap": self.steps_at_cap,
                "steps_at_floor": self.steps_at_floor, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.low, self.high = float(state["low"]), float(state["high"])
        self.steps_at_cap, self.steps_at_floor = int(state["steps_at_cap"]), int(state["steps_at_floor"])
        self.steps = int(state["steps"])
