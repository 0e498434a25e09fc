"""Pinned hub revisions: what a run asked for is what it loaded.

Every preset pins the commit of each hub model and dataset it reads (``revision:`` in ``conf/``, overridable). Two
checks keep a pin honest:
- before loading, offline (``HF_HUB_OFFLINE=1``): the pinned revision must be in the local hub cache. Offline,
  ``datasets`` otherwise falls back to whichever revision it cached last, with no error;
- after loading: the commit actually loaded (a model's ``config._commit_hash`` or snapshot folder, a dataset's cache
  folder) is logged, and it must be the pinned one when the pin is a commit hash.
Local folders and files carry no revision and are not checked.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

COMMIT = re.compile(r"^[0-9a-f]{40}$")
_COMMIT_IN_PATH = re.compile(r"(?:^|[/\\])([0-9a-f]{40})(?=[/\\]|$)")


class RevisionError(ValueError):
    """A pinned revision that is not the one available or loaded."""


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes",
                                                                                                 "on")


def hub_cache_dir() -> Path:
    """The hub cache the loaders read (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _repo_folder(repo_id: str, repo_type: str) -> Path:
    return hub_cache_dir() / f"{repo_type}s--{repo_id.replace('/', '--')}"


def cached_revisions(repo_id: str, repo_type: str = "model") -> dict[str, str] | None:
    """``{name or commit: commit}`` of the snapshots of ``repo_id`` in the local hub cache (refs such as ``main``
    map to their commit); None when the repository is not cached at all."""
    folder = _repo_folder(repo_id, repo_type)
    if not folder.is_dir():
        return None
    revisions = {p.name: p.name for p in (folder / "snapshots").glob("*") if p.is_dir()}
    refs = folder / "refs"
    for ref in refs.rglob("*") if refs.is_dir() else []:
        if ref.is_file():
            revisions[ref.relative_to(refs).as_posix()] = ref.read_text().strip()
    return revisions


def is_hub_id(path: str | os.PathLike | None) -> bool:
    """A hub id (``org/name``), not a local path."""
    text = str(path or "")
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def check_offline_cache(repo_id: str, revision: str | None, repo_type: str = "model") -> None:
    """Offline, refuse a pinned revision that the local cache does not hold, naming both."""
    if not (_offline() and revision and is_hub_id(repo_id)):
        return
    cached = cached_revisions(repo_id, repo_type)
    if cached is None:
        return  # not cached at all: the loader's own error says so
    commit = cached.get(revision)  # a full commit hash or a ref (branch, tag) the cache recorded
    if commit is None or not (_repo_folder(repo_id, repo_type) / "snapshots" / commit).is_dir():
        held = sorted({c for c in cached.values()})
        raise RevisionError(f"{repo_type} {repo_id}: the pinned revision {revision} is not in the offline hub cache "
                            f"({hub_cache_dir()}), which holds {', '.join(held) or 'no snapshot'}; download the pinned "
                            f"revision or set the revision to the cached one")


def commit_in_path(path: str | os.PathLike | None) -> str | None:
    """The commit hash a cache path was resolved to (``…/snapshots/<hash>/…``, ``…/0.0.0/<hash>/…``)."""
    found = _COMMIT_IN_PATH.findall(str(path)) if path else []
    return found[-1] if found else None


def check_loaded(what: str, repo_id: str, pinned: str | None, loaded: str | None) -> None:
    """Log the commit that was loaded; refuse it when the pin is a commit hash and it differs."""
    if not is_hub_id(repo_id):
        return
    log.info("%s %s: pinned revision %s, loaded commit %s", what, repo_id, pinned, loaded or "unknown")
    if pinned and COMMIT.match(pinned) and loaded and COMMIT.match(loaded) and loaded != pinned:
        raise RevisionError(f"{what} {repo_id}: the pinned revision {pinned} was asked for but {loaded} was loaded "
                            f"(an offline cache of another revision?); fetch the pinned one or change the pin")


def dataset_commit(ds) -> str | None:
    """The commit a loaded ``datasets.Dataset`` was built from, read from its cache folder."""
    for entry in getattr(ds, "cache_files", None) or []:
        commit = commit_in_path(entry.get("filename"))
        if commit:
            return commit
    return None


def check_package_pin(what: str, pin: str | None) -> None:
    """A file shipped inside a Python package is pinned by the package's version, written ``distribution==version``
    (``model.revision`` of ``model=smollm2_135m``): the installed distribution must be that version. Any other pin is
    only recorded."""
    if not pin or "==" not in pin:
        return
    from importlib.metadata import PackageNotFoundError, version

    distribution, pinned = (part.strip() for part in pin.split("==", 1))
    try:
        installed = version(distribution)
    except PackageNotFoundError:
        raise RevisionError(f"{what}: the pinned package {pin} is not installed; install it with "
                            f"`pip install --no-deps {pin}` (make install does)") from None
    log.info("%s: pinned package %s, installed %s", what, pin, installed)
    if installed != pinned:
        raise RevisionError(f"{what}: the pinned revision {pin} was asked for but {distribution} {installed} is "
                            f"installed; install the pinned one (`pip install --no-deps {pin}`) or change the pin")
