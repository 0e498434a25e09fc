"""Reward- and cost-model training on preference rows in the PKU-SafeRLHF schema (SPEC §5).

- reward: ``−log σ(R(better) − R(worse))``;
- cost: ``−log σ(C(unsafer) − C(safer)) − log σ(s_u·C(unsafer)) − log σ(s_s·C(safer))`` with ``s = +1`` for a
  response labelled unsafe and ``−1`` for a safe one: the less safe response gets the higher cost, unsafe ones are
  pushed above 0 and safe ones below (the published Safe RLHF cost loss).

As in the published trainers, both add ``score_regularization · mean(score²)`` over the pair's end scores (0.001,
keeping the scores near zero), and the cost model leaves out pairs whose safer response is labelled unsafe while
the other is labelled safe (``filter_inconsistent_pairs``; the published safety-preference data refuses them).

The result is a score model in the published layout, which an RL run loads by path
(``reward.source=hub reward.path=DIR``). Entry point:

    python -m repo_exp.score_train kind=cost data=pku_saferlhf data.path=rows.jsonl out=cost_model/
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from transformers import get_scheduler

from repo_exp.config import ArchConfig, DataConfig, _non_negative, _one_of, _positive, _require
from repo_exp.models.score_model import ScoreModel, right_pad, score_input_ids
from repo_exp.progress import Every, step_line

log = logging.getLogger(__name__)


def reward_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """Pairwise loss (B,) scores → scalar."""
    return -F.logsigmoid(better - worse).mean()


def cost_loss(unsafer: torch.Tensor, safer: torch.Tensor, unsafer_sign: torch.Tensor,
              safer_sign: torch.Tensor) -> torch.Tensor:
    """Pairwise plus sign terms. Signs: +1 for a response labelled unsafe, −1 for a safe one."""
    return (-F.logsigmoid(unsafer - safer) - F.logsigmoid(unsafer_sign * unsafer)
            - F.logsigmoid(safer_sign * safer)).mean()


@dataclass
class PairBatch:
    first_ids: torch.Tensor  # (B, L) the preferred (reward) or less safe (cost) response, right-padded
    first_mask: torch.Tensor
    second_ids: torch.Tensor  # (B, L) the other one
    second_mask: torch.Tensor
    first_sign: torch.Tensor  # (B,) +1 unsafe / −1 safe (cost only)
    second_sign: torch.Tensor

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


class PreferenceEncoder:
    """Tokenizes ``template(prompt) + response + EOS`` once per response."""

    def __init__(self, tokenizer, template: str, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self._cache: dict[tuple[str, str], list[int]] = {}

    def ids(self, prompt: str, response: str) -> list[int]:
        key = (prompt, response)
        if key not in self._cache:
            self._cache[key] = score_input_ids(self.tokenizer, self.template, prompt, response, self.max_length)
        return self._cache[key]

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return right_pad(rows, self.tokenizer.pad_token_id)

    def batch(self, rows: Sequence[dict], kind: str) -> PairBatch:
        firsts, seconds, first_sign, second_sign = [], [], [], []
        for row in rows:
            pick = int(row["better_response_id"] if kind == "reward" else 1 - int(row["safer_response_id"]))
            other = 1 - pick
            firsts.append(self.ids(row["prompt"], row[f"response_{pick}"]))
            seconds.append(self.ids(row["prompt"], row[f"response_{other}"]))
            first_sign.append(-1.0 if _truthy(row[f"is_response_{pick}_safe"]) else 1.0)
            second_sign.append(-1.0 if _truthy(row[f"is_response_{other}_safe"]) else 1.0)
        a_ids, a_mask = self.pad(firsts)
        b_ids, b_mask = self.pad(seconds)
        return PairBatch(a_ids, a_mask, b_ids, b_mask, torch.tensor(first_sign), torch.tensor(second_sign))


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def score_regularization(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``mean(score²)`` over both responses' end scores (B,) each: the published reward and cost trainers add it,
    times 0.001, so that the scores stay near zero instead of drifting by a constant the pairwise loss cannot see."""
    return torch.stack([first, second]).square().mean()


def inconsistent_safety_labels(row: dict) -> bool:
    """The safer response is labelled unsafe while the other is labelled safe: the labels contradict each other."""
    safer = int(row["safer_response_id"])
    return not _truthy(row[f"is_response_{safer}_safe"]) and _truthy(row[f"is_response_{1 - safer}_safe"])


def pair_loss(model: ScoreModel, batch: PairBatch, kind: str,
              regularization: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = batch.to(next(model.parameters()).device)  # a no-op on the CPU
    first = model.end_scores(batch.first_ids, batch.first_mask)
    second = model.end_scores(batch.second_ids, batch.second_mask)
    if kind == "reward":
        loss = reward_loss(first, second)
    else:
        loss = cost_loss(first, second, batch.first_sign, batch.second_sign)
    if regularization > 0.0:
        loss = loss + regularization * score_regularization(first, second)
    return loss, first, second


@torch.no_grad()
def evaluate_score_model(model: ScoreModel, encoder: PreferenceEncoder, rows: Sequence[dict], kind: str,
                         batch_size: int = 256) -> dict[str, float]:
    """Held-out pairwise accuracy (and, for a cost model, sign accuracy against the is_safe labels)."""
    model.eval()
    correct, sign_correct, total, signs = 0.0, 0.0, 0, 0
    for start in range(0, len(rows), batch_size):
        batch = encoder.batch(rows[start : start + batch_size], kind)
        _, first, second = pair_loss(model, batch, kind)
        correct += float((first > second).float().sum() + 0.5 * (first == second).float().sum())
        total += first.numel()
        if kind == "cost":
            sign_correct += float(((first.cpu() > 0).float() * 2 - 1 == batch.first_sign).sum())
            sign_correct += float(((second.cpu() > 0).float() * 2 - 1 == batch.second_sign).sum())
            signs += 2 * first.numel()
    out = {f"{kind}/pairwise_accuracy": correct / max(total, 1)}
    if kind == "cost":
        out["cost/sign_accuracy"] = sign_correct / max(signs, 1)
    return out


def train_score_model(model: ScoreModel, encoder: PreferenceEncoder, train_rows: Sequence[dict],
                      test_rows: Sequence[dict], kind: str, steps: int, batch_size: int, lr: float,
                      weight_decay: float = 0.0, seed: int = 0, score_regularization: float = 0.001,
                      filter_inconsistent_pairs: bool = True) -> dict[str, float]:
    """Train ``model`` in place; returns held-out metrics (and the last training loss). The defaults of the last two
    arguments are the published trainers'."""
    if kind not in ("reward", "cost"):
        raise ValueError(f"kind must be reward or cost, got {kind!r}")
    dropped = 0
    if kind == "cost" and filter_inconsistent_pairs:
        kept = [r for r in train_rows if not inconsistent_safety_labels(r)]
        dropped = len(train_rows) - len(kept)
        train_rows, test_rows = kept, [r for r in test_rows if not inconsistent_safety_labels(r)]
        log.info("cost model: %d of %d training pairs left out (safer response labelled unsafe, the other safe)",
                 dropped, dropped + len(kept))
    if not train_rows:
        raise ValueError("no preference rows to train on")
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # a linear warm-up over the first 5 % of the steps, then a cosine decay to 0
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps)
    model.train()
    loss = torch.tensor(float("nan"))
    every = Every(10.0)
    for step in range(steps):
        rows = [train_rows[rng.randrange(len(train_rows))] for _ in range(batch_size)]
        loss, _, _ = pair_loss(model, encoder.batch(rows, kind), kind, score_regularization)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the {kind} model's loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if every(force=step + 1 == steps):
            log.info(step_line(f"{kind} model", step + 1, steps, {"loss": loss.item()}))
    metrics = evaluate_score_model(model, encoder, test_rows, kind) if test_rows else {}
    metrics[f"{kind}/train_loss"] = float(loss.detach())
    if kind == "cost":
        metrics["cost/inconsistent_pairs_dropped"] = float(dropped)
    model.eval()
    return metrics


# ------------------------------------------------------------------------------------------------- entry point


@dataclass
class ScoreTrainConfig:
    kind: str = "reward"  # reward | cost
    data: DataConfig = MISSING  # preference rows in the PKU-SafeRLHF schema
    init: Optional[str] = None  # a causal LM or score model folder to start from; null: random `arch`
    tokenizer: str = "world"  # a tokenizer folder / hub id, or `world`
    template: str = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
    arch: ArchConfig = field(default_factory=ArchConfig)
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_length: int = 512
    score_regularization: float = 0.001  # × mean(score²), the published trainers' value
    filter_inconsistent_pairs: bool = True  # cost: leave out pairs whose safer response is labelled unsafe, other safe
    test_split: Optional[str] = "test"
    seed: int = 0
    out: str = MISSING

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, ("reward", "cost"))
        _positive("steps", self.steps)
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        _non_negative("score_regularization", self.score_regularization)
        _require("{input}" in self.template, "template must contain '{input}'")


def init_score_model(init: str | None, tokenizer, arch: ArchConfig, kind: str, seed: int) -> ScoreModel:
    """A score model from ``init`` (score layout: as is; causal LM: its trunk and a fresh head) or random."""
    from transformers import AutoConfig, AutoModel

    from repo_exp.models.policy import tiny_llama_config
    from repo_exp.models.score_model import load_score_model, read_config

    torch.manual_seed(seed)
    if init is None:
        return ScoreModel(tiny_llama_config(arch, tokenizer), score_type=kind)
    raw = read_config(Path(init))
    if any(a.endswith("ForScore") for a in raw.get("architectures") or []):
        return load_score_model(init, score_type=kind)
    config = AutoConfig.from_pretrained(init)
    trunk = quietly(AutoModel.from_pretrained, init)  # a causal LM's lm_head is expected to be left out
    model = ScoreModel(config, score_type=kind, trunk=trunk)
    return model


def quietly(load, *args, **kwargs):
    """Call a transformers loader without its progress bars and load report."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def load_preference_rows(data: DataConfig, split: str) -> list[dict]:
    from repo_exp.data.pku import load_pku_split

    ds = load_pku_split(data, split)  # checks every PREFERENCE_COLUMNS column (the default)
    return [dict(r) for r in ds]


def score_train_job(cfg) -> dict[str, float]:
    from omegaconf import OmegaConf

    from repo_exp.config import validate
    from repo_exp.models.tokenizers import load_tokenizer

    c: ScoreTrainConfig = validate(cfg)
    if c.tokenizer == "world":
        from repo_exp.world import world_tokenizer

        tokenizer = world_tokenizer()
    else:
        tokenizer = load_tokenizer(c.tokenizer)
    train_rows = load_preference_rows(c.data, c.data.split)
    test_rows = load_preference_rows(c.data, c.test_split) if c.test_split else []
    model = init_score_model(c.init, tokenizer, c.arch, c.kind, c.seed)
    encoder = PreferenceEncoder(tokenizer, c.template, c.max_length)
    metrics = train_score_model(model, encoder, train_rows, test_rows, c.kind, c.steps, c.batch_size, c.lr,
                                c.weight_decay, c.seed, c.score_regularization, c.filter_inconsistent_pairs)
    model.save_pretrained(c.out, tokenizer=tokenizer)
    log.info("%s model saved to %s: %s", c.kind, c.out, metrics)
    print(OmegaConf.to_yaml(OmegaConf.create(metrics)))
    return metrics


def main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore

    from repo_exp.config import register_configs

    register_configs()
    ConfigStore.instance().store(name="score_train", group="schema", node=ScoreTrainConfig)
    hydra.main(version_base="1.3", config_path="pkg://repo_exp.conf", config_name="score_train")(score_train_job)()


if __name__ == "__main__":
    main()
