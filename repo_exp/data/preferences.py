"""Preference rows for the offline methods and the token batches of their pairs.

Rows are in the PKU-SafeRLHF schema and read through ``repo_exp.data.pku.load_pku_split``, which refuses a missing
column or a label that is not 0/1, naming the file and the row. Their source (``algorithm.preferences``):
- ``path`` set: a hub id (at ``revision``), a local file, or a local folder laid out like the hub's;
- else the run's own data: on the world, the rows its reward and cost models learnt from — its preference stage and
  every on-policy round (``train.jsonl`` of each folder); with ``data=pku_saferlhf``, that data set.

A pair is tokenized as TRL does for non-conversational data: the prompt as the policy reads it (the template), the
response as the tail of the tokenized ``prompt + separator + response`` (its own tokenization when the two disagree),
then EOS. Prompts longer than ``trainer.max_prompt_length`` are left out (as RL leaves them out); responses are cut
to what the policy can generate in one rollout (``trainer.max_new_tokens``, or ``trainer.max_length`` minus the
prompt), keeping their start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from repo_exp.algorithms.dpo import PreferencePair
from repo_exp.config import ConfigError, DataConfig, PreferenceDataConfig
from repo_exp.data.prompts import PromptSet, check_vocabulary
from repo_exp.models.tokenizers import CHAT, encode_prompt, render_prompt, response_separator

if TYPE_CHECKING:
    from repo_exp.world.stage import WorldArtifacts

log = logging.getLogger(__name__)


def load_preference_rows(prefs: PreferenceDataConfig, data: DataConfig,
                         world: WorldArtifacts | None) -> tuple[list[dict], str]:
    """The preference rows of ``prefs`` (or of the run's data when ``prefs.path`` is unset) and where they came
    from. ``world``: the built world's folders (``repo_exp.world.stage.prepare_world``), when the run loads them."""
    from repo_exp.data.pku import load_pku_split

    def read(path: str, revision: str | None = None, subset: str | None = None) -> list[dict]:
        source = DataConfig(name="preferences", source="pku_saferlhf", path=path, revision=revision, subset=subset)
        return [dict(r) for r in load_pku_split(source, prefs.split)]

    if prefs.path:
        return read(prefs.path, prefs.revision, prefs.subset), f"{prefs.path} ({prefs.split})"
    if data.source == "world":
        if world is None:
            raise ConfigError("the offline methods train on the world's preference rows, which come with the world's "
                              "models (model=world, as by default); with other models give the rows in "
                              "algorithm.preferences.path (PKU-SafeRLHF schema)")
        folders = world.preference_folders()
        rows = [row for folder in folders for row in read(str(Path(folder) / f"{prefs.split}.jsonl"))]
        return rows, f"the world's preference stage and {len(folders) - 1} on-policy round(s) ({prefs.split})"
    if data.source == "pku_saferlhf":
        return read(data.path, data.revision, data.subset), f"{data.path}@{data.revision} ({prefs.split})"
    raise ConfigError(f"data.source={data.source} holds prompts only; the offline methods need preference rows in "
                      f"the PKU-SafeRLHF schema: give them in algorithm.preferences.path")


@dataclass
class PairBatch:
    """B pairs as one batch of 2B sequences: the chosen responses first, then the rejected ones (TRL's order)."""

    sequences: torch.Tensor  # (2B, P + T) prompts left-padded to P, responses right-padded to T
    attention_mask: torch.Tensor  # (2B, P + T)
    response_mask: torch.Tensor  # (2B, T) 1 on response tokens (EOS included)
    prompt_width: int  # P
    chosen_safe: torch.Tensor  # (B,) bool, the safety label of each chosen response
    rejected_safe: torch.Tensor  # (B,) bool

    @property
    def pairs(self) -> int:
        return self.chosen_safe.shape[0]


class PairEncoder:
    """Tokenizes every pair once; ``batch(indices)`` pads the chosen pairs into a ``PairBatch``."""

    def __init__(self, pairs: Sequence[PreferencePair], tokenizer, template: str, max_prompt_length: int,
                 max_new_tokens: int, max_length: int | None = None, tokenizer_name: str = "") -> None:
        texts = sorted({text for p in pairs for text in (p.prompt, p.chosen, p.rejected) if text})
        check_vocabulary(PromptSet(texts, name="of preference pairs"), tokenizer, tokenizer_name)
        self.tokenizer = tokenizer
        self.template = template
        self.pad_id = tokenizer.pad_token_id
        self._prompts: dict[str, list[int]] = {}
        self._responses: dict[tuple[str, str], list[int]] = {}
        kept, dropped = [], 0
        for pair in pairs:
            prompt = self._prompt_ids(pair.prompt)
            if len(prompt) > max_prompt_length:
                dropped += 1
                continue
            limit = max_length - len(prompt) if max_length is not None else max_new_tokens
            kept.append((prompt, self._response_ids(pair.prompt, pair.chosen)[:limit],
                         self._response_ids(pair.prompt, pair.rejected)[:limit], pair.chosen_safe, pair.rejected_safe))
        if dropped:
            log.warning("%d of %d preference pairs have a prompt longer than trainer.max_prompt_length=%d tokens and "
                        "were left out", dropped, len(pairs), max_prompt_length)
        if not kept:
            raise ValueError(f"no preference pair to train on ({len(pairs)} given, {dropped} with a prompt longer than "
                             f"trainer.max_prompt_length={max_prompt_length} tokens)")
        self.encoded = kept

    def __len__(self) -> int:
        return len(self.encoded)

    def _prompt_ids(self, prompt: str) -> list[int]:
        if prompt not in self._prompts:
            self._prompts[prompt] = encode_prompt(self.tokenizer, self.template, prompt)
        return self._prompts[prompt]

    def _response_ids(self, prompt: str, response: str) -> list[int]:
        key = (prompt, response)
        if key not in self._responses:
            prompt_ids = self._prompt_ids(prompt)
            text = render_prompt(self.tokenizer, self.template, prompt) + response_separator(self.template) + response
            full = self.tokenizer(text, add_special_tokens=self.template != CHAT)["input_ids"]
            if full[: len(prompt_ids)] == prompt_ids:
                ids = full[len(prompt_ids):]
            else:  # the tokenizer merged across the boundary: the response on its own
                ids = self.tokenizer(response_separator(self.template) + response, add_special_tokens=False)["input_ids"]
            self._responses[key] = [*ids, self.tokenizer.eos_token_id]
        return self._responses[key]

    def batch(self, indices: Sequence[int]) -> PairBatch:
        rows = [self.encoded[i] for i in indices]
        prompts = [r[0] for r in rows] * 2
        responses = [r[1] for r in rows] + [r[2] for r in rows]
        width, length = max(len(p) for p in prompts), max(len(r) for r in responses)
        sequences = torch.full((len(prompts), width + length), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(sequences)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            sequences[i, width - len(p): width] = torch.tensor(p)
            sequences[i, width: width + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(p): width + len(r)] = 1
        return PairBatch(sequences, attention, attention[:, width:].clone(), width,
                         torch.tensor([r[3] for r in rows]), torch.tensor([r[4] for r in rows]))


def describe_pairs(pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """How many pairs, and the share whose chosen response is labelled safe while the rejected one is not."""
    n = max(1, len(pairs))
    return {"pairs": float(len(pairs)),
            "safe_over_unsafe": sum(p.chosen_safe and not p.rejected_safe for p in pairs) / n,
            "unsafe_over_safe": sum(p.rejected_safe and not p.chosen_safe for p in pairs) / n}
