"""Score models partitioned as they load under ZeRO-3 (two CPU ranks): each rank holds only its share of the
parameters, yet the reward model, the cost model and a critic started from either (one head, or a widened head of
two) score exactly as the same checkpoint loaded whole in one process; the normaliser's statistics and the head's
bias come through.

Run under ``torch.distributed.run`` in a subprocess, so that its process group stays out of the test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import repo_root


def _save_scorers(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig

    from repo_exp.models.score_model import ScoreModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for kind in ("reward", "cost"):
        model = ScoreModel(config, bias=True, score_type=kind, do_normalize=True)
        with torch.no_grad():
            model.score_head.bias.fill_(0.3)
            model.normalizer.mean.fill_(0.5)
            model.normalizer.var.fill_(4.0)
        model.save_pretrained(folder / kind)


def _worker(folder: str, out: str) -> None:
    import torch

    from repo_exp.config import compose_config, validate
    from repo_exp.deepspeed_engine import inference_config, load_score_model_partitioned, partitioned_loading
    from repo_exp.models.score_model import load_score_model
    from repo_exp.runtime import init_runtime

    torch.set_num_threads(1)
    rt = init_runtime(use_deepspeed=True)
    config = validate(compose_config(["experiment=smoke", "deepspeed=zero3", "deepspeed.bf16=false",
                                      "+deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]))
    import deepspeed

    torch.manual_seed(1)
    ids = torch.randint(0, 64, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    result = {}
    cases = {"reward": ("reward", {"normalize": True}), "cost": ("cost", {"normalize": True}),
             "reward_critic": ("reward", {"score_type": "critic", "normalize": False}),
             "shared_critic": ("reward", {"score_type": "critic", "normalize": False, "score_dim": 2})}
    for name, (source, kwargs) in cases.items():
        cfg = getattr(config, source)
        path = str(Path(folder) / source)
        train = kwargs.get("score_type") == "critic"
        with partitioned_loading(config, rt, train):  # transformers' ZeRO-3 integration on, as in build_models
            model = load_score_model_partitioned(config, rt, train, cfg, path, **kwargs)
        local = sum(p.numel() for p in model.parameters())
        whole = sum(p.ds_numel for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, config=inference_config(config))
        with torch.no_grad():
            scores = engine.module.end_scores(ids, mask)
        expected = load_score_model(path, score_type=kwargs.get("score_type", cfg.kind),
                                    normalize=kwargs.get("normalize"))
        with torch.no_grad():
            plain = expected.end_scores(ids, mask)
        if kwargs.get("score_dim") == 2:  # the widened head: the checkpoint's row, then a zero row (as
            plain = torch.stack([plain.reshape(-1) - 0.3, torch.zeros(3)], dim=-1)  # critic_from_scorer: no bias)
        result[name] = {"local": local, "whole": whole, "scores": scores.tolist(), "plain": plain.tolist()}
    Path(out).with_name(f"rank{rt.rank}.json").write_text(json.dumps(result))


@pytest.mark.deepspeed
@pytest.mark.slow  # two DeepSpeed processes: their start-up alone takes about a minute on two cores
def test_score_models_partitioned_as_they_load_score_as_a_whole_load(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root()), "HF_HUB_OFFLINE": "1"}
    sys.path.insert(0, str(repo_root()))
    _save_scorers(tmp_path)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(tmp_path), str(tmp_path / "out.json")], cwd=repo_root(), env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name in ("reward", "cost", "reward_critic", "shared_critic"):
        for r in ranks:
            assert r[name]["local"] <= r[name]["whole"] / 2 + 64, name  # each rank holds its share only
            np.testing.assert_allclose(r[name]["scores"], r[name]["plain"], atol=1e-5, err_msg=name)
    # the normaliser and the bias came through: a reward is shifted and scaled, a critic is not
    reward, critic = ranks[0]["reward"]["scores"], ranks[0]["reward_critic"]["scores"]
    assert [(c - 0.5) / 2 for c in critic] == pytest.approx(reward, abs=1e-5)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])


def test_zero_init_is_given_no_dtype_for_float32_under_an_fp32_config():
    """DeepSpeed 0.19 turns an explicit float32 into bfloat16 on a CPU; float32 under an fp32 config is left to the
    config, which gives float32, and any other case passes the dtype."""
    import torch

    from repo_exp.deepspeed_engine import zero_init_dtype

    assert zero_init_dtype(torch.float32, {"bf16": {"enabled": False}}) is None
    assert zero_init_dtype(torch.float32, {}) is None
    assert zero_init_dtype(torch.float32, {"bf16": {"enabled": True}}) is torch.float32
    assert zero_init_dtype(torch.bfloat16, {"bf16": {"enabled": False}}) is torch.bfloat16
