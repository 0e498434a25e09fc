"""The RL loop, the same for every constraint type:

    make experience → update λ → advantages → PPO update → log → evaluate → save

Objective: maximise ``E_x E_y~π(x)[R(x, y)] − β·KL(π_θ ‖ π_ref)`` subject to the constraint chosen in ``conf/constraint``
(none, a fixed penalty, Safe RLHF's average constraint, or RePO's per-prompt rectified constraint); only the
``Constraint`` object differs between them. Deviations from the published Safe RLHF trainer, each for speed and each
exact:
- the old log-probabilities are those kept while sampling (no policy forward pass after generation;
  ``trainer.recompute_logprobs=true`` restores it);
- with one PPO epoch and one optimizer step per batch, the critics' "old" values are read in the update's own
  forward pass before any parameter changes, instead of in a separate pass (identical values; ``fused`` below).
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from repo_exp.algorithms import (
    aggregation_count,
    critic_loss,
    gae_advantages,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    policy_loss,
    ptx_loss,
    ptx_tokens,
    token_streams,
)
from repo_exp.checkpoint import CheckpointManager, check_checkpoint, load_rng_states, save_rng_states
from repo_exp.config import Config, ConfigError
from repo_exp.constraints import Constraint
from repo_exp.constraints.bounds import LambdaTrace
from repo_exp.data.prompts import PromptEncoder, PromptStream, load_prompt_set
from repo_exp.data.ptx import PtxBatch, PtxStream, load_ptx_pairs
from repo_exp.rollout.budget import check_rollout_memory, generation_budget
from repo_exp.deepspeed_engine import backend_for
from repo_exp.evaluate import eval_prompt_set, evaluate_models, publish_eval, read_rows, world_oracle
from repo_exp.loggers import MetricsLogger, truncate_metrics, wandb_sink
from repo_exp import run_folder
from repo_exp.models.score_model import position_ids_from_mask
from repo_exp.models.tokenizers import tokenizer_name
from repo_exp.progress import Every, step_line
from repo_exp.provenance import source_commit
from repo_exp.rollout import Experience, Timings, make_experience, sequence_logprobs
from repo_exp.rollout.score import logprob_gap
from repo_exp.runtime import LocalRuntimeComm, Runtime, init_runtime, map_large_blocks
from repo_exp.setup import Models, build_models, build_constraint
from repo_exp.world.stage import WorldArtifacts, prepare_world

log = logging.getLogger("repo_exp")
PROGRESS_FIGURES = ("reward/mean", "cost/mean", "constraint/lambda", "timing/step")


class NonFiniteError(RuntimeError):
    """Too many steps in a row produced a NaN or Inf."""


# ------------------------------------------------------------------------------------------------- the math glue


def compute_advantages(exp: Experience, constraint: Constraint, cfg: Config,
                       reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fill the reward and cost advantages (and, under ``gae``, the returns) and the mixed advantage the policy loss
    sees. The cost signal is the constraint's (``Constraint.cost_signal``); the KL is placed so that every sample
    carries ``ppo.kl_coeff`` (``Constraint.kl_reward_weight``/``kl_cost_weight``). ``reduce`` sums over data-parallel
    ranks: ``ppo.normalize_advantages`` whitens with the mean and variance of the global batch, not of this rank's."""
    ppo, estimator = cfg.ppo, cfg.estimator
    with_cost = constraint.needs_cost_critic and exp.costs is not None
    if with_cost and exp.cost_signal is None:  # the trainer computes it once over the whole batch (prompt groups)
        exp.cost_signal = constraint.cost_signal(exp.costs, exp.prompt_index)
    signal = exp.cost_signal if with_cost else None
    if estimator.critic_free:
        exp.kl = (exp.logprobs - exp.ref_logprobs) * exp.response_mask
        reward_adv, cost_adv = group_signal_advantages(exp, signal, constraint, cfg)
        exp.reward_advantages, exp.cost_advantages = reward_adv, cost_adv
    else:
        reward_stream, cost_stream, exp.kl = token_streams(
            exp.logprobs, exp.ref_logprobs, exp.response_mask, exp.rewards, signal,
            kl_coeff=ppo.kl_coeff, kl_reward_weight=constraint.kl_reward_weight,
            kl_cost_weight=constraint.kl_cost_weight, clip_range_score=ppo.clip_range_score,
        )
        exp.reward_advantages, exp.reward_returns = gae_advantages(
            exp.reward_values, reward_stream, exp.response_mask, ppo.gamma, ppo.gae_lambda)
        if with_cost:
            exp.cost_advantages, exp.cost_returns = gae_advantages(
                exp.cost_values, cost_stream, exp.response_mask, ppo.gamma, ppo.gae_lambda)
        reward_adv, cost_adv = exp.reward_advantages, exp.cost_advantages
    if ppo.normalize_advantages:
        reward_adv = masked_whiten(reward_adv, exp.response_mask, reduce=reduce)
        cost_adv = masked_whiten(cost_adv, exp.response_mask, reduce=reduce) if cost_adv is not None else None
    exp.advantages = constraint.mix_advantages(reward_adv, cost_adv, exp.cost_active)


def group_signal_advantages(exp: Experience, cost_signal: torch.Tensor | None, constraint: Constraint,
                            cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Critic-free advantages (B, T) of the reward and cost signals over each prompt's k samples, the same for every
    token of a response. With ``estimator.kl=reward`` the sequence KL ``β·Σ_t k_t`` leaves the reward signal (and
    enters the cost signal by the constraint's weight), each with its own group baseline."""
    est, ppo = cfg.estimator, cfg.ppo
    groups, mask = exp.prompt_index, exp.response_mask.to(exp.logprobs.dtype)
    clip = ppo.clip_range_score
    kl_seq = ppo.kl_coeff * exp.kl.sum(-1) if est.kl == "reward" else torch.zeros_like(exp.rewards)

    def advantages(scores: torch.Tensor, centred: bool = False) -> torch.Tensor:
        return group_advantages(est.name, scores, groups, est.std_eps, centred)

    reward_adv = advantages(exp.rewards.float().clamp(-clip, clip) - constraint.kl_reward_weight * kl_seq)
    cost_adv = None
    if cost_signal is not None:
        cost_adv = advantages(cost_signal.clamp(-clip, clip), constraint.cost_signal_centred)
        if constraint.kl_cost_weight and est.kl == "reward":
            cost_adv = cost_adv + advantages(constraint.kl_cost_weight * kl_seq)
        cost_adv = cost_adv.to(mask.dtype).unsqueeze(-1) * mask
    return reward_adv.to(mask.dtype).unsqueeze(-1) * mask, cost_adv


def actor_objective(logprobs: torch.Tensor, micro: Experience, cfg: Config,
                    count: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor's loss on a micro-batch: the clipped surrogate on its mixed advantages and, under
    ``estimator.kl=loss`` (grpo), β times the KL term ``kl_penalty``, whose expected gradient is that of
    KL(π ‖ π_ref) and which carries the same β for every sample whatever the constraint did to the advantages.
    ``count``: the global minibatch's ``aggregation_count`` (this micro-batch's share of its loss; default: its own).
    Returns the loss and detached statistics (``kl``: the KL term's value)."""
    ppo, agg = cfg.ppo, cfg.ppo.loss_aggregation
    loss, stats = policy_loss(logprobs, micro.logprobs, micro.advantages, micro.response_mask, ppo.clip_range_ratio,
                              agg, count)
    if cfg.estimator.kl == "loss" and ppo.kl_coeff > 0:
        kl = masked_mean(kl_penalty(logprobs, micro.logprobs, micro.ref_logprobs), micro.response_mask, agg, count)
        loss = loss + ppo.kl_coeff * kl
        stats["kl"] = kl.detach()
    return loss, stats


class UpdateStats:
    """The update's logged figures, each a ratio of sums over micro-batches, minibatches and data-parallel ranks:
    ``add(key, numerator, denominator)``, then ``result(reduce)`` sums both over ranks. A loss figure adds each
    micro-batch's share of its minibatch's loss over that share, a token figure its sum over its tokens: every figure
    is the global batch's, whatever the ranks and micro-batches were (every rank adds the same keys)."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, key: str, numerator: float, denominator: float) -> None:
        self.sums[key][0] += numerator
        self.sums[key][1] += denominator

    def add_token_sums(self, prefix: str, values: dict[str, torch.Tensor | None], mask: torch.Tensor) -> None:
        """Token means of ``values`` (B, T) over ``mask`` (B, T), as ``prefix/name``."""
        tokens = float(mask.sum())
        for name, value in values.items():
            if value is not None:
                self.add(f"{prefix}/{name}", float(masked_sum(value.float(), mask.float())), tokens)

    def result(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        totals = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        if reduce is not None:
            totals = reduce(totals)
        return {k: (num / den if den > 0 else 0.0) for k, (num, den) in zip(keys, totals.tolist())}


def chunk_sizes(total: int, size: int) -> list[int]:
    """``total`` rows in consecutive chunks of at most ``size``."""
    return [min(size, total - start) for start in range(0, total, size)]


def micro_batch_plan(prompt_lengths: list[int], response_lengths: list[int], budget: int) -> list[int]:
    """The sizes of consecutive micro-batches over samples taken longest response first: each takes samples while its
    padded tokens (rows × (widest prompt + longest response)) stay within ``budget``, and always at least one.

    Short responses therefore share a micro-batch with more of their kind, so the update runs fewer, fuller passes: a
    pass has a cost that does not shrink with its width (per-layer overhead, the weights' casts, accumulating the
    gradient), and the padded tokens of each pass stay within what the budget allows for memory."""
    sizes: list[int] = []
    rows = prompt = response = 0
    for p, r in zip(prompt_lengths, response_lengths):
        wider_prompt, longer = max(prompt, p), max(response, r)
        if rows and (rows + 1) * (wider_prompt + longer) > budget:
            sizes.append(rows)
            rows, wider_prompt, longer = 0, p, r
        rows, prompt, response = rows + 1, wider_prompt, longer
    if rows:
        sizes.append(rows)
    return sizes


def split_to(sizes: list[int], count: int) -> list[int]:
    """``sizes`` with its largest micro-batches halved (the first of equals) until there are ``count`` of them: every
    rank runs as many backward passes as the others, which ZeRO's collective gradient reduction needs."""
    sizes = list(sizes)
    if count < len(sizes) or count > sum(sizes):
        raise ValueError(f"cannot split {len(sizes)} micro-batches of {sum(sizes)} samples into {count}")
    while len(sizes) < count:
        i = max(range(len(sizes)), key=lambda j: sizes[j])
        sizes[i: i + 1] = [sizes[i] - sizes[i] // 2, sizes[i] // 2]
    return sizes


def micro_batches(mini: Experience, size: int, by_length: bool, token_budget: int | None = None,
                  agree: Callable[[int], int] | None = None) -> Iterator[Experience]:
    """The micro-batches of a minibatch.

    Without ``by_length``: ``size`` samples each, in order, padded to the batch's longest response. With it: samples
    longest response first, each micro-batch cut to its own longest response and widest prompt, so that the passes
    run over the tokens generated rather than over padding. With ``token_budget`` as well, a micro-batch holds as many
    samples as fit within that many padded tokens (``micro_batch_plan``) instead of ``size``: fewer, fuller passes
    when responses are short. ``agree(n)`` returns the largest count over ranks; a rank with fewer micro-batches
    splits its largest ones to match. The accumulated gradient is the same in every case (``ppo_update`` divides each
    micro-batch's loss by the global minibatch's count)."""
    if not by_length:
        yield from mini.split(size)
        return
    # longest response first; among equal responses the widest prompt first, so the plan does not depend on the order
    # the samples came in
    responses = mini.response_mask.sum(-1)
    prompts = mini.attention_mask[:, : mini.prompt_width].sum(-1)
    order = torch.sort(responses * (mini.prompt_width + 1) + prompts, descending=True, stable=True).indices
    ordered = mini.select(order)
    if token_budget is None:
        sizes = chunk_sizes(mini.batch_size, size)
    else:
        sizes = micro_batch_plan(prompts[order].tolist(), responses[order].tolist(), token_budget)
    if agree is not None:
        sizes = split_to(sizes, agree(len(sizes)))
    start = 0
    for rows in sizes:
        yield ordered.select(slice(start, start + rows)).trimmed()
        start += rows


def micro_batch_tokens(cfg: Config, prompt_width: int) -> int | None:
    """The padded-token budget of one micro-batch in the update: ``trainer.micro_batch_tokens``, or by default what a
    micro-batch of ``trainer.micro_batch_size`` samples at full length holds (the memory the micro-batch size was
    chosen for). None without ``trainer.group_by_length`` (micro-batches of ``micro_batch_size`` samples)."""
    t = cfg.trainer
    if not t.group_by_length:
        return None
    if t.micro_batch_tokens is not None:
        return t.micro_batch_tokens
    full = t.max_length if t.max_length is not None else prompt_width + t.max_new_tokens
    return t.micro_batch_size * full


def global_count(mini: Experience, aggregation: str, comm) -> torch.Tensor:
    """What the minibatch's losses divide by, summed over ranks: its ``aggregation_count`` (response tokens under
    ``token_mean``, responses under ``seq_mean_token_mean``). A scalar."""
    local = aggregation_count(mini.response_mask, aggregation).to(torch.float64).reshape(1)
    return comm.all_reduce_sum(local).cpu()[0].float()


def ppo_update(exp: Experience, models: Models, constraint: Constraint, cfg: Config, generator: torch.Generator,
               fused: bool, all_finite: Callable[[bool], bool],
               ptx: PtxStream | None = None,
               check_logprobs: Callable[[torch.Tensor, Experience], None] | None = None,
               agree: Callable[[int], int] | None = None,
               comm=None,
               ) -> tuple[dict[str, float], bool]:
    """PPO epochs over minibatches (optimizer steps) of micro-batches (gradient accumulation).

    ``agree(n)`` is the largest of ``n`` over ranks (micro-batches per minibatch; None in one process). ``comm`` is the
    data-parallel group (``repo_exp.runtime``; one process when None).

    The update is the global batch's whatever the number of ranks: every loss divides by the count of the global
    minibatch (its response tokens under ``token_mean``, its responses under ``seq_mean_token_mean``; PTX by its
    supervised tokens), summed over ranks before the first backward pass, and is multiplied by the number of ranks,
    since DeepSpeed averages the ranks' gradients. The logged figures are the global batch's too (``UpdateStats``).

    With ``ptx`` (``ppo.ptx_mode=joint``) each minibatch also backpropagates ``ppo.ptx_coeff`` × the PTX loss over as
    many supervised rows as it has samples, in chunks of ``trainer.micro_batch_size``, before its optimizer step.

    ``check_logprobs(logprobs, micro)`` sees the first micro-batch's fresh log-probabilities, before any update.

    Returns the statistics and whether the update was skipped because something was not finite.
    """
    ppo, agg, t = cfg.ppo, cfg.ppo.loss_aggregation, cfg.trainer
    comm = comm if comm is not None else LocalRuntimeComm()
    ranks = comm.world_size  # DeepSpeed averages gradients over ranks: a rank's share of the loss is scaled back up
    policy, critics = models.policy, models.critics
    engines = [policy, *critics.engines]
    for engine in engines:
        engine.module.train()
    stats = UpdateStats()
    n = exp.batch_size
    budget = micro_batch_tokens(cfg, exp.prompt_width)
    for _ in range(ppo.epochs):
        order = torch.randperm(n, generator=generator) if ppo.epochs * ppo.num_minibatches > 1 else torch.arange(n)
        for minibatch in order.chunk(ppo.num_minibatches):
            mini = exp.select(minibatch.to(exp.sequences.device))
            count = global_count(mini, agg, comm)
            passes = computed = 0
            for micro in micro_batches(mini, t.micro_batch_size, t.group_by_length, budget, agree):
                mask = micro.response_mask
                share = float(aggregation_count(mask, agg)) / max(1.0, float(count))  # of the global minibatch
                passes += 1
                computed += micro.batch_size * micro.response_width
                with models.autocast():
                    reward_values, cost_values = critics.values(micro.sequences, micro.attention_mask,
                                                                micro.prompt_width)
                    # the behaviour policy's: the distribution sampled from (trainer.temperature, top_k, top_p)
                    logprobs = sequence_logprobs(policy.module, micro.sequences, micro.attention_mask,
                                                 micro.prompt_width, t.temperature, t.top_k, t.top_p)
                if check_logprobs is not None:
                    check_logprobs(logprobs.detach(), micro)
                    check_logprobs = None
                if fused:  # the critics have not moved yet: these are the old values
                    micro.reward_values = reward_values.detach() * mask
                    micro.cost_values = cost_values.detach() * mask if cost_values is not None else None
                    compute_advantages(micro, constraint, cfg)
                # each loss is this micro-batch's share of the global minibatch's: divided by the global count
                actor_loss, pg = actor_objective(logprobs, micro, cfg, count)
                if "kl" in pg:  # grpo: β × the KL term for every sample
                    stats.add("loss/kl", pg.pop("kl").item(), share)
                reward_critic_loss = (critic_loss(reward_values, micro.reward_values, micro.reward_returns, mask,
                                                  ppo.clip_range_value, agg, count)
                                      if reward_values is not None else None)
                cost_critic_loss = (critic_loss(cost_values, micro.cost_values, micro.cost_returns, mask,
                                                ppo.clip_range_value, agg, count)
                                    if cost_values is not None else None)
                losses = [x for x in (actor_loss, reward_critic_loss, cost_critic_loss) if x is not None]
                # agreed over ranks: under DeepSpeed each backward is collective, so all ranks skip or none does
                if not all_finite(all(bool(torch.isfinite(x).all()) for x in (*losses, micro.advantages))):
                    for engine in engines:
                        engine.zero_grad()
                    return {"loss/nonfinite": 1.0}, True
                policy.backward(ranks * actor_loss)
                if reward_critic_loss is not None:
                    critics.backward(ranks * reward_critic_loss,
                                     ranks * cost_critic_loss if cost_critic_loss is not None else None)
                    stats.add("loss/reward_critic", reward_critic_loss.item(), share)
                stats.add("loss/actor", actor_loss.item(), share)
                if cost_critic_loss is not None:
                    stats.add("loss/cost_critic", cost_critic_loss.item(), share)
                micro_tokens = float(mask.sum())
                for key, value in pg.items():  # token means over the micro-batch
                    stats.add(f"policy/{key}", value.item() * micro_tokens, micro_tokens)
                if fused:
                    _advantage_stats(micro, stats)
            # the update's shape on this rank: forward/backward passes per minibatch, and the share of the response
            # columns they computed that were padding (0: every column computed was a generated token)
            stats.add("update/micro_batches", passes, 1.0)
            stats.add("update/padding", computed - float(mini.response_mask.sum()), computed)
            if ptx is not None and ppo.ptx_coeff > 0:
                # joint PTX: as many supervised rows as the minibatch has samples, in chunks of micro_batch_size
                # whatever the RL micro-batches were, so the accumulated gradient does not depend on their grouping
                if not ptx_backward(models, cfg, ptx, mini.batch_size, stats, "loss/ptx", comm, all_finite):
                    for engine in engines:
                        engine.zero_grad()
                    return {"loss/nonfinite": 1.0}, True
            for name, engine in zip(["actor", *critics.names], engines):
                result = engine.step()
                if result["skipped"]:
                    for e in engines:
                        e.zero_grad()
                    return {"loss/nonfinite": 1.0, f"grad_norm/{name}": result["grad_norm"]}, True
                stats.add(f"grad_norm/{name}", result["grad_norm"], 1.0)
                stats.add(f"lr/{name}", result["lr"], 1.0)
    return stats.result(comm.all_reduce_sum if ranks > 1 else None), False


def ptx_backward(models: Models, cfg: Config, ptx: PtxStream, rows: int, stats: UpdateStats, key: str, comm,
                 all_finite: Callable[[bool], bool]) -> bool:
    """Backpropagate ``ppo.ptx_coeff`` × the PTX loss of ``rows`` supervised rows on this rank (of ``rows`` × ranks
    drawn for the whole group), in chunks of ``trainer.micro_batch_size``: a token mean over every chunk of every
    rank, each chunk divided by the global token count. False (nothing more backpropagated) when a loss is not
    finite on some rank."""
    ppo, policy = cfg.ppo, models.policy
    device = next(policy.module.parameters()).device
    batches = [ptx.next(size) for size in chunk_sizes(rows, cfg.trainer.micro_batch_size)]
    local = torch.tensor([sum(float(ptx_tokens(b.loss_mask)) for b in batches)], dtype=torch.float64)
    count = float(comm.all_reduce_sum(local.to(device)).cpu()[0])
    for batch in batches:
        with models.autocast():
            loss = ptx_step_loss(policy.module, batch, device, count)
        if not all_finite(bool(torch.isfinite(loss))):  # agreed over ranks
            return False
        policy.backward(ppo.ptx_coeff * comm.world_size * loss)
        stats.add(key, loss.item(), float(ptx_tokens(batch.loss_mask)) / max(1.0, count))
    return True


def ptx_update(models: Models, cfg: Config, ptx: PtxStream, samples: int,
               all_finite: Callable[[bool], bool], comm=None) -> dict[str, float]:
    """``ppo.ptx_mode=separate`` (the published Safe RLHF trainer): after the RL update, the PTX loss gets its own
    backward passes and optimizer steps — as many steps as the RL update took, each on as many supervised samples as
    an RL minibatch, in micro-batches of ``trainer.micro_batch_size`` — instead of being added to the actor loss. Each
    step's loss is the token mean over every rank's rows (``ptx_backward``)."""
    ppo, policy = cfg.ppo, models.policy
    comm = comm if comm is not None else LocalRuntimeComm()
    per_step = max(1, samples // ppo.num_minibatches)
    stats = UpdateStats()
    for _ in range(ppo.epochs * ppo.num_minibatches):
        if not ptx_backward(models, cfg, ptx, per_step, stats, "loss/ptx", comm, all_finite):
            policy.zero_grad()  # agreed over ranks; the RL step has already been taken
            return {"loss/ptx_skipped": 1.0}
        result = policy.step()
        if result["skipped"]:
            return {"loss/ptx_skipped": 1.0}
        stats.add("grad_norm/actor_ptx", result["grad_norm"], 1.0)
    return {**stats.result(comm.all_reduce_sum if comm.world_size > 1 else None), "loss/ptx_skipped": 0.0}


def ptx_step_loss(policy, batch: PtxBatch, device, count: float | None = None) -> torch.Tensor:
    """The PTX loss of one batch: next-token NLL on its response tokens (their mean, or with ``count`` their sum over
    the tokens of the whole batch this one is a part of)."""
    mask = batch.attention_mask.to(device)
    logits = policy(input_ids=batch.input_ids.to(device), attention_mask=mask,
                    position_ids=position_ids_from_mask(mask), use_cache=False).logits
    return ptx_loss(logits, batch.input_ids.to(device), batch.loss_mask.to(device), count)


def _advantage_stats(exp: Experience, stats: UpdateStats) -> None:
    """Token means of the advantages, returns and values (over every rank's tokens once ``stats`` is reduced)."""
    stats.add_token_sums("advantages", {"mixed": exp.advantages, "reward": exp.reward_advantages,
                                        "cost": exp.cost_advantages}, exp.response_mask)
    if exp.reward_returns is not None:  # gae: critics and returns
        stats.add_token_sums("returns", {"reward": exp.reward_returns, "cost": exp.cost_returns}, exp.response_mask)
        stats.add_token_sums("values", {"reward": exp.reward_values, "cost": exp.cost_values}, exp.response_mask)


def step_metrics(exp: Experience, constraint: Constraint, rt: Runtime, measure_cost: bool = True) -> dict[str, float]:
    """SPEC §4 step metrics over the whole data-parallel batch; without ``measure_cost`` (the costs are placeholders)
    no ``cost/*`` metric."""
    gather = rt.comm.all_gather
    rewards = gather(exp.rewards.float())
    costs = gather(exp.costs.float()) if measure_cost else None
    lengths = gather(exp.response_mask.sum(-1).float())
    kl = gather(exp.kl.sum(-1).float())
    truncated = gather(exp.truncated.float())
    gate = gather(exp.cost_active.float())
    penalised = gather(exp.penalised.float()) if exp.penalised is not None else gate
    d = constraint.threshold
    lam = constraint.multiplier
    metrics = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
    }
    if costs is not None:
        metrics.update({
            "cost/mean": costs.mean().item(),
            "cost/std": costs.std().item() if costs.numel() > 1 else 0.0,
            "cost/unsafe_rate": (costs > d).float().mean().item(),
            "cost/violation_mean": (costs - d).clamp(min=0).mean().item(),
        })
    return metrics | {
        "constraint/lambda": lam,
        "constraint/threshold": d,
        "constraint/active_rate": gate.mean().item() if lam > 0 else 0.0,
        "constraint/violating_rate": penalised.mean().item(),
        "kl/mean": kl.mean().item(),
        "response/length": lengths.mean().item(),
        "response/truncated_rate": truncated.mean().item(),
    }


# ------------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Holds the models, the constraint, the data stream and the run folder; ``fit`` runs the loop."""

    def __init__(self, config: Config, cfg: DictConfig, run_dir: Path, world: WorldArtifacts | None = None) -> None:
        """``world``: the synthetic world's folders when the caller has built or found them already; when the config
        loads a world model and none is given, the world stage runs here, after the run folder is claimed and checked
        and before any model is set up."""
        if config.algorithm.offline:  # its _target_ trains it (``train`` below)
            raise ConfigError(f"algorithm={config.algorithm.name} is trained by {config.algorithm._target_}, not by "
                              f"the RL trainer")
        self.config = config
        self.cfg = cfg
        self.rt = init_runtime(config.deepspeed.enabled)
        ds = config.deepspeed
        if ds.enabled and ds.zero_stage == 3 and ds.release_host_memory:
            map_large_blocks()  # before any model is built: ZeRO-3's gathers would otherwise pin freed pages
        if self.rt.distributed and not config.deepspeed.enabled:
            raise ConfigError(f"{self.rt.world_size} processes but deepspeed=none: plain torch engines do not average "
                              f"gradients over ranks; launch with deepspeed=zero2 or zero3")
        self._check_batch_memory()
        self.run_dir = self._shared_run_dir(run_dir)
        self._refuse_used_run_dir()
        _seed_everything(config.seed + self.rt.rank, config.trainer)
        self.constraint = build_constraint(cfg.constraint, self.rt.comm)
        t = config.trainer
        train_set = load_prompt_set(config.data, config.data.split, config.world)
        if t.epochs is not None:  # before the engines are built: their learning-rate schedules span the whole run
            t.total_steps = max(1, math.ceil(t.epochs * len(train_set) / t.prompts_per_step))
            log.info("trainer.epochs=%g over %d prompts: %d steps", t.epochs, len(train_set), t.total_steps)
        self.world = world if world is not None else prepare_world(config, self.rt)
        self.models = build_models(config, self.rt, self.constraint, backend_for(config), world=self.world)
        self.encoder = PromptEncoder(train_set, self.models.tokenizer, config.model.template, t.max_prompt_length,
                                     tokenizer_name(config.model))
        self.stream = PromptStream(len(self.encoder), t.prompts_per_step, config.seed, self.rt.rank, self.rt.world_size)
        self.ptx = (PtxStream(load_ptx_pairs(config.ptx, config.world), self.models.tokenizer, config.model.template,
                              config.ptx.max_length, config.seed, self.rt.rank, self.rt.world_size)
                    if config.ppo.ptx_coeff > 0 else None)
        self.eval_encoder = self._eval_encoder()
        self.oracle = world_oracle(config.world.temptation) if config.data.source == "world" else None
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", t.keep_last, self.rt.is_main,
                                             self.rt.barrier)
        self.start_step = 0
        self.nonfinite_in_a_row = 0
        self.initial_rows: list[dict] | None = None
        self.stop_signal: int | None = None
        self.logprobs_checked = False
        self.every = Every(10.0)
        self.lambda_trace = LambdaTrace()  # the range λ takes over the run (train/lambda_min, train/lambda_max)
        self._restore()
        if self.start_step == 0:
            self.lambda_trace.observe(self.constraint.multiplier)
        self.logger = self._logger()
        # the fused value pass is exact only when the critics do not move before every sample has been seen
        ppo = config.ppo
        # (critic-free estimators need no values, and their group baselines need all k samples of a prompt at once)
        self.fused = (ppo.epochs == 1 and ppo.num_minibatches == 1 and not ppo.normalize_advantages
                      and not config.estimator.critic_free)

    # ---- set-up
    def _check_batch_memory(self) -> None:
        """Before anything is built or written: a step's batch must fit the memory of this rank's device."""
        t = self.config.trainer
        positions = t.max_length if t.max_length is not None else t.max_prompt_length + t.max_new_tokens
        response = positions - t.max_prompt_length if t.max_length is not None else t.max_new_tokens
        copies = 3 if t.group_by_length else 2
        check_rollout_memory(t.prompts_per_step, t.samples_per_prompt, self.rt.world_size, positions, response,
                             _known_vocab_size(self.config.model), copies, self.rt.device)

    def _shared_run_dir(self, run_dir: Path) -> Path:
        if self.rt.distributed:
            import torch.distributed as dist

            box = [str(run_dir)]
            dist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def _eval_encoder(self) -> PromptEncoder | None:
        e, t = self.config.eval, self.config.trainer
        if not (e.at_start or e.at_end or e.every):
            return None
        return PromptEncoder(eval_prompt_set(self.config), self.models.tokenizer, self.config.model.template,
                             t.max_prompt_length, tokenizer_name(self.config.model))

    def _logger(self) -> MetricsLogger:
        wanted = self.config.logger.name == "wandb" and self.rt.is_main  # the id file is written only then
        if not wanted:
            return MetricsLogger(self.run_dir, enabled=self.rt.is_main)
        resumed = (self.run_dir / "wandb_id.txt").exists()  # this folder's W&B run exists: rewind it to our step
        sink = wandb_sink(self.config, self.cfg, self.run_dir, run_id=self._wandb_id(), job_type="train",
                          resume_step=self.start_step if resumed else None)
        return MetricsLogger(self.run_dir, enabled=self.rt.is_main, wandb=sink)

    def _wandb_id(self) -> str:
        """One W&B run id per run folder, kept across resumes."""
        path = self.run_dir / "wandb_id.txt"
        if not path.exists():
            import uuid

            path.write_text(uuid.uuid4().hex[:12])
        return path.read_text().strip()

    # ---- the loop
    def fit(self) -> dict[str, Any]:
        t, e = self.config.trainer, self.config.eval
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            final = self.run_dir / "eval" / "summary.json"
            if self.start_step >= t.total_steps and final.is_file():
                log.warning("the run in %s already finished (step %d, final evaluation written): nothing to do",
                            self.run_dir, self.start_step)
                summary = json.loads(final.read_text())
                self._log_final_row_if_missing(summary)
                return summary
            if e.at_start and self.initial_rows is None and self.eval_encoder is not None:
                self.evaluate("initial", step=self.start_step)
            if self._agreed_stop():  # a signal during the initial evaluation: no step ran, nothing new to save
                log.warning("stopped by signal %s before step %d; continue with trainer.resume=auto",
                            self.stop_signal, self.start_step + 1)
                return {"stopped_at": self.start_step}
            bar = tqdm(range(self.start_step, t.total_steps), initial=self.start_step, total=t.total_steps,
                       disable=not (t.progress and self.rt.is_main), desc="rl", dynamic_ncols=True)
            done = self.start_step
            for step in bar:
                metrics = self.train_step(step)
                bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("reward/mean", "cost/mean", "constraint/lambda")
                                 if k in metrics})
                done = step + 1
                self._progress_line(done, metrics, shown=not bar.disable)
                if e.every and done % e.every == 0 and done < t.total_steps:
                    self.evaluate(f"step_{done:06d}", step=done)
                if self._agreed_stop():
                    self.save(done)
                    log.warning("stopped by signal %s after step %d; checkpoint saved, continue with "
                                "trainer.resume=auto", self.stop_signal, done)
                    return {"stopped_at": done}
                if t.save_every and done % t.save_every == 0 and done < t.total_steps:
                    self.save(done)
            if done > self.start_step:  # else this run resumed at its last step, whose checkpoint exists
                self.save(done)
            if self.config.logger.log_checkpoint and self.rt.is_main:
                self.logger.log_checkpoint(self.checkpoints.folder(done), done)
            summary = self.evaluate("final", step=done) if e.at_end and self.eval_encoder is not None else {}
            return summary
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()
            if self.rt.is_main:  # a refused duplicate's Hydra may have rewritten them meanwhile
                run_folder.restore_hydra_files(self.run_dir)

    def _progress_line(self, done: int, metrics: dict[str, float], shown: bool) -> None:
        """Without a progress bar (``trainer.progress=false``, e.g. parallel sweep jobs): a log line every 10 s."""
        total = self.config.trainer.total_steps
        if not shown and self.rt.is_main and self.every(force=done == total):
            log.info(step_line("rl", done, total, {k: metrics.get(k) for k in PROGRESS_FIGURES}))

    def train_step(self, step: int) -> dict[str, float]:
        start = time.perf_counter()
        timings = Timings()
        with timings.section("rollout"), self.models.autocast():
            exp = self.rollout(step, timings)
        measured = self.config.trainer.measure_cost  # else the costs are NaN placeholders, never logged or used
        # comm.all_finished: True when the flag holds on every rank (the flag itself on one process)
        if not self.rt.comm.all_finished(bool(torch.isfinite(exp.rewards).all()
                                              and (not measured or torch.isfinite(exp.costs).all()))):
            return self._skip(step, "a reward or cost is not finite", timings, start)
        constraint_before = self.constraint.state_dict()  # a snapshot: a skipped step leaves λ where it was
        constraint_metrics = self.constraint.update(exp.costs, exp.prompt_index, step)
        if not math.isfinite(self.constraint.multiplier):
            self.constraint.load_state_dict(constraint_before)
            return self._skip(step, "λ is not finite", timings, start)
        exp.cost_active = self.constraint.cost_gate(exp.costs, exp.prompt_index)
        exp.penalised = self.constraint.penalised(exp.costs, exp.prompt_index)
        # over the whole batch: a per-prompt signal needs every sample of its prompt, whatever the micro-batches
        exp.cost_signal = self.constraint.cost_signal(exp.costs, exp.prompt_index)
        exp.kl = (exp.logprobs - exp.ref_logprobs) * exp.response_mask
        comm = self.rt.comm
        reduce = comm.all_reduce_sum if self.rt.distributed else None
        adv_stats = UpdateStats()
        if not self.fused:
            if self.models.critics.engines:
                with timings.section("values"), torch.no_grad(), self.models.autocast():
                    exp.reward_values, exp.cost_values = self.models.critics.values(
                        exp.sequences, exp.attention_mask, exp.prompt_width)
            compute_advantages(exp, self.constraint, self.config, reduce)
            _advantage_stats(exp, adv_stats)
        with timings.section("update"):
            generator = torch.Generator().manual_seed(self.config.seed * 31 + step)
            joint_ptx = self.config.ppo.ptx_mode == "joint"
            update_metrics, skipped = ppo_update(exp, self.models, self.constraint, self.config, generator, self.fused,
                                                 all_finite=self.rt.comm.all_finished,
                                                 ptx=self.ptx if joint_ptx else None,
                                                 check_logprobs=None if self.logprobs_checked else self._check_logprobs,
                                                 agree=comm.all_max if self.rt.world_size > 1 else None, comm=comm)
            if not skipped and self.ptx is not None and not joint_ptx:
                update_metrics.update(ptx_update(self.models, self.config, self.ptx, exp.batch_size,
                                                 comm.all_finished, comm))
        if skipped:
            self.constraint.load_state_dict(constraint_before)
            return self._skip(step, "a loss, an advantage or a gradient is not finite", timings, start)
        self.nonfinite_in_a_row = 0
        self.lambda_trace.observe(self.constraint.multiplier, constraint_metrics.get("constraint/lambda_at_bound", 0.0))
        metrics = step_metrics(exp, self.constraint, self.rt, measure_cost=measured)
        metrics.update(constraint_metrics)
        metrics.update(update_metrics)  # the global batch's (ppo_update reduces them over ranks)
        metrics.update(adv_stats.result(reduce))
        metrics.update(self._oracle_metrics(exp))
        metrics.update(self._timing_metrics(exp, timings, start))
        self.logger.log(metrics, step + 1)
        return metrics

    def _check_logprobs(self, fresh: torch.Tensor, micro: Experience) -> None:
        """Before the first update: the kept log-probabilities of sampling must be the update's forward pass's (the
        first PPO ratio is 1). A gap means the sampler does not compute what the model does (dropout, a wrapped or
        recurrent module, a kernel that differs): stop, naming the model and the gap, on every rank."""
        self.logprobs_checked = True
        low_precision = (self.config.trainer.mixed_precision != "no" or self.config.model.dtype != "float32"
                         or (self.config.deepspeed.enabled and self.config.deepspeed.bf16))
        tolerance = self.config.trainer.logprob_tolerance
        tolerance = tolerance if tolerance is not None else (1e-1 if low_precision else 1e-4)
        mean_gap, max_gap = logprob_gap(micro.logprobs, fresh, micro.response_mask)
        log.info("kept vs recomputed log-probabilities before the first update: mean |gap| %.3g, max %.3g nats",
                 mean_gap, max_gap)
        if not self.rt.comm.all_finished(mean_gap <= tolerance):
            name = type(getattr(self.models.policy.module, "module", self.models.policy.module)).__name__
            raise RuntimeError(
                f"the log-probabilities kept while sampling from {name} differ from its forward pass before any update "
                f"(mean |gap| {mean_gap:.3g} nats per token, max {max_gap:.3g}; tolerance {tolerance:g} "
                f"{'in reduced precision' if low_precision else 'in float32'}; a gap on another rank if 0 here): the "
                f"sampler does not reproduce this model (dropout, a wrapped or recurrent module?). "
                f"trainer.recompute_logprobs=true recomputes them with the forward pass; trainer.logprob_tolerance "
                f"sets the limit")

    def rollout(self, step: int, timings: Timings) -> Experience:
        t = self.config.trainer
        local, offset = self.stream.next_local()
        batch = self.encoder.batch(local, t.samples_per_prompt, prompt_offset=offset)
        budget = generation_budget(t.max_new_tokens, t.max_length, batch.input_ids.shape[1],
                                   self.rt.comm.all_gather if self.rt.distributed else None, self.rt.device)
        m = self.models
        with m.policy.for_generation() as policy:  # under ZeRO-3: the policy's parameters gathered once
            return make_experience(
                policy, m.ref, m.reward, m.cost, m.tokenizer, batch,
                seed=self.config.seed, step=step, row_offset=offset * t.samples_per_prompt,
                global_batch=t.prompts_per_step * t.samples_per_prompt, chunk_size=t.rollout_batch_size,
                max_new_tokens=budget, temperature=t.temperature, top_k=t.top_k, top_p=t.top_p,
                recompute_logprobs=t.recompute_logprobs, missing_eos_penalty=t.missing_eos_penalty,
                measure_cost=t.measure_cost,
                all_finished=self.rt.comm.all_finished if self.rt.distributed else None,
                device=self.rt.device, timings=timings,
            )

    def _skip(self, step: int, why: str, timings: Timings, start: float) -> dict[str, float]:
        """A non-finite value: no parameter moved. Log it; stop after too many in a row."""
        self.nonfinite_in_a_row += 1
        limit = self.config.trainer.max_nonfinite_in_a_row
        log.warning("step %d skipped: %s (%d in a row, the run stops at %d)", step + 1, why, self.nonfinite_in_a_row,
                    limit)
        metrics = {"guard/skipped": 1.0, "guard/nonfinite_in_a_row": float(self.nonfinite_in_a_row),
                   "constraint/lambda": self.constraint.multiplier, "timing/step": time.perf_counter() - start}
        self.logger.log(metrics, step + 1)
        if self.nonfinite_in_a_row >= limit:
            folder = self.save(step + 1)
            raise NonFiniteError(f"{self.nonfinite_in_a_row} steps in a row were skipped ({why}); the last good "
                                 f"state is saved in {folder}")
        return metrics

    def _oracle_metrics(self, exp: Experience) -> dict[str, float]:
        if self.oracle is None:
            return {}
        metas = [self.encoder.prompts.meta[i] for i in self._last_dataset_index(exp)]
        judged = [self.oracle(meta, p, r) for meta, p, r in zip(metas, exp.prompts, exp.responses)]
        local = torch.tensor([[o["reward"], o["cost"], float(o["cost"] > 0), float(o["style"] == "refuse")]
                              for o in judged], dtype=torch.float32)
        rows = self.rt.comm.all_gather(local)
        return {"oracle/reward_mean": rows[:, 0].mean().item(), "oracle/cost_mean": rows[:, 1].mean().item(),
                "oracle/unsafe_rate": rows[:, 2].mean().item(), "oracle/refusal_rate": rows[:, 3].mean().item()}

    def _last_dataset_index(self, exp: Experience) -> list[int]:
        index = {text: i for i, text in enumerate(self.encoder.prompts.texts)}
        return [index[p] for p in exp.prompts]

    def _timing_metrics(self, exp: Experience, timings: Timings, start: float) -> dict[str, float]:
        tokens = float(self.rt.comm.all_gather(exp.response_mask.sum(-1).float()).sum())
        step_time = time.perf_counter() - start
        out = {f"timing/{k}": v for k, v in timings.items()}
        out["timing/step"] = step_time
        out["throughput/rollout_tokens_per_s"] = tokens / max(timings["rollout"], 1e-9)
        out["throughput/update_tokens_per_s"] = tokens * self.config.ppo.epochs / max(timings["update"], 1e-9)
        out["throughput/samples_per_s"] = exp.batch_size * self.rt.world_size / step_time
        return out

    # ---- evaluation
    def evaluate(self, tag: str, step: int) -> dict[str, Any]:
        """Evaluate the current policy (``repo_exp.evaluate.evaluate_models``) into ``eval/`` (final) or
        ``eval/<tag>/``; every evaluation after the initial one is compared with it."""
        initial = None if tag == "initial" else self.initial_rows
        rows, summary = evaluate_models(self.models, self.eval_encoder, self.config, self.rt, initial=initial,
                                        is_initial=tag == "initial")
        if tag == "initial":
            self.initial_rows = rows
        if tag == "final":  # the range λ took and the steps it spent at a bound (a λ pinned at one is a bug)
            summary.update(self.lambda_trace.summary())
            summary["run/commit"] = source_commit()  # the source the run was trained at, stated under its figures
        summary["eval/step"] = step
        if self.rt.is_main:
            folder = self.run_dir / "eval" if tag == "final" else self.run_dir / "eval" / tag
            publish_eval(folder, tag, step, summary, rows, self.logger)
        return summary

    # ---- checkpoints
    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_signal = signum
        log.warning("received signal %d: finishing the current step, then saving a checkpoint", signum)

    def _agreed_stop(self) -> bool:
        """True when a stop signal has reached some rank."""
        return not self.rt.comm.all_finished(self.stop_signal is None)

    def save(self, step: int) -> Path:
        m = self.models

        def write(folder: Path) -> None:
            m.save_weights(folder, is_main=self.rt.is_main)  # every rank: gathering ZeRO-3 shards is collective
            if self.rt.is_main:
                state = {
                    "step": step,
                    "constraint": self.constraint.state_dict(),
                    "lambda_trace": self.lambda_trace.state_dict(),
                    "stream": self.stream.state_dict(),
                    "ptx": self.ptx.state_dict() if self.ptx is not None else None,
                    "nonfinite_in_a_row": self.nonfinite_in_a_row,
                    "constraint_name": self.config.constraint.name,
                    "config": self.resolved_config,  # what a resume compares its own settings with
                }
                (folder / "state.json").write_text(json.dumps(state))
            save_rng_states(folder, self.rt.rank)
            for engine in m.engines:
                engine.save(folder)

        start = time.perf_counter()
        folder = self.checkpoints.save(step, write)
        log.info("checkpoint %s (%.1f s)", folder, time.perf_counter() - start)
        return folder

    def _restore(self) -> None:
        t = self.config.trainer
        folder = self.resume_folder  # found (and checked against this run's settings) by _refuse_used_run_dir
        if t.resume == "auto" and folder is None:
            log.info("trainer.resume=auto: no complete checkpoint in %s, starting fresh", self.checkpoints.root)
            if self.rt.is_main:  # rows of a run stopped before its first checkpoint are redone: keep them aside
                truncate_metrics(self.run_dir / "metrics.jsonl", -1)
        if folder is not None:
            self.load(folder, full=True)
            self.start_step = json.loads((folder / "state.json").read_text())["step"]
            if self.rt.is_main:
                moved = truncate_metrics(self.run_dir / "metrics.jsonl", self.start_step)
                if moved.redone:
                    log.warning("moved %d metric rows past step %d to metrics.orphaned.jsonl (they are redone)",
                                moved.redone, self.start_step)
                for step in moved.torn:
                    log.warning("the metrics row of step %s was cut mid-write; it is kept in metrics.orphaned.jsonl"
                                "%s", step, " and the step is redone" if step is not None and step > self.start_step
                                else "; its step is at or before the checkpoint's, so training does not redo it")
            initial = self.run_dir / "eval" / "initial"
            if (initial / "summary.json").is_file():  # written last: the initial evaluation is complete
                self.initial_rows = read_rows(initial)
            log.info("resumed from %s at step %d", folder, self.start_step)
        elif t.init_from:
            self.load(check_checkpoint(t.init_from, "trainer.init_from"), full=False)
            log.info("initialised weights and λ from %s", t.init_from)

    def _refuse_used_run_dir(self) -> None:
        """Claim the run folder (``repo_exp.run_folder``: rank 0 takes its lock, the other ranks trust it), then refuse,
        before anything is written, what would mix two runs in it: a fresh run (no ``trainer.resume``) in a folder
        that holds another run's metrics or checkpoints, or a resume whose settings change the run."""
        problem = None
        if self.rt.is_main:
            try:
                run_folder.claim(self.run_dir)
            except (run_folder.RunFolderBusy, run_folder.RunFolderRefused) as exc:
                problem = (type(exc).__name__, str(exc))
        if self.rt.distributed:
            import torch.distributed as dist

            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem:
            kind, message = problem
            raise getattr(run_folder, kind)(message)
        from omegaconf import OmegaConf

        from repo_exp.loggers import scrub

        # secrets (a token pulled in through an interpolation) never reach state.json or config.resolved.yaml
        self.resolved_config = scrub(OmegaConf.to_container(self.cfg, resolve=True))
        self.resume_folder, self.resume_changes = None, []
        try:
            if self.config.trainer.resume:
                self.resume_folder, self.resume_changes = self._check_resume()
                first_launch = self.resume_folder is None and not (self.run_dir / run_folder.RESOLVED_CONFIG).is_file()
            else:
                self._refuse_fresh_run_in_used_folder()
                first_launch = True
        except (ValueError, FileNotFoundError):
            if self.rt.is_main:  # this launch's Hydra rewrote them: the run's own go back
                run_folder.restore_hydra_files(self.run_dir)
            raise
        if self.rt.is_main:
            launch = run_folder.keep_hydra_files(self.run_dir, first_launch,
                                                 run_folder.hydra_launch_files(self.cfg, self.run_dir))
            if first_launch:
                run_folder.write_resolved_config(self.run_dir, self.resolved_config)
            run_folder.record_changes(self.run_dir, self.resume_changes, self.resume_folder, launch)
        for key, old, new in self.resume_changes:
            log.warning("resuming with %s changed from %r to %r", key, old, new)

    def _log_final_row_if_missing(self, summary: dict[str, Any]) -> None:
        """The final evaluation's metrics row follows its ``summary.json``: a kill between the two, or a row cut
        mid-write and moved aside on resume, leaves the summary without its row; log it from the summary."""
        step = summary.get("eval/step")
        path = self.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        if self.rt.is_main and not any(r.get("step") == step and "eval/num_prompts" in r for r in rows):
            log.warning("the final evaluation's metrics row is missing: logged again from eval/summary.json")
            self.logger.log(summary, step)

    def _refuse_fresh_run_in_used_folder(self) -> None:
        metrics = self.run_dir / "metrics.jsonl"
        used = [name for name, present in (("metrics.jsonl", metrics.is_file() and metrics.stat().st_size > 0),
                                           ("checkpoints/", bool(CheckpointManager(self.run_dir / "checkpoints")
                                                                 .checkpoints())))
                if present]
        if used:
            raise ConfigError(f"the run folder {self.run_dir} already holds a run ({', '.join(used)}); continue it "
                             f"with trainer.resume=auto, or start a new run in another folder (hydra.run.dir=...); "
                             f"its metrics and checkpoints were left as they are")

    def _check_resume(self) -> tuple[Path | None, list]:
        """The checkpoint to resume from, and the setting changes from the run's saved config that are allowed
        (harmless, or named in ``trainer.allow_changes``); any other change is refused."""
        t = self.config.trainer
        if t.resume == "auto":
            folder = CheckpointManager(self.run_dir / "checkpoints").latest_complete()
        else:
            folder = check_checkpoint(t.resume, "trainer.resume")
        reference, where = None, None
        if folder is not None:
            state = json.loads((folder / "state.json").read_text())
            if state.get("constraint_name") != self.config.constraint.name:
                raise ValueError(f"{folder} was written by a run with constraint={state.get('constraint_name')}, "
                                 f"this run has constraint={self.config.constraint.name}")
            reference, where = state.get("config"), folder / "state.json"
        if reference is None:
            reference, where = run_folder.read_resolved_config(self.run_dir), self.run_dir / run_folder.RESOLVED_CONFIG
        if reference is None:
            if folder is not None:
                log.warning("%s records no config: this resume cannot check that the run's settings are unchanged",
                            folder)
            return folder, []
        return folder, run_folder.check_changes(reference, self.resolved_config, t.allow_changes, str(where))

    def _apply_optimizer_changes(self) -> None:
        """Allowed optimizer changes for real: a restored optimizer and schedule carry the checkpoint's settings."""
        opt = self.config.optimizer
        for name, engine in zip(["actor", *self.models.critics.names], self.models.engines):
            inner = getattr(engine, "optimizer", None)
            scheduler = getattr(engine, "scheduler", None)
            if inner is None:  # a DeepSpeed engine: its optimizer and schedule live on the wrapped engine
                inner, scheduler = engine.module.optimizer, engine.module.lr_scheduler
            run_folder.apply_optimizer_settings(inner, scheduler, opt.actor if name == "actor" else opt.critic)

    def load(self, folder: Path, full: bool) -> None:
        """Weights and the constraint's state; with ``full``, also optimizers, data position and RNG states."""
        state = json.loads((folder / "state.json").read_text())
        if state.get("constraint_name") != self.config.constraint.name:
            raise ValueError(f"{folder} was written by a run with constraint={state.get('constraint_name')}, "
                             f"this run has constraint={self.config.constraint.name}")
        self.models.load_weights(folder)
        self.constraint.load_state_dict(state["constraint"])
        if not full:
            return
        if state.get("lambda_trace"):
            self.lambda_trace.load_state_dict(state["lambda_trace"])
        for engine in self.models.engines:
            engine.load(folder)
        if any(key.startswith("optimizer.") for key, _, _ in self.resume_changes):
            self._apply_optimizer_changes()
        self.stream.load_state_dict(state["stream"])
        if self.ptx is not None and state.get("ptx"):
            self.ptx.load_state_dict(state["ptx"])
        self.nonfinite_in_a_row = int(state["nonfinite_in_a_row"])
        if not load_rng_states(folder, self.rt.rank):
            log.warning("%s has no RNG state for rank %d (it was written by fewer ranks); this rank keeps its own "
                        "seed", folder, self.rt.rank)


def _known_vocab_size(model) -> int | None:
    """The policy's vocabulary size when it is known before any model loads (the world's tokenizer, or config.json
    of a local model folder); None otherwise."""
    if model.tokenizer == "world":
        from repo_exp.world import world_tokenizer

        return len(world_tokenizer())
    config = Path(str(model.path or "")) / "config.json"
    if model.path and config.is_file():
        try:
            return int(json.loads(config.read_text()).get("vocab_size") or 0) or None
        except (ValueError, TypeError):
            return None
    return None


def _seed_everything(seed: int, t) -> None:
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run one job of the composed config ``cfg`` in ``run_dir``; returns the final evaluation summary. The trainer is
    the algorithm's ``_target_``: this module's ``Trainer`` for RL, ``repo_exp.offline.OfflineTrainer`` for the
    preference methods (named, not imported, so that the offline trainer can build on this one)."""
    from hydra.utils import get_class

    from repo_exp.config import validate

    config = validate(cfg)
    return get_class(config.algorithm._target_)(config, cfg, run_dir).fit()
