"""No code runs from any file a run is given, and a run writes nothing outside its folder and the project cache.

A pickled payload (``RunsCodeOnLoad``: unpickling it creates a marker file) is planted in each kind of file the run
reads beside safetensors: DeepSpeed's model and optimizer states, the tokenizer files of a model folder, and a
checkpoint's ``state.json`` (``.bin`` weights, ``<engine>.optim.pt`` and ``rng.pt`` are covered in
``test_safety.py``). Every time the run refuses, naming the file, and the marker never appears.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from repo_exp.checkpoint import write_manifest
from repo_exp.models.weights import DEEPSPEED_GLOBALS, UnsafeCheckpointError, check_pickles

from reliability_support import checkpoint, cli, make_trainer  # noqa: F401  (a fixture)
from test_safety import RunsCodeOnLoad, malicious_bin


def pickled_payload(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"payload": RunsCodeOnLoad(marker)}, path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_a_payload_in_a_model_folders_tokenizer_files_never_runs(name, checkpoint, smoke_cfg, tmp_path):
    folder, marker = tmp_path / "policy", tmp_path / "ran"
    shutil.copytree(checkpoint / "policy", folder)
    pickled_payload(folder / name, marker)
    # each tokenizer file is JSON: a pickle there is unreadable, never unpickled
    with pytest.raises(ValueError, match=rf"cannot read the tokenizer at '{folder}': one of its files is not UTF-8"):
        make_trainer(smoke_cfg, tmp_path / "run", "model.source=hub", f"model.path={folder}", "model.tokenizer=null")
    assert not marker.exists()


def test_a_payload_as_state_json_never_runs(checkpoint, smoke_cfg, tmp_path):
    folder, marker = tmp_path / "step_000002", tmp_path / "ran"
    shutil.copytree(checkpoint, folder)
    pickled_payload(folder / "state.json", marker)
    write_manifest(folder, 2)  # whoever supplies the folder writes the manifest too
    with pytest.raises(ValueError):
        make_trainer(smoke_cfg, tmp_path / "run", f"trainer.resume={folder}")
    assert not marker.exists()


def test_deepspeeds_own_globals_pass_and_any_other_is_refused(tmp_path):
    """The scan lets through exactly what DeepSpeed pickles (ZeRO stage enum, loss scaler, fragment addresses)."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    good = tmp_path / "good" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    good.parent.mkdir()
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.gradients, "state": torch.zeros(2)}}, good)
    check_pickles(good.parent)
    assert "deepspeed.runtime.zero.config.ZeroStageEnum" in DEEPSPEED_GLOBALS
    marker = tmp_path / "ran"
    malicious_bin(tmp_path / "bad" / "deepspeed" / "actor" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"mp_rank_00_model_states.pt: it pickles objects other than "
                                                    r"tensors and plain containers.*posix.system"):
        check_pickles(tmp_path / "bad")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.parametrize("target", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_payload_in_a_real_deepspeed_checkpoint_never_runs(target, tmp_path):
    """A ZeRO-2 run's checkpoint (on the CPU), a payload added to one of DeepSpeed's files and the manifest rewritten:
    the resume is refused before DeepSpeed's loader (``torch.load(weights_only=False)``) sees the file."""
    run, marker = tmp_path / "run", tmp_path / "ran"
    base = ("experiment=smoke", "logger=none", "trainer.progress=false", "trainer.num_threads=1", "eval.at_start=false",
            "eval.at_end=false", "deepspeed=zero2", "deepspeed.bf16=false", "trainer.total_steps=1")
    done = cli(*base, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stdout[-3000:]
    folder = run / "checkpoints" / "step_000001"
    path = folder / "deepspeed" / "actor" / target
    with torch.serialization.safe_globals([_deepspeed_class(name) for name in DEEPSPEED_GLOBALS]):
        state = torch.load(path, weights_only=True)
    state["payload"] = RunsCodeOnLoad(marker)
    torch.save(state, path)
    write_manifest(folder, 1)
    resumed = cli(*base, f"hydra.run.dir={run}", "trainer.resume=auto")
    assert resumed.returncode != 0
    assert f"refused to load {path}: it pickles objects other than tensors" in resumed.stdout
    assert not marker.exists()


def _deepspeed_class(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


# --------------------------------------------------------------------------------------------------- stray writes


def test_a_run_writes_nothing_in_the_home_folder(tmp_path):
    """A smoke run with a prompt file and an offline W&B run (its evaluation tables staged as artifacts), HOME a
    fresh folder and no W&B or cache folder set: every file it writes is in the run folder (or the project cache)."""
    home, run = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    prompts = tmp_path / "prompts.csv"
    from repo_exp.world import all_prompts

    prompts.write_text("prompt\n" + "".join(f'"{p.text}"\n' for p in all_prompts()[:16]))  # words the policy reads
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "XDG_", "HF_HOME", "HF_DATASETS", "TRANSFORMERS_CACHE"))}
    env.update(HOME=str(home), WANDB_MODE="offline")
    done = cli("experiment=smoke", "logger=wandb", "trainer.progress=false", "trainer.num_threads=1",
               "trainer.total_steps=2", "data=file", f"data.path={prompts}",
               f"hydra.run.dir={run}", env=env, replace_env=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert any(p.suffix == ".wandb" for p in run.rglob("*")), "W&B wrote nothing: the test would prove nothing"
    assert (run / "eval" / "summary.json").is_file()
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []
