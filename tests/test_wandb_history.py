"""W&B offline: a run that crashed past its last checkpoint and was resumed has a W&B history equal to its
``metrics.jsonl`` step for step (the resumed run rewinds the W&B run to the checkpoint's step); step axes and the job
type are declared; the final checkpoint can be logged as an artifact. The offline ``.wandb`` files are read with
W&B's own record protobuf."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import pytest
from reliability_support import make_trainer, metric_rows

WANDB = ("logger=wandb", "logger.mode=offline", "trainer.total_steps=4", "trainer.save_every=2")
INTERNAL = {"_step", "_runtime", "_timestamp", "_wandb", "train/step"}


def wandb_records(path: Path):
    """The records of an offline ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    chunks in 32 KiB blocks (checksum 4, length 2, type 1: full 1 / first 2 / middle 3 / last 4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero padding at the end
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(path: Path) -> dict:
    """History rows by step (internal keys dropped), the run record, the metric declarations and artifacts."""
    history, run, metrics, artifacts, exited = {}, None, [], [], False
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if k not in INTERNAL}
        elif kind == "run" and run is None:
            run = record.run
        elif kind == "metric":
            metrics.append((record.metric.name or record.metric.glob_name, record.metric.step_metric))
        elif kind == "artifact":
            artifacts.append(record.artifact)
        elif kind == "exit":
            exited = True
    return {"history": history, "run": run, "metrics": metrics, "artifacts": artifacts, "exited": exited}


def branch_point(run) -> dict | None:
    for item in run.config.update:
        if item.key == "_wandb":
            return json.loads(item.value_json).get("branch_point")
    return None


def jsonl_by_step(run_dir: Path) -> dict[int, dict]:
    rows: dict[int, dict] = defaultdict(dict)
    for row in metric_rows(run_dir):
        rows[row.pop("step")].update(row)
    return dict(rows)


def offline_runs(run_dir: Path, expected: int) -> list[dict]:
    """The offline runs of ``run_dir`` in the order they started, each read once W&B's writer has finished it (its
    service process writes the file asynchronously: wait for the exit record)."""
    deadline = time.monotonic() + 60
    while True:
        files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # named by start time
        runs = [read_run(f) for f in files]
        if (len(runs) == expected and all(r["run"] is not None and r["exited"] for r in runs)) or (
                time.monotonic() > deadline):
            return runs
        time.sleep(0.5)


def test_a_resumed_run_has_a_wandb_history_equal_to_metrics_jsonl(smoke_cfg, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = make_trainer(smoke_cfg, run_dir, *WANDB)
    step_once = trainer.train_step

    def crash_after_step_3(step: int):
        metrics = step_once(step)
        if step == 2:
            raise RuntimeError("the node was lost")
        return metrics

    monkeypatch.setattr(trainer, "train_step", crash_after_step_3)
    with pytest.raises(RuntimeError, match="node was lost"):
        trainer.fit()
    resumed = make_trainer(smoke_cfg, run_dir, *WANDB, "trainer.resume=auto")
    assert resumed.start_step == 2  # the checkpoint of step 2; step 3 is redone
    resumed.fit()

    first, second = offline_runs(run_dir, expected=2)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert sorted(first["history"]) == [1, 2, 3]  # step 3 was logged past the checkpoint, then lost
    assert branch_point(first["run"]) is None
    assert branch_point(second["run"]) == {"run_id": run_id, "step": 2}  # the resumed run rewinds to step 2
    # W&B's history after the rewind: the first run's rows up to the branch point, then the resumed run's
    rewound = {s: row for s, row in first["history"].items() if s <= 2} | second["history"]
    expected = jsonl_by_step(run_dir)
    assert sorted(expected) == [1, 2, 3, 4] and len(expected[3]) > 10
    assert rewound == expected
    assert first["history"][3]["reward/mean"] == expected[3]["reward/mean"]  # the redone step is the same step

    for run in (first, second):
        assert run["run"].job_type == "train"
        assert ("train/step", "") in run["metrics"] and ("*", "train/step") in run["metrics"]
        assert ("eval/*", "eval/step") in run["metrics"]
    assert not second["artifacts"]  # off by default


def test_the_final_checkpoint_is_logged_as_an_artifact_when_asked(smoke_cfg, tmp_path):
    run_dir = tmp_path / "run"
    make_trainer(smoke_cfg, run_dir, *WANDB, "trainer.total_steps=1", "logger.log_checkpoint=true").fit()
    (run,) = offline_runs(run_dir, expected=1)
    (artifact,) = run["artifacts"]
    assert artifact.type == "model" and artifact.name.startswith("checkpoint-")
    assert {"latest", "step_1"} <= set(artifact.aliases)
    paths = {entry.path for entry in artifact.manifest.contents}
    assert "state.json" in paths and any(p.startswith("policy/") for p in paths)
