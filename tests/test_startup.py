"""What a new user sees first: ``--help`` and ``--cfg`` print without loading torch, transformers or DeepSpeed; a run
says where its folder is when it starts and ends on one result line; a run without DeepSpeed prints no DeepSpeed
warning; the jobs of a parallel sweep name themselves on every line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_root

ROOT = repo_root()
HEAVY = ("torch", "transformers", "deepspeed")


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def imported_top_level(importtime_log: str) -> set[str]:
    """The top-level packages ``python -X importtime`` reports as imported."""
    names = set()
    for line in importtime_log.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+\d+ \|(\s*)(\S+)", line)
        if match:
            names.add(match.group(2).split(".")[0])
    return names


@pytest.mark.parametrize("args", [("--help",), ("--cfg", "job"), ("--cfg", "job", "experiment=compare")])
def test_help_and_cfg_print_without_torch_transformers_or_deepspeed(args):
    proc = run("-X", "importtime", "-m", "repo_exp", *args, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = imported_top_level(proc.stderr)
    assert "hydra" in imported and "omegaconf" in imported  # the log was read
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert ("== Config groups ==" in proc.stdout) if args == ("--help",) else ("constraint:" in proc.stdout)


def test_a_run_prints_its_folder_first_and_one_result_line_last_and_no_deepspeed_warning(tmp_path):
    folder = tmp_path / "run"
    proc = run("-m", "repo_exp", "experiment=smoke", "trainer.total_steps=2", "trainer.progress=false",
               f"hydra.run.dir={folder}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "[repo_exp]" in line]
    assert lines[0].endswith(f"run folder: {folder.resolve()}"), lines[:3]
    assert re.search(r"done: prompts violating \(oracle\) [\d.]+, answerable helpfulness \(oracle\) [\d.]+, "
                     r"over-refusal \(oracle\) [\d.]+, .* on \d prompts "
                     r"× 2 samples; every figure in .*eval/summary.json$", lines[-1]), lines[-1]
    assert "Setting accelerator" not in proc.stdout + proc.stderr  # DeepSpeed is not used, so not heard from


def test_result_line_without_a_final_evaluation_says_where_the_metrics_are(tmp_path):
    from repo_exp.progress import result_line

    assert result_line({}, tmp_path) == (f"done: no final evaluation (eval.at_end=false); step metrics in "
                                         f"{tmp_path / 'metrics.jsonl'}")
    line = result_line({"eval/reward_mean": 0.25, "eval/mean_cost": -1.0, "eval/compensation": True}, tmp_path)
    assert line.startswith("done: mean cost (cost model) -1.000, reward (reward model) 0.250; every figure in")


def test_parallel_sweep_jobs_name_every_line_and_draw_no_progress_bars(tmp_path):
    """Two jobs of a sweep that is not the comparison, at the same time through joblib: each job's lines carry its
    folder's name, and no job draws a progress bar over the other's."""
    sweep = tmp_path / "sweep"
    proc = run("-m", "repo_exp", "-m", "experiment=smoke", "trainer.total_steps=2", "seed=0,1",
               "hydra/launcher=local", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_experiment=smoke,seed=0,trainer.total_steps=2", "1_experiment=smoke,seed=1,trainer.total_steps=2"]
    for job in jobs:
        named = [line for line in out.splitlines() if f"][{job}] " in line]
        assert any(re.search(r"rl step 2/2", line) for line in named), job
        assert any("done: " in line for line in named) and any("run folder: " in line for line in named)
    assert "it/s" not in out and "%|" not in out  # tqdm's bars
    assert Path(sweep / jobs[0] / "eval" / "summary.json").is_file()
