"""``repo_exp.report`` on hand-made run folders: discovery, grouping, mean and std over seeds, figures, CLI."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from repo_exp.report import NoRunsError, build_report, find_run_dirs, main

from conftest import repo_root

ROOT = repo_root()


def make_run(folder: Path, constraint: str, threshold: float, seed: int, figures: dict[str, float],
             prompt_costs: tuple[list[float], list[float]] = ([0.2, -0.4, 0.6], [0.1, -0.6, 0.9]),
             lambdas: tuple[float, ...] = (1.0, 1.2, 1.5), overrides: list[str] | None = None) -> Path:
    """A run folder as ``python -m repo_exp`` leaves it, with chosen figures and per-prompt costs."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nconstraint:\n  name: {constraint}\n  threshold: {threshold}\n")
    if overrides is None:
        overrides = [f"constraint={constraint}", f"constraint.threshold={threshold}", f"seed={seed}",
                     "experiment=smoke"]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (folder / "eval" / "initial").mkdir(parents=True)
    summary = {"eval/threshold": threshold, "eval/step": 3, "timing/eval": 0.1, **figures}
    (folder / "eval" / "summary.json").write_text(json.dumps(summary))
    before, after = prompt_costs
    for sub, costs in ((folder / "eval" / "initial", before), (folder / "eval", after)):
        with open(sub / "per_prompt.jsonl", "w") as f:
            for i, c in enumerate(costs):
                f.write(json.dumps({"prompt_id": i, "prompt": f"p{i}", "mean_cost": c, "mean_reward": 1.0, "k": 2,
                                    "oracle": {"mean_cost": -1.0 if c < 0 else 1.0}}) + "\n")
    with open(folder / "metrics.jsonl", "w") as f:
        for step, lam in enumerate(lambdas, start=1):
            f.write(json.dumps({"step": step, "reward/mean": 0.1 * step, "cost/mean": -0.1 * step,
                                "cost/unsafe_rate": 0.5 / step, "constraint/lambda": lam}) + "\n")
        f.write(json.dumps({"step": 3, **summary}) + "\n")  # evaluation rows share the file
    return folder


@pytest.fixture
def sweep(tmp_path):
    """Two constraint types × two thresholds × two seeds, as a multirun folder."""
    root = tmp_path / "multirun"
    values = {}
    n = 0
    for constraint in ("rectified", "average"):
        for threshold in (0.0, -0.5):
            for seed in (1, 2):
                pvr = {"average": 0.5, "rectified": 0.1}[constraint] + 0.1 * seed - threshold
                reward = 1.0 + seed + threshold
                figures = {"eval/prompt_violation_rate": pvr, "eval/reward_mean": reward,
                           "oracle/prompt_violation_rate": pvr / 2, "oracle/reward_mean": reward / 2,
                           "eval/interference_rate": 0.25, "oracle/interference_rate": 0.0,
                           "exploit/cost_false_safe_rate": 0.1 * seed,
                           "exploit/cost_false_safe_rate/harmful": 0.2 * seed,
                           "exploit/cost_false_safe_rate/benign": 0.0}
                values[(constraint, threshold, seed)] = figures
                make_run(root / f"{n}_job", constraint, threshold, seed, figures, lambdas=(1.0, 1.0 + seed))
                n += 1
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root, values


def test_groups_means_and_stds_over_seeds(sweep, tmp_path):
    root, values = sweep
    report = build_report([root], tmp_path / "out", title="t")
    assert len(report["runs"]) == 8 and report["skipped"] == []
    assert all(Path(r["path"]).is_absolute() for r in report["runs"])  # runs outside the report folder
    moved = shutil.copytree(root, tmp_path / "moved")  # a report written beside its runs names them relatively
    inside = build_report([moved], moved, title="t")
    assert sorted(r["path"] for r in inside["runs"]) == sorted(f"{n}_job" for n in range(8))
    # report[constraint] pools that constraint's runs: 2 thresholds × 2 seeds
    pooled = [values[("average", d, s)]["eval/prompt_violation_rate"] for d in (0.0, -0.5) for s in (1, 2)]
    stats = report["average"]["eval/prompt_violation_rate"]
    assert stats["mean"] == pytest.approx(statistics.fmean(pooled))
    assert stats["std"] == pytest.approx(statistics.stdev(pooled)) and stats["n"] == 4
    # groups split by the swept threshold (the seed is a replicate, experiment=smoke does not vary)
    assert set(report["groups"]) == {f"{c} constraint.threshold={d}" for c in ("average", "rectified")
                                     for d in ("0.0", "-0.5")}
    group = report["groups"]["rectified constraint.threshold=-0.5"]
    # rectified, d = −0.5: violation rates 0.1 + 0.1·s + 0.5 for s = 1, 2 → 0.7 and 0.8
    assert group["figures"]["eval/prompt_violation_rate"]["mean"] == pytest.approx(0.75)
    assert group["figures"]["eval/prompt_violation_rate"]["std"] == pytest.approx(statistics.stdev([0.7, 0.8]))
    assert group["figures"]["oracle/reward_mean"]["mean"] == pytest.approx((1.5 / 2 + 2.5 / 2) / 2)
    assert group["seeds"] == [1, 2] and group["threshold"] == -0.5
    assert "timing/eval" not in group["figures"]
    # groups come in a fixed constraint order, average before rectified
    assert list(report["groups"])[0].startswith("average")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["average"] == report["average"]


def test_writes_the_figures_and_the_table(sweep, tmp_path):
    import matplotlib.image as mpimg

    root, _ = sweep
    out = tmp_path / "out"
    report = build_report([root], out)
    # the average runs at two thresholds are a frontier: its figure and the multiplier's are drawn too (no matched
    # comparison: these hand-made rows carry no oracle samples to bootstrap)
    assert set(report["figures"]) == {"interference", "interference_oracle", "tradeoff", "training",
                                      "exploitation", "frontier", "frontier_lambda"}
    assert report["matched"] == []
    for file in report["figures"].values():
        path = out / file
        assert path.stat().st_size > 8_000, file
        pixels = mpimg.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0.05, file
    md = (out / "report.md").read_text()
    assert "| average constraint.threshold=-0.5 | 2 |" in md
    assert "![interference](interference.png)" in md and "eval/prompt_violation_rate" in md
    # exploitation: a table of its own and its mean over seeds (0.2·1, 0.2·2) in report.json
    assert "`exploit/cost_false_safe_rate`" in md and "![exploitation](exploitation.png)" in md
    group = report["groups"]["average constraint.threshold=-0.5"]["figures"]
    assert group["exploit/cost_false_safe_rate/harmful"]["mean"] == pytest.approx(0.3)


def test_single_seed_has_zero_std_and_runs_are_found_at_any_depth(tmp_path):
    make_run(tmp_path / "a" / "b" / "run", "average", 0.0, 0, {"eval/mean_cost": -0.25})
    report = build_report([tmp_path / "a"], tmp_path / "out")
    assert report["average"]["eval/mean_cost"] == {"mean": -0.25, "std": 0.0, "n": 1}
    assert list(report["groups"]) == ["average"]  # nothing varies: the constraint alone names the group


def test_unfinished_runs_are_skipped_and_no_runs_fail_clearly(tmp_path):
    make_run(tmp_path / "sweep" / "0", "rectified", 0.0, 0, {"eval/mean_cost": 0.5})
    broken = tmp_path / "sweep" / "1"
    (broken / ".hydra").mkdir(parents=True)
    (broken / ".hydra" / "config.yaml").write_text("constraint: {name: average}\n")
    report = build_report([tmp_path / "sweep"], tmp_path / "out")
    assert report["skipped"] == [str(broken.resolve())] and "average" not in report
    with pytest.raises(NoRunsError, match="no run folders"):
        find_run_dirs([tmp_path / "out"])
    with pytest.raises(NoRunsError, match="eval/summary.json"):
        build_report([broken], tmp_path / "out2")


def test_cli(sweep, tmp_path):
    root, _ = sweep
    proc = subprocess.run([sys.executable, "-m", "repo_exp.report", str(root), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "training.png").is_file()
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert err.value.code == 2


def test_an_evaluation_job_inside_a_run_folder_is_not_another_run(tmp_path):
    run = make_run(tmp_path / "sweep" / "0", "average", 0.0, 0, {"eval/mean_cost": 0.1})
    make_run(run / "evaluation", "average", 0.0, 0, {"eval/mean_cost": 0.9})
    make_run(tmp_path / "sweep" / "1", "average", 0.0, 1, {"eval/mean_cost": 0.3})
    assert find_run_dirs([tmp_path / "sweep"]) == [run.resolve(), (tmp_path / "sweep" / "1").resolve()]


# -------------------------------------------------------------------------------------------- what figures show


def test_a_zero_bar_is_drawn_and_a_missing_one_is_marked():
    """A rate of 0 must read as 0, not as a bar that is missing: a line at 0 and a "0" above it; NaN says n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    from repo_exp.report import draw_bars

    fig, ax = plt.subplots()
    draw_bars(ax, [0.0, 1.0, 2.0], [0.0, 0.25, float("nan")], [0.0, 0.1, 0.0], 0.4, "#0072B2", "rectified")
    fig.canvas.draw()
    def flat_at_zero(seg) -> bool:  # a horizontal segment at y = 0 (error bars are vertical)
        return len(seg) == 2 and seg[0][1] == seg[1][1] == 0.0 and seg[0][0] != seg[1][0]

    marks = [c for c in ax.collections if isinstance(c, LineCollection) and any(map(flat_at_zero, c.get_segments()))]
    zero_lines = [seg for c in marks for seg in c.get_segments() if flat_at_zero(seg)]
    assert [(round(a[0], 3), round(b[0], 3)) for a, b in zero_lines] == [(-0.2, 0.2)]  # the zero bar, only it
    assert all(c.get_linewidth()[0] >= 2.5 for c in marks)  # thick enough to see beside the axis
    texts = {(t.get_text(), round(t.xy[0], 3)) for t in ax.texts}
    assert texts == {("0", 0.0), ("n/a", 2.0)}
    plt.close(fig)


def test_rate_error_bars_stay_inside_zero_and_one():
    from repo_exp.report import rate_error

    lower, upper = rate_error([0.02, 0.5, 0.99, 0.0], [0.1, 0.1, 0.1, 0.0])
    assert lower == pytest.approx([0.02, 0.1, 0.1, 0.0]) and upper == pytest.approx([0.1, 0.1, 0.01, 0.0])


def test_figures_state_n_d_world_and_commit_and_come_as_svg_or_pdf(sweep, tmp_path):
    root, _ = sweep
    for config in root.glob("*/.hydra/config.yaml"):  # what a world run's config and summary hold
        config.write_text(config.read_text() + "world:\n  name: default\n  seed: 4\ndata:\n  source: world\n")
    for summary in root.glob("*/eval/summary.json"):
        figures = json.loads(summary.read_text())
        summary.write_text(json.dumps({**figures, "run/commit": "abc123def456", "eval/num_prompts": 92,
                                       "eval/samples_per_prompt": 8}))
    svg = build_report([root], tmp_path / "svg", fmt="svg")
    assert set(svg["figures"].values()) >= {f"{n}.svg" for n in ("interference", "interference_oracle", "tradeoff",
                                                                 "training", "exploitation")}
    assert all(file.endswith(".svg") for file in svg["figures"].values())  # the frontier's figures too
    text = (tmp_path / "svg" / "training.svg").read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    from repo_exp.report import group_runs, provenance, read_runs

    line = provenance(group_runs(read_runs([root])[0]))
    assert line == ("n = 2 seeds per group × 92 prompts × 8 samples; d = -0.5, 0; world: default, seed 4; "
                    "commit abc123def456")
    assert "commit abc123def456" in text.replace("\n", " ") or "abc123def456" in text  # the line is in the figure
    pdf = build_report([root], tmp_path / "pdf", fmt="pdf")
    assert (tmp_path / "pdf" / pdf["figures"]["exploitation"]).read_bytes()[:4] == b"%PDF"
    with pytest.raises(SystemExit):
        main([str(root), "--format", "gif"])


def test_the_report_names_each_figure_it_could_not_draw_and_why(tmp_path):
    for seed in (0, 1):  # one setting per constraint, no per-prompt rows, no step metrics
        for constraint in ("average", "rectified"):
            run = make_run(tmp_path / "runs" / f"{constraint}-seed{seed}", constraint, 0.0, seed,
                           {"eval/prompt_violation_rate": 0.1, "eval/reward_mean": 1.0},
                           overrides=[f"constraint={constraint}", f"seed={seed}"])
            for leftover in (run / "eval" / "per_prompt.jsonl", run / "eval" / "initial" / "per_prompt.jsonl",
                             run / "metrics.jsonl"):
                leftover.unlink()
    report = build_report([tmp_path / "runs"], tmp_path / "out")
    skipped = report["figures_skipped"]
    assert report["figures"] == {} and set(skipped) == {"interference", "interference_oracle", "tradeoff", "training",
                                                        "exploitation"}
    assert "no run has per-prompt rows" in skipped["interference"] and "repo_exp.export" in skipped["interference"]
    assert skipped["tradeoff"].startswith("no setting was swept")
    assert "no run has step metrics" in skipped["training"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Figures not drawn" in md and "- `tradeoff`: no setting was swept" in md
    proc = subprocess.run([sys.executable, "-m", "repo_exp.report", str(tmp_path / "runs"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "not drawn: training: no run has step metrics" in proc.stdout
