#!/bin/bash
# Three seeds of each constraint type (mean ± std of every figure), then the report.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-multirun/seeds_$(date +%Y-%m-%d_%H-%M-%S)}
$PY -m repo_exp --multirun +sweep=seeds hydra/launcher=local trainer.num_threads=1 \
  hydra.sweep.dir="$OUT" "$@"
$PY -m repo_exp.report "$OUT" --out "$OUT/report" --title "Seeds"
