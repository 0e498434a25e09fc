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

What the run touches: it writes and deletes only inside its own folder (and the project's cache), follows no link
out of it, and never rewrites or deletes a file it did not create. So, before anything is written
(``check_run_folder``, from ``claim`` and, under Hydra, before Hydra writes its own files: ``repo_exp.callbacks``),
a folder is refused, naming the path, when
- one of the names the run writes (``RUN_ENTRIES``: ``checkpoints/``, ``eval/``, ``.owner.lock``, ``metrics.jsonl``,
  ``.hydra/``, Hydra's log file …), or anything inside the folders it fills, is a symbolic link that leads out of the
  folder (checkpoints rotated at a link's target would delete the files there);
- the folder exists, holds something, and is not this project's: no file the run writes first (``RUN_MARKERS``) and
  no ``.hydra/`` of this application. A folder of notes, a data file, one's own ``eval/summary.json`` or another
  Hydra application's ``.hydra/config.yaml`` would otherwise be written among, or overwritten.

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


# the names the run writes directly in its folder (besides Hydra's ``<job name>.log`` and its own temporary files)
RUN_ENTRIES = frozenset({".hydra", LOCK_FILE, OWNER_FILE, RESOLVED_CONFIG, "run_config.yaml", CHANGES_FILE,
                         "metrics.jsonl", "metrics.orphaned.jsonl", "checkpoints", "eval", "wandb", "wandb_id.txt"})
# the folders whose whole content the run writes (and, for checkpoints, rotates)
RUN_TREES = ("checkpoints", "eval", ".hydra", "wandb")
# files only this project writes into a folder: present, the folder is a run (or an evaluation) of this project
RUN_MARKERS = (OWNER_FILE, RESOLVED_CONFIG, "run_config.yaml")
# top-level keys of this application's config (a `.hydra/config.yaml` with them is this application's)
APP_CONFIG_KEYS = frozenset({"trainer", "constraint", "ppo", "world"})
APP_CONFIG_SOURCE = "repo_exp.conf"


class RunFolderBusy(ValueError):
    """Another live process owns the run folder."""


class RunFolderRefused(ConfigError):
    """The run folder holds what the run may not touch: data that is not a run's, or a link out of the folder (a
    config error: exit 2 from the command line, before anything is written)."""


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


def this_application(hydra_dir: Path) -> bool:
    """Whether ``hydra_dir`` (a ``.hydra/`` folder) records a launch of this application: its ``hydra.yaml`` names
    ``repo_exp.conf`` as the primary config source, or, where only ``config.yaml`` was kept (the committed results),
    that config has this application's top-level keys."""
    from omegaconf import OmegaConf

    try:
        if (hydra_dir / "hydra.yaml").is_file():
            sources = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.runtime.config_sources") or []
            return any(str(s.get("path")) == APP_CONFIG_SOURCE and s.get("provider") == "main" for s in sources)
        if (hydra_dir / "config.yaml").is_file():
            config = OmegaConf.load(hydra_dir / "config.yaml")
            return APP_CONFIG_KEYS <= set(config.keys())
    except Exception:  # unreadable: not a record this application wrote
        return False
    return False


def leads_out(path: Path, root: Path) -> bool:
    """Whether the link ``path`` leads out of ``root`` (or nowhere)."""
    try:
        return not path.resolve(strict=True).is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # dangling, or a loop
        return True


def links_out(run_dir: Path) -> list[Path]:
    """The symbolic links among the entries the run writes in ``run_dir`` (``RUN_ENTRIES``, Hydra's log file) and
    anywhere inside the folders it fills (``RUN_TREES``) that lead out of ``run_dir`` (never followed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in sorted(run_dir.iterdir()):
        written = entry.name in RUN_ENTRIES or entry.suffix == ".log"
        if written and entry.is_symlink() and leads_out(entry, run_dir):
            found.append(entry)
    for tree in RUN_TREES:
        top = run_dir / tree
        if top.is_symlink() or not top.is_dir():
            continue
        for folder, dirs, files in os.walk(top):  # does not descend into linked folders
            for name in sorted(dirs + files):
                path = Path(folder) / name
                if path.is_symlink() and leads_out(path, run_dir):
                    found.append(path)
    return found


def foreign_content(run_dir: Path, launching: bool = False) -> str | None:
    """Why ``run_dir`` is not a folder of this project, or None: it does not exist, is empty, or holds a file only
    this project writes (``RUN_MARKERS``) or a ``.hydra/`` of this application. Log files (``*.log``, where a
    launcher logs a job, and Hydra appends its own) are not judged. ``launching``: another process of this launch
    (rank 0 of a distributed job) may be writing Hydra's files there meanwhile; ``.hydra/`` is not judged either."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"{run_dir} is a file, not a folder"
    entries = sorted(p.name for p in run_dir.iterdir()
                     if not ((p.suffix == ".log" and p.is_file()) or (launching and p.name == ".hydra")))
    if not entries or any((run_dir / marker).is_file() for marker in RUN_MARKERS):
        return None
    hydra = run_dir / ".hydra"
    if hydra.is_dir() and not hydra.is_symlink() and this_application(hydra):
        return None
    if hydra.is_dir() and (hydra / "config.yaml").exists() and not launching:
        return (f"{hydra / 'config.yaml'} is another application's record (Hydra would replace it with this run's)"
                f"; the folder {run_dir} is not a run of this project")
    if (run_dir / "eval" / "summary.json").exists():
        return (f"{run_dir / 'eval' / 'summary.json'} is not a run's (no {OWNER_FILE} or {RESOLVED_CONFIG} beside it) "
                f"and the run's final evaluation would overwrite it")
    shown = ", ".join(entries[:6]) + (", …" if len(entries) > 6 else "")
    return f"{run_dir} holds files that are not a run's ({shown}); the run would write among them"


def check_run_folder(run_dir: Path, launching: bool = False) -> None:
    """Refuse, naming the path, a run folder that is not this project's or whose entries link out of it
    (``links_out``, ``foreign_content``; ``launching`` as there): before anything is written there."""
    run_dir = Path(run_dir)
    links = links_out(run_dir)
    if links:
        shown = "; ".join(f"{p} is a symbolic link out of the run folder (to {os.readlink(p)})" for p in links[:3])
        raise RunFolderRefused(
            f"{shown}: the run writes and deletes only inside its own folder {run_dir} and follows no link out of it "
            f"(rotating checkpoints there would delete the files at the link's target). Remove the link, or put the "
            f"whole run folder on the other disk (hydra.run.dir=...); nothing was written")
    problem = foreign_content(run_dir, launching)
    if problem:
        raise RunFolderRefused(f"{problem}. A run writes only into an empty or new folder, or into a run folder of "
                               f"its own (to continue it: trainer.resume=auto); choose another folder "
                               f"(hydra.run.dir=...). Nothing was written there")


def claim(run_dir: Path) -> None:
    """Take the run folder for this process (a no-op if it holds it already), or raise ``RunFolderBusy``; refuse a
    folder the run may not write in (``check_run_folder``) before anything is written."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD:
        return
    check_run_folder(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # never through a link (check_run_folder refuses one; O_NOFOLLOW closes the gap until the open)
    handle = os.fdopen(os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644), "a+")
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


def schema_default(key: str) -> Any:
    """The default the config schema (``repo_exp.config.Config``) gives the dotted ``key``, following its typed
    fields; MISSING where the schema does not say (a key under a group whose schema depends on the option chosen, such
    as ``constraint`` or ``algorithm``, or a field without a default)."""
    import dataclasses
    import typing

    from repo_exp.config import Config

    kind: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(kind):
            return MISSING
        fields = {f.name: f for f in dataclasses.fields(kind)}
        if part not in fields:
            return MISSING
        if i == len(parts) - 1:
            f = fields[part]
            if f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                return MISSING
            return MISSING if dataclasses.is_dataclass(value) or isinstance(value, str) and value == "???" else value
        kind = typing.get_type_hints(kind).get(part)
        if typing.get_origin(kind) is typing.Union:  # Optional[X]
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), None)
    return MISSING


def changed_settings(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old, new) of every leaf that differs between two resolved configs. A key the old config lacks whose new
    value is the schema's default (``schema_default``) is not a change: the setting was added to the schema after that
    run, with a default that keeps what runs did before it (the rule every new setting follows)."""
    a, b = flatten(old), flatten(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        before, after = a.get(k, MISSING), b.get(k, MISSING)
        if before == after or (before == MISSING and after != MISSING and after == schema_default(k)):
            continue
        changes.append((k, before, after))
    return changes


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

