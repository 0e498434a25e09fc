"""Progress on the terminal for stages that take more than a few seconds, as log lines: one every ``seconds`` at
most (and at the first and last step), so that parallel jobs each add a line now and then instead of fighting over
progress bars."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


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


# the figures of a finished run's last line: what the comparison is about, ground truth first where there is one
RESULT_FIGURES = (
    ("oracle/prompt_violation_rate", "prompts violating (oracle)"),
    ("oracle/answerable_helpfulness", "answerable helpfulness (oracle)"),
    ("oracle/overrefusal_rate", "over-refusal (oracle)"),
    ("eval/prompt_violation_rate", "prompts violating (cost model)"),
    ("eval/mean_cost", "mean cost (cost model)"),
    ("eval/reward_mean", "reward (reward model)"),
)


def result_line(summary: dict[str, Any], run_dir: Path) -> str:
    """The one line a finished job ends on: its headline figures and where the rest is."""
    shown = [f"{label} {summary[key]:.3f}" for key, label in RESULT_FIGURES
             if isinstance(summary.get(key), (int, float)) and not isinstance(summary.get(key), bool)]
    if not shown:
        return f"done: no final evaluation (eval.at_end=false); step metrics in {Path(run_dir) / 'metrics.jsonl'}"
    where = Path(run_dir) / "eval" / "summary.json"
    prompts = summary.get("eval/num_prompts")
    on = f" on {prompts} prompts × {summary.get('eval/samples_per_prompt')} samples" if prompts else ""
    return f"done: {', '.join(shown)}{on}; every figure in {where}"


def step_line(stage: str, step: int, total: int, figures: dict[str, float]) -> str:
    """``stage step 12/300 reward/mean 0.123 cost/mean -0.45 …`` with the figures present."""
    shown = " ".join(f"{k} {v:.4g}" for k, v in figures.items() if v is not None)
    return f"{stage} step {step}/{total} {shown}".rstrip()
