# lightning_sae — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, on its own: an unpinned torch from the registry brings several GB of
# CUDA packages. With no NVIDIA GPU, pin the CPU build (TORCH_PIP_ARGS can add e.g. an index URL).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
CONFIG ?= configs/quickstart.yaml

.DEFAULT_GOAL := help
.PHONY: help install quickstart test tensorboard smollm2-data benchmark recipe-quality sweep clean

help: ## Show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/lightning_sae: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch $(TORCH_PIP_ARGS); \
	  else $(BIN)/pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); fi
	$(BIN)/pip install -q -e ".[dev,compat]"
	touch $@

install: $(BIN)/lightning_sae ## Create .venv and install lightning_sae with its test tools and SAELens

data/toy.h5: | $(BIN)/lightning_sae
	$(BIN)/lightning_sae synth --out data/toy.h5

quickstart: $(BIN)/lightning_sae data/toy.h5 ## Train the quickstart SAE on synthetic data (about a minute on 2 CPU cores)
	$(BIN)/lightning_sae fit --config $(CONFIG)

test: $(BIN)/lightning_sae ## Run the test suite (CPU, a few minutes)
	$(BIN)/python -m pytest -q

tensorboard: $(BIN)/lightning_sae ## Watch the runs under logs/
	$(BIN)/tensorboard --logdir logs

smollm2-data: $(BIN)/lightning_sae ## Cache SmolLM2-135M layer-6 activations of real text (see README)
	bash scripts/smollm2_data.sh

benchmark: $(BIN)/lightning_sae ## Loader and training throughput (tokens/s of every recipe vs a plain loop and SAELens) on this machine; tables for docs/benchmarks.md
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/train_throughput.py

recipe-quality: $(BIN)/lightning_sae ## Every recipe vs a plain loop and SAELens on synthetic sets (hours on 2 cores; ARGS="--sets toy-offset" for one); writes docs/recipe_quality.md
	cd benchmarks && ../$(BIN)/python recipe_quality.py $(ARGS)

sweep: $(BIN)/lightning_sae data/toy.h5 ## Fit CONFIG once per VALUES of PARAM, e.g. make sweep PARAM=model.d_sae VALUES="256 512" [ARGS="--overwrite true"]
	@test -n "$(PARAM)" -a -n "$(VALUES)" || { echo "usage: make sweep CONFIG=... PARAM=model.x VALUES=\"a b\""; exit 2; }
	for value in $(VALUES); do \
	  $(BIN)/lightning_sae fit --config $(CONFIG) --$(PARAM) $$value --trainer.logger.init_args.version "$(PARAM)=$$value" $(ARGS) || exit 1; \
	done

clean: ## Remove logs and generated data (keeps .venv)
	rm -rf logs lightning_logs data/*.h5
