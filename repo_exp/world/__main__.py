"""``python -m repo_exp.world [OVERRIDES]``: build the synthetic world alone (SFT → preference pairs → reward and
cost models → the on-policy rounds), or find it in the cache, and print where each stage is.

The overrides are those of ``python -m repo_exp`` (``world.seed=4``, ``world=no_temptation``, ``world.rounds.count=1``
…); the world is the one a run with the same overrides would load, so a later run, sweep or evaluation finds it in the
cache (``world.cache_dir``, by default ``.cache/repo_exp`` or ``$REPO_EXP_CACHE``) and builds nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Sequence

USAGE = """usage: python -m repo_exp.world [OVERRIDE ...]

Build (or find in the cache) the synthetic world a run with the same overrides would load, and print where its
stages are. Examples:
  python -m repo_exp.world                        the default world
  python -m repo_exp.world world.seed=4           another world: every sample, label and model differs
  python -m repo_exp.world world=no_temptation    the control world
  python -m repo_exp.world model=world_smollm2_cpu  the world built on SmolLM2-135M-Instruct, at two CPU cores' size
"""


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE, end="")
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    from repo_exp.config import compose_config, validate
    from repo_exp.world.stage import build_or_find_world

    try:
        world_config = validate(compose_config(args)).world
    except Exception as exc:  # a bad override: Hydra's or the schema's message names it
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    start = time.perf_counter()
    world = build_or_find_world(world_config)
    metrics = world.metrics()
    print(f"world {world.name!r} (seed {world.seed}) ready in {world.cache_dir} after "
          f"{time.perf_counter() - start:.0f} s:\n{world.describe()}")
    print(f"reward model held-out accuracy {metrics['reward/pairwise_accuracy']:.3f}; cost model "
          f"{metrics['cost/pairwise_accuracy']:.3f}, cost sign {metrics['cost/sign_accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    main()
