#!/bin/bash
# Multiplier learning-rate sweep of the average constraint (0.01, 0.1, 1.0), then the report.
# For RePO's learned multiplier: bash experiments/sweeps/lambda_lr.sh constraint=rectified constraint.multiplier=learned
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/lambda_lr_$(date +%Y-%m-%d_%H-%M-%S)}
$PY -m repo_exp --multirun +sweep=lambda_lr hydra/launcher=local trainer.num_threads=1 \
  hydra.sweep.dir="$OUT" "$@"
$PY -m repo_exp.report "$OUT" --out "$OUT/report" --title "Multiplier learning-rate sweep"
