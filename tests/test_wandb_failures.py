"""W&B failures become one warning and the run goes on with ``metrics.jsonl``, the record of truth: no network in
online mode, a refused key, ``run.log`` raising mid-run, W&B's own process dying mid-run."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from reliability_support import ROOT, cli, free_port, make_trainer, metric_rows

FAKE_KEY = "f0e1d2c3b4a5968778695a4b3c2d1e0f12345678"  # 40 characters, the shape of a real key


def files_containing(text: str, *roots: Path) -> list[Path]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and text.encode() in path.read_bytes():
                hits.append(path)
    return hits


def test_online_mode_without_network_completes_with_a_full_metrics_file(tmp_path):
    run_dir, wandb_dir, home = tmp_path / "run", tmp_path / "wandb", tmp_path / "home"
    wandb_dir.mkdir(), home.mkdir()
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}",
           "HOME": str(home), **{k: str(wandb_dir) for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR",
                                                             "WANDB_CONFIG_DIR")}}
    done = cli("experiment=smoke", "logger=wandb", "logger.init_timeout=3", "trainer.progress=false",
               "trainer.num_threads=1", f"hydra.run.dir={run_dir}", env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "W&B is unavailable" in done.stdout and "metrics go to metrics.jsonl only" in done.stdout
    rows = metric_rows(run_dir)
    # the initial evaluation, four steps, the final evaluation: nothing lost
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 4]
    assert all("reward/mean" in r and "constraint/lambda" in r for r in rows[1:5])
    assert "eval/prompt_violation_rate" in rows[0] and "eval/prompt_violation_rate" in rows[-1]
    assert (run_dir / "eval" / "summary.json").is_file()
    # the key was offered to W&B; it is written nowhere
    assert files_containing(FAKE_KEY, run_dir, wandb_dir, home) == []


class FakeRun:
    """A W&B run whose ``log`` raises from its ``fail_at``-th call on, as when its process has gone."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls, self.finished = fail_at, 0, False

    def log(self, data, step=None) -> None:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise ConnectionResetError("Connection lost")

    def define_metric(self, name, step_metric=None) -> None:
        pass

    def finish(self) -> None:
        self.finished = True


def test_a_wandb_crash_mid_run_becomes_one_warning(smoke_cfg, tmp_path, monkeypatch, caplog):
    import wandb

    run = FakeRun(fail_at=3)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    run_dir = tmp_path / "run"
    trainer = make_trainer(smoke_cfg, run_dir, "logger=wandb", "trainer.total_steps=5")
    with caplog.at_level(logging.WARNING):
        trainer.fit()
    warnings = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert warnings == ["W&B log failed (ConnectionResetError: Connection lost); metrics go to metrics.jsonl only"]
    assert run.calls == 3  # nothing more was sent after the failure
    assert [r["step"] for r in metric_rows(run_dir)] == [1, 2, 3, 4, 5]


def test_a_refused_key_becomes_one_warning(smoke_cfg, tmp_path, monkeypatch, caplog):
    import wandb

    def refuse(**kwargs):
        raise wandb.errors.AuthenticationError("API key must be 40 characters long")

    monkeypatch.setattr(wandb, "init", refuse)
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        make_trainer(smoke_cfg, run_dir, "logger=wandb", "trainer.total_steps=2").fit()
    assert "W&B is unavailable (AuthenticationError: API key must be 40 characters long)" in caplog.text
    assert [r["step"] for r in metric_rows(run_dir)] == [1, 2]


KILL_WANDB_PROCESS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import psutil
    from repo_exp.loggers import MetricsLogger, WandbSink

    run_dir = Path(sys.argv[1])
    sink = WandbSink("p", None, None, "n", {}, [], run_dir, "offline", "abc123", timeout=30)
    assert sink.run is not None, "W&B did not start"
    logger = MetricsLogger(run_dir, enabled=True, wandb=sink)
    logger.log({"x": 1.0}, 1)
    children = psutil.Process().children(recursive=True)
    assert children, "W&B runs no process of its own"
    for child in children:  # W&B's service process dies
        child.kill()
    psutil.wait_procs(children, timeout=10)
    for step in (2, 3, 4):
        logger.log({"x": float(step)}, step)
    logger.close()
    print("finished")
""")


def test_wandb_process_killed_mid_run_becomes_a_warning(tmp_path):
    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    env = {k: str(wandb_dir) for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")}
    done = subprocess.run([sys.executable, "-c", KILL_WANDB_PROCESS, str(tmp_path)], cwd=ROOT,
                          env={**os.environ, **env, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished" in done.stdout
    assert "metrics go to metrics.jsonl only" in done.stderr
    assert [r["x"] for r in metric_rows(tmp_path)] == [1.0, 2.0, 3.0, 4.0]


def test_wandb_says_where_an_offline_run_is_and_how_to_upload_it(tmp_path):
    from types import SimpleNamespace

    from repo_exp.loggers import where_line

    folder = tmp_path / "wandb" / "offline-run-1-abc"
    offline = SimpleNamespace(offline=True, settings=SimpleNamespace(mode="offline", sync_dir=str(folder)),
                              dir=str(folder / "files"))
    assert where_line(offline) == (f"W&B offline: the run is in {folder}; upload it later with "
                                   f"`wandb sync {folder}`")
    online = SimpleNamespace(offline=False, settings=SimpleNamespace(mode="online"), url="https://w.example/r/1",
                             group="outputs/default/runs", name="constraint=average,seed=0")
    assert where_line(online) == ("W&B run: https://w.example/r/1 (group outputs/default/runs, name "
                                  "constraint=average,seed=0)")
