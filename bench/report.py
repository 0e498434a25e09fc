"""Bookkeeping of the benchmark: medians, side-by-side ratios, fitted scaling exponents, the results file and the
printed table. Pure functions over the measured numbers (tested in ``tests/test_bench.py``)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no measurements")
    return float(statistics.median(values))


def paired_ratios(ours: Sequence[float], theirs: Sequence[float]) -> list[float]:
    """Round-by-round ratios ``ours[i] / theirs[i]`` of measurements taken side by side (same round, same load)."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired ratios need as many rounds on both sides, got {len(ours)} and {len(theirs)}")
    return [a / b for a, b in zip(ours, theirs)]


def fit_exponent(xs: Sequence[float], seconds: Sequence[float]) -> float:
    """The exponent ``k`` of the least-squares fit ``seconds ≈ c · x^k`` (a line in log-log space)."""
    if len(xs) != len(seconds) or len(xs) < 2:
        raise ValueError("fitting an exponent needs at least two (x, seconds) points")
    lx = [math.log(x) for x in xs]
    ly = [math.log(s) for s in seconds]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    if sxx == 0:
        raise ValueError("fitting an exponent needs at least two distinct x")
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx


def summarize_runs(iterations: list[dict[str, float]], bares: list[dict[str, float]] | None = None,
                   peak_rss_mb: float | None = None) -> dict[str, Any]:
    """Medians of one configuration's measured iterations (and bare passes, measured alternately with them)."""
    out: dict[str, Any] = {
        "seconds_per_iteration": median([it["seconds"] for it in iterations]),
        "rollout_tokens_per_s": median([it["rollout_tokens_per_s"] for it in iterations]),
        "update_tokens_per_s": median([it["update_tokens_per_s"] for it in iterations]),
        "response_tokens": median([it["response_tokens"] for it in iterations]),
        "iterations": [it["seconds"] for it in iterations],
        "sections": {k.removeprefix("timing/"): median([it[k] for it in iterations])
                     for k in iterations[0] if k.startswith("timing/")},
    }
    if bares:
        ratios = paired_ratios([it["seconds"] for it in iterations], [b["total"] for b in bares])
        out["bare_passes"] = {k: median([b[k] for b in bares]) for k in bares[0]}
        out["overhead_ratios"] = ratios
        out["overhead_ratio"] = median(ratios)
    if peak_rss_mb is not None:
        out["peak_rss_mb"] = peak_rss_mb
    return out


def side_by_side(trl_seconds: list[float], ours: dict[str, list[float]]) -> dict[str, Any]:
    """``vs_trl``: per constraint, the round-by-round ratios ours/trl and their median (``ratio``)."""
    out: dict[str, Any] = {"trl_seconds": trl_seconds, "trl_seconds_per_iteration": median(trl_seconds)}
    for constraint, seconds in ours.items():
        ratios = paired_ratios(seconds, trl_seconds)
        out[constraint] = {"ours_seconds": seconds, "ratios": ratios, "ratio": median(ratios)}
    return out


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """The least-squares line ``y ≈ intercept + slope · x`` and its R²."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("fitting a line needs at least two distinct x")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return {"intercept": intercept, "slope": slope, "r2": 1.0 - residual / total if total else 1.0}


UPDATE_KEYS = ("update_seconds", "response_tokens", "sequence_tokens", "longest_response", "padded_response_tokens",
               "micro_batches", "padding")


def update_work(iterations: list[dict[str, float]]) -> dict[str, Any]:
    """The update's seconds and the work of each iteration: response tokens generated (``response_tokens``), prompt
    and response tokens without padding (``sequence_tokens``, what the update's passes must process), response tokens
    padded to the batch's longest response (``padded_response_tokens``, what one padded pass computes over), the
    update's micro-batches per minibatch and the share of the response columns it computed that were padding."""
    lists = {"update_seconds": [it["timing/update"] for it in iterations],
             **{k: [it[k] for it in iterations] for k in UPDATE_KEYS[1:] if k in iterations[0]}}
    out: dict[str, Any] = {k: median(v) for k, v in lists.items()}
    out["all"] = lists
    out["update_ms_per_generated_token"] = 1e3 * median(
        [s / t for s, t in zip(lists["update_seconds"], lists["response_tokens"])])
    return out


def follows_tokens(uniform: dict[str, Any], grouped: dict[str, Any], padded: dict[str, Any],
                   more_grouped: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Whether the update's time follows the tokens generated.

    Per repeat, the varied-length run's update seconds over the uniform run's (``*_time_ratio``) beside its generated
    tokens over the uniform run's (``token_ratio``), its prompt and response tokens over the uniform run's
    (``sequence_token_ratio``: the passes process prompts too) and its padded tokens over the uniform run's
    (``padded_token_ratio``); medians over repeats. ``fit``: the line through every iteration of the uniform and
    length-grouped runs (``more_grouped``: at other EOS rates), update seconds against sequence tokens; time that
    follows the tokens has an R² near 1 and an intercept (``fixed_share`` of the uniform run's time) near 0."""
    u, g, p = uniform["all"], grouped["all"], padded["all"]

    def ratio(a: list[float], b: list[float]) -> float:
        return median(paired_ratios(a, b))

    out = {
        "token_ratio": ratio(g["response_tokens"], u["response_tokens"]),
        "padded_token_ratio": ratio(g["padded_response_tokens"], u["padded_response_tokens"]),
        "grouped_time_ratio": ratio(g["update_seconds"], u["update_seconds"]),
        "padded_time_ratio": ratio(p["update_seconds"], u["update_seconds"]),
    }
    if "sequence_tokens" in g:
        out["sequence_token_ratio"] = ratio(g["sequence_tokens"], u["sequence_tokens"])
        rows = [u, g, *(m["all"] for m in more_grouped)]
        xs = [x for r in rows for x in r["sequence_tokens"]]
        ys = [y for r in rows for y in r["update_seconds"]]
        if len(set(xs)) >= 2:
            fit = fit_line(xs, ys)
            fit["fixed_share"] = fit["intercept"] / uniform["update_seconds"]
            out["fit"] = fit
    return out


def scaling(values: list[int], seconds: list[list[float]]) -> dict[str, Any]:
    medians = [median(s) for s in seconds]
    return {"values": values, "seconds": medians, "all_seconds": seconds, "exponent": fit_exponent(values, medians)}


def table(results: dict[str, Any]) -> str:
    """The printed summary of a results dictionary."""
    lines = []
    m = results["machine"]
    s = results["settings"]
    lines.append(f"machine: {m['cpu']} · {m['cores']} cores · {m['threads']} threads · torch {m['torch']} · "
                 f"load average {m['load_average_start'][0]:.2f} → {m['load_average_end'][0]:.2f}")
    lines.append(f"batch {s['batch']} prompts · {s['new_tokens']} new tokens · one PPO epoch · table: medians of "
                 f"{s['repeats']} iterations after {s['warmup']} warm-up ({results['vs_trl']['model']} none and "
                 f"rectified: of the {s['rounds']} side-by-side rounds)")
    lines.append("")
    lines.append(f"{'model':>5} {'params':>7} {'constraint':>14} {'s/iter':>7} {'rollout tok/s':>13} "
                 f"{'update tok/s':>12} {'bare s':>7} {'iter/bare':>9} {'peak RSS MiB':>12}")
    for size, by_constraint in results["sizes"].items():
        params = results["models"][size]["parameters"]
        for constraint, r in by_constraint.items():
            bare = r.get("bare_passes", {}).get("total")
            lines.append(
                f"{size:>5} {params / 1e6:>6.2f}M {constraint:>14} {r['seconds_per_iteration']:>7.3f} "
                f"{r['rollout_tokens_per_s']:>13.0f} {r['update_tokens_per_s']:>12.0f} "
                f"{bare if bare is not None else float('nan'):>7.3f} {r.get('overhead_ratio', float('nan')):>9.2f} "
                f"{r.get('peak_rss_mb', float('nan')):>12.0f}")
    v = results["vs_trl"]
    lines.append("")
    setups = v.get("trl_setups", {})
    lines.append(f"trl {m['trl']} PPOTrainer ({v['model']}, {v['rounds']} alternating rounds), seconds per iteration: "
                 + ", ".join(f"{k} {x['seconds_per_iteration']:.3f}" for k, x in setups.items())
                 + f"; baseline (fastest): {v.get('baseline')} {v['trl_seconds_per_iteration']:.3f} s, peak RSS "
                   f"{v['trl_peak_rss_mb']:.0f} MiB")
    for row, r in v.items():
        if not isinstance(r, dict) or row == "trl_setups":
            continue
        if "skipped" in r:
            lines.append(f"  ours/trl {row:>14}: skipped ({r['skipped']})")
        elif "ratio" in r:
            lines.append(f"  ours/trl {row:>14}: {r['ratio']:.2f}  peak RSS {r.get('peak_rss_mb', float('nan')):.0f} "
                         f"MiB  (rounds: {', '.join(f'{x:.2f}' for x in r['ratios'])})")
    o = results["overhead"]
    lines.append(f"iteration / bare passes ({o['model']}, {o['constraint']}): {o['ratio']:.2f}")
    sc = results["scaling"]
    for axis in ("batch", "response_length"):
        a = sc[axis]
        pts = ", ".join(f"{x}: {t:.2f}s" for x, t in zip(a["values"], a["seconds"]))
        lines.append(f"scaling in {axis} ({sc['model']}, {sc['constraint']}): {pts}; fitted exponent "
                     f"{a['exponent']:.2f}")
    if "variable_length" in results:
        vl = results["variable_length"]
        line = (f"variable lengths ({vl['model']}, {vl.get('prompts', '?')} prompts, micro-batches of "
                f"{vl['micro_batch_size']}), against uniform full-length responses: generated tokens "
                f"{vl['token_ratio']:.2f}")
        if "sequence_token_ratio" in vl:
            line += f", prompt + response tokens {vl['sequence_token_ratio']:.2f}"
        line += (f", padded tokens {vl['padded_token_ratio']:.2f}; update time, length-grouped "
                 f"{vl['grouped_time_ratio']:.2f}, padded {vl['padded_time_ratio']:.2f}")
        lines.append(line)
        if "fit" in vl:
            f = vl["fit"]
            lines.append(f"  update seconds against prompt + response tokens (uniform and length-grouped runs): "
                         f"R² {f['r2']:.3f}, intercept {f['intercept']:.2f} s ({f['fixed_share']:.0%} of the "
                         f"uniform run's), {1e3 * f['slope']:.2f} s per thousand tokens")
    if "smollm" in results:
        lines.extend(smollm_table(results["smollm"]))
    lines.append(f"total {results['total_seconds']:.0f} s")
    return "\n".join(lines)


def smollm_table(sm: dict[str, Any]) -> list[str]:
    """The SmolLM2 phase's lines: ours / trl per row (full and LoRA), generation against transformers' ``generate``,
    and peak memory."""
    lines = ["", f"SmolLM2 ({sm['model']}, {sm['quantization']} dequantised; {sm['batch']} samples × "
                 f"{sm['new_tokens']} new tokens, {sm['rounds']} alternating rounds)"]
    for tag, block in sm.get("side_by_side", {}).items():
        setups = ", ".join(f"{k} {v['seconds_per_iteration']:.2f} s" for k, v in block["trl_setups"].items())
        lines.append(f"  {tag}: trl {setups}; baseline {block['baseline']}, peak RSS {block['trl_peak_rss_mb']:.0f} MiB")
        for row, r in block["rows"].items():
            floor = f", bare passes / trl {r['bare_over_trl']:.2f}" if "bare_over_trl" in r else ""
            lines.append(f"    ours/trl {row:>14}: {r['ratio']:.2f}  ({r['seconds_per_iteration']:.2f} s per iteration"
                         f"{floor}, peak RSS {r['peak_rss_mb']:.0f} MiB; rounds "
                         f"{', '.join(f'{x:.2f}' for x in r['ratios'])})")
    for tag, g in sm.get("generation", {}).items():
        rates = ", ".join(f"{k} {v:.0f}" for k, v in g["tokens_per_s"].items())
        lines.append(f"  generation {tag} (tokens/s): {rates}; ours/transformers fp32 {g['ratio']['fp32']:.2f}, bf16 "
                     f"{g['ratio']['bf16']:.2f}, best against best {g['best_ratio']:.2f}")
    for row, m in sm.get("memory", {}).items():
        lines.append(f"  peak RSS {row}: full {m['full_peak_rss_mb']:.0f} MiB, LoRA {m['lora_peak_rss_mb']:.0f} MiB "
                     f"({m['lora_over_full']:.2f})")
    return lines
