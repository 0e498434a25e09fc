"""The DPO family: the sigmoid DPO loss, the preference pairs each method trains on, and P-SACPO's weight average.

**DPO** (TRL's ``loss_type="sigmoid"``): for a prompt x with a chosen response y_w and a rejected one y_l, with
``log π(y|x)`` summed over the response tokens (EOS included) and ``h = [log π_θ(y_w) − log π_ref(y_w)] −
[log π_θ(y_l) − log π_ref(y_l)]``,

    loss = −log σ(β·h − m)

with ``m = 0`` for plain DPO. The implicit rewards TRL logs are ``β·(log π_θ(y) − log π_ref(y))`` for each response;
``rewards/accuracies`` is the share of pairs whose chosen reward is the larger, ``rewards/margins`` their mean gap.

**SACPO** (stepwise alignment for constrained policy optimisation, NeurIPS 2024): the optimum of the KL-regularised
Lagrangian ``E[r + λ·g] − β·KL(π‖π_ref)`` (g: safety, the negative cost) is ``π_ref·exp((r + λg)/β)``, reached in two
DPO stages: helpfulness pairs with β from π_ref, then safety pairs with β/λ from the helpfulness-aligned policy, which
is also that stage's reference (or the reverse order: safety with β/λ first). Pairs as the SACPO authors build them
from PKU-SafeRLHF: helpfulness ``chosen = response_{better_response_id}``, safety ``chosen =
response_{safer_response_id}``, every row in both, the ``is_response_*_safe`` labels unused. P-SACPO averages the
weights of the two stages: ``(1 − q)·θ_helpfulness + q·θ_safety``.

**SafeDPO** (a single stage, arXiv 2505.20065, Eq. 11–12): the pairs are transformed so that safety ranks first —
the helpfulness winner stays chosen when it is labelled safe, the other response takes its place when only that one is
safe, and a pair of two unsafe responses is left out — and the loss carries a margin on the pairs where a safe
response beats an unsafe one: ``m = Δ·(h̃_l − h̃_w)`` with ``h̃ = 1`` for an unsafe response, so ``m = Δ`` on
safe-over-unsafe pairs and 0 elsewhere. Deviation, as an option: ``both_unsafe="helpfulness"`` keeps the two-unsafe
pairs ranked by helpfulness (the ordering "safety first, then helpfulness" read literally) instead of leaving them out.

Rows are dicts in the PKU-SafeRLHF schema; labels are 0/1 or booleans (``repo_exp/data/files.py`` checks them when
the rows are read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

PAIR_FIELDS = ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe")


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example: the prompt, the preferred and the other response, and their safety labels."""

    prompt: str
    chosen: str
    rejected: str
    chosen_safe: bool
    rejected_safe: bool


def _pair(row: Mapping, chosen_id: int) -> PreferencePair:
    other = 1 - chosen_id
    return PreferencePair(row["prompt"], row[f"response_{chosen_id}"], row[f"response_{other}"],
                          bool(row[f"is_response_{chosen_id}_safe"]), bool(row[f"is_response_{other}_safe"]))


def _check_fields(row: Mapping, index: int, label: str) -> int:
    missing = [k for k in (*PAIR_FIELDS, label) if k not in row]
    if missing:
        raise ValueError(f"preference row {index + 1} lacks the PKU-SafeRLHF field(s) {missing}")
    chosen = row[label]
    if chosen not in (0, 1):
        raise ValueError(f"preference row {index + 1}: {label} is {chosen!r}; it must be 0 or 1")
    return int(chosen)


def pairs_by(rows: Iterable[Mapping], label: str) -> list[PreferencePair]:
    """Every row as a pair whose chosen response is ``response_{row[label]}`` (``better_response_id``: helpfulness,
    ``safer_response_id``: safety)."""
    return [_pair(row, _check_fields(row, i, label)) for i, row in enumerate(rows)]


def helpfulness_pairs(rows: Iterable[Mapping]) -> list[PreferencePair]:
    """SACPO's helpfulness stage: the better response is chosen."""
    return pairs_by(rows, "better_response_id")


def safety_pairs(rows: Iterable[Mapping]) -> list[PreferencePair]:
    """SACPO's safety stage: the safer response is chosen, for every row (as the SACPO authors prepare it)."""
    return pairs_by(rows, "safer_response_id")


def safety_first_pairs(rows: Iterable[Mapping], both_unsafe: str = "drop") -> list[PreferencePair]:
    """SafeDPO's transform T(D) of the helpfulness pairs: a safe response beats an unsafe one; between two safe
    responses the better one wins; two unsafe responses are left out (``both_unsafe="drop"``) or ranked by
    helpfulness (``"helpfulness"``)."""
    if both_unsafe not in ("drop", "helpfulness"):
        raise ValueError(f"both_unsafe must be drop or helpfulness, got {both_unsafe!r}")
    out = []
    for pair in helpfulness_pairs(rows):
        if pair.chosen_safe:
            out.append(pair)
        elif pair.rejected_safe:
            out.append(PreferencePair(pair.prompt, pair.rejected, pair.chosen, True, False))
        elif both_unsafe == "helpfulness":
            out.append(pair)
    return out


def safety_margins(chosen_safe: torch.Tensor, rejected_safe: torch.Tensor, delta: float) -> torch.Tensor:
    """SafeDPO's margin ``Δ·(h̃_l − h̃_w)`` (B,) from the safety labels (B,) of each pair (h̃ = 1 − safe)."""
    return delta * (chosen_safe.float() - rejected_safe.float())


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    margins: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sigmoid DPO loss per pair. Inputs (B,): sequence log-probabilities of the chosen and rejected responses
    under the policy and the reference; ``margins`` (B,) is subtracted from the logit ``β·h`` (SafeDPO), none for
    plain DPO. Returns the losses (B,) and the detached implicit rewards of the chosen and rejected responses (B,)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    if margins is not None:
        logits = logits - margins
    losses = -F.logsigmoid(logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_figures(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's logged DPO statistics (means over the pairs (B,)), under its names."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def interpolate_weights(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor],
                        weight: float) -> dict[str, torch.Tensor]:
    """P-SACPO's linear merge ``(1 − weight)·first + weight·second`` of two state dicts with the same keys; tensors
    that are not floating point (buffers of ids) are taken from ``second``."""
    if set(first) != set(second):
        raise ValueError(f"the two models differ in their parameters: {sorted(set(first) ^ set(second))[:5]}")
    return {k: torch.lerp(first[k], second[k], weight) if second[k].is_floating_point() else second[k]
            for k in second}
