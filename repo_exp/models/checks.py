"""Checks of the model folders a run is given, made as they are loaded: what transformers or a tensor shape would
otherwise report deep inside the first step, or not at all (a missing weight is silently initialised at random)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_score_model(model, tokenizer, path: Any, role: str) -> None:
    """A reward or cost model gives one score per response, and has an embedding for every id its tokenizer makes."""
    if model.score_dim != 1:
        raise ValueError(f"{role}.path={path}: config.json score_dim is {model.score_dim}, but a {role} model gives "
                         f"one score per response (score_dim 1); a score model of several dimensions is not a "
                         f"{role} model")
    if tokenizer is None:  # nothing to compare with (a scorer loaded without its tokenizer)
        return
    weight = model.model.get_input_embeddings().weight
    vocab = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partitioned weight keeps its shape there
    if vocab < len(tokenizer):
        raise ValueError(f"{role}.path={path}: the model has {vocab} token embeddings (config.json vocab_size "
                         f"{getattr(model.config, 'vocab_size', '?')}) but its tokenizer has {len(tokenizer)} tokens: "
                         f"they do not belong together (ids >= {vocab} have no embedding)")


def check_all_weights_loaded(loading_info: dict[str, list], path: Any, role: str = "model") -> None:
    """Refuse a folder that lacks some of the model's weights: ``from_pretrained`` would initialise them at random
    and the run would train on noise without a word."""
    missing = sorted(loading_info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{role}.path={path}: the weights lack {len(missing)} of the model's tensors "
                         f"({', '.join(missing[:5])}{', …' if len(missing) > 5 else ''}); transformers would "
                         f"initialise them at random. Give a complete checkpoint")


def check_context_length(model_config, role: str, path: Any, max_prompt_length: int, max_new_tokens: int) -> None:
    """trainer.max_prompt_length + trainer.max_new_tokens must fit the model's positions (the reward and cost models
    read the same prompt and response)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    needed = max_prompt_length + max_new_tokens
    if positions is not None and needed > positions:
        what = {"model": "policy"}.get(role, role)
        raise ValueError(f"trainer.max_prompt_length + trainer.max_new_tokens ({max_prompt_length} + "
                         f"{max_new_tokens} = {needed}) exceeds max_position_embeddings ({positions}) of the {what} "
                         f"model at {role}.path={path}; shorten them or use a model with a longer context")


def check_local_path(key: str, path: Any) -> None:
    """A path written as a local one (absolute, starting with ``.`` or ``~``, or with more than one ``/``, which no
    hub id has) must exist: otherwise the hub is asked for a repository of that name, and its error never says that
    the folder is missing."""
    from repo_exp.config import ConfigError

    if path is None:
        return
    text = str(path)
    local = text.startswith(("/", ".", "~")) or text.count("/") > 1
    if local and not Path(text).expanduser().exists():
        raise ConfigError(f"{key}={text}: no such file or folder (a local path; a hub id looks like org/name)")
