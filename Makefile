# Set-up is part of each target: the first run creates .venv and installs sam_hf with its dev extras.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-fast quality style docs pretrain-base

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python scripts/train.py configs/demo.yaml --overwrite_output_dir

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# The quick loop: everything but the end-to-end runs and subprocesses (marked slow).
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow"

docs: $(VENV)/.installed
	$(BIN)/mkdocs build --strict

quality: $(VENV)/.installed
	$(BIN)/ruff check sam_hf scripts tests
	$(BIN)/ruff format --check sam_hf scripts tests
	$(BIN)/lint-imports

style: $(VENV)/.installed
	$(BIN)/ruff check --fix sam_hf scripts tests
	$(BIN)/ruff format sam_hf scripts tests

# The six runs in scripts/pretrain_tiny_base.py's docstring, about two hours on 2 CPU cores.
pretrain-base: $(VENV)/.installed
	$(BIN)/python scripts/pretrain_tiny_base.py --shape blob --patch_size 16 --window_size 4 --output_dir /tmp/stage1
	$(BIN)/python scripts/pretrain_tiny_base.py --shape blob --patch_size 16 --init_from /tmp/stage1 --seed 1 \
		--warmup_steps 50 --output_dir /tmp/stage2
	$(BIN)/python scripts/pretrain_tiny_base.py --patch_size 16 --init_from /tmp/stage2 --seed 2 --lambda_ce 1 \
		--num_train_images 1000 --num_eval_images 32 --max_steps 600 --eval_steps 300 --warmup_steps 50 \
		--output_dir /tmp/stage3
	$(BIN)/python scripts/pretrain_tiny_base.py --patch_size 8 --window_size 8 --init_from /tmp/stage3 --seed 3 \
		--lambda_ce 1 --learning_rate 3e-4 --batch_size 4 --max_objects_per_image 8 --num_train_images 600 \
		--num_eval_images 8 --max_steps 200 --eval_steps 200 --warmup_steps 20 --output_dir /tmp/stage4
	$(BIN)/python scripts/pretrain_tiny_base.py --shape nuclei --patch_size 8 --window_size 8 --init_from /tmp/stage4 \
		--seed 4 --lambda_ce 1 --learning_rate 3e-4 --batch_size 4 --max_objects_per_image 16 --box_jitter 4 \
		--num_train_images 3000 --num_eval_images 16 --max_steps 3000 --eval_steps 750 --warmup_steps 100 \
		--output_dir /tmp/stage5
	$(BIN)/python scripts/pretrain_tiny_base.py --shape nuclei --patch_size 8 --window_size 8 --init_from /tmp/stage5 \
		--seed 5 --lambda_ce 1 --learning_rate 1e-4 --batch_size 4 --max_objects_per_image 16 --box_jitter 0 \
		--num_train_images 800 --num_eval_images 16 --max_steps 600 --eval_steps 300 --save_steps 300 \
		--warmup_steps 30 --output_dir models/tiny-sam-base
