"""The synthetic world as a stage of its own: built or found before any model is set up, by the entry points and
``python -m repo_exp.world``; the model set-up only loads its folders; the rounds' RL runs are ordinary runs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_root

ROOT = repo_root()
# a world that builds in seconds: few pairs and steps, no on-policy round
SMALL = ("world.num_preference_pairs=64", "world.sft_responses_per_prompt=1", "world.sft.steps=3",
         "world.sft.batch_size=8", "world.reward_model.steps=2", "world.reward_model.batch_size=8",
         "world.cost_model.steps=2", "world.cost_model.batch_size=8", "world.rounds.count=0")


def imported_names(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return names


def test_model_setup_does_not_import_the_world_pipeline_and_the_pipeline_starts_no_process():
    setup = imported_names(ROOT / "repo_exp" / "setup.py")
    assert not {n for n in setup if n.startswith("repo_exp.world.pipeline")}, setup
    for module in ("pipeline.py", "rounds.py", "stage.py"):
        path = ROOT / "repo_exp" / "world" / module
        assert "subprocess" not in imported_names(path), module
        assert "subprocess" not in path.read_text() and "os.system" not in path.read_text(), module


def test_model_setup_refuses_a_world_model_without_a_built_world(compose):
    from repo_exp.config import validate
    from repo_exp.runtime import init_runtime
    from repo_exp.setup import build_constraint, build_models

    cfg = compose()
    rt = init_runtime(False)
    with pytest.raises(ValueError, match=r"model.source=world, reward.source=world, cost.source=world loads the "
                                         r"synthetic world's models, but no built world was given"):
        build_models(validate(cfg), rt, build_constraint(cfg.constraint, rt.comm))


def test_round_runs_are_the_runs_python_m_repo_exp_composes(compose):
    """A round's RL run: the overrides of ``round_overrides`` composed as the command line would, trained by the
    function ``python -m repo_exp`` runs."""
    from hydra.utils import get_method

    import repo_exp.train
    from repo_exp.config import validate
    from repo_exp.world.rounds import ROUND_KL_COEFF, TRAIN_FUNCTION, round_overrides

    world = validate(compose("world.seed=3", "world.rounds.steps=7")).world
    cfg = validate(compose(*round_overrides(world, "average", 1002, "/m/sft", "/m/reward", "/m/cost")))
    assert get_method(TRAIN_FUNCTION) is repo_exp.train.train
    assert (cfg.constraint.name, cfg.seed, cfg.trainer.total_steps, cfg.world.seed) == ("average", 1002, 7, 3)
    assert (cfg.model.path, cfg.reward.path, cfg.cost.path) == ("/m/sft", "/m/reward", "/m/cost")
    assert {cfg.model.source, cfg.reward.source, cfg.cost.source} == {"hub"}  # the folders given, no world stage
    assert cfg.ppo.kl_coeff == ROUND_KL_COEFF == 0.01 and cfg.trainer.num_threads == 1
    assert not cfg.eval.at_start and not cfg.eval.at_end and cfg.logger.name == "none"
    assert cfg.world.unseen_topics == world.unseen_topics


def test_python_m_repo_exp_world_builds_a_world_alone_and_runs_then_find_it(tmp_path, compose):
    """``python -m repo_exp.world`` builds the stages and prints where each is; the world stage of a run with the same
    overrides then finds the same folders and builds nothing."""
    from repo_exp.config import validate
    from repo_exp.world.stage import prepare_world

    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "repo_exp.world", f"world.cache_dir={cache}", *SMALL], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(line.split() for line in proc.stdout.splitlines() if line.startswith("  "))
    assert set(printed) == {"sft", "preferences", "reward", "cost"}
    assert all(Path(folder).is_dir() and Path(folder).is_relative_to(cache) for folder in printed.values())
    assert f"ready in {cache}" in proc.stdout
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*/stage.json")}
    world = prepare_world(validate(compose(f"world.cache_dir={cache}", *SMALL)))
    assert world.paths() == printed
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/stage.json")} == stamps  # found, not built again
    metrics = world.metrics()
    assert 0.0 <= metrics["cost/sign_accuracy"] <= 1.0 and metrics["preferences/rows"] > 0
    assert prepare_world(validate(compose("experiment=smoke"))) is None  # tiny models: no world stage at all


def test_python_m_repo_exp_world_refuses_a_bad_override_naming_it(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "repo_exp.world", "world.label_noise=0.7"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "world.label_noise must be in [0, 0.5), got 0.7" in proc.stderr
    help_text = subprocess.run([sys.executable, "-m", "repo_exp.world", "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60).stdout
    assert help_text.startswith("usage: python -m repo_exp.world")


def test_world_artifacts_name_every_stage_with_the_rounds_in_order(tmp_path):
    from repo_exp.config import WorldConfig
    from repo_exp.world.stage import WorldArtifacts

    paths = {"sft": "s", "preferences": "p", "reward": "r", "cost": "c", "round2": "b", "round1": "a"}
    world = WorldArtifacts.from_paths(WorldConfig(cache_dir=str(tmp_path), seed=5), paths)
    assert world.rounds == ("a", "b") and world.preference_folders() == ["p", "a", "b"]
    assert world.paths() == paths and list(world.paths())[-2:] == ["round1", "round2"]
    assert (world.seed, world.cache_dir) == (5, str(tmp_path))
