# tiny-cats — every README command is a target here. `make help` lists them.
# On a fresh machine `make local-smoke` and `make test` are all the set-up: both install first.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA ?= data/cats
PER_CLASS ?= 200
SIZE ?= 64
CKPT ?= checkpoints
STEPS ?= 300000

.DEFAULT_GOAL := help
.PHONY: help install test lint data train train-dit sample verify export local-smoke quality bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1\t\2/' | expand -t 18

install: $(STAMP) ## build .venv from requirements*.txt (re-runs only when they change)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

test: install ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q

lint: install ## ruff over the code
	$(VENV)/bin/ruff check models scripts tests modal_app.py

data: install ## generate the built-in toy-cats data set into $(DATA)
	$(PY) scripts/make_toy_cats.py --out $(DATA) --per-class $(PER_CLASS) --size $(SIZE)

clean: ## remove generated data, caches and run outputs (keeps .venv)
	rm -rf data/cats data/toy* checkpoints/* .pytest_cache
	touch checkpoints/.gitkeep
