"""The documentation: a short README, and a MkDocs site that builds without a warning, whose pages point nowhere a
clone does not have, and whose configuration reference names every key of the schema."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from conftest import repo_root

ROOT = repo_root()
PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_the_readme_is_short_and_leads_to_the_documentation():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for command in ("make run", "make test"):
        assert command in readme
    linked = set(re.findall(r"\]\((docs/[\w-]+\.md)\)", readme))
    assert linked == {f"docs/{p.name}" for p in PAGES if p.name != "index.md"}
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", readme):  # figures a reference regenerates, all committed
        assert re.fullmatch(r"results/[\w-]+/[\w-]+\.png", image) and (ROOT / image).is_file(), image


def test_the_documentation_builds_without_a_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stdout + proc.stderr
    built = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")}
    assert built >= {p.stem for p in PAGES if p.name != "index.md"}


@pytest.mark.parametrize("page", [p.name for p in PAGES] + ["../README.md"])
def test_no_page_points_outside_the_repository(page):
    text = (ROOT / "docs" / page).read_text()
    assert "../shared" not in text and "shared/checks" not in text


def test_the_configuration_reference_names_every_key_of_the_schema():
    from repo_exp import config as schemas

    text = (ROOT / "docs" / "configuration.md").read_text()
    nested = (schemas.ArchConfig, schemas.WorldStageConfig, schemas.SchedulerConfig, schemas.AdamWConfig)

    def keys(prefix: str, cls) -> list[str]:
        out = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if isinstance(default, nested):
                out.append(f"{prefix}{f.name}.*")
            elif dataclasses.is_dataclass(default):
                out += keys(f"{prefix}{f.name}.", type(default))
            elif not (f.name.startswith("_") and prefix.startswith("optimizer.")):
                out.append(f"{prefix}{f.name}")
        return out

    groups = {"model": schemas.ModelConfig, "reward": schemas.ScoreModelConfig, "trainer": schemas.TrainerConfig,
              "ppo": schemas.PPOConfig, "eval": schemas.EvalConfig, "world": schemas.WorldConfig,
              "data": schemas.DataConfig, "ptx": schemas.PtxConfig, "logger": schemas.LoggerConfig,
              "deepspeed": schemas.DeepSpeedConfig, "optimizer": schemas.OptimizerConfig,
              "estimator": schemas.EstimatorConfig, "constraint": schemas.AverageConfig}
    missing = [k for group, cls in groups.items() for k in keys(f"{group}.", cls) if f"`{k}`" not in text]
    missing += [f"constraint.{f.name}" for cls in schemas.CONSTRAINT_SCHEMAS.values()
                for f in dataclasses.fields(cls) if f"`constraint.{f.name}`" not in text]
    missing += [k for cls in schemas.ALGORITHM_SCHEMAS.values() for k in keys("algorithm.", cls) if f"`{k}`" not in text]
    assert not missing, missing
