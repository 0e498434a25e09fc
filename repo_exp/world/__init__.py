"""The synthetic safety world: prompts in risk families, a response grammar, an oracle, and the published pipeline
(SFT → preference data → reward and cost models → RL) at a size that runs on two CPU cores."""

from functools import lru_cache

from repo_exp.world.grammar import (FAMILIES, Prompt, all_prompts, corpus, sample_response, split_prompts,
                                    unseen_topics, world_split)
from repo_exp.world.oracle import is_refusal, oracle_cost, oracle_reward, parse


@lru_cache(maxsize=1)
def world_tokenizer():
    """The word-level tokenizer trained on the world's own corpus (deterministic)."""
    from repo_exp.models.tokenizers import build_word_tokenizer

    return build_word_tokenizer(corpus())


__all__ = [
    "FAMILIES",
    "Prompt",
    "all_prompts",
    "corpus",
    "sample_response",
    "split_prompts",
    "unseen_topics",
    "world_split",
    "is_refusal",
    "oracle_cost",
    "oracle_reward",
    "parse",
    "world_tokenizer",
]
