"""DeepSpeed across GPUs: ZeRO-2 or ZeRO-3 (optionally offloaded to CPU memory), bf16, gradient checkpointing.

``repo_exp.setup.build_models`` builds the same ``Models`` structure as on the plain-torch path, so the trainer never
branches on which one it holds; what differs comes from here (``engine_factory``, ``partition_frozen``):
- the policy and the critics become ``DeepSpeedEngine``s (the ``Engine`` protocol of ``repo_exp.engine``). Their
  ``module`` is the DeepSpeed engine itself, so every training forward pass goes through DeepSpeed's hooks;
- the frozen models (reference, reward, cost) are partitioned for inference under ZeRO-3, as the published Safe RLHF
  trainer does (its ``get_deepspeed_eval_config``); below stage 3 they are replicated on every GPU.

Gradient accumulation belongs to the trainer: it divides each micro-batch's loss by the global minibatch's count
(``repo_exp.train.ppo_update``) and calls ``step`` once per minibatch. So the generated config sets
``managed_gradient_accumulation: false`` (each ``step`` is the accumulation boundary) and ``backward`` does not divide
by the number of micro-batches. DeepSpeed averages gradients over the data-parallel ranks; the trainer multiplies each
rank's share of the global loss by the number of ranks, so the average is the gradient of the global batch's loss,
the same as one process holding the whole batch, whatever the ranks' token counts.

Under ZeRO-3 every forward pass is collective, so every rank runs the same number of them: generation goes on until
every rank has finished (``generate(all_finished=…)``), rollout chunks and evaluation rounds are equal on all ranks,
and exporting the weights (``DeepSpeedModels.save_weights``) is called on every rank.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import get_scheduler

from repo_exp.config import AdamWConfig, Config, ConfigError, SchedulerConfig, ScoreModelConfig
from repo_exp.engine import build_optimizer
from repo_exp.models.adapters import has_frozen_parameters, make_trainable, shares_policy, trained_state_dict
from repo_exp.models.score_model import ScoreModel
from repo_exp.runtime import Runtime, release_free_memory
from repo_exp.setup import Models, _load_into, _optimizer_steps

# ZeRO-3 knobs of the published Safe RLHF configs: small parameters stay gathered, and at most 3e7 parameters are
# gathered or prefetched at once, which keeps the peak memory of a 7B layer-by-layer forward pass low.
ZERO3_SETTINGS = {
    "stage3_param_persistence_threshold": 1e4,
    "stage3_max_live_parameters": 3e7,
    "stage3_prefetch_bucket_size": 3e7,
    "stage3_gather_16bit_weights_on_model_save": True,
}


def micro_batching(config: Config, world_size: int) -> tuple[int, int]:
    """(samples per micro-batch, micro-batches per optimizer step) on one rank at full length: DeepSpeed's batch
    bookkeeping only (``ppo_update`` fills micro-batches up to a token budget and calls ``step`` itself)."""
    t, ppo = config.trainer, config.ppo
    samples = t.prompts_per_step * t.samples_per_prompt
    if samples % (world_size * ppo.num_minibatches):
        raise ConfigError(
            f"trainer.prompts_per_step × trainer.samples_per_prompt ({samples}) must split evenly over {world_size} "
            f"rank(s) × ppo.num_minibatches ({ppo.num_minibatches}) so that every rank takes the same optimizer steps")
    local_minibatch = samples // (world_size * ppo.num_minibatches)
    micro = min(t.micro_batch_size, local_minibatch)
    return micro, math.ceil(local_minibatch / micro)


def _zero_section(config: Config, train: bool) -> dict[str, Any]:
    ds = config.deepspeed
    stage = ds.zero_stage if train else (3 if ds.zero_stage == 3 else 0)
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update(ZERO3_SETTINGS)
    if ds.offload:
        pin = torch.cuda.is_available()
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        if train:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    return zero


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dictionaries key by key, lists and values replaced (OmegaConf's
    merge), as a plain dict for DeepSpeed."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.merge(base, extra), resolve=True)


def train_config(config: Config, world_size: int, opt: AdamWConfig | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a trained model (policy or critic), from ``conf/deepspeed`` and the trainer's batch
    sizes; ``deepspeed.extra`` is merged in last. With offload, ``opt`` becomes DeepSpeed's CPU AdamW."""
    ds = config.deepspeed
    micro, steps = micro_batching(config, world_size)
    out: dict[str, Any] = {
        # bookkeeping only: the trainer feeds the micro-batches and calls step() once per minibatch
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": steps,
        "train_batch_size": micro * steps * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": config.ppo.max_grad_norm,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": _zero_section(config, train=True),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if ds.offload and opt is not None:
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU AdamW, not torch's
        out["optimizer"] = {"type": "AdamW", "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps,
                                                        "weight_decay": opt.weight_decay}}
    return merged(out, dict(ds.extra))


def model_train_config(config: Config, world_size: int, opt: AdamWConfig, module: nn.Module) -> dict[str, Any]:
    """``train_config`` for one model. Under ZeRO-3 its reduce bucket is ``hidden_size²`` elements (transformers'
    ``auto`` value) unless ``deepspeed.extra`` sets one: DeepSpeed's default of 5e8 elements takes a whole model's
    gradients below that size and keeps the buffer, about the model's size again in bf16 on every rank."""
    out = train_config(config, world_size, opt)
    zero = out["zero_optimization"]
    extra = dict(config.deepspeed.extra).get("zero_optimization") or {}
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if zero["stage"] == 3 and hidden and "reduce_bucket_size" not in extra:
        zero["reduce_bucket_size"] = int(hidden) ** 2
    return out


def inference_config(config: Config) -> dict[str, Any]:
    """The DeepSpeed config of a frozen model: ZeRO-3 partitioning under ZeRO-3, else plain replication."""
    ds = config.deepspeed
    out = {
        "train_micro_batch_size_per_gpu": config.trainer.rollout_batch_size,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": ds.bf16},
        "zero_optimization": _zero_section(config, train=False),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return merged(out, {k: v for k, v in dict(ds.extra).items() if k in ("bf16", "zero_optimization")})


@contextlib.contextmanager
def partitioned_loading(config: Config, rt: Runtime, train: bool):
    """Models loaded inside are partitioned as they load (transformers' DeepSpeed integration: ``from_pretrained``
    builds under ``deepspeed.zero.Init`` and fills each partition from the checkpoint), so no rank holds a whole copy;
    with the trained (``train``) or the frozen models' ZeRO-3 config."""
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    ds_config = train_config(config, rt.world_size, config.optimizer.actor) if train else inference_config(config)
    alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: keep it alive while loading
    try:
        yield
    finally:
        del alive
        unset_hf_deepspeed_config()


def zero_init_dtype(dtype: torch.dtype, ds_config: dict[str, Any]) -> torch.dtype | None:
    """The ``dtype`` to give ``deepspeed.zero.Init`` for parameters of ``dtype``. DeepSpeed 0.19 reads an explicit
    dtype through ``dtype or float16 if fp16 is supported else bfloat16 …`` (``_set_dtype``), so on a CPU, where fp16
    is not, an explicit float32 becomes bfloat16; without one it takes the config's precision (float32 when neither
    bf16 nor fp16 is enabled). So float32 under an fp32 config is left to the config; every other dtype is passed."""
    half = any(dict(ds_config.get(k) or {}).get("enabled") for k in ("bf16", "fp16"))
    return None if dtype == torch.float32 and not half else dtype


def load_score_model_partitioned(config: Config, rt: Runtime, train: bool, cfg: ScoreModelConfig, path: str,
                                 score_type: str | None = None, normalize: bool | None = None,
                                 score_dim: int | None = None) -> ScoreModel:
    """A score model in the published layout (reward, cost, or a critic started from one), partitioned as it is
    built (``deepspeed.zero.Init`` with the trained or the frozen models' config) and filled one parameter at a
    time: rank 0 reads that tensor from the checkpoint and DeepSpeed scatters it, so no rank holds the whole model
    or the whole checkpoint. The same checks and normaliser as ``load_score_model``. ``score_dim`` widens the head
    (one critic for reward and cost): its first rows come from the checkpoint, the rest and the bias start at zero,
    as ``critic_from_scorer`` does."""
    import deepspeed

    from repo_exp.models.score_model import check_score_weights, normalizer_state, read_score_checkpoint
    from repo_exp.models.weights import LazyWeights, check_floating

    score_type = score_type or cfg.kind
    normalize = cfg.normalize if normalize is None else normalize
    folder, trunk_config, fields, raw = read_score_checkpoint(path, cfg.revision, cfg.trust_remote_code, score_type,
                                                              normalize)
    weights = LazyWeights(folder)
    rows = fields["score_dim"]
    widened = score_dim is not None and score_dim != rows
    if widened:
        fields = {**fields, "score_dim": score_dim}
    dtype = getattr(torch, cfg.dtype)
    ds_config = train_config(config, rt.world_size, config.optimizer.critic) if train else inference_config(config)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, dtype=zero_init_dtype(dtype, ds_config)):
        model = ScoreModel(trunk_config, **fields)
    check_score_weights(path, weights.shapes(), model, rows)  # names only: the head's rows are the checkpoint's
    check_floating(folder, weights.dtypes(), dict(model.named_parameters()))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if rank != 0:
                continue
            if widened and name.startswith("score_head."):
                param.zero_()
                if name == "score_head.weight":
                    param[:rows].copy_(weights[name])
            else:
                param.copy_(weights[name])
    if not widened:  # a widened critic never normalises: its statistics stay the identity
        buffers = {k: b for k, b in model.named_buffers() if k.startswith("normalizer.")}
        stats = normalizer_state(raw, buffers)
        stats.update({k: weights[k] for k in buffers if k in weights})
        with torch.no_grad():
            for key, value in stats.items():
                buffers[key].copy_(value)
    model.normalizer.float()
    return model.eval()


class DeepSpeedEngine:
    """A trained model under DeepSpeed: the ``Engine`` protocol over ``deepspeed.initialize``'s engine.

    ``module`` is the DeepSpeed engine (an ``nn.Module`` that passes attribute access through to the model), so that
    forward passes run its hooks; ``model`` is the wrapped model itself.
    """

    def __init__(self, module: nn.Module, opt: AdamWConfig, sched: SchedulerConfig, total_steps: int,
                 ds_config: dict[str, Any], name: str, gather_for_generation: bool = True,
                 release_memory: bool = True) -> None:
        import deepspeed

        self.name = name
        self.gather_for_generation = gather_for_generation
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])
        self.release_memory = release_memory and self.zero_stage == 3
        params = [p for p in module.parameters() if p.requires_grad]
        warmup = math.ceil(sched.warmup_ratio * total_steps)

        def scheduler(optimizer):
            return get_scheduler(sched.name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

        optimizer = None if "optimizer" in ds_config else (lambda p: build_optimizer(p, opt))
        self.module, *_ = deepspeed.initialize(model=module, model_parameters=params, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
        self.model = self.module.module
        self._backward_since_step = False

    @contextlib.contextmanager
    def for_generation(self):
        """The model to sample from for one rollout. Under ZeRO-3 with ``deepspeed.gather_for_generation`` (as TRL's
        ``unwrap_model_for_generation``): the parameters are all-gathered once for the whole rollout and DeepSpeed's
        hooks lifted meanwhile, so the decoder runs on whole layers (the fast Llama decoder included) instead of
        gathering every layer again at every token. It costs one whole copy of the policy per GPU while sampling.
        Otherwise the engine itself (per-layer gathers inside each forward pass)."""
        if self.zero_stage != 3 or not self.gather_for_generation:
            yield self.module
            return
        import deepspeed

        engine, offload = self.module, self.module.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            start_of_forward = _lift_zero3_hooks(offload)
            # the engine's own prologue/epilogue hooks (timers, profiling) on the model: lifted too, so that the
            # model is exactly the plain model the fast decoder may stand in for
            engine.module_forward_pre_hook.remove()
            engine.module_forward_post_hook.remove()
            try:
                yield self.model
            finally:
                _restore_zero3_hooks(offload, start_of_forward)
                engine.module_forward_pre_hook = engine._create_module_forward_pre_hook()
                engine.module_forward_post_hook = engine._create_module_forward_post_hook()
        if self.release_memory:  # on a CPU: the whole policy gathered for sampling, and the sampling's buffers
            release_free_memory()

    def backward(self, loss: torch.Tensor) -> None:
        # the trainer has already weighed the micro-batch: no division by the accumulation steps
        self.module.backward(loss, scale_wrt_gas=False)
        self._backward_since_step = True

    def step(self) -> dict[str, float]:
        lr = float(self.module.get_lr()[0])  # the rate this step applies, as TorchEngine reports it
        self.module.step()
        self._backward_since_step = False
        if self.release_memory:  # the micro-batches' and the step's freed host buffers
            release_free_memory()
        grad_norm = self.module.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        # DeepSpeed skips the update (and the scheduler step) when the global gradient norm is not finite
        skipped = not self.module.was_step_applied()
        return {"grad_norm": grad_norm, "lr": lr, "skipped": float(skipped)}

    def zero_grad(self) -> None:
        if self._backward_since_step:
            self._discard_accumulated_gradients()
        self.module.zero_grad()

    def _discard_accumulated_gradients(self) -> None:
        """Drop the gradients of an abandoned minibatch. ZeRO-2/3 reduce each micro-batch's gradients into their own
        partitions during ``backward``; clear those the way DeepSpeed does after an overflow."""
        optimizer = self.module.optimizer
        if hasattr(optimizer, "_overflow_clean_up"):  # ZeRO-3
            optimizer._overflow_clean_up(optimizer.loss_scale)
        else:  # ZeRO-1/2 keep the reduced gradients of this rank's partition in these two stores until step()
            optimizer.zero_grad(set_to_none=True)
            if hasattr(optimizer, "_release_preflattened_grad_buffers"):
                optimizer._release_preflattened_grad_buffers()
            for store in ("averaged_gradients", "all_grad_tensors"):
                buffers = getattr(optimizer, store, None)
                for key in list(buffers or {}):
                    buffers[key] = None
        self._backward_since_step = False

    # ---- state
    def save(self, folder: Path) -> None:
        """DeepSpeed's own checkpoint (every rank writes its ZeRO shard of the optimizer state). Collective."""
        # under adapters the module's state holds what trains only (the base is the model it started from)
        self.module.save_checkpoint(str(folder / "deepspeed"), tag=self.name, save_latest=False,
                                    exclude_frozen_parameters=has_frozen_parameters(self.model))

    def load(self, folder: Path) -> None:
        from repo_exp.models.weights import check_pickles

        check_pickles(folder / "deepspeed" / self.name)  # DeepSpeed's loader unpickles with weights_only=False
        path, _ = self.module.load_checkpoint(str(folder / "deepspeed"), tag=self.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=not has_frozen_parameters(self.model))
        if path is None:
            raise FileNotFoundError(f"{folder / 'deepspeed' / self.name} holds no DeepSpeed checkpoint of {self.name}")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (None elsewhere). Collective under ZeRO-3: gathered one layer at a time
        onto rank 0; below stage 3 every rank holds them already."""
        frozen = has_frozen_parameters(self.model)  # adapters: only what trains is gathered and saved
        if self.zero_stage == 3:
            return self.module._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=frozen)
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return None
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return trained_state_dict(self.model, state) if frozen else state

    def load_full_state_dict(self, folder: Path) -> None:
        """Weights saved by ``save_weights`` into the (possibly partitioned) model, and the optimizer's master copy."""
        if self.zero_stage == 3:
            import deepspeed
            import torch.distributed as dist

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=0):
                if dist.get_rank() == 0:
                    _load_into(self.model, folder)
        else:
            _load_into(self.model, folder)
        # ZeRO keeps fp32 master weights in the optimizer: refresh them from the loaded weights
        self.module.optimizer.refresh_fp32_params()


def _lift_zero3_hooks(offload) -> Callable:
    """Remove ZeRO-3's gather/release hooks from the model (its parameters are gathered by the caller); returns the
    start-of-forward hook for ``_restore_zero3_hooks``."""
    for param in offload.module.parameters():
        param.ds_active_sub_modules.clear()
    for hook in (*offload.forward_hooks, *offload.backward_hooks):
        hook.remove()
    offload.forward_hooks, offload.backward_hooks = [], []
    start_of_forward = offload.module._forward_pre_hooks[offload.fwd_pre_hook.id]
    offload.fwd_pre_hook.remove()
    return start_of_forward


def _restore_zero3_hooks(offload, start_of_forward: Callable) -> None:
    """Put back what ``_lift_zero3_hooks`` removed, in DeepSpeed's order (re-registering invalidates its trace)."""
    offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_of_forward)
    offload._register_deepspeed_module(offload.module)


class DeepSpeedModels(Models):
    """``Models`` whose trained parts are DeepSpeed engines. Exporting the weights is collective under ZeRO-3."""

    frozen_engines: tuple = ()  # the frozen models' ZeRO-3 engines, kept alive with their partitions
    release_memory: bool = False  # deepspeed.release_host_memory under ZeRO-3

    def save_weights(self, folder: Path, is_main: bool = True) -> None:
        """The policy as a causal-LM folder and each critic in the score layout, gathered whole (call on every rank;
        only ``is_main`` writes). One model at a time: rank 0 never holds more than one whole model."""
        for name, engine in zip(["policy", *self.critics.names], self.engines):
            state = engine.full_state_dict()
            if is_main:
                engine.model.save_pretrained(folder / name, state_dict=state)
                if name == "policy":
                    self.tokenizer.save_pretrained(folder / "policy")
            del state
            if self.release_memory:
                release_free_memory()

    def load_weights(self, folder: Path, critics: bool = True) -> None:
        self.policy.load_full_state_dict(folder / "policy")
        if critics:
            for name, engine in zip(self.critics.names, self.critics.engines):
                engine.load_full_state_dict(folder / name)


def _enable_gradient_checkpointing(module: nn.Module) -> None:
    # non-reentrant checkpointing: the variant that works with ZeRO-3's parameter hooks
    target = module.model if isinstance(module, ScoreModel) else module
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def engine_factory(config: Config, rt: Runtime) -> Callable[[nn.Module, str, bool], DeepSpeedEngine]:
    """What ``repo_exp.setup.build_models`` turns each trained model (policy or critic) into under DeepSpeed:
    ``engine(module, name, actor)``. The critics must be copied before the policy is wrapped: under ZeRO-3 a
    partitioned model cannot be copied."""
    opt = config.optimizer
    dtype = torch.bfloat16 if config.deepspeed.bf16 else torch.float32

    def engine(module: nn.Module, name: str, actor: bool) -> DeepSpeedEngine:
        make_trainable(module)  # under adapters: the adapters (and a critic's head) only
        module.train()
        # the policy's is enabled (non-reentrant too) by build_models, before the reference and critics copy it
        if config.model.gradient_checkpointing and not actor:
            _enable_gradient_checkpointing(module)
        part = opt.actor if actor else opt.critic
        out = DeepSpeedEngine(module.to(dtype), part, opt.actor_scheduler if actor else opt.critic_scheduler,
                              _optimizer_steps(config, actor), model_train_config(config, rt.world_size, part, module),
                              name,
                              gather_for_generation=config.deepspeed.gather_for_generation,
                              release_memory=config.deepspeed.release_host_memory)
        if out.release_memory:  # set-up's transient buffers
            release_free_memory()
        return out

    return engine


def partition_frozen(config: Config, models: DeepSpeedModels) -> DeepSpeedModels:
    """``models`` with its frozen models (reference, reward, cost) partitioned under ZeRO-3, where they arrive on the
    CPU, one parameter at a time, so that no GPU ever holds a whole model it does not train. Below stage 3 they stay
    replicated where ``build_models`` put them (on the run's device)."""
    import deepspeed

    ds = config.deepspeed
    dtype = torch.bfloat16 if ds.bf16 else torch.float32
    frozen_engines = []
    if ds.zero_stage == 3:  # partitioned in place: ``ref`` and the scorers' models stay the same objects
        # a reference that is the policy's own base (adapters) is partitioned with the policy's engine
        for module in ([] if shares_policy(models.ref) else [models.ref]) + [models.reward.model, models.cost.model]:
            frozen_engine, *_ = deepspeed.initialize(model=module.to(dtype), config=inference_config(config))
            frozen_engine.eval()
            frozen_engines.append(frozen_engine)
            if ds.release_host_memory:
                release_free_memory()
    for scorer in (models.reward, models.cost):
        scorer.model.normalizer.float()  # the normaliser's statistics stay in fp32 under bf16
    models.frozen_engines = tuple(frozen_engines)
    models.release_memory = ds.zero_stage == 3 and ds.release_host_memory
    return models


class DeepSpeedBackend:
    """The DeepSpeed engines ``repo_exp.setup.build_models`` plugs in (``backend=``): one engine per trained model,
    the frozen ones partitioned under ZeRO-3."""

    def engine_factory(self, config: Config, rt: Runtime) -> Callable[[nn.Module, str, bool], DeepSpeedEngine]:
        return engine_factory(config, rt)

    def finish(self, config: Config, models: Models) -> DeepSpeedModels:
        m = models
        return partition_frozen(config, DeepSpeedModels(m.tokenizer, m.policy, m.ref, m.reward, m.cost, m.critics))

    def loading(self, config: Config, rt: Runtime, train: bool):
        return partitioned_loading(config, rt, train)

    def load_score_model(self, config: Config, rt: Runtime, train: bool, cfg: ScoreModelConfig, path: str,
                         **kwargs) -> ScoreModel:
        return load_score_model_partitioned(config, rt, train, cfg, path, **kwargs)


def backend_for(config: Config) -> DeepSpeedBackend | None:
    """The engine backend ``build_models`` needs for ``config``: DeepSpeed's under ``deepspeed.enabled``, else None."""
    return DeepSpeedBackend() if config.deepspeed.enabled else None
