"""The synthetic world as a stage of its own, like a data set's preparation: built (or found in the cache) before a
run sets up any model, by whoever starts the run — ``repo_exp.train`` and ``repo_exp.evaluate`` for one job, the
sweep callback for every world of a sweep, ``python -m repo_exp.world`` alone. The run's model set-up
(``repo_exp.setup``) then only loads the folders named here.

``WorldArtifacts`` names what a built world holds: the SFT model, the preference pairs, each on-policy round's pairs,
and the reward and cost models trained on all of them. Building runs ``repo_exp.world.pipeline``; every stage there
is cached by a hash of what it depends on, so a second call finds the same folders in seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from repo_exp.config import Config, WorldConfig
    from repo_exp.runtime import Runtime

log = logging.getLogger("repo_exp")

@dataclass(frozen=True)
class WorldArtifacts:
    """The folders of a built world (each inside ``cache_dir``)."""

    name: str
    seed: int
    cache_dir: str
    sft: str  # the SFT causal LM: the policy's and the reference's starting point
    preferences: str  # the SFT samples' preference pairs (train.jsonl, test.jsonl in the PKU-SafeRLHF schema)
    reward: str  # the reward model, in the published score-model layout
    cost: str  # the cost model, likewise
    rounds: tuple[str, ...] = field(default=())  # each on-policy round's pairs, in order

    @classmethod
    def from_paths(cls, world: WorldConfig, paths: dict[str, str]) -> WorldArtifacts:
        rounds = tuple(paths[k] for k in sorted((k for k in paths if k.startswith("round")), key=lambda k: int(k[5:])))
        return cls(world.name, world.seed, str(world.cache_dir), paths["sft"], paths["preferences"], paths["reward"],
                   paths["cost"], rounds)

    def paths(self) -> dict[str, str]:
        """``{"sft", "preferences", "reward", "cost", "round1", …}``: the folders by stage."""
        return {"sft": self.sft, "preferences": self.preferences, "reward": self.reward, "cost": self.cost,
                **{f"round{i}": folder for i, folder in enumerate(self.rounds, start=1)}}

    def preference_folders(self) -> list[str]:
        """Every folder of preference pairs the reward and cost models were trained on, SFT pairs first."""
        return [self.preferences, *self.rounds]

    def metrics(self) -> dict[str, float]:
        """The stage metrics (reward and cost model accuracies, preference statistics, SFT loss)."""
        from repo_exp.world.pipeline import world_metrics

        return world_metrics(self.paths())

    def describe(self) -> str:
        """Where the world is, one stage a line."""
        return "\n".join(f"  {stage:<12} {folder}" for stage, folder in self.paths().items())


def needs_world(config: Config) -> bool:
    """Whether a run of ``config`` loads a model the world's pipeline trains (``source: world`` for the policy, the
    reward or the cost model); the world's prompts alone need no pipeline."""
    return "world" in (config.model.source, config.reward.source, config.cost.source)


def build_or_find_world(world: WorldConfig, rt: Runtime | None = None) -> WorldArtifacts:
    """Build every stage of ``world`` that is not cached yet, or find them all; under several ranks rank 0 builds
    while the others wait, then every rank finds the folders."""
    from repo_exp.world.pipeline import build_world

    if rt is None or not rt.distributed:
        return WorldArtifacts.from_paths(world, build_world(world))
    if rt.is_main:
        build_world(world)
    rt.barrier()
    return WorldArtifacts.from_paths(world, build_world(world))  # every stage is cached now: this only finds them


def prepare_world(config: Config, rt: Runtime | None = None) -> WorldArtifacts | None:
    """The world's artifacts when the run loads a world model (built or found, ``build_or_find_world``), else None.
    Logs where the world is."""
    if not needs_world(config):
        return None
    start = time.perf_counter()
    world = build_or_find_world(config.world, rt)
    if rt is None or rt.is_main:
        log.info("world %r (seed %d) ready in %s (%.0f s)", world.name, world.seed, world.cache_dir,
                 time.perf_counter() - start)
    return world


def world_paths(config: Config, rt: Runtime | None = None) -> dict[str, str]:
    """The world's artifact folders for ``config`` by stage (``WorldArtifacts.paths``), building what is missing; {}
    when no source of the run is the world's."""
    world = prepare_world(config, rt)
    return world.paths() if world is not None else {}
