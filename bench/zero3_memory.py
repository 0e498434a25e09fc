"""``python -m bench.zero3_memory``: peak host memory (RSS) per rank of one RL step with a ~100M-parameter Llama
policy and reward and cost models of the same size (as at paper scale, where all three are 7B), under ZeRO-3 on
two CPU ranks (policy, reference, reward, cost and both critics partitioned as they load) against one process.

    python -m bench.zero3_memory                    # saves the models once, runs both, prints the figures and ratio
    python -m bench.zero3_memory --scorers tiny     # tiny random reward and cost models instead
    python -m bench.zero3_memory --out FILE.json    # also writes the figures there
    python -m bench.zero3_memory --ranks 4          # four ranks instead of two

Each run is its own process (``torchrun --nproc_per_node 2`` for ZeRO-3, plain Python for the one-process run) and
reports its ``ru_maxrss``; the two runs must also sample the same tokens (equal step metrics). A command, not a test:
it takes minutes on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ARCH = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=14, num_attention_heads=12,
            num_key_value_heads=12, max_position_embeddings=256)
RUN = ("experiment=smoke", "logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
       "trainer.total_steps=1", "trainer.prompts_per_step=4", "trainer.samples_per_prompt=1",
       "trainer.max_new_tokens=8", "trainer.num_threads=1", "model.source=hub", "model.tokenizer=world",
       "model.gradient_checkpointing=true")


def save_models(folder: Path, scorers: bool) -> int:
    """The policy (and, with ``scorers``, a reward and a cost model in the published layout, of the same trunk);
    returns the policy's parameter count."""
    import torch
    from transformers import LlamaForCausalLM

    from repo_exp.config import ArchConfig
    from repo_exp.models.policy import tiny_llama_config
    from repo_exp.models.score_model import ScoreModel
    from repo_exp.world import world_tokenizer

    torch.manual_seed(0)
    config = tiny_llama_config(ArchConfig(**ARCH), world_tokenizer())
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "policy")
    for kind in ("reward", "cost") if scorers else ():
        ScoreModel(config, score_type=kind).save_pretrained(folder / kind)
    return sum(p.numel() for p in model.parameters())


def run_one(out: Path, overrides: list[str]) -> None:
    """One job in this process (a rank under torchrun): train, then write this rank's peak RSS."""
    from repo_exp.config import compose_config, validate
    from repo_exp.train import Trainer

    cfg = compose_config([*RUN, *overrides])
    trainer = Trainer(validate(cfg), cfg, out / "run")
    trainer.fit()
    rank = int(os.environ.get("RANK", "0"))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (out / f"rss_rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--scorers", choices=("same", "tiny"), default="same",
                        help="reward and cost models of the policy's size (default) or tiny random ones")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 on both sides (the same tokens and metrics), or bf16: the one process with "
                             "trainer.mixed_precision=bf16 against DeepSpeed's bf16")
    parser.add_argument("--ranks", type=int, default=2, help="ZeRO-3 ranks (torchrun processes on this machine)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file (appended to its runs)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.worker:
        run_one(args.worker, args.overrides)
        return
    with tempfile.TemporaryDirectory(prefix="zero3_memory_") as folder:  # models and checkpoints: gigabytes
        measure(args, Path(folder))


def measure(args: argparse.Namespace, root: Path) -> None:
    params = save_models(root, args.scorers == "same")
    common = [f"model.path={root / 'policy'}"]
    if args.scorers == "same":
        common += [f"{kind}.{key}={value}" for kind in ("reward", "cost")
                   for key, value in (("source", "hub"), ("path", root / kind), ("tokenizer", "world"),
                                      ("dtype", "float32"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    bf16 = args.precision == "bf16"
    runs = {"one_process": ([sys.executable], ["deepspeed=none", f"trainer.mixed_precision={'bf16' if bf16 else 'no'}"]),
            "zero3_ranks": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", str(args.ranks)],
                            ["deepspeed=zero3", f"deepspeed.bf16={str(bf16).lower()}"])}
    result: dict = {"policy_parameters": params, "scorers": args.scorers, "precision": args.precision,
                    "ranks": args.ranks, "overrides": args.overrides}
    for name, (launcher, extra) in runs.items():
        out = root / name
        out.mkdir()
        subprocess.run([*launcher, "-m", "bench.zero3_memory", "--worker", str(out), *common, *extra,
                        *args.overrides], env=env, check=True)
        result[name] = [json.loads(p.read_text())["peak_rss_mib"] for p in sorted(out.glob("rss_rank*.json"))]
        result[name + "_metrics"] = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
    result["ratio_max_rank_to_one_process"] = max(result["zero3_ranks"]) / result["one_process"][0]
    same = {k: (result["one_process_metrics"][k], result["zero3_ranks_metrics"][k])
            for k in ("reward/mean", "cost/mean", "kl/mean", "response/length")}
    result["same_step_metrics"] = same
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_metrics")}, indent=1))
    if args.out:  # appended to the file's runs, beside the CPU they ran on
        from repo_exp.machine import cpu_model

        doc = json.loads(args.out.read_text()) if args.out.exists() else {}
        doc["cpu"] = f"{cpu_model()}, {os.cpu_count()} cores"
        doc["command"] = "python -m bench.zero3_memory [--precision bf16] [--ranks N] [OVERRIDES] --out FILE"
        doc.setdefault("runs", []).append(result)
        args.out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"step metrics (one process, {args.ranks} ZeRO-3 ranks):", json.dumps(same))


if __name__ == "__main__":
    main()
