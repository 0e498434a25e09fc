"""Choices made for the machine at hand: those that change the speed of a run and not its numbers.

``model.attn_implementation=fastest`` (the project's timing probe; the world presets use it) picks the attention
kernel of the trained models (sdpa or eager) by timing both: they compute
the same attention (equal within float rounding, ``tests/test_speed_choices.py``), but which is faster depends on the
CPU, the precision, the width and the threads (sdpa's CPU backward under bf16 was 4x slower than eager's on an AMD
EPYC with avx512_bf16; the gap differs on other CPUs, and in float32 sdpa may win). The first run on a machine times
a forward and backward pass of one layer of the run's shape with each kernel and caches the answer in the project
cache (``world.cache_dir``), keyed by CPU model, torch version, device, precision, shape and thread count; later runs
read it. Choices that change the numbers (the precision) stay explicit in the config. On a GPU ``fastest`` is sdpa (its
fused kernels). ``model.attn_implementation`` left null is transformers' own choice (sdpa where the architecture
supports it, else eager), and any kernel name transformers knows is passed to it as given.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("repo_exp")

ATTENTION_KERNELS = ("sdpa", "eager")
PROBE = "fastest"  # model.attn_implementation value: time sdpa and eager on this machine, take the faster
PROBE_FILE = "attention_probe.json"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_key(device: torch.device, precision: str, shape: dict[str, int]) -> str:
    """What an attention choice depends on: the CPU model (or GPU name), torch's version, the precision, the shape."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    dims = ",".join(f"{k}={v}" for k, v in sorted(shape.items()))
    return f"{where} | torch {torch.__version__} | {device.type} | {precision} | {dims}"


def _probe_model(model_config, attn: str, device: torch.device, dtype: torch.dtype):
    """One layer of the policy's architecture over a 128-word vocabulary: attention is timed where it runs."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    config.num_hidden_layers = 1
    config.vocab_size = 128
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(config, name):
            setattr(config, name, None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.to(device).train()


def time_attention(model_config, kernels: tuple[str, ...], device: torch.device, dtype: torch.dtype, precision: str,
                   batch: int, length: int, repeats: int = 3) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` forward+backward passes (after one untimed) with each kernel, the
    kernels taking turns so that a change in the machine's load falls on all of them."""
    models = {attn: _probe_model(model_config, attn, device, dtype) for attn in kernels}
    ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[::2, : length // 4] = 0  # left padding on every other row, as in a rollout batch
    best = {attn: float("inf") for attn in kernels}
    for i in range(repeats + 1):
        for attn, model in models.items():
            autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            start = time.perf_counter()
            with autocast:
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits.float().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                best[attn] = min(best[attn], time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return best


def choose_attention(model_config, dtype: torch.dtype, device: torch.device, precision: str, batch: int,
                     length: int, cache_dir: str | os.PathLike,
                     timer: Callable[..., dict[str, float]] = time_attention) -> tuple[str, dict]:
    """The faster of sdpa and eager for this machine and shape, from the cache or measured (and then cached).

    ``dtype`` is the weights' dtype (``model.dtype``), ``precision`` the run's ``trainer.mixed_precision``. Returns the
    kernel and the cache entry (``{"choice", "seconds": {kernel: s}}``)."""
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    shape = {"hidden": model_config.hidden_size, "heads": model_config.num_attention_heads,
             "kv_heads": getattr(model_config, "num_key_value_heads", model_config.num_attention_heads),
             "head_dim": head_dim, "batch": batch, "length": length, "weights": str(dtype).removeprefix("torch.")}
    if device.type == "cpu":
        shape["threads"] = torch.get_num_threads()
    key = probe_key(device, precision, shape)
    path = Path(cache_dir) / PROBE_FILE
    cached = _read(path)
    if key in cached and cached[key].get("choice") in ATTENTION_KERNELS:
        return cached[key]["choice"], cached[key]
    seconds = timer(model_config, ATTENTION_KERNELS, device, dtype, precision, batch, length)
    entry = {"choice": min(seconds, key=seconds.get), "seconds": seconds}
    log.info("model.attn_implementation=fastest: %s (forward+backward of one layer: %s) for %s", entry["choice"],
             ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()), key)
    cached = _read(path)  # another run may have written meanwhile
    cached[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=2, sort_keys=True))
    tmp.replace(path)
    return entry["choice"], entry


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_attention(config, policy_path: str | None, device: torch.device) -> str:
    """Replace ``model.attn_implementation=fastest`` in ``config`` by the kernel chosen for this machine; returns it
    (any other value, null included, is returned as it is: transformers takes it).

    Under several processes rank 0 chooses and every rank takes its choice (all ranks run the same kernel)."""
    import torch.distributed as dist

    m, t = config.model, config.trainer
    if m.attn_implementation != PROBE:
        return m.attn_implementation
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    choice = "sdpa"  # on a GPU: its fused kernels
    if device.type != "cuda" and (not distributed or dist.get_rank() == 0):
        if m.source == "tiny":
            from transformers import LlamaConfig

            a = m.arch
            model_config = LlamaConfig(hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                                       num_attention_heads=a.num_attention_heads,
                                       num_key_value_heads=a.num_key_value_heads,
                                       max_position_embeddings=a.max_position_embeddings)
        else:
            from transformers import AutoConfig

            model_config = AutoConfig.from_pretrained(policy_path or m.path, revision=m.revision,
                                                      trust_remote_code=m.trust_remote_code)
        length = min(t.max_prompt_length + t.max_new_tokens, getattr(model_config, "max_position_embeddings", 256))
        choice, _ = choose_attention(model_config, getattr(torch, m.dtype), device, t.mixed_precision,
                                     min(t.micro_batch_size, 16), length, config.world.cache_dir)
    if distributed:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    m.attn_implementation = choice
    return choice
