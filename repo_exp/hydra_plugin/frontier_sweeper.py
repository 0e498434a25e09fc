"""``hydra/sweeper=frontier``: the basic sweeper over a union of grids (``repo_exp.sweeps.expand_arms``)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class FrontierSweeper(BasicSweeper):
    """Runs every arm's grid (``arms``: name → axes), each crossed with the shared axes (``params``) and the command
    line; batches, validation and launching are the basic sweeper's."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Mapping[str, str]] = None,
                 arms: Optional[Mapping[str, Optional[Mapping[str, Any]]]] = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=dict(params or {}))
        self.arms = {name: (dict(axes) if axes is not None else None) for name, axes in (arms or {}).items()}

    def sweep(self, arguments: list[str]) -> Any:
        from repo_exp.sweeps import expand_arms

        jobs = expand_arms(self.params, self.arms, arguments, self.hydra_context.config_loader)
        batches = (list(self.split_overrides_to_chunks(jobs, self.max_batch_size)) if self.max_batch_size
                   else [jobs])
        # the basic sweeper's loop, over the jobs expanded here instead of one Cartesian product
        self.params, original = {}, self.params
        try:
            self.split_arguments = lambda overrides, max_batch_size: batches  # type: ignore[method-assign]
            return super().sweep([])
        finally:
            self.params = original


def config_node() -> dict[str, Any]:
    return {"_target_": f"{FrontierSweeper.__module__}.FrontierSweeper", "max_batch_size": None, "params": {},
            "arms": {}}
