"""Score models (reward, cost, critics) in the published Safe RLHF layout (SPEC §5).

Layout of ``PKU-Alignment/beaver-7b-v1.0-{reward,cost}``: a plain ``LlamaModel`` under the prefix ``model.``, no
``lm_head``, a linear ``score_head`` (``score_head.weight`` of shape ``[score_dim, hidden]``, ``score_head.bias``
only when the bias flag is set), optional buffers ``normalizer.mean/var/count``. ``config.json`` names the
architecture ``LlamaModelForScore`` (newer: ``LlamaForScore``) and may carry ``score_dim``, ``bias`` (old name) or
``score_bias`` (new name), ``score_type``, ``do_normalize``, ``normalizer_type``, ``momentum``, ``mean``, ``var``.
Every extra field is optional.

A response's score is ``score_head(h)`` at the **last position where attention_mask is 1** (its ``</s>``), which
holds for left and right padding alike; position ids are derived from the mask so that left padding does not shift
rotary positions.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from repo_exp.models.weights import check_floating, load_state_dict_safely, save_safetensors

log = logging.getLogger(__name__)

SCORE_ARCHITECTURE_SUFFIXES = ("ForScore", "ModelForScore")
SCORE_CONFIG_FIELDS = ("score_dim", "bias", "score_bias", "score_type", "do_normalize", "normalizer_type", "momentum",
                       "mean", "var")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, … counted over the unmasked tokens of each row (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position where the mask is 1, per row (B,)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=-1)


# The published models pick the normalisation by score type: a cost is only scaled, so that its sign (unsafe when
# C > 0) survives normalisation; a reward is shifted and scaled; a critic is left alone.
NORMALIZE_FUNCTIONS = {"reward": "affine", "cost": "scale", "critic": "identity"}


def score_input_ids(tokenizer, template: str, prompt: str, response: str, max_length: int | None = None) -> list[int]:
    """What a score model reads for one (prompt, response): ``template(prompt) + " " + response`` and EOS last (no
    space after a chat template)."""
    from repo_exp.models.tokenizers import CHAT, render_prompt, response_separator

    text = render_prompt(tokenizer, template, prompt) + response_separator(template) + response.strip()
    ids = tokenizer(text, add_special_tokens=template != CHAT)["input_ids"]
    if max_length is not None:
        ids = ids[: max_length - 1]
    return ids + [tokenizer.eos_token_id]


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest: (B, L) ids and the 0/1 attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


class Normalizer(nn.Module):
    """The published score normaliser's buffers (``mean``, ``var``, ``count``) and its ``normalize``:
    affine ``(x − mean) / (std + eps)``, scale ``x / (std + eps)`` or identity."""

    def __init__(self, score_dim: int, function: str = "affine") -> None:
        super().__init__()
        self.function = function
        self.register_buffer("mean", torch.zeros(score_dim))
        self.register_buffer("var", torch.ones(score_dim))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def normalize(self, scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        std = self.var.to(scores.dtype).sqrt()
        if self.function == "affine":
            return (scores - self.mean.to(scores.dtype)) / (std + eps)
        if self.function == "scale":
            return scores / (std + eps)
        return scores


class ScoreModel(nn.Module):
    """A transformer trunk plus a linear score head: ``scores`` per token (critics), ``end_scores`` per response."""

    def __init__(
        self,
        config: PretrainedConfig,
        score_dim: int = 1,
        bias: bool = False,
        score_type: str = "reward",
        do_normalize: bool = False,
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.score_dim = int(score_dim)
        self.bias = bool(bias)
        self.score_type = score_type
        self.do_normalize = bool(do_normalize)
        self.model = trunk if trunk is not None else AutoModel.from_config(config)
        self.score_head = nn.Linear(config.hidden_size, self.score_dim, bias=self.bias)
        self.normalizer = Normalizer(self.score_dim, NORMALIZE_FUNCTIONS.get(score_type, "affine"))

    # ---- forward passes
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, L, H)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores at every position (B, L, score_dim)."""
        scores = self.score_head(self.hidden_states(input_ids, attention_mask)).float()
        return self.normalizer.normalize(scores) if self.do_normalize else scores

    def end_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One score per row, read at the last position where ``attention_mask`` is 1: (B,) (or (B, D) if D > 1)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        end = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index(attention_mask)]
        scores = self.score_head(end).float()
        if self.do_normalize:
            scores = self.normalizer.normalize(scores)
        return scores.squeeze(-1) if self.score_dim == 1 else scores

    # ---- the published layout on disk
    def score_config(self) -> dict[str, Any]:
        arch = type(self.model).__name__.removesuffix("Model") + "ForScore"
        return {
            "architectures": [arch],
            "score_dim": self.score_dim,
            "score_bias": self.bias,
            "bias": self.bias,
            "score_type": self.score_type,
            "do_normalize": self.do_normalize,
            "normalizer_type": None,
        }

    def save_pretrained(self, path: str | os.PathLike, tokenizer=None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` in the published layout (and the tokenizer, if given).

        ``state_dict`` replaces the module's own weights (a ZeRO-3 model's gathered weights, for instance)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config.update(self.score_config())
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        state = self.state_dict() if state_dict is None else state_dict
        state = {k: v for k, v in state.items() if self.do_normalize or not k.startswith("normalizer.")}
        save_safetensors(state, path / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def _score_fields(raw: dict[str, Any], path, score_type: str | None = None,
                  normalize: bool | None = None) -> dict[str, Any]:
    """The score-model fields: config.json's, except the role (``score_type``) and the normalisation when the run
    decides them, as the published trainer does (``score_type='cost'``, ``do_normalize=False`` whatever the file
    says). A missing ``score_type`` with no role given reads as ``reward``, the published default."""
    bias = raw.get("score_bias", raw.get("bias", False))
    declared = raw.get("score_type")
    if declared is not None and declared not in NORMALIZE_FUNCTIONS:
        raise ValueError(f"{path}: config.json score_type is {declared!r}, expected one of {list(NORMALIZE_FUNCTIONS)}")
    if score_type is not None and score_type not in NORMALIZE_FUNCTIONS:
        raise ValueError(f"score_type must be one of {list(NORMALIZE_FUNCTIONS)}, got {score_type!r}")
    if score_type is not None and declared not in (None, score_type):
        log.warning("%s: config.json says score_type=%s but the run loads it as %s; it is used as %s",
                    path, declared, score_type, score_type)
    return {
        "score_dim": int(raw.get("score_dim", 1) or 1),
        "bias": bool(bias),
        "score_type": score_type or declared or "reward",
        "do_normalize": bool(raw.get("do_normalize", False)) if normalize is None else bool(normalize),
    }


def read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a score-model checkpoint: it has no config.json")
    return json.loads(config_file.read_text())


def load_score_model(
    path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
    score_type: str | None = None,
    normalize: bool | None = None,
) -> ScoreModel:
    """Load a score model saved in the published layout (``LlamaModelForScore`` / ``LlamaForScore``).

    ``score_type`` (``reward``/``cost``/``critic``) is the role the run loads it in; it picks the normalisation
    (a cost is only scaled, so its sign survives) whatever config.json says or omits. ``normalize`` forces the
    normaliser on or off; ``None`` leaves it to config.json's ``do_normalize``.

    ``path`` is a local folder or a hub id (fetched through the hub cache; offline, it must already be there).
    Weights come from safetensors, or from ``.bin`` shards with ``weights_only=True`` (no pickled code runs).
    Raises ``ValueError`` naming the problem when the checkpoint is not a score model.
    """
    folder, config, fields, raw = read_score_checkpoint(path, revision, trust_remote_code, score_type, normalize)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    state = load_state_dict_safely(folder)
    with torch.device("meta"):
        model = ScoreModel(config, **fields)
    check_score_weights(path, {k: tuple(v.shape) for k, v in state.items()}, model, fields["score_dim"])
    check_floating(folder, {k: v.dtype for k, v in state.items()}, dict(model.named_parameters()))
    full = model.state_dict()
    state.update({k: v for k, v in normalizer_state(raw, full).items() if k not in state})
    model.load_state_dict(state, assign=True, strict=True)
    # rotary caches are buffers created at init (non-persistent): rebuild them off the meta device
    _rebuild_nonpersistent_buffers(model, config)
    model = model.to(dtype)
    model.normalizer.float()
    model.eval()
    return model


def read_score_checkpoint(path: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False,
                          score_type: str | None = None, normalize: bool | None = None
                          ) -> tuple[Path, PretrainedConfig, dict[str, Any], dict[str, Any]]:
    """A score checkpoint's folder, trunk config, ``ScoreModel`` fields and raw config.json, without its weights.
    Raises ``ValueError`` naming the problem when config.json is not a score model's."""
    folder = resolve_checkpoint(path, revision)
    raw = read_config(folder)
    architectures = raw.get("architectures") or []
    if not any(a.endswith(SCORE_ARCHITECTURE_SUFFIXES) for a in architectures):
        raise ValueError(
            f"{path} is not a score model: config.json architectures is {architectures}, expected one of "
            f"LlamaModelForScore / LlamaForScore (a trunk plus score_head)"
        )
    trunk_config = {k: v for k, v in raw.items() if k not in SCORE_CONFIG_FIELDS and k != "architectures"}
    model_type = trunk_config.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: config.json has no model_type")
    config = AutoConfig.for_model(model_type, **trunk_config)
    if trust_remote_code:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    return folder, config, _score_fields(raw, path, score_type, normalize), raw


def check_score_weights(path: Any, shapes: dict[str, tuple[int, ...]], model: "ScoreModel", score_dim: int) -> None:
    """The checkpoint's tensor names and head shape against ``model`` (built from its config.json, ``score_dim``
    as config.json says): raises ``ValueError`` naming what does not fit."""
    if "score_head.weight" not in shapes:
        raise ValueError(
            f"{path}: the checkpoint has no score_head.weight, so it is not a score model in the published layout "
            f"(found keys such as {sorted(shapes)[:4]})"
        )
    if shapes["score_head.weight"][0] != score_dim:
        raise ValueError(f"{path}: score_head.weight has shape {shapes['score_head.weight']} but config.json says "
                         f"score_dim={score_dim}")
    if "score_head.bias" in shapes and not model.bias:
        raise ValueError(f"{path}: score_head.bias is in the weights but config.json sets bias/score_bias false")
    names = model.state_dict().keys()
    missing = [k for k in names if k not in shapes and not k.startswith("normalizer.")]
    unexpected = [k for k in shapes if k not in names]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match a {type(model.model).__name__} score model: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")


def normalizer_state(raw: dict[str, Any], full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The normaliser's statistics when the weights lack them: config.json's mean / var, else the identity."""
    out = {}
    for key in full:
        if key.startswith("normalizer."):
            name = key.removeprefix("normalizer.")
            if name in ("mean", "var") and raw.get(name) is not None:
                out[key] = torch.as_tensor(raw[name], dtype=torch.float32).reshape(full[key].shape)
            else:
                out[key] = (torch.ones(full[key].shape) if name == "var"
                            else torch.zeros(full[key].shape, dtype=full[key].dtype))
    return out


def _rebuild_nonpersistent_buffers(model: ScoreModel, config: PretrainedConfig) -> None:
    """Buffers that are not saved (rotary frequencies) stay on the meta device after an ``assign`` load: rebuild
    each module that holds one from the config alone, without materialising the whole trunk."""
    for name, module in model.model.named_modules():
        meta = [b for b, buf in module.named_buffers(recurse=False) if buf.is_meta]
        if not meta:
            continue
        try:
            fresh = type(module)(config=config)
        except TypeError as exc:
            raise ValueError(f"cannot rebuild the buffers {meta} of {name or 'the trunk'} "
                             f"({type(module).__name__}) from its config") from exc
        for buffer_name in meta:
            module.register_buffer(buffer_name, getattr(fresh, buffer_name), persistent=False)


def resolve_checkpoint(path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; a hub id through ``snapshot_download`` (which honours HF_HUB_OFFLINE)."""
    local = Path(path)
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"{path} is a file; a checkpoint is a folder with config.json and weights")
        return local
    from huggingface_hub import snapshot_download

    from repo_exp.revisions import check_loaded, check_offline_cache, commit_in_path

    check_offline_cache(str(path), revision)
    try:
        folder = Path(snapshot_download(str(path), revision=revision,
                                        allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as exc:  # offline and not cached, or not on the hub
        raise FileNotFoundError(f"cannot find the checkpoint {path!r} (revision {revision}) locally or in the hub "
                                f"cache: {exc}") from exc
    check_loaded("score model", str(path), revision, commit_in_path(folder))
    return folder
