"""The RL runs of the world's on-policy rounds.

Each round trains a policy from the SFT model against the latest reward and cost models with every constraint of
``world.rounds.constraints``. A round run is an ordinary run: the config ``python -m repo_exp OVERRIDES`` would
compose (``round_overrides``), trained by the training function of every run, ``repo_exp.train.train``. That function
is named here (``TRAIN_FUNCTION``, as a Hydra ``_target_`` names what it builds) rather than imported: training sits
above the world in the package's layers (a run loads a built world), while a round's RL run is one more run. The runs of
a round go in parallel, each in a process of its own with one thread (a process pool started with ``spawn``: the
builder's process may already hold torch's thread pools, which do not survive a fork), and each writes its log to
``<round>/rl_<constraint>/run.log`` so that the builder's terminal keeps one line every 20 s.

This module imports no torch at the top: a pool worker sets its thread count before torch is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from repo_exp.config import WorldConfig

log = logging.getLogger(__name__)

# β of the rounds' RL runs: the published value, whatever the compared runs use (the world preset's ppo.kl_coeff),
# so that the world does not change with the runs' settings
ROUND_KL_COEFF = 0.01
RUN_LOG = "run.log"
TRAIN_FUNCTION = "repo_exp.train.train"  # what `python -m repo_exp` runs for one job
PROGRESS_SECONDS = 20.0


def round_overrides(world: WorldConfig, constraint: str, seed: int, sft: str, reward: str, cost: str) -> list[str]:
    """One round run's command-line overrides: the model preset of runs on this world (``world.trunk.run_preset``:
    its trainer, optimizer and templates) against the given models, one thread, no evaluation."""
    # the tiny world's models read its word-level tokenizer; a pretrained trunk's read their folder's own
    tokenizer = "null" if world.trunk.pretrained else "world"
    return [
        f"model={world.trunk.run_preset}", f"constraint={constraint}", f"seed={seed}",
        "model.source=hub", f"model.path={sft}", f"model.tokenizer={tokenizer}",
        "reward.source=hub", f"reward.path={reward}", f"reward.tokenizer={tokenizer}",
        "cost.source=hub", f"cost.path={cost}", f"cost.tokenizer={tokenizer}",
        f"world.seed={world.seed}", f"world.eval_fraction={world.eval_fraction}",
        f"world.temptation={str(world.temptation).lower()}", f"trainer.total_steps={world.rounds.steps}",
        *(f"world.unseen_topics.{family}={n}" for family, n in sorted(world.unseen_topics.items())),
        f"ppo.kl_coeff={ROUND_KL_COEFF}",
        "eval.at_start=false", "eval.at_end=false", "logger=none", "trainer.progress=false",
        "trainer.num_threads=1",
    ]


def one_thread() -> None:
    """A pool worker's start: one thread for torch's and the tokenizers' pools, set before torch is imported."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


@contextlib.contextmanager
def _output_to(path: Path):
    """Everything this process writes (log records, warnings, stray prints) goes to ``path`` meanwhile."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level = root.level
    with open(path, "a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def train_round_policy(overrides: list[str], run_dir: str) -> str:
    """One round run, in this process: compose the config as ``python -m repo_exp OVERRIDES`` does and train it with
    ``repo_exp.train.train`` in ``run_dir``. Returns the final policy's folder."""
    from hydra.utils import get_method

    from repo_exp.config import compose_config

    train = get_method(TRAIN_FUNCTION)
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with _output_to(folder / RUN_LOG):
        summary = train(compose_config(overrides), folder)
    if isinstance(summary, dict) and "stopped_at" in summary:  # a signal: the policy is not the round's
        raise RuntimeError(f"stopped by a signal after step {summary['stopped_at']}")
    checkpoints = sorted((folder / "checkpoints").glob("step_*"))
    if not checkpoints:
        raise RuntimeError(f"the run ended without a checkpoint in {folder / 'checkpoints'}")
    return str(checkpoints[-1] / "policy")


def _last_step(run_dir: Path) -> int:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = []
    for line in path.read_text().splitlines()[-3:]:
        try:
            steps.append(json.loads(line).get("step", 0))
        except ValueError:  # a row being written
            continue
    return max(steps, default=0)


def run_round_policies(world: WorldConfig, r: int, paths: dict[str, str], out: Path) -> dict[str, Path]:
    """RL from the SFT model with each round constraint, in parallel worker processes of one thread each; returns the
    final policy folders. Logs each run's step every 20 s."""
    runs = {c: out / f"rl_{c}" for c in world.rounds.constraints}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(runs), mp_context=context, initializer=one_thread) as pool:
        futures: dict[str, Future] = {
            c: pool.submit(train_round_policy,
                           round_overrides(world, c, world.rounds.seed + r, paths["sft"], paths["reward"],
                                           paths["cost"]),
                           str(run_dir))
            for c, run_dir in runs.items()}
        pending = set(futures.values())
        while pending:
            _, pending = wait(pending, timeout=PROGRESS_SECONDS)
            if pending:
                log.info("world round %d RL: %s", r, ", ".join(f"{c} step {_last_step(d)}/{world.rounds.steps}"
                                                              for c, d in runs.items()))
    policies = {}
    for c, future in futures.items():
        exc = future.exception()
        if exc is not None:
            log_file = runs[c] / RUN_LOG
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.is_file() else ""
            raise RuntimeError(f"world round {r}: the RL run with constraint={c} failed ({type(exc).__name__}: "
                               f"{exc}); its log is {log_file}:\n{tail}") from exc
        policies[c] = Path(future.result())
    return policies


__all__ = ["ROUND_KL_COEFF", "round_overrides", "run_round_policies", "train_round_policy"]
