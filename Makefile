# magic3d — `make help` lists targets and recipes.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.magic3d-installed

# User values reach the program byte for byte. Make would otherwise expand `$` in them
# (`a $HOME cube` -> `a OME cube`) and the shell would then interpret quotes, backticks and
# `$(...)` (a prompt could run a command). So:
#  - $(value v) reads the text as typed, without make's expansion (a function's result is not
#    expanded again, so what `q` returns stays verbatim);
#  - q wraps text in single quotes for bash: inside them nothing is special except `'` itself,
#    written '\'' ; a newline becomes '$'\n'' (bash's ANSI-C quoting) because make would split a
#    recipe line at a raw newline;
#  - unexport: make would otherwise expand command-line variables (running any `$(shell ...)`
#    in them) to put them into every recipe's environment; the program does not read them there.
# An option is passed only when the user gave it, so the CLI's defaults (and, with run=FOLDER,
# the run's stored prompt, seed and recipe) apply otherwise.
define NL


endef
q = '$(subst $(NL),'$$'\n'',$(subst ','\'',$1))'
# $(call opt,--flag,var): `--flag 'value'` when var is set and not empty, else nothing.
opt = $(if $(value $2),$1 $(call q,$(value $2)))
unexport recipe prompt run seed profile gpus overrides subject base name recipes variants prompts seeds baseline

# recipe: as given; else coarse_to_fine for a new run; a continued run (run=FOLDER) keeps its own.
RECIPE_ARG = $(if $(value recipe),$(call q,$(value recipe)),$(if $(value run),,coarse_to_fine))
# gpus=N: N processes (one per GPU) with DDP; data.batch_size stays the global batch.
GPUS_ARG = $(if $(value gpus),$(call q,trainer.devices=$(value gpus)) $(if $(filter-out 1,$(value gpus)),trainer.strategy=ddp))
# overrides="key=value ...": split at whitespace (as before), each word passed verbatim.
OVERRIDES_ARG = $(foreach word,$(value overrides),$(call q,$(word)))

# --- prompt-based editing (issue 11, recipes) ---
# edit="...": the prompt of the recipe's `prompt: edit` stages (make recipe=edit prompt="a red cube"
# edit="a blue cube"); base=RUN: take the stages on the base prompt from that finished run.
unexport edit
EDIT_ARGS = $(call opt,--edit,edit) $(call opt,--base,base)
# --- end prompt-based editing ---

# --- DreamBooth personalisation (issue 12, dreambooth) ---
# subject=FOLDER: photos of the subject for the recipe's personalisation stages
# (make recipe=dreambooth subject=photos/ prompt="a sks duck"); already unexported above.
SUBJECT_ARGS = $(call opt,--subject,subject)
# --- end DreamBooth personalisation ---

.DEFAULT_GOAL := run
.PHONY: run help setup test test-gpu bench bench-priors notebook clean-cache priors eval mutate view ablation

run: $(SETUP_STAMP) ## Run a recipe: make recipe=NAME prompt="..." [edit="..."] [base=RUN] [subject=FOLDER] [seed=N] [run=FOLDER] [profile=cpu|full] [gpus=N] [overrides="key=value ..."]
	$(PY) -m magic3d run $(RECIPE_ARG) $(call opt,--prompt,prompt) $(EDIT_ARGS) $(SUBJECT_ARGS) $(call opt,--seed,seed) $(call opt,--profile,profile) $(call opt,--run,run) $(GPUS_ARG) $(OVERRIDES_ARG)

$(SETUP_STAMP): pyproject.toml scripts/setup.sh
	@bash scripts/setup.sh

setup: $(SETUP_STAMP) ## Create .venv and install magic3d (runs automatically on first use)

test: $(SETUP_STAMP) ## Run the CPU test suite (no GPU, no network)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q

test-gpu: $(SETUP_STAMP) ## Run the tests marked gpu (needs CUDA)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -m gpu

mutate: $(SETUP_STAMP) ## Mutation testing of the core (developer command, ~8 min)
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) scripts/mutate.py

bench: $(SETUP_STAMP) ## GPU benchmarks; prints a table and appends it to BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(PY) -m magic3d.bench --fine --append BENCHMARKS.md

bench-priors: $(SETUP_STAMP) ## Prior-training throughput (images/s) of each phase on a GPU
	HF_HUB_OFFLINE=1 $(PY) -m magic3d.priors bench --variants pixel:unet:256:compile latent:unet:128:compile latent:vae:32:compile

notebook: $(SETUP_STAMP) ## Open the notebooks (needs jupyter: pip install jupyterlab)
	$(VENV)/bin/jupyter lab notebooks/

clean-cache: ## Delete cached text embeddings (~/.cache/magic3d)
	rm -rf $${MAGIC3D_CACHE:-$$HOME/.cache/magic3d}

help: ## List targets and recipes
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "Recipes (make recipe=NAME):"
	@for f in recipes/*.yaml; do n=$$(basename $$f .yaml); d=$$(grep -m1 '^description:' $$f | sed 's/^description: *//'); printf "  %-20s %s\n" "$$n" "$$d"; done

# The default budgets are the shipped priors' (training.json: pixel 6.6 min, latent 9.0 min on an H200).
priors: $(SETUP_STAMP) ## Retrain the embedded priors and evaluator on a GPU (resumable), then grade them: make priors [minutes=M]
	$(PY) -m magic3d.eval train-classifier --out priors/evaluator --minutes 3
	$(PY) -m magic3d.priors train --kind pixel --out priors/pixel --minutes $(or $(minutes),6.6) --resume
	$(PY) -m magic3d.priors train --kind latent --out priors/latent --minutes $(or $(minutes),9.0) --resume
	$(PY) -m magic3d.eval prior priors/pixel --update-card --sweep-guidance 3
	$(PY) -m magic3d.eval prior priors/latent --update-card --sweep-guidance 3

eval: $(SETUP_STAMP) ## Evaluate a run against the toy world: make eval run=runs/<recipe>/<name>
	@test -n $(call q,$(value run)) || { echo "usage: make eval run=runs/<recipe>/<name>"; exit 2; }
	$(PY) -m magic3d.eval run $(call q,$(value run))

view: $(SETUP_STAMP) ## Offline HTML page of a run's meshes (orbit), turntables, metrics: make view run=RUN (or an ablation folder)
	@test -n $(call q,$(value run)) || { echo "usage: make view run=runs/<recipe>/<name> (or runs/ablations/<name>)"; exit 2; }
	$(PY) -m magic3d view $(call q,$(value run))

# --- ablation (issue 11) ---
ablation: $(SETUP_STAMP) ## Variants x prompts x seeds, evaluated (resumable): make ablation [name=NAME] [recipes="a b"] [variants=FILE] [prompts=FILE] [seeds=N] [baseline=V] [overrides="..."]
	$(PY) -m magic3d ablation $(call opt,--name,name) $(call opt,--recipes,recipes) $(call opt,--variants,variants) $(call opt,--prompts,prompts) $(call opt,--seeds,seeds) $(call opt,--baseline,baseline) $(call opt,--profile,profile) $(OVERRIDES_ARG)
# --- end ablation ---
