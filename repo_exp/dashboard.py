"""A W&B workspace that shows where each constraint put the safety, grouped by constraint type.

``python -m repo_exp.dashboard --entity E --project P [--group GROUP] [--name NAME]`` saves a workspace
(``wandb-workspaces``) with the panels of ``python -m repo_exp.report``, drawn from the runs' logged metrics:

- *Safety interference*: reward against prompt-violation rate (learned models and oracle), compensation,
  interference, violation and slack mass, safe reward, the per-prompt mean cost histogram and the per-prompt table
  of the final evaluation;
- *Training*: λ, mean cost, unsafe rate, reward, violation mean, active rate and KL per step, mean ± std over the
  runs of each constraint type;
- *Synthetic world (oracle)*: violation, refusal and unsafe rates per prompt family.

Runs are grouped by ``constraint.name`` (their logged config); ``--group`` keeps the runs of one sweep: its W&B
group, or the sweep folder itself, turned into that group the way the runs named it (``loggers.sweep_group``: the
folder's path relative to where the sweep was started, e.g. ``outputs/default/runs``).

``--dry-run`` prints the workspace it would save and ``--export FILE`` writes its full description as JSON, both
offline (no key, no network). ``build_workspace`` only builds the description; ``main`` saves it unless asked not to.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from repo_exp.world.grammar import FAMILIES

TRAINING_METRICS = (
    ("constraint/lambda", "multiplier λ"),
    ("cost/mean", "mean cost C"),
    ("cost/unsafe_rate", "unsafe rate (C > d)"),
    ("reward/mean", "mean reward R"),
    ("cost/violation_mean", "violation E[(C − d)⁺]"),
    ("constraint/active_rate", "share of samples with a cost gradient"),
    ("kl/mean", "KL(π ‖ π_ref) per response"),
    ("oracle/unsafe_rate", "oracle unsafe rate"),
)
EVAL_BARS = (
    ("eval/compensation", "compensation (mean C̄ ≤ d while prompts violate)"),
    ("eval/interference_rate", "interference rate"),
    ("eval/violation_mass", "violation mass  mean (C̄ − d)⁺"),
    ("eval/slack_mass", "slack mass  mean (d − C̄)⁺"),
    ("eval/safe_reward_mean", "safe reward  R·1[C ≤ d]"),
    ("eval/unsafe_rate", "unsafe samples"),
    ("eval/cvar10_cost", "CVaR10 of C̄(x)"),
    ("eval/win_rate", "win rate vs initial"),
)
GROUP_KEY = "constraint.name"


def build_workspace(entity: str, project: str, name: str = "repo_exp: safety interference",
                    group: str | None = None):
    """The workspace description (``wandb_workspaces.workspaces.Workspace``); nothing is sent anywhere."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def line(metric: str, title: str):
        return wr.LinePlot(title=title, x="Step", y=[metric], title_x="RL step", title_y=title,
                           groupby_aggfunc="mean", groupby_rangefunc="stddev", smoothing_type="none")

    def bar(metric: str, title: str):
        return wr.BarPlot(title=title, metrics=[metric], orientation="v", groupby_aggfunc="mean",
                          groupby_rangefunc="stddev")

    interference = ws.Section(
        name="Safety interference (evaluation)", is_open=True,
        panels=[
            wr.MarkdownPanel(markdown=(
                "Each point is a run's final evaluation: **up and left is better**. `eval/` figures use the learned "
                "reward and cost models at the run's threshold d; `oracle/` figures the synthetic world's ground "
                "truth. *Compensation*: the average constraint holds while some prompts violate it; *interference*: "
                "prompts whose mean cost rose although the mean fell.")),
            *(wr.ScatterPlot(title=f"reward vs prompt-violation rate ({what})",
                             x=wr.SummaryMetric(f"{prefix}/prompt_violation_rate"),
                             y=wr.SummaryMetric(f"{prefix}/reward_mean"))
              for prefix, what in (("eval", "learned models"), ("oracle", "oracle"))),
            *(bar(metric, title) for metric, title in EVAL_BARS),
            line("eval/prompt_mean_cost", "per-prompt mean cost C̄(x) (histogram per evaluation)"),
            wr.WeavePanelSummaryTable(table_name="eval/per_prompt/final"),
        ],
    )
    training = ws.Section(name="Training", is_open=True,
                          panels=[line(metric, title) for metric, title in TRAINING_METRICS])
    oracle = ws.Section(
        name="Synthetic world by prompt family (oracle)", is_open=False,
        panels=[bar(f"oracle/{figure}/{family}", f"{label}: {family}")
                for figure, label in (("prompt_violation_rate", "prompts violating"),
                                      ("refusal_rate", "refusal rate"), ("unsafe_rate", "unsafe samples"))
                for family in FAMILIES]
        + [bar("oracle/benign_refusal_rate", "refusals where a safe helpful answer exists")],
    )
    runset = ws.RunsetSettings(groupby=[ws.Config(GROUP_KEY)],
                               filters=ws.And(ws.Metric("Group") == group) if group else "")
    return ws.Workspace(entity=entity, project=project, name=name, sections=[interference, training, oracle],
                        settings=ws.WorkspaceSettings(x_axis="Step", max_runs=100),
                        runset_settings=runset)


def group_name(value: str | None) -> str | None:
    """The W&B group ``--group`` means: a sweep folder that exists becomes the group its runs logged under
    (``loggers.sweep_group``); anything else is taken as a group name."""
    if value is None:
        return None
    from repo_exp.loggers import sweep_group

    return sweep_group(Path(value)) if Path(value).is_dir() else value


def describe(workspace) -> dict[str, Any]:
    """The workspace description as plain JSON (what ``save`` would send)."""
    return json.loads(json.dumps(workspace._to_model().model_dump(by_alias=True), default=str))


def _panel_metrics(panel) -> str:
    """What a panel draws: its metrics (x against y for a scatter plot), its table, or "text"."""
    if getattr(panel, "table_name", None):
        return f"table {panel.table_name}"
    x, y = getattr(panel, "x", None), getattr(panel, "y", None)
    if hasattr(x, "name") and hasattr(y, "name"):
        return f"{y.name} against {x.name}"
    metrics = y if isinstance(y, (list, tuple)) else getattr(panel, "metrics", None)
    return ", ".join(str(m) for m in metrics) if metrics else "text"


def outline(workspace, group: str | None) -> str:
    """The workspace in a few lines: where it goes, which runs, and each section's panels."""
    lines = [f"workspace {workspace.name!r} in {workspace.entity}/{workspace.project}",
             f"runs: {'W&B group ' + repr(group) if group else 'every run of the project'}, grouped by {GROUP_KEY}"]
    for section in workspace.sections:
        lines.append(f"section {section.name!r}:")
        for panel in section.panels:
            lines.append(f"  {type(panel).__name__}: {_panel_metrics(panel)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m repo_exp.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entity", default=None,
                        help="W&B entity (user or team); required to save, optional with --dry-run/--export")
    parser.add_argument("--project", default="repo_exp", help="W&B project the runs log to (logger.project)")
    parser.add_argument("--name", default="repo_exp: safety interference", help="workspace (view) name")
    parser.add_argument("--group", default=None,
                        help="only the runs of one sweep: its W&B group, or its sweep folder (e.g. outputs/default/runs, "
                             "multirun/2026-01-01/12-00-00): each run of a sweep logs under the folder's path relative "
                             "to where the sweep was started, or, for a folder elsewhere, its name and a hash")
    parser.add_argument("--dry-run", action="store_true", help="print the workspace instead of saving it (offline)")
    parser.add_argument("--export", type=Path, default=None, metavar="FILE",
                        help="write the workspace's full description as JSON to FILE instead of saving it (offline)")
    args = parser.parse_args(argv)
    offline = args.dry_run or args.export is not None
    if args.entity is None and not offline:
        parser.error("--entity is required to save the workspace (or use --dry-run / --export FILE)")
    group = group_name(args.group)
    workspace = build_workspace(args.entity or "ENTITY", args.project, args.name, group)
    if args.export is not None:
        args.export.parent.mkdir(parents=True, exist_ok=True)
        args.export.write_text(json.dumps(describe(workspace), indent=1))
        print(f"workspace description written to {args.export}")
    if args.dry_run:
        print(outline(workspace, group))
    if offline:
        return
    saved = workspace.save()
    print(f"workspace saved: {saved.url}")


if __name__ == "__main__":
    main()
