#!/bin/bash
# Evaluate a trained run's latest checkpoint (and, beside it, the initial policy) with 8 samples per prompt.
#   bash experiments/sweeps/evaluate.sh RUN_DIR [the overrides the run was trained with, e.g. constraint=average]
# Another prompt set: add eval/data=strongreject (StrongREJECT's 313 forbidden prompts; for models with a real
# tokenizer) or eval/data=file eval.data.path=PROMPTS.csv eval.data.prompt_column=COLUMN.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN=${1:?usage: evaluate.sh RUN_DIR [overrides]}
shift
$PY -m repo_exp.evaluate eval.checkpoint="$RUN" eval.samples_per_prompt=8 hydra.run.dir="$RUN/evaluation" "$@"
