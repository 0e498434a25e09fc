"""Choices that only change speed leave the numbers as they were (within the precision's rounding); no timing is
asserted here.

- attention: sdpa and eager give the same losses and gradients; ``model.attn_implementation=fastest`` measures once and
  reads its cached answer after that;
- generation: one prefill per distinct prompt samples the same tokens with the same log-probabilities as one per row;
- the update: length-grouped micro-batches cut to their longest row, as many samples each as a token budget holds,
  accumulate the loss and gradients of one padded batch, for both loss aggregations and when ranks agree on more
  micro-batches than one rank needs;
- frozen models kept in bf16 under ``trainer.mixed_precision=bf16`` score as autocast over float32 weights did, within
  bf16 rounding.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from repo_exp.algorithms import critic_loss, policy_loss
from repo_exp.machine import PROBE_FILE, choose_attention, cpu_model, resolve_attention
from repo_exp.rollout import Timings
from repo_exp.rollout.generate import distinct_prompts, generate, sampling_generator
from repo_exp.rollout.score import sequence_logprobs
from repo_exp.train import micro_batch_plan, micro_batches, ppo_update, split_to

from reliability_support import make_trainer
from test_generate import EOS, PAD, left_padded_prompts, tiny_llama

generate_module = sys.modules["repo_exp.rollout.generate"]


# ------------------------------------------------------------------------------------------------------ attention


def _loss_and_grads(model, ids, mask, width, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logprobs = sequence_logprobs(model, ids, mask, width)
    response_mask = mask[:, width:]
    advantages = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)
    loss, _ = policy_loss(logprobs, logprobs.detach() - 0.05, advantages, response_mask, 0.2, "token_mean")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("autocast,tol", [(False, 1e-5), (True, 3e-2)])
def test_sdpa_and_eager_attention_give_the_same_loss_and_gradients(autocast, tol):
    sdpa = tiny_llama(attn="sdpa").train()
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    prompt_ids, prompt_mask = left_padded_prompts()
    g = torch.Generator().manual_seed(3)
    ids = torch.cat([prompt_ids, torch.randint(4, 24, (6, 7), generator=g)], dim=1)
    mask = torch.cat([prompt_mask, torch.ones(6, 7, dtype=torch.long)], dim=1)
    mask[1, -3:] = 0  # responses of different lengths
    loss_s, grads_s = _loss_and_grads(sdpa, ids, mask, prompt_ids.shape[1], autocast)
    loss_e, grads_e = _loss_and_grads(eager, ids, mask, prompt_ids.shape[1], autocast)
    torch.testing.assert_close(loss_s, loss_e, rtol=tol, atol=tol)
    for name, grad in grads_s.items():
        scale = grad.abs().max().clamp(min=1e-6)
        assert (grad - grads_e[name]).abs().max() <= tol * scale, name


def test_auto_attention_measures_once_per_machine_and_reads_the_cache_after(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4)
    calls = []

    def timer(model_config, kernels, device, dtype, precision, batch, length):
        calls.append((tuple(sorted(kernels)), precision, batch, length))
        return {"sdpa": 2.0, "eager": 1.0}

    choice, entry = choose_attention(config, torch.float32, torch.device("cpu"), "bf16", 4, 16, tmp_path, timer)
    assert choice == "eager" and entry["seconds"] == {"sdpa": 2.0, "eager": 1.0}
    assert calls == [(("eager", "sdpa"), "bf16", 4, 16)]
    cached = json.loads((tmp_path / PROBE_FILE).read_text())
    (key,) = cached
    assert cpu_model() in key and torch.__version__ in key and "bf16" in key and "hidden=32" in key
    # a second run on this machine: read, not measured
    assert choose_attention(config, torch.float32, torch.device("cpu"), "bf16", 4, 16, tmp_path, timer)[0] == "eager"
    assert len(calls) == 1
    # another precision is another question
    choose_attention(config, torch.float32, torch.device("cpu"), "no", 4, 16, tmp_path, timer)
    assert len(calls) == 2 and len(json.loads((tmp_path / PROBE_FILE).read_text())) == 2


def test_fastest_attention_resolves_to_a_measured_kernel_in_the_config(smoke_cfg, tmp_path):
    from repo_exp.config import validate

    config = validate(smoke_cfg("model.attn_implementation=fastest", "trainer.mixed_precision=bf16",
                                f"world.cache_dir={tmp_path}"))
    choice = resolve_attention(config, None, torch.device("cpu"))
    assert choice in ("sdpa", "eager") and config.model.attn_implementation == choice
    (entry,) = json.loads((tmp_path / PROBE_FILE).read_text()).values()
    assert entry["choice"] == choice and set(entry["seconds"]) == {"sdpa", "eager"}
    assert entry["seconds"][choice] == min(entry["seconds"].values())


# ------------------------------------------------------------------------------------------------------ generation


def _generate(model, ids, mask, fast: bool, share: bool, monkeypatch):
    with monkeypatch.context() as patch:
        if not share:
            patch.setattr(generate_module, "distinct_prompts", lambda i, m: (i, m, None))
        return generate(model, ids, mask, 12, EOS, PAD, sampling_generator(0, 1, 0), slice(0, ids.shape[0]),
                        ids.shape[0], fast_decoder=fast)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_one_prefill_per_prompt_samples_what_one_prefill_per_row_samples(attn, fast, bf16, monkeypatch):
    model = tiny_llama(attn=attn)
    ids, mask = left_padded_prompts(4, 9)
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # k = 3 samples per prompt
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        shared = _generate(model, ids, mask, fast, True, monkeypatch)
        per_row = _generate(model, ids, mask, fast, False, monkeypatch)
    assert torch.equal(shared.sequences, per_row.sequences)
    assert torch.equal(shared.response_mask, per_row.response_mask)
    torch.testing.assert_close(shared.logprobs, per_row.logprobs, rtol=0, atol=1e-6)
    # the k samples of a prompt differ (their own noise rows), so sharing the prefill did not tie them
    assert not torch.equal(shared.sequences[0], shared.sequences[1])


def test_distinct_prompts_finds_each_prompt_once():
    ids, mask = left_padded_prompts(3, 5)
    batch_ids, batch_mask = ids[[0, 1, 0, 2, 1]], mask[[0, 1, 0, 2, 1]]
    batch_ids[2] = batch_ids[2] + (1 - batch_mask[2]) * 7  # other ids under the padding: still the same prompt
    distinct, distinct_mask, expand = distinct_prompts(batch_ids, batch_mask)
    assert distinct.shape[0] == 3
    assert torch.equal((distinct * distinct_mask)[expand], batch_ids * batch_mask)
    assert distinct_prompts(ids, mask)[2] is None  # all distinct: the batch as it is


# ------------------------------------------------------------------------------------------------------ the update


def _varied_lengths(exp, pad_id: int):
    """The rollout with responses cut at varied lengths (tiny random models rarely emit EOS)."""
    exp = copy.copy(exp)
    width = exp.response_width
    lengths = torch.tensor([width, 1, 3, width - 2, 2, 5, 4, width, 1, 6, 3, 2, 7, 1, 5, 2][: exp.batch_size])
    keep = (torch.arange(width) < lengths.unsqueeze(1)).long()
    exp.response_mask = keep
    exp.logprobs = exp.logprobs * keep
    exp.ref_logprobs = exp.ref_logprobs * keep
    exp.attention_mask = torch.cat([exp.attention_mask[:, : exp.prompt_width], keep], dim=1)
    exp.sequences = exp.sequences.clone()
    exp.sequences[:, exp.prompt_width:] = torch.where(keep.bool(), exp.sequences[:, exp.prompt_width:], pad_id)
    return exp


def _update_gradients(trainer, exp, micro_batch_size: int, grouped: bool, monkeypatch, tokens: int | None = None,
                      agree=None, ptx=None):
    """The loss handed to backward (summed over micro-batches) and every engine's gradient before its step."""
    models = copy.deepcopy(trainer.models)
    trainer.config.trainer.micro_batch_size = micro_batch_size
    trainer.config.trainer.group_by_length = grouped
    trainer.config.trainer.micro_batch_tokens = tokens
    losses, grads = [], {}
    for engine in models.engines:
        backward, step = engine.backward, engine.step

        def record_backward(loss, backward=backward):
            losses.append(loss.detach())
            backward(loss)

        def record_step(engine=engine, step=step):
            grads.update({f"{engine.name}.{n}": p.grad.clone() for n, p in engine.module.named_parameters()})
            return step()

        monkeypatch.setattr(engine, "backward", record_backward)
        monkeypatch.setattr(engine, "step", record_step)
    exp = copy.copy(exp)
    stats, skipped = ppo_update(exp, models, trainer.constraint, trainer.config, torch.Generator().manual_seed(0),
                                trainer.fused, all_finite=lambda ok: ok, agree=agree, ptx=ptx)
    assert not skipped
    _update_gradients.micro_batches = stats["update/micro_batches"]
    _update_gradients.stats = stats
    return torch.stack(losses).sum(), grads


# (micro-batch size, token budget, extra micro-batches agreed with other ranks)
GROUPINGS = {"three_samples": (3, None, 0), "token_budget": (3, 40, 0), "agreed_with_ranks": (3, 40, 3)}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_length_grouped_micro_batches_accumulate_the_gradient_of_one_padded_batch(smoke_cfg, tmp_path, aggregation,
                                                                                  grouping, monkeypatch):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", "constraint=rectified", f"ppo.loss_aggregation={aggregation}",
                           "trainer.total_steps=1")
    exp = trainer.rollout(0, Timings())
    exp = _varied_lengths(exp, trainer.models.tokenizer.pad_token_id)
    exp.cost_active = trainer.constraint.cost_gate(exp.costs, exp.prompt_index)
    exp.kl = (exp.logprobs - exp.ref_logprobs) * exp.response_mask
    assert trainer.fused  # the critics' old values are read inside the micro-batches: trimmed there too
    padded_loss, padded = _update_gradients(trainer, exp, exp.batch_size, False, monkeypatch)
    padded_stats = _update_gradients.stats
    size, tokens, extra = GROUPINGS[grouping]
    counts = []

    def agree(n):  # as if another rank needed ``extra`` more micro-batches
        counts.append(n)
        return n + extra

    grouped_loss, grouped = _update_gradients(trainer, exp, size, True, monkeypatch, tokens, agree)
    assert _update_gradients.micro_batches == counts[0] + extra
    torch.testing.assert_close(grouped_loss, padded_loss, rtol=1e-5, atol=1e-6)
    # the logged losses are the minibatch's too: each micro-batch's weighs its share, whatever its size
    for key in ("loss/actor", "loss/reward_critic", "loss/cost_critic"):
        assert _update_gradients.stats[key] == pytest.approx(padded_stats[key], rel=1e-5, abs=1e-6), key
    assert set(grouped) == set(padded) and len(padded) > 0
    for name, grad in padded.items():
        torch.testing.assert_close(grouped[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in padded.values())


def test_joint_ptx_adds_the_same_gradient_whatever_the_micro_batches(smoke_cfg, tmp_path, monkeypatch):
    """``ppo.ptx_mode=joint``: the supervised rows and their chunks follow the minibatch, not its RL micro-batches."""
    trainer = make_trainer(smoke_cfg, tmp_path / "run", "trainer.total_steps=1", "ppo.ptx_coeff=1.0",
                           "ptx.source=world", "ppo.ptx_mode=joint")
    exp = _varied_lengths(trainer.rollout(0, Timings()), trainer.models.tokenizer.pad_token_id)
    exp.cost_active = trainer.constraint.cost_gate(exp.costs, exp.prompt_index)
    exp.kl = (exp.logprobs - exp.ref_logprobs) * exp.response_mask
    results, passes = {}, {}
    for name, tokens, with_ptx in (("samples", None, True), ("budget", 40, True), ("budget_no_ptx", 40, False)):
        ptx = copy.deepcopy(trainer.ptx) if with_ptx else None  # the same supervised rows for each grouping
        _, results[name] = _update_gradients(trainer, exp, 3, True, monkeypatch, tokens, ptx=ptx)
        passes[name] = _update_gradients.micro_batches
    assert passes["samples"] != passes["budget"]  # two different RL groupings
    for param, grad in results["samples"].items():
        torch.testing.assert_close(results["budget"][param], grad, rtol=1e-4, atol=1e-6, msg=param)
    # and the PTX loss did reach the policy's gradient
    assert any(not torch.allclose(results["budget_no_ptx"][p], g) for p, g in results["budget"].items())


def test_length_grouped_micro_batches_are_cut_to_their_longest_row(smoke_cfg, tmp_path):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", "trainer.total_steps=1")
    exp = trainer.rollout(0, Timings())
    exp = _varied_lengths(exp, trainer.models.tokenizer.pad_token_id)
    micros = list(micro_batches(exp, 4, by_length=True))
    lengths = [m.response_mask.sum(-1) for m in micros]
    assert [m.response_width for m in micros] == [int(x.max()) for x in lengths]
    assert all(bool(x[:-1].ge(x[1:]).all()) for x in lengths)  # longest first
    assert sum(m.batch_size for m in micros) == exp.batch_size
    assert sum(int(m.response_mask.sum()) for m in micros) == int(exp.response_mask.sum())
    for m in micros:  # the first prompt column is real in some row, the last response column in some row
        assert bool(m.attention_mask[:, 0].any()) and bool(m.response_mask[:, -1].any())
        assert m.sequences.shape == m.attention_mask.shape and m.logprobs.shape == m.response_mask.shape
    assert [m.batch_size for m in micro_batches(exp, 4, by_length=False)] == [4] * (exp.batch_size // 4)


def test_a_token_budget_fills_micro_batches_of_short_responses_with_more_samples(smoke_cfg, tmp_path):
    trainer = make_trainer(smoke_cfg, tmp_path / "run", "trainer.total_steps=1")
    exp = _varied_lengths(trainer.rollout(0, Timings()), trainer.models.tokenizer.pad_token_id)
    budget = 4 * exp.sequences.shape[1]  # four samples at full width
    micros = list(micro_batches(exp, 4, by_length=True, token_budget=budget))
    assert sum(m.batch_size for m in micros) == exp.batch_size
    assert sum(int(m.response_mask.sum()) for m in micros) == int(exp.response_mask.sum())
    for m in micros:  # within the budget, or one sample alone
        assert m.batch_size * m.sequences.shape[1] <= budget or m.batch_size == 1
    # short responses share a pass with more samples, and no more passes are run than with four samples each
    fixed = list(micro_batches(exp, 4, by_length=True))
    assert max(m.batch_size for m in micros) > 4 and len(micros) <= len(fixed)
    # the greedy plan: a micro-batch closes only when the next sample would not fit
    for m, after in zip(micros, micros[1:]):
        first = int(after.response_mask.sum(-1)[0])
        first_prompt = int(after.attention_mask[0, : after.prompt_width].sum())
        assert (m.batch_size + 1) * (max(m.prompt_width, first_prompt) + max(m.response_width, first)) > budget


def test_micro_batch_plan_by_hand():
    # budget 26: (3+10)·1 → (3+10)·2 = 26 fits; a third sample would make 3·13 = 39: cut. Then 1·(2+4) → 2·6 → 3·6
    assert micro_batch_plan([3, 3, 2, 2, 1], [10, 6, 4, 2, 1], 26) == [2, 3]
    assert micro_batch_plan([3, 3], [30, 1], 26) == [1, 1]  # a sample wider than the budget runs alone
    assert micro_batch_plan([2] * 6, [2] * 6, 1000) == [6]
    assert micro_batch_plan([], [], 10) == []


def test_micro_batches_are_split_to_the_count_the_ranks_agree_on():
    assert split_to([4, 2], 2) == [4, 2]
    assert split_to([4, 2], 3) == [2, 2, 2]
    assert split_to([4, 2], 4) == [1, 1, 2, 2]  # the largest first, the first of equals
    assert split_to([5], 2) == [3, 2]
    with pytest.raises(ValueError, match="into 7"):
        split_to([4, 2], 7)
    with pytest.raises(ValueError, match="into 1"):
        split_to([4, 2], 1)


# ------------------------------------------------------------------------------------------------------ frozen models


def test_frozen_models_in_bf16_score_as_autocast_over_float32_weights(smoke_cfg, tmp_path):
    fp32 = make_trainer(smoke_cfg, tmp_path / "fp32", "trainer.total_steps=1")
    bf16 = make_trainer(smoke_cfg, tmp_path / "bf16", "trainer.total_steps=1", "trainer.mixed_precision=bf16")
    m16, m32 = bf16.models, fp32.models
    for frozen in (m16.ref, m16.reward.model, m16.cost.model):
        assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert m16.cost.model.normalizer.var.dtype == torch.float32
    for engine in m16.engines:  # trained models keep float32 weights
        assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
    exp = fp32.rollout(0, Timings())
    seqs, mask, width = exp.sequences, exp.attention_mask, exp.prompt_width
    with torch.no_grad(), m32.autocast(), torch.autocast("cpu", dtype=torch.bfloat16):  # the old way: cast per pass
        old_ref = sequence_logprobs(m32.ref, seqs, mask, width)
        old_reward = m32.reward.model.end_scores(seqs, mask)
        old_cost = m32.cost.model.end_scores(seqs, mask)
    with torch.no_grad(), m16.autocast():
        new_ref = sequence_logprobs(m16.ref, seqs, mask, width)
        new_reward = m16.reward.model.end_scores(seqs, mask)
        new_cost = m16.cost.model.end_scores(seqs, mask)
    # bf16 keeps 8 bits of mantissa: relative rounding 2^-8 per operation, a few of them in a row
    torch.testing.assert_close(new_ref, old_ref, rtol=0, atol=0.05)
    for new, old in ((new_reward, old_reward), (new_cost, old_cost)):
        torch.testing.assert_close(new, old, rtol=0, atol=0.05 * max(1.0, float(old.abs().max())))
    assert not torch.equal(new_ref, old_ref)  # it did run on other weights
