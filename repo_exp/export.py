"""Reference results: a finished sweep, kept small enough to commit, from which every figure can be drawn again.

``python -m repo_exp.export SWEEP results/NAME [--format png|svg|pdf]`` copies each run folder found under ``SWEEP``
(an ``outputs/<name>`` folder the sweep wrote, its ``runs/`` folder, or one run) into ``results/NAME/runs/…``, keeping
only what the report reads:

    .hydra/config.yaml, .hydra/overrides.yaml   the run's settings (how it is grouped, its world, its threshold)
    eval/summary.json, eval/initial/summary.json  every figure of the final and the initial evaluation
    eval/per_prompt.jsonl.gz, eval/initial/…     the per-prompt rows without the response texts (``ROW_TEXTS``)
    metrics.jsonl.gz                            the training curves: the step rows, ``CURVE_KEYS`` only

then writes the report there (``report.json``, ``report.md``, the figures) with ``repo_exp.report``, keeping what
the sweep's own report said about its world. ``python -m repo_exp.report results/NAME`` draws the same figures again
from the copy alone, and ``python -m repo_exp.report outputs/NAME --against results/NAME`` compares a fresh run with
it. Checkpoints, W&B files, logs and response texts stay behind; the source folder is only read. The gzip files are
written without a time stamp, so exporting the same runs twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger("repo_exp")

# copied as they are
KEPT_FILES = (".hydra/config.yaml", ".hydra/overrides.yaml", "eval/summary.json", "eval/initial/summary.json")
# per-prompt rows, copied without the response texts, gzipped
ROW_FILES = ("eval/per_prompt.jsonl", "eval/initial/per_prompt.jsonl")
ROW_TEXTS = ("responses",)
# the step metrics the training figures and the curves of a comparison read
CURVE_KEYS = (
    "step", "reward/mean", "cost/mean", "cost/unsafe_rate", "cost/violation_mean", "constraint/lambda",
    "constraint/threshold", "constraint/active_rate", "constraint/lambda_at_bound", "kl/mean", "response/length",
    "oracle/reward_mean", "oracle/cost_mean", "oracle/unsafe_rate", "oracle/refusal_rate",
)


def compact_row(row: dict[str, Any]) -> dict[str, Any]:
    """A per-prompt row without its response texts (every figure and score stays)."""
    return {k: v for k, v in row.items() if k not in ROW_TEXTS}


def curve_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in CURVE_KEYS if k in row}


def write_jsonl_gz(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Rows as gzipped JSON lines, without a time stamp in the gzip header (the same rows give the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        for row in rows:
            f.write((json.dumps(row) + "\n").encode())
    tmp.replace(path)


def export_run(run: Path, dest: Path) -> list[str]:
    """The compact copy of the run folder ``run`` in ``dest``; returns the files written (relative to ``dest``)."""
    from repo_exp.report import read_jsonl

    written = []
    for rel in KEPT_FILES:
        if (run / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / rel, dest / rel)
            written.append(rel)
    for rel in ROW_FILES:
        rows = read_jsonl(run / rel)  # a full run's file, or the .gz of a reference exported before
        if rows:
            write_jsonl_gz(dest / f"{rel}.gz", (compact_row(r) for r in rows))
            written.append(f"{rel}.gz")
    steps = [curve_row(r) for r in read_jsonl(run / "metrics.jsonl") if "reward/mean" in r]
    if steps:
        write_jsonl_gz(dest / "metrics.jsonl.gz", steps)
        written.append("metrics.jsonl.gz")
    return written


def _runs_root(source: Path) -> Path:
    """The folder the runs' relative paths start from: ``SOURCE/runs`` when the source is a sweep's report folder."""
    return source / "runs" if (source / "runs").is_dir() else source


def export(source: Path | str, dest: Path | str, fmt: str = "png") -> dict[str, Any]:
    """Copy every finished run under ``source`` into ``dest/runs`` (``export_run``) and write the report there;
    returns the report. ``dest`` must not be inside ``source`` (nor the reverse) and may not hold other runs."""
    from repo_exp.report import build_report, read_runs

    source, dest = Path(source), Path(dest)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if dest.resolve() == source.resolve() or source.resolve() in dest.resolve().parents \
            or dest.resolve() in source.resolve().parents:
        raise ValueError(f"export {source} into a folder of its own, not {dest}")
    runs_dest = dest / "runs"
    if runs_dest.exists() and any(runs_dest.iterdir()):
        raise FileExistsError(f"{runs_dest} already holds runs: export into an empty folder (or remove it first), so "
                              f"that the reference holds these runs and no others")
    runs, skipped, duplicates = read_runs([source])
    root = _runs_root(source).resolve()
    for run in runs:
        path = run.path.resolve()
        rel = path.relative_to(root) if path.is_relative_to(root) and path != root else Path(path.name)
        export_run(path, runs_dest / rel)
    for folder in skipped:
        log.warning("%s has no final evaluation: not exported", folder)
    # what the sweep's report said about its world, kept by the report when it names the same runs
    previous = source / "report.json" if source.name != "runs" else source.parent / "report.json"
    if previous.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(previous, dest / "report.json")
    report = build_report([runs_dest], dest, fmt=fmt)
    log.info("exported %d runs from %s to %s (%d left out as copies)", len(runs), source, dest, len(duplicates))
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repo_exp.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a finished sweep: outputs/<name>, its runs/ folder, or one run")
    parser.add_argument("dest", type=Path, help="the reference folder to write, e.g. results/<name> (empty or new)")
    parser.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="figure file format")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from repo_exp.report import NoRunsError

    try:
        report = export(args.source, args.dest, args.format)
    except (FileNotFoundError, FileExistsError, NoRunsError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"{len(report['runs'])} runs → {args.dest} ({size / 1024:.0f} KiB); figures: "
          f"{', '.join(report['figures']) or 'none'}")
    for name, why in report["figures_skipped"].items():
        print(f"not drawn: {name}: {why}")


if __name__ == "__main__":
    main()
