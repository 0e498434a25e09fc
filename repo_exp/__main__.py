"""``python -m repo_exp``: one Hydra application — compose ``conf/config.yaml`` with the command line's overrides and
train (``repo_exp.train``). With no override it runs the default config; ``--cfg job`` prints it; ``-m`` sweeps.
The default comparison is the sweep ``python -m repo_exp -m experiment=compare`` (``make run``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from repo_exp.config import register_configs
from repo_exp.hydra_job import CONFIG_PATH, run_job
from repo_exp.hydra_job import strip_local_rank as _strip_local_rank

register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _app(cfg: DictConfig):
    from repo_exp.train import train  # here, not above: --help and --cfg print without loading torch

    return run_job(cfg, train, reuse_finished=True)


def main() -> None:
    _strip_local_rank()
    _app()


if __name__ == "__main__":
    main()
