"""``python -m bench.zero3_generation``: rollout time under ZeRO-3 with the policy's parameters gathered once per
rollout (``deepspeed.gather_for_generation=true``, the default) against the per-token path (every layer gathered
again at every token), on a random Llama. Prints both times and their ratio; ``--out FILE`` writes them as JSON.

    python -m bench.zero3_generation                                  # one process (CPU or one GPU)
    python -m torch.distributed.run --nproc_per_node 2 -m bench.zero3_generation   # two ranks

A command, not a test: the figure depends on the machine. The sampled tokens of both paths are checked equal.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="prompts per rank")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from repo_exp.config import AdamWConfig, SchedulerConfig
    from repo_exp.deepspeed_engine import DeepSpeedEngine
    from repo_exp.rollout.generate import generate, sampling_generator
    from repo_exp.runtime import init_runtime

    rt = init_runtime(use_deepspeed=True)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.prompt + args.new_tokens + 8, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "bf16": {"enabled": rt.device.type == "cuda"},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1e4},
                 "steps_per_print": 2**31 - 1}
    engine = DeepSpeedEngine(model, AdamWConfig(), SchedulerConfig(), 1, ds_config, "actor")
    engine.module.eval()
    global_batch = args.batch * rt.world_size
    rows = slice(rt.rank * args.batch, (rt.rank + 1) * args.batch)
    ids = torch.randint(3, 1024, (global_batch, args.prompt), generator=torch.Generator().manual_seed(1))[rows]
    ids, mask = ids.to(rt.device), torch.ones_like(ids).to(rt.device)

    def rollout(model):
        return generate(model, ids, mask, args.new_tokens, eos_token_id=-1, pad_token_id=0,
                        generator=sampling_generator(0, 0, 0, device=rt.device), rows=rows, global_batch=global_batch,
                        all_finished=rt.comm.all_finished if rt.distributed else None)

    def timed(gathered: bool) -> tuple[float, torch.Tensor]:
        best, tokens = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            if gathered:
                with engine.for_generation() as policy:
                    tokens = rollout(policy).sequences
            else:
                tokens = rollout(engine.module).sequences
            best = min(best, time.perf_counter() - start)
        return best, tokens

    per_token, tokens_a = timed(gathered=False)
    gathered, tokens_b = timed(gathered=True)
    result = {"world_size": rt.world_size, "device": str(rt.device), "hidden": args.hidden, "layers": args.layers,
              "batch_per_rank": args.batch, "new_tokens": args.new_tokens, "per_token_s": per_token,
              "gathered_s": gathered, "speedup": per_token / gathered,
              "same_tokens": bool(torch.equal(tokens_a, tokens_b))}
    if rt.is_main:
        print(json.dumps(result, indent=1))
        print(f"rollout under ZeRO-3: per-token gathering {per_token:.2f} s, gathered once {gathered:.2f} s: "
              f"{per_token / gathered:.1f}x")
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
