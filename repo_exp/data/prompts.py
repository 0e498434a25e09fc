"""Prompt sets for RL and evaluation, and the deterministic stream that batches them.

Sources (``data.source``):
- ``world``: the synthetic world's train or held-out prompts, with their ground truth attached;
- ``file``: a local CSV, JSON/JSONL or parquet file with a named text column (``data.prompt_column``);
- ``pku_saferlhf``: PKU-SafeRLHF through ``datasets`` (a hub id at a pinned revision, or local files in its schema),
  de-duplicated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repo_exp.config import DataConfig, WorldConfig
from repo_exp.data.files import FILE_BUILDERS, load_local_file, require_texts
from repo_exp.models.tokenizers import encode_prompt

log = logging.getLogger(__name__)

# a prompt set whose words the policy's tokenizer mostly does not know is refused: above this share of unknown tokens
# the policy reads <unk> where the prompt had words (a set the tokenizer covers has none; names and rare words in a
# covering vocabulary stay far below it)
MAX_UNKNOWN_SHARE = 0.05


@dataclass
class PromptSet:
    """Raw user inputs and, per prompt, whatever ground truth the source has (the world's family, severity)."""

    texts: list[str]
    meta: list[dict[str, Any]] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, n: int | None) -> "PromptSet":
        if n is None or n >= len(self.texts):
            return self
        return PromptSet(self.texts[:n], self.meta[:n], self.name)


def _dedupe(texts: list[str], meta: list[dict]) -> tuple[list[str], list[dict]]:
    seen: set[str] = set()
    out_t, out_m = [], []
    for t, m in zip(texts, meta):
        if t not in seen:
            seen.add(t)
            out_t.append(t)
            out_m.append(m)
    return out_t, out_m


def _from_dataset(ds, column: str, origin: str) -> tuple[list[str], list[dict]]:
    if column not in ds.column_names:
        raise ValueError(f"{origin} has no column {column!r} (columns: {ds.column_names}); "
                         f"set data.prompt_column to the column that holds the prompts")
    texts = require_texts(ds[column], column, origin)  # a null, a number or bytes is no prompt: never str() them
    return texts, [{} for _ in texts]


def load_prompt_set(data: DataConfig, split: str, world: WorldConfig | None = None) -> PromptSet:
    """The prompts of ``data`` for ``split`` (train or the eval split)."""
    if data.source == "world":
        from repo_exp.world.grammar import world_split

        if world is None:
            raise ValueError("data.source=world needs the world config")
        train, held_out = world_split(world)
        prompts = train if split == data.split else held_out
        texts = [p.text for p in prompts]
        meta = [{"family": p.family, "severity": p.severity, "topic": p.topic, "unseen_topic": p.unseen}
                for p in prompts]
    elif data.source == "file":
        path = Path(data.path)
        if not path.exists():
            raise FileNotFoundError(f"data.path {data.path!r} does not exist")
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"data.path {data.path!r}: unknown file type {path.suffix!r}; use one of "
                             f"{sorted(FILE_BUILDERS)}")
        if path.stat().st_size == 0:
            raise ValueError(f"data.path {data.path!r} is an empty file: it holds no prompts")
        ds = load_local_file(path)
        texts, meta = _from_dataset(ds, data.prompt_column, data.path)
    elif data.source == "pku_saferlhf":
        from repo_exp.data.pku import load_pku_split

        ds = load_pku_split(data, split, columns=(data.prompt_column,))
        texts, meta = _from_dataset(ds, data.prompt_column, f"{data.path} ({split})")
    else:  # validated by the schema
        raise ValueError(f"unknown data.source {data.source!r}")
    if data.deduplicate:
        texts, meta = _dedupe(texts, meta)
    if not texts:
        raise ValueError(f"the prompt set {data.name} ({data.source}, split {split!r}) is empty")
    where = f" ({data.path})" if data.source == "file" else ""
    return PromptSet(texts, meta, name=f"{data.name}:{split}{where}").take(data.max_prompts)


@dataclass
class PromptBatch:
    """One step's prompts on this rank, each repeated k times (contiguously)."""

    input_ids: torch.Tensor  # (B, P) left-padded
    attention_mask: torch.Tensor  # (B, P)
    prompt_index: torch.Tensor  # (B,) position of the prompt in the step's global batch
    texts: list[str]  # raw user inputs, one per sample
    dataset_index: list[int]  # index of each sample's prompt in the prompt set


def unknown_tokens(tokenizer, texts: list[str]) -> tuple[int, int]:
    """(unknown, all) tokens of ``texts`` under ``tokenizer`` (the texts alone, without template or special tokens);
    (0, 0) for a tokenizer that has no unknown token (a byte-level one covers every text)."""
    unk = tokenizer.unk_token_id
    if unk is None or not texts:
        return 0, 0
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return sum(row.count(unk) for row in ids), sum(len(row) for row in ids)


def check_vocabulary(prompts: PromptSet, tokenizer, tokenizer_name: str = "") -> None:
    """Refuse a prompt set that tokenizes to more than ``MAX_UNKNOWN_SHARE`` unknown tokens, naming the set and the
    tokenizer (a world-sized vocabulary given real-world prompts, say)."""
    unknown, total = unknown_tokens(tokenizer, prompts.texts)
    if total and unknown / total > MAX_UNKNOWN_SHARE:
        name = tokenizer_name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"the prompt set {prompts.name or '(unnamed)'} is {unknown / total:.0%} unknown tokens under the tokenizer "
            f"{name} ({len(tokenizer)} tokens): {unknown} of its {total} tokens are {tokenizer.unk_token}, so the "
            f"policy would not read these prompts (the limit is {MAX_UNKNOWN_SHARE:.0%}). Evaluate them with a "
            f"policy whose tokenizer covers them (model=..., or model.tokenizer=...), or choose another prompt set")


class PromptEncoder:
    """Applies the template and tokenizes once; drops prompts longer than ``max_length`` with a warning; refuses a
    set the tokenizer mostly does not know (``check_vocabulary``)."""

    def __init__(self, prompts: PromptSet, tokenizer, template: str, max_length: int,
                 tokenizer_name: str = "") -> None:
        check_vocabulary(prompts, tokenizer, tokenizer_name)
        encoded, kept = [], []
        for i, text in enumerate(prompts.texts):
            ids = encode_prompt(tokenizer, template, text)
            if len(ids) <= max_length:
                encoded.append(ids)
                kept.append(i)
        dropped = len(prompts) - len(kept)
        if dropped:
            log.warning("%d of %d prompts of %s are longer than trainer.max_prompt_length=%d tokens and were dropped",
                        dropped, len(prompts), prompts.name, max_length)
        if not kept:
            raise ValueError(f"every prompt of {prompts.name} is longer than trainer.max_prompt_length={max_length} "
                             f"tokens after the template; raise the limit")
        self.prompts = PromptSet([prompts.texts[i] for i in kept],
                                 [prompts.meta[i] for i in kept] if prompts.meta else [{} for _ in kept], prompts.name)
        self.ids = encoded
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], repeats: int, prompt_offset: int = 0) -> PromptBatch:
        """Left-padded batch of ``indices``, each repeated ``repeats`` times."""
        rows = [i for i in indices for _ in range(repeats)]
        width = max(len(self.ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = self.ids[i]
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            mask[r, width - len(ids):] = 1
        prompt_index = torch.tensor([prompt_offset + j for j in range(len(indices)) for _ in range(repeats)])
        return PromptBatch(input_ids, mask, prompt_index, [self.prompts.texts[i] for i in rows], rows)


class PromptStream:
    """Global batches of prompt indices in a seeded order, a new permutation each epoch.

    Every rank computes the same global order and takes its own contiguous share, so the data order does not depend
    on the number of ranks; ``state_dict`` is the position, so a resumed run sees the same prompts.
    """

    def __init__(self, n_prompts: int, prompts_per_step: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if prompts_per_step % world_size:
            raise ValueError(f"trainer.prompts_per_step ({prompts_per_step}) must be divisible by the number of "
                             f"ranks ({world_size})")
        self.n = n_prompts
        self.per_step = prompts_per_step
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_global(self) -> list[int]:
        """The next ``prompts_per_step`` prompt indices (wrapping into a new epoch when needed)."""
        out: list[int] = []
        while len(out) < self.per_step:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.per_step - len(out)]
            out += take
            self.position += len(take)
            if self.position >= self.n:
                self.epoch += 1
                self.position = 0
        return out

    def next_local(self) -> tuple[list[int], int]:
        """This rank's prompt indices and the offset of its first prompt within the global batch."""
        global_batch = self.next_global()
        share = self.per_step // self.world_size
        start = self.rank * share
        return global_batch[start : start + share], start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
