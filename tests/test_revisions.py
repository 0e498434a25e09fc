"""Pinned revisions: offline, a pin the hub cache does not hold fails naming both revisions (before anything loads);
the commit actually loaded is checked against the pin; PTX joins Alpaca's input to the instruction."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

from repo_exp.config import DataConfig, ModelConfig, PtxConfig
from repo_exp.data.pku import load_pku_split
from repo_exp.data.ptx import load_ptx_pairs
from repo_exp.models.policy import load_policy
from repo_exp.models.score_model import load_score_model
from repo_exp.models.tokenizers import build_word_tokenizer, load_tokenizer
from repo_exp.revisions import RevisionError, check_loaded, dataset_commit
from published_layout import write_score_checkpoint

CACHED, PINNED = "a" * 40, "b" * 40


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A hub cache in a temp HF_HOME holding one snapshot (refs/main → it) of a model, a score model and a dataset."""
    import huggingface_hub.constants

    hub = tmp_path / "hf" / "hub"
    for repo in ("models--org--policy", "models--org--scorer", "datasets--org--prompts"):
        (hub / repo / "snapshots" / CACHED).mkdir(parents=True)
        (hub / repo / "refs").mkdir()
        (hub / repo / "refs" / "main").write_text(CACHED)
    write_score_checkpoint(hub / "models--org--scorer" / "snapshots" / CACHED, "new", "reward")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub


def test_a_pinned_revision_not_in_the_offline_cache_fails_naming_both(offline_cache):
    both = rf"pinned revision {PINNED} is not in the offline hub cache .* holds {CACHED}"
    with pytest.raises(RevisionError, match=both):
        load_policy(ModelConfig(name="p", source="hub", path="org/policy", revision=PINNED), tokenizer=None)
    with pytest.raises(RevisionError, match=both):
        load_tokenizer("org/policy", revision=PINNED)
    with pytest.raises(RevisionError, match=both):
        load_score_model("org/scorer", revision=PINNED)
    with pytest.raises(RevisionError, match=both):
        load_pku_split(DataConfig(name="d", source="pku_saferlhf", path="org/prompts", revision=PINNED), "train")
    with pytest.raises(RevisionError, match=both):
        load_ptx_pairs(PtxConfig(source="hub", path="org/prompts", revision=PINNED))
    with pytest.raises(RevisionError, match=r"pinned revision v2 is not in the offline hub cache"):
        load_score_model("org/scorer", revision="v2")  # a tag the cache has no ref for


def test_the_cached_revision_loads_by_hash_or_by_ref(offline_cache):
    for revision in (CACHED, "main"):
        model = load_score_model("org/scorer", revision=revision)
        assert model.score_head.weight.shape[0] == 1


def test_a_loaded_commit_other_than_the_pinned_one_is_refused():
    arrow = f"/cache/datasets/org___prompts/default/0.0.0/{CACHED}/prompts-train.arrow"
    loaded = dataset_commit(type("Dataset", (), {"cache_files": [{"filename": arrow}]})())
    assert loaded == CACHED
    with pytest.raises(RevisionError, match=f"pinned revision {PINNED} was asked for but {CACHED} was loaded"):
        check_loaded("dataset", "org/prompts", PINNED, loaded)
    check_loaded("dataset", "org/prompts", CACHED, loaded)
    check_loaded("dataset", "org/prompts", "main", loaded)  # a branch: logged, not compared


def test_ptx_joins_alpacas_input_to_the_instruction(tmp_path):
    rows = [{"instruction": "Translate", "input": "bonjour", "output": "hello"},
            {"instruction": "Say hi", "input": "", "output": "hi"}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = PtxConfig(source="file", path=str(path), prompt_column="instruction", response_column="output",
                       input_column="input")
    assert load_ptx_pairs(config) == [("Translate bonjour", "hello"), ("Say hi", "hi")]
    config.input_column = "context"
    with pytest.raises(ValueError, match="no column 'context'"):
        load_ptx_pairs(config)


def test_every_hub_preset_pins_a_revision_or_says_why_not():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf"
    for path in [*conf.glob("model/*.yaml"), *conf.glob("reward/*.yaml"), *conf.glob("cost/*.yaml"),
                 *conf.glob("data/*.yaml"), *conf.glob("eval/data/*.yaml"), *conf.glob("experiment/paper/*.yaml")]:
        text = path.read_text()
        if "source: hub" not in text and "source: pku_saferlhf" not in text:
            continue
        lines = [line for line in text.splitlines() if line.strip().startswith("revision:")]
        assert lines, f"{path.name} names a hub source but no revision"
        for line in lines:
            assert "null" not in line or "no published commit" in text, f"{path.name}: {line.strip()}"
