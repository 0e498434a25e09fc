"""The default comparison as a Hydra multirun (``experiment=compare``): its jobs run through Hydra's launcher, the
callback writes the report and prints the table, every job logs its progress; a sweep stops on Ctrl-C and resumes
as a whole; job folders stay inside the sweep folder; W&B groups are unique per sweep folder; the report counts a
run once; ``--cfg job`` alone prints the default config."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import repo_root
from test_report import make_run

ROOT = repo_root()
# the comparison at smoke size: tiny random models, two steps, 8 held-out prompts
COMPARE_SMOKE = ("experiment=[compare,smoke]", "trainer.total_steps=2")


def repo_exp(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "repo_exp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cfg_job_without_arguments_prints_the_default_config():
    proc = repo_exp("--cfg", "job", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert "hydra" not in cfg and cfg["seed"] == 0
    assert cfg["constraint"]["name"] == "rectified" and cfg["model"]["source"] == "world"
    assert cfg["world"]["name"] == "default"


def test_compare_experiment_sweeps_constraints_and_seeds(compose):
    """The experiment file's sweep, as Hydra's sweeper expands it; a command-line sweep replaces its seeds."""
    from repo_exp.callbacks import sweep_jobs

    hydra_cfg = compose("experiment=compare", return_hydra_config=True)
    assert hydra_cfg.hydra.mode == RunMode.MULTIRUN and hydra_cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert hydra_cfg.trainer.resume == "auto" and hydra_cfg.trainer.num_threads == 1
    assert set(hydra_cfg.hydra.callbacks) == {"run_folder_guard", "sweep_signals", "compare_report"}

    def jobs(*cli):
        cfg = OmegaConf.create({"hydra": {"sweeper": {"params": dict(hydra_cfg.hydra.sweeper.params)},
                                          "overrides": {"task": list(cli)}}})
        return {tuple(sorted(j)) for j in sweep_jobs(cfg)}

    assert jobs("experiment=compare") == {tuple(sorted(("experiment=compare", f"constraint={c}", f"seed={s}")))
                                          for c in ("average", "rectified") for s in (0, 1, 2)}
    five = jobs("experiment=compare", "world=no_temptation", "seed=0,1,2,3,4")
    assert len(five) == 10 and all("world=no_temptation" in j for j in five)
    assert {j for j in five if "seed=4" in j and "constraint=rectified" in j}


def _job_lines(output: str, job: str) -> list[str]:
    return [line for line in output.splitlines() if f"[{job}] rl step" in line]


def test_compare_sweep_at_smoke_size_writes_the_report_and_reuses_finished_runs(tmp_path):
    """``python -m repo_exp -m experiment=compare trainer.total_steps=2 seed=0,1`` at smoke size, through Hydra's
    (in-process) launcher: four job folders named by constraint and seed, the report beside them, the table printed,
    a progress line per job; the same command again trains nothing and reports each run once (25 s on two cores)."""
    sweep = tmp_path / "cmp" / "runs"
    args = [*COMPARE_SMOKE, "seed=0,1", "hydra/launcher=basic", f"hydra.sweep.dir={sweep}"]
    proc = repo_exp("-m", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {"average-seed0", "average-seed1", "rectified-seed0", "rectified-seed1"}
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == names
    for name in names:
        run = sweep / name
        assert (run / "eval" / "summary.json").is_file() and (run / "checkpoints" / "step_000002").is_dir()
        steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines() if "reward/mean" in r]
        assert steps == [1, 2]
        # one progress line per job and step here (each line at most every 10 s; the first and last always)
        lines = _job_lines(proc.stdout + proc.stderr, name)
        assert [re.search(r"rl step (\d)/2", x).group(1) for x in lines] == ["1", "2"], lines
        assert all(re.search(r"reward/mean \S+ cost/mean \S+ constraint/lambda \S+", x) for x in lines)
    out = sweep.parent
    report = json.loads((out / "report.json").read_text())
    assert {p for p in ("report.md", "training.png")} <= {p.name for p in out.iterdir()}
    for constraint in ("average", "rectified"):
        assert report[constraint]["oracle/prompt_violation_rate"]["n"] == 2
    assert sorted(Path(r["path"]).name for r in report["runs"]) == sorted(names)
    assert "prompts violating (oracle)" in proc.stdout and "| average | rectified |" in proc.stdout
    assert "## Summary (mean ± std over seeds [0, 1])" in (out / "report.md").read_text()

    before = {name: (sweep / name / "eval" / "summary.json").read_bytes() for name in names}
    again = repo_exp("-m", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already finished: its summary is reused") == 4
    assert not any(_job_lines(again.stdout + again.stderr, name) for name in names)
    assert {name: (sweep / name / "eval" / "summary.json").read_bytes() for name in names} == before
    report = json.loads((out / "report.json").read_text())
    assert report["average"]["oracle/prompt_violation_rate"]["n"] == 2 and len(report["runs"]) == 4


def test_a_stopped_job_stops_the_sweep_and_later_jobs_do_not_start(tmp_path, monkeypatch):
    """``run_job`` as each job of a sweep calls it: job 0 returns stopped by a signal → the sweep's stop mark and a
    failure; job 1 then fails at once without running its task; a single run stopped the same way exits normally."""
    from repo_exp import hydra_job

    sweep = tmp_path / "sweep"
    calls = []

    def task(cfg, run_dir):
        calls.append(run_dir.name)
        return {"stopped_at": 3}

    cfg = OmegaConf.create({"trainer": {"resume": "auto"}})
    monkeypatch.setattr(hydra_job, "job_dirs", lambda: (sweep / "job0", sweep))
    with pytest.raises(hydra_job.SweepStopped, match="job0 stopped by a signal after step 3"):
        hydra_job.run_job(cfg, task)
    assert hydra_job.stop_mark(sweep).is_file()
    monkeypatch.setattr(hydra_job, "job_dirs", lambda: (sweep / "job1", sweep))
    with pytest.raises(hydra_job.SweepStopped, match="not started"):
        hydra_job.run_job(cfg, task, reuse_finished=True)
    assert calls == ["job0"] and not (sweep / "job1").exists()
    monkeypatch.setattr(hydra_job, "job_dirs", lambda: (tmp_path / "single", None))
    assert hydra_job.run_job(cfg, task) == {"stopped_at": 3}  # one run: exit 0, as a pre-empted job expects

    def loading(cfg, run_dir):  # Ctrl-C while the models load, before the trainer's own handler is set
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hydra_job.run_job(cfg, loading)
    other = tmp_path / "other"
    monkeypatch.setattr(hydra_job, "job_dirs", lambda: (other / "job0", other))
    with pytest.raises(hydra_job.SweepStopped):  # an ordinary failed job: a parallel launcher keeps the others alive
        hydra_job.run_job(cfg, loading)
    assert hydra_job.stop_mark(other).is_file()


def _run_until_interrupted(args: list[str], marker: str, timeout: float = 600) -> tuple[int, str]:
    """Start ``python -m repo_exp ARGS`` in its own process group, send SIGINT to the whole group (as Ctrl-C in a
    terminal does) once ``marker`` appears in its output; the exit status and the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "repo_exp", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not any(marker in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=timeout)
    reader.join(timeout=30)
    return proc.returncode, "".join(lines)


def test_sigint_stops_the_sweep_and_the_same_command_resumes_it(tmp_path):
    """Ctrl-C during job 0 of a two-job sweep (in-process launcher): job 0 saves a checkpoint, job 1 does not start,
    the sweep exits non-zero; the same command continues job 0 from its checkpoint in the same folder, runs job 1,
    and the report holds each run once."""
    sweep = tmp_path / "sig" / "runs"
    args = ["-m", *COMPARE_SMOKE, "trainer.total_steps=6", "constraint=average,rectified", "seed=0",
            "hydra/launcher=basic", f"hydra.sweep.dir={sweep}"]
    rc, out = _run_until_interrupted(args, "[average-seed0] rl step 1/6")
    assert rc != 0, out[-3000:]
    assert "stopped by signal 2 after step" in out and "SweepStopped" in out
    first, second = sweep / "average-seed0", sweep / "rectified-seed0"
    (checkpoint,) = (first / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.split("_")[1])
    assert 1 <= stopped_at < 6 and not (first / "eval" / "summary.json").exists()
    # job 1 was not launched: not even its folder was made
    assert not second.exists()

    proc = repo_exp(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert f"resumed from {checkpoint} at step {stopped_at}" in log
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == {"average-seed0", "rectified-seed0"}
    steps = [json.loads(r)["step"] for r in (first / "metrics.jsonl").read_text().splitlines() if "reward/mean" in r]
    assert steps == list(range(1, 7))
    report = json.loads((sweep.parent / "report.json").read_text())
    assert len(report["runs"]) == 2 and report["average"]["eval/mean_cost"]["n"] == 1


@pytest.mark.slow
def test_sigint_stops_a_parallel_joblib_sweep_and_workers_log_to_the_terminal(tmp_path):
    """The same with the compare experiment's own launcher (joblib, two worker processes): the running jobs stop (the
    one that logged a step with a checkpoint), the queued ones do not start, the exit status is non-zero; each
    worker's job logs its progress lines, named by the job, to the terminal; the rerun resumes and finishes every job
    in the same folders."""
    sweep = tmp_path / "par" / "runs"
    args = ["-m", *COMPARE_SMOKE, "trainer.total_steps=30", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    rc, out = _run_until_interrupted(args, "rl step 1/30")
    assert rc != 0, out[-3000:]
    assert re.search(r"\[(average|rectified)-seed\d\] rl step 1/30 reward/mean", out)
    started = [p for p in sweep.iterdir() if (p / "metrics.jsonl").is_file()]
    assert 1 <= len(started) <= 2
    assert all(not (p / "eval" / "summary.json").exists() for p in started)
    assert len([p for p in sweep.iterdir() if p.is_dir()]) <= 4
    saved = {job.name: sorted((job / "checkpoints").glob("step_*")) for job in started}
    assert any(saved.values())
    proc = repo_exp(*args, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == {f"{c}-seed{s}" for c in ("average", "rectified")
                                                               for s in (0, 1)}
    log = proc.stdout + proc.stderr
    for name, checkpoints in saved.items():  # a job stopped before its first step has no checkpoint: it starts over
        expected = f"[{name}] resumed from {checkpoints[-1]}" if checkpoints else f"[{name}] trainer.resume=auto: no"
        assert expected in log, name


def test_an_override_with_dotdot_cannot_put_a_job_folder_outside_the_sweep(tmp_path):
    sweep = tmp_path / "a" / "b" / "sweep"
    proc = repo_exp("-m", "experiment=smoke", "constraint=average,rectified", "run_name=../../../escaped",
                    f"hydra.sweep.dir={sweep}", timeout=300)
    assert proc.returncode != 0
    assert "'run_name=../../../escaped'" in proc.stderr and "inside hydra.sweep.dir" in proc.stderr
    assert not any(tmp_path.rglob("*escaped*"))
    assert not [p for p in sweep.iterdir() if p.is_dir()]  # nothing started inside either


def test_job_subdir_resolver():
    from repo_exp.config import job_subdir

    assert job_subdir("0_constraint=average,seed=1") == "0_constraint=average,seed=1"
    assert job_subdir("0_run_name=..") == "0_run_name=.."  # a name, not a step up
    assert job_subdir("1_data.path=../x") == "1_data.path=../x"  # '0_data.path=..' is a name: still inside
    with pytest.raises(ValueError, match=r"'data.path=../../x'"):  # back to the sweep folder: jobs could share one
        job_subdir("1_constraint=average,data.path=../../x")
    with pytest.raises(ValueError, match="inside hydra.sweep.dir"):
        job_subdir("/tmp/elsewhere")


def test_wandb_group_is_unique_per_sweep_folder(tmp_path, monkeypatch):
    from repo_exp.loggers import sweep_group

    monkeypatch.chdir(tmp_path)
    day1, day2 = Path("multirun/2026-11-29/12-00-00"), Path("multirun/2026-11-30/12-00-00")
    assert sweep_group(day1) == "multirun/2026-11-29/12-00-00" != sweep_group(day2)
    assert sweep_group(tmp_path / day1) == sweep_group(day1)  # the same folder, however it is written
    elsewhere = [tmp_path.parent / "x" / "12-00-00", tmp_path.parent / "y" / "12-00-00"]
    a, b = (sweep_group(p) for p in elsewhere)
    assert a.startswith("12-00-00-") and b.startswith("12-00-00-") and a != b


def test_report_counts_a_run_held_by_two_folders_once(tmp_path):
    from repo_exp.report import build_report

    first = make_run(tmp_path / "sweep" / "2026-11-29" / "0_seed=0", "average", 0.0, 0, {"eval/mean_cost": -0.2})
    make_run(tmp_path / "sweep" / "2026-11-29" / "1_seed=1", "average", 0.0, 1, {"eval/mean_cost": -0.4})
    # the same sweep started again in new folders: a copy of seed 0 with the same settings, run later
    time.sleep(0.01)
    again = tmp_path / "sweep" / "2026-11-30" / "0_seed=0"
    shutil.copytree(first, again)
    (again / "eval" / "summary.json").write_text(json.dumps({"eval/threshold": 0.0, "eval/mean_cost": -0.3}))
    (again / ".hydra" / "config.yaml").write_text((first / ".hydra" / "config.yaml").read_text()
                                                  + "trainer:\n  resume: auto\n  num_threads: 1\n")
    report = build_report([tmp_path / "sweep", tmp_path / "sweep" / "2026-11-29"], tmp_path / "out")
    assert report["average"]["eval/mean_cost"]["n"] == 2
    assert report["average"]["eval/mean_cost"]["mean"] == pytest.approx((-0.3 - 0.4) / 2)  # the later copy
    assert report["duplicates"] == [str(first.resolve())]


def test_report_dedupes_by_wandb_id(tmp_path):
    from repo_exp.report import build_report

    a = make_run(tmp_path / "s" / "a", "rectified", 0.0, 0, {"eval/mean_cost": -0.2})
    b = make_run(tmp_path / "s" / "b", "rectified", 0.0, 5, {"eval/mean_cost": -0.6})
    for run in (a, b):
        (run / "wandb_id.txt").write_text("abc123\n")
    report = build_report([tmp_path / "s"], tmp_path / "out")
    assert report["rectified"]["eval/mean_cost"]["n"] == 1 and len(report["duplicates"]) == 1


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    from repo_exp.config import ConfigError
    from repo_exp.hydra_job import RUN_CONFIG, finished_summary, record_settings

    cfg = OmegaConf.create({"seed": 0, "trainer": {"resume": "auto", "num_threads": 1}, "constraint": {"d": 0}})
    assert finished_summary(cfg, tmp_path) is None and not (tmp_path / RUN_CONFIG).exists()
    record_settings(cfg, tmp_path)  # after the run's first start
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text('{"eval/mean_cost": -1.0}')
    cfg.trainer.num_threads = 2  # does not change the run
    assert finished_summary(cfg, tmp_path) == {"eval/mean_cost": -1.0}
    cfg.constraint.d = 0.5
    with pytest.raises(ConfigError, match=r"constraint.d: 0 → 0.5"):
        finished_summary(cfg, tmp_path)
    cfg.constraint.d = 0
    cfg.trainer.resume = None  # a fresh run is the trainer's business (it refuses a used folder)
    assert finished_summary(cfg, tmp_path) is None


def test_a_setting_added_after_a_run_finished_is_its_default_there(tmp_path):
    """A run recorded before ``world.trunk`` existed is reused when the command's trunk is the schema's default (the
    behaviour the run had), and refused, naming the key, when it is not; a group's key the schema cannot type stays a
    change."""
    from repo_exp.config import ConfigError
    from repo_exp.hydra_job import finished_summary, record_settings
    from repo_exp.run_folder import MISSING, changed_settings, schema_default

    assert schema_default("world.trunk.name") == "tiny" and schema_default("world.trunk.max_new_tokens") == 24
    assert schema_default("constraint.threshold") == MISSING and schema_default("world.nope") == MISSING
    cfg = OmegaConf.create({"seed": 0, "trainer": {"resume": "auto"}, "world": {"seed": 1}})
    record_settings(cfg, tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text('{"eval/mean_cost": -1.0}')
    cfg.world.trunk = {"name": "tiny", "source": "tiny", "path": None, "max_new_tokens": 24}
    assert finished_summary(cfg, tmp_path) == {"eval/mean_cost": -1.0}
    cfg.world.trunk.max_new_tokens = 64
    with pytest.raises(ConfigError, match=r"world.trunk.max_new_tokens: '<absent>' → 64"):
        finished_summary(cfg, tmp_path)
    assert changed_settings({}, {"constraint": {"threshold": 0.0}}) == [("constraint.threshold", MISSING, 0.0)]


def test_every_is_true_first_then_once_per_interval(monkeypatch):
    from repo_exp import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    every = progress.Every(10.0)
    seen = []
    for t in (0, 3, 9.9, 10, 15, 20.5, 21):
        now[0] = 100.0 + t
        seen.append(every())
    assert seen == [True, False, False, True, False, True, False]
    assert every(force=True)
    assert progress.step_line("rl", 3, 10, {"reward/mean": 0.5, "cost/mean": None}) == "rl step 3/10 reward/mean 0.5"


def test_world_stages_log_their_progress_with_the_loss(tmp_path, caplog):
    from repo_exp.config import ScoreStageConfig, WorldConfig, WorldRoundsConfig, WorldStageConfig
    from repo_exp.world.pipeline import build_world

    world = WorldConfig(cache_dir=str(tmp_path), num_preference_pairs=32, sft=WorldStageConfig(steps=3, batch_size=8),
                        reward_model=ScoreStageConfig(steps=2, batch_size=8),
                        cost_model=ScoreStageConfig(steps=2, batch_size=8), rounds=WorldRoundsConfig(count=0))
    with caplog.at_level(logging.INFO, logger="repo_exp"):
        build_world(world)
    text = caplog.text
    assert re.search(r"world SFT step 3/3 loss \d", text)
    assert "world preferences: sampled 0/32 responses" in text
    assert re.search(r"reward model step 2/2 loss \d", text) and re.search(r"cost model step 2/2 loss \d", text)


def test_a_finished_run_without_a_settings_record_is_not_reused(tmp_path):
    """A folder with a summary and no run_config.yaml (e.g. reference results copied into a sweep folder): nothing
    says what it computed, so it is refused, naming the missing record; with the trainer's own record (its resolved
    config or a checkpoint) the trainer decides, after comparing its settings."""
    from repo_exp.config import ConfigError
    from repo_exp.hydra_job import finished_summary
    from repo_exp.run_folder import RESOLVED_CONFIG

    cfg = OmegaConf.create({"seed": 0, "trainer": {"resume": "auto"}, "constraint": {"d": 0}})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text('{"eval/mean_cost": -1.0}')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(ConfigError, match=r"holds a finished run's eval/summary.json but no record of the settings "
                                          r"that produced it \(run_config.yaml, config.resolved.yaml or a checkpoint\)"):
        finished_summary(cfg, tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written or moved
    (tmp_path / RESOLVED_CONFIG).write_text("seed: 0\n")
    assert finished_summary(cfg, tmp_path) is None  # not reused here: the trainer checks the settings first


def test_make_run_writes_where_git_tracks_nothing_and_the_references_are_apart(compose):
    """``make run`` (experiment=compare) and the other studies write under outputs/, which git ignores; the
    reference results under results/ are not where any of them writes."""
    for experiment in ("compare", "lambda_sweep", "robustness", "heldout", "frontier"):
        sweep = compose(f"experiment={experiment}", return_hydra_config=True).hydra.sweep.dir
        assert sweep.startswith("outputs/"), (experiment, sweep)
        tracked = subprocess.run(["git", "ls-files", str(Path(sweep).parent)], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout
        assert tracked == "", tracked
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{sweep}/average-seed0/metrics.jsonl"], cwd=ROOT)
        assert ignored.returncode == 0, f"{sweep} is not ignored by git"
    assert "make run" in (ROOT / "Makefile").read_text() and "experiment=compare" in (ROOT / "Makefile").read_text()


def test_a_sweep_folder_with_a_users_multirun_yaml_is_refused_and_hydras_own_is_not(tmp_path):
    from repo_exp.callbacks import sweep_folder_problem

    (tmp_path / "multirun.yaml").write_text("my notes: keep\n")
    assert "multirun.yaml that is not Hydra's" in sweep_folder_problem(tmp_path)
    (tmp_path / "multirun.yaml").write_text(": not yaml: [\n")
    assert "multirun.yaml that is not Hydra's" in sweep_folder_problem(tmp_path)
    (tmp_path / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\nseed: 0\n")
    assert sweep_folder_problem(tmp_path) is None
