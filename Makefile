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
JOBS ?= 1

.DEFAULT_GOAL := help
.PHONY: help install quickstart test tensorboard smollm2-data benchmark recipe-quality grid report clean

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

recipe-quality: $(BIN)/lightning_sae ## Every recipe vs a plain loop and SAELens on synthetic sets (hours on 2 cores; ARGS="--sets toy-offset" for one, ARGS=--resume to skip what docs/recipe_quality.json holds); writes docs/recipe_quality.md
	cd benchmarks && ../$(BIN)/python recipe_quality.py $(ARGS)

grid: $(BIN)/lightning_sae ## Train every point of a grid file, resumably: make grid GRID=grids/recipes.yaml [DATA=x.h5] [JOBS=n] [OUT=dir]
	@test -n "$(GRID)" || { echo "usage: make grid GRID=grids/X.yaml [DATA=file.h5] [JOBS=n] [OUT=dir]"; exit 2; }
	$(BIN)/lightning_sae grid --grid "$(GRID)" --jobs $(JOBS) $(if $(DATA),--data "$(DATA)") $(if $(OUT),--out "$(OUT)")

report: $(BIN)/lightning_sae ## Table (results.csv, report.md) and plots of a grid's runs: make report GRID=grids/recipes.yaml [OUT=dir]
	@test -n "$(GRID)$(OUT)" || { echo "usage: make report GRID=grids/X.yaml [OUT=dir]"; exit 2; }
	$(BIN)/lightning_sae report $(if $(GRID),--grid "$(GRID)") $(if $(OUT),--run_dir "$(OUT)")

clean: ## Remove logs and generated data (keeps .venv)
	rm -rf logs lightning_logs data/*.h5
