# Two entry points for a fresh machine (Python 3.10+):
#   make run    set up .venv and run the whole pipeline (dvc repro)
#   make test   set up .venv and run the tests
# Set-up runs once: it is redone only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lorapipe-installed
# The CPU build of torch for machines without an NVIDIA GPU. Override for your platform,
# e.g. make setup TORCH_CPU="torch==2.13.0 --index-url <your CPU wheel index>".
TORCH_CPU ?= torch==2.13.0

# Stages run `python -m stages.X` through dvc: put the venv first so they get its Python.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA"; \
		$(BIN)/python -m pip install torch; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch ($(TORCH_CPU))"; \
		$(BIN)/python -m pip install $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install -e '.[test]'
	@touch $@

run: setup
	dvc repro

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/preprocess.py

clean:
	rm -rf $(VENV) reports data/processed data/cache models dvclive logs samples
