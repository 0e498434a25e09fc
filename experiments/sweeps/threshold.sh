#!/bin/bash
# Threshold sweep on the synthetic world: average (Safe RLHF) and rectified (RePO) at d = -0.5, 0, 0.5, two jobs at
# a time on this machine, then the comparison report (trade-off and interference figures).
#   bash experiments/sweeps/threshold.sh [extra overrides, e.g. trainer.total_steps=100]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/threshold_$(date +%Y-%m-%d_%H-%M-%S)}
$PY -m repo_exp --multirun +sweep=threshold hydra/launcher=local trainer.num_threads=1 \
  hydra.sweep.dir="$OUT" "$@"
$PY -m repo_exp.report "$OUT" --out "$OUT/report" --title "Threshold sweep"
