"""Reading and writing weights without running pickled code.

safetensors first; ``.bin`` files only through ``torch.load(weights_only=True)``, which refuses any pickled object
that is not a tensor or plain container. Sharded checkpoints are read through their index file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class UnsafeCheckpointError(ValueError):
    """A ``.bin`` file that holds pickled objects other than tensors."""


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it is not a plain tensor checkpoint (torch.load with weights_only=True "
            f"rejected it: {str(exc).splitlines()[0]}). Convert it to safetensors from a trusted environment."
        ) from exc


def load_state_dict_safely(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: one or sharded safetensors, else one or sharded ``.bin``."""
    folder = Path(folder)
    for index_name, loader in ((SAFETENSORS_INDEX, load_file), (BIN_INDEX, load_bin)):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index} has no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / shard
                if not shard_path.is_file():
                    raise FileNotFoundError(f"{index} names the shard {shard}, which is missing")
                state.update(loader(shard_path) if loader is load_bin else load_file(str(shard_path)))
            return state
    singles = sorted(folder.glob("*.safetensors"))
    if singles:
        state = {}
        for f in singles:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(load_bin(f))
        return state
    raise FileNotFoundError(f"{folder} has no weights (*.safetensors or *.bin)")


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save tensors to safetensors (contiguous, shared storage split)."""
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, str(path))
