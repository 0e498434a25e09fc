"""Which source a result came from: the git commit of the package, recorded in every final summary
(``run/commit``) and stated under every report figure."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """The short commit of the checkout the package runs from, with ``+changes`` when tracked files differ from it;
    ``repo_exp <version>`` when the package is not a git checkout (an installed wheel)."""
    from repo_exp import __version__

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return f"repo_exp {__version__}"
    return f"{commit}+changes" if changed else commit
