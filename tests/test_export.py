"""Reference results: ``python -m repo_exp.export`` keeps a finished sweep small (per-prompt rows without response
texts, the training curves, the settings and summaries), ``python -m repo_exp.report`` draws every figure again from
that copy alone, and ``--against`` says whether a fresh run reproduces a reference within its seeds' spread."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from repo_exp.export import CURVE_KEYS, export
from repo_exp.report import against_reference, build_report, read_runs

from conftest import repo_root
from test_report import make_run, sweep  # noqa: F401  (a fixture)

ROOT = repo_root()
FIGURES = {"interference", "interference_oracle", "tradeoff", "training", "exploitation"}


def with_texts_and_extra_metrics(root: Path) -> None:
    """What a real run folder also holds and a reference leaves behind: response texts, every step metric, a
    checkpoint."""
    for rows in root.glob("**/per_prompt.jsonl"):
        lines = [json.loads(line) for line in rows.read_text().splitlines()]
        rows.write_text("".join(json.dumps({**r, "responses": ["sure ! a long answer", "no"]}) + "\n" for r in lines))
    for metrics in root.glob("**/metrics.jsonl"):
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        metrics.write_text("".join(json.dumps({**r, "timing/step": 1.5, "loss/actor": 0.1}) + "\n" for r in lines))
    for run in {p.parent.parent for p in root.glob("**/eval/summary.json")}:
        (run / "checkpoints" / "step_000003").mkdir(parents=True)
        (run / "checkpoints" / "step_000003" / "model.safetensors").write_bytes(b"x" * 1000)


def unpack(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def test_the_compact_reference_draws_every_figure_again(sweep, tmp_path):  # noqa: F811
    root, _ = sweep
    with_texts_and_extra_metrics(root)
    full = build_report([root], tmp_path / "full")
    assert set(full["figures"]) >= FIGURES
    reference = tmp_path / "results" / "sweep"
    export(root, reference)
    run = reference / "runs" / "0_job"
    kept = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert kept == [".hydra/config.yaml", ".hydra/overrides.yaml", "eval/initial/per_prompt.jsonl.gz",
                    "eval/per_prompt.jsonl.gz", "eval/summary.json", "metrics.jsonl.gz"]
    rows = unpack(run / "eval" / "per_prompt.jsonl.gz")
    assert rows and all("responses" not in r and "mean_cost" in r and "oracle" in r for r in rows)
    steps = unpack(run / "metrics.jsonl.gz")
    assert [s["step"] for s in steps] == [1, 2] and all(set(s) <= set(CURVE_KEYS) for s in steps)
    # the export wrote the report, and the report command draws it again from the copy alone
    again = build_report([reference], reference)
    assert set(again["figures"]) == set(full["figures"]) and again["figures_skipped"] == {}  # every figure, again
    for name in again["figures"]:
        assert (reference / f"{name}.png").stat().st_size > 8_000
    assert again["average"] == full["average"] and again["groups"].keys() == full["groups"].keys()
    assert sorted(r["path"] for r in again["runs"]) == sorted(f"runs/{n}_job" for n in range(8))
    # the same runs give the same bytes: a reference exported again shows no change in git
    export(root, tmp_path / "again")
    for path in run.rglob("*.gz"):
        assert path.read_bytes() == (tmp_path / "again" / path.relative_to(reference)).read_bytes()


def test_export_keeps_the_sweeps_word_on_its_world_and_refuses_a_used_or_nested_destination(sweep, tmp_path):  # noqa: F811
    root, _ = sweep
    out = tmp_path / "outputs" / "default"
    (out / "runs").parent.mkdir(parents=True)
    root.rename(out / "runs")
    first = build_report([out / "runs"], out, write=False)
    first["world"] = {"name": "default", "seed": 0, "reward/pairwise_accuracy": 0.91,
                      "reward/oracle_pairwise_accuracy": 0.9, "cost/pairwise_accuracy": 0.8,
                      "cost/oracle_pairwise_accuracy": 0.85, "cost/sign_accuracy": 0.95, "cost/oracle_sign_accuracy": 0.97}
    from repo_exp.report import write_report

    write_report(first, out)
    reference = tmp_path / "results" / "default"
    report = export(out, reference)
    assert report["world"]["reward/pairwise_accuracy"] == 0.91  # kept: the runs alone could not say it again
    text = (reference / "report.md").read_text()
    assert "## Summary (mean ± std over seeds [1, 2])" in text and "held-out pairwise accuracy 0.910" in text
    # drawn again elsewhere (report REFERENCE --out FOLDER), the report keeps what the reference's own report said
    elsewhere = build_report([reference], tmp_path / "elsewhere")
    assert elsewhere["world"] == report["world"] and elsewhere["title"] == report["title"]
    assert (tmp_path / "elsewhere" / "report.md").read_text().count("## Summary (mean ± std") == 1
    with pytest.raises(FileExistsError, match="already holds runs"):
        export(out, reference)
    with pytest.raises(ValueError, match="into a folder of its own"):
        export(out, out / "reference")


def test_against_says_whether_runs_reproduce_the_reference_within_their_seeds_spread(tmp_path):
    def runs(folder: Path, violation: tuple[float, float], reward: tuple[float, float]) -> list:
        for seed, (v, r) in enumerate(zip(violation, reward)):
            make_run(folder / f"rectified-seed{seed}", "rectified", 0.0, seed,
                     {"oracle/prompt_violation_rate": v, "oracle/safe_reward_mean": r})
        return read_runs([folder])[0]

    reference = runs(tmp_path / "ref", (0.0, 0.0), (0.55, 0.57))
    same = against_reference(runs(tmp_path / "same", (0.0, 0.01), (0.56, 0.58)), reference)
    assert [r["figure"] for r in same] == ["oracle/prompt_violation_rate", "oracle/safe_reward_mean"]
    assert all(r["reproduced"] for r in same)
    # 0.005 apart with a spread of 0.007 (rates): within; 0.3 apart: not
    off = against_reference(runs(tmp_path / "off", (0.3, 0.3), (0.56, 0.58)), reference)
    assert [r["reproduced"] for r in off] == [False, True]
    assert off[0]["allowed"] == pytest.approx(0.01)  # no spread on either side: the floor
    proc = subprocess.run([sys.executable, "-m", "repo_exp.report", str(tmp_path / "off"), "--against",
                           str(tmp_path / "ref")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "NOT REPRODUCED: 1 of 2 figures differ" in proc.stdout and "rectified prompts violating" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "repo_exp.report", str(tmp_path / "same"), "--against",
                           str(tmp_path / "ref")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "REPRODUCED: all 2 figures" in proc.stdout and "other settings" not in proc.stdout
    # runs made with another setting than the reference's are compared, and the note says which setting
    for config in (tmp_path / "same").glob("*/.hydra/config.yaml"):
        config.write_text(config.read_text() + "trainer:\n  total_steps: 2\n")
    proc = subprocess.run([sys.executable, "-m", "repo_exp.report", str(tmp_path / "same"), "--against",
                           str(tmp_path / "ref")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "other settings than" in proc.stdout and "rectified: trainer.total_steps: '<absent>' → 2" in proc.stdout
