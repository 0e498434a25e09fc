"""The benchmark at a real size: SmolLM2-135M-Instruct (``model=smollm2_135m``: the package's GGUF file, converted once
into the cache), its real weights and tokenizer, on the world's prompts through its chat template.

Reward and cost models sit on the same trunk (a score head seeded at random on SmolLM2's decoder, written once into
the cache in the published score layout), so that neither side re-tokenises and trl's PPO reads the same four models
as ours: policy, reference, reward model and a critic started from it. Rows, each full fine-tuning and with LoRA
adapters on the policy (``model.lora``; trl's ``peft_config`` with the same rank and modules):

- ours ``none`` (plain PPO, critics), ``rectified`` (a shared two-head critic) and ``rectified_rloo`` (critic-free,
  4 samples per prompt) against trl's ``PPOTrainer`` at its fastest set-up, in alternating rounds;
- generation: our sampler (``repo_exp.rollout.generate``) against transformers' ``generate`` on the same model and
  prompts, every response run to the full length (EOS never ends ours; ``min_new_tokens`` holds transformers' back),
  pure sampling on both sides, in float32 and in bfloat16 (ours under autocast, as ``trainer.mixed_precision=bf16``
  runs; transformers' on a bfloat16 copy of the model).

Each configuration lives in its own process (``bench.worker``): its peak resident memory is its own.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from bench.ours import CRITIC_FREE_SAMPLES, FAST, PLAIN_PPO, SHARED_CRITIC, build_trainer, estimator

ROWS = ("none", "rectified", "rectified_rloo")
PRECISIONS = ("fp32", "bf16")
LORA = {"rank": 16, "alpha": 32}  # on every projection of the attention and the MLP (model.lora's default modules)
SCORE_SEED = {"reward": 11, "cost": 12}


def policy_overrides(gguf: str | None = None) -> list[str]:
    """``model=smollm2_135m``, or the same preset on another GGUF file (a tiny one in the tests)."""
    return ["model=smollm2_135m"] + ([f"model.path={gguf}", "model.revision=null"] if gguf else [])


def policy_folder(gguf: str | None = None) -> Path:
    """The converted SmolLM2 folder in the cache (converted on first use)."""
    from repo_exp.config import compose_config, validate
    from repo_exp.models.gguf import converted_folder

    config = validate(compose_config(policy_overrides(gguf)))
    return converted_folder(config.model.path, config.model.revision, config.world.cache_dir)


def score_folder(kind: str, gguf: str | None = None) -> Path:
    """A score model in the published layout on SmolLM2's decoder, its head seeded at random (cached beside the
    converted policy)."""
    from safetensors.torch import load_file

    from repo_exp.models.weights import save_safetensors

    policy = policy_folder(gguf)
    folder = policy.parent / f"{policy.name}-{kind}-score"
    if (folder / "config.json").is_file():
        return folder
    config = json.loads((policy / "config.json").read_text())
    state = {k: v for k, v in load_file(str(policy / "model.safetensors")).items() if k.startswith("model.")}
    generator = torch.Generator().manual_seed(SCORE_SEED[kind])
    state["score_head.weight"] = torch.randn(1, config["hidden_size"], generator=generator) * config["hidden_size"] ** -0.5
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, tmp / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (policy / name).is_file():
            (tmp / name).write_bytes((policy / name).read_bytes())
    config.update(architectures=["LlamaForScore"], score_dim=1, score_type=kind, score_bias=False,
                  do_normalize=False)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tmp.replace(folder)
    return folder


def overrides(row: str, batch: int, new_tokens: int, threads: int, lora: bool, gguf: str | None = None,
              fast: bool = True) -> list[str]:
    """Our trainer on SmolLM2 (``python -m repo_exp <these>`` runs it); ``fast=False``: without our speed switches
    (the trainer trl's models are copied from)."""
    free = estimator(row)
    k = CRITIC_FREE_SAMPLES if free else 1
    if batch % k:
        raise ValueError(f"batch {batch} is not a multiple of {k} samples per prompt")
    out = [*policy_overrides(gguf), "logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
           f"constraint={'none' if row == 'none' else 'rectified'}", f"trainer.prompts_per_step={batch // k}",
           f"trainer.samples_per_prompt={k}", f"trainer.micro_batch_size={batch}",
           f"trainer.rollout_batch_size={batch}", f"trainer.max_new_tokens={new_tokens}", "trainer.total_steps=1000",
           f"trainer.num_threads={threads}", "trainer.critic_init=score_model", "trainer.shared_critic=false"]
    for kind in ("reward", "cost"):
        out += [f"{kind}.source=hub", f"{kind}.path={score_folder(kind, gguf)}", f"{kind}.tokenizer=null",
                f"{kind}.template=chat"]
    if row == "none":
        out.append(PLAIN_PPO)
    if free:
        out.append(f"estimator={free}")
    if lora:
        out += [f"model.lora.rank={LORA['rank']}", f"model.lora.alpha={LORA['alpha']}"]
    if fast:
        out += list(FAST)
    if row == "rectified":
        out.append(SHARED_CRITIC)
    return out


def trl_lora(lora: bool) -> dict[str, Any] | None:
    """trl's ``peft_config`` for the LoRA rows: the rank, alpha and modules of ours."""
    if not lora:
        return None
    from repo_exp.config import LoraConfig

    return {**LORA, "target_modules": list(LoraConfig().target_modules)}


class GenerationRace:
    """Our sampler and transformers' ``generate`` on the policy of one of our trainers, the same prompts, every
    response ``new_tokens`` long; one call of each timed at a time."""

    def __init__(self, overrides: list[str], new_tokens: int) -> None:
        self.trainer = build_trainer(overrides)
        t = self.trainer.config.trainer
        batch = self.trainer.encoder.batch(list(range(t.prompts_per_step)), 1)
        self.ids, self.mask = batch.input_ids, batch.attention_mask
        self.new_tokens = new_tokens
        self.policy = self.trainer.models.policy.module.eval()
        self.bf16_copy = None
        self.pad = self.trainer.models.tokenizer.pad_token_id

    def info(self) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.policy.parameters()),
                "adapters": type(self.policy).__name__ != "LlamaForCausalLM", "rows": int(self.ids.shape[0]),
                "prompt_width": int(self.ids.shape[1])}

    def ours(self, precision: str) -> dict[str, float]:
        from repo_exp.rollout.generate import generate, sampling_generator

        context = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                   else torch.autocast("cpu", enabled=False))
        rows = self.ids.shape[0]
        start = time.perf_counter()
        with context:
            out = generate(self.policy, self.ids, self.mask, self.new_tokens, eos_token_id=-1, pad_token_id=self.pad,
                           generator=sampling_generator(0, 0, 0), rows=slice(0, rows), global_batch=rows)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": float(out.response_mask.sum())}

    def hf(self, precision: str) -> dict[str, float]:
        model = self.policy
        if precision == "bf16":
            if self.bf16_copy is None:
                import copy

                self.bf16_copy = copy.deepcopy(self.policy).to(torch.bfloat16).eval()
            model = self.bf16_copy
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=self.new_tokens,
                                 min_new_tokens=self.new_tokens, do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0, pad_token_id=self.pad)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": float((out.shape[1] - self.ids.shape[1]) * out.shape[0])}


def _log(message: str) -> None:
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def side_by_side(plan, lora: bool) -> dict[str, Any]:
    """Our rows against trl's set-ups, with or without adapters: the trl workers live through every row, each of our
    rows in its own worker alternating round by round with them; the baseline is trl's fastest set-up (lowest median
    over all its rounds), each row's ratio the median of its rounds' ours / baseline."""
    from bench import report
    from bench.worker import Worker

    batch, tokens, threads, gguf = plan.smollm_batch, plan.smollm_new_tokens, plan.threads, plan.smollm_gguf
    tag = "lora" if lora else "full"
    base = overrides("none", batch, tokens, threads, lora=False, gguf=gguf, fast=False)
    trls = {}
    for setup in plan.smollm_trl_setups:
        precision, attn = setup.split("_")
        spec = {"overrides": base, "bf16": precision == "bf16",
                "attn": attn, "lora": trl_lora(lora)}
        trls[setup] = Worker("trl", spec, threads, f"smollm-trl-{tag}-{setup}")
    for _ in range(plan.side_by_side_warmup):
        for w in trls.values():
            w.call("iteration")
    trl_seconds: dict[str, list[float]] = {setup: [] for setup in trls}
    rows: dict[str, Any] = {}
    for row in plan.smollm_rows:
        args = overrides(row, batch, tokens, threads, lora, gguf)
        w = Worker("ours", {"overrides": args}, threads, f"smollm-{tag}-{row}")
        for _ in range(plan.side_by_side_warmup):
            w.call("iteration")
        paired: dict[str, list[float]] = {setup: [] for setup in trls}
        iterations, bares = [], []
        for r in range(plan.smollm_rounds):
            for setup, t in trls.items():
                paired[setup].append(t.call("iteration")["seconds"])
                trl_seconds[setup].append(paired[setup][-1])
            iterations.append(w.call("iteration"))
            bares.append(w.call("bare"))  # the model passes of that iteration alone: its compute floor
            _log(f"SmolLM2 {tag} {row} round {r + 1}/{plan.smollm_rounds}: ours {iterations[-1]['seconds']:.2f}s "
                 f"(bare passes {bares[-1]['total']:.2f}s), "
                 + ", ".join(f"trl {setup} {paired[setup][-1]:.2f}s" for setup in trls))
        summary = report.summarize_runs(iterations, bares, w.stop()["peak_rss_mb"])
        summary.update({"overrides": args, "parameters": w.info["parameters"], "trl_rounds": paired,
                        "bare_totals": [b["total"] for b in bares]})
        rows[row] = summary
    baseline = min(trl_seconds, key=lambda setup: report.median(trl_seconds[setup]))
    for row, summary in rows.items():
        trl_rounds = summary["trl_rounds"][baseline]
        vs = report.side_by_side(trl_rounds, {row: summary["iterations"]})
        # what the ratio would be if our iteration were its bare model passes and nothing else
        floor = report.median(report.paired_ratios(summary["bare_totals"], trl_rounds))
        summary.update({"ratio": vs[row]["ratio"], "ratios": vs[row]["ratios"], "bare_over_trl": floor})
    setups = {setup: {"seconds": trl_seconds[setup], "seconds_per_iteration": report.median(trl_seconds[setup]),
                      "peak_rss_mb": w.stop()["peak_rss_mb"], "parameters": w.info["parameters"]}
              for setup, w in trls.items()}
    return {"baseline": baseline, "trl_setups": setups, "rows": rows, "trl_peak_rss_mb": setups[baseline]["peak_rss_mb"]}


def generation(plan, lora: bool) -> dict[str, Any]:
    """Our sampler against transformers' ``generate`` on the same policy (with or without adapters), alternating
    call by call; tokens per second, medians over rounds, and ours / theirs per precision and at each side's best."""
    from bench import report
    from bench.worker import Worker

    args = overrides("none", plan.smollm_batch, plan.smollm_new_tokens, plan.threads, lora, plan.smollm_gguf)
    w = Worker("generation", {"overrides": args, "new_tokens": plan.smollm_new_tokens}, plan.threads,
               f"smollm-generation-{'lora' if lora else 'full'}")
    for precision in PRECISIONS:  # warm-up
        w.call("ours", precision=precision)
        w.call("hf", precision=precision)
    rate: dict[str, list[float]] = {f"{side}_{p}": [] for side in ("ours", "hf") for p in PRECISIONS}
    for _ in range(plan.smollm_generation_rounds):
        for precision in PRECISIONS:
            for side in ("ours", "hf"):
                out = w.call(side, precision=precision)
                rate[f"{side}_{precision}"].append(out["tokens"] / out["seconds"])
    tokens_per_s = {key: report.median(values) for key, values in rate.items()}
    best = {side: max(PRECISIONS, key=lambda p: tokens_per_s[f"{side}_{p}"]) for side in ("ours", "hf")}
    out = {"tokens_per_s": tokens_per_s, "all_tokens_per_s": rate,
           "ratio": {p: report.median(report.paired_ratios(rate[f"ours_{p}"], rate[f"hf_{p}"])) for p in PRECISIONS},
           "best": best, "best_ratio": tokens_per_s[f"ours_{best['ours']}"] / tokens_per_s[f"hf_{best['hf']}"],
           **w.info, "peak_rss_mb": w.stop()["peak_rss_mb"]}
    return out


def _header(plan, results: dict[str, Any]) -> dict[str, Any]:
    policy = policy_folder(plan.smollm_gguf)  # converted once here, before the workers read it
    record = json.loads((policy / "gguf_source.json").read_text())
    out = results.setdefault("smollm", {"side_by_side": {}, "generation": {}})
    out.update({"model": record["file"], "revision": record["revision"], "quantization": record["quantization"],
                "batch": plan.smollm_batch, "new_tokens": plan.smollm_new_tokens, "rounds": plan.smollm_rounds,
                "lora": LORA})
    return out


def phase(plan, results: dict[str, Any]) -> None:
    """SmolLM2 side by side with trl, full fine-tuning and LoRA (``plan.smollm_variants``), and the peak memory of
    LoRA against full fine-tuning."""
    out = _header(plan, results)
    for tag in plan.smollm_variants:
        _log(f"SmolLM2 ({out['model']}) side by side, {tag}: trl {', '.join(plan.smollm_trl_setups)}; ours "
             f"{', '.join(plan.smollm_rows)}")
        out["side_by_side"][tag] = side_by_side(plan, tag == "lora")
    if {"full", "lora"} <= set(out["side_by_side"]):
        full, adapters = out["side_by_side"]["full"]["rows"], out["side_by_side"]["lora"]["rows"]
        out["memory"] = {row: {"full_peak_rss_mb": full[row]["peak_rss_mb"],
                               "lora_peak_rss_mb": adapters[row]["peak_rss_mb"],
                               "lora_over_full": adapters[row]["peak_rss_mb"] / full[row]["peak_rss_mb"]}
                         for row in full if row in adapters}


def generation_phase(plan, results: dict[str, Any]) -> None:
    """SmolLM2 generation against transformers' ``generate``, full and with LoRA adapters (``plan.smollm_variants``)."""
    _header(plan, results)
    for tag in plan.smollm_variants:
        _log(f"SmolLM2 generation, {tag}: ours against transformers' generate")
        results["smollm"]["generation"][tag] = generation(plan, tag == "lora")
