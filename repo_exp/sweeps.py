"""Sweeps that are unions of grids: a frontier sweeps each method along its own knob.

Hydra's basic sweeper runs one Cartesian product. A frontier is a union of them: the average constraint along its
threshold d, the rectified constraint along λ, SACPO along its λ, single points at their defaults — each crossed
with the same seeds (and worlds). ``expand_arms`` turns ``hydra.sweeper.params`` (axes every arm shares) and
``hydra.sweeper.arms`` (name → that arm's own axes) into one override list per job; the project's sweeper
(``hydra_plugins.repo_exp_sweeps``) launches them when ``hydra.sweeper.arms`` is set, and the report callbacks use
the same function to find the jobs.

Within one arm the order of precedence is: the shared axes, then the arm's, then the command line's (so
``seed=0,1`` on the command line replaces the shared seeds, and ``hydra.sweeper.arms.sacpo=null`` leaves an arm
out).

``python -m repo_exp.sweeps OVERRIDES…`` lists the jobs a sweep would run (the same overrides as ``python -m repo_exp
-m OVERRIDES…``, without ``-m``), each composed and validated, and where they would go, without running any:
    python -m repo_exp.sweeps experiment=frontier
    python -m repo_exp.sweeps experiment=compare seed=0,1,2,3,4 constraint.threshold=0,-1
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence


def _items(axes: Mapping[str, Any] | None) -> list[str]:
    return [f"{key}={value}" for key, value in (axes or {}).items()]


def expand_arms(params: Mapping[str, Any] | None, arms: Mapping[str, Mapping[str, Any] | None],
                arguments: Sequence[str], config_loader=None) -> list[list[str]]:
    """One override list per job: for each arm (in order; a null arm is left out) the Cartesian product of the
    shared axes, its own and the command line's, later ones replacing earlier ones key by key."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create(config_loader=config_loader)
    jobs: list[list[str]] = []
    for name, axes in arms.items():
        if axes is None:
            continue
        overrides = parser.parse_overrides(_items(params) + _items(axes) + list(arguments))
        jobs += [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    if not jobs:
        raise ValueError("the sweep has no arm left to run (hydra.sweeper.arms is empty or every arm is null)")
    return jobs


def sweep_axes(config: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A composed config's ``hydra.sweeper.params`` and ``hydra.sweeper.arms`` as plain containers ({} and None when
    unset), the inputs of ``sweep_overrides``."""
    from omegaconf import OmegaConf

    params = OmegaConf.select(config, "hydra.sweeper.params")
    arms = OmegaConf.select(config, "hydra.sweeper.arms")
    return (OmegaConf.to_container(params) if params else {}), (OmegaConf.to_container(arms) if arms else None)


def sweep_overrides(params: Mapping[str, Any] | None, arms: Mapping[str, Mapping[str, Any] | None] | None,
                    arguments: Sequence[str]) -> list[list[str]]:
    """One override list per job of a sweep: the arms' union of grids when ``arms`` is set (``expand_arms``), else
    Hydra's one Cartesian product of ``params`` and the command line's ``arguments`` (the command line winning)."""
    if arms:
        return expand_arms(params, arms, arguments)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(_items(params) + list(arguments))
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the jobs of the sweep the overrides describe, one line each, after composing and validating every one;
    exit 2 naming the first job that does not compose or validate."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from repo_exp.config import ConfigError, compose_config, validate

    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in args):
        print("usage: python -m repo_exp.sweeps OVERRIDES...  (the overrides of python -m repo_exp -m, without -m)",
              file=sys.stderr)
        return 2
    fixed = [o.input_line for o in OverridesParser.create().parse_overrides(args) if not o.is_sweep_override()]
    config = compose_config(fixed, return_hydra_config=True)  # the sweep's own settings: its params, arms, folder
    jobs = sweep_overrides(*sweep_axes(config), args)
    for i, job in enumerate(jobs):
        try:
            validate(compose_config(job))
        except (ConfigError, ValueError, HydraException, OmegaConfBaseException) as exc:
            print(f"job {i}: {' '.join(job)}: {exc}", file=sys.stderr)
            return 2
    where = OmegaConf.select(config, "hydra.sweep.dir", throw_on_missing=False)
    print(f"{len(jobs)} jobs, each composed and valid; they would run into {where}:")
    for job in jobs:
        print("  " + " ".join(job))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
