"""Hydra callbacks: what a run or a sweep does before its first job and after its last one.

- ``RunFolderGuard`` (every launch): before Hydra writes its ``.hydra/`` files and its log file into the run folder,
  refuse a folder the run may not write in (``repo_exp.run_folder.check_run_folder``: a folder of the user's that is
  not a run, or a link out of it), or a sweep folder that holds files of its own: exit 2 naming the path, with every
  file as it was.
- ``SweepSignals`` (every multirun): Ctrl-C stops the sweep as a whole. The running jobs save a checkpoint and stop
  (the trainer's own handler), the jobs not started yet do not start (the stop mark, ``repo_exp.hydra_job``), and the
  sweep exits non-zero; a second Ctrl-C stops the running jobs without their checkpoint.
- ``SweepWorlds``: builds every synthetic world of the sweep once before the jobs start (the jobs then find it in the
  cache; its file lock keeps concurrent builders safe).
- ``CompareReport`` (``experiment=compare``): ``SweepWorlds``, and when the sweep ends writes the report
  (``report.json``, ``report.md``, figures) beside the runs' folder and prints the summary table.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from repo_exp import run_folder
from repo_exp.hydra_job import STOP_MARK, stop_mark
from repo_exp.report import helpfulness_sources, models_line, table  # noqa: F401  (the summary's parts)

log = logging.getLogger("repo_exp")

SWEEP_FILES = frozenset({"multirun.yaml", STOP_MARK, ".submitit"})  # what a sweep writes beside its job folders


def _refuse(message: str) -> None:
    """End the launch as a config error (exit 2): Hydra turns an exception in a callback into a warning."""
    log.error("config error: %s", message)
    raise SystemExit(2)


def sweep_folder_problem(sweep_dir: Path) -> str | None:
    """Why ``sweep_dir`` is not a sweep folder of this project, or None: beside its job folders a sweep folder holds
    only Hydra's ``multirun.yaml``, the stop mark and launcher logs; a link out of it is refused like a run folder's
    (each job folder is checked as it starts)."""
    if not sweep_dir.exists():
        return None
    if not sweep_dir.is_dir():
        return f"the sweep folder {sweep_dir} is a file"
    for entry in sorted(sweep_dir.iterdir()):
        if entry.is_symlink() and run_folder.leads_out(entry, sweep_dir):
            return f"{entry} -> {os.readlink(entry)} is a symbolic link out of the sweep folder {sweep_dir}"
        if entry.is_file() and entry.name not in SWEEP_FILES and entry.suffix != ".log":
            return (f"the sweep folder {sweep_dir} holds files that are not a sweep's ({entry.name}, …): the jobs "
                    f"would write among them")
        if entry.name == "multirun.yaml" and entry.is_file() and not _hydras_record(entry):
            return (f"the sweep folder {sweep_dir} holds a multirun.yaml that is not Hydra's record of a sweep (no "
                    f"hydra: section): Hydra would replace it")
    return None


def _hydras_record(path: Path) -> bool:
    """Whether ``path`` reads as the ``multirun.yaml`` Hydra writes: a mapping with a ``hydra`` section."""
    import yaml

    try:
        return "hydra" in (OmegaConf.load(path) or {})
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, or not YAML: not Hydra's
        return False


def _write_nothing_into_the_run_folder(config: DictConfig) -> None:
    """This process's Hydra writes neither ``.hydra/`` files nor a log file into the run folder (rank 0's does)."""
    from omegaconf import open_dict, read_write

    with read_write(config.hydra), open_dict(config.hydra):
        config.hydra.output_subdir = None
        logging_config = config.hydra.job_logging
        if OmegaConf.select(logging_config, "handlers.file") is not None:
            del logging_config.handlers["file"]
        for node in (OmegaConf.select(logging_config, "root"), *(OmegaConf.select(logging_config, "loggers") or {})
                     .values()):
            if node is not None and "handlers" in node:
                node.handlers = [h for h in node.handlers if h != "file"]


class RunFolderGuard(Callback):
    """Refuse a run folder (``hydra.run.dir``) or sweep folder (``hydra.sweep.dir``) the run may not write in, before
    Hydra writes anything into it (``on_run_start`` and ``on_multirun_start`` come before Hydra's own files).

    Under a distributed launcher every rank is a Hydra application of its own with the same run folder: rank 0 checks
    it as one process does and its Hydra writes the record; the other ranks leave aside what rank 0 may be writing
    meanwhile (``.hydra/``, its log) and write nothing there themselves, so that no rank writes before rank 0's
    verdict (the trainer's ranks follow it)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        rank = int(os.environ.get("RANK", "0"))
        try:
            run_folder.check_run_folder(Path(str(config.hydra.run.dir)), launching=rank != 0)
        except run_folder.RunFolderRefused as exc:
            _refuse(str(exc))
        if rank != 0:
            _write_nothing_into_the_run_folder(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = sweep_folder_problem(Path(str(config.hydra.sweep.dir)))
        if problem:
            _refuse(f"{problem}. Choose another folder (hydra.sweep.dir=...); nothing was written there")


class SweepSignals(Callback):
    """Ctrl-C during a multirun: stop the whole sweep after the running jobs have saved their checkpoints.

    A terminal's Ctrl-C reaches every process of the sweep. joblib would answer it in the parent by killing its
    workers, and a worker still starting (importing, reading its job) would die with it and break the pool, so that
    the running jobs lose the checkpoint they are about to save. So the sweep's parent ignores SIGINT, the worker
    processes it starts inherit that, and each job takes Ctrl-C back while it runs (``repo_exp.hydra_job.run_job``):
    the trainer saves and stops, the job fails and leaves the sweep's stop mark, and the jobs not started yet see
    the mark and do not start. (A Ctrl-C while no job runs yet, e.g. while the workers start, is ignored.)
    """

    def __init__(self) -> None:
        self.previous: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        stop_mark(Path(config.hydra.sweep.dir)).unlink(missing_ok=True)  # a new start of the sweep (e.g. to resume)
        self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job of this sweep, as its sweeper expands it (command-line sweeps win over
    ``hydra.sweeper.params``; the frontier sweeper's arms each cross them, ``repo_exp.sweeps``)."""
    from repo_exp.sweeps import sweep_axes, sweep_overrides

    return sweep_overrides(*sweep_axes(config), list(config.hydra.overrides.task))


def _the_run(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that decide what a run computes (``hydra_job.NOT_THE_RUN`` and ``hydra.*`` left out), sorted."""
    from repo_exp.hydra_job import NOT_THE_RUN

    def key(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~")

    return tuple(sorted(o for o in overrides if not key(o).startswith("hydra.")
                        and not any(key(o) == k or key(o).startswith(k + ".") for k in NOT_THE_RUN)))


def job_folders(sweep_dir: Path, jobs: list[list[str]]) -> list[Path]:
    """The folders under ``sweep_dir`` (at any depth) whose ``.hydra/overrides.yaml`` is one of ``jobs``, up to
    settings that do not change a run (the folders this sweep's jobs ran in or reused, not those of other sweeps
    kept in the same place)."""
    wanted = {_the_run(job) for job in jobs}
    found = []
    for path in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        if _the_run(list(map(str, OmegaConf.load(path)))) in wanted:
            found.append(path.parent.parent)
    return found


def sweep_worlds(jobs: list[list[str]]) -> list[list[str]]:
    """One job's overrides for each distinct world among ``jobs`` (jobs differ in ``world``/``world.*``)."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        world = tuple(sorted(o for o in job if o.split("=", 1)[0].lstrip("+~").split(".")[0] == "world"))
        seen.setdefault(world, job)
    return list(seen.values())


def _job_config(config: DictConfig):
    """The sweep's config without its ``hydra`` node, validated (the swept values are each job's own)."""
    import copy

    from omegaconf import open_dict

    from repo_exp.config import validate

    job = copy.deepcopy(config)
    with open_dict(job):
        del job["hydra"]
    return validate(job)


def _fatal(what: str):
    """Hydra turns an exception in a callback into a warning and exits 0: end the sweep with an error instead."""
    def wrap(method):
        def run(self, config: DictConfig, **kwargs: Any) -> None:
            try:
                method(self, config, **kwargs)
            except Exception as exc:
                log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=True)
                raise SystemExit(1) from exc
        return run
    return wrap


def build_sweep_worlds(config: DictConfig, start: float | None = None) -> dict[str, Any]:
    """Build (or find) every world the jobs of the sweep ``config`` train in, before any job starts, so that the jobs
    find them in the cache (its file locks keep concurrent builders safe). Returns what the report says about them:
    ``{"name", "seed", "paths", <stage metrics>}`` for one world, ``{"seed<k>": …}`` for several; {} when no job
    loads a world model."""
    from repo_exp.config import compose_config, validate
    from repo_exp.world.stage import build_or_find_world, needs_world

    start = time.perf_counter() if start is None else start
    job = _job_config(config)
    if not needs_world(job):
        return {}
    worlds = sweep_worlds(sweep_jobs(config))  # every world the jobs train in (the robustness study has three)
    out: dict[str, Any] = {}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # no job runs yet: Ctrl-C stops at once
    try:
        for overrides in worlds:
            world_cfg = job.world if len(worlds) == 1 else validate(compose_config(overrides)).world
            log.info("building (or finding) the world %r (seed %d): SFT → preferences → reward and cost models → "
                     "%d on-policy round(s)", world_cfg.name, world_cfg.seed, world_cfg.rounds.count)
            world = build_or_find_world(world_cfg)
            metrics = world.metrics()
            entry = {"name": world.name, "seed": world.seed, "paths": world.paths(), **metrics}
            out = entry if len(worlds) == 1 else {**out, f"seed{world.seed}": entry}
            log.info("world %r (seed %d) ready after %.0f s in %s: reward model held-out accuracy %.3f, cost model "
                     "%.3f, cost sign %.3f", world.name, world.seed, time.perf_counter() - start, world.cache_dir,
                     metrics["reward/pairwise_accuracy"], metrics["cost/pairwise_accuracy"],
                     metrics["cost/sign_accuracy"])
    finally:
        signal.signal(signal.SIGINT, previous)
    return out


class SweepWorlds(Callback):
    """Every world of the sweep built (or found) before its first job starts (``build_sweep_worlds``); a sweep's
    report callback extends it."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.world: dict[str, Any] = {}

    @_fatal("building the world")
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.perf_counter()
        # the jobs' processes (started after this) log lines; transformers' loading/saving bars would interleave
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        self.world = build_sweep_worlds(config, self.start)


class CompareReport(SweepWorlds):
    """The default comparison's world before the jobs (``SweepWorlds``) and its report after them
    (``experiment=compare``)."""

    @_fatal("the comparison's report")
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from repo_exp.report import build_report, comparison_constraints, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        out = sweep_dir.parent
        jobs = sweep_jobs(config)
        folders = job_folders(sweep_dir, jobs)
        job = _job_config(config)
        report = build_report(folders, out, title=f"Average vs rectified constraint — world {job.world.name!r}",
                              write=False)
        report["world"] = self.world or {"name": job.world.name}
        report["overrides"] = list(config.hydra.overrides.task)
        report["seconds"] = round(time.perf_counter() - self.start, 1)
        write_report(report, out)  # with the comparison's summary (``report.comparison_appendix``)
        seeds = sorted({r["seed"] for r in report["runs"]})
        print(f"\n{report['title']} — mean ± std over seeds {seeds}\n")
        print(table(report, comparison_constraints(report)))
        for name, why in report["figures_skipped"].items():
            print(f"figure {name} not drawn: {why}")
        print(f"\n{models_line(report['world'])}\nReport: {out / 'report.md'} ({report['seconds']:.0f} s)", flush=True)


class FrontierReport(SweepWorlds):
    """``experiment=frontier``: the worlds before the jobs (``SweepWorlds``, as for the comparison), and after them the report
    with the frontier and the matched comparison (``repo_exp.frontier``) beside the runs' folder, its table printed."""

    @_fatal("the frontier's report")
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from repo_exp import frontier
        from repo_exp.report import build_report, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        out = sweep_dir.parent
        folders = job_folders(sweep_dir, sweep_jobs(config))
        report = build_report(folders, out, title="The frontier: each method along its own knob", write=False)
        report["world"] = self.world
        report["overrides"] = list(config.hydra.overrides.task)
        report["seconds"] = round(time.perf_counter() - self.start, 1)
        write_report(report, out, appendix=f"\n{models_line(self.world)}\n" if self.world else "")
        if report.get("frontier"):
            print("\n" + frontier.markdown(report["frontier"], report.get("matched", [])))
        for name, why in report["figures_skipped"].items():
            print(f"figure {name} not drawn: {why}")
        print(f"Report: {out / 'report.md'} ({report['seconds']:.0f} s)", flush=True)
