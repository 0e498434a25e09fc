"""Tiny checkpoints and tokenizers in the layouts of the published Safe RLHF artifacts (SPEC §5), written by hand so
that the loaders are tested against the layout itself, not against what ``repo_exp`` happens to save."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

PAD_ID = 32000  # the published Llama tokenizers add their own <pad> after the 32000 pieces
VOCAB_SIZE = 32001
WORDS = ("BEGINNING OF CONVERSATION : USER ASSISTANT how do i bake bread make a bomb sure here is the recipe "
         "sorry cannot help with that water flour yeast salt knead it then wait").split()


def published_tokenizer(words=WORDS, pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    """Llama's special-token layout: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, a BOS prepended to every text, and
    ``<pad>`` at 32000 (vocab 32001). With ``pad_is_eos`` it pads with ``</s>`` instead, as Llama-3-style ones do."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in sorted(set(words)):
        vocab.setdefault(word, len(vocab))
    while len(vocab) < PAD_ID:
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    vocab["<pad>"] = PAD_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="</s>" if pad_is_eos else "<pad>")
    tokenizer.padding_side = "left"
    return tokenizer


def trunk_config(hidden_size: int = 32, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)


def _shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    keys = sorted(state)
    return [{k: state[k] for k in keys[i::n]} for i in range(n)]


def write_score_checkpoint(folder: Path, layout: str, score_type: str = "cost", seed: int = 0,
                           with_head: bool = True) -> dict:
    """A score model in the published layout, sharded with an index.

    ``layout="old"``: ``pytorch_model-0000k-of-00002.bin`` + ``pytorch_model.bin.index.json``, architectures
    ``LlamaModelForScore``, ``bias: false``, no normalisation (beaver-7b-v1.0). ``layout="new"``:
    ``model-0000k-of-00002.safetensors`` + ``model.safetensors.index.json``, ``LlamaForScore``, ``score_bias: true``,
    ``do_normalize: true`` with ``normalizer.mean/var/count`` buffers (config.json's own mean/var differ: the buffers
    win, as in the published loader). Returns what an independent computation needs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    config = trunk_config()
    torch.manual_seed(seed)
    trunk = LlamaModel(config).eval()
    hidden = config.hidden_size
    head_weight = torch.randn(1, hidden) / hidden**0.5
    head_bias = torch.tensor([0.7]) if layout == "new" else None
    state = {f"model.{k}": v.clone() for k, v in trunk.state_dict().items()}
    if with_head:
        state["score_head.weight"] = head_weight
        if head_bias is not None:
            state["score_head.bias"] = head_bias
    raw = config.to_dict()
    raw.update({"score_dim": 1, "score_type": score_type, "torch_dtype": "float32"})
    mean, var = None, None
    if layout == "old":
        raw.update({"architectures": ["LlamaModelForScore"], "bias": False, "do_normalize": False,
                    "normalizer_type": "ExponentialMovingAverage", "momentum": 0.9, "mean": [0.3], "var": [4.0]})
        shards = _shards(state, 2)
        names = [f"pytorch_model-{i + 1:05d}-of-00002.bin" for i in range(2)]
        for name, shard in zip(names, shards):
            torch.save(shard, folder / name)
        index = "pytorch_model.bin.index.json"
    elif layout == "new":
        mean, var = torch.tensor([0.5]), torch.tensor([2.25])
        state.update({"normalizer.mean": mean, "normalizer.var": var, "normalizer.count": torch.tensor([100])})
        raw.update({"architectures": ["LlamaForScore"], "score_bias": True, "do_normalize": True,
                    "normalizer_type": "RunningMeanStd", "mean": [9.0], "var": [100.0]})
        shards = _shards(state, 2)
        names = [f"model-{i + 1:05d}-of-00002.safetensors" for i in range(2)]
        for name, shard in zip(names, shards):
            save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name))
        index = "model.safetensors.index.json"
    else:
        raise ValueError(layout)
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    (folder / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(raw))
    return {"config": config, "trunk": trunk, "head_weight": head_weight, "head_bias": head_bias,
            "mean": mean, "var": var, "score_type": score_type, "do_normalize": layout == "new"}


@torch.no_grad()
def reference_end_scores(ref: dict, rows: list[list[int]]) -> torch.Tensor:
    """Each row run alone, unpadded, through a plain ``LlamaModel``; the head applied by hand to the last hidden
    state; the published normalisation (reward: ``(s − mean)/(std + 1e-8)``, cost: ``s/(std + 1e-8)``). (B,)"""
    out = []
    for ids in rows:
        last = ref["trunk"](input_ids=torch.tensor([ids])).last_hidden_state[0, -1]  # (H,)
        score = float(last @ ref["head_weight"][0])
        if ref["head_bias"] is not None:
            score += float(ref["head_bias"][0])
        if ref["do_normalize"]:
            std = float(ref["var"][0]) ** 0.5
            score = (score - float(ref["mean"][0])) / (std + 1e-8) if ref["score_type"] == "reward" \
                else score / (std + 1e-8)
        out.append(score)
    return torch.tensor(out)


def pad_rows(rows: list[list[int]], side: str, pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and a mask built from the row lengths, padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.tensor(row)
        mask[i, cols] = 1
    return ids, mask
