"""Building a run's parts from its config: tokenizer, policy and reference, reward and cost scorers, critics,
engines and the constraint."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repo_exp.config import Config, ConfigError, ModelConfig, ScoreModelConfig
from repo_exp.constraints import Comm, Constraint
from repo_exp.engine import Engine, TorchEngine
from repo_exp.machine import resolve_attention
from repo_exp.models.adapters import (AdapterBase, adapter_base, critic_with_adapters, has_frozen_parameters,
                                      is_adapter_folder, load_trained, make_trainable, shares_policy,
                                      tokenizer_path, trained_state_dict, with_adapters)
from repo_exp.models.checks import check_context_length, check_local_path
from repo_exp.models.policy import (critic_from_policy, critic_from_scorer, disable_dropout, frozen, load_policy,
                                    load_scorer)
from repo_exp.models.score_model import ScoreModel
from repo_exp.models.tokenizers import load_tokenizer, same_tokenizer
from repo_exp.models.weights import load_state_dict_safely
from repo_exp.rollout.score import Scorer, critic_values
from repo_exp.runtime import Runtime, release_free_memory

if TYPE_CHECKING:
    from repo_exp.world.stage import WorldArtifacts


def build_constraint(node: DictConfig, comm: Comm) -> Constraint:
    """The constraint object named by ``node._target_``, with the node's fields as arguments."""
    kwargs = OmegaConf.to_container(node, resolve=True)
    target = kwargs.pop("_target_")
    kwargs.pop("name", None)
    return get_class(target)(**kwargs, comm=comm)


class Critics:
    """The reward critic and, when the constraint needs one, the cost critic — separate models, or one trunk with two
    value heads (``trainer.shared_critic``); none at all under a critic-free estimator (``reward=None``)."""

    def __init__(self, reward: Engine | None, cost: Engine | None = None, shared: bool = False) -> None:
        self.reward = reward
        self.cost = cost
        self.shared = shared
        self.engines: list[Engine] = [e for e in (reward, cost) if e is not None]
        self.names = (["critic"] if shared else
                      (["reward_critic"] if reward is not None else []) + (["cost_critic"] if cost is not None else []))
        self.with_cost = shared or cost is not None

    def values(self, sequences: torch.Tensor, attention_mask: torch.Tensor,
               prompt_width: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """V_r and V_c before each response token, (B, T) each (V_c None without a cost critic; both None without
        critics)."""
        if self.reward is None:
            return None, None
        if self.shared:
            values = critic_values(self.reward.module, sequences, attention_mask, prompt_width)
            return values[..., 0], values[..., 1]
        reward_values = critic_values(self.reward.module, sequences, attention_mask, prompt_width)[..., 0]
        cost_values = (critic_values(self.cost.module, sequences, attention_mask, prompt_width)[..., 0]
                       if self.cost is not None else None)
        return reward_values, cost_values

    def backward(self, reward_loss: torch.Tensor, cost_loss: torch.Tensor | None) -> None:
        if self.shared:
            self.reward.backward(reward_loss + cost_loss if cost_loss is not None else reward_loss)
            return
        self.reward.backward(reward_loss)
        if self.cost is not None and cost_loss is not None:
            self.cost.backward(cost_loss)


@dataclass
class Models:
    tokenizer: object
    policy: Engine
    ref: nn.Module
    reward: Scorer
    cost: Scorer
    critics: Critics
    mixed_precision: str = "no"  # trainer.mixed_precision

    @property
    def engines(self) -> list[Engine]:
        return [self.policy, *self.critics.engines]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of every forward pass: bf16 autocast under ``trainer.mixed_precision=bf16`` (the weights stay
        float32; a backward pass run outside it reuses the dtypes its forward pass chose), else nothing."""
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device_type, dtype=torch.bfloat16)

    @cached_property
    def _device_type(self) -> str:
        """The device type the forward passes run on (the policy's), looked up once."""
        return next(self.policy.module.parameters()).device.type

    def save_weights(self, folder: Path, is_main: bool = True) -> None:
        """The policy as a causal-LM folder (config, safetensors, tokenizer) and each critic in the score layout.

        Called on every rank (gathering ZeRO-3 partitions is collective); only ``is_main`` writes."""
        if not is_main:
            return
        self.policy.module.save_pretrained(folder / "policy", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "policy")
        for name, engine in zip(self.critics.names, self.critics.engines):  # under adapters: what trains
            engine.module.save_pretrained(folder / name, state_dict=trained_state_dict(engine.module))

    def load_weights(self, folder: Path, critics: bool = True) -> None:
        """Weights saved by ``save_weights``; ``critics=False`` loads the policy only (evaluation needs no critic)."""
        _load_into(self.policy.module, folder / "policy")
        if not critics:
            return
        for name, engine in zip(self.critics.names, self.critics.engines):
            _load_into(engine.module, folder / name)


def _load_into(module: nn.Module, folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing from the checkpoint")
    state = load_state_dict_safely(folder)
    if has_frozen_parameters(module):  # adapters: the checkpoint holds what trains, and all of it
        load_trained(module, state, folder)
        return
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in state and not k.startswith("normalizer.")]
    if missing:
        raise ValueError(f"{folder} does not fit this run's model: missing {missing[:5]}")
    module.load_state_dict(state, strict=False)


def _tokenizer_for(cfg: ModelConfig | ScoreModelConfig, path: str | None):
    if cfg.tokenizer == "world":
        from repo_exp.world import world_tokenizer

        return world_tokenizer()
    revision = None if getattr(cfg, "source", None) == "gguf" else cfg.revision  # a converted folder: local
    return load_tokenizer(cfg.tokenizer or tokenizer_path(path or cfg.path), revision=revision,
                          trust_remote_code=cfg.trust_remote_code)


class EngineBackend(Protocol):
    """What turns the trained models into engines when plain torch does not (``repo_exp.deepspeed_engine``): chosen
    by the caller, so that the set-up never imports it."""

    def engine_factory(self, config: Config, rt: Runtime) -> Callable[[nn.Module, str, bool], Engine]: ...

    def finish(self, config: Config, models: Models) -> Models: ...

    def loading(self, config: Config, rt: Runtime, train: bool) -> contextlib.AbstractContextManager:
        """Models loaded inside are partitioned as they load (ZeRO-3), with the trained or the frozen models'
        config."""

    def load_score_model(self, config: Config, rt: Runtime, train: bool, cfg: ScoreModelConfig, path: str,
                         **kwargs) -> ScoreModel:
        """A score model from ``path``, partitioned as it loads (ZeRO-3), with the trained (a critic) or the frozen
        models' config; ``kwargs``: ``score_type``, ``normalize``, ``score_dim``."""


def build_models(config: Config, rt: Runtime, constraint: Constraint, backend: EngineBackend | None = None,
                 world: WorldArtifacts | None = None, with_critics: bool = True) -> Models:
    """The run's models; under ``deepspeed`` the engines come from ``backend`` (``deepspeed_engine.backend_for``).

    A model whose ``source`` is ``world`` loads from ``world``, the folders of a world built beforehand
    (``repo_exp.world.stage.prepare_world``): setting up the models builds nothing. ``with_critics=False``: no critic
    (the offline methods train the policy alone)."""
    if config.deepspeed.enabled and backend is None:
        raise ValueError("deepspeed is enabled but no engine backend was given: build_models(..., "
                         "backend=repo_exp.deepspeed_engine.backend_for(config))")
    t, opt = config.trainer, config.optimizer
    sources = [key for key in ("model", "reward", "cost") if getattr(config, key).source == "world"]
    if sources and world is None:
        raise ValueError(f"{', '.join(f'{k}.source=world' for k in sources)} loads the synthetic world's models, but "
                         f"no built world was given: build or find it first (repo_exp.world.stage.prepare_world, or "
                         f"`python -m repo_exp.world`) and pass it as build_models(..., world=...)")
    paths = world.paths() if world is not None else {}
    policy_path = paths.get("sft") if config.model.source == "world" else config.model.path
    if config.model.source == "gguf":  # converted once into an ordinary transformers folder in the cache
        from repo_exp.models.gguf import converted_folder

        policy_path = str(converted_folder(config.model.path, config.model.revision, config.world.cache_dir))
    reward_path = paths.get("reward") if config.reward.source == "world" else config.reward.path
    cost_path = paths.get("cost") if config.cost.source == "world" else config.cost.path

    for key, path in (("model.path", policy_path), ("reward.path", reward_path), ("cost.path", cost_path)):
        check_local_path(key, path)
    # LoRA adapters on the policy: fresh ones (model.lora), or those of an adapter folder given as model.path
    adapter_folder = is_adapter_folder(policy_path)
    if adapter_folder and config.model.lora.enabled:
        raise ConfigError(f"model.path={policy_path} is an adapter folder, whose own adapters go on training; leave "
                          f"model.lora.rank at 0 (it would add a second set)")
    adapters = adapter_folder or config.model.lora.enabled
    # model.attn_implementation=fastest: the faster kernel here, measured on the (base) model's config
    resolve_attention(config, adapter_base(policy_path) if adapter_folder else policy_path, rt.device)
    tokenizer = _tokenizer_for(config.model, policy_path)
    # under ZeRO-3 the models stay on the CPU until DeepSpeed partitions them: six whole 7B models fit no GPU
    device = torch.device("cpu") if config.deepspeed.enabled and config.deepspeed.zero_stage == 3 else rt.device
    # under ZeRO-3 the policy and the reference are partitioned as they load (unless a critic copies the policy's
    # trunk, which a partitioned model cannot give, or adapters wrap the policy: then DeepSpeed partitions base and
    # adapters together when it builds the engine)
    partitioned = (config.deepspeed.enabled and config.deepspeed.zero_stage == 3 and t.critic_init != "policy"
                   and not adapters)
    with _loading(backend, config, rt, partitioned, train=True):
        policy = load_policy(config.model, tokenizer, policy_path).to(device)
    # non-reentrant, the variant ZeRO-3's parameter hooks need; set before the reference and a policy-initialised
    # critic copy the policy, so that they inherit it
    if config.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if adapters:  # the reference is the policy's base with its adapters disabled (AdapterBase, below)
        ref = None
    elif partitioned:
        with _loading(backend, config, rt, partitioned, train=False):
            ref = frozen(load_policy(config.model, tokenizer, policy_path))
    else:
        ref = frozen(copy.deepcopy(policy))
    def partitioned_from_checkpoint(cfg: ScoreModelConfig) -> bool:
        """Under ZeRO-3 a scorer read from a checkpoint is partitioned as it loads, and so is a critic started from
        it (loaded again from the same checkpoint: a partitioned model cannot be copied); a tiny one is built whole."""
        return partitioned and backend is not None and cfg.source != "tiny"

    def scorer(cfg: ScoreModelConfig, path: str | None) -> ScoreModel:
        if not partitioned_from_checkpoint(cfg):
            return frozen(load_scorer(cfg, _tokenizer_for(cfg, path), path))
        with _loading(backend, config, rt, partitioned, train=False):
            return frozen(load_scorer(cfg, _tokenizer_for(cfg, path), path,
                                      load=lambda: backend.load_score_model(config, rt, False, cfg, path)))

    reward_model = scorer(config.reward, reward_path)
    cost_model = scorer(config.cost, cost_path)
    reward_model.to(device)
    cost_model.to(device)
    max_len = t.max_length or t.max_prompt_length + t.max_new_tokens
    for role, model, path in (("model", policy, policy_path), ("reward", reward_model, reward_path),
                              ("cost", cost_model, cost_path)):
        check_context_length(model.config, role, path, t.max_prompt_length, t.max_new_tokens)
    reward = Scorer(reward_model, _tokenizer_for(config.reward, reward_path), config.reward.template, tokenizer,
                    config.model.template, max_len)
    cost = Scorer(cost_model, _tokenizer_for(config.cost, cost_path), config.cost.template, tokenizer,
                  config.model.template, max_len)

    with_cost = constraint.needs_cost_critic
    shared = t.shared_critic and with_cost
    if t.critic_init == "score_model" and not config.estimator.critic_free:
        # a critic reads the policy's token ids: one started from a scorer of another vocabulary cannot
        for role, scorer_of in (("reward", reward), ("cost", cost if with_cost and not shared else None)):
            if scorer_of is not None and not same_tokenizer(scorer_of.tokenizer, tokenizer):
                raise ConfigError(f"trainer.critic_init=score_model starts a critic from the {role} model "
                                  f"({role}.path={getattr(config, role).path or getattr(config, role).name}), whose "
                                  f"tokenizer is not the policy's: a critic reads the policy's token ids. Set "
                                  f"trainer.critic_init=policy (critics on the policy's trunk)")

    def new_critic(scorer_model: ScoreModel, cfg: ScoreModelConfig, path: str | None, dim: int) -> ScoreModel:
        if t.critic_init == "policy":
            return critic_from_policy(policy, dim)
        if partitioned_from_checkpoint(cfg):
            with _loading(backend, config, rt, partitioned, train=True):
                critic = backend.load_score_model(config, rt, True, cfg, path, score_type="critic", normalize=False,
                                                  score_dim=dim)
            disable_dropout(critic)
            return critic
        return critic_from_scorer(scorer_model, dim)

    # every critic is copied (from a score model or the policy) before any engine is built: a model that ZeRO-3 has
    # partitioned cannot be copied
    if config.estimator.critic_free or not with_critics:  # group baselines or no RL: no critic to build, step, save
        critic_modules = {}
    elif shared:
        critic_modules = {"critic": new_critic(reward_model, config.reward, reward_path, 2)}
    else:
        critic_modules = {"reward_critic": new_critic(reward_model, config.reward, reward_path, 1)}
        if with_cost:
            critic_modules["cost_critic"] = new_critic(cost_model, config.cost, cost_path, 1)

    # adapters go on after the critics copied the plain trunk; only they train, and the reference is their base
    if config.model.lora.enabled:
        policy = with_adapters(policy, config.model.lora)
        if config.model.lora.critics:
            critic_modules = {name: critic_with_adapters(module, config.model.lora)
                              for name, module in critic_modules.items()}
    if adapters:
        ref = AdapterBase(policy)

    if backend is not None:
        engine = backend.engine_factory(config, rt)
    else:
        def engine(module: nn.Module, name: str, actor: bool) -> Engine:
            make_trainable(module)  # under adapters: the adapters (and a critic's head) only
            module.train()
            return TorchEngine(module.to(rt.device), opt.actor if actor else opt.critic,
                               opt.actor_scheduler if actor else opt.critic_scheduler,
                               total_steps=_optimizer_steps(config, actor), max_grad_norm=config.ppo.max_grad_norm,
                               name=name)

    policy_engine = engine(policy, "actor", actor=True)
    critic_engines = {name: engine(module, name, actor=False) for name, module in critic_modules.items()}
    if shared:
        critics = Critics(critic_engines["critic"], shared=True)
    else:
        critics = Critics(critic_engines.get("reward_critic"), critic_engines.get("cost_critic"))
    if backend is not None:
        return backend.finish(config, Models(tokenizer, policy_engine, ref, reward, cost, critics, t.mixed_precision))
    for critic in critics.engines:  # trained models share the policy's attention kernel (model.attn_implementation)
        critic.module.model.set_attn_implementation(policy.config._attn_implementation)
    if t.mixed_precision == "bf16":  # after the critics were copied from them: those train in float32
        # (a reference that is the policy's own base stays as the policy is: autocast casts its passes)
        low_precision_frozen(*([] if shares_policy(ref) else [ref]), reward_model, cost_model)
    return Models(tokenizer, policy_engine, ref, reward, cost, critics, t.mixed_precision)


def low_precision_frozen(*models: nn.Module) -> None:
    """Frozen models (reference, reward, cost) under ``trainer.mixed_precision=bf16``: bf16 weights, cast once here
    instead of by autocast on every pass (autocast caches casts only of weights that require grad). Their passes run
    in bf16 as before, except that the residual stream between layers is now bf16 too; score normalisers stay
    float32."""
    for model in models:
        model.to(torch.bfloat16)
        normalizer = getattr(model, "normalizer", None)
        if normalizer is not None:
            normalizer.float()


@contextlib.contextmanager
def _loading(backend: EngineBackend | None, config: Config, rt: Runtime, partitioned: bool, train: bool):
    if not partitioned or backend is None:
        yield
        return
    with backend.loading(config, rt, train):
        yield
    if config.deepspeed.release_host_memory:
        release_free_memory()  # the whole parameters built before partitioning: their pages back to the system


def _optimizer_steps(config: Config, actor: bool = False) -> int:
    """Optimizer steps over the run; the actor takes as many again for a separate PTX loss (``ppo.ptx_mode``)."""
    ppo = config.ppo
    separate_ptx = actor and ppo.ptx_mode == "separate" and ppo.ptx_coeff > 0
    return config.trainer.total_steps * ppo.epochs * ppo.num_minibatches * (2 if separate_ptx else 1)
