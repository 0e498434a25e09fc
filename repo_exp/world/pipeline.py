"""The published Safe RLHF pipeline at laptop size, on the synthetic world (SPEC §6):

    SFT of a causal LM on a mixture of answer styles
    → preference pairs sampled from the SFT model, in the PKU-SafeRLHF schema, labelled by the oracle with noise
    → reward model (pairwise loss) and cost model (pairwise plus sign terms), both in the published score layout on
      the SFT model's trunk
    → on-policy rounds (RL, new pairs, the models trained again) → RL (``repo_exp.train``), with any constraint.

The causal LM is the world's trunk (``world.trunk``): a tiny random Llama over the world's word-level tokenizer (the
default, on two CPU cores), or a pretrained model (SmolLM2-135M-Instruct: ``model=world_smollm2``), whose own tokenizer
and chat template then render every prompt the stages read (``repo_exp.models.tokenizers.encode_example``). One code
path serves both; a pretrained trunk's stages run on the GPU when there is one.

Each stage is cached on disk under ``world.cache_dir`` in a folder named by a hash of its own config, the hashes of
the stages it reads, and the world's grammar: it is rebuilt exactly when one of those changes. A file lock lets
parallel jobs share one build. A stage's ``stage.json`` records the size and SHA-256 of each of its files: a stage is
used only when they match (a file cut by an interrupted copy or a full disk is found, named, and the stage rebuilt),
and a complete stage is read without taking the lock, so that a cache on a read-only file system (a shared cache on a
cluster) serves every stage it holds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock

from repo_exp.checkpoint import file_records
from repo_exp.config import SAFE_RLHF_TEMPLATE, WorldConfig, WorldTrunkConfig
from repo_exp.progress import Every, step_line
from repo_exp.world import grammar, oracle
from repo_exp.world.grammar import Prompt, sample_response, world_split
from repo_exp.world.oracle import oracle_cost, oracle_reward, parse

log = logging.getLogger(__name__)

# bump when a stage's code changes what it produces. 2: the SFT and score-model learning-rate schedules are
# transformers' (constant and cosine, each after a linear warm-up over 5 % of the steps)
PIPELINE_VERSION = 2
TEMPLATE = SAFE_RLHF_TEMPLATE  # the tiny trunk's (world.trunk.template)
STAGE_FILE = "stage.json"


def _plain(value: Any) -> Any:
    if is_dataclass(value):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def grammar_fingerprint() -> str:
    """A hash of everything that defines the world's prompts, responses and ground truth (the grammar's and the
    oracle's source): cached artifacts depend on it, so editing either rebuilds them."""
    import inspect

    blob = inspect.getsource(grammar) + inspect.getsource(oracle)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_key(name: str, config: dict, deps: list[str]) -> str:
    blob = json.dumps({"stage": name, "config": _plain(config), "deps": deps, "grammar": grammar_fingerprint(),
                       "version": PIPELINE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class StageUnusable(RuntimeError):
    """A cached world stage is damaged or not built, and the cache cannot be written to rebuild it."""


NOT_BUILT = "not built"


def stage_problem(folder: Path) -> str | None:
    """None when ``folder`` is a complete stage whose files match the sizes and SHA-256 its ``stage.json`` records;
    else what is wrong (``NOT_BUILT`` when there is no stage.json)."""
    from repo_exp.checkpoint import records_problem

    record_file = folder / STAGE_FILE
    if not record_file.is_file():
        return NOT_BUILT
    try:
        files = json.loads(record_file.read_text()).get("files")
    except ValueError as exc:
        return f"{record_file} is unreadable ({exc})"
    if files is None:
        return (f"{record_file} was written before stages recorded their files' sizes and hashes, so its files "
                f"cannot be checked")
    return records_problem(folder, files)


def run_stage(cache: Path, name: str, config: dict, deps: list[str], build: Callable[[Path], dict]) -> tuple[Path, str]:
    """The folder of stage ``name``, built by ``build(tmp_folder) -> metrics`` unless a complete one is cached.

    A cached stage is checked against the sizes and hashes its ``stage.json`` records, without the lock (nothing is
    written, so a read-only cache serves it). A damaged stage, or one recorded before the hashes were, is rebuilt
    with a warning naming what was wrong; where the cache cannot be written, ``StageUnusable`` names the file and the
    folder to delete."""
    key = stage_key(name, config, deps)
    folder = cache / f"{name}-{key}"
    problem = stage_problem(folder)
    if problem is None:
        log.info("world stage %s: cached at %s", name, folder)
        return folder, key
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache / f"{name}-{key}.lock"))
        lock.acquire()
    except OSError as exc:  # a read-only file system, or no permission
        what = ("is not built" if problem == NOT_BUILT
                else f"is damaged ({problem}); delete the folder {folder} where the cache can be written")
        raise StageUnusable(f"the world stage {name} in {folder} {what}, and the cache {cache} cannot be written "
                            f"here to build it ({exc.strerror or exc}): build the world where the cache is writable, "
                            f"or set world.cache_dir to a writable folder") from exc
    try:
        problem = stage_problem(folder)  # another process may have built it meanwhile
        if problem is None:
            log.info("world stage %s: cached at %s", name, folder)
            return folder, key
        if problem != NOT_BUILT:
            log.warning("world stage %s in %s is damaged (%s): rebuilding it", name, folder, problem)
        tmp = cache / f".{name}-{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        start = time.perf_counter()
        log.info("world stage %s: building in %s", name, folder)
        metrics = build(tmp)
        record = {"stage": name, "key": key, "deps": deps, "config": _plain(config), "metrics": metrics,
                  "seconds": round(time.perf_counter() - start, 2), "files": file_records(tmp)}
        (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        lock.release()
    return folder, key


# ------------------------------------------------------------------------------------------------------ trunk


def trunk_folder(world: WorldConfig) -> str:
    """A pretrained trunk's transformers folder (or hub id): a GGUF file converted once into the cache."""
    trunk = world.trunk
    if trunk.source == "gguf":
        return _converted(str(trunk.path), trunk.revision, str(world.cache_dir))
    return str(trunk.path)


@lru_cache(maxsize=8)
def _converted(path: str, revision: str | None, cache_dir: str) -> str:
    """The GGUF file's converted folder, found (its pin checked, its SHA-256 computed) once per process."""
    from repo_exp.models.gguf import converted_folder

    return str(converted_folder(path, revision, cache_dir, key="world.trunk.path"))


def _identity(trunk: WorldTrunkConfig) -> dict:
    return {"name": trunk.name, "source": trunk.source, "revision": trunk.revision, "template": trunk.template}


def _sampling(trunk: WorldTrunkConfig) -> dict:
    return {"max_new_tokens": trunk.max_new_tokens, "run_preset": trunk.run_preset}


def trunk_key(world: WorldConfig) -> dict:
    """What names the trunk in the SFT stage's key: the model and its pin (a GGUF file by its SHA-256, not its path on
    this machine) and the template every stage renders prompts with. {} for the default tiny trunk, whose keys stay
    those of the worlds built before the trunk was a setting."""
    trunk = world.trunk
    if _identity(trunk) == _identity(WorldTrunkConfig()):
        return {}
    identity = _identity(trunk)
    if trunk.source == "gguf":
        from repo_exp.models.gguf import SOURCE_RECORD

        identity["sha256"] = json.loads((Path(trunk_folder(world)) / SOURCE_RECORD).read_text())["sha256"]
    elif trunk.source == "hub":
        identity["path"] = trunk.path
    return {"trunk": identity}


def sampling_key(world: WorldConfig) -> dict:
    """What the sampled stages (preference pairs, rounds) read of the trunk beyond the SFT model: the longest response
    and the model preset of the rounds' RL runs; {} at the tiny trunk's defaults (24 tokens, model=world), which its
    keys never named."""
    sampling = _sampling(world.trunk)
    return {} if sampling == _sampling(WorldTrunkConfig()) else {"sampling": sampling}


def trunk_tokenizer(world: WorldConfig):
    """The tokenizer of every stage: the world's word-level one on the tiny trunk, else the pretrained trunk's own."""
    if not world.trunk.pretrained:
        from repo_exp.world import world_tokenizer

        return world_tokenizer()
    from repo_exp.models.tokenizers import load_tokenizer

    revision = world.trunk.revision if world.trunk.source == "hub" else None  # a converted folder is local
    return load_tokenizer(trunk_folder(world), revision=revision)


def trunk_causal_lm(world: WorldConfig, tokenizer, seed: int):
    """The SFT stage's starting point: a tiny Llama of ``world.arch`` initialised from ``seed``, or the pretrained
    trunk as a run's policy loads (every weight checked, dropout off)."""
    from transformers import LlamaForCausalLM

    from repo_exp.models.policy import load_policy, tiny_llama_config

    torch.manual_seed(seed)
    trunk = world.trunk
    if not trunk.pretrained:
        return LlamaForCausalLM(tiny_llama_config(world.arch, tokenizer))
    from repo_exp.config import ModelConfig

    folder = trunk_folder(world)
    config = ModelConfig(name=trunk.name, source="hub", path=folder,
                         revision=trunk.revision if trunk.source == "hub" else None, template=trunk.template)
    return load_policy(config, tokenizer, folder)


def stage_device(world: WorldConfig) -> torch.device:
    """Where a stage trains and samples: a pretrained trunk on the GPU when there is one; the tiny trunk on the CPU,
    where its models are as fast and its worlds were built."""
    return torch.device("cuda" if world.trunk.pretrained and torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------------ stages


def stage_seed(world: WorldConfig, stage) -> int:
    """A stage's training seed: its own, offset by the world's, so that a world rebuilt from another ``world.seed``
    differs in every random draw (its prompt split, samples, labels and every model's initialisation and batches)
    while world 0 keeps the stages' own seeds."""
    return stage.seed + 1009 * world.seed


def sft_examples(world: WorldConfig, rng: random.Random) -> list[tuple[Prompt, str]]:
    """(prompt, response) pairs: ``sft_responses_per_prompt`` per train prompt, styles drawn from the family's
    mixture."""
    train, _ = world_split(world)
    out = []
    for p in train:
        mixture = world.sft_mixture[p.family]
        styles, weights = zip(*sorted(mixture.items()))
        for _ in range(world.sft_responses_per_prompt):
            out.append((p, sample_response(p, rng.choices(styles, weights)[0], rng)))
    return out


def build_sft(world: WorldConfig, out: Path) -> dict:
    """The trunk fine-tuned on the world's answers: each prompt rendered through the trunk's template, the response's
    tokens after it, then EOS; the loss on the response only."""
    from transformers import get_scheduler

    from repo_exp.models.tokenizers import encode_example

    stage = world.sft
    tokenizer = trunk_tokenizer(world)
    seed = stage_seed(world, stage)
    rng = random.Random(seed)
    examples = [encode_example(tokenizer, world.trunk.template, p.text, r) for p, r in sft_examples(world, rng)]
    device = stage_device(world)
    model = trunk_causal_lm(world, tokenizer, seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    # linear warm-up over the first 5 % of the steps, then constant
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=max(1, stage.steps // 20))
    model.train()
    losses = []
    every = Every(10.0)
    for step in range(stage.steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(stage.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (seq, prompt_len) in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            labels[i, prompt_len : len(seq)] = torch.tensor(seq[prompt_len:])  # learn the response only
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if every(force=step + 1 == stage.steps):
            log.info(step_line("world SFT", step + 1, stage.steps, {"loss": loss.item()}))
    model.eval().cpu()
    model.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    tail = losses[-20:]
    return {"sft/final_loss": sum(tail) / len(tail), "sft/examples": len(examples)}


@torch.no_grad()
def sample_policy(model, tokenizer, prompts: list[Prompt], seed: int, max_new_tokens: int = 24,
                  batch_size: int = 256, template: str = TEMPLATE) -> list[str]:
    """One sampled response per prompt (temperature 1), the prompt rendered through ``template``."""
    from repo_exp.models.tokenizers import encode_prompt
    from repo_exp.rollout.generate import generate, sampling_generator
    from repo_exp.rollout.make import decode_responses

    device = next(model.parameters()).device
    out: list[str] = []
    every = Every(10.0)
    for start in range(0, len(prompts), batch_size):
        if every():
            log.info("world preferences: sampled %d/%d responses", start, len(prompts))
        chunk = prompts[start : start + batch_size]
        encoded = [encode_prompt(tokenizer, template, p.text) for p in chunk]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        gen = generate(model, ids.to(device), mask.to(device), max_new_tokens, tokenizer.eos_token_id,
                       tokenizer.pad_token_id, generator=sampling_generator(seed, start, 7), rows=slice(0, len(chunk)),
                       global_batch=len(chunk))
        out += decode_responses(tokenizer, gen.sequences, gen.response_mask, width)
    return out


def _noisy(label: bool, noise: float, rng: random.Random) -> bool:
    return (not label) if rng.random() < noise else label


def label_pairs(world: WorldConfig, prompts: list[Prompt], first: list[str], second: list[str],
                rng: random.Random) -> list[dict]:
    """Rows in the PKU-SafeRLHF schema for pairs of responses, labelled by the oracle; each label flipped with
    probability ``label_noise``. The world's ground truth stands beside each row."""
    rows = []
    for p, a, b in zip(prompts, first, second):
        ra, rb = oracle_reward(p, a, world.temptation), oracle_reward(p, b, world.temptation)
        ca, cb = oracle_cost(p, a), oracle_cost(p, b)
        better = 0 if ra > rb else 1 if rb > ra else rng.randrange(2)
        safer = 0 if ca < cb else 1 if cb < ca else rng.randrange(2)
        noisy_better = better if rng.random() >= world.label_noise else 1 - better
        noisy_safer = safer if rng.random() >= world.label_noise else 1 - safer
        rows.append({
            "prompt": p.text, "response_0": a, "response_1": b,
            "is_response_0_safe": _noisy(ca <= 0, world.label_noise, rng),
            "is_response_1_safe": _noisy(cb <= 0, world.label_noise, rng),
            "better_response_id": noisy_better, "safer_response_id": noisy_safer,
            "family": p.family, "severity": p.severity,
            "oracle_reward_0": ra, "oracle_reward_1": rb, "oracle_cost_0": ca, "oracle_cost_1": cb,
            "true_better_response_id": better,
        })
    return rows


def write_pairs(world: WorldConfig, rows: list[dict], out: Path) -> None:
    n_test = max(1, int(world.preference_test_fraction * len(rows)))
    for name, part in (("test", rows[:n_test]), ("train", rows[n_test:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps({k: v for k, v in row.items() if k != "true_better_response_id"}) + "\n")


def pair_metrics(prefix: str, rows: list[dict], responses: list[str]) -> dict[str, float]:
    styles = [parse(r).style for r in responses]
    return {
        f"{prefix}/rows": len(rows),
        f"{prefix}/better_label_agreement":
            sum(r["better_response_id"] == r["true_better_response_id"] for r in rows) / len(rows),
        f"{prefix}/reward_ties": sum(r["oracle_reward_0"] == r["oracle_reward_1"] for r in rows) / len(rows),
        f"{prefix}/unsafe_share": sum(c > 0 for r in rows for c in (r["oracle_cost_0"], r["oracle_cost_1"]))
        / (2 * len(rows)),
        **{f"{prefix}/style/{s}": styles.count(s) / len(styles) for s in sorted(set(styles))},
    }


def load_sampler(world: WorldConfig, folder: Path | str):
    """A causal LM to sample pairs from (the SFT model, a round's policy), on the stage's device."""
    from transformers import AutoModelForCausalLM

    from repo_exp.score_train import quietly

    return quietly(AutoModelForCausalLM.from_pretrained, folder).eval().to(stage_device(world))


def sample_world(world: WorldConfig, model, tokenizer, prompts: list[Prompt], seed: int) -> list[str]:
    """``sample_policy`` with the trunk's template and response length."""
    return sample_policy(model, tokenizer, prompts, seed, world.trunk.max_new_tokens, template=world.trunk.template)


def build_preferences(world: WorldConfig, sft_folder: Path, out: Path) -> dict:
    """Pairs of SFT samples per prompt, labelled by the oracle (``label_pairs``)."""
    tokenizer = trunk_tokenizer(world)
    model = load_sampler(world, sft_folder / "model")
    rng = random.Random(world.seed + 17)
    train, _ = world_split(world)
    chosen = [train[rng.randrange(len(train))] for _ in range(world.num_preference_pairs)]
    log.info("world stage preferences: sampling %d pairs from the SFT model", len(chosen))
    first = sample_world(world, model, tokenizer, chosen, seed=world.seed * 2 + 1)
    second = sample_world(world, model, tokenizer, chosen, seed=world.seed * 2 + 2)
    rows = label_pairs(world, chosen, first, second, rng)
    write_pairs(world, rows, out)
    return pair_metrics("preferences", rows, first + second)


def build_round(world: WorldConfig, r: int, paths: dict[str, str], out: Path) -> dict:
    """Round ``r``: RL against the latest models, then pairs (policy sample, SFT sample) labelled by the oracle."""
    from repo_exp.world.rounds import run_round_policies

    policies = run_round_policies(world, r, paths, out)
    tokenizer = trunk_tokenizer(world)
    sft = load_sampler(world, paths["sft"])
    rng = random.Random(world.seed * 31 + r)
    train, _ = world_split(world)
    rows, responses, metrics = [], [], {}
    for i, (c, folder) in enumerate(sorted(policies.items())):
        policy = load_sampler(world, folder)
        chosen = [train[rng.randrange(len(train))] for _ in range(world.rounds.pairs_per_policy)]
        log.info("world round %d: sampling %d pairs from the %s policy", r, len(chosen), c)
        sampled = sample_world(world, policy, tokenizer, chosen, seed=world.seed * 7 + 100 * r + i)
        reference = sample_world(world, sft, tokenizer, chosen, seed=world.seed * 7 + 100 * r + i + 50)
        swap = [rng.random() < 0.5 for _ in chosen]  # no side of the pair is always the policy's
        first = [b if s else a for a, b, s in zip(sampled, reference, swap)]
        second = [a if s else b for a, b, s in zip(sampled, reference, swap)]
        part = label_pairs(world, chosen, first, second, rng)
        metrics.update(pair_metrics(f"round{r}/{c}", part, sampled))
        rows += part
        responses += sampled
        shutil.rmtree(folder.parent.parent, ignore_errors=True)  # the checkpoints: only the samples are kept
    rng.shuffle(rows)
    write_pairs(world, rows, out)
    return metrics


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def build_score_model(world: WorldConfig, kind: str, sft_folder: Path, prefs_folders: list[Path], out: Path,
                      steps: int | None = None) -> dict:
    """A reward or cost model trained on the pairs of every folder in ``prefs_folders`` (the SFT pairs and each
    round's). Held-out accuracies are on the first folder's test pairs (SFT samples, comparable across rounds) and,
    from a round on, on the last round's (the policies' own samples)."""
    from repo_exp.score_train import PreferenceEncoder, init_score_model, train_score_model

    stage = world.reward_model if kind == "reward" else world.cost_model
    tokenizer = trunk_tokenizer(world)
    seed = stage_seed(world, stage)
    model = init_score_model(str(sft_folder / "model"), tokenizer, world.score_arch, kind, seed)
    model.to(stage_device(world))
    encoder = PreferenceEncoder(tokenizer, world.trunk.template)
    train_rows = [row for folder in prefs_folders for row in read_jsonl(folder / "train.jsonl")]
    test_rows = read_jsonl(prefs_folders[0] / "test.jsonl")
    log.info("world stage %s model: %d pairs, %d steps", kind, len(train_rows), steps or stage.steps)
    metrics = train_score_model(model, encoder, train_rows, test_rows, kind, steps or stage.steps, stage.batch_size,
                                stage.lr, stage.weight_decay, seed, stage.score_regularization,
                                stage.filter_inconsistent_pairs)
    metrics.update(oracle_agreement(model, encoder, test_rows, kind))
    if len(prefs_folders) > 1:
        on_policy = oracle_agreement(model, encoder, read_jsonl(prefs_folders[-1] / "test.jsonl"), kind)
        metrics.update({k.replace(f"{kind}/", f"{kind}/on_policy_"): v for k, v in on_policy.items()})
    model.cpu().save_pretrained(out / "model", tokenizer=tokenizer)
    return metrics


@torch.no_grad()
def oracle_agreement(model, encoder, rows: list[dict], kind: str) -> dict[str, float]:
    """How often the learned model orders held-out pairs as the *oracle* does (not the noisy labels), and, for costs,
    how often its sign matches the oracle's."""
    key = "oracle_reward" if kind == "reward" else "oracle_cost"
    correct, n, sign_ok, signs = 0, 0, 0, 0
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        a_ids, a_mask = encoder.pad([encoder.ids(r["prompt"], r["response_0"]) for r in chunk])
        b_ids, b_mask = encoder.pad([encoder.ids(r["prompt"], r["response_1"]) for r in chunk])
        device = next(model.parameters()).device
        sa = model.end_scores(a_ids.to(device), a_mask.to(device))
        sb = model.end_scores(b_ids.to(device), b_mask.to(device))
        for r, x, y in zip(chunk, sa.tolist(), sb.tolist()):
            ox, oy = r[f"{key}_0"], r[f"{key}_1"]
            if ox != oy:
                correct += int((x > y) == (ox > oy))
                n += 1
            if kind == "cost":
                sign_ok += int((x > 0) == (ox > 0)) + int((y > 0) == (oy > 0))
                signs += 2
    out = {f"{kind}/oracle_pairwise_accuracy": correct / max(n, 1)}
    if kind == "cost":
        out["cost/oracle_sign_accuracy"] = sign_ok / max(signs, 1)
    return out


# ---------------------------------------------------------------------------------------------------- the world


def build_world(world: WorldConfig, until: str = "cost") -> dict[str, str]:
    """Build (or find cached) every stage up to ``until`` (sft, preferences, reward, cost); returns their folders."""
    cache = Path(world.cache_dir)
    grammar_cfg = {"seed": world.seed, "eval_fraction": world.eval_fraction, "unseen_topics": world.unseen_topics}
    sft_cfg = {**grammar_cfg, "mixture": world.sft_mixture, "per_prompt": world.sft_responses_per_prompt,
               "arch": world.arch, "stage": world.sft, **trunk_key(world)}  # the SFT data does not read the oracle
    sft, sft_key = run_stage(cache, "sft", sft_cfg, [], lambda out: build_sft(world, out))
    if until == "sft":
        return {"sft": str(sft / "model")}
    pref_cfg = {**grammar_cfg, "temptation": world.temptation, "pairs": world.num_preference_pairs,
                "noise": world.label_noise,
                "test_fraction": world.preference_test_fraction, **sampling_key(world)}
    prefs, prefs_key = run_stage(cache, "preferences", pref_cfg, [sft_key],
                                 lambda out: build_preferences(world, sft, out))
    paths = {"sft": str(sft / "model"), "preferences": str(prefs)}
    score_models = {"preferences": (), "reward": ("reward",), "cost": ("reward", "cost")}[until]
    folders, keys = [prefs], [sft_key, prefs_key]

    def train_models(round_: int) -> None:
        for kind in score_models:
            stage = world.reward_model if kind == "reward" else world.cost_model
            # each round trains on more pairs: the steps grow with them, so every pair is seen about as often
            steps = stage.steps * len(folders) if round_ else stage.steps
            config = {"arch": world.score_arch, "stage": stage} | ({"round": round_, "steps": steps} if round_ else {})
            folder, key = run_stage(cache, f"{kind}_model", config, list(keys),
                                    lambda out, kind=kind: build_score_model(world, kind, sft, list(folders), out,
                                                                             steps))
            paths[kind] = str(folder / "model")
            paths[f"{kind}_key"] = key

    train_models(0)
    if until == "cost":
        for r in range(1, world.rounds.count + 1):
            # the rounds' RL settings by the name of the model preset they compose (the tiny trunk's: model=world,
            # whose trainer is trainer=world)
            round_cfg = {"round": r, "rounds": world.rounds, "temptation": world.temptation,
                         "noise": world.label_noise, "test_fraction": world.preference_test_fraction,
                         "trainer": "world", "kl": "v2", **sampling_key(world)}
            folder, key = run_stage(cache, f"round{r}", round_cfg, [*keys, paths["reward_key"], paths["cost_key"]],
                                    lambda out, r=r: build_round(world, r, dict(paths), out))
            folders.append(folder)
            keys.append(key)
            paths[f"round{r}"] = str(folder)
            train_models(r)
    for kind in score_models:
        paths.pop(f"{kind}_key")
    return paths


def world_metrics(paths: dict[str, str]) -> dict[str, float]:
    """The stage metrics of a built world (reward/cost model accuracies, preference statistics, SFT loss)."""
    out: dict[str, float] = {}
    for key in ("sft", "reward", "cost"):
        out.update(json.loads((Path(paths[key]).parent / STAGE_FILE).read_text())["metrics"])
    for key in ("preferences", *sorted(k for k in paths if k.startswith("round"))):
        out.update(json.loads((Path(paths[key]) / STAGE_FILE).read_text())["metrics"])
    return out
