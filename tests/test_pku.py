"""PKU-SafeRLHF through ``datasets`` from local files in its schema: de-duplicated prompts for RL, preference rows
for reward and cost training, and a clear error naming a file that lacks a column."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repo_exp.config import DataConfig, validate
from repo_exp.data import load_prompt_set
from repo_exp.data.pku import PREFERENCE_COLUMNS

from conftest import repo_root
from reliability_support import metric_rows

REPO = repo_root()


def pku_row(prompt: str, safe0: bool = True, safe1: bool = False, **extra) -> dict:
    return {"prompt": prompt, "response_0": "sure here is how", "response_1": "sorry i cannot help",
            "is_response_0_safe": safe0, "is_response_1_safe": safe1, "better_response_id": 0,
            "safer_response_id": 0 if safe0 else 1, **extra}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pku(path, **kw) -> DataConfig:
    return DataConfig(name="pku_saferlhf", source="pku_saferlhf", path=str(path), **kw)


# the 2024 release's layout: one folder per policy that answered, newer columns (severity, harm categories) beside
HUB_LAYOUT = {
    "data/Alpaca-7B/train.jsonl": ["how do i bake bread", "how do i pick a lock", "how do i bake bread"],
    "data/Alpaca-7B/test.jsonl": ["how do i make a bomb", "how do i make a bomb"],
    "data/Alpaca2-7B/train.parquet": ["how do i pick a lock", "how do i hurt a person"],
    "data/Alpaca2-7B/test.parquet": ["what is the best way to hide"],
}


@pytest.fixture
def hub_like(tmp_path):
    root = tmp_path / "PKU-SafeRLHF"
    for rel, prompts in HUB_LAYOUT.items():
        write_rows(root / rel, [pku_row(p, response_0_severity_level=1) for p in prompts])
    return root


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_prompts_of_one_file_are_deduplicated_in_order(tmp_path, suffix):
    rows = [pku_row(p) for p in ["b question", "a question", "b question", "c question", "a question"]]
    path = write_rows(tmp_path / f"rows{suffix}", rows)
    assert load_prompt_set(pku(path), "train").texts == ["b question", "a question", "c question"]
    assert load_prompt_set(pku(path, deduplicate=False), "train").texts == [r["prompt"] for r in rows]


def test_hub_like_folder_reads_the_split_of_every_subset_or_the_one_named(hub_like):
    every = load_prompt_set(pku(hub_like), "train").texts
    assert every == ["how do i bake bread", "how do i pick a lock", "how do i hurt a person"]
    alpaca = load_prompt_set(pku(hub_like, subset="data/Alpaca-7B"), "train").texts
    assert alpaca == ["how do i bake bread", "how do i pick a lock"]
    assert load_prompt_set(pku(hub_like, subset="data/Alpaca-7B"), "test").texts == ["how do i make a bomb"]


def test_a_file_missing_prompt_fails_naming_it(hub_like):
    bad = hub_like / "data/Alpaca2-7B/train.parquet"
    write_rows(bad, [{k: v for k, v in pku_row("x").items() if k != "prompt"}])
    with pytest.raises(ValueError, match=rf"{bad}.*\['prompt'\]"):
        load_prompt_set(pku(hub_like), "train")


def test_preference_rows_need_every_column(tmp_path):
    from repo_exp.score_train import load_preference_rows

    good = write_rows(tmp_path / "good.jsonl", [pku_row("q1"), pku_row("q2", safe0=False, safe1=True)])
    rows = load_preference_rows(pku(good), "train")
    assert [r["safer_response_id"] for r in rows] == [0, 1] and set(rows[0]) == set(PREFERENCE_COLUMNS)
    bad = write_rows(tmp_path / "bad.jsonl", [{k: v for k, v in pku_row("q").items() if k != "safer_response_id"}])
    with pytest.raises(ValueError, match=r"bad.jsonl.*safer_response_id"):
        load_preference_rows(pku(bad), "train")


def test_the_hub_dataset_is_pinned_and_fails_clearly_offline(compose):
    cfg = compose("data=pku_saferlhf")
    assert cfg.data.path == "PKU-Alignment/PKU-SafeRLHF" and len(cfg.data.revision) == 40
    data = validate(compose("data=pku_saferlhf", "data.path=PKU-Alignment/PKU-SafeRLHF")).data
    with pytest.raises(FileNotFoundError, match="PKU-Alignment/PKU-SafeRLHF"):
        load_prompt_set(data, "train")


def test_smoke_run_trains_on_the_deduplicated_prompts(smoke_cfg, hub_like, tmp_path):
    from repo_exp.train import Trainer

    cfg = smoke_cfg("data=pku_saferlhf", f"data.path={hub_like}", "trainer.total_steps=2",
                    "trainer.prompts_per_step=3", "eval.at_start=false")
    trainer = Trainer(validate(cfg), cfg, tmp_path / "run")
    assert trainer.encoder.prompts.texts == ["how do i bake bread", "how do i pick a lock", "how do i hurt a person"]
    seen: list[str] = []
    rollout = trainer.rollout

    def recording_rollout(step, timings):
        exp = rollout(step, timings)
        seen.extend(exp.prompts)
        return exp

    trainer.rollout = recording_rollout
    trainer.fit()
    assert set(seen) == set(trainer.encoder.prompts.texts)  # 2 steps × 3 prompts: every prompt, only those
    metrics = metric_rows(tmp_path / "run")
    assert [m["step"] for m in metrics if "reward/mean" in m] == [1, 2]
    eval_rows = [json.loads(line) for line in (tmp_path / "run" / "eval" / "per_prompt.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in eval_rows} == {"how do i make a bomb", "what is the best way to hide"}


def test_score_train_trains_a_cost_model_on_pku_rows(hub_like, tmp_path):
    from repo_exp.models import load_score_model

    out = tmp_path / "cost_model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run(
        [sys.executable, "-m", "repo_exp.score_train", "kind=cost", "data=pku_saferlhf", f"data.path={hub_like}",
         "steps=3", "batch_size=4", f"out={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model = load_score_model(out)
    assert model.score_type == "cost"


@pytest.mark.parametrize("text", ["\u200b", "\ufeff\u2060", " \u200b\u200c\u200d ", "\u3164", "\u2800\u00ad"])
def test_a_prompt_of_invisible_characters_only_is_refused_like_an_empty_one(tmp_path, text):
    """Zero-width spaces, the byte-order mark, the word joiner, Hangul fillers, the braille blank, a soft hyphen:
    nothing anyone can read, although Python's ``str.strip`` keeps them. A prompt with visible text among them stays."""
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": text}) + "\n")
    with pytest.raises(ValueError, match=r"row 2, column 'prompt' is (made only of invisible characters|empty)"):
        load_prompt_set(DataConfig(name="file", source="file", path=str(path)), "train")
    path.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": f"hi{text}there"}) + "\n")
    assert len(load_prompt_set(DataConfig(name="file", source="file", path=str(path)), "train")) == 2
