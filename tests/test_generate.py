"""Generation: the Llama decoder samples what the model's own forward pass samples, its kept log-probabilities are
those of a full forward pass and of the distribution sampled from (temperature, top-k, top-p), and the row/chunk
invariance of the sampling noise survives it."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from repo_exp.models.score_model import position_ids_from_mask
from repo_exp.rollout.generate import LlamaDecoder, filter_logits, generate, sampling_generator
from repo_exp.rollout.score import sequence_logprobs

EOS, PAD = 3, 0


def tiny_llama(kv_heads: int = 4, attn: str = "sdpa", **extra) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=24, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         eos_token_id=EOS, pad_token_id=PAD, bos_token_id=2, **extra)
    config._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def left_padded_prompts(batch: int = 6, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 24, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(0, batch, 2):  # every other row shorter, padded on the left
        mask[row, : 2 + row % 5] = 0
    return ids * mask, mask


def sampling_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                          top_p: float = 1.0) -> torch.Tensor:
    """The distribution a sampler at these settings draws one token from, written out for one row of logits (V,)
    in float64, token by token: probabilities at the temperature, the k most likely kept and renormalised, then the
    smallest most-likely-first prefix whose mass reaches top_p kept (the token that crosses it included) and
    renormalised. Zero outside the kept set."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    kept = order[:top_k] if top_k else order
    mass = sum(float(probs[i]) for i in kept)
    nucleus, cumulative = [], 0.0
    for i in kept:
        nucleus.append(i)
        cumulative += float(probs[i]) / mass
        if cumulative >= top_p:
            break
    out = torch.zeros_like(probs)
    for i in nucleus:
        out[i] = probs[i]
    return out / out.sum()


@torch.no_grad()
def reference_generate(model, prompt_ids, prompt_mask, max_new_tokens, generator, rows, global_batch,
                       temperature=1.0, top_k=0, top_p=1.0):
    """The sampling loop as first written: the model's forward pass with a growing DynamicCache and attention mask."""
    attention_mask = prompt_mask.long()
    cache = DynamicCache()
    out = model(input_ids=prompt_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), cache=cache, use_cache=True, logits_to_keep=1)
    next_position = attention_mask.sum(-1, keepdim=True)
    tokens, logprobs, alive_masks = [], [], []
    alive = torch.ones(prompt_ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        noise = torch.rand(global_batch, logits.shape[-1], generator=generator)[rows]
        gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
        token = torch.argmax(filter_logits(logits / temperature, top_k, top_p) + gumbel, dim=-1)
        logp = torch.tensor([sampling_distribution(row, temperature, top_k, top_p)[int(y)].log()
                             for row, y in zip(logits, token)], dtype=torch.float32)
        token = torch.where(alive, token, torch.full_like(token, PAD))
        tokens.append(token)
        logprobs.append(torch.where(alive, logp, torch.zeros_like(logp)))
        alive_masks.append(alive)
        alive = alive & (token != EOS)
        if not alive.any():
            break
        attention_mask = torch.cat([attention_mask, alive_masks[-1].long().unsqueeze(-1)], dim=-1)
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention_mask, position_ids=next_position,
                    cache=cache, use_cache=True)
        next_position = next_position + 1
    return torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(alive_masks, 1).long()


def sample(model, ids, mask, fast: bool, rows: slice | None = None, global_batch: int | None = None, **kw):
    rows = rows or slice(0, ids.shape[0])
    return generate(model, ids, mask, 30, eos_token_id=EOS, pad_token_id=PAD,
                    generator=sampling_generator(7, 3, 0), rows=rows, global_batch=global_batch or ids.shape[0],
                    fast_decoder=fast, **kw)


@pytest.mark.parametrize("kv_heads,attn", [(4, "sdpa"), (2, "eager"), (1, "sdpa")])
@pytest.mark.parametrize("fast", [True, False])
def test_both_decoders_sample_what_the_first_loop_sampled(kv_heads, attn, fast):
    model = tiny_llama(kv_heads, attn)
    ids, mask = left_padded_prompts()
    tokens, logprobs, response_mask = reference_generate(model, ids, mask, 30, sampling_generator(7, 3, 0),
                                                         slice(0, 6), 6, temperature=0.9, top_k=12)
    gen = sample(model, ids, mask, fast, temperature=0.9, top_k=12)
    assert LlamaDecoder.supports(model)
    assert torch.equal(gen.sequences[:, ids.shape[1]:], tokens)
    assert torch.equal(gen.response_mask, response_mask)
    torch.testing.assert_close(gen.logprobs, logprobs, atol=2e-6, rtol=0)
    ended = gen.response_mask.sum(-1) < gen.response_mask.shape[1]
    assert ended.any(), "some rows end early (EOS), so the masking of finished rows is exercised"


def test_kept_logprobs_are_those_of_a_full_forward_pass():
    model = tiny_llama(2)
    ids, mask = left_padded_prompts()
    gen = sample(model, ids, mask, fast=True)
    full = sequence_logprobs(model, gen.sequences, gen.attention_mask, ids.shape[1]) * gen.response_mask
    torch.testing.assert_close(gen.logprobs, full, atol=2e-6, rtol=0)


def test_under_bf16_autocast_logprobs_stay_within_bf16_rounding_of_the_forward_pass():
    """Sampling and the update's forward pass both run under autocast: their log-probabilities may differ by bf16
    rounding of the activations (a PPO ratio of 1 ± 1e-2 at most), never by a different computation."""
    model = tiny_llama(2, "eager")
    ids, mask = left_padded_prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen = sample(model, ids, mask, fast=True)
        full = sequence_logprobs(model, gen.sequences, gen.attention_mask, ids.shape[1]) * gen.response_mask
    fp32 = sequence_logprobs(model, gen.sequences, gen.attention_mask, ids.shape[1]) * gen.response_mask
    assert (gen.logprobs - full).abs().max() < 2e-2
    assert (gen.logprobs - fp32).abs().max() < 2e-2
    assert (gen.logprobs - fp32).abs().max() > 0  # it did run in bf16


def test_rows_sample_the_same_whether_generated_together_or_in_chunks():
    model = tiny_llama(2)
    ids, mask = left_padded_prompts()
    whole = sample(model, ids, mask, fast=True)
    for start, stop in ((0, 2), (2, 6)):
        part_mask = mask[start:stop]
        first = int(part_mask.any(0).long().argmax())  # as make_experience does: drop all-padding columns
        part = sample(model, ids[start:stop, first:], part_mask[:, first:], fast=True, rows=slice(start, stop),
                      global_batch=6)
        width = part.response_mask.shape[1]
        response = whole.sequences[start:stop, ids.shape[1]:][:, :width]
        assert torch.equal(part.sequences[:, ids.shape[1] - first:], response)
        torch.testing.assert_close(part.logprobs, whole.logprobs[start:stop, :width], atol=2e-6, rtol=0)


def test_models_outside_the_llama_fast_path_decode_through_their_own_forward():
    biased = tiny_llama(2, attention_bias=True)
    assert not LlamaDecoder.supports(biased)
    training = tiny_llama(2).train()
    assert not LlamaDecoder.supports(training)
    ids, mask = left_padded_prompts()
    tokens, logprobs, _ = reference_generate(biased, ids, mask, 30, sampling_generator(7, 3, 0), slice(0, 6), 6)
    gen = sample(biased, ids, mask, fast=True)
    assert torch.equal(gen.sequences[:, ids.shape[1]:], tokens)
    torch.testing.assert_close(gen.logprobs, logprobs, atol=2e-6, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_sampling_stops_on_every_eos_id_of_the_generation_config(fast):
    """An instruct model lists several EOS ids in its generation_config (a turn's end beside end-of-text): a response
    ends at the first of any of them, and is otherwise what one EOS gives, token for token."""
    from types import SimpleNamespace

    from repo_exp.rollout.generate import stop_token_ids

    model = tiny_llama(2)
    ids, mask = left_padded_prompts()
    one = sample(model, ids, mask, fast)
    second = 5  # a token the model samples somewhere in the rows: the turn's end of this toy instruct model
    responses = one.sequences[:, ids.shape[1]:]
    assert bool(((responses == second) & one.response_mask.bool()).any()), "the second EOS must occur"
    model.generation_config.eos_token_id = [EOS, second]
    stops = stop_token_ids(model, SimpleNamespace(eos_token_id=EOS))
    assert stops == [EOS, second]
    both = generate(
        model, ids, mask, 30, eos_token_id=stops, pad_token_id=PAD, generator=sampling_generator(7, 3, 0),
        rows=slice(0, 6), global_batch=6, fast_decoder=fast)
    for row in range(ids.shape[0]):
        tokens = responses[row][one.response_mask[row].bool()].tolist()
        end = next((i for i, t in enumerate(tokens) if t in (EOS, second)), len(tokens) - 1)
        kept = both.sequences[row, ids.shape[1]:][both.response_mask[row].bool()].tolist()
        assert kept == tokens[: end + 1], row  # the same tokens, cut at the first stop of either kind
        assert bool(both.truncated[row]) == (tokens[end] not in (EOS, second))
    wrapped = SimpleNamespace(module=model)  # a DeepSpeed engine holds the model as .module
    assert stop_token_ids(wrapped, SimpleNamespace(eos_token_id=7)) == [EOS, second, 7]


# ---------------------------------------------------------------- the behaviour policy is the distribution sampled from

SETTINGS = [dict(temperature=0.5), dict(temperature=0.5, top_k=6), dict(temperature=0.5, top_k=10, top_p=0.8),
            dict(temperature=1.3, top_p=0.7)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
@pytest.mark.parametrize("fast", [True, False])
def test_kept_logprobs_are_those_of_the_distribution_sampled_from(settings, fast):
    """Every kept log-probability is log p(token) of the distribution the token was drawn from, computed independently
    from a full forward pass over the sampled sequence; every sampled token lies in that distribution's support; and
    the update's forward pass at the same settings gives the same numbers: the first PPO ratio is 1."""
    model = tiny_llama(2)
    ids, mask = left_padded_prompts()
    gen = sample(model, ids, mask, fast, **settings)
    width = ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=gen.sequences, attention_mask=gen.attention_mask,
                       position_ids=position_ids_from_mask(gen.attention_mask)).logits[:, width - 1: -1]
    checked = 0
    for b, t in gen.response_mask.nonzero().tolist():
        p = sampling_distribution(logits[b, t], **settings)
        token = int(gen.sequences[b, width + t])
        assert p[token] > 0, f"row {b} token {t} was sampled from outside the distribution's support"
        assert abs(float(gen.logprobs[b, t]) - float(p[token].log())) < 1e-5, (b, t)
        checked += 1
    assert checked > 30
    fresh = sequence_logprobs(model, gen.sequences, gen.attention_mask, width, **settings)
    ratio = torch.exp(fresh - gen.logprobs)[gen.response_mask.bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings", SETTINGS[:3], ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_tokens_are_drawn_from_the_distribution_whose_logprobs_are_kept(settings):
    """4000 first tokens of one prompt: their frequencies are the probabilities the kept log-probabilities claim
    (within 0.035, about four standard errors), and no token outside the support is ever drawn."""
    model = tiny_llama(2)
    ids, mask = left_padded_prompts(batch=1)
    n = 4000
    gen = generate(model, ids.expand(n, -1), mask.expand(n, -1), 1, eos_token_id=EOS, pad_token_id=PAD,
                   generator=sampling_generator(11, 0, 0), rows=slice(0, n), global_batch=n, **settings)
    tokens = gen.sequences[:, -1]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[0, -1]
    p = sampling_distribution(logits, **settings)
    frequency = torch.bincount(tokens, minlength=p.numel()).double() / n
    assert float(frequency[p == 0].sum()) == 0.0
    assert float((frequency - p).abs().max()) < 0.035
    claimed = torch.zeros_like(p).index_put_((tokens,), gen.logprobs[:, 0].double().exp())
    torch.testing.assert_close(claimed[frequency > 0], p[frequency > 0], atol=1e-5, rtol=0)


def test_a_sampled_token_the_moved_policy_would_truncate_keeps_a_finite_logprob():
    """After an update the sampled token may fall outside the top-k the current logits give: the update's forward
    pass keeps it in the set, so its log-probability (and the PPO ratio) stays finite."""
    logits = torch.tensor([[[3.0, 2.0, 1.0, 0.0]]])
    tokens = torch.tensor([[3]])  # the least likely token, outside the top 2
    from repo_exp.rollout.generate import sampled_logprobs

    logp = sampled_logprobs(logits, tokens, temperature=0.5, top_k=2)
    expected = torch.log_softmax(torch.tensor([3.0, 2.0, 0.0]) / 0.5, dim=-1)[-1]  # the top 2 and the token itself
    torch.testing.assert_close(logp[0, 0], expected)
