"""What launches a sweep's jobs, so that a stopped sweep stops launching at once.

A job stopped by a signal leaves the sweep's stop mark (``repo_exp.hydra_job``). From then on no job may start, and
none may have its folder created: Hydra creates a job's folder and writes its ``.hydra/`` files before the task runs,
so a check inside the task would leave a stub folder per remaining job (48 of a 50-job sweep) and keep the sweep
going for as long as it takes to create them.

This is a Hydra plugin package (Hydra instantiates sweepers and launchers only from ``hydra_plugins``; its root,
``repo_exp/_hydra``, joins sys.path in ``repo_exp.hydra_job``):

- ``StoppableSweeper`` (``hydra/sweeper=stoppable``, the default): Hydra's basic sweeper whose batches of jobs end
  once the mark exists (``UntilStopped``). A launcher takes each next job from the batch only when it is about to
  start it, so Hydra's basic launcher (one job after another) starts none after the stop, and joblib dispatches none.
  With ``hydra.sweeper.arms`` its jobs are a union of grids, each arm crossed with the shared axes and the command
  line (``repo_exp.sweeps.expand_arms``): a frontier sweeps each method along its own knob.
- ``JoblibLauncher`` (``hydra/launcher=local``): Hydra's joblib launcher whose workers check the mark before Hydra
  creates the job's folder (``execute_unless_stopped``): joblib hands a job to a worker ahead of time, so a job taken
  before the stop may reach its worker after it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher as HydraJoblibLauncher

from repo_exp.hydra_job import SweepStopped, stop_mark

log = logging.getLogger("repo_exp")


class UntilStopped(list):
    """A batch of jobs (override lists) whose iteration ends once the sweep folder holds the stop mark."""

    def __init__(self, jobs: Sequence[Sequence[str]], sweep_dir: Path) -> None:
        super().__init__(jobs)
        self.sweep_dir = sweep_dir

    def __iter__(self) -> Iterator[Sequence[str]]:
        for index, job in enumerate(super().__iter__()):
            if stop_mark(self.sweep_dir).is_file():
                log.warning("the sweep in %s was stopped: %d of its jobs are not launched", self.sweep_dir,
                            len(self) - index)
                return
            yield job


class StoppableSweeper(BasicSweeper):
    """Hydra's basic sweeper, its batches ending at the sweep's stop mark (``UntilStopped``). With ``arms`` (name →
    that arm's own axes, a null arm left out) its jobs are every arm's grid, each crossed with the shared axes
    (``params``) and the command line, instead of one Cartesian product."""

    def __init__(self, max_batch_size: int | None = None, params: Mapping[str, str] | None = None,
                 arms: Mapping[str, Mapping[str, Any] | None] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=dict(params or {}))
        self.arms = {name: (dict(axes) if axes is not None else None) for name, axes in (arms or {}).items()}

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        return UntilStopped(super().get_job_batch(), Path(str(self.config.hydra.sweep.dir)))

    def sweep(self, arguments: list[str]) -> Any:
        if not self.arms:
            return super().sweep(arguments)
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


def _stopped(overrides: Sequence[str], sweep_dir: Path) -> JobReturn:
    """The return of a job not started because the sweep was stopped: failed, like the jobs ``run_job`` refuses."""
    why = stop_mark(sweep_dir).read_text().strip()
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = SweepStopped(f"not started: the sweep in {sweep_dir} was stopped ({why}); run the same "
                                    f"command with trainer.resume=auto to continue it")
    return ret


def execute_unless_stopped(idx: int, overrides: Sequence[str], hydra_context: Any, config: Any, task_function: Any,
                           singleton_state: Any) -> JobReturn:
    """A joblib worker's job: Hydra's, unless the sweep was stopped, in which case no folder is created."""
    from hydra_plugins.hydra_joblib_launcher import _core

    sweep_dir = Path(str(config.hydra.sweep.dir))
    if stop_mark(sweep_dir).is_file():
        return _stopped(overrides, sweep_dir)
    return _core.execute_job(idx, overrides, hydra_context, config, task_function, singleton_state)


class JoblibLauncher(HydraJoblibLauncher):
    """Hydra's joblib launcher, each job going through ``execute_unless_stopped`` in its worker."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from hydra_plugins.hydra_joblib_launcher import _core

        # Hydra's launch dispatches its module's ``execute_job``: the stop check stands in for it while this sweep
        # launches (joblib pickles the function by name, so the workers run ``execute_unless_stopped`` from here)
        original = _core.execute_job
        _core.execute_job = execute_unless_stopped
        try:
            return _core.launch(launcher=self, job_overrides=job_overrides, initial_job_idx=initial_job_idx)
        finally:
            _core.execute_job = original
