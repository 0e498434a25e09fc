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
"""

from __future__ import annotations

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
