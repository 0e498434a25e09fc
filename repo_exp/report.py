"""Comparison reports over run and sweep folders: where did each constraint put the safety?

``python -m repo_exp.report DIR [DIR ...] [--out OUT] [--format png|svg|pdf] [--against REFERENCE]`` reads run
folders (``.hydra/config.yaml``, ``eval/summary.json``, ``eval/per_prompt.jsonl``, ``eval/initial/``,
``metrics.jsonl``) or folders that hold them (a Hydra multirun folder, ``outputs/<name>``), groups the runs by
constraint type and by the settings the sweep varied (threshold, multiplier learning rate …; seeds are replicates),
and writes (into OUT, by default the one DIR given)

- ``report.json``: ``report[constraint]`` = ``{figure: {"mean", "std", "n"}}`` over every run of that constraint, for
  every ``eval/…``, ``oracle/…`` and ``exploit/…`` figure (std over seeds, ddof 1; 0 when n = 1); ``report["groups"]`` the same per
  (constraint, settings) group; ``report["runs"]`` what was read;
- ``report.md``: the table of headline figures, mean ± std over seeds, and the figures below;
- ``interference.png`` (and ``interference_oracle.png`` on the synthetic world): per-prompt mean cost C̄(x) after
  training against before, one panel per constraint type and setting, with the threshold lines — points above the
  diagonal are prompts that became less safe;
- ``tradeoff.png``: reward against prompt-violation rate, one curve per constraint type along the swept setting
  (drawn when some setting is swept);
- ``training.png``: λ, mean cost, unsafe rate and reward per step, mean over seeds with a ±1 std band;
- ``exploitation.png`` (runs with oracle figures): the share of samples the cost model calls safe while the oracle
  calls unsafe, per prompt family and group.

Every figure states what it rests on below its panels: n (seeds per group, prompts × samples), the threshold d, the
world and the commit the runs were trained at. A figure that cannot be drawn (no initial evaluation, no per-prompt
rows, no swept setting …) is named with the reason, on the terminal and in ``report.md``.

The readers take a full run folder and the compact copy of one that the reference results keep (``repo_exp.export``:
per-prompt rows without response texts and the training curves, gzipped), so ``python -m repo_exp.report
results/<name>`` draws every figure again from the repository alone. ``--against REFERENCE`` says, figure by figure,
whether these runs reproduce the reference runs within their seeds' spread.

``build_report(run_dirs, out_dir, title=...)`` does all of it and returns the report dict.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

log = logging.getLogger("repo_exp")

# colours that stay apart for colour-blind readers; the published method names beside the config names
CONSTRAINT_STYLE = {
    "none": ("#7f7f7f", "none (PPO)"),
    "shaping": ("#9467bd", "shaping (fixed λ)"),
    "average": ("#E69F00", "average (Safe RLHF)"),
    "rectified": ("#0072B2", "rectified (RePO)"),
}
CONSTRAINT_ORDER = ("none", "shaping", "average", "rectified")
# config keys that are replicates (seeds) or say nothing about the method: never a group setting
IGNORED_KEYS = ("seed", "run_name", "trainer.progress", "trainer.resume", "trainer.init_from", "eval.checkpoint",
                "experiment")
IGNORED_PREFIXES = ("hydra.", "logger")
HEADLINE = (
    ("eval/reward_gain", "reward gain"),
    ("eval/win_rate", "win rate"),
    ("eval/mean_cost", "mean cost C̄"),
    ("eval/prompt_violation_rate", "prompts violating"),
    ("eval/unsafe_rate", "unsafe samples"),
    ("eval/violation_mass", "violation mass"),
    ("eval/slack_mass", "slack mass"),
    ("eval/compensation", "compensation"),
    ("eval/interference_rate", "interference"),
    ("eval/cvar10_cost", "CVaR10 cost"),
    ("eval_d0/prompt_violation_rate", "prompts violating at d = 0"),
    ("eval_d0/mean_cost", "mean cost (cost model)"),
    ("oracle/prompt_violation_rate", "prompts violating"),
    ("oracle/answerable_helpfulness", "answerable helpfulness"),
    ("oracle/overrefusal_rate", "over-refusal"),
    ("oracle/harmful_refusal_rate", "harmful refused"),
    ("oracle/reward_mean", "reward"),
    ("oracle/safe_reward_mean", "safe reward"),
    ("oracle/mean_cost", "mean cost C̄"),
    ("oracle/unsafe_rate", "unsafe samples"),
    ("oracle/compensation", "compensation"),
    ("oracle/interference_rate", "interference"),
    ("oracle/prompt_violation_rate/unseen_topics", "violating, unseen topics"),
    ("oracle/answerable_helpfulness/unseen_topics", "answerable helpfulness, unseen topics"),
    ("exploit/cost_false_safe_rate", "false safe (samples)"),
    ("exploit/cost_false_safe_share", "unsafe called safe"),
    ("exploit/cost_false_alarm_share", "safe called unsafe"),
    ("exploit/prompt_false_safe_share", "violating prompts called safe"),
    ("exploit/reward_oracle_rank_corr", "reward–oracle rank corr."),
    ("exploit/reward_gain", "reward-model gain"),
    ("exploit/oracle_gain", "oracle gain"),
)
# the headline figures of a comparison: the summary table and what ``--against`` compares
SUMMARY_FIGURES = (
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
FORMATS = ("png", "svg", "pdf")
# below this, two means count as equal whatever their seeds' spread (one prompt of ~100 is 0.01 of a rate)
AGREEMENT_FLOOR = 0.01
TRAINING_PANELS = (
    ("constraint/lambda", "multiplier λ"),
    ("cost/mean", "mean cost C (cost-model units)"),
    ("cost/unsafe_rate", "unsafe rate (share of samples with C > d)"),
    ("reward/mean", "mean reward R (reward-model units)"),
)


# ------------------------------------------------------------------------------------------------ reading runs


class NoRunsError(FileNotFoundError):
    """Nothing to report: no run folder, or none with a final evaluation."""


@dataclass
class Run:
    """One training job's outputs."""

    path: Path
    constraint: str
    threshold: float
    seed: int
    overrides: dict[str, str]
    summary: dict[str, Any]
    rows: list[dict] = field(default_factory=list)
    initial_rows: list[dict] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    settings: tuple[tuple[str, str], ...] = ()  # the group-defining values, filled by ``group_runs``
    cfg: Any = None  # the run's composed config (.hydra/config.yaml)
    world: str = ""  # the world the run trained in ("default, seed 0"), or its prompt set when not the world's
    commit: str = ""  # the source commit the run was trained at (its summary's ``run/commit``), "" if not recorded

    @property
    def has_oracle(self) -> bool:
        return any(k.startswith("oracle/") for k in self.summary)


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file, or of its gzipped copy ``<name>.gz`` (the compact reference layout)."""
    packed = path.with_name(path.name + ".gz")
    if not path.is_file() and packed.is_file():
        path = packed
    if not path.is_file():
        return []
    with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
        text = f.read()
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:  # a torn last line of a killed run
                log.warning("%s: skipped an unreadable line", path)
    return out


def _is_run(folder: Path) -> bool:
    return (folder / ".hydra" / "config.yaml").is_file() or (folder / "eval" / "summary.json").is_file()


def find_run_dirs(paths: Iterable[Path | str]) -> list[Path]:
    """Run folders among ``paths``: each path is a run folder or is searched for run folders below it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if _is_run(p):
            found.append(p)
            continue
        below = sorted({c.parent.parent for c in p.rglob(".hydra/config.yaml")}
                       | {s.parent.parent for s in p.rglob("eval/summary.json") if s.parent.name == "eval"})
        # an evaluation job kept inside a run folder (python -m repo_exp.evaluate hydra.run.dir=RUN/…) is not a run
        found += [d for d in below if not any(other in d.parents for other in below)]
    unique = list(dict.fromkeys(d.resolve() for d in found))
    if not unique:
        raise NoRunsError(f"no run folders (with .hydra/config.yaml or eval/summary.json) under "
                                f"{[str(p) for p in paths]}")
    return unique


def read_run(folder: Path) -> Run | None:
    """A run's config, evaluations and training curve; None (with a warning) when it has no final evaluation."""
    from omegaconf import OmegaConf

    summary_path = folder / "eval" / "summary.json"
    if not summary_path.is_file():
        log.warning("%s has no eval/summary.json (unfinished or failed run): left out of the report", folder)
        return None
    try:
        summary = json.loads(summary_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # written atomically, so damaged after the run: say which file
        log.warning("%s is not valid JSON (%s): the run %s is left out of the report", summary_path, exc, folder)
        return None
    config_path = folder / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config_path) if config_path.is_file() else OmegaConf.create({})
    from repo_exp.frontier import method_of

    # the method: the constraint, or the offline algorithm, with a learned multiplier or critic-free estimator named
    constraint = method_of(cfg) if OmegaConf.select(cfg, "constraint.name", default=None) else "unknown"
    threshold = summary.get("eval/threshold", OmegaConf.select(cfg, "constraint.threshold", default=0.0))
    overrides_path = folder / ".hydra" / "overrides.yaml"
    overrides = {}
    if overrides_path.is_file():
        for item in OmegaConf.load(overrides_path):
            key, _, value = str(item).partition("=")
            overrides[key.lstrip("+~")] = value
    return Run(
        path=folder, constraint=str(constraint), threshold=float(threshold),
        seed=int(OmegaConf.select(cfg, "seed", default=0)), overrides=overrides, summary=summary,
        rows=read_jsonl(folder / "eval" / "per_prompt.jsonl"),
        initial_rows=read_jsonl(folder / "eval" / "initial" / "per_prompt.jsonl"),
        steps=[r for r in read_jsonl(folder / "metrics.jsonl") if "reward/mean" in r],
        cfg=cfg, world=_world_of(cfg), commit=str(summary.get("run/commit") or ""),
    )


def _world_of(cfg) -> str:
    """"default, seed 0" for a run on the synthetic world; the prompt set's name otherwise ("" when unknown)."""
    from omegaconf import OmegaConf

    sources = {OmegaConf.select(cfg, f"{k}.source", default=None) for k in ("data", "model", "reward", "cost")}
    name = OmegaConf.select(cfg, "world.name", default=None)
    if "world" in sources and name is not None:
        return f"{name}, seed {OmegaConf.select(cfg, 'world.seed', default=0)}"
    return str(OmegaConf.select(cfg, "data.name", default="") or "")


def _ignored(key: str) -> bool:
    return (key in IGNORED_KEYS or key.endswith(".seed") or key == "constraint"
            or any(key.startswith(p) for p in IGNORED_PREFIXES))


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs grouped by constraint type and by the overrides that differ between runs (seeds excepted).

    Group labels read ``average`` or ``average constraint.threshold=-0.5``; groups come in CONSTRAINT_ORDER, then
    by threshold.
    """
    keys = sorted({k for r in runs for k in r.overrides if not _ignored(k)})
    varying = [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]
    thresholds = {r.threshold for r in runs}
    for r in runs:
        settings = [(k, r.overrides[k]) for k in varying if k in r.overrides]
        # a threshold sweep set by other means than an override (e.g. an experiment file) still separates groups
        if len(thresholds) > 1 and not any(k.endswith("threshold") for k, _ in settings):
            settings.append(("constraint.threshold", f"{r.threshold:g}"))
        r.settings = tuple(settings)
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (_constraint_rank(r.constraint), r.constraint, r.threshold, r.settings,
                                         r.seed)):
        groups[group_label(r)].append(r)
    return dict(groups)


def group_label(run: Run) -> str:
    return " ".join([run.constraint, *(f"{k}={v}" for k, v in run.settings)])


def _constraint_rank(name: str) -> int:
    return CONSTRAINT_ORDER.index(name) if name in CONSTRAINT_ORDER else len(CONSTRAINT_ORDER)


# --------------------------------------------------------------------------------------------------- aggregation


def figure_stats(summaries: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{figure: {"mean", "std", "n"}}`` over ``summaries`` for every numeric ``eval/…``, ``oracle/…`` and
    ``exploit/…`` figure.

    ``std`` is the sample standard deviation over runs (ddof 1), 0 for a single run; ``n`` counts the runs that
    have the figure.
    """
    values: dict[str, list[float]] = defaultdict(list)
    for s in summaries:
        for key, value in s.items():
            if key.split("/", 1)[0] in ("eval", "eval_d0", "oracle", "exploit", "exploit_d0", "train") \
                    and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                values[key].append(float(value))
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in sorted(values.items())}


def aggregate(runs: Sequence[Run], groups: dict[str, list[Run]]) -> dict[str, Any]:
    """The report dict without figures: per constraint, per group (``group_runs(runs)``), and the runs."""
    report: dict[str, Any] = {}
    for name in sorted({r.constraint for r in runs}, key=lambda n: (_constraint_rank(n), n)):
        report[name] = figure_stats([r.summary for r in runs if r.constraint == name])
    report["groups"] = {
        label: {"constraint": members[0].constraint, "threshold": members[0].threshold,
                "settings": dict(members[0].settings), "seeds": [r.seed for r in members],
                "figures": figure_stats([r.summary for r in members])}
        for label, members in groups.items()
    }
    report["runs"] = [{"path": str(r.path), "constraint": r.constraint, "threshold": r.threshold, "seed": r.seed,
                       "group": group_label(r)} for r in runs]
    return report


# ------------------------------------------------------------------------------------------------------ figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10,
                         "axes.titlesize": 11, "legend.fontsize": 9})
    return plt


def _values(values: Iterable[Any]) -> str:
    """Distinct values, in order, as one short phrase."""
    seen = list(dict.fromkeys(v for v in values if v not in (None, "")))
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in seen)


def provenance(groups: dict[str, list[Run]], threshold: str | None = None) -> str:
    """What a figure rests on, for the line under it: n (seeds per group, prompts × samples per evaluation), the
    threshold d, the world and the commit the runs were trained at."""
    runs = [r for members in groups.values() for r in members]
    seeds = sorted({len(members) for members in groups.values()})
    per_group = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    prompts = _values(r.summary.get("eval/num_prompts") for r in runs)
    samples = _values(r.summary.get("eval/samples_per_prompt") for r in runs)
    evaluation = f" × {prompts} prompts × {samples} samples" if prompts else ""
    d = threshold if threshold is not None else _values(sorted({float(r.threshold) for r in runs}))
    commits = _values(sorted({r.commit for r in runs if r.commit}))
    unrecorded = any(not r.commit for r in runs)
    commit = (f"commit {commits}" + (" (some runs: not recorded)" if unrecorded else "")) if commits \
        else "commit not recorded"
    return (f"n = {per_group} seed{'s' if seeds[-1] > 1 else ''} per group{evaluation}; d = {d}; "
            f"world: {_values(r.world for r in runs) or 'not recorded'}; {commit}")


PROVENANCE_INCHES = 0.3  # the strip added below a figure for its provenance line


def save_figure(fig, path: Path, groups: dict[str, list[Run]], threshold: str | None = None) -> None:
    """Write a report figure with its provenance line (``provenance``) in a strip added below everything it holds
    (panels and legends move up, keeping their sizes), so that the line never covers a legend. The report's own
    figures are saved through here."""
    import matplotlib.pyplot as plt

    height = fig.get_figheight()
    fig.set_figheight(height + PROVENANCE_INCHES)
    scale, strip = height / (height + PROVENANCE_INCHES), PROVENANCE_INCHES / (height + PROVENANCE_INCHES)
    for ax in fig.axes:
        box = ax.get_position()
        ax.set_position([box.x0, strip + box.y0 * scale, box.width, box.height * scale])
    for legend in fig.legends:  # anchored to the figure: now to the part above the strip
        legend.set_bbox_to_anchor((0.0, strip, 1.0, 1.0 - strip), transform=fig.transFigure)
    if fig._suptitle is not None:
        x, y = fig._suptitle.get_position()
        fig._suptitle.set_y(strip + y * scale)
    fig.text(0.01, strip / 2, provenance(groups, threshold), ha="left", va="center", fontsize=8, color="#444444")
    fig.savefig(path)
    plt.close(fig)


def rate_error(means: Sequence[float], stds: Sequence[float]) -> list[list[float]]:
    """Asymmetric error bars (lower, upper) of ±1 std for rates, cut at 0 and 1: a share never leaves [0, 1]."""
    lower = [min(s, m) if math.isfinite(m) else 0.0 for m, s in zip(means, stds)]
    upper = [min(s, 1.0 - m) if math.isfinite(m) else 0.0 for m, s in zip(means, stds)]
    return [[max(0.0, v) for v in lower], [max(0.0, v) for v in upper]]


def draw_bars(ax, xs: Sequence[float], means: Sequence[float], stds: Sequence[float], width: float, colour: str,
              label: str, alpha: float = 1.0) -> None:
    """Bars of rates with ±1 std (kept inside [0, 1]). A bar of height zero is drawn as a thick line at 0 with a "0"
    above it, so that zero reads as zero and not as missing; a missing value (NaN) is marked "n/a"."""
    heights = [m if math.isfinite(m) else 0.0 for m in means]
    ax.bar(xs, heights, width, yerr=rate_error(means, stds), color=colour, alpha=alpha, capsize=3, label=label)
    for x, m in zip(xs, means):
        if not math.isfinite(m):
            ax.annotate("n/a", (x, 0), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7,
                        color="#555555")
        elif m == 0.0:
            ax.hlines(0.0, x - width / 2, x + width / 2, colors=colour, linewidth=3.0, zorder=3)
            ax.annotate("0", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7,
                        color=colour)


def _style(constraint: str) -> tuple[str, str]:
    return CONSTRAINT_STYLE.get(constraint, ("#333333", constraint))


def _settings_text(settings: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in settings)


def _paired_costs(run: Run, source: str) -> tuple[list[float], list[float]]:
    """C̄(x) before and after training for the prompts evaluated both times (``source``: eval or oracle)."""
    def mean_cost(row):
        return row["oracle"]["mean_cost"] if source == "oracle" else row["mean_cost"]

    before = {r["prompt_id"]: mean_cost(r) for r in run.initial_rows if source != "oracle" or "oracle" in r}
    pairs = [(before[r["prompt_id"]], mean_cost(r)) for r in run.rows
             if r["prompt_id"] in before and (source != "oracle" or "oracle" in r)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_interference(groups: dict[str, list[Run]], path: Path, source: str = "eval") -> str | None:
    """Per-prompt C̄(x) after training (y) against before (x): one panel per group, seeds pooled.

    Lines: the diagonal (no change) and the threshold d on both axes; the region above d is shaded (violating after
    training). Points above the diagonal (red) are prompts that became less safe. Returns None when drawn, else why
    not (no per-prompt rows, or no initial evaluation to compare with).
    """
    runs_all = [r for runs in groups.values() for r in runs]
    if not any(r.rows for r in runs_all):
        return ("no run has per-prompt rows (eval/per_prompt.jsonl or .jsonl.gz); a reference made with "
                "`python -m repo_exp.export` keeps them")
    if not any(r.initial_rows for r in runs_all):
        return "no run has an initial evaluation (eval/initial/per_prompt.jsonl) to compare with (eval.at_start)"
    if source == "oracle" and not all(r.has_oracle for r in runs_all):
        return "the runs have no oracle figures (only the synthetic world has a ground truth)"
    paired = {id(r): _paired_costs(r, source) for runs in groups.values() for r in runs}
    panels = [(label, runs) for label, runs in groups.items() if any(paired[id(r)][0] for r in runs)]
    if not panels:
        return "no prompt was evaluated both before and after training"
    plt = _pyplot()
    by_constraint: dict[str, list] = defaultdict(list)
    for label, runs in panels:
        by_constraint[runs[0].constraint].append((label, runs))
    ncols = len(by_constraint)
    nrows = max(len(v) for v in by_constraint.values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.3 * nrows), squeeze=False)
    all_costs = [c for _, runs in panels for r in runs for side in paired[id(r)] for c in side]
    all_costs += [0.0] if source == "oracle" else [runs[0].threshold for _, runs in panels]  # keep d in view
    lo, hi = min(all_costs), max(all_costs)
    pad = 0.06 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    for col, (constraint, cells) in enumerate(by_constraint.items()):
        colour, name = _style(constraint)
        for row in range(nrows):
            ax = axes[row][col]
            if row >= len(cells):
                ax.axis("off")
                continue
            label, runs = cells[row]
            d = 0.0 if source == "oracle" else runs[0].threshold
            xs, ys = [], []
            for r in runs:
                x, y = paired[id(r)]
                xs += x
                ys += y
            ax.axhspan(d, max(hi, d), color="#d62728", alpha=0.07, lw=0)
            ax.plot([lo, hi], [lo, hi], color="#555555", lw=1, ls=":", label="no change (y = x)")
            ax.axhline(d, color="#d62728", lw=1.2, ls="--", label=f"threshold d = {d:g}")
            ax.axvline(d, color="#d62728", lw=0.8, ls="--", alpha=0.5)
            # identical (before, after) pairs are common with discrete oracle costs: one marker, area ∝ count
            counts = Counter(zip(xs, ys))
            for rose, marker, point_colour, text in ((False, "o", colour, "cost fell or held"),
                                                     (True, "^", "#d62728", "cost rose")):
                marks = [(x, y, n) for (x, y), n in counts.items() if (y > x) == rose]
                ax.scatter([m[0] for m in marks], [m[1] for m in marks], s=[20 * m[2] for m in marks],
                           alpha=0.6, color=point_colour, marker=marker, edgecolor="none", label=text)
            figs = figure_stats([r.summary for r in runs])
            pvr = figs.get(f"{source}/prompt_violation_rate", {}).get("mean", float("nan"))
            inter = figs.get(f"{source}/interference_rate", {}).get("mean", float("nan"))
            before, after = statistics.fmean(xs), statistics.fmean(ys)
            setting = _settings_text(runs[0].settings)
            seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
            ax.set_title(f"{name}" + (f", trained with {setting}" if setting else "") + f" ({seeds})\n"
                         f"mean C̄ {before:+.2f} → {after:+.2f} · violating {pvr:.0%} · interference {inter:.0%}",
                         color=colour, fontsize=10)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal", adjustable="box")
            ax.set_xlabel("C̄(x) before training (initial policy)")
            if col == 0:
                ax.set_ylabel("C̄(x) after training")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color="#555555", lw=1, ls=":", label="no change (y = x)"),
               Line2D([], [], color="#d62728", lw=1.2, ls="--", label="threshold d"),
               Patch(color="#d62728", alpha=0.15, label="violating after training (C̄ > d)"),
               Line2D([], [], color="#777777", marker="o", ls="", ms=6, alpha=0.7,
                      label="prompt whose C̄ fell or held (colour: constraint)"),
               Line2D([], [], color="#d62728", marker="^", ls="", ms=7, alpha=0.8, label="prompt whose C̄ rose"),
               Line2D([], [], color="#777777", marker="o", ls="", ms=10, alpha=0.4,
                      label="larger marker: several prompts × seeds")]
    fig.legend(handles=handles, loc="lower center", ncol=3, framealpha=0.9, fontsize=9)
    what = "oracle cost (ground truth, unsafe when > 0)" if source == "oracle" else "cost model (unsafe when C > d)"
    fig.suptitle(f"Per-prompt mean cost after vs before training — {what}", fontsize=12)
    fig.tight_layout(rect=(0, 0.8 / fig.get_figheight(), 1, 1))  # room for the two-line legend
    save_figure(fig, path, groups, threshold="0 (oracle)" if source == "oracle" else None)
    return None


def _sweep_key(runs: Sequence[Run]) -> tuple[str, str]:
    """The setting a trade-off curve runs along: the threshold when it varies, else the first varying setting."""
    keys = [k for r in runs for k, _ in r.settings]
    if any(k.endswith("threshold") for k in keys) or len({r.threshold for r in runs}) > 1:
        return "threshold", "d"
    return (keys[0], keys[0].split(".")[-1]) if keys else ("", "")


def plot_tradeoff(groups: dict[str, list[Run]], path: Path) -> str | None:
    """Reward against prompt-violation rate, one curve per constraint type through its groups (mean ± std over
    seeds), each point labelled with the swept setting; a panel for the learned models and one for the oracle.
    Drawn only when some constraint has several groups (a swept setting): one point per constraint is no curve."""
    runs = [r for members in groups.values() for r in members]
    sources = [s for s in ("eval", "oracle") if all(f"{s}/prompt_violation_rate" in r.summary for r in runs)]
    if not sources:
        return "some run's summary has no prompt-violation rate"
    per_constraint = Counter(members[0].constraint for members in groups.values())
    if max(per_constraint.values()) < 2:
        return ("no setting was swept: each constraint is one group, one point (a trade-off runs along a swept "
                "setting, e.g. +sweep=threshold or experiment=lambda_sweep)")
    key, short = _sweep_key(runs)
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(sources), figsize=(6.2 * len(sources), 4.8), squeeze=False)
    for ax, source in zip(axes[0], sources):
        by_constraint: dict[str, list] = defaultdict(list)
        for members in groups.values():
            by_constraint[members[0].constraint].append(members)
        for constraint, cells in by_constraint.items():
            colour, name = _style(constraint)
            points = []
            for members in cells:
                figs = figure_stats([r.summary for r in members])
                x, y = figs[f"{source}/prompt_violation_rate"], figs[f"{source}/reward_mean"]
                if key == "threshold":
                    order, text = members[0].threshold, f"{short}={members[0].threshold:g}"
                else:
                    value = dict(members[0].settings).get(key, "")
                    order, text = _as_number(value), f"{short}={value}" if key else ""
                points.append((order, x, y, text))
            points.sort(key=lambda p: (isinstance(p[0], str), p[0]))
            ax.errorbar([p[1]["mean"] for p in points], [p[2]["mean"] for p in points],
                        xerr=rate_error([p[1]["mean"] for p in points], [p[1]["std"] for p in points]),
                        yerr=[p[2]["std"] for p in points], color=colour,
                        marker="o", ms=6, lw=1.8, capsize=3, label=name)
            for _, x, y, text in points:
                if text:
                    ax.annotate(text, (x["mean"], y["mean"]), textcoords="offset points", xytext=(6, 5), fontsize=8,
                                color=colour)
        units = "oracle reward (≥ 0)" if source == "oracle" else "reward-model score"
        truth = "oracle: C̄(x) > 0" if source == "oracle" else "cost model: C̄(x) > d"
        ax.set_xlabel(f"prompt-violation rate (share of prompts with {truth})")
        ax.set_ylabel(f"mean reward ({units})")
        ax.set_title(("Ground truth (oracle)" if source == "oracle" else "Learned reward and cost models")
                     + " — better is up and left")
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xlim(-0.03, min(1.03, max(0.25, ax.get_xlim()[1])))
        ax.legend(loc="best", framealpha=0.9)
    sweep = f"across {short} (labels)" if key else ""
    fig.suptitle(f"Reward vs prompt-violation trade-off {sweep}; error bars: ±1 std over seeds", fontsize=12)
    fig.tight_layout()
    save_figure(fig, path, groups)
    return None


def plot_exploitation(groups: dict[str, list[Run]], path: Path, figure: str = "cost_false_safe_rate") -> str | None:
    """Bars of ``exploit/<figure>/<family>`` per family, one bar per group (mean ± std over seeds, kept in [0, 1];
    a zero drawn as a line at 0, ``draw_bars``)."""
    families = sorted({k.rsplit("/", 1)[1] for members in groups.values() for r in members for k in r.summary
                       if k.startswith(f"exploit/{figure}/")})
    if not families:
        return f"no run has exploit/{figure}/<family> figures (the oracle's, on the synthetic world)"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(families) * max(1, len(groups)) ** 0.5), 4.2))
    width = 0.8 / len(groups)
    top = 0.0
    for g, (label, members) in enumerate(groups.items()):
        figs = figure_stats([r.summary for r in members])
        stats = [figs.get(f"exploit/{figure}/{f}", {"mean": float("nan"), "std": 0.0}) for f in families]
        colour, _ = _style(members[0].constraint)
        draw_bars(ax, [i + (g - (len(groups) - 1) / 2) * width for i in range(len(families))],
                  [s["mean"] for s in stats], [s["std"] for s in stats], width, colour, label,
                  alpha=0.35 + 0.65 * (g + 1) / len(groups))
        top = max([top, *(s["mean"] + s["std"] for s in stats if math.isfinite(s["mean"]))])
    ax.set_ylim(0.0, min(1.0, max(0.05, 1.15 * top)))
    ax.set_xticks(range(len(families)), [f.replace("_", "-") for f in families])
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
    ax.set_ylabel("samples: cost model safe, oracle unsafe")
    ax.set_title("Cost-model exploitation by prompt family (a \"0\" marks a zero bar)")
    ax.legend(loc="best", framealpha=0.9, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, groups)
    return None


def _as_number(value: str) -> float | str:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def plot_training(groups: dict[str, list[Run]], path: Path) -> str | None:
    """λ, mean cost, unsafe rate and reward per step; one line per group (mean over seeds, ±1 std band; the unsafe
    rate's band kept in [0, 1])."""
    if not any(r.steps for members in groups.values() for r in members):
        return ("no run has step metrics (metrics.jsonl or metrics.jsonl.gz with reward/mean); a reference made with "
                "`python -m repo_exp.export` keeps them")
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), squeeze=False)
    shades = _group_shades(groups)
    for ax, (key, ylabel) in zip(axes.flat, TRAINING_PANELS):
        for label, members in groups.items():
            series = defaultdict(list)
            for r in members:
                for row in r.steps:
                    if isinstance(row.get(key), (int, float)):
                        series[row["step"]].append(float(row[key]))
            if not series:
                continue
            steps = sorted(series)
            mean = [statistics.fmean(series[s]) for s in steps]
            std = [statistics.stdev(series[s]) if len(series[s]) > 1 else 0.0 for s in steps]
            colour, linestyle = shades[label]
            ax.plot(steps, mean, color=colour, ls=linestyle, lw=1.8, label=_legend_label(members))
            low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            if key == "cost/unsafe_rate":  # a rate: its band stays in [0, 1]
                low, high = [max(0.0, v) for v in low], [min(1.0, v) for v in high]
            ax.fill_between(steps, low, high, color=colour, alpha=0.15, lw=0)
        if key == "cost/mean":
            for d in sorted({r.threshold for members in groups.values() for r in members
                             if r.constraint != "none"}):
                ax.axhline(d, color="#444444", ls=(0, (4, 4)), lw=0.8, alpha=0.7)
                ax.annotate(f"d = {d:g}", (1.0, d), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                            textcoords="offset points", ha="right", fontsize=8, color="#444444")
        ax.xaxis.set_major_locator(plt.matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.split(" (")[0])
        if key == "cost/unsafe_rate":
            ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][1].get_legend_handles_labels()
    per_constraint = Counter(members[0].constraint for members in groups.values())
    # one legend column per constraint type when each has the same number of groups (column-major fill)
    ncol = len(per_constraint) if len(set(per_constraint.values())) == 1 else min(4, len(labels))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, framealpha=0.9)
    fig.suptitle("Training curves (mean over seeds, band ±1 std; dashed grey lines on the cost panel: thresholds d)",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0.02 + 0.035 * math.ceil(len(labels) / ncol), 1, 1))
    save_figure(fig, path, groups)
    return None


def _group_shades(groups: dict[str, list[Run]]) -> dict[str, tuple[str, str]]:
    """Colour by constraint type, line style by the group's position within it."""
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = defaultdict(int)
    out = {}
    for label, members in groups.items():
        constraint = members[0].constraint
        out[label] = (_style(constraint)[0], styles[seen[constraint] % len(styles)])
        seen[constraint] += 1
    return out


def _legend_label(members: Sequence[Run]) -> str:
    setting = _settings_text(members[0].settings)
    name = _style(members[0].constraint)[1]
    return f"{name}, {setting}" if setting else name


# ------------------------------------------------------------------------------------------------------ writing


def _cell(stats: dict[str, float] | None) -> str:
    if not stats:
        return "–"
    if stats["n"] > 1:
        return f"{stats['mean']:.3f} ± {stats['std']:.3f}"
    return f"{stats['mean']:.3f}"


def markdown(report: dict[str, Any], title: str, figures: dict[str, str]) -> str:
    groups = report["groups"]
    lines = [f"# {title}", "",
             f"{len(report['runs'])} runs in {len(groups)} groups. Cells: mean ± std over seeds (n seeds per group); "
             "every figure of every group is in `report.json`.", ""]
    for prefix, heading in (("eval/", "Learned reward and cost models (`eval/…`, at each run's threshold d)"),
                            ("oracle/", "Ground truth (`oracle/…`, unsafe when the oracle cost > 0)"),
                            ("exploit/", "Exploitation: the learned models against the oracle on the policy's "
                                         "samples (`exploit/…`)")):
        present = [(k, name) for k, name in HEADLINE
                   if k.startswith(prefix) and any(k in g["figures"] for g in groups.values())]
        if not present:
            continue
        lines += [f"### {heading}", ""]
        lines.append("| group | n | " + " | ".join(name for _, name in present) + " |")
        lines.append("|---|---|" + "---|" * len(present))
        for label, g in groups.items():
            cells = " | ".join(_cell(g["figures"].get(k)) for k, _ in present)
            lines.append(f"| {label} | {len(g['seeds'])} | {cells} |")
        lines += ["", "Columns: " + ", ".join(f"{name} = `{k}`" for k, name in present) + ".", ""]
    captions = {
        "interference": "Per-prompt mean cost after training against before (cost model); above the diagonal: "
                        "prompts that became less safe; shaded: violating the threshold after training.",
        "interference_oracle": "The same with the ground-truth oracle cost (unsafe when > 0).",
        "tradeoff": "Reward against the share of prompts that violate the constraint, along the sweep.",
        "training": "λ, mean cost, unsafe rate and reward during training.",
        "exploitation": "Share of samples the cost model calls safe (C ≤ d) while the oracle calls unsafe, per prompt "
                        "family and group (mean over seeds, bars ±1 std): where the policy exploits the cost model.",
        "frontier": "Answerable helpfulness and over-refusal against the share of prompts violating (oracle), each "
                    "method along its own knob, ±1 std over seeds; the star is the initial policy.",
        "frontier_unseen_topics": "The same on whole topics held out of every training stage.",
        "frontier_families": "Refusals and safe helpfulness per prompt family against the overall violation.",
        "frontier_lambda": "The average constraint's λ per step at each threshold, with its cap and floor.",
        "matched": "Each point minus the average constraint at the same violation level, 95 % intervals.",
    }
    for name, file in figures.items():
        lines += [f"## {name.replace('_', ' ')}", "", captions.get(name, ""), "", f"![{name}]({file})", ""]
    if report.get("frontier"):
        from repo_exp import frontier

        lines.append(frontier.markdown(report["frontier"], report.get("matched", [])))
    skipped = report.get("figures_skipped") or {}
    if skipped:
        lines += ["## Figures not drawn", ""] + [f"- `{name}`: {why}" for name, why in skipped.items()] + [""]
    lines += ["## Runs", "", "| run | constraint | d | seed |", "|---|---|---|---|"]
    lines += [f"| `{r['path']}` | {r['constraint']} | {r['threshold']:g} | {r['seed']} |" for r in report["runs"]]
    return "\n".join(lines) + "\n"


def helpfulness_sources(report: dict, constraints: list[str]) -> dict[str, dict[str, float]]:
    """Per constraint: where the oracle helpfulness comes from — earned by safe vs unsafe responses, by family
    (means over the constraint's runs, from ``report[constraint]``)."""
    out = {}
    for constraint in constraints:
        figures = report.get(constraint, {})
        if "oracle/reward_mean" not in figures or "oracle/safe_reward_mean" not in figures:
            continue
        row = {"oracle/unsafe_reward_mean":
               figures["oracle/reward_mean"]["mean"] - figures["oracle/safe_reward_mean"]["mean"]}
        families = sorted(k.rsplit("/", 1)[-1] for k in figures if k.startswith("oracle/reward_mean/")
                          and k.rsplit("/", 1)[-1] in ("benign", "dual_use", "harmful"))
        for family in families:
            for figure in ("reward_mean", "unsafe_rate", "refusal_rate"):
                if f"oracle/{figure}/{family}" in figures:
                    row[f"oracle/{figure}/{family}"] = figures[f"oracle/{figure}/{family}"]["mean"]
        out[constraint] = row
    return out


def table(report: dict, constraints: list[str]) -> str:
    """The summary table: one row per headline figure, mean ± std over seeds per constraint."""
    lines = ["| figure | " + " | ".join(constraints) + " |", "|---|" + "---|" * len(constraints)]
    for key, label in SUMMARY_FIGURES:
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
    needed = ("reward/pairwise_accuracy", "reward/oracle_pairwise_accuracy", "cost/pairwise_accuracy",
              "cost/oracle_pairwise_accuracy", "cost/sign_accuracy", "cost/oracle_sign_accuracy")
    if not all(k in world for k in needed):
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


def comparison_constraints(report: dict[str, Any]) -> list[str]:
    """The constraints of a comparison's runs, average and rectified first."""
    order = ("average", "rectified", "shaping", "none")
    return sorted({r["constraint"] for r in report["runs"]},
                  key=lambda c: (order.index(c) if c in order else len(order), c))


def comparison_appendix(report: dict[str, Any]) -> str:
    """The end of a comparison's ``report.md``: the summary table over seeds, the world's models, and where the
    helpfulness comes from (also kept in ``report["helpfulness_sources"]``)."""
    constraints = comparison_constraints(report)
    report["helpfulness_sources"] = helpfulness_sources(report, constraints)
    seeds = sorted({r["seed"] for r in report["runs"]})
    return (f"\n## Summary (mean ± std over seeds {seeds})\n\n{table(report, constraints)}\n\n"
            f"{models_line(report.get('world') or {})}\n\n## Where the helpfulness comes from\n\n```\n"
            f"{json.dumps(report['helpfulness_sources'], indent=1)}\n```\n")


def run_keys(run: Run) -> list[tuple[str, str]]:
    """What makes two run folders one run: the same W&B run id (``wandb_id.txt``, kept across resumes) or the same
    settings (``.hydra/config.yaml`` without those that do not change the run, ``hydra_job.NOT_THE_RUN``)."""
    keys = [("folder", str(run.path.resolve()))]
    wandb_id = run.path / "wandb_id.txt"
    if wandb_id.is_file() and wandb_id.read_text().strip():
        keys.append(("wandb", wandb_id.read_text().strip()))
    config = run.path / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        from repo_exp.hydra_job import run_settings

        settings = json.dumps(run_settings(OmegaConf.load(config)), sort_keys=True, default=str)
        keys.append(("settings", hashlib.sha256(settings.encode()).hexdigest()))
    return keys


def unique_runs(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """``runs`` with each run once — the most recently finished copy when two folders hold the same run (e.g. a sweep
    started again in new folders) — and the folders left out as copies."""
    seen: set[tuple[str, str]] = set()
    kept: set[int] = set()
    for run in sorted(runs, key=lambda r: -(r.path / "eval" / "summary.json").stat().st_mtime):
        keys = run_keys(run)
        if not seen.intersection(keys):
            kept.add(id(run))
        seen.update(keys)
    duplicates = [str(r.path) for r in runs if id(r) not in kept]
    for path in duplicates:
        log.warning("%s repeats a run already in the report (same folder, W&B id or settings): counted once", path)
    return [r for r in runs if id(r) in kept], duplicates


def read_runs(run_dirs: Sequence[Path | str]) -> tuple[list[Run], list[str], list[str]]:
    """The finished runs under ``run_dirs``, each once (``unique_runs``); the folders left out as unfinished; those
    left out as copies."""
    folders = find_run_dirs(run_dirs)
    runs, skipped = [], []
    for folder in folders:
        run = read_run(folder)
        (runs.append(run) if run is not None else skipped.append(str(folder)))
    if not runs:
        raise NoRunsError(f"none of the {len(folders)} run folders found has eval/summary.json: {skipped[:5]}")
    runs, duplicates = unique_runs(runs)
    return runs, skipped, duplicates


def draw_figures(groups: dict[str, list[Run]], out: Path, fmt: str = "png") -> tuple[dict[str, str], dict[str, str]]:
    """Every figure of the report into ``out`` as ``<name>.<fmt>``: the files drawn, and for each figure not drawn
    the reason."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown figure format {fmt!r}; use one of {list(FORMATS)}")
    plots = [("interference", lambda p: plot_interference(groups, p, "eval")),
             ("interference_oracle", lambda p: plot_interference(groups, p, "oracle")),
             ("tradeoff", lambda p: plot_tradeoff(groups, p)),
             ("training", lambda p: plot_training(groups, p)),
             ("exploitation", lambda p: plot_exploitation(groups, p))]
    figures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, plot in plots:
        why = plot(out / f"{name}.{fmt}")
        if why is None:
            figures[name] = f"{name}.{fmt}"
        else:
            skipped[name] = why
            log.warning("figure %s not drawn: %s", name, why)
    return figures, skipped


DEFAULT_TITLE = "repo_exp comparison"
# what a comparison's sweep adds to its report and the runs alone cannot give again (the world's model accuracies come
# from the world's cache): kept when the report is drawn again over the same runs
KEPT_KEYS = ("world", "overrides", "seconds")


def _run_paths(report: dict[str, Any], folder: Path) -> list[str]:
    """The report's run folders as absolute paths (a report writes those under its own folder relative to it)."""
    return sorted(str((folder / r["path"]).resolve()) for r in report.get("runs", []) if r.get("path"))


def _kept_from(previous: Sequence[Path], report: dict[str, Any], out: Path, title_given: bool) -> dict[str, Any]:
    """From the first ``report.json`` of ``previous`` (the output folder's, then the source folder's) that reported
    the same runs, what ``KEPT_KEYS`` (and the title, unless one was given) held; {} when none did. So a report drawn
    again elsewhere (``--out``) keeps what the sweep's own report said about its world."""
    mine = _run_paths(report, out)
    for path in previous:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _run_paths(old, path.parent) == mine:
            break
    else:
        return {}
    kept = {k: old[k] for k in KEPT_KEYS if k in old}
    if not title_given and old.get("title"):
        kept["title"] = old["title"]
    return kept


def build_report(run_dirs: Sequence[Path | str], out_dir: Path | str, title: str = DEFAULT_TITLE,
                 write: bool = True, fmt: str = "png", replicates: int = 2000) -> dict[str, Any]:
    """Read the runs under ``run_dirs``, write ``report.json``, ``report.md`` and the figures (``fmt``: png, svg or
    pdf) to ``out_dir`` (with ``write=False`` only the figures: the caller adds to the report, then calls
    ``write_report``).

    Returns the report dict: ``report[constraint][figure] == {"mean", "std", "n"}`` for each constraint type
    present, plus ``groups``, ``runs``, ``figures``, ``figures_skipped`` (name: why), ``skipped`` and ``title``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, skipped, duplicates = read_runs(run_dirs)
    groups = group_runs(runs)
    report = aggregate(runs, groups)
    figures, figures_skipped = draw_figures(groups, out, fmt)
    from repo_exp import frontier

    if frontier.has_frontier(runs):  # methods swept along their knobs: the frontier and the matched comparison
        report["frontier"], report["matched"] = frontier.frontier_section(runs, replicates)
        figures.update(frontier.write_figures(report["frontier"], report["matched"], runs, out, fmt))
    for entry in report["runs"]:  # paths under the report folder are written relative to it, so it can move
        path = Path(entry["path"]).resolve()
        if path.is_relative_to(out.resolve()):
            entry["path"] = str(path.relative_to(out.resolve()))
    report.update({"title": title, "figures": figures, "figures_skipped": figures_skipped, "skipped": skipped,
                   "duplicates": duplicates})
    sources = [Path(d) / "report.json" for d in run_dirs] if len(run_dirs) == 1 else []
    report.update(_kept_from([out / "report.json", *sources], report, out, title_given=title != DEFAULT_TITLE))
    if write:
        write_report(report, out)
    log.info("report of %d runs (%d groups) in %s", len(runs), len(report["groups"]), out)
    return report


def write_report(report: dict[str, Any], out_dir: Path | str, appendix: str | None = None) -> None:
    """``report.json`` (replaced whole, never half-written) and ``report.md`` (the tables, figures and runs of
    ``markdown``, then ``appendix``; for a comparison, one with ``report["world"]``, its summary by default) in
    ``out_dir``."""
    out = Path(out_dir)
    if appendix is None:
        appendix = comparison_appendix(report) if "world" in report else ""
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    (out / "report.md").write_text(markdown(report, report["title"], report["figures"]) + appendix)


def against_reference(runs: Sequence[Run], reference: Sequence[Run],
                      figures: Sequence[tuple[str, str]] = SUMMARY_FIGURES) -> list[dict[str, Any]]:
    """Figure by figure and constraint by constraint, whether ``runs`` reproduce ``reference``: the difference of the
    means over seeds within twice its standard error, ``2·sqrt(s_a²/n_a + s_b²/n_b)`` (the seeds' spread), or within
    ``AGREEMENT_FLOOR``. One row per figure both hold: ``{constraint, figure, label, reference, fresh, difference,
    allowed, reproduced}``."""
    rows = []
    constraints = sorted({r.constraint for r in runs} & {r.constraint for r in reference}, key=_constraint_rank)
    for constraint in constraints:
        fresh = figure_stats([r.summary for r in runs if r.constraint == constraint])
        ref = figure_stats([r.summary for r in reference if r.constraint == constraint])
        for key, label in figures:
            if key not in fresh or key not in ref:
                continue
            a, b = ref[key], fresh[key]
            allowed = max(AGREEMENT_FLOOR, 2.0 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]))
            difference = b["mean"] - a["mean"]
            rows.append({"constraint": constraint, "figure": key, "label": label, "reference": a, "fresh": b,
                         "difference": difference, "allowed": allowed, "reproduced": abs(difference) <= allowed})
    return rows


def setting_differences(runs: Sequence[Run], reference: Sequence[Run], most: int = 5) -> list[str]:
    """Per constraint both hold, the settings that change a run (``repo_exp.run_folder``: seeds, paths, logging and
    the other harmless keys left out) in which the first of ``runs`` differs from the first of ``reference``, as
    ``"constraint: key: reference → this"``; at most ``most`` per constraint."""
    from omegaconf import OmegaConf

    from repo_exp.run_folder import changed_settings, harmless

    def settings(run: Run) -> dict:
        return OmegaConf.to_container(run.cfg, resolve=False) if run.cfg is not None else {}

    notes = []
    for constraint in sorted({r.constraint for r in runs} & {r.constraint for r in reference}, key=_constraint_rank):
        mine = next(r for r in runs if r.constraint == constraint)
        theirs = next(r for r in reference if r.constraint == constraint)
        new = settings(mine)
        changes = [(k, a, b) for k, a, b in changed_settings(settings(theirs), new)
                   if not harmless(k, new) and k != "seed" and not k.endswith((".seed", "_dir", ".path"))]
        notes += [f"{constraint}: {k}: {a!r} → {b!r}" for k, a, b in changes[:most]]
    return notes


def agreement_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of ``against_reference`` as a table, one line each."""
    lines = [f"{'constraint':<11} {'figure':<38} {'reference':>17} {'this run':>17} {'diff':>7} {'allowed':>7}"]
    for r in rows:
        ref, new = r["reference"], r["fresh"]
        lines.append(f"{r['constraint']:<11} {r['label']:<38} {ref['mean']:>7.3f} ± {ref['std']:.3f} (n {ref['n']}) "
                     f"{new['mean']:>7.3f} ± {new['std']:.3f} (n {new['n']}) {r['difference']:>+7.3f} "
                     f"{r['allowed']:>7.3f}  {'ok' if r['reproduced'] else 'DIFFERS'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repo_exp.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run folders or folders holding runs (multirun sweeps, "
                                                           "outputs/<name>, results/<name>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for report.json, report.md and the figures (default: the one DIR given)")
    parser.add_argument("--title", default=DEFAULT_TITLE)
    parser.add_argument("--format", choices=FORMATS, default="png", help="figure file format (default png)")
    parser.add_argument("--against", type=Path, default=None, metavar="REFERENCE",
                        help="reference results (e.g. results/default): say, figure by figure, whether these runs "
                             "reproduce them within their seeds' spread; exit 1 when some figure differs")
    args = parser.parse_args(argv)
    if args.out is None and len(args.dirs) != 1:
        parser.error("--out is required when several folders are given")
    out = args.out if args.out is not None else args.dirs[0]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = build_report(args.dirs, out, title=args.title, fmt=args.format)
        reference = read_runs([args.against])[0] if args.against is not None else None
    except (FileNotFoundError, NoRunsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"{len(report['runs'])} runs → {out / 'report.md'}; figures: {', '.join(report['figures']) or 'none'}")
    for name, why in report["figures_skipped"].items():
        print(f"not drawn: {name}: {why}")
    if reference is None:
        return
    runs = read_runs(args.dirs)[0]
    rows = against_reference(runs, reference)
    if not rows:
        parser.exit(2, f"error: {args.against} and these runs share no constraint with a summary figure\n")
    differences = setting_differences(runs, reference)
    if differences:
        print(f"\nnote: these runs were made with other settings than {args.against} ({'; '.join(differences)}): a "
              f"figure that differs below may differ for that reason, not as a failure to reproduce")
    print(f"\nAgainst {args.against} (difference of means allowed: twice its standard error over seeds, at least "
          f"{AGREEMENT_FLOOR}):\n{agreement_table(rows)}")
    differing = [f"{r['constraint']} {r['label']}" for r in rows if not r["reproduced"]]
    if differing:
        print(f"\nNOT REPRODUCED: {len(differing)} of {len(rows)} figures differ beyond the seeds' spread: "
              f"{'; '.join(differing)}")
        raise SystemExit(1)
    print(f"\nREPRODUCED: all {len(rows)} figures within the reference's seeds' spread")


if __name__ == "__main__":
    main()
