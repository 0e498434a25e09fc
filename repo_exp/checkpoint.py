"""Checkpoints that survive pre-emption.

A checkpoint is a folder ``checkpoints/step_NNNNNN/`` holding the policy and critics (safetensors, in layouts that
``from_pretrained`` and ``load_score_model`` read), each engine's optimizer and scheduler state, the constraint's
multiplier and window, the data position, RNG states and the step. It is written into a temporary folder, its files'
sizes and SHA-256 recorded in ``manifest.json`` last, then renamed into place: a folder without a valid manifest is
incomplete or corrupt, and resuming skips it with a warning in favour of the previous one. The last ``keep_last``
are kept.

Every rank writes its own RNG states (``rng.pt`` for rank 0, ``rng_rank<r>.pt`` for the others): each rank samples
from its own stream, so restoring rank 0's on every rank would change a resumed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from repo_exp.config import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, most often)."""


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def file_records(folder: Path, skip: tuple[str, ...] = (), hash_files: bool = True) -> dict[str, dict]:
    """{path relative to ``folder``: {size, sha256}} of every file under it but those named in ``skip``."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in skip:
            files[str(path.relative_to(folder))] = {"size": path.stat().st_size,
                                                    "sha256": sha256_of(path) if hash_files else None}
    return files


def records_problem(folder: Path, files: dict[str, dict]) -> str | None:
    """None when the files under ``folder`` have the sizes and hashes ``files`` (``file_records``) recorded, else
    the first that does not, named by its path."""
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{path} has {path.stat().st_size} bytes, {meta['size']} were written"
        if meta.get("sha256") and sha256_of(path) != meta["sha256"]:
            return f"{path} does not match its recorded SHA-256"
    return None


def write_manifest(folder: Path, step: int, hash_files: bool = True) -> None:
    files = file_records(folder, skip=(MANIFEST,), hash_files=hash_files)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None when ``folder`` is a complete checkpoint, else what is wrong with it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    problem = records_problem(folder, files)
    return problem.replace(f"{folder}/", "", 1) if problem else None


class CheckpointNotFound(FileNotFoundError, ConfigError):
    """A checkpoint folder that does not exist: a ``FileNotFoundError`` the entry point reports as a config error (one
    line naming the setting, exit status 2)."""


def check_checkpoint(folder: str | os.PathLike, option: str) -> Path:
    """``folder`` as a complete training checkpoint, or a ``ValueError`` that says what it is instead.

    ``option`` names the setting that pointed at it (``trainer.resume``, ``trainer.init_from``) for the message.
    """
    path = Path(folder)
    where = f"{option}={folder}"
    if not path.exists():
        raise CheckpointNotFound(f"{where}: no such folder")
    if not path.is_dir():
        raise ValueError(f"{where} is a file; a checkpoint is a folder checkpoints/step_NNNNNN of a run")
    if (path / "checkpoints").is_dir() and not (path / MANIFEST).exists():
        hint = f", or run in it (hydra.run.dir={folder}) with trainer.resume=auto" if option == "trainer.resume" else ""
        raise ValueError(f"{where} is a run folder, not a checkpoint: give one of its checkpoints/step_NNNNNN "
                         f"folders{hint}")
    if not (path / MANIFEST).is_file() and (path / "config.json").is_file():
        try:
            architectures = json.loads((path / "config.json").read_text()).get("architectures")
        except ValueError:
            architectures = None
        kind = "a score model" if any(str(a).endswith("ForScore") for a in architectures or []) else "a model"
        raise ValueError(f"{where} is {kind} folder (config.json architectures {architectures}), not a training "
                         f"checkpoint of repo_exp (checkpoints/step_NNNNNN with manifest.json and state.json); "
                         f"a model to start from goes in model.path, reward.path or cost.path")
    problem = verify(path)
    if problem:
        raise ValueError(f"{where} is not a complete checkpoint: {problem}")
    if not (path / "state.json").is_file():
        raise ValueError(f"{where} has a manifest but no state.json: it is not a training checkpoint of repo_exp")
    return path


def rng_file(folder: Path, rank: int) -> Path:
    return folder / ("rng.pt" if rank == 0 else f"rng_rank{rank}.pt")


def save_rng_states(folder: Path, rank: int) -> None:
    """This rank's Python, NumPy, torch CPU and CUDA generator states, as plain tensors and numbers (so that they load
    with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, rng_file(folder, rank))


def load_rng_states(folder: Path, rank: int) -> bool:
    """Restore what ``save_rng_states`` wrote for ``rank``; False (states untouched) when the checkpoint has none for
    it (it was written by fewer ranks)."""
    from repo_exp.models.weights import load_bin

    path = rng_file(folder, rank)
    if not path.is_file():
        return False
    state: dict[str, Any] = load_bin(path)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def step_of(folder: Path) -> int:
    m = STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else -1


REJECTED = "rejected"  # under the checkpoints folder: checkpoints a resume skipped as corrupt or incomplete


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 2, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None, hash_files: bool = True) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier
        self.hash_files = hash_files
        self.rejected: list[Path] = []  # checkpoints a resume found corrupt or incomplete

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write a checkpoint through ``write(tmp_folder)`` (every rank), then publish it atomically (rank 0)."""
        final = self.folder(step)
        tmp = self.root / f".tmp_step_{step:06d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        try:
            write(tmp)
            self.barrier()
            if self.is_main:
                _fsync_tree(tmp)
                write_manifest(tmp, step, self.hash_files)
        except (OSError, RuntimeError) as exc:  # a full disk: torch.save says only "unexpected pos"
            raise self._failed(final, tmp, exc) from exc
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        self.barrier()
        return final

    def _failed(self, final: Path, tmp: Path, exc: BaseException) -> CheckpointWriteError:
        """The error of a checkpoint that could not be written, after removing its partial folder (as large as a
        checkpoint: left behind, it would keep a full disk full and fail the resume too)."""
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(self.root).free / 2**20:.0f} MiB free on that disk"
        except OSError:
            free = "free space unknown"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return CheckpointWriteError(
            f"could not write the checkpoint {final} ({type(exc).__name__}: {reason}; {free}); its partial folder "
            f"{tmp} was removed and the earlier checkpoints are untouched. Free disk space, then continue with "
            f"trainer.resume=auto")

    def checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=step_of)

    def latest_complete(self) -> Path | None:
        """The newest checkpoint whose manifest verifies; corrupt or incomplete ones are skipped with a warning."""
        for folder in reversed(self.checkpoints()):
            problem = verify(folder)
            if problem is None:
                return folder
            log.warning("skipping checkpoint %s: %s", folder, problem)
            self.rejected.append(folder)
        return None

    def _prune(self) -> None:
        # a checkpoint the resume skipped never counts among the last keep_last: moved aside (kept, for a look),
        # so that rotation cannot delete the good one resumed from and keep the bad one
        for bad in self.rejected:
            if bad.is_dir():
                aside = self.root / REJECTED / bad.name
                shutil.rmtree(aside, ignore_errors=True)
                aside.parent.mkdir(exist_ok=True)
                os.replace(bad, aside)
                log.warning("moved the skipped checkpoint %s to %s", bad, aside)
        self.rejected = []
        for old in self.checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        # temporary folders left by a process killed while writing: never complete, and as large as a checkpoint
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
