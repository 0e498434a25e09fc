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
    lines.append(f"side by side with trl {m['trl']} PPOTrainer ({v['model']}, {v['rounds']} alternating rounds): "
                 f"trl {v['trl_seconds_per_iteration']:.3f} s/iter")
    for constraint in ("none", "none_with_cost", "rectified"):
        if constraint not in v:
            continue
        r = v[constraint]
        lines.append(f"  ours/trl {constraint:>14}: {r['ratio']:.2f}  (rounds: "
                     f"{', '.join(f'{x:.2f}' for x in r['ratios'])})")
    o = results["overhead"]
    lines.append(f"iteration / bare passes ({o['model']}, {o['constraint']}): {o['ratio']:.2f}")
    sc = results["scaling"]
    for axis in ("batch", "response_length"):
        a = sc[axis]
        pts = ", ".join(f"{x}: {t:.2f}s" for x, t in zip(a["values"], a["seconds"]))
        lines.append(f"scaling in {axis} ({sc['model']}, {sc['constraint']}): {pts}; fitted exponent "
                     f"{a['exponent']:.2f}")
    lines.append(f"total {results['total_seconds']:.0f} s")
    return "\n".join(lines)
