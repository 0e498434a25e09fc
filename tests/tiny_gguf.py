"""A tiny Llama written as a GGUF file with the ``gguf`` package (as llama.cpp's converter lays it out): a byte-level
BPE tokenizer of a few letters with ChatML special tokens (pad = EOS = ``<|im_end|>``, as SmolLM2's), a chat template,
float32 tensors and one tensor per layer quantised to Q8_0."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\nbe "
                 "brief<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                 "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ċ", "."]
TOKENS = SPECIALS + LETTERS + ["Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def write_tiny_gguf(path: Path, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 64,
                    context: int = 512, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the file; returns the float32 arrays written (before quantisation) by GGUF tensor name."""
    import gguf
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(TOKENS) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    written: dict[str, np.ndarray] = {}

    def tensor(name: str, shape: tuple[int, ...], q8: bool = False) -> None:
        array = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        written[name] = array
        if q8:
            quantized = quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array)

    head = hidden // heads
    tensor("token_embd.weight", (len(TOKENS), hidden))
    for i in range(layers):
        tensor(f"blk.{i}.attn_q.weight", (heads * head, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * head, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * head, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, heads * head))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden), q8=True)
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    tensor("output.weight", (len(TOKENS), hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written
