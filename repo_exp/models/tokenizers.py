"""Tokenizers: the hub's (loaded offline-safe) and small word-level ones built from a local corpus.

Attention masks are always built from lengths, never as ``ids != pad_token_id``: the published Llama tokenizers
have their own ``<pad>`` (id 32000), but others pad with EOS, and a mask built from the pad id would hide the EOS.
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def build_word_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word and punctuation mark of ``corpus`` (deterministic order).

    Special tokens come first: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3.
    """
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words: set[str] = set()
    for text in corpus:
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for word in sorted(words):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.padding_side = "left"
    return tokenizer


def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a hub id or a folder and check it can pad."""
    from repo_exp.revisions import check_offline_cache

    check_offline_cache(path, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # a tokenizer file that is not JSON (a pickle, say)
        raise ValueError(f"cannot read the tokenizer at {path!r}: one of its files is not UTF-8 JSON ({exc})") from exc
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"the tokenizer at {path!r} has no pad token; give it one (e.g. tokenizer.add_special_tokens({{'pad_token': "
            f"'<pad>'}}) and resize the model's embeddings) before training. repo_exp builds masks from lengths, so "
            f"any id that is not a real token works."
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer at {path!r} has no EOS token: responses could never end")
    tokenizer.padding_side = "left"
    return tokenizer


def tokenizer_name(cfg) -> str:
    """The policy's tokenizer as its config names it (``cfg``: the ``model`` node), for messages."""
    if cfg.tokenizer == "world":
        return "model.tokenizer=world (the synthetic world's word-level tokenizer)"
    if cfg.tokenizer:
        return f"model.tokenizer={cfg.tokenizer}"
    return f"of model.path={cfg.path}" if cfg.path else f"of model={cfg.name}"


CHAT = "chat"  # a template value: render prompts with the tokenizer's own chat template


def render_prompt(tokenizer: PreTrainedTokenizerBase, template: str, text: str) -> str:
    """The prompt text the model reads: ``template`` filled with ``text``, or, for ``template="chat"``, one user turn
    through the tokenizer's own chat template with the assistant's turn opened (system turn and all, as the model
    was tuned with)."""
    if template != CHAT:
        return template.format(input=text)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"template=chat but the tokenizer {tokenizer.name_or_path!r} has no chat template; give a "
                         f"literal template with {{input}} instead")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, template: str, text: str) -> list[int]:
    """The prompt's token ids. A chat template writes its special tokens (a BOS included) into the text itself, so
    the tokenizer adds none then; a literal template gets the tokenizer's own (e.g. Llama's BOS)."""
    return tokenizer(render_prompt(tokenizer, template, text), add_special_tokens=template != CHAT)["input_ids"]


def response_separator(template: str) -> str:
    """What joins a prompt and its response: a space after a literal template (``… ASSISTANT: response``, as the
    published Safe RLHF data), nothing after a chat template (its assistant turn ends in a newline)."""
    return "" if template == CHAT else " "


def encode_example(tokenizer: PreTrainedTokenizerBase, template: str, prompt: str, response: str,
                   max_length: int | None = None) -> tuple[list[int], int]:
    """A supervised example as the policy reads and writes it: the prompt's ids (``encode_prompt``: for ``chat``, what
    ``apply_chat_template(..., add_generation_prompt=True)`` gives), the response's own tokens after them and EOS,
    the whole cut to ``max_length``. Returns (ids, prompt length); SFT and PTX learn the ids after the prompt."""
    prompt_ids = encode_prompt(tokenizer, template, prompt)
    response_ids = tokenizer(response_separator(template) + response.strip(), add_special_tokens=False)["input_ids"]
    ids = prompt_ids + response_ids
    if max_length is not None:
        ids = ids[: max_length - 1]
    ids = ids + [tokenizer.eos_token_id]
    return ids, min(len(prompt_ids), len(ids) - 1)


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """True when ``a`` and ``b`` have the same vocabulary, EOS and encode a probe text alike, special tokens
    included: a tokenizer that prepends BOS does not read the other's token sequences as its own."""
    if a is b:
        return True
    probe = "BEGINNING OF CONVERSATION: USER: Hello, world! 42 ASSISTANT: ok."
    return (
        a.get_vocab() == b.get_vocab()
        and a.eos_token_id == b.eos_token_id
        and a(probe)["input_ids"] == b(probe)["input_ids"]
    )
