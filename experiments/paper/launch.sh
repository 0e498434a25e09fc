#!/usr/bin/env bash
# One paper-scale run on one node: experiments/paper/launch.sh safe_rlhf|repo [HYDRA_OVERRIDES...]
#
#   GPUS=8 LAUNCHER=torchrun  (default) torchrun --standalone --nproc_per_node $GPUS -m repo_exp …
#   LAUNCHER=deepspeed        deepspeed --no_local_rank --num_gpus $GPUS --module repo_exp …
#   DRY_RUN=1                 print the composed config (offline, no GPU) instead of launching
#
# The run folder is outputs/paper/<method>/<time> unless hydra.run.dir=… is given; W&B logging is on
# (logger=wandb; WANDB_MODE=offline works without a network). Resume a pre-empted run with the same command plus
# trainer.resume=auto hydra.run.dir=<its folder>.
set -euo pipefail
METHOD=${1:?usage: $0 safe_rlhf|repo [overrides...]}
shift
case "$METHOD" in safe_rlhf|repo) ;; *) echo "unknown method '$METHOD' (safe_rlhf or repo)" >&2; exit 2 ;; esac
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-8}
ARGS=(experiment=paper/"$METHOD" logger=wandb logger.group=paper
      "hydra.run.dir=outputs/paper/$METHOD/\${now:%Y-%m-%d_%H-%M-%S}" "$@")

if [ -n "${DRY_RUN:-}" ]; then
  exec "$PYTHON" -m repo_exp --cfg job "${ARGS[@]}"
fi
case "${LAUNCHER:-torchrun}" in
  torchrun) exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m repo_exp "${ARGS[@]}" ;;
  deepspeed) exec deepspeed --no_local_rank --num_gpus "$GPUS" --module repo_exp "${ARGS[@]}" ;;
  *) echo "LAUNCHER must be torchrun or deepspeed" >&2; exit 2 ;;
esac
