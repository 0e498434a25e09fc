"""Any causal LM either runs correctly or is refused by name: dropout off during RL, the Llama fast decoder only for
modules it reproduces exactly, recurrent models refused, and the kept log-probabilities of several architectures
equal to a plain forward pass. Tiny random models built from transformers configs (no download)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from repo_exp.config import ModelConfig
from repo_exp.models.policy import load_policy
from repo_exp.models.tokenizers import build_word_tokenizer
from repo_exp.rollout.generate import LlamaDecoder
from repo_exp.rollout.score import sequence_logprobs
from repo_exp.train import Trainer
from test_generate import EOS, PAD, left_padded_prompts, sample

VOCAB = 24
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2)


def tokenizer():
    return build_word_tokenizer(["a b c d e f g h i j k l m n o p q r s t"])  # 4 specials + 20 words = 24 ids


def saved(tmp_path, model) -> str:
    folder = tmp_path / type(model).__name__
    model.save_pretrained(folder)
    return str(folder)


def hub_policy(path: str):
    return load_policy(ModelConfig(name="t", source="hub", path=path, attn_implementation="eager"), tokenizer())


def first_ratio(model) -> torch.Tensor:
    """exp(logπ − logπ_old) of the first update: sampled in eval mode, the update's forward pass in train mode."""
    ids, mask = left_padded_prompts()
    model.eval()
    gen = sample(model, ids, mask, fast=True)
    model.train()
    with torch.no_grad():
        fresh = sequence_logprobs(model, gen.sequences, gen.attention_mask, ids.shape[1])
    return torch.exp(fresh - gen.logprobs)[gen.response_mask.bool()]


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, eos_token_id=EOS,
                        pad_token_id=PAD, bos_token_id=2)  # GPT-2's default dropouts: 0.1 everywhere
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


def test_gpt2_with_its_default_dropout_starts_at_ratio_one(tmp_path):
    assert (first_ratio(gpt2()) - 1).abs().max() > 1e-2  # as built, dropout moves the first ratio
    policy = hub_policy(saved(tmp_path, gpt2()))
    assert policy.config.resid_pdrop == 0.0 and policy.config.attn_pdrop == 0.0
    ratio = first_ratio(policy)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


def test_a_recurrent_model_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1,
                                         eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2))
    with pytest.raises(ValueError, match="MambaForCausalLM keeps a recurrent state"):
        hub_policy(saved(tmp_path, mamba))


class Adapter(nn.Module):
    """A LoRA-style wrapper: the base projection plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.up.weight, std=0.5)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def llama(**extra) -> LlamaForCausalLM:
    config = LlamaConfig(**{**SHAPE, "num_key_value_heads": 2, **extra})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def kept_vs_forward(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = left_padded_prompts()
    gen = sample(model, ids, mask, fast=True)
    with torch.no_grad():
        full = sequence_logprobs(model, gen.sequences, gen.attention_mask, ids.shape[1]) * gen.response_mask
    return gen.logprobs, full


def test_a_llama_with_wrapped_projections_or_hooks_decodes_through_its_own_forward():
    wrapped = llama()
    for layer in wrapped.model.layers:
        layer.self_attn.q_proj = Adapter(layer.self_attn.q_proj)
    assert not LlamaDecoder.supports(wrapped)
    kept, full = kept_vs_forward(wrapped)
    torch.testing.assert_close(kept, full, atol=1e-4, rtol=0)

    hooked = llama()
    hooked.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 2)
    assert not LlamaDecoder.supports(hooked)
    kept, full = kept_vs_forward(hooked)
    torch.testing.assert_close(kept, full, atol=1e-4, rtol=0)


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _variants():
    def build(cls, config_cls, **extra):
        def make():
            config = config_cls(**{**SHAPE, **extra})
            config._attn_implementation = "sdpa"
            torch.manual_seed(0)
            return cls(config).eval()
        return make

    return {
        "qwen2": build(Qwen2ForCausalLM, Qwen2Config, num_key_value_heads=2),
        "mistral": build(MistralForCausalLM, MistralConfig, num_key_value_heads=2, sliding_window=None),
        "gpt_neox": build(GPTNeoXForCausalLM, GPTNeoXConfig),
        "llama_gqa": lambda: llama(num_key_value_heads=1),
        "llama3_rope": lambda: llama(rope_parameters=LLAMA3_ROPE),
        "llama_tied": lambda: llama(tie_word_embeddings=True),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_kept_logprobs_equal_a_plain_forward_pass(name):
    model = _variants()[name]()
    if name.startswith("llama"):
        assert LlamaDecoder.supports(model)  # the fast decoder is the path under test
    kept, full = kept_vs_forward(model)
    assert kept.abs().sum() > 0
    torch.testing.assert_close(kept, full, atol=1e-4, rtol=0)


def _trainer_stub(tolerance=None, mixed_precision="no"):
    config = SimpleNamespace(trainer=SimpleNamespace(mixed_precision=mixed_precision, logprob_tolerance=tolerance),
                             model=SimpleNamespace(dtype="float32"), deepspeed=SimpleNamespace(enabled=False))
    comm = SimpleNamespace(all_finished=lambda flag: flag)
    policy = SimpleNamespace(module=GPT2LMHeadModel.__new__(GPT2LMHeadModel))
    return SimpleNamespace(config=config, rt=SimpleNamespace(comm=comm), models=SimpleNamespace(policy=policy),
                           logprobs_checked=False)


def test_a_gap_between_kept_and_recomputed_logprobs_stops_the_run_naming_model_and_gap():
    kept = torch.tensor([[-1.0, -2.0, -3.0]])
    micro = SimpleNamespace(logprobs=kept, response_mask=torch.tensor([[1, 1, 0]]))
    stub = _trainer_stub()
    Trainer._check_logprobs(stub, kept + 5e-5, micro)  # within float32's 1e-4
    assert stub.logprobs_checked
    with pytest.raises(RuntimeError, match=r"GPT2LMHeadModel .*mean \|gap\| 0.03 nats per token, max 0.05"):
        Trainer._check_logprobs(_trainer_stub(), kept + torch.tensor([[0.01, 0.05, 9.0]]), micro)
    # bf16 forward passes get the looser default
    Trainer._check_logprobs(_trainer_stub(mixed_precision="bf16"), kept + 0.05, micro)


def test_a_hybrid_whose_cache_is_not_a_key_value_cache_is_refused_by_name(tmp_path):
    """Lfm2 keeps short convolutions beside its attention layers: its cache holds a convolution state in those
    layers, which the sampler's plain key/value cache cannot (it would fail with a bare IndexError mid-sampling)."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from repo_exp.models.policy import state_layer_types

    config = Lfm2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, full_attn_idxs=[1],
                        eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2)
    torch.manual_seed(0)
    folder = saved(tmp_path, Lfm2ForCausalLM(config))
    with pytest.raises(ValueError, match=r"Lfm2ForCausalLM is a hybrid whose cache is not a plain key/value cache: "
                                         r"its layers of type conv keep a convolution or recurrent state"):
        hub_policy(folder)
    # every attention-only architecture this project supports keeps passing
    for plain in (LlamaConfig(), MistralConfig(), Qwen2Config(), GPT2Config(), GPTNeoXConfig()):
        assert state_layer_types(plain) == []
