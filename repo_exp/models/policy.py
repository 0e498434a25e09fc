"""Building and loading the policy, the frozen reference, the reward and cost models and the critics."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from repo_exp.config import ArchConfig, ModelConfig, ScoreModelConfig
from repo_exp.models.adapters import adapter_base, is_adapter_folder, load_adapter
from repo_exp.models.score_model import ScoreModel, load_score_model
from repo_exp.models.checks import check_all_weights_loaded, check_score_model
from repo_exp.models.weights import check_weight_files, unsafe_pickle_error
from repo_exp.revisions import check_loaded, check_offline_cache

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dropout probabilities by name: `attention_dropout` (Llama, Qwen2, GPT-NeoX), `resid_pdrop` (GPT-2), …
DROPOUT_NAME = re.compile(r"dropout|pdrop|drop_rate|drop_prob", re.IGNORECASE)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout probability of ``model`` set to 0: its ``nn.Dropout`` modules, the float probabilities its
    attention modules keep, and its config's (TRL's trainers do the same).

    RL needs it: the kept log-probabilities come from sampling in eval mode, the update's forward pass runs in train
    mode (for gradient checkpointing), and with dropout on the two differ before any update (GPT-2's default 0.1 gives
    a first PPO ratio of ~1.05 and clips a quarter of the tokens)."""
    configs = [getattr(model, "config", None)]
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and DROPOUT_NAME.search(name):
                setattr(module, name, 0.0)
        configs.append(getattr(module, "config", None))
    for config in {id(c): c for c in configs if c is not None}.values():
        for name, value in list(vars(config).items()):
            if isinstance(value, float) and DROPOUT_NAME.search(name):
                setattr(config, name, 0.0)
    return model


def state_layer_types(config) -> list[str]:
    """The layer types of ``config`` whose cache is a convolution or recurrent state rather than keys and values
    (transformers' ``conv``, ``linear_attention``, ``hybrid`` …), in order of first appearance; [] for a model whose
    every layer attends."""
    from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, LinearAttentionCacheLayerMixin,
                                          get_layer_types_and_kwargs)

    try:
        layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except (AttributeError, TypeError, ValueError):  # a config transformers cannot read layer types from
        return []
    stateful = [t for t in layer_types if isinstance(DYNAMIC_LAYER_TYPE_MAPPING.get(t), type)
                and issubclass(DYNAMIC_LAYER_TYPE_MAPPING[t], LinearAttentionCacheLayerMixin)]
    return list(dict.fromkeys(stateful))


def check_causal_lm(model: nn.Module) -> nn.Module:
    """Refuse a causal LM the rollout cannot sample from correctly, naming it: recurrent-state models (RWKV, Mamba)
    keep no key/value cache, and hybrids (Lfm2's short convolutions, linear attention beside attention) keep a state
    in some layers; the sampler's incremental decoding with a plain key/value cache and its kept log-probabilities
    assume keys and values in every layer."""
    name = type(model).__name__
    if getattr(model, "_is_stateful", False):
        raise ValueError(f"{name} keeps a recurrent state instead of a key/value cache; repo_exp samples with a "
                         f"key/value cache and keeps the log-probabilities of sampling, so it does not support {name}. "
                         f"Use a transformer causal LM (Llama, Qwen2, Mistral, GPT-NeoX, GPT-2, …)")
    stateful = state_layer_types(model.config)
    if stateful:
        raise ValueError(f"{name} is a hybrid whose cache is not a plain key/value cache: its layers of type "
                         f"{', '.join(stateful)} keep a convolution or recurrent state beside the attention layers; "
                         f"repo_exp samples with a key/value cache, so it does not support {name}. Use a transformer "
                         f"causal LM (Llama, Qwen2, Mistral, GPT-NeoX, GPT-2, …)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model; repo_exp trains decoder-only causal LMs")
    return model


def tiny_llama_config(arch: ArchConfig, tokenizer, attn_implementation: str = "sdpa") -> LlamaConfig:
    """A Llama config of the given shape over ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def load_policy(cfg: ModelConfig, tokenizer, path: str | None = None) -> PreTrainedModel:
    """The policy as a causal LM: random for ``source=tiny``, else from ``path`` (a folder or hub id)."""
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "tiny":
        config = tiny_llama_config(cfg.arch, tokenizer, cfg.attn_implementation)
        model = _seeded(cfg.seed, lambda: LlamaForCausalLM(config)).to(dtype)
        return _partition_under_zero3(model)
    path = path or cfg.path
    if is_adapter_folder(path):  # a PEFT adapter: its base, then the adapters on it (they go on training)
        base = load_policy(dataclasses.replace(cfg, source="hub", revision=None), tokenizer, adapter_base(path))
        return disable_dropout(load_adapter(base, path))  # its own lora_dropout too: RL updates what it sampled
    # a converted GGUF folder is local: its pin (the package version) was checked when it was converted
    revision = None if cfg.source == "gguf" else cfg.revision
    check_offline_cache(path, revision)
    if Path(str(path)).is_dir():
        check_weight_files(path)  # a cut file named, not safetensors' bare "incomplete metadata"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            use_safetensors=None,  # safetensors when present, else .bin through torch.load(weights_only=True)
            weights_only=True,
            output_loading_info=True,
        )
    except pickle.UnpicklingError as exc:
        raise unsafe_pickle_error(path, exc) from exc
    except (ValueError, ImportError) as exc:
        if "attn_implementation" not in str(exc) and "attention" not in str(exc):
            raise
        raise ValueError(attention_hint(path, cfg.attn_implementation, exc)) from exc
    model, loading_info = model
    check_all_weights_loaded(loading_info, path)
    check_loaded("model", path, revision, getattr(model.config, "_commit_hash", None))
    check_causal_lm(model)
    disable_dropout(model)
    weight = model.get_input_embeddings().weight
    embeddings = getattr(weight, "ds_shape", weight.shape)[0]  # a ZeRO-3 partition's own shape is empty
    if embeddings < len(tokenizer):
        raise ValueError(f"the policy at {path!r} has {embeddings} embeddings but "
                         f"its tokenizer has {len(tokenizer)} tokens: they do not belong together")
    return model


def attention_hint(path: str, requested: str | None, exc: Exception) -> str:
    """transformers' refusal of an attention kernel names its Python keyword; the run is configured through Hydra, so
    name the key to set there."""
    asked = f"model.attn_implementation={requested}" if requested else "transformers' own choice of attention"
    return (f"the policy at {path!r} cannot load with {asked}: {exc}\n-> set model.attn_implementation=eager on the "
            f"command line (or model.attn_implementation=null to let transformers choose a kernel this architecture "
            f"supports)")


def _partition_under_zero3(model: nn.Module) -> nn.Module:
    """Within ``repo_exp.deepspeed_engine.partitioned_loading`` (transformers' ZeRO-3 integration active), partition
    a model built in code; ``from_pretrained`` partitions hub models by itself as they load."""
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return model
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())
    return model


def load_scorer(cfg: ScoreModelConfig, tokenizer, path: str | None = None,
                load: Callable[[], ScoreModel] | None = None) -> ScoreModel:
    """A reward or cost model: random for ``source=tiny``, else the published layout from ``path``, read by
    ``load`` when given (a ZeRO-3 partitioned load) and checked the same way."""
    dtype = DTYPES[cfg.dtype]
    if cfg.source == "tiny":
        config = tiny_llama_config(cfg.arch, tokenizer)
        model = _seeded(cfg.seed, lambda: ScoreModel(config, score_type=cfg.kind))
        return model.to(dtype).eval()
    # the slot decides the role (a cost model without score_type must not be normalised as a reward)
    model = load() if load is not None else load_score_model(
        path or cfg.path, dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
        score_type=cfg.kind, normalize=cfg.normalize)
    check_score_model(model, tokenizer, path or cfg.path, cfg.kind)
    disable_dropout(model)  # critics copied from it train with it
    return model


def critic_from_scorer(scorer: ScoreModel, score_dim: int = 1) -> ScoreModel:
    """A critic initialised from a reward or cost model (as the published Safe RLHF runs do), head included when
    the dimensions agree, and without the score normaliser."""
    critic = copy.deepcopy(scorer)
    critic.score_type = "critic"
    critic.do_normalize = False
    if score_dim != scorer.score_dim:
        head = nn.Linear(critic.score_head.in_features, score_dim, bias=critic.bias)
        with torch.no_grad():
            head.weight.zero_()
            head.weight[: scorer.score_dim] = scorer.score_head.weight
            if critic.bias:
                head.bias.zero_()
        critic.score_head = head.to(scorer.score_head.weight.dtype)
        critic.score_dim = score_dim
    return critic


def critic_from_policy(policy: PreTrainedModel, score_dim: int = 1) -> ScoreModel:
    """A critic whose trunk is a copy of the policy's and whose value head starts at zero (an adapter-wrapped policy:
    a copy of its base with the adapters merged in)."""
    from repo_exp.models.adapters import is_peft_model

    source = copy.deepcopy(policy).merge_and_unload() if is_peft_model(policy) else policy
    trunk = copy.deepcopy(source.get_decoder()) if source is policy else source.get_decoder()
    critic = ScoreModel(policy.config, score_dim=score_dim, score_type="critic", trunk=trunk)
    critic.score_head.to(next(trunk.parameters()).dtype)
    nn.init.zeros_(critic.score_head.weight)
    return critic


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model
