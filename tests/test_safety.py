"""Untrusted files and secrets: a pickled checkpoint that runs code on load is refused before the code runs, wherever
it is read (score models, policies, a resumed run's weights, optimizer and RNG states); custom model code runs only
with ``trust_remote_code``; no secret from the environment reaches a file the run writes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from repo_exp.checkpoint import write_manifest
from repo_exp.config import ArchConfig, ModelConfig, ScoreModelConfig
from repo_exp.loggers import scrub
from repo_exp.models.policy import load_policy, load_scorer, tiny_llama_config
from repo_exp.models.score_model import ScoreModel, load_score_model
from repo_exp.models.tokenizers import build_word_tokenizer
from repo_exp.models.weights import UnsafeCheckpointError, load_state_dict_safely

from conftest import repo_root
from reliability_support import checkpoint, cli, make_trainer  # noqa: F401  (a fixture)
from test_wandb_failures import files_containing


class RunsCodeOnLoad:
    """Unpickling this calls ``os.system``: the classic payload of a malicious ``.bin``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_bin(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "payload": RunsCodeOnLoad(marker)}, path)
    return path


@pytest.fixture
def tokenizer():
    return build_word_tokenizer(["hello world, how are you?"])


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """The control: the same file, loaded the unsafe way, does run its code, so the refusals below mean something."""
    marker = tmp_path / "ran"
    torch.load(malicious_bin(tmp_path / "x.bin", marker), weights_only=False)
    assert marker.exists()


def test_weights_loader_refuses_a_pickled_payload(tmp_path):
    marker = tmp_path / "ran"
    malicious_bin(tmp_path / "model" / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*pytorch_model.bin: it pickles objects other "
                                                    r"than tensors .*GLOBAL posix.system"):
        load_state_dict_safely(tmp_path / "model")
    assert not marker.exists()


def test_a_cost_model_in_bin_format_with_a_payload_is_refused(tmp_path, tokenizer):
    folder, marker = tmp_path / "cost", tmp_path / "ran"
    model = ScoreModel(tiny_llama_config(ArchConfig(), tokenizer), score_type="cost")
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    malicious_bin(folder / "pytorch_model.bin", marker)
    cfg = ScoreModelConfig(name="untrusted", kind="cost", source="hub", path=str(folder))
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        load_scorer(cfg, tokenizer)
    assert not marker.exists()


def test_safetensors_are_read_before_a_bin_beside_them(tmp_path, tokenizer):
    folder, marker = tmp_path / "cost", tmp_path / "ran"
    ScoreModel(tiny_llama_config(ArchConfig(), tokenizer), score_type="cost").save_pretrained(folder)
    malicious_bin(folder / "pytorch_model.bin", marker)
    assert load_score_model(folder).score_type == "cost"
    assert not marker.exists()


def test_a_policy_in_bin_format_with_a_payload_is_refused(tmp_path, tokenizer):
    folder, marker = tmp_path / "policy", tmp_path / "ran"
    tiny_llama_config(ArchConfig(), tokenizer).save_pretrained(folder)
    malicious_bin(folder / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*: it pickles objects .*GLOBAL posix.system"):
        load_policy(ModelConfig(name="untrusted", source="hub", path=str(folder)), tokenizer)
    assert not marker.exists()


def test_custom_model_code_runs_only_with_trust_remote_code(tmp_path, tokenizer):
    folder, marker = tmp_path / "remote", tmp_path / "ran"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "custom", "architectures": ["CustomForCausalLM"], "auto_map": {"AutoConfig": '
        '"configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}')
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').close()\n")
    cfg = ModelConfig(name="remote", source="hub", path=str(folder))
    assert cfg.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        load_policy(cfg, tokenizer)
    assert not marker.exists()


@pytest.mark.parametrize("group", ["model", "reward", "cost"])
def test_no_shipped_model_config_trusts_remote_code(compose, group):
    conf = repo_root() / "conf" / group
    for option in sorted(p.stem for p in conf.glob("*.yaml")):
        assert compose(f"{group}={option}")[group].trust_remote_code is False, f"{group}={option}"


@pytest.mark.parametrize("target", ["actor.optim.pt", "rng.pt", "policy"])
def test_a_tampered_checkpoint_with_a_valid_manifest_is_refused_on_resume(target, checkpoint, smoke_cfg, tmp_path):
    """Someone hands over a checkpoint whose manifest matches its files, but one file is a pickled payload."""
    folder, marker = tmp_path / "step_000002", tmp_path / "ran"
    shutil.copytree(checkpoint, folder)
    if target == "policy":
        (folder / "policy" / "model.safetensors").unlink()
        malicious_bin(folder / "policy" / "pytorch_model.bin", marker)
    else:
        malicious_bin(folder / target, marker)
    write_manifest(folder, 2)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        make_trainer(smoke_cfg, tmp_path / "run", f"trainer.resume={folder}")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ secrets


def test_scrub_redacts_secret_keys_and_environment_secret_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    config = {"logger": {"api_key": "anything", "tags": ["ok", "k" * 40]}, "run_name": "x-hf_abcdefghijklmnop-y",
              "hub_token": None, "lr": 1e-5, "path": "/models/a"}
    assert scrub(config) == {"logger": {"api_key": "<redacted>", "tags": ["ok", "<redacted>"]},
                             "run_name": "<redacted>", "hub_token": "<redacted>", "lr": 1e-5, "path": "/models/a"}


def test_scrub_redacts_values_of_credential_named_environment_variables(monkeypatch):
    """A value resolved from an environment variable named like a credential (``${oc.env:MY_API_TOKEN}``) is
    redacted wherever it appears; short flags and ordinary variables are not."""
    monkeypatch.setenv("MY_API_TOKEN", "sk-live-0123456789abcdef")
    monkeypatch.setenv("DB_PASSWORD", "hunter2hunter2")
    monkeypatch.setenv("DEBUG_KEY", "1")  # a flag: too short to be a secret, and common in settings
    monkeypatch.setenv("HOME_DIR", "/home/me")
    config = {"run_name": "sk-live-0123456789abcdef", "logger": {"group": "run-hunter2hunter2"}, "seed": 1,
              "path": "/home/me/models", "tags": ["1", "sk-live-0123456789abcdef"]}
    assert scrub(config) == {"run_name": "<redacted>", "logger": {"group": "<redacted>"}, "seed": 1,
                             "path": "/home/me/models", "tags": ["1", "<redacted>"]}


def test_environment_secrets_appear_in_no_file_the_run_writes(tmp_path):
    """An offline W&B run whose config even pulls secrets in through interpolations (the run's name from a variable
    named like a credential, its W&B group from the hub token): none of the W&B key, the hub token or the other
    secret is in any file under the run folder (metrics, config.resolved.yaml, every checkpoint's state.json, logs,
    Hydra's record, W&B's files and config), the W&B folders or the home folder."""
    key, token = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678", "hf_SecretTokenValue0123456789"
    own = "sk-live-MySecretApiToken0123456789"
    run_dir, wandb_dir, home = tmp_path / "run", tmp_path / "wandb", tmp_path / "home"
    wandb_dir.mkdir(), home.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": key, "HF_TOKEN": token, "MY_API_TOKEN": own, "HOME": str(home),
           **{k: str(wandb_dir) for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR")}}
    done = cli("experiment=smoke", "logger=wandb", "trainer.progress=false", "trainer.num_threads=1",
               "trainer.save_every=2", "run_name=${oc.env:MY_API_TOKEN}", "logger.group=${oc.env:HF_TOKEN}",
               f"hydra.run.dir={run_dir}", env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.jsonl" for p in written) and any(p.name == "manifest.json" for p in written)
    assert any("wandb" in p.parts for p in written), "W&B wrote nothing: the test would prove nothing"
    assert len([p for p in written if p.name == "state.json"]) == 2  # steps 2 and 4
    assert "run_name: <redacted>" in (run_dir / "config.resolved.yaml").read_text()
    for secret in (key, token, own):
        assert files_containing(secret, run_dir, wandb_dir, home) == []
        assert secret not in done.stdout
