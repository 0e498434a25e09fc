"""Checkpoints: atomic publication, size and SHA-256 checks, fallback to the previous checkpoint, per-rank RNG states,
and a resumed trainer that skips a truncated newest checkpoint."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from repo_exp.checkpoint import (CheckpointManager, check_checkpoint, load_rng_states, save_rng_states, step_of,
                                 verify)

from reliability_support import make_trainer, metric_rows


def writer(payload: bytes):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub" / "state.json").write_text("{}")

    return write


def test_manifest_records_size_and_hash_and_verify_detects_each_fault(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=5)
    folder = manager.save(3, writer(b"x" * 1000))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == {"weights.bin", "sub/state.json"}
    assert manifest["files"]["weights.bin"]["size"] == 1000
    assert verify(folder) is None

    data = folder / "weights.bin"
    data.write_bytes(b"x" * 999 + b"y")  # same size, one byte flipped
    assert "does not match its recorded SHA-256" in verify(folder)
    data.write_bytes(b"x" * 10)
    assert verify(folder) == "weights.bin has 10 bytes, 1000 were written"
    data.unlink()
    assert verify(folder) == "weights.bin is missing"
    (folder / "manifest.json").unlink()
    assert "no manifest.json" in verify(folder)


def test_a_write_interrupted_before_publication_leaves_no_step_folder(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    manager.save(1, writer(b"a"))

    def dies(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt  # the process is stopped in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        manager.save(2, dies)
    assert [p.name for p in manager.checkpoints()] == ["step_000001"]
    assert manager.latest_complete() == manager.folder(1)
    # the next save clears the leftover temporary folder
    manager.save(3, writer(b"c"))
    assert not list(manager.root.glob(".tmp_*"))


def test_keep_last_prunes_the_oldest(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (1, 2, 3, 4):
        manager.save(step, writer(bytes([step])))
    assert [step_of(p) for p in manager.checkpoints()] == [3, 4]


def test_latest_complete_skips_a_truncated_newest_checkpoint_with_a_warning(tmp_path, caplog):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=3)
    for step in (1, 2):
        manager.save(step, writer(b"w" * 100))
    newest = manager.folder(2) / "weights.bin"
    newest.write_bytes(newest.read_bytes()[:40])
    with caplog.at_level(logging.WARNING, logger="repo_exp.checkpoint"):
        assert manager.latest_complete() == manager.folder(1)
    assert f"skipping checkpoint {manager.folder(2)}: weights.bin has 40 bytes, 100 were written" in caplog.text


def test_rotation_after_a_resume_keeps_the_good_checkpoint_and_moves_the_skipped_one_aside(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (40, 41):
        manager.save(step, writer(b"w" * 100))
    (manager.folder(41) / "weights.bin").write_bytes(b"w" * 10)  # cut: the resume goes back to step 40
    assert manager.latest_complete() == manager.folder(40)
    manager.save(42, writer(b"w" * 100))
    assert [step_of(p) for p in manager.checkpoints()] == [40, 42]  # not [41 (corrupt), 42]
    assert all(verify(p) is None for p in manager.checkpoints())
    aside = manager.root / "rejected" / "step_000041"
    assert (aside / "weights.bin").read_bytes() == b"w" * 10  # kept, not deleted
    manager.save(43, writer(b"w" * 100))
    assert [step_of(p) for p in manager.checkpoints()] == [42, 43] and aside.is_dir()


def test_rng_states_round_trip_per_rank(tmp_path):
    def draw() -> tuple:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_rng_states(tmp_path, rank=0)
    expected_rank0 = draw()
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    save_rng_states(tmp_path, rank=1)
    expected_rank1 = draw()
    assert {p.name for p in tmp_path.iterdir()} == {"rng.pt", "rng_rank1.pt"}

    assert load_rng_states(tmp_path, rank=0)
    assert draw() == expected_rank0
    assert load_rng_states(tmp_path, rank=1)
    assert draw() == expected_rank1
    before = torch.get_rng_state()
    assert not load_rng_states(tmp_path, rank=2)  # written by two ranks: rank 2 keeps its own stream
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------------------------- through the trainer


PERIODIC = ("trainer.save_every=1", "trainer.keep_last=3", "trainer.total_steps=3", "constraint=average")


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_truncated(smoke_cfg, tmp_path, caplog):
    run_dir = tmp_path / "run"
    make_trainer(smoke_cfg, run_dir, *PERIODIC).fit()
    manager = CheckpointManager(run_dir / "checkpoints")
    assert [step_of(p) for p in manager.checkpoints()] == [1, 2, 3]
    weights = manager.folder(3) / "policy" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:  # what a kill during a copy or a full disk leaves
        f.truncate(size // 2)

    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(smoke_cfg, run_dir, *PERIODIC, "trainer.resume=auto")
    assert trainer.start_step == 2
    assert (f"skipping checkpoint {manager.folder(3)}: policy/model.safetensors has {size // 2} bytes, {size} were "
            f"written") in caplog.text
    # λ and the cost window are those of step 2
    saved = json.loads((manager.folder(2) / "state.json").read_text())["constraint"]
    assert trainer.constraint.state_dict() == saved
    trainer.fit()  # step 3 is redone and its checkpoint rewritten whole
    assert verify(manager.folder(3)) is None
    assert [row["step"] for row in metric_rows(run_dir)] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.orphaned.jsonl").read_text().splitlines()] == [3]


def test_an_explicit_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    manager = CheckpointManager(tmp_path / "ckpt")
    folder = manager.save(1, writer(b"z" * 64))
    (folder / "weights.bin").write_bytes(b"z" * 63 + b"!")
    with pytest.raises(ValueError, match=r"trainer.resume=.* is not a complete checkpoint: weights.bin does not match"):
        check_checkpoint(folder, "trainer.resume")
