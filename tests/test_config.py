"""Composition of the real config, clear errors, and the configs shipped as package data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from repo_exp.config import ConfigError, validate

from conftest import repo_root

ROOT = repo_root()


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "repo_exp", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("constraint", ["none", "shaping", "average", "rectified"])
def test_every_constraint_composes_and_validates(compose, constraint):
    cfg = compose(f"constraint={constraint}", "model=tiny")
    config = validate(cfg)
    assert config.constraint.name == constraint
    assert cfg.constraint._target_.startswith("repo_exp.constraints.")


def test_experiment_files_only_override(compose):
    base = compose("model=tiny", "reward=tiny", "cost=tiny")
    smoke = compose("experiment=smoke")
    assert smoke.model.name == "tiny" and smoke.trainer.total_steps < base.trainer.total_steps
    # every key of the smoke run exists in the base config: an experiment adds no new fields
    def keys(node, prefix=""):
        out = set()
        for k, v in node.items():
            out.add(prefix + k)
            if OmegaConf.is_dict(v):
                out |= keys(v, prefix + k + ".")
        return out
    assert keys(smoke) <= keys(base) | {"eval.data"}


def test_range_errors_name_the_field(compose):
    with pytest.raises(ConfigError, match="optimizer.actor.lr"):
        validate(compose("model=tiny", "optimizer.actor.lr=-1"))
    with pytest.raises(ConfigError, match="trainer.max_new_tokens"):
        validate(compose("model=tiny", "trainer.max_new_tokens=0"))
    with pytest.raises(ConfigError, match="granularity=prompt needs trainer.samples_per_prompt"):
        validate(compose("model=tiny", "constraint.granularity=prompt", "trainer.samples_per_prompt=1"))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        validate(compose("model=tiny", "trainer.max_new_tokens=400"))


@pytest.mark.parametrize("override,key", [("+trainer.total_step=10", "trainer.total_step"),
                                          ("+constraint.tresh=0.5", "constraint.tresh"),
                                          ("+world.rounds.cout=3", "world.rounds.cout")])
def test_a_key_added_with_plus_that_no_schema_declares_is_refused(compose, override, key):
    """Hydra's hint for a misspelt key is to add it with `+`; the run must not then ignore it silently."""
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\) {key.replace('.', '[.]')}"):
        validate(compose("experiment=smoke", override))
    # free-form settings stay free: DeepSpeed's own keys under deepspeed.extra
    validate(compose("experiment=smoke", "deepspeed=zero3", "+deepspeed.extra.zero_optimization.reduce_bucket_size=10"))


def test_cli_help_compose_and_errors():
    help_text = run_cli("--help")
    assert help_text.returncode == 0
    for group in ("constraint: average, none, rectified, shaping", "model:", "reward:", "cost:", "optimizer:",
                  "data:", "trainer:", "logger: none, wandb"):
        assert group in help_text.stdout
    composed = run_cli("--cfg", "job", "constraint=rectified", "model=tiny")
    assert composed.returncode == 0
    cfg = OmegaConf.create(composed.stdout)
    assert cfg.constraint.name == "rectified" and cfg.model.source == "tiny"
    bad = run_cli("--cfg", "job", "constraint.threshold=abc")
    assert bad.returncode != 0 and "constraint.threshold" in bad.stderr + bad.stdout
    missing = run_cli("--cfg", "job", "constraint=nonexistent")
    out = missing.stderr + missing.stdout
    assert missing.returncode != 0
    assert "constraint/nonexistent" in out and all(o in out for o in ("average", "none", "rectified", "shaping"))


def test_wheel_install_finds_the_configs(tmp_path):
    """A non-editable install ships conf/ as repo_exp.conf: compose from a folder outside the checkout."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("repo_exp-*.whl"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "repo_exp" / "conf" / "constraint" / "rectified.yaml").is_file()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    where = subprocess.run([sys.executable, "-c", "import repo_exp; print(repo_exp.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert where.stdout.startswith(str(site))
    composed = run_cli("--cfg", "job", "constraint=average", "model=tiny", cwd=tmp_path, env=env)
    assert composed.returncode == 0, composed.stderr
    assert OmegaConf.create(composed.stdout).constraint.name == "average"
