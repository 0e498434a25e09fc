"""Critic-free advantage estimators over groups of k responses per prompt (``conf/estimator``).

Each takes one end score per sample (the reward signal, or the cost signal the constraint names) and the id of the
prompt each sample answers, and returns one advantage per sample, which the policy loss applies to every token of
the response:

- ``rloo`` (REINFORCE leave-one-out; Kool et al. 2019, Ahmadian et al. 2024): ``A_i = S_i − mean_{j≠i} S_j`` over
  the sample's group. The baseline does not depend on sample i, so ``E[(1/k) Σᵢ A_i ∇log π(yᵢ)] = ∇ E[S]`` exactly;
  the KL enters the score as in the RLOO paper and TRL's RLOO trainer, ``S = R − β·Σ_t k_t`` (sequence level);
- ``grpo`` (group relative policy optimisation; Shao et al. 2024, DeepSeekMath): ``A_i = (S_i − mean S) / (std S +
  ε)`` over the group (std with Bessel's correction, as TRL's GRPO trainer computes it). The scaling by the group's
  standard deviation departs from the gradient of ``E[S]``: prompts whose k answers score alike are weighted up,
  and a constant shift of one sample's score changes every sample's advantage. The KL is a loss term, as in the
  GRPO paper, the same β for every sample whatever the constraint does to the advantages. Its form is
  ``kl_penalty``: ``ratio · sg(log π − log π_ref)``, whose expected gradient under the sampling policy is the gradient
  of KL(π ‖ π_ref) at every token. The GRPO paper's k3 term ``exp(r) − r − 1`` (``kl_k3``, r = log π_ref − log π) is
  an unbiased, non-negative estimate of the KL's *value*, but as a loss its expected gradient is that of the reverse
  divergence KL(π_ref ‖ π): ``E_π[(1 − π_ref/π)·∇log π] = −E_{π_ref}[∇log π]`` (tests/test_estimators.py).

Samples of one prompt must sit on one rank (``PromptStream`` keeps them together).
"""

from __future__ import annotations

import torch

ESTIMATORS = ("gae", "rloo", "grpo")


def _group_stats(scores: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample group sum, group size and sum of squares (B,) each."""
    _, inverse = torch.unique(groups, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = torch.zeros(n, dtype=scores.dtype, device=scores.device)
    sums = zeros.index_add(0, inverse, scores)[inverse]
    counts = zeros.index_add(0, inverse, torch.ones_like(scores))[inverse]
    squares = zeros.index_add(0, inverse, scores * scores)[inverse]
    return sums, counts, squares


def leave_one_out_advantages(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``S_i − mean_{j≠i} S_j`` within each group (B,); a group of one keeps its score (no baseline exists)."""
    scores = scores.double()
    sums, counts, _ = _group_stats(scores, groups)
    others = (sums - scores) / (counts - 1).clamp(min=1.0)
    return torch.where(counts > 1, scores - others, scores)


def group_normalized_advantages(scores: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4,
                                centred: bool = False) -> torch.Tensor:
    """``(S_i − mean S) / (std S + eps)`` within each group (B,), std with Bessel's correction; with ``centred`` the
    scores already carry their baseline and are only scaled."""
    scores = scores.double()
    sums, counts, squares = _group_stats(scores, groups)
    mean = sums / counts
    var = (squares - counts * mean * mean).clamp(min=0.0) / (counts - 1).clamp(min=1.0)
    std = torch.where(counts > 1, var.sqrt(), torch.zeros_like(var))
    return (scores if centred else scores - mean) / (std + eps)


def group_advantages(kind: str, scores: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4,
                     centred: bool = False) -> torch.Tensor:
    """The critic-free estimator ``kind`` (rloo | grpo) of one signal (B,) → (B,). ``centred``: the signal already
    subtracts an exact per-sample baseline, so rloo leaves it as it is and grpo only scales it."""
    if kind == "rloo":
        return scores.double() if centred else leave_one_out_advantages(scores, groups)
    if kind == "grpo":
        return group_normalized_advantages(scores, groups, eps, centred)
    raise ValueError(f"estimator must be one of rloo, grpo for group advantages, got {kind!r}")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of the value of KL(π ‖ π_ref) at the sampled tokens, ``exp(r) − r − 1`` with
    ``r = log π_ref − log π`` (B, T): non-negative and unbiased. Not a loss: its expected gradient is that of
    KL(π_ref ‖ π) (see ``kl_penalty``)."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def kl_penalty(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL term of the policy loss (B, T): ``ratio · sg(log π − log π_ref)`` with ``ratio = π/π_old``.

    Its gradient is ``ratio · (log π − log π_ref) · ∇log π``; over tokens drawn from π_old its expectation is
    ``E_π[(log π − log π_ref) ∇log π] = ∇ KL(π ‖ π_ref)`` at each token's state (Σ π ∇log π = 0), on the first
    minibatch (ratio 1) and after the policy has moved alike. Its value is the importance-weighted k1 estimate of
    the KL itself."""
    ratio = torch.exp(logprobs - old_logprobs)
    return ratio * (logprobs - ref_logprobs).detach()
