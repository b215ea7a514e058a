# The two commands of the README:
#   make quickstart   set up, then run the whole pipeline on built-in synthetic data
#   make test         set up, then run the test suite
# Setup makes a virtual environment in .venv (override: make VENV=/path ...).
# TORCH_SPEC pins the local CPU build here; on a GPU machine use e.g. TORCH_SPEC=torch.
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.mtscale-installed

.PHONY: setup quickstart test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/mtscale quickstart --workdir quickstart

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) quickstart
