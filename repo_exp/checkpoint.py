"""Checkpoints that survive pre-emption.

A checkpoint is a folder ``checkpoints/step_NNNNNN/`` holding the policy and critics (safetensors, in layouts that
``from_pretrained`` and ``load_score_model`` read), each engine's optimizer and scheduler state, the constraint's
multiplier and window, the data position, RNG states and the step. It is written into a temporary folder, its files'
sizes and SHA-256 recorded in ``manifest.json`` last, then renamed into place: a folder without a valid manifest is
incomplete or corrupt, and resuming skips it with a warning in favour of the previous one. The last ``keep_last``
are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
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


def write_manifest(folder: Path, step: int, hash_files: bool = True) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = str(path.relative_to(folder))
            files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path) if hash_files else None}
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
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{rel} has {path.stat().st_size} bytes, {meta['size']} were written"
        if meta.get("sha256") and _sha256(path) != meta["sha256"]:
            return f"{rel} does not match its recorded SHA-256"
    return None


def step_of(folder: Path) -> int:
    m = STEP_DIR.match(folder.name)
    return int(m.group(1)) if m else -1


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 2, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None, hash_files: bool = True) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.is_main = is_main
        self.barrier = barrier
        self.hash_files = hash_files

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
        write(tmp)
        self.barrier()
        if self.is_main:
            _fsync_tree(tmp)
            write_manifest(tmp, step, self.hash_files)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        self.barrier()
        return final

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
        return None

    def _prune(self) -> None:
        complete = [p for p in self.checkpoints()]
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
