"""Reading local data files (prompts, preference rows, PTX pairs) and checking their rows.

Local files are read by ``datasets``' csv/json/parquet readers into memory, with their cache in a temporary folder
that is removed afterwards: reading a prompt file writes nothing outside the run (``~/.cache/huggingface/datasets``
is for hub loads). Text files must be UTF-8; every text a run trains or is scored on must be a non-empty string, and
preference labels must be 0 or 1. Each refusal names the file, the row (counted from 1, as a spreadsheet counts data
rows) and the column.
"""

from __future__ import annotations

import codecs
import math
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Sequence

FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEXT_FORMATS = ("csv", "json")


def check_utf8(path: Path, chunk: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8, naming the byte offset of the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks, decoded with this one
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                bad = offset - pending + exc.start
                raise ValueError(f"{path} is not UTF-8 text: byte offset {bad} "
                                 f"(0x{exc.object[exc.start]:02x}) cannot be decoded; save the file as UTF-8") from None
            if not block:
                return
            offset += len(block)


def load_local_file(path: Path, option: str = "data.path"):
    """A local csv/json/jsonl/parquet file as an in-memory ``datasets.Dataset``, read without touching the user's
    datasets cache. ``option`` names the setting that pointed at it, for the messages."""
    import datasets

    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{option} {str(path)!r}: unknown file type {path.suffix!r}; use one of "
                         f"{sorted(FILE_BUILDERS)}")
    if builder in TEXT_FORMATS:
        check_utf8(path)
    else:  # datasets' parquet reader fails on a file without rows with "BatchSize must be greater than 0"
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:
            raise ValueError(f"cannot read {path} as parquet: {exc}") from exc
        if rows == 0:
            raise ValueError(f"{option} {str(path)!r} holds no rows")
    with tempfile.TemporaryDirectory(prefix="repo_exp_datasets_") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                       keep_in_memory=True)
        except (ValueError, StopIteration) as exc:  # datasets' words for a file without rows
            raise ValueError(f"{option} {str(path)!r} holds no rows that the {builder} reader can read "
                             f"({exc or type(exc).__name__})") from exc
        except Exception as exc:
            raise ValueError(f"cannot read {path} as {builder}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
                from exc
    if ds.num_rows == 0:
        raise ValueError(f"{option} {str(path)!r} holds no rows")
    return ds


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


# characters that show nothing although Unicode does not count them as whitespace: format characters (category Cf:
# zero-width space and joiners, the byte-order mark, the word joiner, bidirectional marks, soft hyphen), control
# characters (Cc), and the blank letters and symbols that fonts draw empty (Hangul fillers, the braille blank)
INVISIBLE_CATEGORIES = ("Cf", "Cc")
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def invisible(char: str) -> bool:
    """Whether ``char`` shows nothing: whitespace, a format or control character, or a blank letter."""
    return char.isspace() or unicodedata.category(char) in INVISIBLE_CATEGORIES or char in BLANK_CHARACTERS


def _invisible_names(text: str) -> str:
    """The distinct characters of ``text`` as ``U+200B ZERO WIDTH SPACE, …`` (at most four)."""
    distinct = list(dict.fromkeys(text))
    named = [f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}" for c in distinct[:4]]
    return ", ".join(named) + (", …" if len(distinct) > 4 else "")


def require_texts(values: Iterable[Any], column: str, origin: str, allow_empty: bool = False) -> list[str]:
    """``values`` of ``column`` as a list of non-empty strings (strings at all with ``allow_empty``), or a refusal
    naming the row. A text made only of characters that show nothing (``invisible``) is empty: the model would be
    trained on a prompt nobody can read."""
    out = []
    for row, value in enumerate(values, start=1):
        if not isinstance(value, str):
            raise ValueError(f"{origin}: row {row}, column {column!r} is {_describe(value)}, not text; every "
                             f"{column!r} must be a non-empty string")
        if not allow_empty and not value.strip():
            raise ValueError(f"{origin}: row {row}, column {column!r} is empty or whitespace; every {column!r} must "
                             f"be a non-empty string")
        if not allow_empty and all(invisible(c) for c in value):
            raise ValueError(f"{origin}: row {row}, column {column!r} is made only of invisible characters "
                             f"({_invisible_names(value)}); every {column!r} must hold visible text")
        out.append(value)
    return out


def _label(value: Any) -> int | None:
    """0 or 1 from an integer-valued label (ints, integral floats, bools); None for anything else."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, float) and math.isfinite(value) and value in (0.0, 1.0):
        return int(value)
    return None


PREFERENCE_TEXTS = ("prompt", "response_0", "response_1")
PREFERENCE_LABELS = ("better_response_id", "safer_response_id", "is_response_0_safe", "is_response_1_safe")


def check_preference_rows(ds, columns: Sequence[str], origin: str) -> None:
    """Refuse a preference row whose texts are not non-empty strings or whose labels are not 0/1, naming the row
    and the field."""
    for column in columns:
        if column in PREFERENCE_TEXTS:  # an empty response is a response; a missing one is not
            require_texts(ds[column], column, origin, allow_empty=column != "prompt")
        elif column in PREFERENCE_LABELS:
            for row, value in enumerate(ds[column], start=1):
                if _label(value) is None:
                    raise ValueError(f"{origin}: row {row}, field {column!r} is {_describe(value)}; it must be 0 or 1"
                                     f"{' (which response is better/safer)' if column.endswith('_id') else ''}")
