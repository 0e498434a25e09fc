"""``python -m repo_exp``: one Hydra-composed run; with no arguments at all, the default comparison on the synthetic
world (``repo_exp.compare``)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from repo_exp.config import ConfigError, register_configs

log = logging.getLogger("repo_exp")
CONFIG_PATH = "pkg://repo_exp.conf"


def _strip_local_rank() -> None:
    """The ``deepspeed`` launcher appends ``--local_rank=N``, which Hydra would reject: move it to the environment."""
    args = []
    it = iter(sys.argv[1:])
    for arg in it:
        if arg.startswith("--local_rank"):
            value = arg.split("=", 1)[1] if "=" in arg else next(it)
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        args.append(arg)
    sys.argv[1:] = args


def _job(cfg: DictConfig, task: str):
    from hydra.core.hydra_config import HydraConfig

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        if task == "evaluate":
            from repo_exp.evaluate import evaluate_job

            return evaluate_job(cfg, run_dir)
        from repo_exp.train import train

        return train(cfg, run_dir)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        raise SystemExit(2) from None


def run_hydra(task: str = "train") -> None:
    register_configs()
    _strip_local_rank()
    hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")(lambda cfg: _job(cfg, task))()


def main() -> None:
    if len(sys.argv) == 1:
        from repo_exp.compare import main as compare_main

        compare_main()
        return
    run_hydra("train")


if __name__ == "__main__":
    main()
