#!/usr/bin/env bash
# On a machine with a GPU: a few bf16 ZeRO-2 steps of a random-initialised ~300M-parameter Llama (the policy; the
# reference, reward and cost models and the two critics have the same shape, ~1.5B parameters in all), then the
# measured tokens per second for generation and for the PPO update.
#
#   bash experiments/gpu_smoke.sh                       # one GPU
#   GPUS=8 bash experiments/gpu_smoke.sh                # eight, through torchrun
#   bash experiments/gpu_smoke.sh trainer.total_steps=8 # any Hydra override is passed on
#   DRY_RUN=1 bash experiments/gpu_smoke.sh             # print the composed config and exit (no GPU needed)
#   ZERO3=1 bash experiments/gpu_smoke.sh               # ZeRO-3 instead: a ~0.85B Llama per model, the policy's
#                                                       # parameters gathered once per rollout for generation
# Writes $RUN_DIR/gpu_smoke.json: generation and update tokens per second and the peak GPU memory (nvidia-smi,
# sampled every second, the largest over GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
GPUS=${GPUS:-1}
RUN_DIR=${RUN_DIR:-outputs/gpu_smoke/$(date +%Y-%m-%d_%H-%M-%S)}
ARCH=(hidden_size=1024 intermediate_size=2816 num_hidden_layers=24 num_attention_heads=16 num_key_value_heads=16
      max_position_embeddings=512)
STAGE=zero2
if [ -n "${ZERO3:-}" ]; then
  STAGE=zero3
  ARCH=(hidden_size=2048 intermediate_size=5632 num_hidden_layers=16 num_attention_heads=16 num_key_value_heads=16
        max_position_embeddings=512)
fi
ARGS=(experiment=smoke deepspeed=$STAGE deepspeed.bf16=true logger=none trainer.progress=false
      eval.at_start=false eval.at_end=false
      trainer.total_steps=5 trainer.prompts_per_step=$((64 * GPUS)) trainer.samples_per_prompt=1
      trainer.rollout_batch_size=64 trainer.micro_batch_size=16 trainer.max_new_tokens=256
      model.dtype=bfloat16 reward.dtype=bfloat16 cost.dtype=bfloat16)
for part in model reward cost; do
  for kv in "${ARCH[@]}"; do ARGS+=("$part.arch.$kv"); done
done
ARGS+=("hydra.run.dir=$RUN_DIR" "$@")

if [ -n "${DRY_RUN:-}" ]; then
  exec "$PYTHON" -m repo_exp --cfg job "${ARGS[@]}"
fi
mkdir -p "$RUN_DIR"
if command -v nvidia-smi >/dev/null; then  # peak GPU memory: sample every second while the run lasts
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$RUN_DIR/gpu_memory.txt" \
     2>/dev/null || true; sleep 1; done) &
  SAMPLER=$!
  trap 'kill $SAMPLER 2>/dev/null || true' EXIT
fi
if [ "$GPUS" -gt 1 ]; then
  "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m repo_exp "${ARGS[@]}"
else
  "$PYTHON" -m repo_exp "${ARGS[@]}"
fi

# the first step includes warm-up (kernel selection, allocator growth): report the median of the later ones
"$PYTHON" - "$RUN_DIR/metrics.jsonl" "$STAGE" <<'PY'
import json, os, statistics, sys

rows = [r for r in map(json.loads, open(sys.argv[1])) if "throughput/rollout_tokens_per_s" in r]
later = rows[1:] or rows
def median(key):
    return statistics.median(r[key] for r in later)
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:
    device = "unknown"
print(f"gpu_smoke on {device}: {len(rows)} steps, median of steps {later[0]['step']}-{later[-1]['step']}")
def tokens(r):  # response tokens of the whole step, over every rank
    return r["throughput/rollout_tokens_per_s"] * r["timing/rollout"]
print(f"  generation: {statistics.median(tokens(r) / r['timing/generate'] for r in later):,.0f} response tokens/s "
      f"(sampling only; {median('throughput/rollout_tokens_per_s'):,.0f} with the reference, reward and cost passes)")
print(f"  update:     {median('throughput/update_tokens_per_s'):,.0f} response tokens/s "
      f"(policy and both critics, forward and backward; {median('timing/update'):.2f} s per step)")
print(f"  step:       {median('timing/step'):.2f} s, {median('response/length'):.0f} tokens per response")
memory_file = os.path.join(os.path.dirname(sys.argv[1]), "gpu_memory.txt")
samples = [float(x) for x in open(memory_file).read().split()] if os.path.exists(memory_file) else []
figures = {
    "device": device, "zero_stage": sys.argv[2], "steps": len(rows),
    "generation_tokens_per_s": statistics.median(tokens(r) / r["timing/generate"] for r in later),
    "rollout_tokens_per_s": median("throughput/rollout_tokens_per_s"),
    "update_tokens_per_s": median("throughput/update_tokens_per_s"),
    "step_s": median("timing/step"),
    "peak_gpu_memory_mib": max(samples) if samples else None,
}
print(f"  peak GPU memory: {figures['peak_gpu_memory_mib']} MiB")
with open(os.path.join(os.path.dirname(sys.argv[1]), "gpu_smoke.json"), "w") as f:
    json.dump(figures, f, indent=1)
PY
