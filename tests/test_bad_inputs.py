"""The README's table "Bad input and the message it gets", row by row: each row's input goes to the real entry point
(``python -m repo_exp``, a non-zero exit) or the real loader, and the message must contain the row's excerpt.

The rows are read from the README, so the table and the tests cannot drift apart: a row without a case here, or a
case without a row, fails ``test_every_row_has_a_case``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
from hydra.errors import HydraException

from repo_exp.config import ConfigError, DataConfig, ScoreModelConfig, validate
from repo_exp.data.prompts import load_prompt_set
from repo_exp.models.policy import load_scorer
from repo_exp.models.score_model import load_score_model
from repo_exp.models.tokenizers import build_word_tokenizer, load_tokenizer
from repo_exp.models.weights import load_state_dict_safely
from repo_exp.score_train import load_preference_rows

from reliability_support import ROOT, checkpoint, cli, make_trainer  # noqa: F401  (a fixture)
from test_safety import malicious_bin

SECTION = "## Bad input and the message it gets"


def readme_rows() -> dict[str, str]:
    """{bad input: message excerpt} of the README's table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[: section.find("\n## ", len(SECTION))] if "\n## " in section[len(SECTION):] else section
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("bad input", "---") or set(cells[0]) <= {"-"}:
            continue
        rows[cells[0]] = cells[2].strip("`")
    return rows


def chain(exc: BaseException) -> str:
    """An exception's message with those of its causes, as the command line prints them."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__
    return "\n".join(parts)


class Case:
    """What a case may use: the composed-config factory, a scratch folder, a real checkpoint."""

    def __init__(self, smoke_cfg, tmp_path: Path, checkpoint: Path) -> None:
        self.smoke_cfg, self.tmp, self.checkpoint = smoke_cfg, tmp_path, checkpoint

    def config(self, *overrides: str) -> str:
        with pytest.raises((ConfigError, HydraException)) as info:
            validate(self.smoke_cfg(*overrides))
        return chain(info.value)

    def trainer(self, *overrides: str, run_dir: Path | None = None) -> str:
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            make_trainer(self.smoke_cfg, run_dir or self.tmp / "run", *overrides)
        return chain(info.value)

    def cli(self, *args: str, exit_code: int | None = None) -> str:
        done = cli("experiment=smoke", "logger=none", "trainer.progress=false", f"hydra.run.dir={self.tmp / 'cli'}",
                   *args)
        assert done.returncode != 0, done.stdout[-2000:]
        if exit_code is not None:
            assert done.returncode == exit_code, done.stdout[-2000:]
        return done.stdout

    def loader(self, load: Callable[[], object], *errors: type[BaseException]) -> str:
        with pytest.raises(errors or (ValueError, FileNotFoundError)) as info:
            load()
        return chain(info.value)

    def file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path

    def prompts(self, path: Path) -> str:
        return self.loader(lambda: load_prompt_set(DataConfig(name="file", source="file", path=str(path)), "train"))


def no_pad_tokenizer(case: Case) -> str:
    tokenizer = build_word_tokenizer(["hello world"])
    tokenizer.pad_token = None
    tokenizer.save_pretrained(case.tmp / "tokenizer")
    return case.loader(lambda: load_tokenizer(str(case.tmp / "tokenizer")))


def score_model_as_resume(case: Case) -> str:
    return case.cli(f"trainer.resume={case.checkpoint / 'cost_critic'}")


def truncated_resume(case: Case) -> str:
    folder = case.tmp / "step_000002"
    shutil.copytree(case.checkpoint, folder)
    weights = folder / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return case.trainer(f"trainer.resume={folder}")


def fresh_run_in_used_folder(case: Case) -> str:
    run_dir = case.checkpoint.parents[1]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    message = case.trainer(run_dir=run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before, "the refused run changed files"
    return message


def payload_bin(case: Case) -> str:
    malicious_bin(case.tmp / "reward" / "pytorch_model.bin", case.tmp / "ran")
    message = case.loader(lambda: load_state_dict_safely(case.tmp / "reward"))
    assert not (case.tmp / "ran").exists()
    return message


def truncated_weights(case: Case) -> str:
    folder = case.tmp / "cost"
    shutil.copytree(case.checkpoint / "cost_critic", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return case.loader(lambda: load_score_model(folder))


def causal_lm_as_cost_model(case: Case) -> str:
    cfg = ScoreModelConfig(name="cost", kind="cost", source="hub", path=str(case.checkpoint / "policy"))
    tokenizer = build_word_tokenizer(["hello"])
    return case.loader(lambda: load_scorer(cfg, tokenizer))


CASES: dict[str, Callable[[Case], str]] = {
    "a threshold that is not finite": lambda c: c.config("constraint.threshold=nan"),
    "a learning rate that is not positive": lambda c: c.config("optimizer.critic.lr=0"),
    "a length that is not positive": lambda c: c.config("trainer.max_new_tokens=0"),
    "prompt and response longer than the model's context": lambda c: c.config("trainer.max_prompt_length=250"),
    "a value of the wrong type": lambda c: c.config("trainer.total_steps=ten"),
    "a misspelt key": lambda c: c.config("trainer.total_step=10"),
    "an option a group does not have": lambda c: c.config("constraint=averge"),
    "a probability out of range": lambda c: c.config("trainer.top_p=1.5"),
    "per-prompt granularity with one response per prompt":
        lambda c: c.config("constraint.granularity=prompt", "trainer.samples_per_prompt=1"),
    "a batch that does not split into the minibatches": lambda c: c.config("ppo.num_minibatches=3"),
    "a template with a placeholder other than `{input}`": lambda c: c.config("model.template='{input} {system}'"),
    "an unknown learning-rate schedule": lambda c: c.config("optimizer.actor_scheduler.name=cosine_warmup"),
    "both a checkpoint to resume and one to start from":
        lambda c: c.config("trainer.resume=/a", "trainer.init_from=/b"),
    "an out-of-range value on the command line (exit 2)": lambda c: c.cli("constraint.lambda_max=inf", exit_code=2),
    "a prompt file without the prompt column (command line)":
        lambda c: c.cli("data=file", f"data.path={c.file('prompts.csv', 'text' + chr(10) + 'hello there' + chr(10))}"),
    "an empty prompt file": lambda c: c.prompts(c.file("empty.jsonl", "")),
    "a prompt file with a header and no rows": lambda c: c.prompts(c.file("prompts.csv", "prompt\n")),
    "a prompt file that does not exist": lambda c: c.prompts(c.tmp / "missing.csv"),
    "a prompt file of an unknown type": lambda c: c.prompts(c.file("prompts.txt", "hello\n")),
    "every prompt longer than the prompt limit": lambda c: c.trainer("trainer.max_prompt_length=2"),
    "preference rows without the PKU-SafeRLHF columns": lambda c: c.loader(lambda: load_preference_rows(
        DataConfig(name="pku", source="pku_saferlhf",
                   path=str(c.file("pairs.jsonl", '{"prompt": "p", "response_0": "a"}\n'))), "train")),
    "a tokenizer without a pad token": no_pad_tokenizer,
    "a causal LM given as a cost model": causal_lm_as_cost_model,
    "a score model given as `trainer.resume` (command line)": score_model_as_resume,
    "a run folder given as `trainer.resume`": lambda c: c.trainer(f"trainer.resume={c.checkpoint.parents[1]}"),
    "a truncated checkpoint given as `trainer.resume`": truncated_resume,
    "a checkpoint of another constraint": lambda c: c.trainer("constraint=average", f"trainer.resume={c.checkpoint}"),
    "a new run in a folder that holds a run": fresh_run_in_used_folder,
    "a `.bin` checkpoint that pickles code": payload_bin,
    "a truncated weights file": truncated_weights,
    "a model that is neither a folder nor in the hub cache":
        lambda c: c.loader(lambda: load_score_model("no-such-org/no-such-model")),
}
ROWS = readme_rows()


def test_every_row_has_a_case():
    assert len(ROWS) >= 15
    assert sorted(ROWS) == sorted(CASES)


@pytest.mark.parametrize("row", sorted(CASES))
def test_bad_input_gets_its_message(row, smoke_cfg, tmp_path, checkpoint):
    message = CASES[row](Case(smoke_cfg, tmp_path, checkpoint))
    expected = ROWS[row]
    assert len(expected) > 8, f"{row}: the README gives no message to check"
    assert expected in message, f"{row}: expected {expected!r} in:\n{message[-3000:]}"
    assert not re.search(r"Traceback.*Traceback", message, re.S), "an error while reporting the error"
