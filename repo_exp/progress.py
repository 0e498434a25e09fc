"""Progress on the terminal for stages that take more than a few seconds, as log lines: one every ``seconds`` at
most (and at the first and last step), so that parallel jobs each add a line now and then instead of fighting over
progress bars."""

from __future__ import annotations

import time


class Every:
    """``every()`` is True at the first call and then once ``seconds`` have passed since it last was True;
    ``every(force=True)`` is always True (the last step)."""

    def __init__(self, seconds: float = 10.0) -> None:
        self.seconds = seconds
        self.last: float | None = None

    def __call__(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or self.last is None or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def step_line(stage: str, step: int, total: int, figures: dict[str, float]) -> str:
    """``stage step 12/300 reward/mean 0.123 cost/mean -0.45 …`` with the figures present."""
    shown = " ".join(f"{k} {v:.4g}" for k, v in figures.items() if v is not None)
    return f"{stage} step {step}/{total} {shown}".rstrip()
