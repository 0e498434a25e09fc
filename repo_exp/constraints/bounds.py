"""λ at a bound: a multiplier pinned to its cap or to the log-space floor no longer does what its update rule says.

With log-space SGD and a large window cost, λ can run to the upper bound in a few steps and, on the first step below
``d``, to the floor ``exp(−30)`` ≈ 9.4e-14, where its step (proportional to λ) is too small to ever grow back: the
constraint has switched itself off. ``lambda_at_bound`` reports it as a metric every step and warns once per process.
"""

from __future__ import annotations

import logging

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
                    "with a step proportional to λ it can hardly grow back: the constraint is effectively off "
                    "(set lambda_update=projected or a lambda floor in the experiment)")
    return {"constraint/lambda_at_bound": 1.0 if at_cap else -1.0 if at_floor else 0.0}
