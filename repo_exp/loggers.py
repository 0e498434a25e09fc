"""Where the per-step metric dictionaries go.

``metrics.jsonl`` in the run folder is always written (one JSON object per line, with ``step``) and is the record
of truth. W&B is optional; any failure of it (no network, a bad key, its process dying) becomes one warning and the
run goes on with the local file. Secrets from the environment never reach a logged config.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, NamedTuple, Sequence

log = logging.getLogger(__name__)

# whole-word key names only: `hf_token` and `api_key` are secrets, `max_new_tokens` and `tokenizer` are not
SECRET_KEY = re.compile(r"(^|[_.-])(api[_-]?key|token|secret|password|passwd)$", re.IGNORECASE)
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")
# environment variables whose value is a credential by their name (`MY_API_TOKEN`, `OPENAI_API_KEY`,
# `AWS_SECRET_ACCESS_KEY`, `DB_PASSWORD`); a config value resolved from one (`${oc.env:MY_API_TOKEN}`) is redacted
SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|AUTH|KEY|API_?KEY)(_|$)",
                             re.IGNORECASE)
MIN_SECRET_LENGTH = 4  # shorter values (`1`, `on`) are flags, and redacting them would blank ordinary settings


def environment_secrets() -> set[str]:
    """The values of the environment variables that hold credentials: the known ones and any named like one."""
    return {value for name, value in os.environ.items()
            if (name in SECRET_ENV or SECRET_ENV_NAME.search(name)) and len(value) >= MIN_SECRET_LENGTH}


def scrub(value: Any, secrets: set[str] | None = None) -> Any:
    """A copy of a config tree with secret-looking keys, and every text holding an environment secret's value
    (``environment_secrets``: however it got there, an interpolation from the environment included), replaced."""
    secrets = environment_secrets() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else scrub(v, secrets)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets):
        return "<redacted>"
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlSink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "a", buffering=1)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class WandbSink:
    """A W&B run; every call is guarded, and the first failure turns the sink off with a warning."""

    def __init__(self, project: str, entity: str | None, group: str | None, name: str | None, config: dict,
                 tags: list[str], run_dir: Path, mode: str | None, run_id: str | None, timeout: float = 60.0,
                 job_type: str | None = None, resume_step: int | None = None) -> None:
        """``resume_step``: this run id was used before and the run goes on from that step. W&B rewinds the run there
        (``resume_from``), so that the steps redone after a resume replace the ones logged past the checkpoint
        (a plain resume would drop them as "step less than current step") and its history equals ``metrics.jsonl``."""
        self.run = None
        if run_id and resume_step is not None:
            resume = {"resume_from": f"{run_id}?_step={resume_step}"}
        else:
            resume = {"id": run_id, "resume": "allow" if run_id else None}
        try:
            import wandb

            self.wandb = wandb
            self.run = wandb.init(**resume, job_type=job_type,
                project=project,
                entity=entity,
                group=scrub(group),
                name=scrub(name),
                config=scrub(config),
                tags=scrub(list(tags)),
                dir=str(run_dir),
                mode=mode or os.environ.get("WANDB_MODE") or "online",
                reinit="create_new",
                settings=wandb.Settings(init_timeout=timeout, silent=True),
            )
            # step axes: every row carries the trainer's step as `train/step`; evaluation figures are plotted against
            # the step they evaluated (`eval/step`)
            self.run.define_metric("train/step")
            self.run.define_metric("*", step_metric="train/step")
            self.run.define_metric("eval/step")
            self.run.define_metric("eval/*", step_metric="eval/step")
        except Exception as exc:  # no network, bad key, …
            log.warning("W&B is unavailable (%s: %s); metrics go to metrics.jsonl only", type(exc).__name__, exc)
            self.run = None
            return
        try:  # saying where the run is never stops it
            log.info(where_line(self.run))
        except Exception as exc:
            log.warning("W&B run started; where it is could not be read (%s: %s)", type(exc).__name__, exc)

    def _guard(self, what: str, fn) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as exc:
            log.warning("W&B %s failed (%s: %s); metrics go to metrics.jsonl only", what, type(exc).__name__, exc)
            self.run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {k: _jsonable(v) for k, v in metrics.items()} | {"train/step": step}
        self._guard("log", lambda: self.run.log(row, step=step))

    def log_checkpoint(self, folder: Path, step: int) -> None:
        """The checkpoint folder as a ``model`` artifact of this run, aliased ``latest`` and ``step_N``."""
        def do():
            artifact = self.wandb.Artifact(f"checkpoint-{self.run.id}", type="model", metadata={"step": step})
            artifact.add_dir(str(folder))
            self.run.log_artifact(artifact, aliases=["latest", f"step_{step}"])

        self._guard("artifact", do)

    def log_table(self, key: str, rows: list[dict], step: int) -> None:
        def do():
            columns = list(rows[0]) if rows else []
            table = self.wandb.Table(columns=columns, data=[[_wandb_cell(r[c]) for c in columns] for r in rows])
            self.run.log({key: table}, step=step)

        self._guard("table", do)

    def log_histogram(self, key: str, values: list[float], step: int) -> None:
        self._guard("histogram", lambda: self.run.log({key: self.wandb.Histogram(values)}, step=step))

    def close(self) -> None:
        self._guard("finish", lambda: self.run.finish())


def where_line(run) -> str:
    """Where a W&B run is: its page online; offline (W&B starts silent here), its folder and how to upload it."""
    settings = getattr(run, "settings", None)
    if getattr(run, "offline", False) or getattr(settings, "mode", None) == "offline":
        folder = getattr(settings, "sync_dir", None) or str(Path(getattr(run, "dir", ".")).parent)
        return f"W&B offline: the run is in {folder}; upload it later with `wandb sync {folder}`"
    return (f"W&B run: {getattr(run, 'url', None) or '(no address yet)'} (group {getattr(run, 'group', None) or '-'}, "
            f"name {getattr(run, 'name', None)})")


def sweep_group(sweep_dir: Path) -> str:
    """One W&B group per sweep folder: its path relative to the working folder (``multirun/2026-11-30/12-00-00``: the
    day is kept), or, for a folder elsewhere, its name and a hash of its absolute path."""
    folder = Path(os.path.abspath(sweep_dir))
    cwd = Path.cwd()
    if folder.is_relative_to(cwd) and folder != cwd:
        return str(folder.relative_to(cwd))
    return f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:8]}"


def run_identity(config) -> tuple[str | None, str]:
    """W&B group and name of this job: under ``--multirun`` the group is the sweep folder (``sweep_group``) and the
    name the job's overrides; a single run gets no group and the run folder's name."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:
            group = sweep_group(Path(hc.sweep.dir))
            name = hc.job.override_dirname or f"job{hc.job.num}"
            return group, name
        return None, Path(hc.runtime.output_dir).name
    except ValueError:  # not under Hydra
        return None, "run"


# W&B's folders for artifact staging (tables) and its cache default to ~/.local/share/wandb and ~/.cache/wandb;
# those the user did not set (noted when this module is imported) go inside the run folder, so a run writes nothing
# outside it (its settings folder, ~/.config/wandb, is read, not written, and may hold a self-hosted server's address)
WANDB_DIRS = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache"}
USER_WANDB_DIRS = frozenset(k for k in WANDB_DIRS if os.environ.get(k))


def keep_wandb_files_in(run_dir: Path) -> None:
    for key, sub in WANDB_DIRS.items():
        if key not in USER_WANDB_DIRS:
            os.environ[key] = str(Path(run_dir).resolve() / "wandb" / sub)


def wandb_sink(config, cfg, run_dir: Path, run_id: str | None = None, name_prefix: str = "",
               extra_tags: Sequence[str] = (), job_type: str = "train",
               resume_step: int | None = None) -> WandbSink | None:
    """The W&B run of a job when ``logger=wandb`` (else None): grouped and named by ``run_identity`` unless the
    config names them, with the resolved config ``cfg`` attached; ``resume_step`` rewinds a used run id there."""
    if config.logger.name != "wandb":
        return None
    from omegaconf import OmegaConf

    group, name = run_identity(config)
    keep_wandb_files_in(run_dir)
    return WandbSink(
        project=config.logger.project, entity=config.logger.entity, group=config.logger.group or group,
        name=config.run_name or f"{name_prefix}{name}", config=OmegaConf.to_container(cfg, resolve=True),
        tags=[*config.logger.tags, *extra_tags], run_dir=run_dir, mode=config.logger.mode, run_id=run_id,
        timeout=config.logger.init_timeout, job_type=job_type, resume_step=resume_step,
    )


def _wandb_cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


class MetricsLogger:
    """One namespaced metric dict per step; the logger decides where it goes. Only rank 0 writes."""

    def __init__(self, run_dir: Path, enabled: bool, wandb: WandbSink | None = None) -> None:
        self.enabled = enabled
        self.jsonl = JsonlSink(run_dir / "metrics.jsonl") if enabled else None
        self.wandb = wandb if enabled else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.jsonl:
            self.jsonl.log(metrics, step)
        if self.wandb:
            self.wandb.log(metrics, step)

    def log_table(self, key: str, rows: list[dict], step: int) -> None:
        if self.wandb:
            self.wandb.log_table(key, rows, step)

    def log_histogram(self, key: str, values: list[float], step: int) -> None:
        if self.wandb:
            self.wandb.log_histogram(key, values, step)

    def log_checkpoint(self, folder: Path, step: int) -> None:
        if self.wandb:
            self.wandb.log_checkpoint(folder, step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.close()


class Truncated(NamedTuple):
    """What ``truncate_metrics`` moved aside: complete rows past the step (a resume redoes those steps), and the
    steps of rows cut mid-write (None where even the step is unreadable)."""

    redone: int
    torn: list[int | None]


TORN_STEP = re.compile(r'^\{"step": (-?\d+)[,}]')


def truncate_metrics(path: Path, last_step: int) -> Truncated:
    """Keep the complete rows of ``path`` up to ``last_step``; move later rows (from steps a resume will redo) and
    rows cut mid-write to ``metrics.orphaned.jsonl`` beside it rather than delete them."""
    if not path.is_file():
        return Truncated(0, [])
    keep, orphaned, torn = [], [], []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", -1)
        except ValueError:  # a torn line from a kill: keep it aside
            orphaned.append(line)
            match = TORN_STEP.match(line)
            torn.append(int(match.group(1)) if match else None)
            continue
        (keep if step <= last_step else orphaned).append(line)
    if orphaned:
        with open(path.with_name("metrics.orphaned.jsonl"), "a") as f:
            f.write("\n".join(orphaned) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return Truncated(len(orphaned) - len(torn), torn)
