"""Pre-emption end to end: the smoke experiment in a subprocess is stopped by SIGTERM (checkpoint, exit 0) and killed
by SIGKILL (no warning at all), resumed each time with ``trainer.resume=auto``, and its ``metrics.jsonl`` must equal
an uninterrupted run's row for row.

Tolerance: none. Every non-timing value must be bit-identical (compared as the JSON floats written), because
everything that determines a step is restored (weights, optimizer and scheduler states, λ and the cost window, the
prompt stream's position, RNG states) and the settings are deterministic (``trainer.deterministic=true``, one
thread, CPU). Only ``timing/*`` and ``throughput/*`` differ between runs.

The subprocess tests (``make test-slow``, about a minute each) chain SIGTERM, SIGKILL and a final resume for
``constraint=average`` (cost window included) and ``rectified`` (learned λ); the fast suite runs the same SIGTERM and
resume through ``Trainer`` in-process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repo_exp.checkpoint import CheckpointManager, verify

from conftest import repo_root
from reliability_support import cli, make_trainer, metric_rows

TOTAL_STEPS = 16
BASE = (
    "experiment=smoke", "logger=none", "trainer.progress=false", "trainer.deterministic=true",
    "trainer.num_threads=1", "trainer.save_every=1", "trainer.keep_last=2",
)
# λ must move and the average constraint's window must wrap (16 samples a step, 40 kept) for the test to mean much
CONSTRAINTS = {
    "average": ("constraint=average", "constraint.window=40"),
    "rectified": ("constraint=rectified", "constraint.multiplier=learned", "constraint.lambda_lr=0.5"),
    # critic-free: no critic state to restore, the group baselines recomputed from the restored policy's samples
    "rectified_rloo": ("constraint=rectified", "constraint.multiplier=learned", "constraint.lambda_lr=0.5",
                       "estimator=rloo"),
}
VOLATILE = ("timing/", "throughput/")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "repo_exp", *BASE, *overrides, f"hydra.run.dir={run_dir}"]


def _step_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "reward/mean" in row:
            rows.append(row)
    return rows


def run(run_dir: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A run to its end; its stdout and stderr together in ``.stdout``."""
    return cli(*BASE, *overrides, f"hydra.run.dir={run_dir}", timeout=timeout)


def run_until(run_dir: Path, *overrides: str, step_rows: int, signum: int, timeout: float = 300) -> tuple[int, str]:
    """Start a run, send ``signum`` once ``metrics.jsonl`` holds ``step_rows`` training-step rows, wait for the exit.

    Returns the exit code and the combined output."""
    proc = subprocess.Popen(_command(run_dir, *overrides), cwd=repo_root(), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while len(_step_rows(run_dir)) < step_rows:
            assert proc.poll() is None, f"the run ended before step {step_rows}:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach the step in time"
            time.sleep(0.02)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in metric_rows(run_dir)]


def assert_same_rows(resumed: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    for got, want in zip(resumed, reference):
        differing = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
        assert not differing, f"step {want['step']} differs after resuming: {differing}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``uninterrupted(name, steps)``: the rows of a reference run of that constraint, computed once."""
    cache: dict[tuple[str, int], list[dict]] = {}

    def get(name: str, steps: int) -> list[dict]:
        if (name, steps) not in cache:
            run_dir = tmp_path_factory.mktemp(f"reference_{name}")
            done = run(run_dir, *CONSTRAINTS[name], f"trainer.total_steps={steps}")
            assert done.returncode == 0, done.stdout[-3000:]
            cache[name, steps] = comparable(run_dir)
            lambdas = {r["constraint/lambda"] for r in cache[name, steps] if "constraint/lambda" in r}
            assert len(lambdas) > 3, "λ must move in this run, or restoring it is not tested"
        return cache[name, steps]

    return get


def stop_with_sigterm(run_dir: Path, overrides: tuple[str, ...], total_steps: int) -> int:
    """SIGTERM after two steps: the current step finishes, its checkpoint is written, the process exits 0.
    Returns the step it stopped after."""
    rc, out = run_until(run_dir, *overrides, step_rows=2, signum=signal.SIGTERM)
    assert rc == 0, out[-3000:]
    stopped = max(r["step"] for r in _step_rows(run_dir))
    assert 2 <= stopped < total_steps
    assert f"stopped by signal {int(signal.SIGTERM)} after step {stopped}" in out
    manager = CheckpointManager(run_dir / "checkpoints")
    assert manager.latest_complete() == manager.folder(stopped)
    assert verify(manager.folder(stopped)) is None
    return stopped


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_in_process_sigterm_and_resume_equal_an_uninterrupted_run(name, smoke_cfg, tmp_path, monkeypatch, caplog):
    """The same through ``Trainer`` in this process (seconds, for the fast suite): a real SIGTERM arrives during
    step 2; the run saves step 2 and returns; a new trainer resumes and finishes."""
    overrides = (*CONSTRAINTS[name], "trainer.total_steps=6", "trainer.save_every=2", "eval.at_start=true",
                 "eval.at_end=true")
    reference = tmp_path / "reference"
    make_trainer(smoke_cfg, reference, *overrides).fit()

    run_dir = tmp_path / "run"
    trainer = make_trainer(smoke_cfg, run_dir, *overrides)
    step_once = trainer.train_step

    def step_then_signal(step: int):
        metrics = step_once(step)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.WARNING, logger="repo_exp"):
        assert trainer.fit() == {"stopped_at": 2}
    assert signal.getsignal(signal.SIGTERM) is handler  # the trainer gave the handler back
    assert "stopped by signal 15 after step 2; checkpoint saved" in caplog.text
    assert [p.name for p in CheckpointManager(run_dir / "checkpoints").checkpoints()] == ["step_000002"]

    resumed = make_trainer(smoke_cfg, run_dir, *overrides, "trainer.resume=auto")
    assert resumed.start_step == 2
    resumed.fit()
    assert_same_rows(comparable(run_dir), comparable(reference))


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_sigterm_then_sigkill_resume_equals_uninterrupted_run(name, tmp_path, uninterrupted):
    overrides = (*CONSTRAINTS[name], f"trainer.total_steps={TOTAL_STEPS}")
    run_dir = tmp_path / "run"
    manager = CheckpointManager(run_dir / "checkpoints")
    stopped = stop_with_sigterm(run_dir, overrides, TOTAL_STEPS)

    # resumed, then SIGKILL: no chance to save; what is left is the last periodic checkpoint
    rc, out = run_until(run_dir, *overrides, "trainer.resume=auto", step_rows=stopped + 3, signum=signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-3000:]
    assert f"resumed from {manager.folder(stopped)} at step {stopped}" in out
    killed_after = max(r["step"] for r in _step_rows(run_dir))
    assert killed_after < TOTAL_STEPS, "the run finished before SIGKILL arrived"
    last_periodic = manager.latest_complete()
    assert last_periodic is not None and stopped < int(last_periodic.name.removeprefix("step_")) <= killed_after

    done = run(run_dir, *overrides, "trainer.resume=auto")
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resumed from {last_periodic}" in done.stdout
    assert_same_rows(comparable(run_dir), uninterrupted(name, TOTAL_STEPS))
    # rows of steps the killed run had logged past its last checkpoint are kept aside, not lost
    if killed_after > int(last_periodic.name.removeprefix("step_")):
        assert (run_dir / "metrics.orphaned.jsonl").is_file()
