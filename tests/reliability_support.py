"""Helpers shared by the reliability tests (resume, faults, bad input, untrusted files)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from repo_exp.config import compose_config, validate
from repo_exp.train import Trainer

from conftest import SMOKE, repo_root

ROOT = repo_root()
# tiny models and short runs: no evaluation, one thread (two threads on a shared two-core machine are several times
# slower than one)
QUICK = ("eval.at_start=false", "eval.at_end=false", "trainer.num_threads=1")


def make_trainer(smoke_cfg, run_dir: Path, *overrides: str) -> Trainer:
    """A trainer of the smoke experiment in ``run_dir``, built in this process."""
    cfg = smoke_cfg(*QUICK, *overrides)
    return Trainer(validate(cfg), cfg, run_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The final checkpoint of a real two-step smoke run (``constraint=rectified``, the default), made once per test
    module; its run folder is the checkpoint's grandparent."""
    cfg = compose_config([*SMOKE, "trainer.total_steps=2", *QUICK])
    run_dir = tmp_path_factory.mktemp("source") / "run"
    Trainer(validate(cfg), cfg, run_dir).fit()
    return run_dir / "checkpoints" / "step_000002"


def metric_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A localhost port nothing listens on (the system just handed it out): free to bind, and a connection to it is
    refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
        replace_env: bool = False) -> subprocess.CompletedProcess:
    """``python -m repo_exp ARGS`` from the project root; stdout and stderr together in ``.stdout``. ``env`` adds to
    this process's environment, or with ``replace_env`` replaces it."""
    full_env = {} if replace_env else dict(os.environ)
    full_env.update({"WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "repo_exp", *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
