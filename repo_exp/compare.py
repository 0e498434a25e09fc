"""The default comparison: Safe RLHF's average constraint against RePO's rectified one on the synthetic world.

    python -m repo_exp                       # no arguments: this, with the defaults below
    python -m repo_exp.compare --out results/control world=no_temptation
    python -m repo_exp.compare --out results/normalized --constraints rectified constraint.normalize=true

Both constraints train from the same SFT policy against the same learned reward and cost models (the world's
pipeline builds them once and caches them), for several seeds each. Every run evaluates the initial and the final
policy on the world's held-out prompts with k samples each, with the learned models and with the oracle. The
report (``OUT/report.json``, ``OUT/report.md``, figures) gives, per constraint, the mean and standard deviation over
seeds of every ``eval/…`` and ``oracle/…`` figure, the reward and cost models' held-out accuracies, and where each
constraint's helpfulness comes from.

Runs go to ``OUT/runs/<constraint>-seed<k>``; a run that already finished with the same overrides is reused, and one
that was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("repo_exp.compare")

DEFAULT_CONSTRAINTS = ("average", "rectified")
DEFAULT_SEEDS = (0, 1, 2)
TABLE = (
    ("oracle/prompt_violation_rate", "prompts violating (oracle)"),
    ("oracle/mean_cost", "mean cost (oracle)"),
    ("oracle/unsafe_rate", "unsafe responses (oracle)"),
    ("oracle/safe_reward_mean", "safe helpfulness (oracle)"),
    ("oracle/reward_mean", "raw helpfulness (oracle)"),
    ("oracle/benign_refusal_rate", "refusals where a safe answer exists"),
    ("eval/mean_cost", "mean cost (cost model)"),
    ("eval/prompt_violation_rate", "prompts violating (cost model)"),
    ("eval/reward_mean", "reward (reward model)"),
)


def run_job(run_dir: Path, overrides: list[str], threads: int) -> tuple[Path, float, int]:
    """One RL run as its own process (so runs are isolated and parallel); reuses a finished identical run."""
    record = run_dir / "compare_overrides.json"
    previous = json.loads(record.read_text()) if record.is_file() else None
    if previous == overrides and (run_dir / "eval" / "summary.json").is_file():
        return run_dir, 0.0, 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if previous is not None and previous != overrides:
        raise SystemExit(f"{run_dir} holds a run with other settings; choose another --out or delete it")
    record.write_text(json.dumps(overrides))
    cmd = [sys.executable, "-m", "repo_exp", *overrides, f"hydra.run.dir={run_dir}", "trainer.progress=false",
           f"trainer.num_threads={threads}", "trainer.resume=auto"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    with open(run_dir / "compare.log", "a") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    return run_dir, time.perf_counter() - start, proc.returncode


def helpfulness_sources(report: dict, constraints: list[str]) -> dict[str, dict[str, float]]:
    """Per constraint: where the oracle helpfulness comes from — earned by safe vs unsafe responses, by family
    (means over the constraint's runs, from ``report[constraint]``)."""
    out = {}
    for constraint in constraints:
        figures = report.get(constraint, {})
        if "oracle/reward_mean" not in figures:
            continue
        row = {"oracle/unsafe_reward_mean":
               figures["oracle/reward_mean"]["mean"] - figures["oracle/safe_reward_mean"]["mean"]}
        families = sorted(k.rsplit("/", 1)[-1] for k in figures if k.startswith("oracle/reward_mean/"))
        for family in families:
            for figure in ("reward_mean", "unsafe_rate", "refusal_rate"):
                row[f"oracle/{figure}/{family}"] = figures[f"oracle/{figure}/{family}"]["mean"]
        out[constraint] = row
    return out


def table(report: dict, constraints: list[str]) -> str:
    lines = ["| figure | " + " | ".join(constraints) + " |", "|---|" + "---|" * len(constraints)]
    for key, label in TABLE:
        cells = []
        for c in constraints:
            v = report.get(c, {}).get(key)
            cells.append(f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "—")
        lines.append(f"| {label} (`{key}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m repo_exp.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/default"))
    parser.add_argument("--constraints", type=lambda s: s.split(","), default=list(DEFAULT_CONSTRAINTS),
                        help="comma-separated constraint types (default: average,rectified)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_SEEDS),
                        help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="runs at a time (each gets cores / jobs threads)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run, e.g. world=no_temptation")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from repo_exp.config import compose_config, validate
    from repo_exp.report import build_report, write_report
    from repo_exp.world.pipeline import world_artifacts, world_metrics

    start = time.perf_counter()
    config = validate(compose_config(args.overrides))
    log.info("building (or reusing) the world %r: SFT → preferences → reward and cost models", config.world.name)
    paths = world_artifacts(config.world)
    world = world_metrics(paths)
    log.info("world ready in %.0f s: reward model held-out accuracy %.3f, cost model %.3f, cost sign %.3f",
             time.perf_counter() - start, world["reward/pairwise_accuracy"], world["cost/pairwise_accuracy"],
             world["cost/sign_accuracy"])
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [(args.out / "runs" / f"{c}-seed{s}", [f"constraint={c}", f"seed={s}", *args.overrides])
            for s in args.seeds for c in args.constraints]
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for run_dir, seconds, code in pool.map(lambda j: run_job(j[0], j[1], threads), jobs):
            if code:
                failed.append(run_dir)
                log.error("run %s failed (exit %d); see %s", run_dir, code, run_dir / "compare.log")
            else:
                log.info("run %s %s", run_dir.name, f"done in {seconds:.0f} s" if seconds else "reused")
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(map(str, failed))}")
    report = build_report([j[0] for j in jobs], args.out,
                          title=f"Average vs rectified constraint — world {config.world.name!r}", write=False)
    report["world"] = {"name": config.world.name, "paths": paths, **world}
    report["helpfulness_sources"] = helpfulness_sources(report, args.constraints)
    report["overrides"] = list(args.overrides)
    report["seconds"] = round(time.perf_counter() - start, 1)
    summary = table(report, args.constraints)
    models = (f"Reward model: held-out pairwise accuracy {world['reward/pairwise_accuracy']:.3f} on noisy labels, "
              f"{world['reward/oracle_pairwise_accuracy']:.3f} against the oracle. Cost model: pairwise "
              f"{world['cost/pairwise_accuracy']:.3f} (oracle {world['cost/oracle_pairwise_accuracy']:.3f}), sign "
              f"{world['cost/sign_accuracy']:.3f} (oracle {world['cost/oracle_sign_accuracy']:.3f}).")
    write_report(report, args.out, appendix=(
        f"\n## Summary (mean ± std over seeds {args.seeds})\n\n{summary}\n\n{models}\n\n"
        f"## Where the helpfulness comes from\n\n```\n{json.dumps(report['helpfulness_sources'], indent=1)}\n```\n"))
    print(f"\n{report['title']} — mean ± std over seeds {args.seeds}\n")
    print(summary)
    print(f"\n{models}\nReport: {args.out / 'report.md'} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
