# Set-up is part of each target: the first run creates .venv and installs sam_hf with its dev extras.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test quality style docs pretrain-base

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python scripts/train.py configs/demo.yaml --overwrite_output_dir

test: $(VENV)/.installed
	$(BIN)/python -m pytest

docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict

quality: $(VENV)/.installed
	$(BIN)/ruff check sam_hf scripts tests
	$(BIN)/ruff format --check sam_hf scripts tests

style: $(VENV)/.installed
	$(BIN)/ruff check --fix sam_hf scripts tests
	$(BIN)/ruff format sam_hf scripts tests

pretrain-base: $(VENV)/.installed
	$(BIN)/python scripts/pretrain_tiny_base.py --output_dir models/tiny-sam-base
