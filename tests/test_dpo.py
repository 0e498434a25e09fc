"""The DPO family: the loss against TRL's own, the pairs each method trains on, SACPO's two stages, P-SACPO's merge,
and ``algorithm=sacpo`` / ``algorithm=safe_dpo`` end to end at smoke size (run folder, evaluation, checkpoints,
resume, bad input)."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from repo_exp.algorithms.dpo import (PreferencePair, dpo_figures, dpo_loss, helpfulness_pairs, interpolate_weights,
                                     safety_first_pairs, safety_margins, safety_pairs)
from repo_exp.checkpoint import CheckpointManager, verify
from repo_exp.config import ConfigError, validate
from repo_exp.data.preferences import PairBatch, PairEncoder

QUICK = ("eval.at_start=false", "eval.at_end=false", "trainer.num_threads=1", "trainer.deterministic=true")
VOLATILE = ("timing/", "throughput/")


# ------------------------------------------------------------------------------------------------- fixtures


def write_preference_rows(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows in the PKU-SafeRLHF schema on the world's training prompts, responses of random styles from its
    grammar, labelled by its oracle (as the world's preference stage labels its SFT samples)."""
    from omegaconf import OmegaConf

    from repo_exp.config import WorldConfig
    from repo_exp.world.grammar import STYLES, sample_response, world_split
    from repo_exp.world.pipeline import label_pairs

    world = OmegaConf.to_object(OmegaConf.structured(WorldConfig))
    rng = random.Random(seed)
    train, _ = world_split(world)
    prompts = [train[rng.randrange(len(train))] for _ in range(n)]
    first = [sample_response(p, rng.choice(STYLES), rng) for p in prompts]
    second = [sample_response(p, rng.choice(STYLES), rng) for p in prompts]
    with open(path, "w") as f:
        for row in label_pairs(world, prompts, first, second, rng):
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def preference_file(tmp_path_factory) -> Path:
    return write_preference_rows(tmp_path_factory.mktemp("preferences") / "train.jsonl", 40)


@pytest.fixture
def offline_cfg(smoke_cfg, preference_file):
    """The smoke experiment under an offline algorithm, on the tiny preference file: 40 rows in batches of 16,
    3 steps per stage."""
    def make(algorithm: str, *overrides: str):
        return smoke_cfg(f"algorithm={algorithm}", f"algorithm.preferences.path={preference_file}",
                         "algorithm.batch_size=16", "algorithm.micro_batch_size=8", *overrides)
    return make


def make_offline(cfg, run_dir: Path):
    from repo_exp.offline import OfflineTrainer

    return OfflineTrainer(validate(cfg), cfg, run_dir)


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows_of(run_dir)]


# ------------------------------------------------------------------------------------------------- the loss


def _tiny_models(seed: int = 0):
    from transformers import LlamaForCausalLM

    from repo_exp.config import ArchConfig
    from repo_exp.models.policy import tiny_llama_config
    from repo_exp.world import world_tokenizer

    tokenizer = world_tokenizer()
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(tiny_llama_config(ArchConfig(hidden_size=32, intermediate_size=64), tokenizer))
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs, so that the log-ratios are not zero
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return tokenizer, policy, reference


def test_dpo_loss_equals_trl_dpo_trainer_loss(tmp_path):
    """Chosen and rejected log-probabilities of a tiny model on a hand-built batch of three pairs with prompts and
    responses of different lengths: TRL's own ``DPOTrainer`` loss (sigmoid, β 0.1, right-padded rows) and its logged
    statistics equal ``dpo_loss`` on ``pair_logps`` of the project's layout within 1e-6."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from repo_exp.offline import pair_logps

    tokenizer, policy, reference = _tiny_models()
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.1)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]}))
    generator = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(4, len(tokenizer), (n,), generator=generator).tolist()

    prompts, chosen, rejected = [ids(4), ids(6), ids(3)], [ids(3), ids(5), ids(2)], [ids(4), ids(2), ids(6)]
    # TRL's batch: prompt + completion, right-padded, the chosen rows first
    rows = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    completion = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts * 2, chosen + rejected)]
    width = max(map(len, rows))
    trl_batch = {"input_ids": torch.zeros(6, width, dtype=torch.long),
                 "attention_mask": torch.zeros(6, width, dtype=torch.long),
                 "completion_mask": torch.zeros(6, width, dtype=torch.long)}
    for i, (row, mask) in enumerate(zip(rows, completion)):
        trl_batch["input_ids"][i, : len(row)] = torch.tensor(row)
        trl_batch["attention_mask"][i, : len(row)] = 1
        trl_batch["completion_mask"][i, : len(row)] = torch.tensor(mask)
    policy.train()
    trl_loss = trainer._compute_loss(policy, trl_batch, return_outputs=False)
    trl_figures = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # the project's batch: prompts left-padded, responses right-padded
    p_width, r_width = max(map(len, prompts)), max(map(len, chosen + rejected))
    sequences = torch.zeros(6, p_width + r_width, dtype=torch.long)
    attention = torch.zeros_like(sequences)
    for i, (p, r) in enumerate(zip(prompts * 2, chosen + rejected)):
        sequences[i, p_width - len(p): p_width] = torch.tensor(p)
        sequences[i, p_width: p_width + len(r)] = torch.tensor(r)
        attention[i, p_width - len(p): p_width + len(r)] = 1
    batch = PairBatch(sequences, attention, attention[:, p_width:].clone(), p_width, torch.ones(3, dtype=torch.bool),
                      torch.ones(3, dtype=torch.bool))
    chosen_logps, rejected_logps = pair_logps(policy, batch)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logps(reference, batch)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, 0.1)

    assert abs(losses.mean().item() - trl_loss.item()) < 1e-6
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the reference differs: not the trivial log 2
    ours = dpo_figures(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(ours[key].item() - trl_figures[key]) < 1e-6, key
    for key in ("logps/chosen", "logps/rejected"):  # sums of ~5 log-probabilities of ~6 nats each
        assert abs(ours[key].item() - trl_figures[key]) < 1e-5 * abs(trl_figures[key]), key
    losses.mean().backward()  # the loss reaches the policy's parameters
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)


def test_dpo_loss_and_safedpo_margin_by_hand():
    chosen, rejected = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    # h = (0.5 − (−0.5)) = 1 and (0 − 0.5) = −0.5; loss = log(1 + exp(−β·h))
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-0.5)), math.log1p(math.exp(0.25))], abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([0.25, 0.0])
    assert rejected_rewards.tolist() == pytest.approx([-0.25, 0.25])
    # SafeDPO: Δ·(h̃_l − h̃_w) = Δ on a safe-over-unsafe pair only
    margins = safety_margins(torch.tensor([True, True]), torch.tensor([False, True]), delta=2.0)
    assert margins.tolist() == [2.0, 0.0]
    losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, margins=margins)
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(1.5)), math.log1p(math.exp(0.25))], abs=1e-7)


# ------------------------------------------------------------------------------------------------- the pairs


def _row(better: int, safer: int, safe0: bool, safe1: bool, prompt: str = "p") -> dict:
    return {"prompt": prompt, "response_0": f"{prompt}-a", "response_1": f"{prompt}-b", "is_response_0_safe": safe0,
            "is_response_1_safe": safe1, "better_response_id": better, "safer_response_id": safer}


def test_safedpo_pairs_rank_safety_first_then_helpfulness():
    rows = [
        _row(0, 0, True, False, "kept"),  # the better response is the safe one: kept, with the margin
        _row(0, 1, False, True, "swapped"),  # the better one is unsafe, the other safe: the safe one wins
        _row(1, 0, True, True, "both_safe"),  # both safe: helpfulness decides, no margin
        _row(0, 1, False, False, "both_unsafe"),  # both unsafe: left out (SafeDPO) or ranked by helpfulness
    ]
    pairs = safety_first_pairs(rows)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("kept", "kept-a", "kept-b"), ("swapped", "swapped-b", "swapped-a"), ("both_safe", "both_safe-b",
                                                                              "both_safe-a")]
    assert [(p.chosen_safe, p.rejected_safe) for p in pairs] == [(True, False), (True, False), (True, True)]
    margins = safety_margins(torch.tensor([p.chosen_safe for p in pairs]),
                             torch.tensor([p.rejected_safe for p in pairs]), delta=5.0)
    assert margins.tolist() == [5.0, 5.0, 0.0]
    kept = safety_first_pairs(rows, both_unsafe="helpfulness")
    assert kept[:3] == pairs and (kept[3].chosen, kept[3].rejected) == ("both_unsafe-a", "both_unsafe-b")
    assert not any(p.rejected_safe and not p.chosen_safe for p in kept)  # never an unsafe response over a safe one
    with pytest.raises(ValueError, match="both_unsafe"):
        safety_first_pairs(rows, both_unsafe="keep")


def test_sacpo_pairs_follow_better_and_safer_labels():
    """Helpfulness: chosen = response_{better_response_id}; safety: chosen = response_{safer_response_id}, for every
    row, whatever the is_safe labels say (as the SACPO authors prepare PKU-SafeRLHF)."""
    rows = [_row(0, 1, True, False, "x"), _row(1, 0, False, False, "y"), _row(1, 1, False, True, "z")]
    assert [p.chosen for p in helpfulness_pairs(rows)] == ["x-a", "y-b", "z-b"]
    assert [p.chosen for p in safety_pairs(rows)] == ["x-b", "y-a", "z-b"]
    assert [p.rejected for p in safety_pairs(rows)] == ["x-a", "y-b", "z-a"]


def test_a_preference_row_with_a_missing_or_bad_field_is_named():
    with pytest.raises(ValueError, match=r"row 2 lacks .*safer_response_id"):
        safety_pairs([_row(0, 0, True, True), {k: v for k, v in _row(0, 0, True, True).items()
                                               if k != "safer_response_id"}])
    with pytest.raises(ValueError, match="row 1: better_response_id is 2"):
        helpfulness_pairs([{**_row(0, 0, True, True), "better_response_id": 2}])


def test_interpolate_weights_is_the_p_sacpo_average():
    first = {"w": torch.tensor([0.0, 2.0]), "ids": torch.tensor([1, 2])}
    second = {"w": torch.tensor([4.0, 6.0]), "ids": torch.tensor([1, 2])}
    merged = interpolate_weights(first, second, 0.25)
    assert merged["w"].tolist() == [1.0, 3.0] and merged["ids"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="differ"):
        interpolate_weights(first, {"w": second["w"]}, 0.5)


def test_batches_cover_every_pair_once_per_epoch_in_a_seeded_order():
    from repo_exp.offline import batch_indices

    epoch0 = [batch_indices(10, 4, seed=0, stage=0, step=s) for s in range(3)]
    assert [len(b) for b, _, _ in epoch0] == [4, 4, 2] and sorted(sum((b for b, _, _ in epoch0), [])) == list(range(10))
    assert batch_indices(10, 4, 0, 0, 3)[1:] == (1, 0)  # the next epoch, a new order
    assert batch_indices(10, 4, 0, 0, 3)[0] != epoch0[0][0]
    assert batch_indices(10, 4, 0, 0, 1) == epoch0[1]  # a function of its arguments alone (resume)
    assert batch_indices(10, 4, 1, 0, 0)[0] != epoch0[0][0]  # the seed changes the order


def test_pair_encoder_pads_prompts_left_and_responses_right_with_eos():
    from repo_exp.world import world_tokenizer

    tokenizer = world_tokenizer()
    template = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
    pairs = [PreferencePair("how do i brew tea .", "sure ! start slowly .", "no .", True, False),
             PreferencePair("hi", "sure ! practice a little every day .", "", True, True),
             PreferencePair("brew tea " * 30, "a", "b", True, True)]  # a prompt too long: left out
    encoder = PairEncoder(pairs, tokenizer, template, max_prompt_length=20, max_new_tokens=5)
    assert len(encoder) == 2
    batch = encoder.batch([0, 1])
    eos, p = tokenizer.eos_token_id, batch.prompt_width
    prompt = tokenizer(template.format(input="hi"))["input_ids"]
    assert batch.sequences[1, p - len(prompt): p].tolist() == prompt and batch.attention_mask[1, : p - len(prompt)].sum() == 0
    chosen, rejected = (tokenizer(text)["input_ids"] + [eos] for text in ("sure ! start slowly .", "no ."))
    assert len(chosen) == 6 and batch.sequences[0, p: p + 5].tolist() == chosen[:5]  # cut to max_new_tokens
    assert batch.sequences[2, p: p + 3].tolist() == rejected  # the rejected rows follow the chosen ones
    assert batch.response_mask.sum(-1).tolist() == [5, 5, 3, 1]  # chosen 0, chosen 1, rejected 0, rejected 1
    assert batch.sequences[3, p].item() == eos  # an empty response is its EOS
    assert batch.chosen_safe.tolist() == [True, True] and batch.rejected_safe.tolist() == [False, True]


# ------------------------------------------------------------------------------------------------- end to end


ORACLE_FIGURES = ("oracle/prompt_violation_rate", "oracle/answerable_helpfulness", "oracle/overrefusal_rate",
                  "oracle/harmful_refusal_rate", "oracle/safe_reward_mean", "oracle/unsafe_rate")


@pytest.mark.parametrize("algorithm", ["sacpo", "safe_dpo"])
def test_smoke_run_writes_the_rl_run_folder(algorithm, offline_cfg, tmp_path):
    """``python -m repo_exp algorithm=…`` at smoke size: metrics with TRL's DPO figures, the initial and final
    evaluations through the RL runs' ``evaluate_models`` (learned-model and oracle figures), and a checkpoint with a
    manifest, the policy, the optimizer, the RNG states and the data position."""
    from repo_exp.train import train

    cfg = offline_cfg(algorithm, "trainer.num_threads=1")
    assert cfg.constraint.name == "none"  # the preset sets it
    summary = train(cfg, tmp_path)
    steps = 6 if algorithm == "sacpo" else 3  # 40 rows in batches of 16; SafeDPO leaves out the two-unsafe pairs
    rows = rows_of(tmp_path)
    step_rows = [r for r in rows if "loss/dpo" in r]
    assert [r["step"] for r in step_rows] == list(range(1, steps + 1))
    for key in ("dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/accuracies", "dpo/rewards/margins",
                "dpo/logps/chosen", "dpo/logps/rejected", "dpo/beta", "dpo/stage", "grad_norm/actor", "lr/actor",
                "timing/step"):
        assert all(math.isfinite(r[key]) for r in step_rows), key
    assert {r["dpo/stage"] for r in step_rows} == ({1.0, 2.0} if algorithm == "sacpo" else {1.0})
    assert step_rows[-1]["dpo/rewards/margins"] != 0.0  # the policy moved away from its reference
    for folder in (tmp_path / "eval", tmp_path / "eval" / "initial"):
        written = json.loads((folder / "summary.json").read_text())
        assert all(key in written for key in ORACLE_FIGURES)
        assert "eval/reward_mean" in written and "eval/mean_cost" in written  # the learned models' figures
        assert (folder / "per_prompt.jsonl").is_file()
    assert summary["eval/step"] == steps and not any(k.startswith("train/lambda") for k in summary)
    folder = CheckpointManager(tmp_path / "checkpoints").latest_complete()
    assert folder.name == f"step_{steps:06d}" and verify(folder) is None
    state = json.loads((folder / "state.json").read_text())
    assert state["algorithm"] == algorithm and state["constraint_name"] == "none"
    assert state["data"] == {"stage": 2 if algorithm == "sacpo" else 1, "epoch": 1, "batch": 0}
    assert (folder / "actor.optim.pt").is_file() and (folder / "rng.pt").is_file()
    assert (folder / "reference").is_dir() == (algorithm == "sacpo")  # the safety stage's reference


def _stage_probe(trainer, monkeypatch) -> dict:
    """Records, at each stage's entry, the policy's weights as the previous stage left them, the reference and the
    optimizer of the new stage, and the β of every loss call."""
    import repo_exp.offline as offline

    seen = {"betas": [], "entered": []}
    enter = trainer._enter_stage

    def probe_enter(index, reference=None):
        before = {k: v.clone() for k, v in trainer.models.policy.module.state_dict().items()}
        enter(index, reference)
        seen["entered"].append({"index": index, "policy_before": before,
                                "reference": {k: v.clone() for k, v in trainer.reference.state_dict().items()},
                                "reference_is_initial": trainer.reference is trainer.models.ref,
                                "optimizer_state": len(trainer.models.policy.optimizer.state),
                                "chosen": [p[1] for p in trainer.stages[index].pairs.encoded],
                                "reference_logps": trainer.reference_logps[0].clone()})

    def probe_loss(*args, **kwargs):
        seen["betas"].append(args[4])
        return offline_loss(*args, **kwargs)

    offline_loss = offline.dpo_loss
    monkeypatch.setattr(trainer, "_enter_stage", probe_enter)
    monkeypatch.setattr(offline, "dpo_loss", probe_loss)
    return seen


def test_sacpo_second_stage_starts_from_the_first_stages_weights_with_beta_over_lambda(offline_cfg, tmp_path,
                                                                                       monkeypatch):
    from repo_exp.offline import pair_logps

    cfg = offline_cfg("sacpo", *QUICK, "algorithm.beta=0.1", "algorithm.multiplier=4")
    trainer = make_offline(cfg, tmp_path)
    sft = {k: v.clone() for k, v in trainer.models.ref.state_dict().items()}
    seen = _stage_probe(trainer, monkeypatch)
    trainer.fit()
    first, second = seen["entered"]
    assert first["reference_is_initial"] and not second["reference_is_initial"]
    # stage 2's reference is the policy stage 1 ended with, which moved away from the SFT model
    end_of_first = second["policy_before"]
    assert all(torch.equal(second["reference"][k], end_of_first[k]) for k in end_of_first)
    assert any(not torch.equal(end_of_first[k], sft[k]) for k in sft)
    assert second["optimizer_state"] == 0  # a fresh optimizer for the new stage
    # β for the helpfulness pairs, β/λ for the safety pairs (40 pairs a stage in batches of 16, 16 and 8, in
    # micro-batches of 8: five loss calls a stage)
    assert seen["betas"] == [0.1] * 5 + [pytest.approx(0.025)] * 5
    rows = [json.loads(line) for line in open(cfg.algorithm.preferences.path)]
    encoder = trainer.stages[0].pairs
    assert first["chosen"] == [encoder._response_ids(r["prompt"], r[f"response_{r['better_response_id']}"])[:16]
                               for r in rows]
    assert second["chosen"] == [encoder._response_ids(r["prompt"], r[f"response_{r['safer_response_id']}"])[:16]
                                for r in rows]
    # and its reference log-probabilities are the stage-1 policy's
    model = copy.deepcopy(trainer.models.policy.module)
    model.load_state_dict(end_of_first)
    with torch.no_grad():
        expected, _ = pair_logps(model, trainer.stages[1].pairs.batch(range(8)))
    assert torch.allclose(second["reference_logps"][:8], expected, atol=1e-5)


def test_sacpo_in_the_reverse_order_aligns_safety_first_with_beta_over_lambda(offline_cfg, tmp_path, monkeypatch):
    cfg = offline_cfg("sacpo", *QUICK, "algorithm.beta=0.1", "algorithm.multiplier=4", "algorithm.order=safety_first")
    trainer = make_offline(cfg, tmp_path)
    seen = _stage_probe(trainer, monkeypatch)
    trainer.fit()
    assert [s.name for s in trainer.stages] == ["safety", "helpfulness"]
    assert seen["betas"] == [pytest.approx(0.025)] * 5 + [0.1] * 5


def test_p_sacpo_averages_the_two_stages_weights(offline_cfg, tmp_path, monkeypatch):
    cfg = offline_cfg("sacpo", *QUICK, "algorithm.merge_weight=0.25")
    trainer = make_offline(cfg, tmp_path)
    merge = trainer._merge
    seen = {}

    def probe_merge(weight):
        seen["helpfulness"] = {k: v.clone() for k, v in trainer.reference.state_dict().items()}
        seen["safety"] = {k: v.clone() for k, v in trainer.models.policy.module.state_dict().items()}
        merge(weight)

    monkeypatch.setattr(trainer, "_merge", probe_merge)
    trainer.fit()
    final = trainer.models.policy.module.state_dict()
    for key, value in final.items():
        assert torch.allclose(value, 0.75 * seen["helpfulness"][key] + 0.25 * seen["safety"][key], atol=1e-6), key
    assert rows_of(tmp_path)[-1]["dpo/merge_weight"] == 0.25


# ------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("algorithm,stops,extra", [("sacpo", (2, 3, 5), ()), ("safe_dpo", (1,), ()),
                                                  ("sacpo", (5,), ("model.lora.rank=4",))],
                         ids=["sacpo", "safe_dpo", "sacpo_lora"])
def test_a_run_stopped_mid_stage_and_resumed_equals_one_never_stopped(algorithm, stops, extra, offline_cfg, tmp_path,
                                                                      monkeypatch):
    """SIGTERM during a step (in SACPO's first stage, at its last step, then in its second): the step finishes, its
    checkpoint is written, the run returns; ``trainer.resume=auto`` continues at the next step. Every metric row and
    the final weights equal an uninterrupted run's (timings apart); under LoRA adapters too (the second stage's
    reference is then its adapters on the shared base)."""
    overrides = (*QUICK, "eval.at_start=true", "eval.at_end=true", *extra)
    reference = tmp_path / "reference"
    make_offline(offline_cfg(algorithm, *overrides), reference).fit()

    run_dir = tmp_path / "run"
    resume = ()
    for stop in stops:
        trainer = make_offline(offline_cfg(algorithm, *overrides, *resume), run_dir)
        step_once = trainer.train_step

        def step_then_signal(step: int, step_once=step_once, stop=stop):
            metrics = step_once(step)
            if step + 1 == stop:
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

        monkeypatch.setattr(trainer, "train_step", step_then_signal)
        assert trainer.fit() == {"stopped_at": stop}
        resume = ("trainer.resume=auto",)
    resumed = make_offline(offline_cfg(algorithm, *overrides, *resume), run_dir)
    assert resumed.start_step == stops[-1]
    resumed.fit()
    got, want = comparable(run_dir), comparable(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a == b, {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k)}
    final = CheckpointManager(run_dir / "checkpoints").latest_complete()
    same = CheckpointManager(reference / "checkpoints").latest_complete()
    from repo_exp.models.weights import load_state_dict_safely

    ours, theirs = load_state_dict_safely(final / "policy"), load_state_dict_safely(same / "policy")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_resume_that_changes_the_method_is_refused(offline_cfg, tmp_path):
    from repo_exp import run_folder

    make_offline(offline_cfg("sacpo", *QUICK), tmp_path).fit()
    with pytest.raises(run_folder.ResumeRefused, match="algorithm.multiplier"):
        make_offline(offline_cfg("sacpo", *QUICK, "trainer.resume=auto", "algorithm.multiplier=8"), tmp_path)


# ------------------------------------------------------------------------------------------------- bad input


def test_a_nan_loss_skips_the_step_and_stops_with_the_last_good_state_saved(offline_cfg, tmp_path, monkeypatch):
    import repo_exp.offline as offline
    from repo_exp.train import NonFiniteError

    trainer = make_offline(offline_cfg("safe_dpo", *QUICK, "trainer.max_nonfinite_in_a_row=2"), tmp_path)
    loss = offline.dpo_loss
    monkeypatch.setattr(offline, "dpo_loss",
                        lambda *args, **kwargs: (loss(*args, **kwargs)[0] * float("nan"), *loss(*args, **kwargs)[1:]))
    before = {k: v.clone() for k, v in trainer.models.policy.module.state_dict().items()}
    with pytest.raises(NonFiniteError, match="2 steps in a row were skipped .the DPO loss is nan"):
        trainer.fit()
    assert [r.get("guard/skipped") for r in rows_of(tmp_path)] == [1.0, 1.0]
    saved = CheckpointManager(tmp_path / "checkpoints").latest_complete()
    assert saved is not None and verify(saved) is None
    after = trainer.models.policy.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no parameter moved


@pytest.mark.parametrize("overrides,message", [
    (("algorithm=sacpo", "constraint=average"), "its constraint is none"),
    (("algorithm=safe_dpo", "deepspeed=zero2"), "plain torch engines"),
    (("algorithm=sacpo", "trainer.epochs=2"), "algorithm.epochs"),
    (("algorithm=sacpo", "algorithm.order=safety_first", "algorithm.merge_weight=0.5"), "helpfulness_first"),
    (("algorithm=sacpo", "algorithm.multiplier=0"), "algorithm.multiplier must be a positive number"),
    (("algorithm=safe_dpo", "algorithm.both_unsafe=keep"), "algorithm.both_unsafe must be one of"),
    (("algorithm=safe_dpo", "algorithm.margin=-1"), "algorithm.margin must be >= 0"),
    (("algorithm=sacpo", "algorithm.beta=0"), "algorithm.beta must be a positive number"),
])
def test_bad_algorithm_settings_are_refused_by_name(overrides, message, smoke_cfg):
    with pytest.raises(ConfigError, match=message):
        validate(smoke_cfg(*overrides))


def test_p_sacpo_under_lora_adapters_is_refused(offline_cfg, tmp_path):
    with pytest.raises(ConfigError, match="averages whole weights"):
        make_offline(offline_cfg("sacpo", *QUICK, "algorithm.merge_weight=0.5", "model.lora.rank=4"), tmp_path)


def test_the_rl_trainer_refuses_an_offline_config_and_the_world_rows_need_the_world(offline_cfg, smoke_cfg,
                                                                                    tmp_path):
    from repo_exp.train import Trainer

    cfg = offline_cfg("sacpo", *QUICK)
    with pytest.raises(ConfigError, match="trained by repo_exp.offline.OfflineTrainer"):
        Trainer(validate(cfg), cfg, tmp_path / "rl")
    # the smoke models are tiny random ones: the world (and its preference rows) is not built for them
    with pytest.raises(ConfigError, match="algorithm.preferences.path"):
        make_offline(smoke_cfg("algorithm=sacpo", *QUICK), tmp_path / "no_rows")


def test_a_preference_file_without_a_label_column_is_named(offline_cfg, tmp_path):
    bad = tmp_path / "rows.jsonl"
    rows = [{k: v for k, v in _row(0, 0, True, True).items() if k != "is_response_1_safe"}] * 3
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"rows.jsonl lacks the PKU-SafeRLHF column.*is_response_1_safe"):
        make_offline(offline_cfg("safe_dpo", *QUICK, f"algorithm.preferences.path={bad}"), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_with_data_pku_saferlhf_the_rows_come_from_the_data_set(smoke_cfg, preference_file, tmp_path):
    """``data=pku_saferlhf`` (here a local file in its schema, which serves every split): the offline method trains on
    its preference rows and evaluates on its prompts, with the learned models' figures (no oracle there)."""
    from repo_exp.train import train

    cfg = smoke_cfg("algorithm=safe_dpo", "data=pku_saferlhf", f"data.path={preference_file}", "data.revision=null",
                    "algorithm.batch_size=16", "trainer.num_threads=1", "eval.at_start=false")
    summary = train(cfg, tmp_path)
    assert "dpo/pairs" in rows_of(tmp_path)[0]
    assert rows_of(tmp_path)[0]["dpo/pairs"] == 36  # the 40 rows less the pairs of two unsafe responses
    assert "eval/reward_mean" in summary and not any(k.startswith("oracle/") for k in summary)
