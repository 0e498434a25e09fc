"""The benchmark's bookkeeping (medians, paired ratios, fitted exponents, the results file), and its two runners at toy
size: ours through the real ``Trainer``, trl's ``PPOTrainer`` on the same weights. No timing is asserted: speed is
measured by ``make bench``, never by a test."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from bench import report
from bench.ours import CRITIC_FREE, SIZES, Ours, bare_passes, composes, overrides

from conftest import repo_root


def test_paired_ratios_and_their_median_by_hand():
    ours = [2.0, 1.0, 3.0, 1.5]
    trl = [4.0, 4.0, 3.0, 2.0]
    assert report.paired_ratios(ours, trl) == [0.5, 0.25, 1.0, 0.75]
    vs = report.side_by_side(trl, {"none": ours})
    assert vs["none"]["ratio"] == pytest.approx(0.625)  # median of 0.25, 0.5, 0.75, 1.0
    assert vs["trl_seconds_per_iteration"] == pytest.approx(3.5)
    with pytest.raises(ValueError, match="as many rounds"):
        report.paired_ratios([1.0], [1.0, 2.0])


def test_fitted_exponent_recovers_a_power_law_and_refuses_one_point():
    xs = [8, 16, 32, 64]
    assert report.fit_exponent(xs, [3.0 * x**0.9 for x in xs]) == pytest.approx(0.9)
    assert report.fit_exponent([32, 64, 128], [0.5, 1.0, 2.0]) == pytest.approx(1.0)
    # a fixed cost plus a linear part grows more slowly than linearly: exponent below 1
    assert report.fit_exponent(xs, [1.0 + 0.1 * x for x in xs]) < 1.0
    with pytest.raises(ValueError):
        report.fit_exponent([16], [1.0])


def test_summary_of_runs_medians_and_overhead():
    iterations = [{"seconds": s, "rollout_tokens_per_s": 100.0 * s, "update_tokens_per_s": 10.0,
                   "response_tokens": 64.0, "timing/generate": s / 2} for s in (1.0, 3.0, 2.0)]
    bares = [{"generate": 0.4, "total": t} for t in (0.5, 2.0, 1.0)]
    out = report.summarize_runs(iterations, bares, peak_rss_mb=123.0)
    assert out["seconds_per_iteration"] == 2.0
    assert out["rollout_tokens_per_s"] == 200.0
    assert out["sections"] == {"generate": 1.0}
    assert out["overhead_ratios"] == [2.0, 1.5, 2.0]
    assert out["overhead_ratio"] == 2.0
    assert out["bare_passes"] == {"generate": 0.4, "total": 1.0}
    assert out["peak_rss_mb"] == 123.0


def test_update_work_follows_tokens_by_hand():
    def its(update, tokens, longest):
        return [{"timing/update": u, "response_tokens": t, "longest_response": n, "padded_response_tokens": 4 * n}
                for u, t, n in zip(update, tokens, longest)]

    uniform = report.update_work(its([2.0, 2.2, 2.0], [256, 256, 256], [64, 64, 64]))
    grouped = report.update_work(its([0.5, 0.6, 0.55], [64, 64, 60], [60, 64, 64]))
    padded = report.update_work(its([1.9, 2.0, 2.1], [64, 64, 60], [60, 64, 64]))
    assert uniform["update_seconds"] == 2.0 and uniform["response_tokens"] == 256
    assert uniform["update_ms_per_generated_token"] == pytest.approx(1e3 * 2.0 / 256)
    out = report.follows_tokens(uniform, grouped, padded)
    assert out["token_ratio"] == pytest.approx(0.25)  # median of 0.25, 0.25, 60/256
    assert out["padded_token_ratio"] == pytest.approx(1.0)  # median of 60/64, 1, 1
    assert out["grouped_time_ratio"] == pytest.approx(0.6 / 2.2)  # median of 0.25, 0.6/2.2 = 0.273, 0.275
    assert out["padded_time_ratio"] == pytest.approx(0.95)  # median of 0.95, 2/2.2 = 0.909, 1.05


def test_fit_line_by_hand():
    exact = report.fit_line([1, 2, 3], [3, 5, 7])
    assert exact["intercept"] == pytest.approx(1.0) and exact["slope"] == pytest.approx(2.0) and exact["r2"] == 1.0
    # x̄ 1.5, ȳ 2.25, Sxy 4.5, Sxx 5: slope 0.9, intercept 0.9; residuals 0.1, 0.2, −0.7, 0.4 → R² = 1 − 0.7/4.75
    noisy = report.fit_line([0, 1, 2, 3], [1, 2, 2, 4])
    assert noisy["slope"] == pytest.approx(0.9) and noisy["intercept"] == pytest.approx(0.9)
    assert noisy["r2"] == pytest.approx(1 - 0.7 / 4.75)
    with pytest.raises(ValueError, match="two distinct"):
        report.fit_line([2, 2], [1, 3])


def test_update_time_is_fitted_against_prompt_and_response_tokens():
    def its(update, sequence):
        return [{"timing/update": u, "response_tokens": t - 100, "sequence_tokens": t, "longest_response": 64,
                 "padded_response_tokens": 256, "micro_batches": 4, "padding": 0.1} for u, t in zip(update, sequence)]

    # seconds = 0.1 + 0.001 · tokens on the uniform and grouped runs; the padded run stays at the uniform's time
    uniform = report.update_work(its([1.1, 1.1], [1000, 1000]))
    grouped = report.update_work(its([0.6, 0.5], [500, 400]))
    short = report.update_work(its([0.3], [200]))
    padded = report.update_work(its([1.1, 1.0], [500, 400]))
    assert uniform["micro_batches"] == 4 and uniform["padding"] == pytest.approx(0.1)
    out = report.follows_tokens(uniform, grouped, padded, [short])
    assert out["sequence_token_ratio"] == pytest.approx(0.45)  # median of 0.5, 0.4
    assert out["token_ratio"] == pytest.approx((400 / 900 + 300 / 900) / 2)
    assert out["grouped_time_ratio"] == pytest.approx((0.6 / 1.1 + 0.5 / 1.1) / 2)
    assert out["fit"]["slope"] == pytest.approx(1e-3) and out["fit"]["intercept"] == pytest.approx(0.1)
    assert out["fit"]["r2"] == pytest.approx(1.0) and out["fit"]["fixed_share"] == pytest.approx(0.1 / 1.1)


def test_critic_free_rows_run_k_samples_per_prompt_and_skip_when_they_do_not_compose():
    args = overrides("1M", "rectified_rloo", batch=8, new_tokens=6, threads=1)
    assert {"estimator=rloo", "constraint=rectified", "trainer.samples_per_prompt=4",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=8"} <= set(args)
    assert not any(a.startswith("trainer.shared_critic") for a in args)  # no critic to share
    assert {"estimator=grpo", "constraint=average"} <= set(overrides("1M", "average_grpo", 8, 6, 1))
    assert len(CRITIC_FREE) == 4
    assert composes(overrides("1M", "rectified", batch=8, new_tokens=6, threads=1)) is None
    why = composes(overrides("1M", "rectified", 8, 6, 1) + ["estimator=no_such_estimator"])
    assert why is not None and "estimator" in why


def test_the_eos_bias_stops_responses_at_varied_positions():
    from bench.ours import build_trainer, bias_towards_eos
    from repo_exp.rollout.generate import generate, sampling_generator

    trainer = build_trainer(overrides("1M", "none", batch=16, new_tokens=24, threads=1))
    policy, ref = trainer.models.policy.module, trainer.models.ref
    eos = trainer.models.tokenizer.eos_token_id
    batch = trainer.encoder.batch(list(range(16)), 1)

    def lengths():
        policy.eval()
        gen = generate(policy, batch.input_ids, batch.attention_mask, 24, eos, trainer.models.tokenizer.pad_token_id,
                       sampling_generator(0, 0, 0), slice(0, 16), 16)
        return gen.response_mask.sum(-1).float()

    assert lengths().mean() > 20  # a random model runs to the limit
    weight = bias_towards_eos(policy, eos, 0.15)
    assert bias_towards_eos(ref, eos, 0.15, weight) == weight
    varied = lengths()
    assert 2 < varied.mean() < 16 and varied.std() > 2 and len(set(varied.tolist())) > 5
    assert float(trainer.models.policy.module.lm_head.weight[eos, 0]) == pytest.approx(weight)


def test_benchmark_sizes_have_the_parameter_counts_they_are_named_after():
    vocab = 240  # the world tokenizer; embeddings and LM head untied

    def count(a):
        h, i, n = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
        kv = h // a["num_attention_heads"] * a["num_key_value_heads"]
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return n * per_layer + 2 * vocab * h + h

    for name, target in (("1M", 1e6), ("10M", 1e7), ("30M", 3e7)):
        assert 0.85 < count(SIZES[name]) / target < 1.15, name


@pytest.fixture(scope="module")
def toy_ours():
    """Our trainer at the 1M size, batch 2, 6 new tokens, through the composed config and ``Trainer``."""
    return Ours(overrides("1M", "rectified", batch=2, new_tokens=6, threads=1))


def test_our_iteration_reports_its_throughput_from_the_trainers_own_metrics(toy_ours):
    out = toy_ours.iteration()
    assert out["seconds"] > 0
    assert 0 < out["response_tokens"] <= 2 * 6
    assert out["rollout_tokens_per_s"] == pytest.approx(out["response_tokens"] / out["timing/rollout"], rel=1e-6)
    assert out["update_tokens_per_s"] == pytest.approx(out["response_tokens"] / out["timing/update"], rel=1e-6)
    config = toy_ours.trainer.config
    assert config.trainer.mixed_precision == "bf16" and config.trainer.shared_critic
    assert toy_ours.info()["parameters"] == sum(p.numel() for p in toy_ours.trainer.models.policy.module.parameters())


def test_bare_passes_time_every_pass_and_change_no_weight(toy_ours):
    toy_ours.iteration()
    models = toy_ours.trainer.models
    before = {n: p.detach().clone() for n, p in models.policy.module.named_parameters()}
    timings = bare_passes(toy_ours.trainer)
    assert set(timings) == {"generate", "ref", "reward", "cost", "critic", "policy", "total"}
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items() if k != "total"))
    assert all(v > 0 for v in timings.values())
    after = dict(models.policy.module.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in before.items())
    assert all(p.grad is None for e in models.engines for p in e.module.parameters())
    assert models.policy.module.training  # left as the update expects it


def test_trl_runs_on_the_same_weights_and_one_iteration_is_one_ppo_step():
    pytest.importorskip("trl")
    from bench.ours import build_trainer
    from bench.trl_ppo import TrlPPO

    threads = torch.get_num_threads()
    ours = build_trainer(overrides("1M", "none", batch=2, new_tokens=6, threads=threads, fast=False))
    runner = TrlPPO(ours, attn="eager")
    policy, reward = ours.models.policy.module.state_dict(), ours.models.reward.model
    trl_policy = runner.trainer.model.policy.state_dict()
    assert all(torch.equal(policy[k], trl_policy[k]) for k in policy)
    torch.testing.assert_close(runner.trainer.reward_model.score.weight, reward.score_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(runner.trainer.value_model.score.weight, reward.score_head.weight, rtol=0, atol=0)
    args = runner.trainer.args
    assert (args.batch_size, args.response_length, args.num_ppo_epochs, args.num_mini_batches) == (2, 6, 1, 1)
    assert not args.gradient_checkpointing and not args.bf16
    for model in (runner.trainer.model.policy, runner.trainer.model.value_model, runner.trainer.reward_model,
                  runner.trainer.ref_model):  # all four models run the attention kernel asked for
        assert model.config._attn_implementation == "eager"
    seconds = runner.iteration()["seconds"]
    assert seconds > 0
    assert runner.trainer.state.global_step == 1  # one PPO iteration per call
    moved = runner.trainer.model.policy.state_dict()
    assert any(not torch.equal(policy[k], moved[k]) for k in policy), "the iteration took an optimizer step"


@pytest.mark.slow
def test_quick_benchmark_writes_every_figure(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), "--threads", "1"],
                          cwd=repo_root(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    vs = results["vs_trl"]
    for key in ("none", "rectified"):
        assert math.isfinite(vs[key]["ratio"]) and len(vs[key]["ratios"]) == 2 and vs[key]["peak_rss_mb"] > 0
    setups = vs["trl_setups"]
    assert set(setups) == {"bf16_sdpa", "bf16_eager", "fp32_sdpa", "fp32_eager"}
    assert vs["baseline"] == min(setups, key=lambda k: setups[k]["seconds_per_iteration"])
    assert vs["trl_seconds"] == setups[vs["baseline"]]["seconds"]
    assert all(x["peak_rss_mb"] > 0 and len(x["seconds"]) == 2 for x in setups.values())
    for row in CRITIC_FREE:  # measured where the estimator exists, else skipped with the reason
        assert ("skipped" in vs[row]) != ("ratio" in vs[row])
        if "ratio" in vs[row]:
            assert math.isfinite(vs[row]["ratio"]) and vs[row]["peak_rss_mb"] > 0
    assert results["machine"]["cpu"] and isinstance(results["machine"]["cpu_flags"], list)
    assert results["machine"]["attention_probe"] and vs["none"]["ratio"] > 0
    assert results["sizes"]["1M"]["none"]["attention"] in ("sdpa", "eager")
    variable = results["variable_length"]
    for key in ("token_ratio", "padded_token_ratio", "grouped_time_ratio", "padded_time_ratio"):
        assert math.isfinite(variable[key]) and variable[key] > 0
    assert variable["token_ratio"] < 1  # the biased policy stopped before the limit
    assert variable["sequence_token_ratio"] < 1 and "r2" in variable["fit"]
    assert variable["uniform"]["micro_batches"] >= 1 and 0 <= variable["varied_grouped"]["padding"] < 1
    assert math.isfinite(results["overhead"]["ratio"])
    for constraint in ("none", "average", "rectified"):
        row = results["sizes"]["1M"][constraint]
        for key in ("seconds_per_iteration", "rollout_tokens_per_s", "update_tokens_per_s", "peak_rss_mb",
                    "overhead_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (constraint, key)
    assert {"cores", "threads", "torch", "load_average_start", "load_average_end"} <= set(results["machine"])
    assert results["machine"]["threads"] == 1 and results["settings"]["rounds"] == 2
    for axis in ("batch", "response_length"):
        assert math.isfinite(results["scaling"][axis]["exponent"])
    assert "ours/trl" in done.stdout
    smollm = results["smollm"]
    for tag in ("full", "lora"):
        block = smollm["side_by_side"][tag]
        assert math.isfinite(block["rows"]["none"]["ratio"]) and block["rows"]["none"]["peak_rss_mb"] > 0
        assert smollm["generation"][tag]["best_ratio"] > 0
    assert smollm["quantization"] == "MOSTLY_Q4_1" and smollm["memory"]["none"]["lora_over_full"] > 0
    assert "SmolLM2" in done.stdout


# --------------------------------------------------------------------------- SmolLM2 (phase 5), on a tiny GGUF here


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return str(path)


def test_smollm_rows_compose_on_the_converted_policy_with_scorers_on_its_trunk(tiny_gguf):
    from bench.smollm import ROWS, overrides as smollm_overrides, score_folder
    from repo_exp.models.score_model import load_score_model

    from tiny_gguf import TOKENS

    reward = load_score_model(score_folder("reward", tiny_gguf))
    assert reward.score_type == "reward" and reward.config.vocab_size == len(TOKENS)  # the policy's: no re-tokenising
    for row in ROWS:
        for lora in (False, True):
            args = smollm_overrides(row, 4, 4, 1, lora, tiny_gguf)
            assert composes(args) is None, (row, lora, composes(args))
            assert ("model.lora.rank=16" in args) == lora and "reward.template=chat" in args
    assert "estimator=rloo" in smollm_overrides("rectified_rloo", 4, 4, 1, False, tiny_gguf)


@pytest.mark.parametrize("lora", [False, True])
def test_the_generation_race_runs_both_samplers_to_the_full_length(tiny_gguf, lora):
    from bench.smollm import GenerationRace, overrides as smollm_overrides

    race = GenerationRace(smollm_overrides("none", 4, 5, 1, lora, tiny_gguf), new_tokens=5)
    assert race.info()["adapters"] == lora and race.info()["rows"] == 4
    for precision in ("fp32", "bf16"):
        for side in (race.ours, race.hf):
            out = side(precision)
            assert out["tokens"] == 4 * 5 and out["seconds"] > 0, (side, precision)


def test_trl_with_lora_trains_its_adapters_with_the_base_as_reference(tiny_gguf):
    pytest.importorskip("trl")
    from bench.ours import build_trainer
    from bench.smollm import overrides as smollm_overrides, trl_lora
    from bench.trl_ppo import TrlPPO

    ours = build_trainer(smollm_overrides("none", 2, 4, 1, False, tiny_gguf, fast=False))
    runner = TrlPPO(ours, lora=trl_lora(True))
    trainer = runner.trainer
    assert trainer.is_peft_model and trainer.ref_model is None
    assert trainer.processing_class.pad_token_id != trainer.processing_class.eos_token_id  # trl masks by pad id
    before = {k: v.clone() for k, v in trainer.model.policy.state_dict().items()}
    runner.iteration()
    after = trainer.model.policy.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("lora_" in k for k in moved)


def test_the_smollm_table_states_every_ratio_and_peak():
    row = {"ratio": 0.5, "ratios": [0.5], "seconds_per_iteration": 2.0, "peak_rss_mb": 900.0}
    block = {"baseline": "fp32_sdpa", "trl_peak_rss_mb": 1000.0,
             "trl_setups": {"fp32_sdpa": {"seconds_per_iteration": 4.0}}, "rows": {"none": row}}
    generation = {"tokens_per_s": {"ours_fp32": 200.0, "hf_fp32": 100.0}, "ratio": {"fp32": 2.0, "bf16": 1.5},
                  "best_ratio": 1.8}
    lines = report.smollm_table({"model": "x.gguf", "quantization": "MOSTLY_Q4_1", "batch": 8, "new_tokens": 64,
                                 "rounds": 1, "side_by_side": {"full": block, "lora": block},
                                 "generation": {"full": generation},
                                 "memory": {"none": {"full_peak_rss_mb": 900.0, "lora_peak_rss_mb": 450.0,
                                                     "lora_over_full": 0.5}}})
    text = "\n".join(lines)
    assert "ours/trl           none: 0.50" in text and "best against best 1.80" in text and "(0.50)" in text
