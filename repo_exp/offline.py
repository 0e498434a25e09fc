"""The offline preference methods — SACPO, P-SACPO and SafeDPO — on the project's runtime, run folder, checkpoints,
logging and evaluation (``algorithm=sacpo``, ``algorithm=safe_dpo``):

    for each stage: its pairs, its reference, a fresh optimizer → DPO steps → (P-SACPO: average the weights)
    → evaluate with the learned reward and cost models and the oracle → save

The objective of each stage is the sigmoid DPO loss of ``repo_exp/algorithms/dpo.py`` (the loss, the pairs and the
papers each method follows are described there): SACPO runs a helpfulness stage with β and a safety stage with β/λ
whose reference is the policy the first stage ended with; SafeDPO runs one stage on pairs ranked by safety first, with
a margin Δ on safe-over-unsafe pairs. No reward or cost model is in the loop: they are loaded for the evaluation only,
which is the RL runs' own (``repo_exp.evaluate.evaluate_models``), so every figure of an RL run is here too.

The run folder, resume checks, signals, the initial and final evaluation and the metrics file are the RL trainer's
(``repo_exp.train.Trainer``); this class replaces its step, its checkpoint contents and its set-up. A checkpoint
holds the policy, the current stage's reference when it is not the initial policy (``reference/``), the stage's
optimizer and schedule, the step, the stage and its data position, and the RNG states, so a run stopped in either
stage resumes at the same step and ends where a run never stopped ends.

Choices where TRL's ``DPOTrainer`` or the SACPO authors' runs leave room, each exact or stated:
- the reference log-probabilities of a stage are computed once when it starts, in fixed chunks (TRL's
  ``precompute_ref_log_probs``): the same values as on the fly, and a resumed run recomputes them bit for bit;
- a stage's batches are a function of (``seed``, stage, step) alone: a new permutation of the pairs every epoch, the
  last batch of an epoch shorter (a PyTorch ``DataLoader`` without ``drop_last``, as TRL's);
- each stage has its own AdamW and learning-rate schedule over its own steps (the SACPO authors ran each stage as a
  separate training run), warm-up included;
- prompts are left-padded and responses right-padded, with position ids from the mask: the log-probabilities of
  TRL's right-padded rows (tested against TRL's own loss).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from repo_exp import run_folder
from repo_exp.algorithms.dpo import (dpo_figures, dpo_loss, helpfulness_pairs, interpolate_weights, safety_first_pairs,
                                     safety_margins, safety_pairs)
from repo_exp.checkpoint import CheckpointManager, load_rng_states, save_rng_states
from repo_exp.config import Config, ConfigError, SACPOConfig, SafeDPOConfig
from repo_exp.constraints.bounds import LambdaTrace
from repo_exp.data.preferences import PairBatch, PairEncoder, describe_pairs, load_preference_rows
from repo_exp.engine import TorchEngine
from repo_exp.models.adapters import is_peft_model, load_trained
from repo_exp.models.policy import frozen
from repo_exp.models.tokenizers import tokenizer_name
from repo_exp.models.weights import load_state_dict_safely
from repo_exp.progress import Every, step_line
from repo_exp.rollout.score import sequence_logprobs
from repo_exp.runtime import init_runtime
from repo_exp.setup import build_constraint, build_models, low_precision_frozen
from repo_exp.train import Trainer, _seed_everything
from repo_exp.world.stage import WorldArtifacts, prepare_world

log = logging.getLogger("repo_exp")
PROGRESS_FIGURES = ("loss/dpo", "dpo/rewards/accuracies", "dpo/rewards/margins", "timing/step")


@dataclass
class Stage:
    """One DPO stage: its pairs, its β and margin, and its place in the run's steps."""

    name: str  # helpfulness | safety | safety_first
    beta: float
    pairs: PairEncoder
    steps: int
    start: int  # the run's step at which the stage begins
    margin: float = 0.0  # SafeDPO's Δ on safe-over-unsafe pairs (0: plain DPO)
    description: dict[str, float] = field(default_factory=dict)  # describe_pairs of its pairs

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.pairs) / batch_size)


def stage_pairs(algorithm: SACPOConfig | SafeDPOConfig, rows: list[dict]) -> list[tuple[str, float, float, list]]:
    """(name, β, Δ, pairs) of each stage, in order."""
    a = algorithm
    if isinstance(a, SafeDPOConfig):
        return [("safety_first", a.beta, a.margin, safety_first_pairs(rows, a.both_unsafe))]
    helpfulness = ("helpfulness", a.beta, 0.0, helpfulness_pairs(rows))
    safety = ("safety", a.beta / a.multiplier, 0.0, safety_pairs(rows))
    return [helpfulness, safety] if a.order == "helpfulness_first" else [safety, helpfulness]


def batch_indices(n: int, batch_size: int, seed: int, stage: int, step: int) -> tuple[list[int], int, int]:
    """The pairs of a stage's ``step`` (counted from the stage's start), its epoch and its batch within the epoch:
    a new seeded permutation of the ``n`` pairs every epoch, cut into batches of ``batch_size`` (the last shorter)."""
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 7_919 + 1_000_003 * stage + epoch)
    order = torch.randperm(n, generator=generator)
    return order[position * batch_size: (position + 1) * batch_size].tolist(), epoch, position


def pair_logps(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities (B,) of the chosen and the rejected responses: the sum over response tokens."""
    logprobs = sequence_logprobs(model, batch.sequences, batch.attention_mask, batch.prompt_width)  # (2B, T)
    return (logprobs * batch.response_mask).sum(-1).chunk(2)


def _to(batch: PairBatch, device: torch.device) -> PairBatch:
    return PairBatch(batch.sequences.to(device), batch.attention_mask.to(device), batch.response_mask.to(device),
                     batch.prompt_width, batch.chosen_safe.to(device), batch.rejected_safe.to(device))


class OfflineTrainer(Trainer):
    """Runs an offline method's stages in the RL trainer's run folder, with its resume, signals and evaluation."""

    def __init__(self, config: Config, cfg: DictConfig, run_dir: Path, world: WorldArtifacts | None = None) -> None:
        """``world``: the synthetic world's folders when the caller has built or found them already (else the world
        stage runs here, as for an RL run)."""
        self.config = config
        self.cfg = cfg
        self.rt = init_runtime(False)
        if self.rt.distributed:
            raise ConfigError(f"algorithm={config.algorithm.name} runs in one process; {self.rt.world_size} were "
                              f"started")
        self.run_dir = self._shared_run_dir(run_dir)
        self._refuse_used_run_dir()
        _seed_everything(config.seed, config.trainer)
        a, t = config.algorithm, config.trainer
        self.constraint = build_constraint(cfg.constraint, self.rt.comm)  # none: the d of the evaluation's figures
        self.world = world if world is not None else prepare_world(config, self.rt)
        self.models = build_models(config, self.rt, self.constraint, world=self.world, with_critics=False)
        if getattr(a, "merge_weight", None) is not None and is_peft_model(self.models.policy.module):
            raise ConfigError("algorithm.merge_weight (P-SACPO) averages whole weights; under LoRA adapters the "
                              "average of two adapters' factors is not the average of their updates: train without "
                              "model.lora (rank 0), or merge the two stages' adapters into whole models first")
        rows, origin = load_preference_rows(a.preferences, config.data, self.world)
        self.stages = self._plan(rows)
        t.total_steps = sum(stage.steps for stage in self.stages)  # before the evaluation and the loop read it
        log.info("algorithm=%s: %d preference rows from %s; %s", a.name, len(rows), origin,
                 ", ".join(f"stage {i + 1} ({s.name}, β {s.beta:.4g}{f', Δ {s.margin:g}' if s.margin else ''}): "
                           f"{len(s.pairs)} pairs, {s.steps} steps" for i, s in enumerate(self.stages)))
        self.eval_encoder = self._eval_encoder()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", t.keep_last, True, self.rt.barrier)
        self.start_step = 0
        self.nonfinite_in_a_row = 0
        self.initial_rows: list[dict] | None = None
        self.stop_signal: int | None = None
        self.every = Every(10.0)
        self.lambda_trace = LambdaTrace()  # never observed: no multiplier, no train/lambda_* in the summary
        self.stage_index: int | None = None  # the stage entered (None until the first step)
        self.reference: nn.Module = self.models.ref
        self.reference_logps: tuple[torch.Tensor, torch.Tensor] | None = None
        self.entered: dict[str, float] = {}  # figures of the stage just entered, logged with its first step
        self._restore()
        self.logger = self._logger()

    # ---- set-up
    def _plan(self, rows: list[dict]) -> list[Stage]:
        a, t = self.config.algorithm, self.config.trainer
        stages, start = [], 0
        for name, beta, margin, pairs in stage_pairs(a, rows):
            encoder = PairEncoder(pairs, self.models.tokenizer, self.config.model.template, t.max_prompt_length,
                                  t.max_new_tokens, t.max_length, tokenizer_name(self.config.model))
            steps = max(1, math.ceil(a.epochs * math.ceil(len(encoder) / a.batch_size)))
            stage = Stage(name, beta, encoder, steps, start, margin, describe_pairs(pairs))
            stages.append(stage)
            start += stage.steps
        return stages

    def stage_at(self, step: int) -> int:
        """The index of the stage that runs ``step`` (0-based; the last stage for any step past the end)."""
        for i, stage in enumerate(self.stages):
            if step < stage.start + stage.steps:
                return i
        return len(self.stages) - 1

    def _enter_stage(self, index: int, reference: Path | None = None) -> None:
        """The stage's reference (the initial policy for the first stage; for a later one the policy as the previous
        stage left it, or as a checkpoint saved it), a fresh optimizer and schedule over the stage's steps, and the
        reference log-probabilities of its pairs."""
        a, stage, models = self.config.algorithm, self.stages[index], self.models
        start = time.perf_counter()
        policy = models.policy.module
        if index == 0:
            self.reference = models.ref
        else:
            self.reference = frozen(copy.deepcopy(policy))
            if reference is not None:
                state = load_state_dict_safely(reference)
                if is_peft_model(self.reference):  # LoRA: the folder holds the adapters, on the same base
                    load_trained(self.reference, state, reference)
                else:
                    self.reference.load_state_dict(state, strict=True)
            if self.config.trainer.mixed_precision == "bf16":
                low_precision_frozen(self.reference)
        models.policy = TorchEngine(policy, a.optimizer, a.scheduler, total_steps=stage.steps,
                                    max_grad_norm=a.max_grad_norm, name="actor")
        self.reference_logps = self._reference_logps(stage)
        self.stage_index = index
        seconds = time.perf_counter() - start
        self.entered = {"dpo/pairs": float(len(stage.pairs)), "timing/reference_logps": seconds,
                        **{f"dpo/{k}": v for k, v in stage.description.items() if k != "pairs"}}
        log.info("stage %d/%d (%s): %d pairs, β %.4g, %d steps; reference log-probabilities in %.1f s", index + 1,
                 len(self.stages), stage.name, len(stage.pairs), stage.beta, stage.steps, seconds)

    @torch.no_grad()
    def _reference_logps(self, stage: Stage) -> tuple[torch.Tensor, torch.Tensor]:
        chunk, n = self.config.algorithm.micro_batch_size, len(stage.pairs)
        chosen, rejected = [], []
        for start in range(0, n, chunk):
            batch = _to(stage.pairs.batch(range(start, min(n, start + chunk))), self.rt.device)
            with self.models.autocast():
                c, r = pair_logps(self.reference, batch)
            chosen.append(c.float())
            rejected.append(r.float())
        return torch.cat(chosen), torch.cat(rejected)

    # ---- the loop
    def train_step(self, step: int) -> dict[str, float]:
        index = self.stage_at(step)
        if index != self.stage_index:
            self._enter_stage(index)  # timed on its own (timing/reference_logps)
        start = time.perf_counter()
        a, stage, policy = self.config.algorithm, self.stages[index], self.models.policy
        indices, epoch, position = batch_indices(len(stage.pairs), a.batch_size, self.config.seed, index,
                                                 step - stage.start)
        ref_chosen, ref_rejected = self.reference_logps
        policy.module.train()
        stats: dict[str, list[tuple[float, float]]] = defaultdict(list)
        tokens = 0
        for first in range(0, len(indices), a.micro_batch_size):
            micro = indices[first: first + a.micro_batch_size]
            weight = len(micro) / len(indices)
            batch = _to(stage.pairs.batch(micro), self.rt.device)
            tokens += int(batch.response_mask.sum())
            with self.models.autocast():
                chosen, rejected = pair_logps(policy.module, batch)
            margins = safety_margins(batch.chosen_safe, batch.rejected_safe, stage.margin) if stage.margin else None
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                chosen.float(), rejected.float(), ref_chosen[micro], ref_rejected[micro], stage.beta, margins)
            loss = losses.mean()
            if not torch.isfinite(loss):
                policy.zero_grad()
                return self._skip(step, f"the DPO loss is {loss.item()}", {}, start)
            policy.backward(weight * loss)
            stats["loss/dpo"].append((loss.item(), weight))
            for key, value in dpo_figures(chosen_rewards, rejected_rewards, chosen, rejected).items():
                stats[f"dpo/{key}"].append((value.item(), weight))
            if margins is not None:
                stats["dpo/margin_share"].append(((margins > 0).float().mean().item(), weight))
        update = time.perf_counter() - start
        result = policy.step()
        if result["skipped"]:
            return self._skip(step, f"the gradient norm is {result['grad_norm']}", {}, start)
        self.nonfinite_in_a_row = 0
        metrics = {k: sum(v * w for v, w in pairs) / sum(w for _, w in pairs) for k, pairs in stats.items()}
        metrics.update({"dpo/stage": float(index + 1), "dpo/beta": stage.beta,
                        "dpo/epoch": epoch + (position + 1) / stage.batches_per_epoch(a.batch_size),
                        "grad_norm/actor": result["grad_norm"], "lr/actor": result["lr"]})
        metrics.update(self.entered)
        self.entered = {}
        if step + 1 == self.config.trainer.total_steps and getattr(a, "merge_weight", None) is not None:
            self._merge(a.merge_weight)
            metrics["dpo/merge_weight"] = a.merge_weight
        elapsed = time.perf_counter() - start
        metrics.update({"timing/update": update, "timing/step": elapsed,
                        "throughput/pairs_per_s": len(indices) / max(elapsed, 1e-9),
                        "throughput/tokens_per_s": tokens / max(elapsed, 1e-9)})
        self.logger.log(metrics, step + 1)
        return metrics

    def _merge(self, weight: float) -> None:
        """P-SACPO: the policy becomes ``(1 − q)·θ_helpfulness + q·θ_safety``; the helpfulness-aligned weights are the
        safety stage's reference."""
        policy = self.models.policy.module
        policy.load_state_dict(interpolate_weights(self.reference.state_dict(), policy.state_dict(), weight))
        log.info("P-SACPO: the final policy is %.3g × the helpfulness-aligned weights + %.3g × the safety-realigned "
                 "ones", 1 - weight, weight)

    def _progress_line(self, done: int, metrics: dict[str, float], shown: bool) -> None:
        total = self.config.trainer.total_steps
        if not shown and self.every(force=done == total):
            log.info(step_line(self.config.algorithm.name, done, total,
                               {k: metrics.get(k) for k in PROGRESS_FIGURES}))

    # ---- checkpoints
    def save(self, step: int) -> Path:
        index = self.stage_index if self.stage_index is not None else self.stage_at(max(0, step - 1))
        stage = self.stages[index]
        done_in_stage = step - stage.start
        per_epoch = stage.batches_per_epoch(self.config.algorithm.batch_size)

        def write(folder: Path) -> None:
            self.models.save_weights(folder)
            if self.reference is not self.models.ref:
                self.reference.save_pretrained(folder / "reference", safe_serialization=True)
            state = {
                "step": step,
                "algorithm": self.config.algorithm.name,
                "stage": index,
                # where the data stands: the next batch of this stage is batch `batch` of epoch `epoch`
                "data": {"stage": index + 1, "epoch": done_in_stage // per_epoch, "batch": done_in_stage % per_epoch},
                "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "constraint_name": self.config.constraint.name,
                "config": self.resolved_config,  # what a resume compares its own settings with
            }
            (folder / "state.json").write_text(json.dumps(state))
            save_rng_states(folder, self.rt.rank)
            self.models.policy.save(folder)

        start = time.perf_counter()
        folder = self.checkpoints.save(step, write)
        log.info("checkpoint %s (%.1f s)", folder, time.perf_counter() - start)
        return folder

    def load(self, folder: Path, full: bool) -> None:
        """The policy's weights; with ``full``, also the stage with its reference, the optimizer and schedule, and
        the RNG states (``trainer.init_from`` takes the policy's weights of any checkpoint, RL ones included)."""
        state = json.loads((folder / "state.json").read_text())
        if full and state.get("algorithm") != self.config.algorithm.name:
            raise ValueError(f"{folder} was written by a run with algorithm={state.get('algorithm', 'ppo')}, this "
                             f"run has algorithm={self.config.algorithm.name}")
        self.models.load_weights(folder, critics=False)
        if not full:
            return
        reference = folder / "reference"
        self._enter_stage(int(state["stage"]), reference if reference.is_dir() else None)
        self.entered = {}  # the stage's figures went out with its first step, before the stop
        self.models.policy.load(folder)
        if any(key.startswith(("algorithm.optimizer.", "algorithm.scheduler.")) for key, _, _ in self.resume_changes):
            engine = self.models.policy
            run_folder.apply_optimizer_settings(engine.optimizer, engine.scheduler, self.config.algorithm.optimizer)
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        if not load_rng_states(folder, self.rt.rank):
            log.warning("%s has no RNG state; this run keeps its own seed", folder)

