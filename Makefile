# vfm — `make help` lists the targets. Every target sets itself up: `make pretrain` and `make test`
# work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# what running needs (`pip install -e .`), then the dev tools on top (tests, lint, benchmarks, plots)
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
CKPT ?= outputs/pretrain/default/checkpoints/last.pt
SWEEP ?= multirun/pretrain

.DEFAULT_GOAL := help
.PHONY: help install install-dev data pretrain evaluate visualize test test-fast test-faults golden results report lint bench tensorboard clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  overrides: make pretrain ARGS='method=dino trainer.max_epochs=5'   make evaluate CKPT=path/to/last.pt"

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e .
	touch $(STAMP)

# after `make pretrain` this only adds the [dev] extra
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[dev]'
	touch $(DEV_STAMP)

install: $(STAMP) ## create .venv and install vfm (editable): what pretrain, evaluate and visualize need

install-dev: $(DEV_STAMP) ## install plus the [dev] extra: pytest, ruff, lightly, matplotlib, transformers, submitit

data: $(STAMP) ## obtain Fashion-MNIST (Debian package if present, else download into data/)
	$(BIN)/python scripts/fetch_data.py fashion_mnist

pretrain: data ## pretrain DINO on Fashion-MNIST (the default run; ARGS=... for overrides)
	$(BIN)/pretrain $(ARGS)

evaluate: data ## evaluate a checkpoint (CKPT=..., ARGS=...)
	$(BIN)/evaluate checkpoint=$(CKPT) $(ARGS)

visualize: data ## attention maps and patch PCA of a checkpoint (CKPT=..., ARGS=...)
	$(BIN)/visualize checkpoint=$(CKPT) $(ARGS)

test: $(DEV_STAMP) ## run the test suite (CPU, synthetic data)
	$(BIN)/pytest

test-fast: $(DEV_STAMP) ## the tests without the slow (multi-process) ones
	$(BIN)/pytest -m "not slow"

bench: $(DEV_STAMP) ## throughput, MFU, ablations, lightly side by side and end to end (4-5 min on 2 cores; outputs/bench)
	$(BIN)/python scripts/bench

test-faults: $(DEV_STAMP) ## only the fault tests (kill -9, torn files, NaN on one rank, hangs, sweeps); part of `make test`
	$(BIN)/pytest tests/test_faults.py tests/engine tests/data/test_corrupt_inputs.py tests/test_golden.py tests/test_slurm.py

golden: $(DEV_STAMP) ## rewrite the golden per-step losses after a deliberate change (review the diff!)
	VFM_UPDATE_GOLDEN=1 $(BIN)/pytest tests/test_golden.py
	git diff --stat tests/golden

# the learning curves' PNGs need matplotlib (the [dev] extra); without it every row runs but draws no curve
results: data $(DEV_STAMP) ## every method's CPU recipe and chains -> docs/results.md + README table (hours on 2 cores; resumes; ROWS=dino,eva; QUICK=1)
	$(BIN)/python scripts/results.py $(if $(ROWS),--rows $(ROWS),)

report: $(DEV_STAMP) ## results table + plot of a sweep: make report SWEEP=multirun/pretrain
	$(BIN)/python scripts/collect_results.py $(SWEEP)

lint: $(DEV_STAMP) ## ruff
	$(BIN)/ruff check src tests scripts

tensorboard: $(STAMP) ## serve TensorBoard over outputs/
	$(BIN)/tensorboard --logdir outputs --bind_all

clean: ## remove caches (not runs, not .venv)
	rm -rf .pytest_cache .ruff_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
