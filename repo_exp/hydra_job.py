"""The job side of the Hydra applications (``python -m repo_exp`` trains, ``python -m repo_exp.evaluate``
evaluates): the run folder Hydra chose, config errors as exit 2, and what makes a sweep behave as a whole.

A sweep stops as a whole: a job stopped by a signal (its checkpoint saved) leaves a stop mark in the sweep folder
and fails, every job that has not started yet sees the mark and fails at once, so the sweep exits non-zero. The
same sweep command with ``trainer.resume=auto`` continues the same job folders (when the job folders do not depend
on the time, e.g. ``experiment=compare``'s ``<constraint>-seed<k>``): a finished run — ``eval/summary.json``
present, written last — returns its summary at once, an interrupted one resumes from its checkpoint.

Job folders never leave ``hydra.sweep.dir``: the ``job_subdir`` resolver refuses an override value that would
put one outside (``../``, an absolute path).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from repo_exp.config import ConfigError, job_subdir
from repo_exp.progress import result_line
from repo_exp.run_folder import (HARMLESS, RESOLVED_CONFIG, changed_settings, covered, harmless,
                                 restore_hydra_files)

log = logging.getLogger("repo_exp")

CONFIG_PATH = "pkg://repo_exp.conf"
STOP_MARK = ".sweep_stopped"  # in the sweep folder: written when a job of the sweep was stopped by a signal
RUN_CONFIG = "run_config.yaml"  # in the run folder: the settings the run has now (Hydra rewrites .hydra/)
# settings that do not change what a run computes: a finished run is reused whatever they are
NOT_THE_RUN = ("trainer.resume", "trainer.progress", "trainer.num_threads", "logger", "run_name")


class SweepStopped(RuntimeError):
    """A job of the sweep was stopped by a signal: the remaining jobs do not start and the sweep fails."""


# registered here too: a launcher's worker process imports this module (through the task function) and not the
# entry point that calls register_configs
OmegaConf.register_new_resolver("job_subdir", job_subdir, replace=True)

# Hydra instantiates sweepers and launchers only from its plugin namespace package ``hydra_plugins`` as found on
# sys.path. The sweeper and launcher that stop a sweep as a whole (``hydra_plugins.repo_exp_sweeps``) live under
# ``repo_exp/_hydra``, which joins sys.path here, before any of this project's Hydra applications starts.
PLUGIN_ROOT = str(Path(__file__).resolve().parent / "_hydra")
if PLUGIN_ROOT not in sys.path:
    sys.path.append(PLUGIN_ROOT)


def strip_local_rank() -> None:
    """The ``deepspeed`` launcher appends ``--local_rank=N``, which Hydra would reject: move it to the environment."""
    args = []
    it = iter(sys.argv[1:])
    for arg in it:
        if arg.startswith("--local_rank"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it)
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        args.append(arg)
    sys.argv[1:] = args


def job_dirs() -> tuple[Path, Path | None]:
    """This job's run folder, and its sweep folder under ``--multirun`` (None for a single run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir), Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def stop_mark(sweep_dir: Path) -> Path:
    return sweep_dir / STOP_MARK


def mark_stopped(sweep_dir: Path, why: str) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    stop_mark(sweep_dir).write_text(why + "\n")


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """The job config without the settings that do not change the run (``NOT_THE_RUN``)."""
    plain = OmegaConf.to_container(cfg, resolve=False)  # as written (an env-dependent path stays as given)
    for key in NOT_THE_RUN:
        head, _, tail = key.partition(".")
        node = plain.get(head) if tail else plain
        if isinstance(node, dict):
            node.pop(tail or head, None)
            if tail and not node:
                plain.pop(head)
    return plain


def finished_summary(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Under ``trainer.resume=auto``: the final summary of a run that already finished in ``run_dir`` with the same
    settings (then nothing is trained again); None when there is none. A finished run with other settings is
    refused, naming them: its results would be reported under the new ones.

    Only a run whose settings are on record (``run_config.yaml``) is reused. Without that record the trainer decides
    from what the run left (its resolved config or a checkpoint, which it compares with this command's settings); a
    folder with a summary and no record of any kind is refused: nothing says what it computed, and training there
    would overwrite it."""
    record = run_dir / RUN_CONFIG
    summary = run_dir / "eval" / "summary.json"
    if OmegaConf.select(cfg, "trainer.resume") != "auto" or not summary.is_file():
        return None
    if not record.is_file():
        if (run_dir / RESOLVED_CONFIG).is_file() or any((run_dir / "checkpoints").glob("step_*")):
            log.info("%s holds a finished run without %s: the trainer checks its settings against the run's own "
                     "record before anything is reused", run_dir, RUN_CONFIG)
            return None
        raise ConfigError(f"{run_dir} holds a finished run's eval/summary.json but no record of the settings that "
                          f"produced it ({RUN_CONFIG}, {RESOLVED_CONFIG} or a checkpoint), so it cannot be reused "
                          f"as this command's run, and training there would overwrite it; nothing was changed. "
                          f"Write this sweep elsewhere (hydra.sweep.dir=... or hydra.run.dir=...), or move that "
                          f"folder away")
    old, new = OmegaConf.to_container(OmegaConf.load(record)), run_settings(cfg)
    changes = changed_settings(old, new)
    allowed = list(OmegaConf.select(cfg, "trainer.allow_changes") or [])
    refused = [f"{k}: {o!r} → {n!r}" for k, o, n in changes if not harmless(k, new) and not covered(k, allowed)]
    if refused:
        raise ConfigError(f"{run_dir} holds a finished run with other settings ({'; '.join(refused[:5])}); "
                          f"choose another folder (hydra.sweep.dir=... or hydra.run.dir=...) or delete it, or, "
                          f"to continue that run with them, name them in trainer.allow_changes")
    if any(not covered(k, HARMLESS) for k, _, _ in changes):
        # a longer run, or changes allowed by name: the trainer continues from the last checkpoint
        log.info("%s finished; continuing it with changed settings (%s)", run_dir,
                 "; ".join(f"{k}: {o!r} → {n!r}" for k, o, n in changes[:5]))
        return None
    log.info("%s already finished: its summary is reused (trainer.resume=auto)", run_dir)
    return json.loads(summary.read_text())


def record_settings(cfg: DictConfig, run_dir: Path) -> None:
    """Keep the settings the run now has beside it, those of its first start or of the last launch whose changes
    the trainer accepted (``.hydra/config.yaml`` keeps the first start's)."""
    record = run_dir / RUN_CONFIG
    if run_dir.is_dir():
        tmp = record.with_suffix(f".{os.getpid()}.tmp")  # every rank of a distributed job gets here
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(run_settings(cfg))))
        tmp.replace(record)


def _interruptible():
    """Ctrl-C raises KeyboardInterrupt again (until the trainer sets its own handler); the previous handler, or None
    off the main thread, where signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, signal.default_int_handler)


def name_job_lines(name: str) -> None:
    """Every log line of this job starts with its name (the job folder's): the jobs of a parallel sweep share one
    terminal."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"[%(asctime)s][{name}] %(message)s"))


def lines_instead_of_bars(cfg: DictConfig) -> None:
    """A sweep's jobs log a progress line every few seconds instead of drawing progress bars, which parallel jobs
    would draw over each other: the trainer's (``trainer.progress`` changes nothing a run computes) and those of the
    Hugging Face libraries (loading and saving models)."""
    if OmegaConf.select(cfg, "trainer.progress"):
        with open_dict(cfg):
            cfg.trainer.progress = False
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when the libraries are imported, after this
    if "huggingface_hub" in sys.modules:  # a launcher's worker that ran a job before: already imported
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def run_job(cfg: DictConfig, task: Callable[[DictConfig, Path], dict[str, Any]],
            reuse_finished: bool = False) -> dict[str, Any]:
    """Run ``task(cfg, run_dir)`` in the folder Hydra chose; say where at the start and what came out at the end.
    Under ``--multirun``: name the job on each of its lines, refuse to start after the sweep was stopped, and stop the
    sweep when this job is stopped by a signal."""
    run_dir, sweep_dir = job_dirs()
    if sweep_dir is not None:
        name_job_lines(run_dir.name)
        lines_instead_of_bars(cfg)
    log.info("run folder: %s", run_dir.resolve())
    if sweep_dir is not None and stop_mark(sweep_dir).is_file():
        why = stop_mark(sweep_dir).read_text().strip()
        raise SweepStopped(f"not started: the sweep in {sweep_dir} was stopped ({why}); run the same command with "
                           f"trainer.resume=auto to continue it")
    # a sweep's job takes Ctrl-C back while it runs (a parallel launcher's worker ignores it)
    previous = _interruptible() if sweep_dir is not None else None
    try:
        summary = None
        if reuse_finished:
            # refused or reused, this launch trains nothing: the folder shows the run as it was started
            try:
                summary = finished_summary(cfg, run_dir)
            except ConfigError:
                restore_hydra_files(run_dir)
                raise
            if summary is not None:
                restore_hydra_files(run_dir)
        if summary is None:
            summary = task(cfg, run_dir)
            if reuse_finished:  # the task accepted the settings and ran (to the end or to a stop)
                record_settings(cfg, run_dir)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if sweep_dir is None:
            raise
        # Ctrl-C before the trainer's own handler was set (models still loading): a failed job like any other, so
        # that a parallel launcher lets the other running jobs save their checkpoints instead of killing them
        summary = {"stopped_at": 0}
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if sweep_dir is not None and isinstance(summary, dict) and "stopped_at" in summary:
        why = f"{run_dir.name} stopped by a signal after step {summary['stopped_at']}"
        mark_stopped(sweep_dir, why)
        raise SweepStopped(f"{why} (its last checkpoint kept); the sweep stops: run the same command with "
                           f"trainer.resume=auto to continue it")
    if not (isinstance(summary, dict) and "stopped_at" in summary):
        log.info(result_line(summary if isinstance(summary, dict) else {}, run_dir))
    return summary
