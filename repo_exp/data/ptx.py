"""Supervised text for the PTX loss (SPEC §2: an optional pre-training loss mixed into the actor's with
``ppo.ptx_coeff``, as the published Safe RLHF run does with coefficient 16 on its SFT data).

Each example is ``template(prompt) + " " + response + EOS``; the loss counts the response tokens only, as in SFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from repo_exp.config import PtxConfig, WorldConfig
from repo_exp.models.score_model import right_pad
from repo_exp.models.tokenizers import encode_example


@dataclass
class PtxBatch:
    input_ids: torch.Tensor  # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    loss_mask: torch.Tensor  # (B, L) 1 on the response tokens (and EOS) to learn


def load_ptx_pairs(ptx: PtxConfig, world: WorldConfig | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs of the PTX source."""
    if ptx.source == "world":
        import random

        from repo_exp.world.pipeline import sft_examples

        return [(p.text, r) for p, r in sft_examples(world, random.Random(world.sft.seed))]
    import datasets

    from repo_exp.data.files import require_texts

    if ptx.source == "file":
        from pathlib import Path

        from repo_exp.data.files import load_local_file

        ds = load_local_file(Path(ptx.path), "ptx.path")
    else:
        from repo_exp.revisions import check_loaded, check_offline_cache, dataset_commit

        check_offline_cache(ptx.path, ptx.revision, "dataset")
        ds = datasets.load_dataset(ptx.path, revision=ptx.revision, split=ptx.split)
        check_loaded("PTX dataset", ptx.path, ptx.revision, dataset_commit(ds))
    columns = [ptx.prompt_column, ptx.response_column] + ([ptx.input_column] if ptx.input_column else [])
    for column in columns:
        if column not in ds.column_names:
            raise ValueError(f"the PTX data {ptx.path!r} has no column {column!r} (columns: {ds.column_names})")
    where = f"the PTX data {ptx.path}"
    prompts = require_texts(ds[ptx.prompt_column], ptx.prompt_column, where)
    responses = require_texts(ds[ptx.response_column], ptx.response_column, where)
    inputs = ds[ptx.input_column] if ptx.input_column else [None] * len(prompts)
    pairs = [(join_input(p, i), r) for p, i, r in zip(prompts, inputs, responses)]
    if not pairs:
        raise ValueError(f"the PTX data {ptx.path!r} is empty")
    return pairs


def join_input(instruction: str, extra: str | None) -> str:
    """An instruction with its optional input, joined by one space as the published Safe RLHF Alpaca data does."""
    return f"{instruction} {extra}" if extra else instruction


class PtxStream:
    """Batches of PTX examples in a seeded order, a new permutation each pass; ``state_dict`` is the position.

    Over data-parallel ranks the order is one for the whole group (every rank has the same seed): ``next(n)`` takes
    ``n × world_size`` examples from it and keeps this rank's ``n``, so that the ranks together train on the rows one
    process would, whatever their number."""

    def __init__(self, pairs: list[tuple[str, str]], tokenizer, template: str, max_length: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.examples = [encode_example(tokenizer, template, prompt, response, max_length)
                         for prompt, response in pairs]
        self.pad_id = tokenizer.pad_token_id
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.position = 0
        self._cached_order: tuple[tuple[int, int], list[int]] | None = None  # ((seed, epoch), its permutation)

    def _order(self) -> list[int]:
        """This epoch's permutation, drawn once per epoch (``next`` runs once per PPO micro-batch)."""
        key = (self.seed, self.epoch)
        if self._cached_order is None or self._cached_order[0] != key:
            g = torch.Generator().manual_seed(self.seed * 7_927 + self.epoch)
            self._cached_order = key, torch.randperm(len(self.examples), generator=g).tolist()
        return self._cached_order[1]

    def next(self, n: int) -> PtxBatch:
        """This rank's ``n`` examples of the group's next ``n × world_size``."""
        rows = []
        while len(rows) < n * self.world_size:
            order = self._order()
            take = order[self.position : self.position + n * self.world_size - len(rows)]
            rows += [self.examples[i] for i in take]
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        rows = rows[self.rank * n : (self.rank + 1) * n]
        input_ids, attention = right_pad([ids for ids, _ in rows], self.pad_id)
        prompt_lens = torch.tensor([prompt_len for _, prompt_len in rows])
        # the response tokens (and EOS): attended positions at or after the prompt's end
        loss_mask = attention * (torch.arange(attention.shape[1]) >= prompt_lens.unsqueeze(-1))
        return PtxBatch(input_ids, attention, loss_mask)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._cached_order = None
