"""A run folder has one owner, and a resume continues the same run.

Ownership: the first process to take an exclusive ``flock`` on ``<run>/.owner.lock`` owns the folder until it exits
(the operating system drops the lock with the process, so a killed run never leaves a stale lock behind); its pid,
host and command line go to ``<run>/.owner.json``. Any other process (a second fresh run, the same
``trainer.resume=auto`` command requeued while the first still runs, an evaluation) is refused before it writes
anything, with a message naming the holder. ``flock`` is not reliable on every network filesystem (NFS without lock
support): there the lock is advisory at best.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` into the run folder at every launch,
before the job runs. The owner keeps the first launch's as ``.hydra/<name>.original.yaml`` and puts them back after
every later launch (a later launch's own are kept as ``.hydra/<name>.resumed-<n>.yaml``); a refused process puts them
back too. ``.owner.json`` and Hydra's log file are the only files a refused process changes.

Resume checks: the resolved config of the run (``config.resolved.yaml`` at the first launch, and in every
checkpoint's ``state.json``) is compared with the new one. A changed setting that changes the run is refused, naming
it with its old and new value, unless ``trainer.allow_changes`` names it (or a prefix of it); the allowed changes are
applied and recorded in ``resume_changes.jsonl``. Settings that cannot change what is computed (``HARMLESS``) may
always change.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterable

from repo_exp.config import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".owner.lock"
OWNER_FILE = ".owner.json"
RESOLVED_CONFIG = "config.resolved.yaml"
CHANGES_FILE = "resume_changes.jsonl"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")

# settings that change where the run reports, how often it saves or evaluates, or how many threads it uses, never
# what a step computes
HARMLESS = (
    "logger", "run_name", "trainer.progress", "trainer.num_threads", "trainer.resume", "trainer.init_from",
    "trainer.allow_changes", "trainer.save_every", "trainer.keep_last", "eval.every", "eval.at_start", "eval.at_end",
    "eval.batch_size", "world.cache_dir", "deepspeed.release_host_memory",
)
# the length of the run: harmless only when no learning-rate schedule depends on it
RUN_LENGTH = ("trainer.total_steps", "trainer.epochs")
CONSTANT_SCHEDULES = ("constant",)


class RunFolderBusy(ValueError):
    """Another live process owns the run folder."""


class ResumeRefused(ConfigError):
    """A resume would continue the run with settings that change it (a config error: exit 2 from the command line,
    as for a finished run)."""


# the locks this process holds, by resolved folder: kept open for the process lifetime
_HELD: dict[Path, Any] = {}


def holder_of(run_dir: Path) -> str:
    """Who holds ``run_dir``, as its owner file says."""
    try:
        owner = json.loads((run_dir / OWNER_FILE).read_text())
        return (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}: "
                f"{owner.get('command')}")
    except (OSError, ValueError):
        return "a process that has not yet recorded itself in .owner.json"


def claim(run_dir: Path) -> None:
    """Take the run folder for this process (a no-op if it holds it already), or raise ``RunFolderBusy``."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        restore_hydra_files(run_dir)
        raise RunFolderBusy(f"the run folder {run_dir} is in use by another process ({holder_of(run_dir)}); this "
                            f"process wrote nothing there. Wait for it to end (or stop it), then continue with "
                            f"trainer.resume=auto, or use another folder (hydra.run.dir=...)") from None
    _HELD[key] = handle
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
    _write_atomic(run_dir / OWNER_FILE, json.dumps(owner))


def release(run_dir: Path) -> None:
    """Give the folder up before the process ends (the lock also goes with the process)."""
    handle = _HELD.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- Hydra's files in the folder


def _original(name: str) -> str:
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.original.{suffix}"


def restore_hydra_files(run_dir: Path) -> None:
    """Put the first launch's ``.hydra`` files back where a later launch's Hydra wrote its own."""
    hydra = Path(run_dir) / ".hydra"
    for name in HYDRA_FILES:
        original = hydra / _original(name)
        if original.is_file():
            text, current = original.read_text(), hydra / name
            if not current.is_file() or current.read_text() != text:  # unchanged files keep their times
                _write_atomic(current, text)


def keep_hydra_files(run_dir: Path, first_launch: bool, this_launch: dict[str, str] | None) -> int | None:
    """At the first launch keep Hydra's files as the originals; at a later one keep this launch's as
    ``<name>.resumed-<n>`` and put the originals back. ``this_launch``: {file name: text} as Hydra wrote it for this
    launch (``hydra_launch_files``). Returns n (None at the first launch or outside Hydra)."""
    hydra = Path(run_dir) / ".hydra"
    if this_launch is None or not hydra.is_dir():
        return None
    if first_launch or not (hydra / _original("config.yaml")).is_file():
        for name, text in this_launch.items():
            _write_atomic(hydra / _original(name), text)
        restore_hydra_files(run_dir)  # the same text, unless a refused process's Hydra wrote its own meanwhile
        return None
    n = 1 + len(list(hydra.glob("config.resumed-*.yaml")))
    for name, text in this_launch.items():
        stem, suffix = name.rsplit(".", 1)
        _write_atomic(hydra / f"{stem}.resumed-{n}.{suffix}", text)
    restore_hydra_files(run_dir)
    return n


def hydra_launch_files(cfg, run_dir: Path) -> dict[str, str] | None:
    """What Hydra wrote into ``.hydra`` for this launch; None outside a Hydra job. The config and the overrides are
    rebuilt from memory as Hydra writes them (another process's Hydra may have rewritten the files meanwhile);
    ``hydra.yaml`` is read back."""
    from omegaconf import OmegaConf

    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
    except ValueError:
        return None
    files = {"config.yaml": OmegaConf.to_yaml(cfg), "overrides.yaml": OmegaConf.to_yaml(hydra.overrides.task)}
    written = Path(run_dir) / ".hydra" / "hydra.yaml"
    if written.is_file():
        files["hydra.yaml"] = written.read_text()
    return files


# ------------------------------------------------------------------------------------------------- config changes


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf} of a nested dict (lists are leaves)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def covered(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


MISSING = "<absent>"


def changed_settings(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old, new) of every leaf that differs between two resolved configs."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(set(a) | set(b))
            if a.get(k, MISSING) != b.get(k, MISSING)]


def harmless(key: str, new: dict) -> bool:
    if covered(key, HARMLESS):
        return True
    if key in RUN_LENGTH:
        flat = flatten(new)
        return all(flat.get(f"optimizer.{part}_scheduler.name") in CONSTANT_SCHEDULES for part in ("actor", "critic"))
    return False


def check_changes(old: dict, new: dict, allowed: Iterable[str], where: str) -> list[tuple[str, Any, Any]]:
    """The changes from ``old`` to ``new`` that are allowed (harmless, or named in ``allowed``); raise
    ``ResumeRefused`` naming every other one. ``where`` names the saved config compared with."""
    allowed = list(allowed)
    changes = changed_settings(old, new)
    refused = [(k, o, n) for k, o, n in changes if not harmless(k, new) and not covered(k, allowed)]
    if refused:
        listed = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in refused)
        keys = ",".join(k for k, _, _ in refused)
        raise ResumeRefused(f"resuming would change the run ({listed}), compared with the config saved in {where}. "
                            f"Resume with the run's own settings, or, if the change is intended, say so with "
                            f"trainer.allow_changes=[{keys}] (it is then applied and recorded in {CHANGES_FILE}); "
                            f"nothing in the run folder was changed")
    return changes


def record_changes(run_dir: Path, changes: list[tuple[str, Any, Any]], checkpoint: Path | None,
                   launch: int | None) -> None:
    """One row of ``resume_changes.jsonl`` for a resume that changed settings."""
    if not changes:
        return
    row = {"time": datetime.datetime.now().isoformat(timespec="seconds"), "checkpoint": str(checkpoint),
           "hydra_config": f".hydra/config.resumed-{launch}.yaml" if launch else None,
           "changes": [{"setting": k, "old": o, "new": n} for k, o, n in changes]}
    with open(Path(run_dir) / CHANGES_FILE, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def write_resolved_config(run_dir: Path, resolved: dict) -> None:
    from omegaconf import OmegaConf

    _write_atomic(Path(run_dir) / RESOLVED_CONFIG, OmegaConf.to_yaml(OmegaConf.create(resolved)))


def read_resolved_config(run_dir: Path) -> dict | None:
    from omegaconf import OmegaConf

    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path))


# --------------------------------------------------------------------------------------- applying optimizer changes


def apply_optimizer_settings(optimizer, scheduler, opt) -> None:
    """The config's learning rate, betas, eps and weight decay in a restored optimizer and its schedule (a restored
    state carries the checkpoint's). The schedule's current factor is kept: ``lr = new base lr × factor(step)``."""
    for group in optimizer.param_groups:
        for key, value in (("betas", tuple(opt.betas)), ("eps", opt.eps), ("weight_decay", opt.weight_decay)):
            if key in group:
                group[key] = value
        group["initial_lr"] = opt.lr
    if scheduler is None:
        for group in optimizer.param_groups:
            group["lr"] = opt.lr
        return
    scheduler.base_lrs = [opt.lr for _ in optimizer.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        raise ValueError(f"cannot apply a new learning rate to a restored {type(scheduler).__name__}")
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs

