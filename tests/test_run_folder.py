"""One owner per run folder, resumes that continue the same run, and outputs that a kill cannot leave half-written.

Each test gives the input to the real entry point (``python -m repo_exp``, ``python -m repo_exp.evaluate``) or the
real ``Trainer`` and checks the outcome: refused with a message naming the folder, the setting or the file, or
handled correctly; and nothing already written lost or altered (file hashes before and after). ``.owner.json`` (who
last claimed the folder) and Hydra's log file are left out of the comparison: every launch writes them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repo_exp import run_folder
from repo_exp.checkpoint import CheckpointManager, CheckpointWriteError, verify
from repo_exp.report import build_report

from conftest import SMOKE
from reliability_support import QUICK, ROOT, checkpoint, cli, make_trainer, metric_rows  # noqa: F401  (a fixture)

VOLATILE = (".owner.json",)


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in VOLATILE and p.suffix != ".log"}


def copy_run(checkpoint: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(checkpoint.parents[1], run)
    return run


# --------------------------------------------------------------------------------------------------- one owner


HOLD = """
import sys, time
from pathlib import Path
from repo_exp.run_folder import claim
claim(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def hold(folder: Path) -> subprocess.Popen:
    """Another process that owns ``folder`` until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("resume", [None, "auto"])
def test_a_second_process_on_a_held_run_folder_is_refused_naming_the_holder(resume, checkpoint, smoke_cfg, tmp_path):
    run = copy_run(checkpoint, tmp_path)
    holder = hold(run)
    try:
        before = hashes(run)
        overrides = ["trainer.total_steps=2"] + ([f"trainer.resume={resume}"] if resume else [])
        with pytest.raises(run_folder.RunFolderBusy, match=rf"the run folder {run} is in use by another process "
                                                           rf"\(pid {holder.pid} on host "):
            make_trainer(smoke_cfg, run, *overrides)
        assert hashes(run) == before
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its process: the same resume goes ahead
    trainer = make_trainer(smoke_cfg, run, "trainer.total_steps=2", "trainer.resume=auto")
    assert trainer.start_step == 2


def _popen(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "repo_exp", *SMOKE, "trainer.num_threads=1", "eval.at_start=false",
                             *overrides, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _training_steps(run_dir: Path) -> list[int]:
    if not (run_dir / "metrics.jsonl").is_file():
        return []
    return [r["step"] for r in metric_rows(run_dir) if "reward/mean" in r]


@pytest.mark.slow
def test_two_runs_started_at_once_on_one_folder_exactly_one_runs(tmp_path):
    run = tmp_path / "run"
    first, second = (_popen(run, "trainer.total_steps=12", "trainer.resume=auto") for _ in range(2))
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    codes = sorted([first.returncode, second.returncode])
    assert codes[0] == 0 and codes[1] != 0, outputs
    refused = outputs[[first.returncode, second.returncode].index(codes[1])]
    assert "is in use by another process (pid" in refused
    assert _training_steps(run) == list(range(1, 13))
    assert verify(run / "checkpoints" / "step_000012") is None


@pytest.mark.slow
def test_a_requeued_duplicate_never_corrupts_the_first_run(tmp_path):
    """The same ``trainer.resume=auto`` command started again while the first still runs (a cluster requeue)."""
    run = tmp_path / "run"
    # long enough to outlast the duplicate's start-up (imports, Hydra) on a fast machine
    steps = 150
    first = _popen(run, f"trainer.total_steps={steps}", "trainer.save_every=25", "trainer.resume=auto")
    deadline = time.time() + 300
    while not _training_steps(run) and time.time() < deadline:
        time.sleep(0.5)
    duplicate = _popen(run, f"trainer.total_steps={steps}", "trainer.save_every=25", "trainer.resume=auto")
    out = duplicate.communicate(timeout=300)[0]
    assert duplicate.returncode != 0 and f"is in use by another process (pid {first.pid} " in out, out[-2000:]
    assert first.communicate(timeout=600)[0] and first.returncode == 0
    assert _training_steps(run) == list(range(1, steps + 1))
    assert [r["step"] for r in metric_rows(run) if "eval/num_prompts" in r] == [steps]
    assert (run / "eval" / "per_prompt.jsonl").is_file()
    assert all(verify(c) is None for c in CheckpointManager(run / "checkpoints").checkpoints())


@pytest.fixture(scope="module")
def hydra_run(tmp_path_factory) -> Path:
    """A finished two-step run made by ``python -m repo_exp`` (Hydra's files, checkpoint, final evaluation)."""
    run = tmp_path_factory.mktemp("hydra") / "run"
    done = cli(*QUICK, "eval.at_end=true", "trainer.total_steps=2", "trainer.save_every=1", f"hydra.run.dir={run}",
               "experiment=smoke", "logger=none", "trainer.progress=false")
    assert done.returncode == 0, done.stdout[-3000:]
    return run


def test_evaluate_refuses_a_training_run_folder_and_changes_nothing(hydra_run):
    before = hashes(hydra_run)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "repo_exp.evaluate", *SMOKE, f"hydra.run.dir={hydra_run}"], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode != 0
    assert f"{hydra_run} holds a training run: an evaluation written there would overwrite" in done.stdout
    assert hashes(hydra_run) == before


# ----------------------------------------------------------------------------------- data the run does not own


def tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed): files by content hash, folders and links by kind."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = ("link" if path.is_symlink() else "dir" if path.is_dir()
                    else hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def users_checkpoints(target: Path) -> Path:
    """What a user keeps on a bigger disk: an unfinished-looking ``step_000001`` (no manifest) full of their files."""
    (target / "step_000001").mkdir(parents=True)
    (target / "step_000001" / "thesis.tex").write_text("chapter one")
    (target / "step_000005" / "policy").mkdir(parents=True)
    (target / "step_000005" / "policy" / "notes.md").write_text("keep me")
    return target


def test_a_symlinked_checkpoints_folder_is_refused_and_nothing_at_its_target_is_touched(checkpoint, smoke_cfg,
                                                                                       tmp_path):
    """checkpoints/ as a link to a bigger disk: ``trainer.resume=auto`` would take the user's ``step_*`` folders
    there for this run's unfinished checkpoints, and rotation (``keep_last=1``) would delete them."""
    run = copy_run(checkpoint, tmp_path)
    shutil.rmtree(run / "checkpoints")
    disk = users_checkpoints(tmp_path / "disk" / "checkpoints")
    (run / "checkpoints").symlink_to(disk, target_is_directory=True)
    before, inside = tree(tmp_path / "disk"), hashes(run)
    with pytest.raises(run_folder.RunFolderRefused, match=rf"{run / 'checkpoints'} is a symbolic link out of the run "
                                                          rf"folder \(to {disk}\)"):
        make_trainer(smoke_cfg, run, "trainer.resume=auto", "trainer.keep_last=1", "trainer.total_steps=3").fit()
    assert tree(tmp_path / "disk") == before
    assert hashes(run) == inside


@pytest.mark.parametrize("entry", ["eval", ".owner.lock", "checkpoints/step_000002/policy"])
def test_a_link_out_of_the_run_folder_is_never_followed(entry, checkpoint, smoke_cfg, tmp_path):
    """A symlinked eval/ or .owner.lock (or a link inside a checkpoint): the evaluation files, the lock or a rotated
    checkpoint would be written or deleted at the link's target, outside the run folder."""
    run = copy_run(checkpoint, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "kept.txt").write_text("the user's")
    link = run / entry
    if link.is_dir():
        shutil.rmtree(link)
    elif link.exists():
        link.unlink()
    link.symlink_to(elsewhere / "target" if entry == ".owner.lock" else elsewhere)  # the lock: a file not there yet
    before = tree(elsewhere)
    with pytest.raises(run_folder.RunFolderRefused, match=rf"{link} is a symbolic link out of the run folder "
                                                          rf"\(to {elsewhere}"):
        make_trainer(smoke_cfg, run, "trainer.resume=auto", "trainer.total_steps=3").fit()
    assert tree(elsewhere) == before  # nothing outside the run folder created, changed or deleted


USER_FOLDERS = {
    "notes": {"notes.txt": "my notes", "data.csv": "a,b\n1,2\n"},
    "own_summary": {"notes.txt": "my notes", "eval/summary.json": '{"accuracy": 0.93}'},
    "another_app": {".hydra/config.yaml": "model: resnet\nlr: 0.1\n", ".hydra/hydra.yaml":
                    "hydra:\n  runtime:\n    config_sources:\n    - path: my_app.conf\n      provider: main\n",
                    ".hydra/overrides.yaml": "- lr=0.1\n", "train.log": "epoch 1\n"},
}
MESSAGES = {"notes": "holds files that are not a run's (data.csv, notes.txt)",
            "own_summary": "eval/summary.json is not a run's",
            "another_app": ".hydra/config.yaml is another application's record"}


def user_folder(folder: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize("kind", list(USER_FOLDERS))
def test_a_folder_of_the_users_is_refused_on_the_command_line_with_every_file_byte_identical(kind, tmp_path):
    """hydra.run.dir pointing at a folder of the user's that is not a run: refused before Hydra writes its .hydra/
    files or its log there (exit 2), naming the folder; every file byte-identical and nothing added."""
    folder = user_folder(tmp_path / "mine", USER_FOLDERS[kind])
    before = tree(folder)
    done = cli("experiment=smoke", "logger=none", "trainer.progress=false", *QUICK, f"hydra.run.dir={folder}")
    assert done.returncode == 2, done.stdout[-3000:]
    assert MESSAGES[kind] in done.stdout and str(folder) in done.stdout, done.stdout[-3000:]
    assert tree(folder) == before


def test_a_folder_of_the_users_is_refused_by_the_trainer_too_and_a_note_in_a_run_folder_is_left_alone(
        checkpoint, smoke_cfg, tmp_path):
    folder = user_folder(tmp_path / "mine", USER_FOLDERS["own_summary"])
    before = tree(folder)
    with pytest.raises(run_folder.RunFolderRefused, match=MESSAGES["own_summary"]):
        make_trainer(smoke_cfg, folder)
    assert tree(folder) == before
    # a file of the user's put into a run folder of this project: the folder is still the run's, the file untouched
    run = copy_run(checkpoint, tmp_path)
    (run / "notes.txt").write_text("what I changed")
    make_trainer(smoke_cfg, run, "trainer.resume=auto", "trainer.total_steps=3").fit()
    assert (run / "notes.txt").read_text() == "what I changed"
    assert [r["step"] for r in metric_rows(run) if "reward/mean" in r][-1] == 3


# ------------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("override,expected", [
    ("trainer.prompts_per_step=4", "trainer.prompts_per_step: 8 -> 4"),
    ("trainer.samples_per_prompt=4", "trainer.samples_per_prompt: 2 -> 4"),
    ("constraint.threshold=0.5", "constraint.threshold: 0.0 -> 0.5"),
    ("constraint.multiplier=learned", "constraint.multiplier: 'fixed' -> 'learned'"),
    ("seed=3", "seed: 0 -> 3"),
    ("optimizer.actor.lr=0.001", "optimizer.actor.lr: 0.0003 -> 0.001"),
    ("model.arch.hidden_size=32", "model.arch.hidden_size: 64 -> 32"),  # another model size
])
def test_resume_refuses_a_setting_that_changes_the_run(override, expected, checkpoint, smoke_cfg, tmp_path):
    run = copy_run(checkpoint, tmp_path)
    before = hashes(run)
    with pytest.raises(run_folder.ResumeRefused) as info:
        make_trainer(smoke_cfg, run, "trainer.total_steps=2", "trainer.resume=auto", override)
    message = str(info.value)
    assert expected in message and "step_000002/state.json" in message
    assert f"trainer.allow_changes=[{override.split('=')[0]}]" in message
    assert hashes(run) == before


def test_an_allowed_change_is_applied_for_real_and_recorded(checkpoint, smoke_cfg, tmp_path):
    run = copy_run(checkpoint, tmp_path)
    trainer = make_trainer(smoke_cfg, run, "trainer.resume=auto", "trainer.total_steps=3", "optimizer.actor.lr=0.001",
                           "trainer.allow_changes=[optimizer.actor.lr]")
    engine = trainer.models.policy
    assert [g["lr"] for g in engine.optimizer.param_groups] == [0.001]
    assert engine.scheduler.get_last_lr() == [0.001]
    trainer.fit()
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["lr/actor"] == 0.001 and rows[1]["lr/actor"] == 0.0003
    record = [json.loads(line) for line in (run / "resume_changes.jsonl").read_text().splitlines()]
    assert {"setting": "optimizer.actor.lr", "old": 0.0003, "new": 0.001} in record[0]["changes"]
    state = json.loads((run / "checkpoints" / "step_000003" / "state.json").read_text())
    assert state["config"]["optimizer"]["actor"]["lr"] == 0.001


@pytest.mark.slow
def test_the_command_line_resume_keeps_hydras_original_config(hydra_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hydra_run, run)
    original = (run / ".hydra" / "config.yaml").read_bytes()
    base = (*QUICK, "eval.at_end=true", "trainer.save_every=1", f"hydra.run.dir={run}", "experiment=smoke",
            "logger=none", "trainer.progress=false", "trainer.resume=auto")
    before = hashes(run)
    refused = cli(*base, "trainer.total_steps=2", "constraint.threshold=0.5")
    assert refused.returncode == 2 and "finished run with other settings (constraint.threshold: 0.0 → 0.5)" in refused.stdout
    assert hashes(run) == before
    done = cli(*base, "trainer.total_steps=3", "optimizer.actor.lr=0.001", "trainer.allow_changes=[optimizer.actor.lr]")
    assert done.returncode == 0, done.stdout[-3000:]
    assert (run / ".hydra" / "config.yaml").read_bytes() == original
    assert "lr: 0.001" in (run / ".hydra" / "config.resumed-1.yaml").read_text()
    assert metric_rows(run)[-2]["lr/actor"] == 0.001

    # the run is finished: launched again, refused with other settings or reused with its own, it trains nothing
    # and its .hydra files still show the run as it was started (the report reads them to name the run)
    hydra_files = {name: (run / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml")}
    other = cli(*base, "trainer.total_steps=3", "optimizer.actor.lr=0.001", "constraint=average")
    assert other.returncode == 2 and "holds a finished run with other settings (constraint" in other.stdout
    same = cli(*base, "trainer.total_steps=3", "optimizer.actor.lr=0.001")
    assert same.returncode == 0 and "its summary is reused" in same.stdout
    assert {name: (run / ".hydra" / name).read_bytes() for name in hydra_files} == hydra_files


# ------------------------------------------------------------------------------------------- multi-file outputs


def test_a_kill_between_the_evaluation_files_redoes_the_evaluation(checkpoint, smoke_cfg, tmp_path, monkeypatch):
    """Killed after ``per_prompt.jsonl`` and before ``summary.json`` (the completion marker): the resumed run is not
    "finished"; it evaluates again and logs the final row once."""
    import repo_exp.evaluate as evaluate

    run = copy_run(checkpoint, tmp_path)
    real_replace = os.replace

    def killed_at_summary(src, dst):
        if str(dst).endswith("summary.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(evaluate.os, "replace", killed_at_summary)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(smoke_cfg, run, "trainer.total_steps=2", "trainer.resume=auto", "eval.at_end=true").fit()
    assert (run / "eval" / "per_prompt.jsonl").is_file() and not (run / "eval" / "summary.json").exists()
    monkeypatch.setattr(evaluate.os, "replace", real_replace)
    make_trainer(smoke_cfg, run, "trainer.total_steps=2", "trainer.resume=auto", "eval.at_end=true").fit()
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["eval/step"] == 2
    assert [r["step"] for r in metric_rows(run) if "eval/num_prompts" in r] == [2]


def test_a_final_row_cut_mid_write_is_logged_again_from_the_summary(checkpoint, smoke_cfg, tmp_path, caplog):
    run = copy_run(checkpoint, tmp_path)
    make_trainer(smoke_cfg, run, "trainer.total_steps=2", "trainer.resume=auto", "eval.at_end=true").fit()
    path = run / "metrics.jsonl"
    text = path.read_text()
    last = text.splitlines()[-1]
    assert "eval/num_prompts" in last
    path.write_text(text[: len(text) - len(last) // 2 - 1])  # the final evaluation's row, cut mid-write
    with caplog.at_level(logging.WARNING, logger="repo_exp"):
        make_trainer(smoke_cfg, run, "trainer.total_steps=2", "trainer.resume=auto", "eval.at_end=true").fit()
    assert "the metrics row of step 2 was cut mid-write" in caplog.text and "training does not redo it" in caplog.text
    assert "logged again from eval/summary.json" in caplog.text
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert rows[-1]["eval/num_prompts"] == json.loads((run / "eval" / "summary.json").read_text())["eval/num_prompts"]


def test_a_training_row_cut_mid_write_is_really_redone(smoke_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    make_trainer(smoke_cfg, run, "trainer.total_steps=3", "trainer.save_every=1", "trainer.keep_last=3").fit()
    shutil.rmtree(run / "checkpoints" / "step_000003")  # killed after logging step 3, before its checkpoint …
    path = run / "metrics.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])  # … in the middle of writing step 3's row
    with caplog.at_level(logging.WARNING, logger="repo_exp"):
        make_trainer(smoke_cfg, run, "trainer.total_steps=3", "trainer.save_every=1", "trainer.keep_last=3",
                     "trainer.resume=auto").fit()
    assert "the metrics row of step 3 was cut mid-write; it is kept in metrics.orphaned.jsonl and the step is redone" \
        in caplog.text
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]
    assert (run / "metrics.orphaned.jsonl").read_text().startswith('{"step": 3,')


def test_a_full_disk_while_checkpointing_is_named_and_frees_the_partial_folder(checkpoint, smoke_cfg, tmp_path,
                                                                               monkeypatch):
    run = copy_run(checkpoint, tmp_path)
    before = hashes(run / "checkpoints")
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith(".optim.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5120 vs 5000")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    trainer = make_trainer(smoke_cfg, run, "trainer.total_steps=3", "trainer.resume=auto")
    with pytest.raises(CheckpointWriteError, match=rf"could not write the checkpoint {run}/checkpoints/step_000003 "
                                                   r"\(RuntimeError: \[enforce fail.*MiB free on that disk\); its "
                                                   r"partial folder .*\.tmp_step_000003 was removed"):
        trainer.fit()
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert hashes(run / "checkpoints") == before
    monkeypatch.setattr(torch, "save", real_save)
    make_trainer(smoke_cfg, run, "trainer.total_steps=3", "trainer.resume=auto").fit()
    assert verify(run / "checkpoints" / "step_000003") is None


def test_a_write_that_raises_enospc_is_named_too(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints")

    def full(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        manager.save(1, full)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_the_report_names_a_torn_summary_and_leaves_that_run_out(tmp_path, caplog):
    from test_report import make_run

    good = make_run(tmp_path / "runs" / "0_good", "rectified", 0.0, 1, {"eval/reward_mean": 1.0})
    torn = make_run(tmp_path / "runs" / "1_torn", "average", 0.0, 1, {"eval/reward_mean": 2.0})
    summary = torn / "eval" / "summary.json"
    summary.write_text(summary.read_text()[:20])
    with caplog.at_level(logging.WARNING):
        report = build_report([tmp_path / "runs"], tmp_path / "out")
    assert f"{summary} is not valid JSON" in caplog.text
    assert len(report["runs"]) == 1 and str(torn.resolve()) in report["skipped"]
    assert good.exists()


# ------------------------------------------------------------------------------------------- the pieces, alone


def test_changes_allowed_by_prefix_harmless_ones_and_the_run_length_only_under_constant_schedules():
    old = {"trainer": {"total_steps": 4, "progress": True, "prompts_per_step": 8},
           "optimizer": {"actor": {"lr": 1e-4, "betas": [0.9, 0.95]}, "actor_scheduler": {"name": "constant"},
                         "critic_scheduler": {"name": "constant"}}}
    new = {"trainer": {"total_steps": 8, "progress": False, "prompts_per_step": 8},
           "optimizer": {"actor": {"lr": 2e-4, "betas": [0.9, 0.99]}, "actor_scheduler": {"name": "constant"},
                         "critic_scheduler": {"name": "constant"}}}
    changes = run_folder.check_changes(old, new, ["optimizer.actor"], "saved")
    assert [k for k, _, _ in changes] == ["optimizer.actor.betas", "optimizer.actor.lr", "trainer.progress",
                                          "trainer.total_steps"]
    with pytest.raises(run_folder.ResumeRefused, match=r"\(optimizer.actor.lr: 0.0001 -> 0.0002\)"):
        run_folder.check_changes(old, new, ["optimizer.actor.betas"], "saved")
    cosine = {**new, "optimizer": {**new["optimizer"], "actor_scheduler": {"name": "cosine"}}}
    with pytest.raises(run_folder.ResumeRefused, match=r"trainer.total_steps: 4 -> 8"):
        run_folder.check_changes({**old, "optimizer": cosine["optimizer"]}, cosine, ["optimizer"], "saved")


def test_a_new_learning_rate_keeps_the_schedules_position():
    """Cosine over 10 steps, 3 taken at lr 1e-3: the restored schedule at base 2e-3 gives 2e-3 × cos factor(3)."""
    import math

    from transformers import get_scheduler

    from repo_exp.config import AdamWConfig

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=0, num_training_steps=10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    run_folder.apply_optimizer_settings(optimizer, scheduler, AdamWConfig(lr=2e-3, betas=[0.8, 0.9], weight_decay=0.1))
    factor = 0.5 * (1 + math.cos(math.pi * 3 / 10))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * factor, rel=1e-12)
    assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9) and optimizer.param_groups[0]["weight_decay"] == 0.1
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 10)), rel=1e-12)
