# magic3d — `make help` lists targets and recipes.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.magic3d-installed

recipe ?= coarse_to_fine
seed ?= 0
profile ?= auto
overrides ?=
# prompt and run are passed only when given, so the recipe's default prompt applies otherwise.
PROMPT_ARG := $(if $(filter command line environment,$(origin prompt)),--prompt "$(prompt)")
RUN_ARG := $(if $(run),--run "$(run)")
# gpus=N: N processes (one per GPU) with DDP; data.batch_size stays the global batch.
GPUS_ARG := $(if $(gpus),trainer.devices=$(gpus) $(if $(filter-out 1,$(gpus)),trainer.strategy=ddp))

.DEFAULT_GOAL := run
.PHONY: run help setup test test-gpu bench notebook clean-cache priors eval

run: $(SETUP_STAMP) ## Run a recipe: make recipe=NAME prompt="..." [seed=N] [run=FOLDER] [profile=cpu|full] [gpus=N] [overrides="key=value ..."]
	$(PY) -m magic3d run $(recipe) $(PROMPT_ARG) --seed $(seed) --profile $(profile) $(RUN_ARG) $(GPUS_ARG) $(overrides)

$(SETUP_STAMP): pyproject.toml scripts/setup.sh
	@bash scripts/setup.sh

setup: $(SETUP_STAMP) ## Create .venv and install magic3d (runs automatically on first use)

test: $(SETUP_STAMP) ## Run the CPU test suite (no GPU, no network)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q

test-gpu: $(SETUP_STAMP) ## Run the tests marked gpu (needs CUDA)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m gpu

bench: $(SETUP_STAMP) ## GPU benchmarks; prints a table and appends it to BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(PY) -m magic3d.bench --fine --append BENCHMARKS.md

notebook: $(SETUP_STAMP) ## Open the notebooks (needs jupyter: pip install jupyterlab)
	$(VENV)/bin/jupyter lab notebooks/

clean-cache: ## Delete cached text embeddings (~/.cache/magic3d)
	rm -rf $${MAGIC3D_CACHE:-$$HOME/.cache/magic3d}

help: ## List targets and recipes
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Recipes (make recipe=NAME):"
	@for f in recipes/*.yaml; do n=$$(basename $$f .yaml); d=$$(grep -m1 '^description:' $$f | sed 's/^description: *//'); printf "  %-20s %s\n" "$$n" "$$d"; done

priors: $(SETUP_STAMP) ## Retrain the embedded priors and evaluator on a GPU (resumable), then grade them: make priors [minutes=8]
	$(PY) -m magic3d.eval train-classifier --out priors/evaluator --minutes 3
	$(PY) -m magic3d.priors train --kind pixel --out priors/pixel --minutes $(or $(minutes),8) --resume
	$(PY) -m magic3d.priors train --kind latent --out priors/latent --minutes $(or $(minutes),8) --resume
	$(PY) -m magic3d.eval prior priors/pixel --update-card
	$(PY) -m magic3d.eval prior priors/latent --update-card

eval: $(SETUP_STAMP) ## Evaluate a run against the toy world: make eval run=runs/<recipe>/<name>
	@test -n "$(run)" || { echo "usage: make eval run=runs/<recipe>/<name>"; exit 2; }
	$(PY) -m magic3d.eval run $(run)
