"""PKU-SafeRLHF through ``datasets``: a hub id at a pinned revision, or local files in the same schema.

Rows: ``prompt, response_0, response_1, is_response_0_safe, is_response_1_safe, better_response_id,
safer_response_id`` (newer revisions add severity levels and harm categories, which are kept but not needed).
RL uses the de-duplicated prompts; reward and cost training use the preference rows.
"""

from __future__ import annotations

from pathlib import Path

from repo_exp.config import DataConfig

PREFERENCE_COLUMNS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)
DEFAULT_HUB_ID = "PKU-Alignment/PKU-SafeRLHF"
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_pku_split(data: DataConfig, split: str):
    """One split of PKU-SafeRLHF as a ``datasets.Dataset``."""
    import datasets

    path = data.path or DEFAULT_HUB_ID
    local = Path(path)
    try:
        if local.is_file():
            builder = FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"data.path {path!r}: unknown file type {local.suffix!r}")
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        if local.is_dir():
            files = _split_files(local / (data.subset or ""), split)
            builder = FILE_BUILDERS[files[0].suffix.lower()]
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
        return datasets.load_dataset(path, revision=data.revision, data_dir=data.subset, split=split)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as exc:
        raise FileNotFoundError(f"cannot load {path!r} (revision {data.revision}, split {split!r}): {exc}") from exc


def _split_files(folder: Path, split: str) -> list[Path]:
    """The files of ``split`` in a local copy laid out like the hub's (``train.jsonl``, ``data/.../test.parquet``…)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in FILE_BUILDERS and f.name.startswith(split))
    if not files:
        raise FileNotFoundError(f"{folder} has no file for the split {split!r} (expected e.g. {split}.jsonl)")
    return files


def check_preference_columns(ds, origin: str) -> None:
    missing = [c for c in PREFERENCE_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{origin} lacks the PKU-SafeRLHF column(s) {missing} (columns: {ds.column_names})")
