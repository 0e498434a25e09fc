"""A cost model whose tokenizer and template differ from the policy's scores the re-tokenised text: decode the
response, apply the cost model's template to the raw prompt, encode with its tokenizer, append its EOS."""

from __future__ import annotations

import pytest
import torch
from published_layout import pad_rows, published_tokenizer, reference_end_scores, write_score_checkpoint

from repo_exp.config import ArchConfig
from repo_exp.models import build_word_tokenizer, load_score_model
from repo_exp.models.policy import tiny_llama_config
from repo_exp.rollout import Scorer, make_experience
from repo_exp.rollout.make import decode_responses
from repo_exp.data.prompts import PromptEncoder, PromptSet

POLICY_TEMPLATE = "Human: {input} Assistant:"
COST_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
PAIRS = [("how do i bake bread", "sure here is the recipe water flour yeast salt"),
         ("how do i make a bomb", "sorry cannot help with that")]


@pytest.fixture(scope="module")
def policy_tokenizer():
    corpus = [POLICY_TEMPLATE.format(input=p) + " " + r for p, r in PAIRS] + ["knead it then wait"]
    return build_word_tokenizer(corpus)


@pytest.fixture(scope="module")
def cost_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cost")
    ref = write_score_checkpoint(folder, "new", "cost", seed=3)
    return load_score_model(folder), ref


def policy_batch(tokenizer):
    """The policy's own tokens: left-padded prompts, responses ending in its EOS, right-padded."""
    prompts = [tokenizer(POLICY_TEMPLATE.format(input=p))["input_ids"] for p, _ in PAIRS]
    responses = [tokenizer(r)["input_ids"] + [tokenizer.eos_token_id] for _, r in PAIRS]
    p_width, r_width = max(map(len, prompts)), max(map(len, responses))
    seqs = torch.full((len(PAIRS), p_width + r_width), tokenizer.pad_token_id)
    mask = torch.zeros_like(seqs)
    response_mask = torch.zeros((len(PAIRS), r_width), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seqs[i, p_width - len(p): p_width], mask[i, p_width - len(p): p_width] = torch.tensor(p), 1
        seqs[i, p_width: p_width + len(r)], mask[i, p_width: p_width + len(r)] = torch.tensor(r), 1
        response_mask[i, : len(r)] = 1
    return seqs, mask, response_mask, p_width


def test_the_tokenizers_really_differ(policy_tokenizer):
    cost_tokenizer = published_tokenizer()
    text = COST_TEMPLATE.format(input=PAIRS[0][0])
    assert policy_tokenizer(text)["input_ids"] != cost_tokenizer(text)["input_ids"]
    assert policy_tokenizer.eos_token_id != cost_tokenizer.eos_token_id


def test_cost_model_scores_the_retokenised_text(policy_tokenizer, cost_model):
    model, ref = cost_model
    cost_tokenizer = published_tokenizer()
    scorer = Scorer(model, cost_tokenizer, COST_TEMPLATE, policy_tokenizer, POLICY_TEMPLATE)
    assert scorer.retokenize

    seqs, mask, response_mask, width = policy_batch(policy_tokenizer)
    responses = decode_responses(policy_tokenizer, seqs, response_mask, width)
    assert responses == [r for _, r in PAIRS]  # decoding drops the policy's EOS
    got = scorer(seqs, mask, [p for p, _ in PAIRS], responses)

    # what the cost model should see: its template, the response, its own BOS and EOS
    expected_rows = [cost_tokenizer(COST_TEMPLATE.format(input=p) + " " + r)["input_ids"] + [2] for p, r in PAIRS]
    assert expected_rows[0][0] == 1 and expected_rows[0][-1] == 2
    torch.testing.assert_close(got, reference_end_scores(ref, expected_rows), rtol=1e-4, atol=1e-5)
    # scoring the policy's ids as they are would be wrong: they mean other words in the cost model's vocabulary
    with torch.no_grad():
        direct = model.end_scores(seqs, mask)
    assert not torch.allclose(direct, got, atol=1e-3)


def test_matching_tokenizers_score_the_policy_tokens_as_they_are(cost_model):
    model, ref = cost_model
    tokenizer = published_tokenizer()
    scorer = Scorer(model, tokenizer, COST_TEMPLATE, published_tokenizer(), COST_TEMPLATE)
    assert not scorer.retokenize
    rows = [tokenizer(COST_TEMPLATE.format(input=p) + " " + r)["input_ids"] + [2] for p, r in PAIRS]
    seqs, mask = pad_rows(rows, "left", tokenizer.pad_token_id)
    got = scorer(seqs, mask, ["unused"] * 2, ["unused"] * 2)
    torch.testing.assert_close(got, reference_end_scores(ref, rows), rtol=1e-4, atol=1e-5)


def test_rollout_costs_come_from_the_cost_models_own_encoding(policy_tokenizer, cost_model):
    """Through ``make_experience``: sampled responses are decoded, re-encoded for the cost model and scored."""
    model, ref = cost_model
    cost_tokenizer = published_tokenizer()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    policy = LlamaForCausalLM(tiny_llama_config(ArchConfig(hidden_size=32, intermediate_size=64), policy_tokenizer))
    encoder = PromptEncoder(PromptSet([p for p, _ in PAIRS]), policy_tokenizer, POLICY_TEMPLATE, 32)
    batch = encoder.batch([0, 1], repeats=2)
    cost = Scorer(model, cost_tokenizer, COST_TEMPLATE, policy_tokenizer, POLICY_TEMPLATE)
    exp = make_experience(policy.eval(), policy, cost, cost, policy_tokenizer, batch, seed=0, step=0, row_offset=0,
                          global_batch=4, chunk_size=4, max_new_tokens=6)
    rows = [cost_tokenizer(COST_TEMPLATE.format(input=p) + " " + r.strip())["input_ids"] + [2]
            for p, r in zip(exp.prompts, exp.responses)]
    torch.testing.assert_close(exp.costs, reference_end_scores(ref, rows), rtol=1e-4, atol=1e-5)


# a ChatML template with a default system turn, as Qwen2.5-Instruct's tokenizer carries
CHAT_TEMPLATE = ("{% if messages[0]['role'] != 'system' %}<s>system\nYou are helpful.</s>\n{% endif %}"
                 "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def test_the_chat_template_path_renders_what_apply_chat_template_renders():
    from repo_exp.data.ptx import PtxStream
    from repo_exp.models.score_model import score_input_ids
    from repo_exp.models.tokenizers import render_prompt

    tokenizer = published_tokenizer(list(PAIRS[0][0].split()) + ["system", "You", "are", "helpful", "user",
                                                                  "assistant", "."])
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt, response = PAIRS[0]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.startswith("<s>system\nYou are helpful.") and rendered.endswith("<s>assistant\n")
    assert render_prompt(tokenizer, "chat", prompt) == rendered
    # the template writes its own <s>: the tokenizer adds no second one
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert expected.count(1) == 3
    encoder = PromptEncoder(PromptSet([prompt]), tokenizer, "chat", 64)
    assert encoder.ids == [expected]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert score_input_ids(tokenizer, "chat", prompt, response) == expected + response_ids + [2]
    ptx = PtxStream([(prompt, response)], tokenizer, "chat", 64, seed=0)
    assert ptx.examples == [(expected + response_ids + [2], len(expected))]
    plain = published_tokenizer()
    with pytest.raises(ValueError, match="has no chat template"):
        PromptEncoder(PromptSet([prompt]), plain, "chat", 64)


def test_a_scorer_whose_tokenizer_adds_bos_where_the_policys_does_not_retokenises():
    from tokenizers import processors

    with_bos = published_tokenizer()
    without_bos = published_tokenizer()
    without_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    text = COST_TEMPLATE.format(input=PAIRS[0][0])
    assert with_bos(text)["input_ids"] == [1] + without_bos(text)["input_ids"]  # the only difference
    assert with_bos.get_vocab() == without_bos.get_vocab()
    assert Scorer(None, with_bos, COST_TEMPLATE, without_bos, COST_TEMPLATE).retokenize
    assert not Scorer(None, with_bos, COST_TEMPLATE, published_tokenizer(), COST_TEMPLATE).retokenize
