"""The attention kernel: transformers' own choice unless one is named; ``fastest`` is the project's timing probe
(the world presets use it); a model that cannot load with the kernel asked for says which Hydra key to set."""

from __future__ import annotations

import pytest
from transformers import BloomConfig, BloomForCausalLM

from repo_exp.config import ConfigError, ModelConfig, validate
from repo_exp.models.policy import load_policy
from repo_exp.world import world_tokenizer


@pytest.fixture(scope="module")
def bloom_folder(tmp_path_factory):
    """A tiny Bloom: an architecture transformers runs with eager attention only."""
    folder = tmp_path_factory.mktemp("bloom")
    tokenizer = world_tokenizer()
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    BloomForCausalLM(config).save_pretrained(folder)
    return folder


def test_the_default_is_transformers_choice_and_the_world_presets_time_the_kernels(compose):
    assert validate(compose("experiment=smoke")).model.attn_implementation is None
    assert validate(compose()).model.attn_implementation == "fastest"  # model=world
    with pytest.raises(ConfigError, match=r"model.attn_implementation=auto is not a kernel: leave it null .* or set "
                                          r"fastest to time sdpa and eager on this machine"):
        validate(compose("experiment=smoke", "model.attn_implementation=auto"))


def test_a_kernel_the_model_cannot_run_names_the_hydra_key_to_set(bloom_folder):
    cfg = ModelConfig(name="bloom", source="hub", path=str(bloom_folder), attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"cannot load with model.attn_implementation=sdpa: .*\n-> set "
                                         r"model.attn_implementation=eager on the command line"):
        load_policy(cfg, world_tokenizer())
    default = load_policy(ModelConfig(name="bloom", source="hub", path=str(bloom_folder)), world_tokenizer())
    assert default.config._attn_implementation == "eager"  # transformers' choice for this architecture
