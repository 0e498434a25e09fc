"""Batched sampling with a KV cache, keeping the log-probabilities of the sampled tokens.

Prompts are left-padded; position ids come from the attention mask. Sampling is Gumbel-max on noise drawn for the
*whole global batch* from a generator seeded by (seed, step), each rank taking its own rows: the samples of a row do
not depend on how the batch is split over ranks or chunks, so a run on two ranks draws exactly what a run on one rank
draws (the distribution is the same as ``torch.multinomial``'s).

The behaviour policy is the distribution tokens are drawn from: ``softmax(logits / temperature)`` restricted to the
``top_k`` most likely tokens and to the nucleus of mass ``top_p`` (``filter_logits``), renormalised. The kept
log-probabilities are that distribution's, ``log softmax(filter_logits(logits / T))[y_t]``; the update's forward pass
(``repo_exp.rollout.score.sequence_logprobs`` with the same settings) computes the same from the same logits, so no
policy forward pass is needed after generation and the first PPO ratio is 1 at any temperature, top-k and top-p (as
OpenRLHF and TRL compute them since they moved to tempered log-probabilities).

The prompt goes through the model's own forward pass, once per distinct prompt: the k samples of a prompt share its
keys and values (``distinct_prompts``), so the repeated prefill is gone and the sampled tokens are those a per-row
prefill gives. Each new token then goes through a decoder: for a plain ``LlamaForCausalLM`` the ``LlamaDecoder``
below, which runs the layer's own math with fused projections and a preallocated cache (a decode step of a small
model is dominated by per-operation work, not arithmetic), LoRA adapters included (each adapted projection's weight
is its base weight plus PEFT's ``get_delta_weight``, ``(alpha / rank)·B·A``, summed once per call); for any other
model the model's own forward pass with its ``DynamicCache``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM

from repo_exp.models.score_model import position_ids_from_mask


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    response_mask: torch.Tensor  # (B, T)
    logprobs: torch.Tensor  # (B, T) log π(y_t) of the distribution sampled from, 0 where the response mask is 0
    truncated: torch.Tensor  # (B,) bool: no EOS within max_new_tokens


def sampling_generator(seed: int, step: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, stream), identical on every rank."""
    mixed = (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**62)
    return torch.Generator(device=device).manual_seed(mixed)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """Set to −inf every logit outside the top ``k`` and outside the nucleus of mass ``top_p`` (the nucleus of what
    the top ``k`` leave). Logits (..., V); ``keep`` (...) a token id per row that stays whatever its rank: the update's
    forward pass keeps the sampled token, which the sampler's own set always holds, so that a log-probability after
    the policy has moved is never −inf."""
    truncate = bool(top_k and top_k < logits.shape[-1]) or top_p < 1.0
    if not truncate:
        return logits
    drop = torch.zeros_like(logits, dtype=torch.bool)
    if top_k and top_k < logits.shape[-1]:
        drop = logits < torch.topk(logits, top_k, dim=-1).values[..., -1:]
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits.masked_fill(drop, float("-inf")), descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        drop = drop | outside.scatter(-1, order, outside)
    if keep is not None:
        drop = drop.scatter(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(drop, float("-inf"))


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0) -> torch.Tensor:
    """log p(token) under the distribution the sampler draws from, ``softmax(filter_logits(logits / temperature))``,
    computed in float32. Logits (..., V), tokens (...) → (...). The sampled token is kept in the truncated set
    (``filter_logits(keep=…)``): at sampling time it is in the set by construction, so this changes nothing there."""
    scores = logits.float() / temperature
    if top_k or top_p < 1.0:
        scores = filter_logits(scores, top_k, top_p, keep=tokens)
    return torch.log_softmax(scores, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


class CacheDecoder:
    """Decode steps through the model's own forward pass and a ``DynamicCache`` (any causal LM)."""

    def __init__(self, model, cache: DynamicCache, prompt_mask: torch.Tensor, max_new_tokens: int) -> None:
        self.model = model
        self.cache = cache
        width = prompt_mask.shape[1]
        self.attention_mask = torch.zeros(prompt_mask.shape[0], width + max_new_tokens, dtype=torch.long,
                                          device=prompt_mask.device)
        self.attention_mask[:, :width] = prompt_mask
        self.length = width

    def step(self, token: torch.Tensor, position: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after ``token`` (B,) at ``position`` (B,); ``real`` (B,) masks the token out where False."""
        self.attention_mask[:, self.length] = real.long()
        self.length += 1
        out = self.model(input_ids=token.unsqueeze(-1), attention_mask=self.attention_mask[:, : self.length],
                         position_ids=position.unsqueeze(-1), cache=self.cache, use_cache=True)
        return out.logits[:, -1]


class LlamaDecoder:
    """Decode steps of a ``LlamaForCausalLM`` with the work per token cut down and the same math.

    The q/k/v and gate/up projections run as one matrix product each (their weights concatenated once per call of
    ``generate``, in the autocast dtype when autocast is on); the cache is preallocated, keys stored transposed, so
    that attention is two batched matrix products over views with no copy; the norms are ``F.rms_norm`` with the
    model's weights and epsilon; the rotary embedding is applied to q and k at once with the model's own cos/sin.
    Attention is the eager form, ``softmax(q·kᵀ·scale + mask)·v``, kept in float32 under autocast (one query per row:
    bf16 buys nothing there and rounds the scores). Dtypes follow the model's under autocast: a float32 residual
    stream and norms, bf16 projections. Checked against the model's forward pass in ``tests/test_generate.py``.
    """

    def __init__(self, model: LlamaForCausalLM, cache: DynamicCache, prompt_mask: torch.Tensor,
                 max_new_tokens: int) -> None:
        model = _llama_under_adapters(model) or model  # a LoRA-wrapped Llama: its own modules, adapters folded in
        config = model.config
        device = prompt_mask.device
        weight = model.lm_head.weight
        autocast = torch.is_autocast_enabled(device.type)
        self.dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype  # of the projections
        self.device_type = device.type
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        batch, width = prompt_mask.shape
        capacity = width + max_new_tokens
        rows = batch * self.kv_heads  # one attention "batch" per (sample, kv head); q heads sharing it are grouped
        self.layers = []
        for index, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            keys, values = cache.layers[index].keys, cache.layers[index].values  # (B, Hkv, P, D) of the prompt
            keys_t = torch.empty(rows, self.head_dim, capacity, dtype=weight.dtype, device=device)
            value_cache = torch.empty(rows, capacity, self.head_dim, dtype=weight.dtype, device=device)
            keys_t[:, :, :width] = keys.reshape(rows, width, self.head_dim).transpose(1, 2)
            value_cache[:, :width] = values.reshape(rows, width, self.head_dim)
            self.layers.append((
                layer.input_layernorm,
                layer.post_attention_layernorm,
                mlp.act_fn,
                torch.cat([_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)]).to(self.dtype),
                _weight(attn.o_proj).to(self.dtype),
                torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)]).to(self.dtype),
                _weight(mlp.down_proj).to(self.dtype),
                keys_t,
                value_cache,
            ))
        self.lm_head = weight.to(self.dtype)
        # additive attention mask, one row per (sample, kv head): 0 where a key counts, −inf where it is padding
        mask = torch.zeros(batch, capacity, dtype=weight.dtype, device=device)
        mask[:, :width].masked_fill_(prompt_mask == 0, float("-inf"))
        self.mask = mask.repeat_interleave(self.kv_heads, dim=0).unsqueeze(1)  # (B·Hkv, 1, capacity)
        self.length = width

    @staticmethod
    def supports(model) -> bool:
        """A plain Llama (no projection biases, no tensor-parallel slicing), or one whose projections carry plain LoRA
        adapters (PEFT), whose weights are all present (not partitioned by ZeRO-3, or gathered for the rollout with
        DeepSpeed's hooks lifted)."""
        base = _llama_under_adapters(model)
        if base is not None:  # the PEFT wrappers above the Llama may carry no hook either
            if model.training or any(m._forward_hooks or m._forward_pre_hooks for m in (model, model.base_model)):
                return False
            model = base
        config = getattr(model, "config", None)
        return (type(model) is LlamaForCausalLM and not model.training
                and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
                and getattr(config, "pretraining_tp", 1) in (None, 1)
                and _exactly_llama_modules(model) and all(p.numel() > 0 for p in model.parameters()))

    def step(self, token: torch.Tensor, position: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after ``token`` (B,) at ``position`` (B,); ``real`` (B,) masks the token out where False."""
        t = self.length
        self.length += 1
        self.mask[:, 0, t] = torch.where(real, 0.0, float("-inf")).repeat_interleave(self.kv_heads)
        mask = self.mask[:, :, : t + 1]
        heads, kv_heads, dim, dtype = self.heads, self.kv_heads, self.head_dim, self.dtype
        batch = token.shape[0]
        model = self.model.model
        hidden = model.embed_tokens(token)  # (B, H), float32 like the model's residual stream under autocast
        cos, sin = model.rotary_emb(hidden, position.unsqueeze(-1))  # (B, 1, D)
        # rotate_half(x)·sin as roll(x, D/2)·sin with the first half of sin negated: the same products
        half = dim // 2
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        # the projections take bf16 inputs and weights explicitly; the rest runs as in the model under autocast
        with torch.autocast(self.device_type, enabled=False):
            for norm_in, norm_post, act, qkv_weight, o_weight, gate_up_weight, down_weight, keys_t, values in (
                    self.layers):
                qkv = F.linear(F.rms_norm(hidden, norm_in.weight.shape, norm_in.weight, norm_in.variance_epsilon)
                               .to(dtype), qkv_weight)  # (B, (Hq + 2·Hkv)·D)
                qk = qkv[:, : (heads + kv_heads) * dim].view(batch, heads + kv_heads, dim)
                qk = qk * cos + qk.roll(half, dims=-1) * sin  # rotary embedding of q and k together
                keys_t.view(batch, kv_heads, dim, -1)[:, :, :, t] = qk[:, heads:]
                values.view(batch, kv_heads, -1, dim)[:, :, t] = qkv[:, (heads + kv_heads) * dim :].view(
                    batch, kv_heads, dim)
                q = qk[:, :heads].reshape(batch * kv_heads, heads // kv_heads, dim)
                scores = torch.baddbmm(mask, q, keys_t[:, :, : t + 1], alpha=self.scaling)  # (B·Hkv, group, t+1)
                attended = torch.bmm(torch.softmax(scores, dim=-1), values[:, : t + 1])
                hidden = hidden + F.linear(attended.reshape(batch, heads * dim).to(dtype), o_weight)
                x = F.rms_norm(hidden, norm_post.weight.shape, norm_post.weight, norm_post.variance_epsilon)
                gate, up = F.linear(x.to(dtype), gate_up_weight).chunk(2, dim=-1)
                hidden = hidden + F.linear(act(gate) * up, down_weight)
            norm = model.norm
            x = F.rms_norm(hidden, norm.weight.shape, norm.weight, norm.variance_epsilon)
            return F.linear(x.to(dtype), self.lm_head)


def distinct_prompts(prompt_ids: torch.Tensor,
                     prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The distinct rows of a left-padded prompt batch (U, P) and, for each of the B rows, the index of its distinct
    row (B,); ``None`` for the index when every row is distinct (then the batch is returned as it is).

    With k samples per prompt the batch holds each prompt k times: the prompt's forward pass is computed once and its
    keys and values are shared by its k rows (the padding width P is kept, so each row's pass is the same one)."""
    if prompt_ids.shape[0] < 2:
        return prompt_ids, prompt_mask, None
    key = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)
    distinct, expand = torch.unique(key, dim=0, return_inverse=True)
    if distinct.shape[0] == prompt_ids.shape[0]:
        return prompt_ids, prompt_mask, None
    first = torch.full((distinct.shape[0],), prompt_ids.shape[0], dtype=torch.long, device=prompt_ids.device)
    first = first.scatter_reduce(0, expand, torch.arange(prompt_ids.shape[0], device=prompt_ids.device), "amin")
    return prompt_ids[first], prompt_mask[first], expand


def _llama_under_adapters(model) -> LlamaForCausalLM | None:
    """The ``LlamaForCausalLM`` inside a PEFT LoRA model (None for anything else)."""
    get_base = getattr(model, "get_base_model", None)
    if get_base is None or getattr(getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None)),
                                   "peft_type", None) != "LORA":
        return None
    base = get_base()
    return base if type(base) is LlamaForCausalLM else None


def _lora_adapters(module: nn.Module) -> list[str] | None:
    """The active adapters of a PEFT LoRA layer around an ``nn.Linear`` whose weight the decoder can fold in: plain
    LoRA (no DoRA or other variant, no bias on ``B``, no dropout at work, not merged); None for anything else."""
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear or type(module.base_layer) is not nn.Linear or module.merged:
        return None
    if module.disable_adapters:
        return []
    active = [name for name in module.active_adapters if name in module.lora_A]
    for name in active:
        dropout = module.lora_dropout[name]
        if (name in getattr(module, "lora_variant", {}) or module.lora_B[name].bias is not None
                or getattr(module, "fan_in_fan_out", False)
                or not (isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and dropout.p == 0))):
            return None
    return active


def _weight(projection: nn.Module) -> torch.Tensor:
    """The weight a projection applies: an ``nn.Linear``'s, or a LoRA layer's base weight plus its active adapters'
    updates (PEFT's ``get_delta_weight``: ``(alpha / rank)·B·A``)."""
    adapters = _lora_adapters(projection)
    if adapters is None:
        return projection.weight
    weight = projection.base_layer.weight
    for name in adapters:
        weight = weight + projection.get_delta_weight(name).to(weight.dtype)
    return weight


def _projection(module: nn.Module) -> bool:
    return type(module) is nn.Linear or _lora_adapters(module) is not None


def _exactly_llama_modules(model: LlamaForCausalLM) -> bool:
    """Whether every module the decoder reads is exactly the class it reproduces, with no hook: a wrapped projection
    (other than a plain LoRA layer, folded in), a replaced norm or a hook would be skipped by its fused weights."""
    from transformers.models.llama import modeling_llama as llama

    inner = model.model
    expected = [(model, LlamaForCausalLM), (inner, llama.LlamaModel), (model.lm_head, nn.Linear),
                (inner.embed_tokens, nn.Embedding), (inner.norm, llama.LlamaRMSNorm),
                (inner.rotary_emb, llama.LlamaRotaryEmbedding)]
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        expected += [(layer, llama.LlamaDecoderLayer), (attn, llama.LlamaAttention), (mlp, llama.LlamaMLP),
                     (layer.input_layernorm, llama.LlamaRMSNorm), (layer.post_attention_layernorm, llama.LlamaRMSNorm)]
        projections = [getattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projections += [getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(_projection(p) for p in projections):
            return False
        expected += [(inside, type(inside)) for p in projections for inside in p.modules()]  # a LoRA layer's parts
    if any(type(module) is not cls for module, cls in expected):
        return False
    # every module of the model must be one of those (nothing inserted), and none may carry a hook
    known = {id(module) for module, _ in expected} | {id(layer.mlp.act_fn) for layer in inner.layers} | {id(inner.layers)}
    return all(id(m) in known and not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def _zero3_partitioned(model) -> bool:
    """Whether ZeRO-3 partitions the model's parameters (DeepSpeed tags each with a ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _sampled_under_inference_mode(sample: Callable[..., Generation]) -> Callable[..., Generation]:
    """Run ``sample`` under ``torch.inference_mode`` (no autograd bookkeeping per operation: a few per cent of a small
    model's decode step) and hand its tensors back as ordinary ones, which later passes may use with gradients.
    ZeRO-3 models (partitioned parameters, gathered by hooks during the forward pass) sample under ``no_grad``."""

    @functools.wraps(sample)
    def wrapper(model, *args, **kwargs) -> Generation:
        if _zero3_partitioned(model):
            with torch.no_grad():
                return sample(model, *args, **kwargs)
        with torch.inference_mode():
            gen = sample(model, *args, **kwargs)
        return Generation(**{f.name: getattr(gen, f.name).clone() for f in fields(gen)})

    return wrapper


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS and each EOS id of the model's ``generation_config``
    (instruct models list several there: Llama-3-Instruct ends a turn with ``<|eot_id|>``, Qwen2.5-Instruct with
    ``<|im_end|>``, beside the tokenizer's end-of-text token)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(getattr(model, "module", model), "generation_config", None)  # a DeepSpeed engine wraps it
    listed = getattr(config, "eos_token_id", None)
    ids += [listed] if isinstance(listed, int) else list(listed or [])
    return sorted({int(i) for i in ids if i is not None})


@_sampled_under_inference_mode
def generate(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    generator: torch.Generator,
    rows: slice,
    global_batch: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    all_finished: Callable[[bool], bool] | None = None,
    fast_decoder: bool = True,
) -> Generation:
    """Sample up to ``max_new_tokens`` per prompt.

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        eos_token_id: the token, or every token, that ends a response (``stop_token_ids``).
        generator: draws the Gumbel noise for all ``global_batch`` rows; this call uses ``rows`` of it.
        all_finished: reduces the local "every row has ended" flag over ranks; under ZeRO-3 every rank must keep
            running forward passes until all have ended (synchronised GPUs).
        fast_decoder: use ``LlamaDecoder`` when the model is a plain Llama (else, or when False, the model's own
            forward pass decodes).
    """
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    assert rows.stop - rows.start == batch, "rows must cover the local batch"
    prompt_mask = prompt_mask.long()
    cache = DynamicCache()
    # each distinct prompt goes through the forward pass once; its k samples share its keys and values
    unique_ids, unique_mask, expand = distinct_prompts(prompt_ids, prompt_mask)
    out = model(
        input_ids=unique_ids,
        attention_mask=unique_mask,
        position_ids=position_ids_from_mask(unique_mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    logits = out.logits[:, -1]
    if expand is not None:
        cache.batch_select_indices(expand)
        logits = logits[expand]
    use_llama = fast_decoder and LlamaDecoder.supports(model)
    decoder = (LlamaDecoder if use_llama else CacheDecoder)(model, cache, prompt_mask, max_new_tokens)
    del out, cache  # LlamaDecoder copied the prompt's keys and values into its own cache; CacheDecoder holds this one
    next_position = prompt_mask.sum(-1)  # (B,)
    tokens, logprobs, alive_masks = [], [], []
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
    stop = torch.as_tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    for step in range(max_new_tokens):
        logits = logits.float()  # (B, V)
        noise = torch.rand(global_batch, logits.shape[-1], generator=generator, device=device)[rows]
        gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
        scores = filter_logits(logits / temperature, top_k, top_p)
        token = torch.argmax(scores + gumbel, dim=-1)  # (B,)
        # the log-probability of the distribution the token was drawn from (see the module's docstring)
        logp = torch.log_softmax(scores, dim=-1).gather(-1, token.unsqueeze(-1)).squeeze(-1)
        token = torch.where(alive, token, pad)
        tokens.append(token)
        logprobs.append(torch.where(alive, logp, 0.0))
        alive_masks.append(alive)
        alive = alive & ~torch.isin(token, stop)
        done = not bool(alive.any())
        if all_finished is not None:
            done = all_finished(done)
        if done or step == max_new_tokens - 1:  # no forward pass for logits that nothing samples from
            break
        logits = decoder.step(token, next_position, alive_masks[-1])
        next_position = next_position + 1
    response = torch.stack(tokens, dim=1)  # (B, T)
    response_mask = torch.stack(alive_masks, dim=1).long()  # (B, T): 1 through EOS
    truncated = alive  # still alive after the last step: no EOS
    return Generation(
        sequences=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask], dim=1),
        response_mask=response_mask,
        logprobs=torch.stack(logprobs, dim=1),
        truncated=truncated,
    )
