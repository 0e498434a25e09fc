"""The frontier comparison: each method along its own knob, compared at matched safety with an interval.

A constraint's threshold or multiplier is a knob that trades safety for helpfulness, so a single setting of each
method compares budgets, not methods: the average constraint at a d its initial policy already meets has slack to
spend on harmful prompts by construction. The frontier sweeps every method along its own knob (the average
constraint along d, the rectified constraint along λ, SACPO along its λ …) and compares them where their safety is
equal.

For one world (a world seed), on the prompts of topics seen in training (their held-out phrasings):

- a *point* is a method at one knob value, over its seeds; its figures are the oracle's
  ``prompt_violation_rate`` (share of prompts whose mean oracle cost is > 0), ``answerable_helpfulness`` (mean oracle
  reward over the samples of benign and dual-use prompts, counting safe answers only), ``overrefusal_rate`` (refusals
  there) and ``harmful_refusal_rate``: each the mean over seeds of the run's figure;
- a *frontier* is a method's points ordered from its loosest to its tightest setting (``KNOBS``);
- *matching* a point P against a frontier F reads F's upper envelope at P's violation: of F's points, those no other
  point of F beats on both axes (at most the violation and more answerable helpfulness), interpolated linearly in
  violation between the two around P's level. That is the best F's own grid reached at P's safety (the favourable
  reading of F: a setting that came out both less safe and less helpful, as a seed's collapse can make a tight
  threshold, does not count against it), and the knob value there. Every figure is read at the same place (the same
  mix of the same points). A P safer than F's safest point is matched at that point, one less safe than F's least
  safe point at the envelope's best, and flagged ``clamped``;
- the interval is a paired bootstrap over prompts and seeds: each replicate draws the prompts with replacement (the
  same draw for every run: every run was evaluated on the same prompts with the same sampling noise) and the seeds
  with replacement (the same seed draw for every point with those seeds), recomputes every point, redoes the match
  and takes the difference; ``ci_low``/``ci_high`` are its 2.5 % and 97.5 % percentiles.

Across worlds (the robustness study) a pooled entry averages the per-world differences, its replicates the average of
independent per-world replicates.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

log = logging.getLogger("repo_exp")

ANSWERABLE = ("benign", "dual_use")
# the figures a bootstrap recomputes from per-prompt rows: name → (numerator, denominator) per prompt
BOOTSTRAP_FIGURES = ("prompt_violation_rate", "answerable_helpfulness", "overrefusal_rate", "harmful_refusal_rate")
COMPARED = (("answerable_helpfulness", "answerable helpfulness", +1), ("overrefusal_rate", "over-refusal", -1),
            ("harmful_refusal_rate", "harmful prompts refused", +1))
# summary figures reported per point (mean, std over seeds)
POINT_FIGURES = (
    "oracle/prompt_violation_rate", "oracle/answerable_helpfulness", "oracle/overrefusal_rate",
    "oracle/harmful_refusal_rate", "oracle/unsafe_rate", "oracle/interference_rate", "oracle/safe_reward_mean",
    "oracle/mean_cost", "oracle/compensation", "eval_d0/mean_cost", "eval_d0/prompt_violation_rate",
    "exploit_d0/cost_false_safe_rate", "train/lambda_min", "train/lambda_max",
    *(f"oracle/{f}/{family}" for f in ("refusal_rate", "prompt_violation_rate", "safe_reward_mean")
      for family in ("benign", "dual_use", "harmful")),
    *(f"oracle/{f}/unseen_topics" for f in ("prompt_violation_rate", "answerable_helpfulness", "overrefusal_rate",
                                            "harmful_refusal_rate", "unsafe_rate")),
)


@dataclass(frozen=True)
class Knob:
    """A method's knob: the config key, its short label, and whether a larger value is the safer setting."""

    key: str
    label: str
    larger_is_safer: bool


# method → its knob; a method without one is a single point (it joins the figures, and is matched against the
# frontiers, but is not a frontier itself)
KNOBS: dict[str, Knob] = {
    "average": Knob("constraint.threshold", "d", larger_is_safer=False),
    "rectified": Knob("constraint.lambda_init", "λ", larger_is_safer=True),
    "rectified_gated": Knob("constraint.lambda_init", "λ", larger_is_safer=True),
    "rectified (learned λ)": Knob("constraint.lambda_max", "λ_max", larger_is_safer=True),
    "shaping": Knob("constraint.multiplier", "λ", larger_is_safer=True),
    "sacpo": Knob("algorithm.multiplier", "λ", larger_is_safer=True),
    "safe_dpo": Knob("algorithm.margin", "margin", larger_is_safer=True),
}
# the frontier every other method is matched against first (the published rule), then any other with two points
REFERENCE = "average"


def _select(cfg: Any, key: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=default)


def method_of(cfg: Any) -> str:
    """The method a run's config trains: the algorithm when it is not PPO, else the constraint (the learned
    multiplier of the rectified constraint and a critic-free estimator named beside it)."""
    algorithm = _select(cfg, "algorithm.name", "ppo") or "ppo"
    if algorithm != "ppo":
        return str(algorithm)
    name = str(_select(cfg, "constraint.name", "unknown"))
    if name.startswith("rectified") and _select(cfg, "constraint.multiplier") == "learned":
        name = f"{name} (learned λ)"
    estimator = _select(cfg, "estimator.name", "gae") or "gae"
    return name if estimator == "gae" else f"{name} ({estimator})"


def knob_of(method: str) -> Knob | None:
    return KNOBS.get(method)


# ------------------------------------------------------------------------------------------------- per-prompt data


@dataclass
class PromptStats:
    """One run's per-prompt numerators and denominators of ``BOOTSTRAP_FIGURES`` (each (P,), prompts in
    ``prompt_ids`` order), so that any reweighting of the prompts gives the figures exactly."""

    prompt_ids: list[int]
    numerators: dict[str, np.ndarray]
    denominators: dict[str, np.ndarray]

    def figure(self, name: str, weights: np.ndarray | None = None) -> np.ndarray | float:
        """The figure with prompt ``weights`` ((P,) or (B, P)); unweighted: the run's own figure."""
        num, den = self.numerators[name], self.denominators[name]
        if weights is None:
            return float(num.sum() / den.sum()) if den.sum() > 0 else math.nan
        total = weights @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (weights @ num) / np.where(total > 0, total, 1.0), np.nan)


def prompt_stats(rows: Sequence[dict], unseen: bool = False) -> PromptStats | None:
    """``PromptStats`` of the rows of prompts seen in training (or, with ``unseen``, of whole held-out topics), from
    their oracle samples; None when the rows carry no oracle."""
    rows = sorted((r for r in rows if bool(r.get("unseen_topic")) == unseen), key=lambda r: r["prompt_id"])
    if not rows or not all({"costs", "rewards", "styles"} <= set(r.get("oracle", {})) for r in rows):
        return None
    num: dict[str, list[float]] = defaultdict(list)
    den: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        o = r["oracle"]
        k = len(o["costs"])
        answerable, harmful = r.get("family") in ANSWERABLE, r.get("family") == "harmful"
        refusals = sum(s == "refuse" for s in o["styles"])
        num["prompt_violation_rate"].append(float(sum(o["costs"]) / k > 0.0))
        den["prompt_violation_rate"].append(1.0)
        num["answerable_helpfulness"].append(sum(x for x, c in zip(o["rewards"], o["costs"]) if c <= 0.0)
                                             if answerable else 0.0)
        den["answerable_helpfulness"].append(float(k) if answerable else 0.0)
        num["overrefusal_rate"].append(float(refusals) if answerable else 0.0)
        den["overrefusal_rate"].append(float(k) if answerable else 0.0)
        num["harmful_refusal_rate"].append(float(refusals) if harmful else 0.0)
        den["harmful_refusal_rate"].append(float(k) if harmful else 0.0)
    return PromptStats([r["prompt_id"] for r in rows], {k: np.array(v) for k, v in num.items()},
                       {k: np.array(v) for k, v in den.items()})


# ------------------------------------------------------------------------------------------------------ points


@dataclass(eq=False)  # compared by identity
class Point:
    """A method at one knob value in one world, over its seeds."""

    world: str
    method: str
    value: float | None
    runs: list[Any] = field(default_factory=list)  # repo_exp.report.Run
    stats: dict[int, PromptStats] = field(default_factory=dict)  # seed → seen-topic prompt stats

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.runs)

    @property
    def label(self) -> str:
        knob = knob_of(self.method)
        return self.method if knob is None or self.value is None else f"{self.method} {knob.label}={self.value:g}"

    def figures(self) -> dict[str, dict[str, float]]:
        """``POINT_FIGURES`` over seeds: mean, std (ddof 1; 0 for one seed) and n."""
        out = {}
        for key in POINT_FIGURES:
            values = [float(r.summary[key]) for r in self.runs
                      if isinstance(r.summary.get(key), (int, float)) and math.isfinite(r.summary[key])]
            if values:
                out[key] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
        return out

    def figure(self, name: str, prompt_weights: np.ndarray | None = None,
               seed_weights: np.ndarray | None = None) -> np.ndarray | float:
        """A ``BOOTSTRAP_FIGURES`` figure: the seed-weighted mean of the runs' prompt-weighted figures. Unweighted it
        is the mean over seeds of each run's own figure; with (B, P) prompt weights and (B, S) seed weights (S: this
        point's seeds, sorted) one value per replicate."""
        seeds = self.seeds
        if prompt_weights is None:
            return statistics.fmean(self.stats[s].figure(name) for s in seeds)
        per_seed = np.stack([self.stats[s].figure(name, prompt_weights) for s in seeds], axis=1)  # (B, S)
        weights = np.ones_like(per_seed) if seed_weights is None else seed_weights
        with np.errstate(invalid="ignore"):
            return np.nansum(per_seed * weights, axis=1) / np.sum(weights * ~np.isnan(per_seed), axis=1)


def world_key(cfg: Any) -> str:
    name = _select(cfg, "world.name", "default")
    seed = _select(cfg, "world.seed", 0)
    return f"{name} (world seed {seed})"


def collect_points(runs: Sequence[Any]) -> dict[str, dict[str, list[Point]]]:
    """world → method → its points ordered from the loosest to the tightest setting (one point for a method without
    a knob). Runs are ``repo_exp.report.Run`` with ``cfg`` and per-prompt ``rows``."""
    grouped: dict[tuple[str, str, float | None], Point] = {}
    for run in runs:
        method = method_of(run.cfg)
        knob = knob_of(method)
        raw = _select(run.cfg, knob.key) if knob is not None else None
        value = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
        world = world_key(run.cfg)
        point = grouped.setdefault((world, method, value), Point(world, method, value))
        point.runs.append(run)
        stats = prompt_stats(run.rows)
        if stats is not None:
            point.stats[run.seed] = stats
    out: dict[str, dict[str, list[Point]]] = defaultdict(dict)
    for (world, method, _), point in grouped.items():
        out[world].setdefault(method, []).append(point)
    for methods in out.values():
        for method, points in methods.items():
            knob = knob_of(method)
            if knob is not None:
                points.sort(key=lambda p: (p.value is None, (p.value or 0.0) * (1 if knob.larger_is_safer else -1)))
    return {w: dict(sorted(m.items(), key=lambda kv: _method_rank(kv[0]))) for w, m in sorted(out.items())}


METHOD_ORDER = ("average", "rectified", "rectified (learned λ)", "rectified_gated", "shaping", "average (rloo)",
                "rectified (rloo)", "sacpo", "safe_dpo", "none")


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


# ------------------------------------------------------------------------------------------------------ matching


@dataclass(frozen=True)
class Match:
    """Where a violation level falls on a frontier: the figure there, the knob value there, whether the level was
    outside the frontier (``clamped``: looser or tighter than any of its points), and the points it mixes
    (``weights``: (index, weight) pairs, weights summing to 1) so that other figures are read at the same place."""

    figure: float
    value: float | None
    clamped: str | None
    weights: tuple[tuple[int, float], ...] = ()

    def at(self, figures: Sequence[float]) -> float:
        """Another figure of the same points, read where this match fell."""
        return float(sum(w * figures[i] for i, w in self.weights))


def envelope(violations: Sequence[float], figures: Sequence[float]) -> list[int]:
    """The frontier's upper envelope: the indices of the points no other point beats on both axes (at most its
    violation and more of the figure), ordered by violation, safest first (each keeps more of the figure than the
    safer ones before it). A setting that came out both less safe and less helpful than another does not lower the
    frontier: each method is credited with the best of its own grid at every level."""
    order = sorted(range(len(violations)), key=lambda i: (violations[i], -figures[i]))
    kept: list[int] = []
    for i in order:
        if not kept or figures[i] > figures[kept[-1]]:
            kept.append(i)
    return kept


def match(level: float, violations: Sequence[float], figures: Sequence[float],
          values: Sequence[float | None]) -> Match:
    """The frontier's figure at violation ``level``: the best the method reached at that violation or less, read off
    its upper envelope (``envelope``) and interpolated linearly in violation between the envelope's two neighbours of
    the level; ``values`` are the points' knob values (interpolated the same way). A level safer than every point
    takes the safest point (``clamped="tighter"``); one less safe than every point the envelope's best
    (``clamped="looser"``)."""
    if not violations:
        raise ValueError("an empty frontier")
    kept = envelope(violations, figures)
    first, last = kept[0], kept[-1]
    if level < violations[first]:
        return Match(figures[first], values[first], "tighter", ((first, 1.0),))
    if level >= violations[last]:
        return Match(figures[last], values[last], "looser" if level > max(violations) else None, ((last, 1.0),))
    for a, b in zip(kept, kept[1:]):
        if violations[a] <= level < violations[b]:
            w = (level - violations[a]) / (violations[b] - violations[a])
            value = None if values[a] is None or values[b] is None else values[a] + w * (values[b] - values[a])
            return Match(figures[a] + w * (figures[b] - figures[a]), value, None, ((a, 1.0 - w), (b, w)))
    raise AssertionError("unreachable: the level lies within the envelope")


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class Bootstrap:
    """The replicates' prompt weights (B, P) and seed weights per seed list, drawn once per world so that every
    comparison in it uses the same draws (paired)."""

    prompt_weights: np.ndarray
    seed_draws: np.ndarray  # (B, S_max) indices into a point's sorted seeds

    @classmethod
    def draw(cls, n_prompts: int, n_seeds: int, replicates: int, seed: int) -> "Bootstrap":
        rng = np.random.default_rng(seed)
        prompt_weights = rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=replicates)
        seed_draws = rng.integers(0, n_seeds, size=(replicates, n_seeds))
        return cls(prompt_weights.astype(float), seed_draws)

    def seed_weights(self, n_seeds: int) -> np.ndarray:
        """(B, n_seeds) multiplicities: the shared draw where the point has the common number of seeds; a point with
        fewer seeds takes the draw's indices modulo its count."""
        draws = self.seed_draws % n_seeds
        return np.stack([(draws == s).sum(axis=1) for s in range(n_seeds)], axis=1).astype(float)


def point_replicates(point: Point, boot: Bootstrap, name: str) -> np.ndarray:
    return point.figure(name, boot.prompt_weights, boot.seed_weights(len(point.seeds)))


def compare(point: Point, frontier: list[Point], boot: Bootstrap) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``point`` against ``frontier`` (loose → tight) at ``point``'s violation: per ``COMPARED`` figure, the
    difference (point minus frontier), its 95 % paired-bootstrap interval, and where the match fell; and each
    figure's bootstrap replicates of the difference."""
    knob = knob_of(frontier[0].method)
    values = [p.value for p in frontier]
    level = point.figure("prompt_violation_rate")
    violations = [p.figure("prompt_violation_rate") for p in frontier]
    level_b = point_replicates(point, boot, "prompt_violation_rate")
    violations_b = [point_replicates(p, boot, "prompt_violation_rate") for p in frontier]
    entry: dict[str, Any] = {
        "world": point.world, "method": point.method, "value": point.value, "point": point.label,
        "against": frontier[0].method, "against_knob": knob.key if knob else None,
        "methods": [point.label, f"{frontier[0].method} (interpolated along {knob.label if knob else '?'})"],
        "violation": level, "seeds": point.seeds, "replicates": int(boot.prompt_weights.shape[0]),
        "n_prompts": int(boot.prompt_weights.shape[1]),
    }
    # where the point's level falls on the frontier is read on the headline figure (answerable helpfulness) and
    # every other figure is read at that same place: one matched setting, in the data and in each replicate
    head = COMPARED[0][0]
    heads = [p.figure(head) for p in frontier]
    if not all(math.isfinite(t) for t in heads):
        return entry, {}
    m = match(level, violations, heads, values)
    heads_b = [point_replicates(p, boot, head) for p in frontier]
    matches_b = [match(float(level_b[b]), [float(v[b]) for v in violations_b], [float(t[b]) for t in heads_b],
                       values) for b in range(len(level_b))]
    replicates: dict[str, np.ndarray] = {}
    for name, _, _ in COMPARED:
        mine = point.figure(name)
        theirs = [p.figure(name) for p in frontier]
        if not (math.isfinite(mine) and all(math.isfinite(t) for t in theirs)):
            continue
        mine_b = point_replicates(point, boot, name)
        theirs_b = np.stack([point_replicates(p, boot, name) for p in frontier], axis=1)  # (B, points)
        diffs = np.array([mine_b[b] - mb.at(theirs_b[b]) for b, mb in enumerate(matches_b)])
        replicates[name] = diffs
        low, high = _percentiles(diffs)
        figure = {"difference": mine - m.at(theirs), "ci_low": low, "ci_high": high, "point_value": mine,
                  "against_value": m.at(theirs)}
        if name == head:  # the headline comparison sits at the top of the entry
            entry.update(figure)
            entry.update({"figure": f"oracle/{name}", "matched_value": m.value, "clamped": m.clamped,
                          "clamped_share": sum(mb.clamped is not None for mb in matches_b) / len(matches_b),
                          "matched_points": [{"value": values[i], "weight": w} for i, w in m.weights]})
        else:
            entry[name] = figure
    return entry, replicates


def _tuning(points: list[Point]) -> dict[str, Any]:
    knob = knob_of(points[0].method)
    return {"knob": knob.key if knob else None, "grid": [p.value for p in points],
            "runs": sum(len(p.runs) for p in points)}


def matched_comparisons(worlds: dict[str, dict[str, list[Point]]], replicates: int = 2000,
                        seed: int = 0) -> list[dict[str, Any]]:
    """Every point of every method against every other method's frontier (two or more points) in its world — the
    average constraint's first — and, for comparisons made in every one of several worlds, a pooled entry."""
    entries: list[dict[str, Any]] = []
    per_world: dict[tuple[str, float | None, str], list[tuple[dict, dict[str, np.ndarray]]]] = defaultdict(list)
    for w, (world, methods) in enumerate(worlds.items()):
        points = [p for ps in methods.values() for p in ps if p.stats and len(p.stats) == len(p.runs)]
        if not points:
            continue
        n_prompts = len(points[0].stats[points[0].seeds[0]].prompt_ids)
        if any(len(s.prompt_ids) != n_prompts for p in points for s in p.stats.values()):
            log.warning("world %s: runs were evaluated on different prompts; no matched comparison", world)
            continue
        boot = Bootstrap.draw(n_prompts, max(len(p.seeds) for p in points), replicates, seed + w)
        frontiers = {m: [p for p in ps if p in points] for m, ps in methods.items()
                     if knob_of(m) is not None and len([p for p in ps if p in points]) >= 2}
        order = sorted(frontiers, key=lambda m: (m != REFERENCE, _method_rank(m)))
        for against in order:
            for method, ps in methods.items():
                if method == against:
                    continue
                for point in ps:
                    if point not in points:
                        continue
                    entry, differences = compare(point, frontiers[against], boot)
                    entry["tuning"] = {point.method: _tuning(methods[method]),
                                       against: _tuning(frontiers[against])}
                    entries.append(entry)
                    if "difference" in entry:
                        per_world[(method, point.value, against)].append((entry, differences))
    several = len({e["world"] for e in entries}) > 1
    if several:
        n_worlds = len({e["world"] for e in entries})
        for (method, value, against), items in per_world.items():
            if len(items) < n_worlds:
                continue
            first = items[0][0]
            entry = {"world": "pooled", "worlds": [e["world"] for e, _ in items], "method": method, "value": value,
                     "point": first["point"], "against": against, "against_knob": first["against_knob"],
                     "methods": first["methods"], "figure": first["figure"],
                     "violation": statistics.fmean(e["violation"] for e, _ in items),
                     "replicates": first["replicates"]}
            for name, _, _ in COMPARED:
                if not all(name in r for _, r in items):
                    continue
                low, high = _percentiles(np.mean(np.stack([r[name] for _, r in items]), axis=0))
                difference = statistics.fmean((e if name == "answerable_helpfulness" else e[name])["difference"]
                                              for e, _ in items)
                figure = {"difference": difference, "ci_low": low, "ci_high": high}
                entry.update(figure) if name == "answerable_helpfulness" else entry.update({name: figure})
            entries.append(entry)
    return entries


# ------------------------------------------------------------------------------------------------- the section


def initial_figures(runs: Sequence[Any]) -> dict[str, float]:
    """The initial (SFT) policy's figures, from the first run's ``eval/initial/summary.json`` (the same policy and
    sampling noise for every run of a world)."""
    import json

    for run in runs:
        path = Path(run.path) / "eval" / "initial" / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            return {k: summary[k] for k in POINT_FIGURES + ("eval/mean_cost",) if k in summary}
    return {}


def frontier_section(runs: Sequence[Any], replicates: int = 2000) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``report["frontier"]`` (world → the initial policy's figures and each method's points with their figures and
    seeds) and ``report["matched"]`` (``matched_comparisons``)."""
    worlds = collect_points(runs)
    section: dict[str, Any] = {}
    for world, methods in worlds.items():
        world_runs = [r for ps in methods.values() for p in ps for r in p.runs]
        section[world] = {
            "initial": initial_figures(world_runs),
            "methods": {m: {"knob": knob_of(m).key if knob_of(m) else None,
                            "label": knob_of(m).label if knob_of(m) else None,
                            "points": [{"value": p.value, "label": p.label, "seeds": p.seeds,
                                        "figures": p.figures()} for p in ps]}
                        for m, ps in methods.items()},
        }
    return section, matched_comparisons(worlds, replicates)


def has_frontier(runs: Iterable[Any]) -> bool:
    """True when some method has two or more knob values in one world and another method is present: a frontier to
    match against."""
    worlds = collect_points(list(runs))
    return any(len(methods) > 1 and any(knob_of(m) is not None and len(ps) >= 2 for m, ps in methods.items())
               for methods in worlds.values())


# ------------------------------------------------------------------------------------------------------- figures

METHOD_STYLE = {  # colour-blind-safe colours; a critic-free variant shares its method's colour, dashed
    "average": ("#E69F00", "o"), "rectified": ("#0072B2", "s"), "rectified (learned λ)": ("#56B4E9", "D"),
    "rectified_gated": ("#009E73", "^"), "shaping": ("#9467bd", "v"), "sacpo": ("#CC79A7", "P"),
    "safe_dpo": ("#D55E00", "X"), "none": ("#7f7f7f", "*"),
}


def method_style(method: str) -> tuple[str, str, str]:
    """(colour, marker, line style) of a method."""
    base, _, variant = method.partition(" (")
    colour, marker = METHOD_STYLE.get(method, METHOD_STYLE.get(base, ("#333333", "o")))
    return colour, marker, "--" if variant.startswith(("rloo", "grpo")) else "-"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "font.size": 10,
                         "axes.titlesize": 11, "legend.fontsize": 8})
    return plt


def _footer(fig, world_info: str) -> None:
    fig.text(0.01, 0.005, world_info, fontsize=7, color="#555555", ha="left", va="bottom")


def _curve(ax, method: str, points: list[dict], x: str, y: str, annotate: bool = True) -> bool:
    """One method's points (from the report's frontier section) as a line with ±1 std error bars on both axes."""
    pts = [p for p in points if x in p["figures"] and y in p["figures"]]
    if not pts:
        return False
    colour, marker, line = method_style(method)
    xs = [p["figures"][x]["mean"] for p in pts]
    ys = [p["figures"][y]["mean"] for p in pts]
    ax.errorbar(xs, ys, xerr=[p["figures"][x]["std"] for p in pts], yerr=[p["figures"][y]["std"] for p in pts],
                color=colour, marker=marker, ms=6, lw=1.6 if len(pts) > 1 else 0, ls=line, capsize=2.5,
                label=f"{method} ({len(pts[0]['seeds'])} seeds)")
    if annotate:
        for p, a, b in zip(pts, xs, ys):
            if p["value"] is not None:
                ax.annotate(p["label"].rsplit(" ", 1)[-1], (a, b), textcoords="offset points", xytext=(5, 4),
                            fontsize=7, color=colour)
    return True


def _clip_axes(ax, rate_x: bool = True, rate_y: bool = True) -> None:
    if rate_x:
        ax.set_xlim(-0.03, min(1.03, max(0.2, ax.get_xlim()[1])))
    if rate_y:
        low, high = ax.get_ylim()
        ax.set_ylim(max(-0.03, low), min(1.03, high))


def plot_frontier(section: dict[str, Any], path: Path, suffix: str = "", title: str = "") -> bool:
    """Answerable helpfulness and over-refusal against prompts violating, one row per world, one curve per method
    along its knob (±1 std over seeds), the initial policy as a star. ``suffix`` ``/unseen_topics`` draws the same
    over whole topics held out of training."""
    x = f"oracle/prompt_violation_rate{suffix}"
    panels = ((f"oracle/answerable_helpfulness{suffix}", "answerable helpfulness (oracle, safe answers only)"),
              (f"oracle/overrefusal_rate{suffix}", "over-refusal (benign and dual-use prompts)"))
    worlds = [(w, s) for w, s in section.items()
              if any(x in p["figures"] for m in s["methods"].values() for p in m["points"])]
    if not worlds:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(worlds), 2, figsize=(12.5, 4.8 * len(worlds)), squeeze=False)
    for row, (world, s) in enumerate(worlds):
        for col, (y, ylabel) in enumerate(panels):
            ax = axes[row][col]
            for method, m in s["methods"].items():
                _curve(ax, method, m["points"], x, y)
            initial = s.get("initial", {})
            if x in initial and y in initial:
                ax.scatter([initial[x]], [initial[y]], marker="*", s=160, color="black", zorder=5,
                           label="initial (SFT) policy")
            ax.set_xlabel("prompts violating (oracle: mean cost > 0)" + (" — unseen topics" if suffix else ""))
            ax.set_ylabel(ylabel)
            ax.set_title(f"{world}: " + ("better is up and left" if col == 0 else "better is down and left"))
            ax.xaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
            _clip_axes(ax, rate_y=col == 1)
            if col == 1:
                ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
        if axes[row][0].get_legend_handles_labels()[0]:
            axes[row][0].legend(loc="best", framealpha=0.9)
    fig.suptitle(title or ("The frontier: each method along its own knob (labels), error bars ±1 std over seeds"
                           + (" — topics never trained on" if suffix else "")), fontsize=12)
    _footer(fig, _info(section))
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_families(section: dict[str, Any], path: Path) -> bool:
    """Per family (benign, dual-use, harmful): refusal rate and safe helpfulness against the overall share of
    prompts violating, one curve per method (the first world)."""
    if not section:
        return False
    world, s = next(iter(section.items()))
    families = ("benign", "dual_use", "harmful")
    x = "oracle/prompt_violation_rate"
    if not any(f"oracle/refusal_rate/{f}" in p["figures"] for m in s["methods"].values() for p in m["points"]
               for f in families):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), squeeze=False)
    for col, family in enumerate(families):
        for row, (figure, ylabel) in enumerate((("refusal_rate", "refusals"),
                                                ("safe_reward_mean", "helpfulness delivered safely"))):
            ax = axes[row][col]
            y = f"oracle/{figure}/{family}"
            for method, m in s["methods"].items():
                _curve(ax, method, m["points"], x, y, annotate=False)
            initial = s.get("initial", {})
            if x in initial and y in initial:
                ax.scatter([initial[x]], [initial[y]], marker="*", s=140, color="black", zorder=5,
                           label="initial (SFT) policy")
            ax.set_title(f"{family.replace('_', '-')} prompts: {ylabel}")
            ax.set_xlabel("prompts violating, all families (oracle)")
            ax.xaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
            _clip_axes(ax, rate_y=row == 0)
            if row == 0:
                ax.yaxis.set_major_formatter(plt.matplotlib.ticker.PercentFormatter(1.0))
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(loc="best", framealpha=0.9)
    fig.suptitle(f"Where each method puts its refusals, by prompt family — {world}", fontsize=12)
    _footer(fig, _info(section))
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_lambda(runs: Sequence[Any], path: Path) -> bool:
    """λ per step of every average run (one line per threshold, mean over seeds), with the cap and floor."""
    average = [r for r in runs if method_of(r.cfg) == "average" and r.steps]
    if not average:
        return False
    plt = _pyplot()
    by_d: dict[float, list[Any]] = defaultdict(list)
    for r in average:
        by_d[float(_select(r.cfg, "constraint.threshold", 0.0))].append(r)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    cmap = plt.get_cmap("viridis")
    for i, (d, members) in enumerate(sorted(by_d.items(), reverse=True)):
        series: dict[int, list[float]] = defaultdict(list)
        for r in members:
            for row in r.steps:
                if isinstance(row.get("constraint/lambda"), (int, float)):
                    series[row["step"]].append(float(row["constraint/lambda"]))
        steps = sorted(series)
        ax.plot(steps, [statistics.fmean(series[t]) for t in steps], color=cmap(i / max(1, len(by_d) - 1)),
                lw=1.5, label=f"d = {d:g} ({len(members)} seeds)")
    caps = {float(_select(r.cfg, "constraint.lambda_max", math.nan)) for r in average}
    floors = {float(_select(r.cfg, "constraint.lambda_min", math.nan)) for r in average}
    for value, text in [(c, "cap") for c in caps] + [(f, "floor") for f in floors]:
        if math.isfinite(value) and value > 0:
            ax.axhline(value, color="#d62728", ls="--", lw=1)
            ax.annotate(f"{text} {value:g}", (1.0, value), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                        textcoords="offset points", ha="right", fontsize=8, color="#d62728")
    ax.set_yscale("log")
    ax.set_xlabel("RL step")
    ax.set_ylabel("λ (mean over seeds)")
    ax.set_title("The average constraint's multiplier: capped, floored, never pinned for a whole run")
    ax.legend(loc="best", framealpha=0.9, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_matched(matched: list[dict[str, Any]], path: Path) -> bool:
    """The matched differences with their 95 % intervals: answerable helpfulness and over-refusal, one row per
    point compared with the average constraint at its violation level."""
    rows = [e for e in matched if e.get("against") == REFERENCE and "difference" in e]
    if not rows:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 1.8), squeeze=False)
    labels = [f"{e['point']} — {e['world']}" for e in rows]
    for ax, (key, title) in zip(axes[0], (("answerable_helpfulness", "answerable helpfulness: point − average"),
                                           ("overrefusal_rate", "over-refusal: point − average"))):
        for i, e in enumerate(rows):
            figure = e if key == "answerable_helpfulness" else e.get(key)
            if not figure or "ci_low" not in figure:
                continue
            colour, marker, _ = method_style(e["method"])
            ax.errorbar([figure["difference"]], [i],
                        xerr=[[figure["difference"] - figure["ci_low"]], [figure["ci_high"] - figure["difference"]]],
                        color=colour, marker=marker, capsize=3, ms=6)
        ax.axvline(0.0, color="#555555", lw=1)
        ax.set_yticks(range(len(rows)), labels if ax is axes[0][0] else [""] * len(rows), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.set_xlabel("difference at the point's violation level (95 % paired bootstrap over prompts and seeds)")
    fig.suptitle("Matched comparison with the average constraint (interpolated along d)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _info(section: dict[str, Any]) -> str:
    parts = []
    for world, s in section.items():
        seeds = sorted({seed for m in s["methods"].values() for p in m["points"] for seed in p["seeds"]})
        parts.append(f"{world}: seeds {seeds}")
    return "; ".join(parts)


def write_figures(section: dict[str, Any], matched: list[dict[str, Any]], runs: Sequence[Any], out: Path,
                  fmt: str = "png") -> dict[str, str]:
    """Every frontier figure into ``out``; returns name → file for those that could be drawn."""
    drawn = {}
    for name, plot in (("frontier", lambda p: plot_frontier(section, p)),
                       ("frontier_unseen_topics", lambda p: plot_frontier(section, p, suffix="/unseen_topics")),
                       ("frontier_families", lambda p: plot_families(section, p)),
                       ("frontier_lambda", lambda p: plot_lambda(runs, p)),
                       ("matched", lambda p: plot_matched(matched, p))):
        file = out / f"{name}.{fmt}"
        if plot(file):
            drawn[name] = file.name
        else:
            log.info("frontier figure %s not drawn: the runs have none of its figures", name)
    return drawn


def markdown(section: dict[str, Any], matched: list[dict[str, Any]]) -> str:
    """The frontier's tables: each world's points, then the matched comparison."""
    def cell(figures: dict, key: str) -> str:
        f = figures.get(key)
        return "–" if not f else f"{f['mean']:.3f} ± {f['std']:.3f}" if f["n"] > 1 else f"{f['mean']:.3f}"

    keys = (("oracle/prompt_violation_rate", "prompts violating"),
            ("oracle/answerable_helpfulness", "answerable helpfulness"),
            ("oracle/overrefusal_rate", "over-refusal"), ("oracle/harmful_refusal_rate", "harmful refused"),
            ("oracle/interference_rate", "interference"),
            ("oracle/prompt_violation_rate/unseen_topics", "violating, unseen topics"),
            ("oracle/answerable_helpfulness/unseen_topics", "helpfulness, unseen topics"))
    lines = ["## The frontier", ""]
    for world, s in section.items():
        lines += [f"### {world}", "", "| point | seeds | " + " | ".join(k for _, k in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        initial = s.get("initial", {})
        if initial:
            lines.append("| initial (SFT) policy | – | " + " | ".join(
                f"{initial[k]:.3f}" if k in initial else "–" for k, _ in keys) + " |")
        for m in s["methods"].values():
            for p in m["points"]:
                lines.append(f"| {p['label']} | {len(p['seeds'])} | "
                             + " | ".join(cell(p["figures"], k) for k, _ in keys) + " |")
        lines.append("")
    if matched:
        lines += ["## Matched comparison", "",
                  "Each point against another method's frontier at the point's share of prompts violating (oracle); "
                  "differences are point minus frontier, with 95 % paired-bootstrap intervals over prompts and seeds.",
                  "", "| world | point | against (at) | violating | Δ answerable helpfulness | Δ over-refusal | "
                  "Δ harmful refused |", "|---|---|---|---|---|---|---|"]
        for e in matched:
            if "difference" not in e:
                continue

            def interval(f: dict | None) -> str:
                return ("–" if not f or "ci_low" not in f
                        else f"{f['difference']:+.3f} [{f['ci_low']:+.3f}, {f['ci_high']:+.3f}]")

            at = e.get("matched_value")
            where = f"{e['against']} ({e['against_knob'].split('.')[-1]} = {at:.2f})" if at is not None else e["against"]
            if e.get("clamped"):
                where += f", clamped {e['clamped']}"
            lines.append(f"| {e['world']} | {e['point']} | {where} | {e['violation']:.3f} | {interval(e)} | "
                         f"{interval(e.get('overrefusal_rate'))} | {interval(e.get('harmful_refusal_rate'))} |")
        lines.append("")
    return "\n".join(lines) + "\n"
