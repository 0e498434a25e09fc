"""Hydra callbacks: what a sweep does before its first job and after its last one.

- ``SweepSignals`` (every multirun): Ctrl-C stops the sweep as a whole. The running jobs save a checkpoint and stop
  (the trainer's own handler), the jobs not started yet do not start (the stop mark, ``repo_exp.hydra_job``), and the
  sweep exits non-zero; a second Ctrl-C stops the running jobs without their checkpoint.
- ``CompareReport`` (``experiment=compare``): builds the synthetic world once before the jobs start (the jobs then
  find it in the cache; its file lock keeps concurrent builders safe), and when the sweep ends writes the report
  (``report.json``, ``report.md``, figures) beside the runs' folder and prints the summary table.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from repo_exp.hydra_job import stop_mark

log = logging.getLogger("repo_exp")

TABLE = (
    ("oracle/prompt_violation_rate", "prompts violating (oracle)"),
    ("oracle/answerable_helpfulness", "helpfulness where a safe answer exists (oracle, safe answers only)"),
    ("oracle/overrefusal_rate", "refusals where a safe answer exists (over-refusal)"),
    ("oracle/harmful_refusal_rate", "harmful prompts refused"),
    ("oracle/interference_rate", "prompts whose cost rose and ends above 0 (interference)"),
    ("oracle/mean_cost", "mean cost (oracle)"),
    ("oracle/unsafe_rate", "unsafe responses (oracle)"),
    ("oracle/safe_reward_mean", "safe helpfulness, refusals of harmful prompts included (oracle)"),
    ("oracle/prompt_violation_rate/unseen_topics", "prompts violating, topics never trained on (oracle)"),
    ("eval_d0/mean_cost", "mean cost (cost model)"),
    ("eval_d0/prompt_violation_rate", "prompts violating (cost model, d = 0)"),
    ("eval/reward_gain", "reward-model gain over the initial policy"),
)


class SweepSignals(Callback):
    """Ctrl-C during a multirun: stop the whole sweep after the running jobs have saved their checkpoints.

    A terminal's Ctrl-C reaches every process of the sweep. joblib would answer it in the parent by killing its
    workers, and a worker still starting (importing, reading its job) would die with it and break the pool, so that
    the running jobs lose the checkpoint they are about to save. So the sweep's parent ignores SIGINT, the worker
    processes it starts inherit that, and each job takes Ctrl-C back while it runs (``repo_exp.hydra_job.run_job``):
    the trainer saves and stops, the job fails and leaves the sweep's stop mark, and the jobs not started yet see
    the mark and do not start. (A Ctrl-C while no job runs yet, e.g. while the workers start, is ignored.)
    """

    def __init__(self) -> None:
        self.previous: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        stop_mark(Path(config.hydra.sweep.dir)).unlink(missing_ok=True)  # a new start of the sweep (e.g. to resume)
        self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The override list of every job of this sweep, as its sweeper expands it (command-line sweeps win over
    ``hydra.sweeper.params``; the frontier sweeper's arms each cross them, ``repo_exp.sweeps``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arms = OmegaConf.select(config, "hydra.sweeper.arms")
    if arms:
        from repo_exp.sweeps import expand_arms

        return expand_arms(OmegaConf.to_container(OmegaConf.select(config, "hydra.sweeper.params") or {}),
                           OmegaConf.to_container(arms), list(config.hydra.overrides.task))
    params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides(params + list(config.hydra.overrides.task))
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def _the_run(overrides: list[str]) -> tuple[str, ...]:
    """The overrides that decide what a run computes (``hydra_job.NOT_THE_RUN`` and ``hydra.*`` left out), sorted."""
    from repo_exp.hydra_job import NOT_THE_RUN

    def key(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~")

    return tuple(sorted(o for o in overrides if not key(o).startswith("hydra.")
                        and not any(key(o) == k or key(o).startswith(k + ".") for k in NOT_THE_RUN)))


def job_folders(sweep_dir: Path, jobs: list[list[str]]) -> list[Path]:
    """The folders under ``sweep_dir`` (at any depth) whose ``.hydra/overrides.yaml`` is one of ``jobs``, up to
    settings that do not change a run (the folders this sweep's jobs ran in or reused, not those of other sweeps
    kept in the same place)."""
    wanted = {_the_run(job) for job in jobs}
    found = []
    for path in sorted(sweep_dir.glob("**/.hydra/overrides.yaml")):
        if _the_run(list(map(str, OmegaConf.load(path)))) in wanted:
            found.append(path.parent.parent)
    return found


def sweep_worlds(jobs: list[list[str]]) -> list[list[str]]:
    """One job's overrides for each distinct world among ``jobs`` (jobs differ in ``world``/``world.*``)."""
    seen: dict[tuple[str, ...], list[str]] = {}
    for job in jobs:
        world = tuple(sorted(o for o in job if o.split("=", 1)[0].lstrip("+~").split(".")[0] == "world"))
        seen.setdefault(world, job)
    return list(seen.values())


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
        families = sorted(k.rsplit("/", 1)[-1] for k in figures if k.startswith("oracle/reward_mean/")
                          and k.rsplit("/", 1)[-1] in ("benign", "dual_use", "harmful"))
        for family in families:
            for figure in ("reward_mean", "unsafe_rate", "refusal_rate"):
                row[f"oracle/{figure}/{family}"] = figures[f"oracle/{figure}/{family}"]["mean"]
        out[constraint] = row
    return out


def table(report: dict, constraints: list[str]) -> str:
    """The summary table: one row per headline figure, mean ± std over seeds per constraint."""
    lines = ["| figure | " + " | ".join(constraints) + " |", "|---|" + "---|" * len(constraints)]
    for key, label in TABLE:
        cells = []
        for c in constraints:
            v = report.get(c, {}).get(key)
            cells.append(f"{v['mean']:.3f} ± {v['std']:.3f}" if v else "—")
        lines.append(f"| {label} (`{key}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def models_line(world: dict[str, Any]) -> str:
    several = {k: v for k, v in world.items() if k.startswith("seed") and isinstance(v, dict)}
    if several:  # a sweep over worlds: one line each
        return "\n".join(f"World seed {v['seed']}: {models_line(v)}" for _, v in sorted(several.items()))
    if "reward/pairwise_accuracy" not in world:
        return "The reward and cost models are not the world's (no world accuracies)."
    return (f"Reward model: held-out pairwise accuracy {world['reward/pairwise_accuracy']:.3f} on noisy labels, "
            f"{world['reward/oracle_pairwise_accuracy']:.3f} against the oracle. Cost model: pairwise "
            f"{world['cost/pairwise_accuracy']:.3f} (oracle {world['cost/oracle_pairwise_accuracy']:.3f}), sign "
            f"{world['cost/sign_accuracy']:.3f} (oracle {world['cost/oracle_sign_accuracy']:.3f})."
            + (f" On the round's policy samples, against the oracle: reward pairwise "
               f"{world['reward/on_policy_oracle_pairwise_accuracy']:.3f}, cost pairwise "
               f"{world['cost/on_policy_oracle_pairwise_accuracy']:.3f}, cost sign "
               f"{world['cost/on_policy_oracle_sign_accuracy']:.3f}."
               if "cost/on_policy_oracle_sign_accuracy" in world else ""))


def _job_config(config: DictConfig):
    """The sweep's config without its ``hydra`` node, validated (the swept values are each job's own)."""
    import copy

    from omegaconf import open_dict

    from repo_exp.config import validate

    job = copy.deepcopy(config)
    with open_dict(job):
        del job["hydra"]
    return validate(job)


def _fatal(what: str):
    """Hydra turns an exception in a callback into a warning and exits 0: end the sweep with an error instead."""
    def wrap(method):
        def run(self, config: DictConfig, **kwargs: Any) -> None:
            try:
                method(self, config, **kwargs)
            except Exception as exc:
                log.error("%s failed: %s: %s", what, type(exc).__name__, exc, exc_info=True)
                raise SystemExit(1) from exc
        return run
    return wrap


class CompareReport(Callback):
    """The default comparison's world before the jobs and its report after them (``experiment=compare``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.world: dict[str, Any] = {}

    @_fatal("building the world")
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from repo_exp.world.pipeline import world_artifacts, world_metrics

        self.start = time.perf_counter()
        # the jobs' processes (started after this) log lines; transformers' loading/saving bars would interleave
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from repo_exp.config import compose_config, validate

        job = _job_config(config)
        if "world" not in (job.model.source, job.reward.source, job.cost.source):
            return
        worlds = sweep_worlds(sweep_jobs(config))  # every world the jobs train in (the robustness study has three)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # no job runs yet: Ctrl-C stops at once
        try:
            for overrides in worlds:
                world = job.world if len(worlds) == 1 else validate(compose_config(overrides)).world
                log.info("building (or reusing) the world %r (seed %d): SFT → preferences → reward and cost models "
                         "→ an on-policy round", world.name, world.seed)
                paths = world_artifacts(world)
                metrics = world_metrics(paths)
                entry = {"name": world.name, "seed": world.seed, "paths": paths, **metrics}
                self.world = entry if len(worlds) == 1 else {**self.world, f"seed{world.seed}": entry}
                log.info("world %d ready after %.0f s: reward model held-out accuracy %.3f, cost model %.3f, cost "
                         "sign %.3f", world.seed, time.perf_counter() - self.start, metrics["reward/pairwise_accuracy"],
                         metrics["cost/pairwise_accuracy"], metrics["cost/sign_accuracy"])
        finally:
            signal.signal(signal.SIGINT, previous)

    @_fatal("the comparison's report")
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from repo_exp.report import build_report, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        out = sweep_dir.parent
        jobs = sweep_jobs(config)
        folders = job_folders(sweep_dir, jobs)
        job = _job_config(config)
        report = build_report(folders, out, title=f"Average vs rectified constraint — world {job.world.name!r}",
                              write=False)
        order = ("average", "rectified", "shaping", "none")
        constraints = sorted({r["constraint"] for r in report["runs"]},
                             key=lambda c: (order.index(c) if c in order else len(order), c))
        seeds = sorted({r["seed"] for r in report["runs"]})
        report["world"] = self.world or {"name": job.world.name}
        report["helpfulness_sources"] = helpfulness_sources(report, constraints)
        report["overrides"] = list(config.hydra.overrides.task)
        report["seconds"] = round(time.perf_counter() - self.start, 1)
        summary = table(report, constraints)
        models = models_line(self.world)
        write_report(report, out, appendix=(
            f"\n## Summary (mean ± std over seeds {seeds})\n\n{summary}\n\n{models}\n\n"
            f"## Where the helpfulness comes from\n\n```\n{json.dumps(report['helpfulness_sources'], indent=1)}\n"
            f"```\n"))
        print(f"\n{report['title']} — mean ± std over seeds {seeds}\n")
        print(summary)
        print(f"\n{models}\nReport: {out / 'report.md'} ({report['seconds']:.0f} s)", flush=True)


class FrontierReport(CompareReport):
    """``experiment=frontier``: the worlds before the jobs (as the comparison builds them), and after them the report
    with the frontier and the matched comparison (``repo_exp.frontier``) beside the runs' folder, its table printed."""

    @_fatal("the frontier's report")
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from repo_exp import frontier
        from repo_exp.report import build_report, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        out = sweep_dir.parent
        folders = job_folders(sweep_dir, sweep_jobs(config))
        report = build_report(folders, out, title="The frontier: each method along its own knob", write=False)
        report["world"] = self.world
        report["overrides"] = list(config.hydra.overrides.task)
        report["seconds"] = round(time.perf_counter() - self.start, 1)
        write_report(report, out, appendix=f"\n{models_line(self.world)}\n" if self.world else "")
        if report.get("frontier"):
            print("\n" + frontier.markdown(report["frontier"], report.get("matched", [])))
        print(f"Report: {out / 'report.md'} ({report['seconds']:.0f} s)", flush=True)
