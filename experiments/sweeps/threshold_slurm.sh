#!/bin/bash
# The threshold sweep × 3 seeds on a SLURM cluster (hydra-submitit-launcher), logged to W&B in one group named after
# the sweep folder. Set SLURM_PARTITION (or pass hydra.launcher.partition=NAME); run the report when the jobs end:
#   python -m repo_exp.report "$OUT" --out "$OUT/report"
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/threshold_slurm_$(date +%Y-%m-%d_%H-%M-%S)}
$PY -m repo_exp --multirun +sweep=threshold hydra/launcher=slurm logger=wandb seed=0,1,2 \
  hydra.sweep.dir="$OUT" "$@"
