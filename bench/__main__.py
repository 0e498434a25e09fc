"""``python -m bench`` (``make bench``): our RL iteration against trl's PPO, and against the bare model passes it needs.

1. Side by side (the 10M model): trl's ``PPOTrainer`` and ours with ``constraint=none`` (plain PPO on trl's four
   models: ``trainer.measure_cost=false``), ``constraint=none`` as it runs by default (the cost model scored too,
   ``none_with_cost``) and ``constraint=rectified``, each in its own process, one iteration each per round, rounds
   repeated; after each of our iterations, the bare passes of that iteration. Reported: the median over rounds of
   ours/trl, and of iteration / bare passes. Round-by-round ratios cancel most of the drift of a shared machine.
2. Sizes: 1M, 10M, 30M × none, average, rectified: seconds per iteration, rollout and update tokens per second,
   peak resident memory, bare passes.
3. Scaling (10M, none): batch 8/16/32/64 at 64 new tokens, response length 32/64/128 at batch 16, with the fitted
   exponent of seconds ∝ x^k.

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
from bench.ours import FAST, PLAIN_PPO, SHARED_CRITIC, SIZES, overrides
from bench.worker import Worker

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
    trl_bf16: bool = True  # the default of trl's PPOConfig
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
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
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
    summary["overrides"] = _ours(plan, size, constraint)
    results["sizes"].setdefault(size, {})[constraint] = summary


def side_by_side(plan: Plan, results: dict[str, Any]) -> None:
    """Phase 1: trl, ours none (plain PPO), none with the cost model, rectified on the headline model, alternating."""
    size = plan.headline
    _log(f"side by side on {size}: starting trl and our none / none_with_cost / rectified trainers")
    trl = Worker("trl", {"overrides": _ours(plan, size, "none", fast=False), "bf16": plan.trl_bf16},
                 plan.threads, "trl")
    ours = {c: Worker("ours", {"overrides": _ours(plan, size, c)}, plan.threads, f"ours-{c}")
            for c in ("none", "none_with_cost", "rectified")}
    for _ in range(plan.side_by_side_warmup):
        trl.call("iteration")
        for w in ours.values():
            w.call("iteration")
    trl_seconds: list[float] = []
    iterations: dict[str, list] = {c: [] for c in ours}
    bares: dict[str, list] = {c: [] for c in ours}
    for r in range(plan.rounds):
        trl_seconds.append(trl.call("iteration")["seconds"])
        for c, w in ours.items():
            iterations[c].append(w.call("iteration"))
            bares[c].append(w.call("bare"))
        _log(f"round {r + 1}/{plan.rounds}: trl {trl_seconds[-1]:.2f}s, "
             + ", ".join(f"{c} {iterations[c][-1]['seconds']:.2f}s (bare {bares[c][-1]['total']:.2f}s)"
                         for c in ours))
    trl_peak = trl.stop()["peak_rss_mb"]
    results["models"][size] = {"arch": SIZES[size], "parameters": ours["none"].info["parameters"]}
    for c, w in ours.items():
        peak = w.stop()["peak_rss_mb"]
        _store(plan, results, size, c, w, iterations[c], bares[c], peak)
    vs = report.side_by_side(trl_seconds, {c: [it["seconds"] for it in iterations[c]] for c in ours})
    vs.update({"model": size, "rounds": plan.rounds, "trl_peak_rss_mb": trl_peak,
               "trl_parameters": trl.info["parameters"]})
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
    order = (*CONSTRAINTS, "none_with_cost")
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


PHASES = ("side_by_side", "sizes", "scaling")


def run(plan: Plan, phases: tuple[str, ...] = PHASES) -> dict[str, Any]:
    start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": _machine(plan.threads),
        "settings": {**asdict(plan), "ppo_epochs": 1, "our_speed_overrides": list(FAST),
                     "rectified_and_average_use": SHARED_CRITIC, "none_is_plain_ppo": PLAIN_PPO,
                     "trl": {"class": "trl.experimental.ppo.PPOTrainer", "bf16": plan.trl_bf16,
                             "gradient_checkpointing": False, "num_ppo_epochs": 1, "num_mini_batches": 1,
                             "attention": "sdpa (transformers' default)",
                             "iteration": "one train() call over one batch, from on_train_begin to its return"}},
        "models": {},
        "sizes": {},
    }
    for phase in phases:  # side_by_side first: the sizes table reuses its measurements
        {"side_by_side": side_by_side, "sizes": sizes, "scaling": scaling}[phase](plan, results)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    results["total_seconds"] = time.perf_counter() - start
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    parser.add_argument("--rounds", type=int, default=Plan.rounds)
    parser.add_argument("--repeats", type=int, default=Plan.repeats)
    parser.add_argument("--trl-fp32", dest="trl_bf16", action="store_false",
                        help="run trl with bf16=False instead of its default bf16=True")
    parser.add_argument("--quick", action="store_true",
                        help="a one-minute check of the machinery: the 1M model, batch 4, 8 new tokens")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)} (a partial run prints no table)")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for our trainer")
    args = parser.parse_args(argv)
    plan = Plan(threads=args.threads, rounds=args.rounds, repeats=args.repeats, trl_bf16=args.trl_bf16,
                extra=args.overrides)
    if args.quick:
        plan = Plan(sizes=("1M",), headline="1M", batch=4, new_tokens=8, threads=args.threads, rounds=2, repeats=1,
                    side_by_side_warmup=1, scaling_batches=(2, 4), scaling_lengths=(4, 8), scaling_repeats=1,
                    trl_bf16=args.trl_bf16, extra=args.overrides)
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
