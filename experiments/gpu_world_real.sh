#!/usr/bin/env bash
# On a machine with a GPU: the synthetic world built on SmolLM2-135M-Instruct at full size (model=world_smollm2: SFT
# through its chat template, preference pairs sampled from the SFT model, reward and cost models on its trunk, two
# on-policy rounds), then the default comparison (experiment=compare: average against rectified, three seeds) and the
# frontier (experiment=frontier: each method along its own knob) on that world. Not run yet: no GPU has been lent to
# this project's checks so far; docs/guide.md ("The world on a real trunk") records what it measures once it has run.
#
#   bash experiments/gpu_world_real.sh                  # into outputs/gpu_world_real/<time>/
#   OUT=folder bash experiments/gpu_world_real.sh       # into folder/; the same command again finds the world in the
#                                                       # cache and resumes the sweeps (trainer.resume=auto)
#   DRY_RUN=1 bash experiments/gpu_world_real.sh        # compose every config it would run and exit (no GPU needed)
#   bash experiments/gpu_world_real.sh world.seed=1     # an override every command takes (not a sweep: a, b)
#   REPO_EXP_JOBS=2 bash experiments/gpu_world_real.sh  # jobs of a sweep at a time on the GPU (default 4, ~8 GB each)
#
# Writes into $OUT: world.log (the world's build), compare/ and frontier/ (each sweep's runs/, report.md, report.json
# and figures), timings.json (the GPU named by nvidia-smi; the seconds of each world stage, each run and each phase)
# and gpu_memory.txt (MiB used, sampled every second).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-outputs/gpu_world_real/$(date +%Y-%m-%d_%H-%M-%S)}
export REPO_EXP_JOBS=${REPO_EXP_JOBS:-4}
WORLD=(model=world_smollm2 "$@")
COMPARE=(-m experiment=compare model=world_smollm2 "hydra.sweep.dir=$OUT/compare/runs" "$@")
FRONTIER=(-m experiment=frontier model=world_smollm2 "hydra.sweep.dir=$OUT/frontier/runs" "$@")

if [ -n "${DRY_RUN:-}" ]; then
  "$PYTHON" -m repo_exp --cfg job "${WORLD[@]}"  # the config the world is built from (python -m repo_exp.world)
  # every job of both sweeps, as their sweepers expand them, composed and validated
  exec "$PYTHON" - "${WORLD[@]}" :: "${COMPARE[@]}" :: "${FRONTIER[@]}" <<'PY'
import sys

from repo_exp.callbacks import sweep_jobs
from repo_exp.config import compose_config, validate

groups = [[]]  # the three argument lists, separated by "::"; the multirun flag left out
for arg in sys.argv[1:]:
    if arg == "::":
        groups.append([])
    elif arg != "-m":
        groups[-1].append(arg)
world_args, *sweeps = groups
world = validate(compose_config(world_args)).world
print(f"world {world.name!r} on {world.trunk.name} ({world.trunk.source}, {world.trunk.revision}): SFT "
      f"{world.sft.steps} steps, {world.num_preference_pairs} pairs, score models {world.reward_model.steps} steps, "
      f"{world.rounds.count} rounds")
for name, args in zip(("compare", "frontier"), sweeps):
    jobs = sweep_jobs(compose_config(args, return_hydra_config=True))
    for job in jobs:
        config = validate(compose_config(job))
        assert config.world == world, f"{name} job {job} trains in another world than the one built"
    print(f"{name}: {len(jobs)} jobs composed, each in the world built")
PY
fi

mkdir -p "$OUT"
if command -v nvidia-smi >/dev/null; then  # peak GPU memory: sample every second while the script lasts
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$OUT/gpu_memory.txt" \
     2>/dev/null || true; sleep 1; done) &
  SAMPLER=$!
  trap 'kill $SAMPLER 2>/dev/null || true' EXIT
fi
START=$SECONDS
"$PYTHON" -m repo_exp.world "${WORLD[@]}" 2>&1 | tee "$OUT/world.log"
WORLD_S=$((SECONDS - START))
"$PYTHON" -m repo_exp "${COMPARE[@]}"
COMPARE_S=$((SECONDS - START - WORLD_S))
"$PYTHON" -m repo_exp "${FRONTIER[@]}"
FRONTIER_S=$((SECONDS - START - WORLD_S - COMPARE_S))

# timings.json: the GPU, each world stage's seconds (its stage.json, also for stages found in the cache), each run's
# (wall time from its log, its steps and their median seconds), each phase's
GPU=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo "no nvidia-smi")
"$PYTHON" - "$OUT" "$GPU" "$WORLD_S" "$COMPARE_S" "$FRONTIER_S" <<'PY'
import json, re, statistics, sys
from datetime import datetime
from pathlib import Path

out, gpu = Path(sys.argv[1]), sys.argv[2]
stages = []
for line in (out / "world.log").read_text().splitlines():
    match = re.search(r"world stage \S+: (?:building in|cached at) (\S+)", line)
    if match and (Path(match.group(1)) / "stage.json").is_file():
        record = json.loads((Path(match.group(1)) / "stage.json").read_text())
        stages.append({"stage": record["stage"], "folder": match.group(1), "seconds": record["seconds"],
                       "built_now": "building in" in line})

def stamp(line):
    found = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+\]", line)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S") if found else None

runs = {}
for sweep in ("compare", "frontier"):
    for log in sorted((out / sweep / "runs").glob("*/__main__.log")):
        times = [t for t in map(stamp, log.read_text().splitlines()) if t]
        rows = [json.loads(l) for l in (log.parent / "metrics.jsonl").read_text().splitlines() if l.strip()] \
            if (log.parent / "metrics.jsonl").is_file() else []
        steps = [r["timing/step"] for r in rows if "timing/step" in r]
        runs[f"{sweep}/{log.parent.name}"] = {
            "wall_s": (times[-1] - times[0]).total_seconds() if times else None, "steps": len(steps),
            "step_median_s": statistics.median(steps) if steps else None}
memory = out / "gpu_memory.txt"
samples = [float(x) for x in memory.read_text().split()] if memory.is_file() else []
timings = {"gpu": gpu, "peak_gpu_memory_mib": max(samples) if samples else None,
           "phases_s": {"world": int(sys.argv[3]), "compare": int(sys.argv[4]), "frontier": int(sys.argv[5])},
           "world_stages": stages, "runs": runs}
(out / "timings.json").write_text(json.dumps(timings, indent=1))
print(f"on {gpu}: world {sys.argv[3]} s, compare {sys.argv[4]} s, frontier {sys.argv[5]} s; "
      f"{len(runs)} runs; every timing in {out / 'timings.json'}, the reports in {out / 'compare'} and "
      f"{out / 'frontier'}")
PY
