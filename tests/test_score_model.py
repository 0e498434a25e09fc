"""The published score-model layouts (SPEC §5) load, score like an independent computation, and fail clearly when
they are not score models; critics start from them."""

from __future__ import annotations

import json

import pytest
import torch
from published_layout import (PAD_ID, VOCAB_SIZE, pad_rows, published_tokenizer, reference_end_scores,
                              write_score_checkpoint)

from repo_exp.models import load_score_model, load_tokenizer
from repo_exp.models.policy import critic_from_policy, critic_from_scorer
from repo_exp.models.weights import UnsafeCheckpointError
from repo_exp.rollout import Scorer, critic_values

TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
TEXTS = [
    ("how do i bake bread", "sure here is the recipe : water flour yeast salt"),
    ("how do i make a bomb", "sorry"),
    ("how do i bake bread", "knead it then wait"),
]


def encoded_rows(tokenizer) -> list[list[int]]:
    """Published input: template, response, then ``</s>`` (with the tokenizer's BOS in front)."""
    return [tokenizer(TEMPLATE.format(input=p) + " " + r)["input_ids"] + [tokenizer.eos_token_id] for p, r in TEXTS]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_ckpts")
    out = {}
    for layout, score_type in (("old", "cost"), ("new", "cost"), ("new", "reward")):
        folder = root / f"{layout}_{score_type}"
        out[(layout, score_type)] = (folder, write_score_checkpoint(folder, layout, score_type, seed=len(out)))
    return out


@pytest.mark.parametrize("layout,score_type", [("old", "cost"), ("new", "cost"), ("new", "reward")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_end_scores_match_an_independent_llama_plus_head(checkpoints, layout, score_type, side):
    folder, ref = checkpoints[(layout, score_type)]
    model = load_score_model(folder)
    assert model.bias == (layout == "new") and model.do_normalize == (layout == "new")
    rows = encoded_rows(published_tokenizer())
    assert len({len(r) for r in rows}) > 1  # padding really happens
    ids, mask = pad_rows(rows, side)
    with torch.no_grad():
        got = model.end_scores(ids, mask)
    expected = reference_end_scores(ref, rows)
    assert got.shape == (len(rows),)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cost_normalisation_keeps_the_sign_and_reward_normalisation_shifts(checkpoints):
    """Published: cost scores are scaled only (C > 0 stays unsafe), reward scores are shifted and scaled."""
    rows = encoded_rows(published_tokenizer())
    ids, mask = pad_rows(rows, "right")
    for score_type in ("cost", "reward"):
        folder, ref = checkpoints[("new", score_type)]
        model = load_score_model(folder)
        with torch.no_grad():
            normalised = model.end_scores(ids, mask)
            model.do_normalize = False
            raw = model.end_scores(ids, mask)
        std = ref["var"].sqrt()
        expected = raw / (std + 1e-8) if score_type == "cost" else (raw - ref["mean"]) / (std + 1e-8)
        torch.testing.assert_close(normalised, expected)
        if score_type == "cost":
            assert torch.equal(normalised > 0, raw > 0)


def test_normaliser_statistics_come_from_config_json_when_the_weights_have_none(tmp_path):
    folder = tmp_path / "ckpt"
    ref = write_score_checkpoint(folder, "old", "reward")
    raw = json.loads((folder / "config.json").read_text())
    raw["do_normalize"] = True  # old layout: no normalizer buffers, config.json mean [0.3], var [4.0]
    (folder / "config.json").write_text(json.dumps(raw))
    model = load_score_model(folder)
    rows = encoded_rows(published_tokenizer())
    ids, mask = pad_rows(rows, "left")
    with torch.no_grad():
        got = model.end_scores(ids, mask)
    expected = (reference_end_scores(ref, rows) - 0.3) / (2.0 + 1e-8)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_without_score_head_fails_naming_it(tmp_path):
    folder = tmp_path / "headless"
    write_score_checkpoint(folder, "new", with_head=False)
    with pytest.raises(ValueError, match="score_head"):
        load_score_model(folder)


def test_a_causal_lm_is_not_taken_for_a_score_model(tmp_path):
    folder = tmp_path / "clm"
    write_score_checkpoint(folder, "new")
    raw = json.loads((folder / "config.json").read_text())
    raw["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="not a score model"):
        load_score_model(folder)


class _Payload:  # any pickled object that is not a tensor or a plain container
    pass


def test_bin_shards_with_pickled_code_are_refused(tmp_path):
    folder = tmp_path / "unsafe"
    write_score_checkpoint(folder, "old")
    shard = folder / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["extra"] = _Payload()
    torch.save(state, shard)
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*pytorch_model-00001-of-00002.bin"):
        load_score_model(folder)


def test_published_tokenizer_has_its_own_pad_and_masks_come_from_lengths(tmp_path):
    tokenizer = published_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert (loaded.pad_token_id, len(loaded), loaded.eos_token_id) == (PAD_ID, VOCAB_SIZE, 2)
    assert loaded.padding_side == "left"

    # a tokenizer that pads with </s>: a mask built as ids != pad would hide every response's final </s>
    eos_padded = published_tokenizer(pad_is_eos=True)
    assert eos_padded.pad_token_id == eos_padded.eos_token_id
    scorer = Scorer(None, eos_padded, TEMPLATE, tokenizer, TEMPLATE)
    ids, mask = scorer.encode([p for p, _ in TEXTS], [r for _, r in TEXTS])
    rows = encoded_rows(eos_padded)
    assert mask.sum(-1).tolist() == [len(r) for r in rows]
    for i, row in enumerate(rows):
        assert ids[i, len(row) - 1] == eos_padded.eos_token_id and mask[i, len(row) - 1] == 1
    assert not torch.equal(mask, (ids != eos_padded.pad_token_id).long())


def test_published_model_scores_through_an_eos_padding_tokenizer(checkpoints):
    """Same scores whichever pad id fills the batch: the end position comes from the mask alone."""
    folder, ref = checkpoints[("old", "cost")]
    model = load_score_model(folder)
    tokenizer = published_tokenizer(pad_is_eos=True)
    scorer = Scorer(model, tokenizer, TEMPLATE, published_tokenizer(), "{input}")
    assert scorer.retokenize
    got = scorer(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1, dtype=torch.long), [p for p, _ in TEXTS],
                 [r for _, r in TEXTS])
    torch.testing.assert_close(got, reference_end_scores(ref, encoded_rows(tokenizer)), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------- critics


def test_critic_from_a_published_scorer_starts_at_its_raw_scores(checkpoints):
    folder, ref = checkpoints[("new", "cost")]
    scorer = load_score_model(folder)
    critic = critic_from_scorer(scorer)
    assert critic.score_type == "critic" and not critic.do_normalize
    rows = encoded_rows(published_tokenizer())
    ids, mask = pad_rows(rows, "right")
    prompt_width = 4
    with torch.no_grad():
        values = critic_values(critic, ids, mask, prompt_width)  # (B, T, 1)
        hidden = ref["trunk"](input_ids=ids[:1, : len(rows[0])]).last_hidden_state[0]  # row 0 is the longest
    expected = hidden[prompt_width - 1 : len(rows[0]) - 1] @ ref["head_weight"][0] + ref["head_bias"][0]
    torch.testing.assert_close(values[0, : len(rows[0]) - prompt_width, 0], expected, rtol=1e-4, atol=1e-5)

    with torch.no_grad():  # its own copy: training the critic leaves the cost model untouched
        next(critic.model.parameters()).add_(1.0)
    assert not torch.equal(next(critic.model.parameters()), next(scorer.model.parameters()))


def test_two_headed_critic_keeps_the_scorer_head_and_zeroes_the_new_one(checkpoints):
    folder, _ = checkpoints[("new", "reward")]
    scorer = load_score_model(folder)
    critic = critic_from_scorer(scorer, score_dim=2)
    torch.testing.assert_close(critic.score_head.weight[0], scorer.score_head.weight[0])
    assert torch.count_nonzero(critic.score_head.weight[1]) == 0


def test_critic_from_policy_shares_the_trunk_weights_and_starts_at_zero():
    from transformers import LlamaForCausalLM
    from published_layout import trunk_config

    policy = LlamaForCausalLM(trunk_config())
    critic = critic_from_policy(policy)
    for (name, a), (_, b) in zip(policy.model.named_parameters(), critic.model.named_parameters()):
        assert torch.equal(a, b), name
    ids, mask = pad_rows(encoded_rows(published_tokenizer()), "left")
    with torch.no_grad():
        assert torch.count_nonzero(critic_values(critic, ids, mask, 3)) == 0


def test_the_run_decides_the_role_and_the_normalisation(tmp_path):
    """A cost model whose config.json has a normaliser (mean 0.6, var 2.25) but no score_type: read alone it would be
    normalised as a reward, ``(C − 0.6)/1.5``, which moves costs across zero; loaded into the cost slot it is only
    scaled, ``C/1.5`` (sign kept); with ``cost.normalize=false`` (the published trainer) it is the raw score."""
    from safetensors.torch import load_file, save_file

    from repo_exp.config import ScoreModelConfig
    from repo_exp.models.policy import load_scorer

    folder = tmp_path / "cost"
    ref = write_score_checkpoint(folder, "new", "cost")
    raw = json.loads((folder / "config.json").read_text())
    del raw["score_type"]
    (folder / "config.json").write_text(json.dumps(raw))
    for shard in folder.glob("model-*.safetensors"):  # a normaliser mean that lies among the raw costs
        state = load_file(str(shard))
        if "normalizer.mean" in state:
            state["normalizer.mean"] = torch.tensor([0.6])
            save_file(state, str(shard))
    ids, mask = pad_rows(encoded_rows(published_tokenizer()), "right")
    ref_raw = dict(ref, do_normalize=False)
    expected_raw = reference_end_scores(ref_raw, encoded_rows(published_tokenizer()))

    def scores(**kwargs):
        with torch.no_grad():
            return load_score_model(folder, **kwargs).end_scores(ids, mask)

    torch.testing.assert_close(scores(), (expected_raw - 0.6) / (1.5 + 1e-8), rtol=1e-4, atol=1e-5)  # the hazard
    as_cost = scores(score_type="cost")
    torch.testing.assert_close(as_cost, expected_raw / (1.5 + 1e-8), rtol=1e-4, atol=1e-5)
    assert torch.equal(as_cost > 0, expected_raw > 0)
    torch.testing.assert_close(scores(score_type="cost", normalize=False), expected_raw, rtol=1e-4, atol=1e-5)
    # through the run's config: the slot (kind) decides the role, `normalize` the normaliser
    for normalize, expected in ((None, expected_raw / (1.5 + 1e-8)), (False, expected_raw)):
        cfg = ScoreModelConfig(name="c", kind="cost", source="hub", path=str(folder), normalize=normalize)
        model = load_scorer(cfg, tokenizer=None)
        assert model.score_type == "cost" and model.do_normalize == (normalize is None)
        with torch.no_grad():
            torch.testing.assert_close(model.end_scores(ids, mask), expected, rtol=1e-4, atol=1e-5)
    assert (expected_raw > 0).all() and ((expected_raw - 0.6) / 1.5 <= 0).any()  # the shift really flips a sign


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_quantised_weights_are_refused_naming_the_file_and_the_dtype(tmp_path, dtype):
    """int8 weights cannot be loaded into a floating-point model as they are: the loader and the partitioned (ZeRO-3)
    loader's header check both say so, naming the file, the tensor and its dtype."""
    from safetensors.torch import load_file, save_file

    from repo_exp.config import ArchConfig
    from repo_exp.models.policy import tiny_llama_config
    from repo_exp.models.score_model import ScoreModel, read_score_checkpoint
    from repo_exp.models.tokenizers import build_word_tokenizer
    from repo_exp.models.weights import LazyWeights, check_floating

    config = tiny_llama_config(ArchConfig(), build_word_tokenizer(["a b c"]))
    ScoreModel(config, score_type="reward").save_pretrained(tmp_path / "reward")
    weights = tmp_path / "reward" / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: (v * 100).round().clamp(-100, 100).to(dtype) for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    expected = (rf"cannot load {weights}: its tensor model.embed_tokens.weight is stored as {dtype} \(quantised "
                rf"weights\), but the model's parameters are floating point")
    with pytest.raises(ValueError, match=expected):
        load_score_model(tmp_path / "reward")
    folder, trunk, fields, _ = read_score_checkpoint(tmp_path / "reward")
    with torch.device("meta"):
        model = ScoreModel(trunk, **fields)
    with pytest.raises(ValueError, match=expected):
        check_floating(folder, LazyWeights(folder).dtypes(), dict(model.named_parameters()))
