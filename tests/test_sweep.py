"""Sweeps: every ``experiments/`` launch line and every ``conf/sweep`` file composes job by job; a two-job sweep runs
through the joblib launcher in parallel and lands in one W&B group."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from repo_exp.config import validate
from repo_exp.loggers import sweep_group

from conftest import repo_root
from reliability_support import cli

ROOT = repo_root()
SCRIPTS = sorted(p for p in (ROOT / "experiments").rglob("*") if p.is_file() and p.suffix in (".sh", ".sbatch"))
SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "sweep").glob("*.yaml"))


def repo_exp_commands(script: Path) -> list[list[str]]:
    """The override lists of every ``python -m repo_exp`` or ``python -m repo_exp.evaluate`` command in ``script``
    (both compose the same config); shell variables and ``"$@"`` are left out, the multirun flag kept."""
    text = re.sub(r"\\\n", " ", script.read_text())
    commands = []
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("#"):
            continue
        tokens = shlex.split(line, posix=True) if re.search(r" -m repo_exp(\.evaluate)? ", f"{line} ") else []
        module = next((t for t in tokens if t in ("repo_exp", "repo_exp.evaluate")), None)
        if module is None:
            continue
        args = tokens[tokens.index(module) + 1:]
        commands.append([a for a in args if "$" not in a and not a.startswith(("--cfg", "--info"))])
    return commands


def expand_jobs(compose, args: list[str]) -> list[list[str]]:
    """The override list of each job Hydra's basic sweeper would launch for ``args`` (CLI sweeps win over
    ``hydra.sweeper.params``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(a in ("--multirun", "-m") for a in args)
    args = [a for a in args if a not in ("--multirun", "-m")]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(args)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {o.key_or_group: o.input_line for o in parsed if o.is_sweep_override()}
    if multirun:
        hydra_cfg = compose(*fixed, return_hydra_config=True).hydra
        for key, value in (hydra_cfg.sweeper.params or {}).items():
            sweeps.setdefault(key, f"{key}={value}")
    axes = []
    for line in sweeps.values():
        override = parser.parse_override(line)
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        axes.append([f"{override.get_key_element()}={v}" for v in values])
    return [fixed + list(combo) for combo in itertools.product(*axes)]


def test_experiment_scripts_exist_and_are_listed_in_the_readme():
    assert len(SCRIPTS) >= 4
    readme = (ROOT / "experiments" / "README.md").read_text()
    for script in SCRIPTS:
        assert str(script.relative_to(ROOT / "experiments")) in readme, f"{script.name} is not in experiments/README"


def _dry_run_arguments(script: Path) -> list[list[str]]:
    """One argument list per choice of a script's required first argument (``${1:?usage: $0 a|b …}``)."""
    match = re.search(r"\$\{1:\?usage: \S+ ([\w|]+)", script.read_text())
    return [[choice] for choice in match.group(1).split("|")] if match else [[]]


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(ROOT)) for s in SCRIPTS])
def test_every_experiment_script_composes(script, compose):
    text = script.read_text()
    if script.suffix == ".sbatch":  # a batch file hands over to a launch script, which is tested itself
        called = re.findall(r"experiments/[\w/.-]+\.sh", text)
        assert called and all((ROOT / c).is_file() for c in called), script
        return
    if "DRY_RUN" in text:  # scripts built from shell arrays print their composed config with DRY_RUN=1
        env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "PY": sys.executable,
               "HF_HUB_OFFLINE": "1"}
        for args in _dry_run_arguments(script):
            proc = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0 and "constraint:" in proc.stdout, proc.stderr[-2000:]
        return
    commands = repo_exp_commands(script)
    assert commands, f"{script} runs no `python -m repo_exp` command"
    for args in commands:
        jobs = expand_jobs(compose, args)
        for overrides in jobs:
            validate(compose(*overrides))  # every schema check runs, nothing is built
        compose(*[a for a in jobs[0]], return_hydra_config=True)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_file_composes_job_by_job(name, compose):
    jobs = expand_jobs(compose, ["--multirun", f"+sweep={name}", "experiment=smoke"])
    assert len(jobs) >= 3
    configs = [validate(compose(*overrides)) for overrides in jobs]
    swept = compose(f"+sweep={name}", return_hydra_config=True).hydra.sweeper.params
    for key in swept:  # each swept key takes as many values as the sweep lists
        values = {str(OmegaConf.select(OmegaConf.structured(c), key if key != "constraint" else "constraint.name"))
                  for c in configs}
        assert len(values) == len(str(swept[key]).split(",")), key


def test_threshold_sweep_values_and_launchers(compose):
    jobs = expand_jobs(compose, ["--multirun", "+sweep=threshold"])
    constraints = [validate(compose(*j)).constraint for j in jobs]
    pairs = {(c.name, c.threshold) for c in constraints}
    assert pairs == {(c, d) for c in ("average", "rectified") for d in (-0.5, 0.0, 0.5)}
    local = compose("hydra/launcher=local", return_hydra_config=True).hydra.launcher
    assert local._target_.endswith("JoblibLauncher") and local.n_jobs == 2
    slurm = compose("hydra/launcher=slurm", return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1


def wandb_run_records(path: Path):
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks of checksum, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, partial = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(partial + chunk if kind == 4 else chunk)
            partial = b""
            yield record
        else:
            partial = chunk if kind == 2 else partial + chunk


def _offline_wandb_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a sweep subprocess: W&B offline, every W&B folder under ``tmp_path``, no hub access."""
    folder = tmp_path / "wandb"
    folder.mkdir()
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(folder), "WANDB_CACHE_DIR": str(folder),
            "WANDB_CONFIG_DIR": str(folder), "WANDB_DATA_DIR": str(folder), "HF_HUB_OFFLINE": "1"}


def _job_span(job: Path) -> tuple[float, float]:
    """When a job started (Hydra writes its .hydra/ folder first) and ended (its final evaluation is written last)."""
    return (job / ".hydra" / "config.yaml").stat().st_mtime, (job / "eval" / "summary.json").stat().st_mtime


@pytest.mark.slow
def test_two_job_sweep_runs_in_parallel_through_joblib_in_one_wandb_group(tmp_path):
    sweep = tmp_path / "sweep_thresholds"
    env = _offline_wandb_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "repo_exp", "--multirun", "experiment=smoke", "logger=wandb", "logger.mode=offline",
         "hydra/launcher=local", "hydra.launcher.n_jobs=2", "constraint=average,rectified", "trainer.total_steps=2",
         "trainer.progress=false", "trainer.num_threads=1", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2
    launcher = OmegaConf.load(sweep / "multirun.yaml").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 2
    (a_start, a_end), (b_start, b_end) = map(_job_span, jobs)
    assert a_start < b_end and b_start < a_end, "the two jobs did not overlap in time"
    names = []
    for job in jobs:
        assert (job / "eval" / "summary.json").is_file()
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        run = next(r.run for r in wandb_run_records(run_file) if r.WhichOneof("record_type") == "run")
        assert run.run_group == sweep_group(sweep)  # the sweep folder's name and a hash of its path
        names.append(run.display_name)
        # the per-prompt W&B table of the final evaluation, with the prompt text and its figures
        (table_file,) = job.glob("wandb/offline-run-*/files/media/table/eval/per_prompt/final_*.table.json")
        table = json.loads(table_file.read_text())
        assert {"prompt", "mean_cost", "mean_reward", "unsafe_share", "k"} <= set(table["columns"])
        assert len(table["data"]) == 8
    common = "experiment=smoke,logger.mode=offline,trainer.num_threads=1,trainer.total_steps=2"
    assert sorted(names) == [f"constraint=average,{common}", f"constraint=rectified,{common}"]
    # the sweep reports: one group per constraint type, with the interference figure from the initial evaluation
    from repo_exp.report import build_report

    report = build_report([sweep], tmp_path / "report")
    assert set(report["groups"]) == {"average", "rectified"} and "interference" in report["figures"]
    assert json.loads((tmp_path / "report" / "report.json").read_text())["rectified"]["eval/mean_cost"]["n"] == 1


def test_four_job_multirun_gives_four_wandb_runs_in_one_group(tmp_path):
    """`--multirun experiment=smoke constraint=average,rectified constraint.threshold=0,0.5` with W&B offline:
    four jobs, four runs, one group named after the sweep folder, the overrides in each run's name, the resolved
    config."""
    sweep = tmp_path / "sweep_four"
    env = _offline_wandb_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "repo_exp", "--multirun", "experiment=smoke", "logger=wandb", "logger.mode=offline",
         "constraint=average,rectified", "constraint.threshold=0,0.5", "trainer.total_steps=2",
         "trainer.progress=false", "eval.at_start=false", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4 and all((job / "metrics.jsonl").is_file() for job in jobs)
    names, groups = [], set()
    for job in jobs:
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        records = list(wandb_run_records(run_file))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        groups.add(run.run_group)
        names.append(run.display_name)
        config = {item.key: item.value_json for item in run.config.update}
        assert json.loads(config["constraint"])["name"] in ("average", "rectified")  # the resolved config
    assert groups == {sweep_group(sweep)}
    for constraint in ("average", "rectified"):
        for threshold in ("0", "0.5"):
            assert sum(f"constraint={constraint}" in n and f"constraint.threshold={threshold}," in n + ","
                       for n in names) == 1, names


# ------------------------------------------------------------------------------------ a stopped sweep, and its resume


def test_resuming_settings_stay_out_of_the_job_folder_names(compose):
    """The same sweep command with trainer.resume=auto (and settings it allows to change) names its jobs' folders as
    the first command did, so it continues them instead of starting over beside them."""
    first = compose("experiment=smoke", "seed=1", return_hydra_config=True).hydra.job.override_dirname
    again = compose("experiment=smoke", "seed=1", "trainer.resume=auto", "trainer.allow_changes=[trainer.total_steps]",
                    return_hydra_config=True).hydra.job.override_dirname
    assert first == again == "experiment=smoke,seed=1"


def test_a_stopped_sweep_hands_out_no_further_job(tmp_path):
    """The sweeper's batch ends at the stop mark; a job a joblib worker takes after it returns failed, before Hydra
    creates its folder."""
    from hydra.core.utils import JobStatus

    from repo_exp.hydra_job import SweepStopped, mark_stopped  # puts Hydra's plugin package of this project on the path
    from hydra_plugins.repo_exp_sweeps import UntilStopped, execute_unless_stopped

    jobs = UntilStopped([["seed=0"], ["seed=1"], ["seed=2"]], tmp_path)
    seen = []
    for job in jobs:
        seen.append(job)
        if len(seen) == 2:
            mark_stopped(tmp_path, "0_seed=0 stopped by a signal after step 3")
    assert seen == [["seed=0"], ["seed=1"]] and len(jobs) == 3
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    mark_stopped(tmp_path / "sweep", "0_seed=0 stopped by a signal after step 3")
    ret = execute_unless_stopped(2, ["seed=2"], None, config, None, None)
    assert ret.status == JobStatus.FAILED and isinstance(ret._return_value, SweepStopped)
    assert "0_seed=0 stopped by a signal after step 3" in str(ret._return_value)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [".sweep_stopped"]


SWEEP = ("--multirun", "experiment=smoke", "logger=none", "trainer.progress=false", "eval.at_start=false",
         "eval.at_end=false", "trainer.num_threads=1")


def interrupted_sweep(sweep: Path, *args: str, running: int = 1) -> tuple[list[str], list[str], float, str]:
    """Start ``python -m repo_exp SWEEP ARGS`` in its own process group, press Ctrl-C (SIGINT to the whole group, as a
    terminal does) once ``running`` jobs have logged a step; the job folders at that moment and after the sweep
    ended, the seconds from the signal to the end, and the output."""
    import signal
    import time

    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "repo_exp", *SWEEP, *args, f"hydra.sweep.dir={sweep}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 500
    while time.monotonic() < deadline and proc.poll() is None:
        started = [p for p in sweep.glob("*/metrics.jsonl") if p.stat().st_size > 0]
        if len(started) >= running:
            break
        time.sleep(0.3)
    assert proc.poll() is None, "the sweep ended before it was interrupted"
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    os.killpg(proc.pid, signal.SIGINT)
    signalled = time.monotonic()
    out, _ = proc.communicate(timeout=300)
    ended = time.monotonic() - signalled
    return folders, sorted(p.name for p in sweep.iterdir() if p.is_dir()), ended, out


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "local"])
def test_ctrl_c_in_a_50_job_sweep_stops_launching_at_once(tmp_path, launcher):
    """Ctrl-C while the first jobs run: they save their checkpoints and stop, and not one more job folder is created
    (Hydra's basic launcher, one job after another, and the joblib launcher, two at a time)."""
    args = ["trainer.total_steps=200", "seed=range(50)"] + (["hydra/launcher=local", "hydra.launcher.n_jobs=2"]
                                                           if launcher == "local" else [])
    sweep = tmp_path / "sweep"
    at_signal, after, seconds, out = interrupted_sweep(sweep, *args, running=2 if launcher == "local" else 1)
    assert after == at_signal, out[-3000:]  # no job folder created after the stop
    assert len(after) == (2 if launcher == "local" else 1)
    assert all(list((sweep / job / "checkpoints").glob("step_*")) for job in after), out[-3000:]
    assert "the sweep stops: run the same command with trainer.resume=auto" in out
    assert seconds < 60, f"the sweep took {seconds:.0f} s to stop"


@pytest.mark.slow
def test_an_interrupted_sweep_run_again_with_resume_continues_its_own_job_folders(tmp_path):
    """The project's advice after Ctrl-C — the same command with trainer.resume=auto — continues the interrupted job
    from its checkpoint in its own folder and runs the job not started yet; no folder is added beside them."""
    sweep = tmp_path / "sweep"
    args = ("trainer.total_steps=30", "seed=0,1")
    at_signal, after, _, out = interrupted_sweep(sweep, *args)
    assert after == at_signal and len(after) == 1, out[-3000:]
    (first,) = after
    stopped_at = max(int(p.name.split("_")[1]) for p in (sweep / first / "checkpoints").glob("step_*"))
    assert stopped_at < 30
    env = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = cli(*SWEEP, *args, "trainer.resume=auto", f"hydra.sweep.dir={sweep}", env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and jobs[0] == first
    assert f"resumed from {sweep / first / 'checkpoints'}" in done.stdout
    for job in jobs:
        steps = [json.loads(line)["step"] for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 31)), job
