# The two commands of the README: `make demo` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
VENV ?= .venv
# torch and torchvision pinned to the builds this project is tested with; override for another platform,
# e.g. make test TORCH="torch==2.9.1 torchvision==0.24.1"
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup demo test lint format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,demo]"
	touch $@

demo: setup
	$(BIN)/clipforge demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
