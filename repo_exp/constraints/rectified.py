"""``constraint=rectified``: RePO's per-prompt constraint through the rectified Lagrangian

    L(θ, λ) = E[R] − β·KL − λ · E_x E_y[(C(x, y) − d)⁺]                       (granularity=sample)
    L(θ, λ) = E[R] − β·KL − λ · E_x E_{y_1..k}[(C̄_k(x) − d)⁺]                 (granularity=prompt)

where ``C̄_k(x)`` is the mean cost of the k responses drawn for prompt x. Because ``(·)⁺`` is zero exactly when a
sample (or prompt) is safe, one λ pushes on every violating sample (or prompt) and no safe one can pay for it: this
is what removes safety compensation.

Two forms of the update (``form``):

- ``unbiased`` (default): the cost signal is the rectified violation itself, so its advantage estimate is unbiased
  for the gradient of ``L``, and every sample gets ``A_r − λ·A_c`` (divided by ``1 + λ`` when ``normalize``):
  - per sample, the end value is ``(C − d)⁺``; the cost critic (or the estimator's group baseline) fits that signal;
  - per prompt, sample i of a prompt with k samples gets ``k · [(C̄ − d)⁺ − (C̄₋ᵢ − d)⁺]``, where ``C̄₋ᵢ`` is the mean
    of the other k − 1 costs. The subtracted term does not depend on sample i, so it is an exact baseline, and
    ``E[(1/k) Σᵢ sᵢ ∇log π(yᵢ)] = ∇ E[(C̄_k − d)⁺]``. The signal is already centred: on a prompt far above d it is
    the leave-one-out advantage of the raw cost ``Cᵢ − C̄₋ᵢ``; on a prompt far below d it is 0. (A signal shared by
    all k samples, ``(C̄ − d)⁺``, is unbiased too but gives every sample the same credit.)
- ``gated`` (the paper's "separate handling of safe and unsafe samples"): safe samples get ``A_r``; samples judged
  unsafe (their own ``C > d``, or their prompt's ``C̄ > d``) get ``A_r − λ·A_c`` with ``A_c`` estimated on the raw
  cost. Biased at sample granularity: the gate depends on the sample itself, so the cost critic's baseline does not
  cancel and the expected update carries an extra ``−λ·(d − V_c)·∇P(C > d)``, which rewards unsafe answers wherever
  the critic already expects an unsafe outcome (``V_c > d``); safe samples never get credit for avoiding the penalty.
  On one prompt with comply (R 1, C +1) and refuse (R 0.1, C −1.5), d = 0, exact critics, the true gradient favours
  refusing for every λ > 0.9, while the gated update favours complying once P(comply) > 0.93 at λ = 5
  (tests/test_estimators.py pins where its sign departs).

Multiplier (``multiplier``): ``fixed`` — λ is a penalty weight in reward units per cost unit (its right size depends
on the cost model's scale); ``learned`` — projected dual ascent ``λ ← clip(λ + lr·(V − tolerance), 0, lambda_max)``
on the batch violation ``V = mean (C − d)⁺`` (mean over prompts of ``(C̄(x) − d)⁺`` for ``granularity=prompt``).
Under a softmax policy V never reaches 0, so a learned λ climbs to its cap: ``lambda_max`` is the real knob.
``threshold`` below 0 gives a margin for a noisy learned cost model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from repo_exp.constraints.base import LOG_LAMBDA_BOUNDS, Comm, Constraint, group_mean, group_means, projected_ascent
from repo_exp.constraints.bounds import lambda_at_bound

GRANULARITIES = ("sample", "prompt")
MULTIPLIERS = ("fixed", "learned")
FORMS = ("unbiased", "gated")


def _floating(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor, keeping float64 (exact-expectation tests) where it is given."""
    return x if x.is_floating_point() else x.float()


def rectified_prompt_signal(costs: torch.Tensor, groups: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-sample signal whose score-function estimate is unbiased for ``∇ E[(C̄_k − d)⁺]`` (B,).

    ``s_i = k · [(C̄ − d)⁺ − (C̄₋ᵢ − d)⁺]`` with ``C̄`` the mean of the sample's group of k (``groups`` (B,) ids) and
    ``C̄₋ᵢ`` the mean of the other k − 1 (0 baseline when k = 1, which leaves ``(C − d)⁺``).
    """
    costs = _floating(costs)
    means, inverse = group_means(costs, groups)
    k = torch.zeros_like(means).index_add_(0, inverse, torch.ones_like(costs))[inverse]  # (B,) group sizes
    mean = means[inverse]
    violation = (mean - threshold).clamp(min=0.0)
    others = (mean * k - costs) / (k - 1).clamp(min=1.0)
    baseline = torch.where(k > 1, (others - threshold).clamp(min=0.0), torch.zeros_like(costs))
    return k * (violation - baseline)


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
        form: str = "unbiased",
        comm: Comm | None = None,
    ) -> None:
        super().__init__(threshold, comm)
        if granularity not in GRANULARITIES:
            raise ValueError(f"constraint.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if multiplier not in MULTIPLIERS:
            raise ValueError(f"constraint.multiplier must be one of {MULTIPLIERS}, got {multiplier!r}")
        if form not in FORMS:
            raise ValueError(f"constraint.form must be one of {FORMS}, got {form!r}")
        if not lambda_init >= 0.0:
            raise ValueError(f"constraint.lambda_init must be >= 0, got {lambda_init}")
        if not lambda_max > 0.0 or not math.isfinite(lambda_max):
            raise ValueError(f"constraint.lambda_max must be finite and > 0, got {lambda_max}")
        if lambda_init > lambda_max:  # clipping it silently would start the run at another λ than asked
            raise ValueError(f"constraint.lambda_init ({lambda_init}) exceeds constraint.lambda_max ({lambda_max})")
        self.granularity = granularity
        self.form = form
        self.learned = multiplier == "learned"
        self.lam = min(float(lambda_init), float(lambda_max))
        self.lambda_lr = float(lambda_lr)
        self.lambda_max = float(lambda_max)
        self.tolerance = float(tolerance)
        self.normalize = normalize

    @property
    def multiplier(self) -> float:
        return self.lam

    @property
    def cost_signal_centred(self) -> bool:
        """The per-prompt unbiased signal carries its own exact baseline: estimators must not subtract another one
        (a group mean of it would depend on the sample itself)."""
        return self.form == "unbiased" and self.granularity == "prompt"

    def judged_costs(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """The cost each sample is judged by (B,): its own, or its prompt's mean for ``granularity=prompt``."""
        if self.granularity == "prompt":
            return group_mean(_floating(costs), prompt_index)
        return _floating(costs)

    def penalised(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples (or samples of prompts) that violate the constraint."""
        return self.judged_costs(costs, prompt_index) > self.threshold

    def cost_signal(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        if self.form == "gated":
            return _floating(costs)
        if self.granularity == "prompt":
            return rectified_prompt_signal(costs, prompt_index, self.threshold)
        return (_floating(costs) - self.threshold).clamp(min=0.0)

    def cost_gate(self, costs: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples whose advantage carries ``−λ·A_c``: every sample under the unbiased form (a safe
        sample is credited for the penalty it avoided), the violating ones under the gated form."""
        if self.form == "gated":
            return self.penalised(costs, prompt_index)
        return torch.ones(costs.shape[0], dtype=torch.bool, device=costs.device)

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
        bound = lambda_at_bound("rectified", self.lam, None, self.lambda_max) if self.learned else {}
        return {"constraint/violation": violation, **bound}

    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = float(state["lambda"])
