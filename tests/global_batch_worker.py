"""One training step of each named case on the ranks of a ``torchrun`` group (gloo on CPU, DeepSpeed ZeRO), for
``tests/test_global_batch.py``:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/global_batch_worker.py OUT STAGE CASE …

For each case rank 0 writes ``OUT/<STAGE>-<CASE>.pt``: every trained parameter's change over the step (policy and
critics, gathered whole), the step's logged figures, and each rank's response tokens and reward sum (the ranks must
hold different ones for the comparison to mean anything). ``one_process(CASE, run_dir)`` gives the same record from
plain torch engines holding the whole batch.

AdamW with ε = lr = 1e4 and no clipping makes a step's change ``−lr·g/(|g| + ε) ≈ −g``: the change of every
parameter is (almost exactly) its gradient, so comparing changes compares the updates' gradients, not only their
signs (which is all an ordinary Adam first step keeps).
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

BASE = ("experiment=smoke", "logger=none", "trainer.progress=false", "eval.at_start=false", "eval.at_end=false",
        "trainer.num_threads=1", "trainer.total_steps=1", "ppo.max_grad_norm=1e9",
        "optimizer.actor.lr=1e4", "optimizer.actor.eps=1e4", "optimizer.critic.lr=1e4", "optimizer.critic.eps=1e4")
# every loss aggregation, and every other statistic the update divides by or centres with
CASES = {
    "token_mean": ("ppo.loss_aggregation=token_mean",),
    "seq_mean_token_mean": ("ppo.loss_aggregation=seq_mean_token_mean",),
    # advantage whitening over the batch, two PPO epochs (the unfused path: values before the update)
    "whitened": ("ppo.loss_aggregation=token_mean", "ppo.normalize_advantages=true", "ppo.epochs=2"),
    # group baselines and grpo's KL loss term
    "grpo_kl_loss": ("estimator=grpo", "ppo.loss_aggregation=token_mean", "ppo.kl_coeff=0.5"),
    "ptx_joint": ("ptx.source=world", "ppo.ptx_coeff=0.5", "ppo.ptx_mode=joint"),
    "ptx_separate": ("ptx.source=world", "ppo.ptx_coeff=0.5", "ppo.ptx_mode=separate"),
}
# the ranks' micro-batches of 4 samples exercise gradient accumulation under DeepSpeed too
STAGES = {"zero2": ("deepspeed=zero2", "deepspeed.bf16=false", "trainer.micro_batch_size=4"),
          "zero3": ("deepspeed=zero3", "deepspeed.bf16=false", "trainer.micro_batch_size=4")}


def overrides(case: str, stage: str | None) -> list[str]:
    return [*BASE, *CASES[case], *(STAGES[stage] if stage else ())]


def _trained(trainer) -> list[tuple[str, object]]:
    models = trainer.models
    return [("policy", models.policy), *zip(models.critics.names, models.critics.engines)]


def _full_state(trainer) -> dict[str, torch.Tensor] | None:
    """Every trained parameter, whole (collective under DeepSpeed; None off rank 0)."""
    out = {}
    for name, engine in _trained(trainer):
        if hasattr(engine, "full_state_dict"):
            state = engine.full_state_dict()
        else:
            state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        if state is not None:
            out.update({f"{name}.{k}": v.detach().float().cpu().clone() for k, v in state.items()})
    return out or None


def step(trainer) -> dict:
    """One step: the parameters' changes, the logged figures and this rank's batch."""
    batch = {}
    rollout = trainer.rollout

    def recorded(step_, timings):
        exp = rollout(step_, timings)
        batch.update(tokens=int(exp.response_mask.sum()), rewards=float(exp.rewards.sum()))
        return exp

    trainer.rollout = recorded
    before = _full_state(trainer)
    metrics = trainer.train_step(0)
    after = _full_state(trainer)
    delta = {k: after[k] - before[k] for k in before} if before is not None else None
    return {"delta": delta, "metrics": metrics, "batch": batch}


def one_process(case: str, run_dir: Path) -> dict:
    """The record of ``case`` from one process holding the whole batch (plain torch engines)."""
    from repo_exp.config import compose_config, validate
    from repo_exp.train import Trainer

    cfg = compose_config(overrides(case, None))
    return step(Trainer(validate(cfg), cfg, run_dir))


def main(out: Path, stage: str, cases: list[str]) -> None:
    import torch.distributed as dist

    from repo_exp.config import compose_config, validate
    from repo_exp.train import Trainer

    torch.set_num_threads(1)
    for case in cases:
        cfg = compose_config(overrides(case, stage))
        trainer = Trainer(validate(cfg), cfg, out / f"{stage}-{case}")
        record = step(trainer)
        batches = [None] * trainer.rt.world_size
        dist.all_gather_object(batches, record["batch"])
        if trainer.rt.is_main:
            torch.save({**record, "batch": batches}, out / f"{stage}-{case}.pt")
        del trainer
        gc.collect()
        dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
