"""The W&B workspace description, built offline: sections, panels, metrics and the grouping by constraint type."""

from __future__ import annotations

import json
import socket

import pytest

from repo_exp.dashboard import build_workspace, main


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the workspace description must be built without network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _panels(workspace, section: str) -> list:
    (match,) = [s for s in workspace.sections if s.name.startswith(section)]
    return match.panels


def test_sections_and_panels_mirror_the_report():
    import wandb_workspaces.reports.v2 as wr

    w = build_workspace("team", "proj")
    assert (w.entity, w.project) == ("team", "proj")
    assert [s.name for s in w.sections] == ["Safety interference (evaluation)", "Training",
                                            "Synthetic world by prompt family (oracle)"]
    evaluation = _panels(w, "Safety interference")
    scatters = [p for p in evaluation if isinstance(p, wr.ScatterPlot)]
    # the trade-off: reward against prompt-violation rate, for the learned models and for the oracle
    assert {(p.x.name, p.y.name) for p in scatters} == {("eval/prompt_violation_rate", "eval/reward_mean"),
                                                        ("oracle/prompt_violation_rate", "oracle/reward_mean")}
    bars = {p.metrics[0] for p in evaluation if isinstance(p, wr.BarPlot)}
    assert {"eval/compensation", "eval/interference_rate", "eval/violation_mass", "eval/slack_mass",
            "eval/safe_reward_mean"} <= bars
    lines = {m for p in evaluation if isinstance(p, wr.LinePlot) for m in p.y}
    assert "eval/prompt_mean_cost" in lines  # the histogram of per-prompt mean cost the trainer logs
    tables = [p for p in evaluation if isinstance(p, wr.WeavePanelSummaryTable)]
    assert [t.table_name for t in tables] == ["eval/per_prompt/final"]
    training = _panels(w, "Training")
    assert all(isinstance(p, wr.LinePlot) for p in training)
    plotted = [p.y[0] for p in training]
    assert plotted[:4] == ["constraint/lambda", "cost/mean", "cost/unsafe_rate", "reward/mean"]
    assert all(p.groupby_aggfunc == "mean" and p.groupby_rangefunc == "stddev" for p in training)
    family_bars = {p.metrics[0] for p in _panels(w, "Synthetic world")}
    assert "oracle/prompt_violation_rate/harmful" in family_bars and "oracle/benign_refusal_rate" in family_bars


def test_runs_are_grouped_by_constraint_type_and_optionally_one_sweep():
    spec = json.loads(json.dumps(build_workspace("e", "p", group="threshold_sweep")._to_model()
                                 .model_dump(by_alias=True), default=str))
    text = json.dumps(spec)
    # W&B stores nested config keys as <key>.value.<field>
    assert '"grouping": [{"section": "config", "name": "constraint.value.name"}]' in text
    assert '{"key": {"section": "run", "name": "group"}, "op": "=", "value": "threshold_sweep"' in text
    unfiltered = json.dumps(build_workspace("e", "p")._to_model().model_dump(by_alias=True), default=str)
    assert "threshold_sweep" not in unfiltered and '"name": "group"}, "op"' not in unfiltered


def test_cli_saves_the_built_workspace(monkeypatch, capsys):
    import wandb_workspaces.workspaces as ws

    saved = []

    class Saved:
        url = "https://wandb.example/view"

    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or Saved())
    main(["--entity", "e", "--project", "p", "--group", "g1", "--name", "my view"])
    assert saved[0].name == "my view" and saved[0].project == "p"
    assert "https://wandb.example/view" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--project", "p"])  # --entity is required


def test_dry_run_and_export_write_the_workspace_offline_without_a_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    main(["--dry-run", "--group", "outputs/default/runs"])
    out = capsys.readouterr().out
    assert "workspace 'repo_exp: safety interference' in ENTITY/repo_exp" in out
    assert "runs: W&B group 'outputs/default/runs', grouped by constraint.name" in out
    assert "ScatterPlot: oracle/reward_mean against oracle/prompt_violation_rate" in out
    assert "LinePlot: constraint/lambda" in out and "table eval/per_prompt/final" in out
    target = tmp_path / "workspace.json"
    main(["--export", str(target), "--entity", "team", "--group", "g"])
    spec = json.loads(target.read_text())
    assert spec["entity"] == "team" and spec["displayName"] == "repo_exp: safety interference"
    assert '"value": "g"' in json.dumps(spec)


def test_a_sweep_folder_given_as_group_is_the_group_its_runs_logged_under(tmp_path, monkeypatch):
    """Runs of a sweep log under ``loggers.sweep_group(sweep folder)``; ``--group FOLDER`` means that same group."""
    from repo_exp.dashboard import group_name
    from repo_exp.loggers import sweep_group

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "outputs" / "default" / "runs"
    folder.mkdir(parents=True)
    assert group_name("outputs/default/runs") == sweep_group(folder) == "outputs/default/runs"
    elsewhere = tmp_path.parent / f"{tmp_path.name}-other" / "runs"
    elsewhere.mkdir(parents=True)
    assert group_name(str(elsewhere)) == sweep_group(elsewhere) and group_name(str(elsewhere)).startswith("runs-")
    assert group_name("a-group-name") == "a-group-name" and group_name(None) is None
