#!/bin/bash
# The threshold sweep at smoke size (tiny random models, 4 steps; about a minute on 2 cores) and its report: a quick
# check that sweeping, evaluation and reporting work end to end.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/smoke_sweep_$(date +%Y-%m-%d_%H-%M-%S)}
$PY -m repo_exp --multirun +sweep=threshold experiment=smoke logger=none trainer.progress=false \
  hydra.sweep.dir="$OUT" "$@"
$PY -m repo_exp.report "$OUT" --out "$OUT/report" --title "Smoke threshold sweep"
