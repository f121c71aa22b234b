# tiny-cats — every README command is a target here. `make help` lists them.
# On a fresh machine `make local-smoke` and `make test` are all the set-up: both install first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make ... PY=/some/python` runs with that interpreter as it is: no venv is built or changed (the tests run
# `make local-smoke` this way, and an install would repoint the editable package at their checkout).
SETUP := $(if $(filter command line,$(origin PY)),,install)
RUFF := $(dir $(PY))ruff
LINTED := models scripts tests modal_app.py

DATA ?= data/cats
PER_CLASS ?= 200
SIZE ?= 64
CKPT ?= checkpoints
# The DiT run that `make train-dit` writes and `make sample verify export` read; DIT_RUN=dit reads the weights of
# `python scripts/train_dit.py` with its default run name, which it also leaves at $(CKPT)/tinydit_final.safetensors.
DIT_RUN ?= dit-local
DIT = $(CKPT)/$(DIT_RUN)/tinydit_final.safetensors
STEPS ?= 300000

.DEFAULT_GOAL := help
SMOKE_DATA ?= data/toy-smoke
QUALITY_DATA ?= data/quality
QUALITY_OUT ?= checkpoints/quality
# The CPU recipe of `make quality` (README "make quality"): TinyDiT T/4 at 32 px, QUALITY_STEPS steps of batch 64 per
# data set (~8 min each on 2 cores), then what each data set needs, by flag: toy cats take flips (a mirrored cat is a
# cat) and mild guidance (CFG 2.5: far closer to real than CFG 4 at full fidelity; at CFG 2 the samples sat nearer
# the training images than held-out images do); toy glyphs take no augmentation at all (a mirrored b is a d), a
# higher LR and CFG 4. The measurements behind each choice are in the README.
QUALITY_STEPS ?= 3000
QUALITY_DIT = --model T/4 --image-size 32 --steps $(QUALITY_STEPS) --batch-size 64 --warmup-steps 100 \
	--ema-decay 0.998 --mixed-precision auto --save-interval 1000 --sample-interval 1000 --sample-steps 20
QUALITY_SAMPLING = --num-per-class 50 --steps 20
QUALITY_cats_DIT ?= --lr 1e-3 --augmentation-level basic
QUALITY_cats_CLASSIFIER ?= --augmentation-level medium
QUALITY_cats_SAMPLING ?= --cfg-scale 2.5
QUALITY_glyphs_DIT ?= --lr 3e-3 --augmentation-level none
QUALITY_glyphs_CLASSIFIER ?= --augmentation-level none
QUALITY_glyphs_SAMPLING ?= --cfg-scale 4
.PHONY: help install test lint data train train-dit sample verify export local-smoke quality quality-cats \
	quality-glyphs bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 18

install: $(STAMP) ## build .venv from requirements*.txt (re-runs only when they change)

$(STAMP): requirements.txt requirements-train.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

test: lint ## the style check, then the whole test suite (what CI runs)
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(SETUP) ## one style: ruff format --check (the formatter's layout) and ruff check (the lint rules)
	$(RUFF) format --check $(LINTED)
	$(RUFF) check $(LINTED)

data: $(SETUP) ## generate the built-in toy-cats data set into $(DATA)
	$(PY) scripts/make_toy_cats.py --out $(DATA) --per-class $(PER_CLASS) --size $(SIZE)

train: $(SETUP) ## train the classifier on $(DATA) from scratch (CPU-friendly; ~99% val acc on toy cats)
	test -d $(DATA) || $(MAKE) data
	$(PY) scripts/train.py $(DATA) --no-pretrained --epochs 6 --lr 2e-3 --output $(CKPT)/cats_model.safetensors

train-dit: $(SETUP) ## a short TinyDiT run on $(DATA) at 32 px that learns on a CPU (T/4, flow, lr 1e-3)
	test -d $(DATA) || $(MAKE) data
	$(PY) scripts/train_dit.py $(DATA) --model T/4 --image-size 32 --steps 2000 --batch-size 64 --lr 1e-3 \
		--warmup-steps 100 --save-interval 500 --sample-interval 500 --run-name $(DIT_RUN) --output-dir $(CKPT)

sample: $(SETUP) ## sample a grid (one row per class) from the DiT run $(DIT_RUN)
	$(PY) scripts/sample.py --checkpoint $(DIT) --num 8 --out $(CKPT)/samples.png

verify: $(SETUP) ## verify the DiT run $(DIT_RUN)'s and the classifier's weights (report + sample grid)
	$(PY) scripts/verify_checkpoint.py --checkpoint $(DIT)
	$(PY) scripts/verify_checkpoint.py --checkpoint $(CKPT)/cats_model.safetensors

export: $(SETUP) ## export the DiT run $(DIT_RUN)'s and the classifier's weights to ONNX, checked against PyTorch
	$(PY) scripts/export_dit_onnx.py --checkpoint $(DIT) \
		--output $(CKPT)/tinydit.onnx --verify --test
	$(PY) scripts/export_onnx.py --checkpoint $(CKPT)/cats_model.safetensors --output $(CKPT)/cats_model.onnx \
		--verify --images $(DATA)

local-smoke: $(SETUP) ## the whole chain offline on toy cats: data, classifier, DiT, sample, verify, export
	rm -rf $(CKPT)/smoke-classifier $(CKPT)/smoke-dit
	$(PY) scripts/make_toy_cats.py --out $(SMOKE_DATA) --per-class 40 --size 32 --seed 0
	$(PY) scripts/train.py $(SMOKE_DATA) --no-pretrained --epochs 2 --batch-size 16 --lr 2e-3 --image-size 32 \
		--run-name smoke-classifier --output-dir $(CKPT) --output $(CKPT)/cats_model.safetensors --device cpu
	$(PY) scripts/predict.py --checkpoint $(CKPT)/cats_model.safetensors $(SMOKE_DATA)/siamese/siamese_00000.png
	$(PY) scripts/train_dit.py $(SMOKE_DATA) --model T/4 --image-size 32 --steps 60 --batch-size 32 --lr 1e-3 \
		--warmup-steps 10 --save-interval 30 --sample-interval 60 --sample-steps 10 \
		--run-name smoke-dit --output-dir $(CKPT) --device cpu
	$(PY) scripts/sample.py --checkpoint $(CKPT)/smoke-dit/tinydit_final.safetensors --steps 10 --num 4 \
		--out $(CKPT)/smoke-dit/sample_grid.png --device cpu
	$(MAKE) --no-print-directory verify export DATA=$(SMOKE_DATA) DIT_RUN=smoke-dit
	@echo; echo "local-smoke finished. Outputs:"
	@ls -1 $(CKPT)/cats_model.safetensors $(CKPT)/smoke-dit/tinydit_final.safetensors $(CKPT)/*.onnx $(CKPT)/*.json \
		$(CKPT)/*.png $(CKPT)/smoke-dit/sample_grid.png $(CKPT)/smoke-dit/training.log \
		$(CKPT)/smoke-classifier/training.log

# $(call quality_set,NAME): one built-in data set (scripts/make_toy_NAME.py) end to end: training images (seed 0)
# and held-out images (seed 1, never seen by the DiT), its own judge classifier, the DiT, and evaluate.py's report in
# $(QUALITY_OUT)/NAME/report.json, each step with the data set's own QUALITY_NAME_* flags.
define quality_set
	rm -rf $(QUALITY_OUT)/$(1)
	$(PY) scripts/make_toy_$(1).py --out $(QUALITY_DATA)/$(1)/train --per-class 200 --size 32 --seed 0
	$(PY) scripts/make_toy_$(1).py --out $(QUALITY_DATA)/$(1)/heldout --per-class 50 --size 32 --seed 1
	$(PY) scripts/train.py $(QUALITY_DATA)/$(1)/train --no-pretrained --image-size 32 --epochs 8 --batch-size 64 \
		--lr 2e-3 $(QUALITY_$(1)_CLASSIFIER) --output $(QUALITY_OUT)/$(1)/classifier.safetensors \
		--output-dir $(QUALITY_OUT)/$(1) --run-name classifier
	$(PY) scripts/train_dit.py $(QUALITY_DATA)/$(1)/train $(QUALITY_DIT) $(QUALITY_$(1)_DIT) \
		--output-dir $(QUALITY_OUT)/$(1) --run-name dit
	$(PY) scripts/evaluate.py --dit $(QUALITY_OUT)/$(1)/tinydit_final.safetensors \
		--classifier $(QUALITY_OUT)/$(1)/classifier.safetensors --data $(QUALITY_DATA)/$(1)/train \
		--heldout-data $(QUALITY_DATA)/$(1)/heldout $(QUALITY_SAMPLING) $(QUALITY_$(1)_SAMPLING) \
		--out $(QUALITY_OUT)/$(1)/report.json --grid $(QUALITY_OUT)/$(1)/grid.png
endef

quality-cats: $(SETUP) ## toy cats only: data, judge classifier, CPU-recipe DiT, evaluate (~10 min on 2 cores)
	$(call quality_set,cats)

quality-glyphs: $(SETUP) ## toy glyphs only (orientation is the class: no flips anywhere) (~10 min on 2 cores)
	$(call quality_set,glyphs)

quality: quality-cats quality-glyphs ## CPU quality check on both built-in data sets + one summary (~21 min on 2 cores)
	$(PY) scripts/evaluate.py --summarize $(QUALITY_OUT)/cats/report.json $(QUALITY_OUT)/glyphs/report.json \
		--out $(QUALITY_OUT)/summary.json

bench: $(SETUP) ## speed report (JSON): the CPU suite on a CPU, the GPU suite (S/4, S/2: trainer vs bare loop) on CUDA
	$(PY) scripts/benchmark.py --out $(CKPT)/bench.json

.PHONY: modal-check modal-data modal-upload modal-train modal-dit modal-status modal-download
# --- Modal (modal_app.py) ----------------------------------------------------------------------------------
# Variables: STEPS, BATCH, ACCUM, AUG, GPU (empty = each entrypoint's default: T4 classifier, A10G DiT), TRACKER
# (none, tensorboard, wandb), DETACH (1: the run goes on when this terminal closes; 0: closing it stops the run),
# MODAL_DATA (data set name on the volume), RUN (run name), EPOCHS, CLS_BATCH. MODAL_PROFILE picks a profile.
MODAL := $(VENV)/bin/modal
BATCH ?= 256
ACCUM ?= 1
AUG ?= full
GPU ?=
TRACKER ?= none
DETACH ?= 1
MODAL_DATA ?= cats
RUN ?=
EPOCHS ?= 20
CLS_BATCH ?= 64
MODAL_GPU_FLAG = $(if $(GPU),--gpu $(GPU))
MODAL_RUN_FLAG = $(if $(RUN),--run-name $(RUN))
MODAL_DETACH_FLAG = $(if $(filter 1,$(DETACH)),--detach)
NEED_RUN = $(if $(RUN),,$(error RUN=<run name> is required, e.g. make $@ RUN=dit-20261128-213012))

modal-check: $(SETUP) ## Modal: the token works, then GPU (default A10G) starts once: CUDA, device, a bf16 matmul
	$(MODAL) token info
	$(MODAL) run modal_app.py::check $(MODAL_GPU_FLAG)

modal-data: $(SETUP) ## Modal: download Oxford-IIIT Pet on Modal into the data volume (cats, cat-vs-other)
	$(MODAL) run modal_app.py::prepare_data

modal-upload: $(SETUP) ## Modal: upload the local $(DATA) to the data volume as $(MODAL_DATA)
	$(MODAL) run modal_app.py::upload_data --local-dir $(DATA) --name $(MODAL_DATA)

modal-train: $(SETUP) ## Modal: train the classifier, attached (EPOCHS, CLS_BATCH, GPU, MODAL_DATA, RUN)
	$(MODAL) run modal_app.py::classifier --epochs $(EPOCHS) --batch-size $(CLS_BATCH) --data $(MODAL_DATA) \
		$(MODAL_GPU_FLAG) $(MODAL_RUN_FLAG)

modal-dit: $(SETUP) ## Modal: train TinyDiT, detached unless DETACH=0 (STEPS, BATCH, ACCUM, AUG, GPU, TRACKER, RUN)
	$(MODAL) run $(MODAL_DETACH_FLAG) modal_app.py::dit --steps $(STEPS) --batch-size $(BATCH) \
		--gradient-accumulation-steps $(ACCUM) --augmentation-level $(AUG) --report-to $(TRACKER) \
		--data $(MODAL_DATA) $(MODAL_GPU_FLAG) $(MODAL_RUN_FLAG)

modal-status: $(SETUP) ## Modal: where run RUN stands (attempt, step, img/s, ETA); reads the volume, starts nothing
	$(NEED_RUN)
	$(PY) modal_app.py status $(RUN)

modal-download: $(SETUP) ## Modal: copy run RUN to $(CKPT)/RUN/, then verify its weights and export them to ONNX
	$(NEED_RUN)
	$(PY) modal_app.py download $(RUN) --local-dir $(CKPT)

clean: ## remove generated data, caches and run outputs (keeps .venv)
	rm -rf data/cats data/toy* data/quality checkpoints/* .pytest_cache
	touch checkpoints/.gitkeep
