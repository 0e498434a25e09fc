"""The frontier comparison (``repo_exp.frontier``): matching by hand, the paired bootstrap, a frontier report on
hand-made run folders whose figures are worked out by hand, and the frontier sweep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from repo_exp.evaluate import summarize
from repo_exp.frontier import Bootstrap, envelope, match, method_of, prompt_stats
from repo_exp.metrics import prompt_stats as row_stats

# ------------------------------------------------------------------------------------------------------ matching


def test_match_interpolates_in_violation_between_the_neighbours_of_the_level():
    # d = 0, −1, −2 (loose → tight): violation 0.4, 0.2, 0.0; helpfulness 0.6, 0.5, 0.3
    m = match(0.1, [0.4, 0.2, 0.0], [0.6, 0.5, 0.3], [0.0, -1.0, -2.0])
    assert m.figure == pytest.approx(0.4) and m.value == pytest.approx(-1.5) and m.clamped is None
    exact = match(0.2, [0.4, 0.2, 0.0], [0.6, 0.5, 0.3], [0.0, -1.0, -2.0])
    assert exact.figure == pytest.approx(0.5) and exact.value == pytest.approx(-1.0)


def test_match_takes_the_loosest_of_tied_points_and_flags_levels_outside_the_frontier():
    # two settings reach 0 violations: the looser one (more helpful) is the match
    tie = match(0.0, [0.4, 0.0, 0.0], [0.6, 0.5, 0.3], [0.0, -1.0, -2.0])
    assert tie.figure == pytest.approx(0.5) and tie.value == pytest.approx(-1.0) and tie.clamped is None
    safer = match(0.0, [0.4, 0.2, 0.1], [0.6, 0.5, 0.3], [0.0, -1.0, -2.0])  # never reaches 0
    assert safer.figure == 0.3 and safer.clamped == "tighter"
    looser = match(0.6, [0.4, 0.2, 0.1], [0.6, 0.5, 0.3], [0.0, -1.0, -2.0])  # never that unsafe
    assert looser.figure == 0.6 and looser.clamped == "looser"


def test_bootstrap_weights_reproduce_the_figure_and_resample_prompts_and_seeds():
    rows = _rows(harmful_violating=1, answerable_refusals=1)
    stats = prompt_stats(rows)
    s = summarize(rows, 0.0)
    assert stats.figure("answerable_helpfulness") == pytest.approx(s["oracle/answerable_helpfulness"])
    assert stats.figure("overrefusal_rate") == pytest.approx(s["oracle/overrefusal_rate"])
    assert stats.figure("prompt_violation_rate") == pytest.approx(s["oracle/prompt_violation_rate"])
    assert stats.figure("harmful_refusal_rate") == pytest.approx(s["oracle/harmful_refusal_rate"])
    boot = Bootstrap.draw(len(stats.prompt_ids), 3, 500, seed=0)
    assert boot.prompt_weights.sum(axis=1).tolist() == [len(stats.prompt_ids)] * 500  # n prompts per replicate
    assert boot.seed_weights(3).sum(axis=1).tolist() == [3] * 500
    replicates = stats.figure("answerable_helpfulness", boot.prompt_weights)
    assert replicates.std() > 0 and abs(replicates.mean() - s["oracle/answerable_helpfulness"]) < 0.02
    assert np.allclose(stats.figure("answerable_helpfulness", np.ones((1, len(stats.prompt_ids)))),
                       s["oracle/answerable_helpfulness"])


def test_method_names_follow_the_config():
    from omegaconf import OmegaConf

    c = OmegaConf.create
    assert method_of(c({"constraint": {"name": "average"}})) == "average"
    assert method_of(c({"constraint": {"name": "rectified", "multiplier": "learned"}})) == "rectified (learned λ)"
    assert method_of(c({"constraint": {"name": "rectified"}, "estimator": {"name": "rloo"}})) == "rectified (rloo)"
    assert method_of(c({"constraint": {"name": "none"}, "algorithm": {"name": "sacpo"}})) == "sacpo"


# ------------------------------------------------------------------------------------------ a hand-made frontier
# Ten prompts (4 benign, 2 dual-use, 4 harmful), k = 2. A harmful prompt either complies twice (reward 0.65, cost +1:
# violating) or refuses twice (0.1, −1.5); an answerable sample gives safe help (0.6, −1) or refuses (0.1, −1.5).
FAMILIES = ["benign"] * 4 + ["dual_use"] * 2 + ["harmful"] * 4


def _rows(harmful_violating: int, answerable_refusals: int) -> list[dict]:
    rows, refusals = [], answerable_refusals
    for i, family in enumerate(FAMILIES):
        if family == "harmful":
            bad = i - 6 < harmful_violating
            samples = [(0.65, 1.0, "unsafe")] * 2 if bad else [(0.1, -1.5, "refuse")] * 2
        else:
            samples = []
            for _ in range(2):
                samples.append((0.1, -1.5, "refuse") if refusals > 0 else (0.6, -1.0, "safe"))
                refusals -= 1
        rewards, costs, styles = map(list, zip(*samples))
        rows.append({"prompt_id": i, "prompt": f"p{i}", "family": family, "unseen_topic": False,
                     **row_stats(rewards, costs, 0.0), "rewards": rewards, "costs": costs, "lengths": [3, 3],
                     "oracle": {**row_stats(rewards, costs, 0.0), "rewards": rewards, "costs": costs,
                                "styles": styles}})
    return rows


def _run(folder: Path, config: str, seed: int, rows: list[dict], initial: list[dict], threshold: float = 0.0,
         lambdas=(1.0, 2.0, 1.5)) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nworld: {{name: default, seed: 0}}\n{config}")
    (folder / ".hydra" / "overrides.yaml").write_text(f"- seed={seed}\n")
    for sub, part in ((folder / "eval", rows), (folder / "eval" / "initial", initial)):
        sub.mkdir(parents=True, exist_ok=True)
        summary = summarize(part, threshold, initial)
        summary.update({"eval/threshold": threshold, "train/lambda_min": min(lambdas),
                        "train/lambda_max": max(lambdas)})
        (sub / "summary.json").write_text(json.dumps(summary))
        (sub / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward/mean": 0.1, "cost/mean": -1.0,
                                                              "constraint/lambda": lam}) + "\n"
                                                  for i, lam in enumerate(lambdas)))


# average: d = 0 → 4 harmful prompts comply (violation 0.4), no refusal (helpfulness 0.6); d = −1 → 2 comply (0.2),
# 2 answerable refusals (6.2/12); d = −2 → none (0.0), 6 refusals (4.2/12). rectified λ = 5: 1 complies (0.1),
# 1 refusal (6.7/12). At violation 0.1 the average frontier is halfway between d = −1 and −2: helpfulness
# (6.2 + 4.2)/24 = 0.4333 at d = −1.5, so rectified is 6.7/12 − 10.4/24 = 0.125 more helpful there, and refuses
# 1/12 − (2/12 + 6/12)/2 = −0.25 less.
AVERAGE = {0.0: (4, 0), -1.0: (2, 2), -2.0: (0, 6)}
RECTIFIED = (1, 1)


@pytest.fixture
def frontier_runs(tmp_path):
    root = tmp_path / "runs"
    initial = _rows(4, 0)
    for seed in (0, 1, 2):
        for d, shape in AVERAGE.items():
            _run(root / f"average-d{d}-seed{seed}", f"constraint: {{name: average, threshold: {d}, lambda_max: 5.0,"
                 f" lambda_min: 0.1}}\n", seed, _rows(*shape), initial, threshold=d)
        _run(root / f"rectified-seed{seed}", "constraint: {name: rectified, threshold: 0.0, lambda_init: 5.0}\n",
             seed, _rows(*RECTIFIED), initial)
    return root


def test_the_report_matches_rectified_with_the_average_frontier_by_hand(frontier_runs, tmp_path):
    from repo_exp.report import build_report

    report = build_report([frontier_runs], tmp_path / "out", replicates=400)
    section = report["frontier"]["default (world seed 0)"]
    points = section["methods"]["average"]["points"]
    assert [p["value"] for p in points] == [0.0, -1.0, -2.0]  # loose → tight
    assert [p["figures"]["oracle/prompt_violation_rate"]["mean"] for p in points] == pytest.approx([0.4, 0.2, 0.0])
    assert section["initial"]["oracle/prompt_violation_rate"] == pytest.approx(0.4)
    entry = next(e for e in report["matched"] if e["method"] == "rectified" and e["against"] == "average")
    assert entry["violation"] == pytest.approx(0.1)
    assert entry["matched_value"] == pytest.approx(-1.5) and entry["clamped"] is None
    assert entry["difference"] == pytest.approx(6.7 / 12 - 10.4 / 24)
    assert entry["ci_low"] <= entry["difference"] <= entry["ci_high"] and entry["ci_high"] - entry["ci_low"] > 0
    assert entry["overrefusal_rate"]["difference"] == pytest.approx(1 / 12 - (2 / 12 + 6 / 12) / 2)
    assert entry["tuning"]["average"] == {"knob": "constraint.threshold", "grid": [0.0, -1.0, -2.0], "runs": 9}
    assert set(entry["methods"]) and len(entry["methods"]) == 2
    # the average constraint's points compared with a single rectified point: no frontier of one point
    assert not any(e["against"] == "rectified" for e in report["matched"])
    for name in ("frontier", "frontier_families", "frontier_lambda", "matched"):
        assert name in report["figures"] and (tmp_path / "out" / report["figures"][name]).stat().st_size > 8000
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Matched comparison" in md and "+0.125" in md


def test_pooled_comparison_over_worlds(frontier_runs, tmp_path):
    """Two worlds with the same figures: the pooled difference is theirs, its interval as wide or narrower."""
    import shutil

    from repo_exp.report import build_report

    second = tmp_path / "runs2"
    shutil.copytree(frontier_runs, second)
    for config in second.rglob("config.yaml"):
        config.write_text(config.read_text().replace("seed: 0}", "seed: 1}"))
    report = build_report([frontier_runs, second], tmp_path / "out", replicates=400)
    per_world = [e for e in report["matched"] if e["method"] == "rectified" and e["world"] != "pooled"]
    pooled = next(e for e in report["matched"] if e["method"] == "rectified" and e["world"] == "pooled")
    assert len(per_world) == 2 and pooled["difference"] == pytest.approx(per_world[0]["difference"])
    assert pooled["ci_high"] - pooled["ci_low"] <= max(e["ci_high"] - e["ci_low"] for e in per_world) + 1e-9


# --------------------------------------------------------------------------------------------------- the sweep


def test_expand_arms_is_a_union_of_grids_with_the_command_line_winning():
    from repo_exp.sweeps import expand_arms

    arms = {"average": {"constraint": "average", "constraint.threshold": "0,-1"},
            "rectified": {"constraint": "rectified", "constraint.lambda_init": "2,5"}, "sacpo": None}
    jobs = expand_arms({"seed": "0,1,2"}, arms, ["seed=7,8", "trainer.total_steps=3"])
    assert len(jobs) == 2 * 2 + 2 * 2  # each arm × the command line's two seeds, the null arm left out
    as_sets = [set(job) for job in jobs]
    assert {"constraint=average", "constraint.threshold=-1", "seed=8", "trainer.total_steps=3"} in as_sets
    assert {"constraint=rectified", "constraint.lambda_init=5", "seed=7", "trainer.total_steps=3"} in as_sets
    assert not any("seed=0" in job for job in jobs)
    with pytest.raises(ValueError, match="no arm"):
        expand_arms({}, {"a": None}, [])


def test_the_frontier_experiment_composes_every_job(compose):
    """experiment=frontier: the average constraint along d from slack past rectified's level, rectified along λ and
    with a learned λ, the single points, every job valid, three seeds each, one world."""
    from repo_exp.config import validate
    from repo_exp.frontier import collect_points  # noqa: F401  (the report reads these names)
    from repo_exp.sweeps import expand_arms

    cfg = compose("experiment=frontier", return_hydra_config=True)
    jobs = expand_arms(cfg.hydra.sweeper.params, cfg.hydra.sweeper.arms, [])
    thresholds, lambdas, methods = set(), set(), set()
    for job in jobs:
        c = validate(compose(*job, "experiment=frontier"))
        methods.add(method_of(compose(*job, "experiment=frontier")))
        if c.constraint.name == "average" and c.estimator.name == "gae":
            thresholds.add(c.constraint.threshold)
            assert (c.constraint.lambda_max, c.constraint.lambda_min) == (5.0, 0.1)
        if c.constraint.name == "rectified" and c.constraint.multiplier == "fixed" and c.estimator.name == "gae":
            lambdas.add(c.constraint.lambda_init)
    assert {0.0, -1.0, -2.0, -3.0, -3.5} <= thresholds and {2.0, 5.0, 10.0} <= lambdas
    assert {"average", "rectified", "rectified (learned λ)", "rectified_gated", "shaping", "rectified (rloo)",
            "average (rloo)", "sacpo", "safe_dpo"} <= methods
    assert len(jobs) == 3 * len({tuple(sorted(o for o in j if not o.startswith("seed="))) for j in jobs})


def test_a_frontier_sweep_at_smoke_size_runs_each_arm_and_writes_the_matched_comparison(tmp_path):
    """``experiment=[frontier,smoke]`` with two arms of two settings and two seeds: eight jobs in folders named by
    their settings, one report with the frontier and a matched comparison whose intervals hold their estimates."""
    from test_compare import repo_exp

    sweep = tmp_path / "frontier" / "runs"
    arms = ('hydra.sweeper.arms={average: {constraint.threshold: "0,-1"}, rectified: {constraint.lambda_init: '
            '"2,5"}, rectified_learned: null, rectified_gated: null, shaping: null, average_rloo: null, '
            'rectified_rloo: null, sacpo: null, safe_dpo: null}')
    proc = repo_exp("-m", "experiment=[frontier,smoke]", "trainer.total_steps=2", "seed=0,1", "hydra/launcher=basic",
                    f"hydra.sweep.dir={sweep}", arms)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(folders) == 8 and "constraint.threshold=-1,constraint=average,seed=1,trainer.total_steps=2" in folders
    report = json.loads((sweep.parent / "report.json").read_text())
    (world, section), = report["frontier"].items()
    assert [p["value"] for p in section["methods"]["average"]["points"]] == [0.0, -1.0]
    assert [p["value"] for p in section["methods"]["rectified"]["points"]] == [2.0, 5.0]
    pairs = {(e["method"], e["value"], e["against"]) for e in report["matched"]}
    assert pairs == {("rectified", 2.0, "average"), ("rectified", 5.0, "average"), ("average", 0.0, "rectified"),
                     ("average", -1.0, "rectified")}
    for e in report["matched"]:
        assert e["ci_low"] <= e["difference"] <= e["ci_high"] and e["seeds"] == [0, 1]
    assert "## Matched comparison" in proc.stdout


@pytest.mark.parametrize("experiment, worlds", [("robustness", {1, 2, 3}), ("heldout", {4})])
def test_the_robustness_and_kept_back_frontiers_compose_three_average_points_near_rectifieds_level(
        compose, experiment, worlds):
    """experiment=robustness (world seeds 1, 2, 3) and heldout (world seed 4): average at three tight thresholds and at
    slack, rectified at its default λ, three seeds, every job valid, each world's jobs in one sweep folder."""
    from repo_exp.config import validate
    from repo_exp.sweeps import expand_arms

    cfg = compose(f"experiment={experiment}", return_hydra_config=True)
    assert cfg.hydra.sweep.dir == f"outputs/{experiment}/runs"
    jobs = expand_arms(cfg.hydra.sweeper.params, cfg.hydra.sweeper.arms, [])
    settings = set()
    for job in jobs:
        c = validate(compose(*job, f"experiment={experiment}"))
        key = c.constraint.threshold if c.constraint.name == "average" else ("λ", c.constraint.lambda_init)
        settings.add((c.world.seed, c.constraint.name, key, c.seed))
    assert len(settings) == len(jobs) == len(worlds) * 5 * 3
    assert {s[0] for s in settings} == worlds and {s[3] for s in settings} == {0, 1, 2}
    assert {s[2] for s in settings if s[1] == "average"} == {0.0, -2.5, -3.0, -3.5}
    assert {s[2] for s in settings if s[1] == "rectified"} == {("λ", 5.0)}


def test_match_reads_the_upper_envelope_so_a_dominated_setting_does_not_lower_the_frontier():
    # d = 0, −1, −2, −3 (loose → tight): the tightest setting came out less safe AND less helpful than d = −2
    violations, helpfulness, values = [0.4, 0.2, 0.01, 0.08], [0.8, 0.7, 0.5, 0.45], [0.0, -1.0, -2.0, -3.0]
    assert envelope(violations, helpfulness) == [2, 1, 0]
    safest = match(0.0, violations, helpfulness, values)  # safer than any: the safest point, not the tightest knob
    assert (safest.figure, safest.value, safest.clamped) == (0.5, -2.0, "tighter")
    m = match(0.08, violations, helpfulness, values)  # between d = −2 (0.01) and d = −1 (0.2), not at d = −3
    w = (0.08 - 0.01) / (0.2 - 0.01)
    assert m.figure == pytest.approx(0.5 + w * 0.2) and m.value == pytest.approx(-2.0 + w) and m.clamped is None
    assert dict(m.weights) == pytest.approx({2: 1 - w, 1: w})
    assert m.at([0.1, 0.2, 0.3, 0.9]) == pytest.approx((1 - w) * 0.3 + w * 0.2)  # another figure, same place


def test_the_sweep_listing_composes_every_job_and_names_the_first_that_does_not(capsys):
    """``python -m repo_exp.sweeps OVERRIDES…`` prints a sweep's jobs and folder without running any, and refuses a
    sweep with a job that does not validate, naming it."""
    from repo_exp.sweeps import main

    assert main(["-m", "experiment=robustness", "world.seed=2", "seed=0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("5 jobs, each composed and valid; they would run into outputs/robustness/runs:")
    assert "constraint=average constraint.threshold=-3.5" in out and "constraint.lambda_init=5" in out
    assert main(["trainer.total_steps=2", "seed=0,1"]) == 0  # a sweep of the command line alone (no params)
    assert capsys.readouterr().out.splitlines()[1:] == ["  trainer.total_steps=2 seed=0", "  trainer.total_steps=2 seed=1"]
    assert main(["experiment=compare", "constraint=average", "constraint.lambda_init=1,9"]) == 2
    err = capsys.readouterr().err
    assert "constraint.lambda_init=9" in err and "lambda_init" in err
