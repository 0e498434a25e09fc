"""Shared fixtures: the real config composed at smoke size, an isolated world cache, W&B kept offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _environment(tmp_path_factory):
    wandb_dir = tmp_path_factory.mktemp("wandb")
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        os.environ[key] = str(wandb_dir)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("REPO_EXP_CACHE", str(tmp_path_factory.mktemp("world_cache")))
    # The test models are tiny: one thread is as fast as two, and it cannot be oversubscribed when the machine
    # is busy (subprocesses inherit OMP_NUM_THREADS).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Trainers set torch's thread count from ``trainer.num_threads``: every test leaves one thread behind."""
    yield
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def compose():
    """``compose(*overrides)`` → the composed DictConfig of ``conf/config.yaml``, as ``python -m repo_exp`` sees it;
    ``return_hydra_config=True`` keeps the ``hydra`` node (launcher, sweeper)."""
    from repo_exp.config import compose_config

    def _compose(*overrides: str, return_hydra_config: bool = False):
        return compose_config(overrides, return_hydra_config=return_hydra_config)

    return _compose


SMOKE = ("experiment=smoke", "logger=none", "trainer.progress=false")


@pytest.fixture
def smoke_cfg(compose):
    """``smoke_cfg(*overrides)``: the smoke experiment with extra overrides."""
    return lambda *overrides: compose(*SMOKE, *overrides)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
