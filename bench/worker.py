"""One benchmarked trainer per process, driven over a pipe.

Each configuration lives in its own (spawned) process: its peak resident memory is its own, and a garbage collection
in one trainer never walks the other's objects. Only one process computes at a time; the others wait on their pipe.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import traceback
from typing import Any


def _rss_mb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process from /proc (MiB), or None where /proc is not there."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux ``clear_refs``); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or since the last ``reset_peak_rss`` (MiB)."""
    peak = _rss_mb("VmHWM")
    if peak is None:  # no /proc: the lifetime peak (kilobytes on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak


def _build(kind: str, spec: dict[str, Any]):
    if kind == "ours":
        from bench.ours import Ours

        return Ours(spec["overrides"], eos_rate=spec.get("eos_rate"))
    if kind == "trl":
        from bench.ours import build_trainer
        from bench.trl_ppo import TrlPPO

        ours = build_trainer(spec["overrides"])
        runner = TrlPPO(ours, bf16=spec.get("bf16", False), attn=spec.get("attn", "sdpa"), lora=spec.get("lora"))
        del ours
        import gc

        gc.collect()  # our trainer's objects go before trl's loop starts collecting garbage every iteration
        reset_peak_rss()  # from here on, trl's own memory
        return runner
    if kind == "generation":
        from bench.smollm import GenerationRace

        return GenerationRace(spec["overrides"], spec["new_tokens"])
    if kind == "scaling":
        from bench.ours import Ours

        class Scaling:
            """Builds a fresh trainer per (batch, response length); one at a time."""

            def iterations(self, overrides: list[str], warmup: int, repeats: int) -> list[float]:
                runner = Ours(overrides)
                for _ in range(warmup):
                    runner.iteration()
                return [runner.iteration()["seconds"] for _ in range(repeats)]

        return Scaling()
    raise ValueError(f"unknown worker kind {kind!r}")


def _serve(conn, kind: str, spec: dict[str, Any], threads: int) -> None:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl warns on importing trl.experimental
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(threads)
    import bench.ours  # noqa: F401 - the libraries first, so that the baseline below is memory before any model

    if kind == "trl":
        import trl.experimental.ppo  # noqa: F401
    baseline = _rss_mb("VmRSS")
    try:
        runner = _build(kind, spec)
        conn.send(("ready", {"baseline_rss_mb": baseline, **(runner.info() if hasattr(runner, "info") else {})}))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        method, kwargs = conn.recv()
        if method == "stop":
            conn.send(("ok", {"peak_rss_mb": peak_rss_mb()}))
            return
        try:
            conn.send(("ok", getattr(runner, method)(**kwargs)))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class WorkerError(RuntimeError):
    """A benchmark worker failed; the message carries its traceback."""


class Worker:
    """A spawned process holding one runner (``ours``, ``trl`` or ``scaling``)."""

    def __init__(self, kind: str, spec: dict[str, Any], threads: int, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, kind, spec, threads), daemon=True, name=name)
        self.process.start()
        child.close()
        self.info = self._receive("start")

    def _receive(self, what: str):
        try:
            status, payload = self.conn.recv()
        except EOFError as exc:
            raise WorkerError(f"benchmark worker {self.name} died during {what} (exit code "
                              f"{self.process.exitcode})") from exc
        if status == "error":
            raise WorkerError(f"benchmark worker {self.name} failed during {what}:\n{payload}")
        return payload

    def call(self, method: str, **kwargs):
        self.conn.send((method, kwargs))
        return self._receive(method)

    def stop(self) -> dict[str, float]:
        """Ends the process; returns its peak resident memory."""
        try:
            return self.call("stop")
        finally:
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()
