"""Reading and writing weights without running pickled code.

safetensors first; ``.bin`` files only through ``torch.load(weights_only=True)``, which refuses any pickled object
that is not a tensor or plain container. Sharded checkpoints are read through their index file.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


class UnsafeCheckpointError(ValueError):
    """A ``.bin`` file that holds pickled objects other than tensors."""


def unsafe_pickle_error(path: str | os.PathLike, exc: pickle.UnpicklingError) -> UnsafeCheckpointError:
    """The refusal of ``torch.load(weights_only=True)``, without torch's advice to retry with ``weights_only=False``."""
    refused = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return UnsafeCheckpointError(
        f"refused to load {path}: it pickles objects other than tensors and plain containers, which could run code "
        f"on load ({refused[0] if refused else str(exc).splitlines()[0]}). Convert it to safetensors in an "
        f"environment you trust."
    )


def load_bin(path: Path) -> dict[str, Any]:
    """A ``torch.save`` file of tensors, numbers, strings and plain containers (weights, optimizer states, RNG
    states); anything else pickled in it is refused before it can run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        raise unsafe_pickle_error(path, exc) from exc
    except Exception as exc:
        raise ValueError(f"cannot read {path}: it is truncated or corrupt ({str(exc).splitlines()[0]})") from exc


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors' own error names only the header
        raise ValueError(f"cannot read {path}: it is truncated or corrupt ({exc})") from exc


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder: the shards its index names (safetensors first), else every
    ``*.safetensors``, else every ``*.bin``."""
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index} has no weight_map")
            shards = [folder / shard for shard in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise FileNotFoundError(f"{index} names the shard {shard.name}, which is missing")
            return shards
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder} has no weights (*.safetensors or *.bin)")
    return files


def check_weight_files(folder: str | os.PathLike) -> None:
    """Refuse a model folder whose safetensors files cannot be read (cut by an interrupted copy or a full disk),
    naming the file: a loader that reads them later (transformers' ``from_pretrained``) reports safetensors' own
    "incomplete metadata" error, which names neither the file nor the folder. Reads the headers only."""
    from safetensors import safe_open

    try:
        files = weight_files(folder)
    except FileNotFoundError:  # no weights at all: the loader says so itself
        return
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as exc:
            raise ValueError(f"cannot read {f}: it is truncated or corrupt ({exc}); replace it with a complete copy") \
                from exc


def load_state_dict_safely(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: one or sharded safetensors, else one or sharded ``.bin``."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        state.update(load_safetensors(f) if f.suffix == ".safetensors" else load_bin(f))
    return state


class LazyWeights:
    """The tensors of a checkpoint folder by name, each read from disk when asked for: a process that fills a
    partitioned model one parameter at a time never holds the whole checkpoint. ``.bin`` files are memory-mapped
    (``torch.load(mmap=True, weights_only=True)``)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        from safetensors import safe_open

        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._mapped: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for f in weight_files(folder):
            if f.suffix == ".safetensors":
                try:
                    with safe_open(str(f), framework="pt") as handle:
                        for name in handle.keys():
                            self._files[name] = f
                            tensor = handle.get_slice(name)
                            self._shapes[name] = tuple(tensor.get_shape())
                            self._dtypes[name] = SAFETENSORS_DTYPES.get(tensor.get_dtype(), torch.float32)
                except Exception as exc:
                    raise ValueError(f"cannot read {f}: it is truncated or corrupt ({exc})") from exc
            else:
                try:
                    mapped = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except pickle.UnpicklingError as exc:
                    raise unsafe_pickle_error(f, exc) from exc
                for name, tensor in mapped.items():
                    self._mapped[name] = tensor
                    self._shapes[name] = tuple(tensor.shape)
                    self._dtypes[name] = tensor.dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtypes(self) -> dict[str, torch.dtype]:
        """The stored dtype of every tensor, read from the headers (nothing is loaded)."""
        return dict(self._dtypes)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self._mapped:
            return self._mapped[name]
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as handle:
            return handle.get_tensor(name)


# safetensors' names of its dtypes (``get_slice(name).get_dtype()``) as torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def tensor_file(folder: str | os.PathLike, name: str) -> Path | None:
    """The weight file of ``folder`` that holds the tensor ``name`` (None if none does)."""
    from safetensors import safe_open

    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as handle:
                if name in handle.keys():
                    return f
        elif name in torch.load(f, map_location="cpu", weights_only=True, mmap=True):
            return f
    return None


def check_floating(folder: str | os.PathLike, dtypes: dict[str, torch.dtype], parameters: Iterable[str]) -> None:
    """Refuse a checkpoint that stores a parameter (of ``parameters``) in an integer dtype: int8 or uint8 weights
    are quantised, and copying them into a floating-point model would load the integers as if they were the weights
    (or fail deep inside ``load_state_dict`` with a message about gradients). Names the file, the tensor and its
    dtype."""
    for name in parameters:
        dtype = dtypes.get(name)
        if dtype is not None and not dtype.is_floating_point:
            where = tensor_file(folder, name) or Path(folder)
            quantised = " (quantised weights)" if dtype in (torch.int8, torch.uint8) else ""
            raise ValueError(f"cannot load {where}: its tensor {name} is stored as {dtype}{quantised}, but the model's "
                             f"parameters are floating point; repo_exp loads float32, bfloat16 or float16 weights, not "
                             f"quantised ones: give the unquantised checkpoint")


def save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Save tensors to safetensors (contiguous, shared storage split)."""
    save_file({k: v.detach().contiguous().cpu().clone() for k, v in state.items()}, str(path))


# What DeepSpeed (0.19) pickles into its checkpoint files beside tensors and plain containers: its optimizer states
# hold the ZeRO stage as an enum, the loss scaler as an object, and (ZeRO-1/2) fragment addresses. Unpickling these
# calls only their own constructors.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


def check_pickles(folder: str | os.PathLike, allowed: frozenset[str] = DEEPSPEED_GLOBALS) -> None:
    """Refuse ``folder`` if a pickled file in it (``.pt``, ``.pth``, ``.bin``, at any depth) names any global other
    than those ``torch.load(weights_only=True)`` accepts and ``allowed``; for files that a loader outside repo_exp
    unpickles without ``weights_only`` (DeepSpeed's ``load_checkpoint``). The pickle is scanned, never run: torch's
    scanner knows only the opcodes ``torch.save`` writes and refuses any other."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file()):
        try:
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception as exc:
            raise UnsafeCheckpointError(f"refused to load {path}: its pickled content cannot be checked without "
                                        f"running it ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                                        ) from exc
        refused = sorted(names - allowed)
        if refused:
            raise UnsafeCheckpointError(
                f"refused to load {path}: it pickles objects other than tensors and plain containers, which could run "
                f"code on load ({', '.join(refused[:5])}). Nothing was loaded from it")
