"""``constraint=shaping``: a fixed penalty on the cost for every sample, ``A_r − λ·A_c`` (optionally divided by
``1 + λ``). The baseline that neither learns λ nor distinguishes safe from unsafe samples."""

from __future__ import annotations

from repo_exp.constraints.base import Comm, Constraint


class ShapingConstraint(Constraint):
    def __init__(
        self,
        threshold: float = 0.0,
        multiplier: float = 1.0,
        normalize: bool = False,
        comm: Comm | None = None,
    ) -> None:
        super().__init__(threshold, comm)
        if not multiplier >= 0.0:
            raise ValueError(f"constraint.multiplier must be >= 0, got {multiplier}")
        self.lam = float(multiplier)
        self.normalize = normalize

    @property
    def multiplier(self) -> float:
        return self.lam
