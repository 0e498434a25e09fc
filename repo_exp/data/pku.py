"""PKU-SafeRLHF through ``datasets``: a hub id at a pinned revision, or local files in the same schema.

Rows: ``prompt, response_0, response_1, is_response_0_safe, is_response_1_safe, better_response_id,
safer_response_id`` (newer revisions add severity levels and harm categories, which are kept but not needed).
RL uses the de-duplicated prompts; reward and cost training use the preference rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from repo_exp.config import DataConfig
from repo_exp.data.files import FILE_BUILDERS, check_preference_rows, load_local_file

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


def load_pku_split(data: DataConfig, split: str, columns: Sequence[str] = PREFERENCE_COLUMNS):
    """One split of PKU-SafeRLHF as a ``datasets.Dataset`` holding ``columns``.

    ``data.path`` is a hub id (loaded at ``data.revision``, ``data.subset`` as its ``data_dir``), one local file (it
    serves every split), or a local folder laid out like the hub's (``train.jsonl``, ``data/Alpaca-7B/test.parquet``
    …; ``data.subset`` picks a sub-folder, else every file of the split below it is used). Each local file is checked
    on its own, so a missing column is reported with the file that lacks it.
    """
    import datasets

    path = data.path or DEFAULT_HUB_ID
    local = Path(path)
    if local.exists():
        files = [local] if local.is_file() else _split_files(local / (data.subset or ""), split)
        parts = [_check_rows(_load_file(f), columns, str(f)) for f in files]
        # files of different formats type the same column differently (string / large_string): align to the first
        return datasets.concatenate_datasets([parts[0], *(p.cast(parts[0].features) for p in parts[1:])])
    from repo_exp.revisions import check_loaded, check_offline_cache, dataset_commit

    check_offline_cache(path, data.revision, "dataset")
    try:
        ds = datasets.load_dataset(path, revision=data.revision, data_dir=data.subset, split=split)
    except Exception as exc:  # offline and not cached, or no such dataset / revision / split
        raise FileNotFoundError(f"cannot load {path!r} (revision {data.revision}, split {split!r}): {exc}") from exc
    check_loaded("dataset", path, data.revision, dataset_commit(ds))
    return _check_rows(ds, columns, f"{path}@{data.revision} ({split})")


def _load_file(path: Path):
    return load_local_file(path)


def _check_rows(ds, columns: Sequence[str], origin: str):
    """``ds`` restricted to ``columns``, once they are all there and every row holds usable values."""
    ds = _check_columns(ds, columns, origin).select_columns(list(columns))
    check_preference_rows(ds, columns, origin)
    return ds


def _check_columns(ds, columns: Sequence[str], origin: str):
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{origin} lacks the PKU-SafeRLHF column(s) {missing} (its columns: {ds.column_names})")
    return ds


def _split_files(folder: Path, split: str) -> list[Path]:
    """The files of ``split`` in a local copy laid out like the hub's (``train.jsonl``, ``data/.../test.parquet``…)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist")
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in FILE_BUILDERS and f.name.startswith(split))
    if not files:
        raise FileNotFoundError(f"{folder} has no file for the split {split!r} (expected e.g. {split}.jsonl)")
    return files
