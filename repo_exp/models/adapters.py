"""LoRA adapters through PEFT (``model.lora``), and a trained adapter as a model of its own.

With ``model.lora.rank > 0`` the policy is wrapped by ``peft.get_peft_model``: only the adapters train, so the
optimizer's states and every checkpoint hold them alone (a checkpoint's ``policy/`` is a PEFT adapter folder), and the
frozen reference is the same model with its adapters disabled (``AdapterBase``): no second copy of the base. With
``model.lora.critics`` the critics' trunks get their own adapters and their value heads train whole. An adapter's
update is ``(alpha / rank) · B·A`` with ``B`` zero at the start (Hu et al., 2021), so the first policy is the base.

An adapter folder (``adapter_config.json``: a checkpoint's ``policy/``, or any PEFT LoRA adapter) given as
``model.path`` loads on its base (``base_model_name_or_path``) and its adapters go on training.
``python -m repo_exp.models.adapters ADAPTER_FOLDER OUT_DIR`` writes the merged model (base + adapter) as an ordinary
transformers folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def is_adapter_folder(path: Any) -> bool:
    """A local folder holding a PEFT adapter (``adapter_config.json``) rather than a whole model."""
    return path is not None and (Path(str(path)).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_config(path: Any) -> dict[str, Any]:
    return json.loads((Path(str(path)).expanduser() / ADAPTER_CONFIG).read_text())


def adapter_base(path: Any, key: str = "model.path") -> str:
    """The base model an adapter folder was trained on, checked to exist when it is a local path."""
    from repo_exp.models.checks import check_local_path

    config = adapter_config(path)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{key}={path} is a PEFT adapter folder whose {ADAPTER_CONFIG} names no base model "
                         f"(base_model_name_or_path); set it to the folder or hub id of the model it was trained on")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{key}={path} is a PEFT {config.get('peft_type')} adapter; repo_exp trains LoRA adapters")
    try:
        check_local_path(f"{key}={path}: its base model (base_model_name_or_path in {ADAPTER_CONFIG})", base)
    except ValueError as exc:
        raise type(exc)(f"{exc}; the adapter needs the model it was trained on") from None
    return str(base)


def tokenizer_path(path: Any) -> Any:
    """Where an adapter folder's tokenizer is: the folder itself when it holds one (a checkpoint's ``policy/`` does),
    else its base."""
    if not is_adapter_folder(path):
        return path
    folder = Path(str(path)).expanduser()
    return path if any((folder / name).is_file() for name in TOKENIZER_FILES) else adapter_base(path)


def check_target_modules(model: nn.Module, targets: list[str], key: str = "model.lora.target_modules") -> None:
    """Every target names a linear module of ``model`` (by its name or a dotted suffix of it); else an error that
    lists the linear modules it has."""
    from repo_exp.config import ConfigError

    if list(targets) == ["all-linear"]:
        return
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear)]
    if missing:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ConfigError(f"{key}: {type(model).__name__} has no linear module named {missing}; its linear modules "
                          f"are {kinds} (or give [all-linear])")


def lora_config(lora, task_type: str | None):
    import peft

    targets = list(lora.target_modules)
    return peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                           target_modules="all-linear" if targets == ["all-linear"] else targets, task_type=task_type)


def with_adapters(model: nn.Module, lora, task_type: str | None = "CAUSAL_LM", key: str = "model.lora"):
    """``model`` wrapped with fresh LoRA adapters (PEFT); every base weight frozen."""
    import peft

    check_target_modules(model, list(lora.target_modules), f"{key}.target_modules")
    return peft.get_peft_model(model, lora_config(lora, task_type))


def load_adapter(base: nn.Module, path: Any, key: str = "model.path"):
    """The adapter folder ``path`` on ``base``, its adapters trainable (RL turns their dropout off with every other:
    ``repo_exp.models.policy.disable_dropout``)."""
    import peft

    try:
        model = peft.PeftModel.from_pretrained(base, str(Path(str(path)).expanduser()), is_trainable=True)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ValueError(f"{key}={path}: the adapter does not fit its base model {type(base).__name__} "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    return model


def critic_with_adapters(critic: nn.Module, lora) -> nn.Module:
    """A critic (``ScoreModel``) whose trunk gets LoRA adapters; its value head trains whole."""
    critic.model = with_adapters(critic.model, lora, task_type="FEATURE_EXTRACTION", key="model.lora")
    critic.score_head.requires_grad_(True)
    return critic


def is_peft_model(module: nn.Module) -> bool:
    import peft

    return isinstance(module, peft.PeftModel)


def has_frozen_parameters(module: nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def make_trainable(module: nn.Module) -> nn.Module:
    """Every parameter trains, except under adapters, where only the adapters (and a critic's head) do."""
    if not any(is_peft_model(m) for m in module.modules()):
        module.requires_grad_(True)
    return module


def trained_state_dict(module: nn.Module, state: dict[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor] | None:
    """The entries of ``state`` (default: the module's own) that train; None when every parameter trains (the whole
    state is saved then)."""
    if not has_frozen_parameters(module):
        return state
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    source = module.state_dict() if state is None else state
    return {k: v for k, v in source.items() if k in names}


def load_trained(module: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """Load a checkpoint of the trained parameters only (adapters): every one of them must be there."""
    if is_peft_model(module):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        expected = set(get_peft_model_state_dict(module))
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{folder} does not fit this run's adapters: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]} (another model.lora.rank or target_modules?)")
        set_peft_model_state_dict(module, state)
        return
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    missing = [k for k in names if k not in state]
    if missing:
        raise ValueError(f"{folder} does not fit this run's model: missing {missing[:5]}")
    module.load_state_dict({k: state[k] for k in names}, strict=False)


class AdapterBase(nn.Module):
    """The frozen reference under adapters: the policy's own base, its adapters disabled for the pass. It holds no
    parameters of its own (the policy is not registered as a submodule): moving, freezing or casting it leaves the
    policy alone, and ZeRO-3 partitions the base once, with the policy."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: its parameters are the policy's

    @property
    def config(self):
        return self.policy.config

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)


def shares_policy(ref: nn.Module) -> bool:
    return isinstance(ref, AdapterBase)


def merged(model: nn.Module) -> nn.Module:
    """The base with the adapters' updates added into its weights (``W + (alpha / rank)·B·A``), as a plain model."""
    return model.merge_and_unload()


def export_merged(adapter_folder: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write base + adapter of ``adapter_folder`` as an ordinary transformers folder ``out`` (must not exist)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out} exists already; export into a new folder (nothing was written)")
    if not is_adapter_folder(adapter_folder):
        raise ValueError(f"{adapter_folder} holds no {ADAPTER_CONFIG}: not an adapter folder (a checkpoint's policy/ "
                         f"under model.lora)")
    base = adapter_base(adapter_folder, key="adapter folder")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), use_safetensors=None,
                                                 weights_only=True)
    model = merged(load_adapter(model, adapter_folder, key="adapter folder"))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_path(adapter_folder)).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m repo_exp.models.adapters",
                                     description="Merge a LoRA adapter folder into its base: write base + adapter as "
                                                 "an ordinary transformers folder.")
    parser.add_argument("adapter", help="an adapter folder (a checkpoint's policy/ under model.lora)")
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    try:
        print(export_merged(args.adapter, args.out, args.dtype))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
