"""Models: the policy, the published score-model layout, critics and tokenizers."""

from repo_exp.models.score_model import ScoreModel, load_score_model, position_ids_from_mask
from repo_exp.models.tokenizers import build_word_tokenizer, load_tokenizer, same_tokenizer

__all__ = [
    "ScoreModel",
    "load_score_model",
    "position_ids_from_mask",
    "build_word_tokenizer",
    "load_tokenizer",
    "same_tokenizer",
]
