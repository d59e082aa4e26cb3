# fieldlens: every target sets itself up (virtualenv, packages, generated code) idempotently.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
DATA ?= ../shared/data/tiny-imagenet

.PHONY: setup demo up down status learn-eval test test-fast train train-smoke calibrate lint check clean

include mk/proto.mk
include mk/deploy.mk
include mk/bench.mk

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP) proto deploy-tools

demo: setup  ## start the local cluster, index the gallery if empty, classify sample photos
	$(VENV)/bin/fieldlens demo --data $(DATA)

up: setup
	$(VENV)/bin/fieldlens up

learn-eval: setup  ## recall of the held-out classes learned from 5 photos each (throwaway cluster)
	$(VENV)/bin/fieldlens learn-eval --data $(DATA)

down:
	@if [ -x $(VENV)/bin/fieldlens ]; then $(VENV)/bin/fieldlens down; fi

status: setup
	$(VENV)/bin/fieldlens status

test: setup  ## unit, integration (real tritonserver, redis-server, Qdrant) and end-to-end tests
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q tests/unit

train: setup  ## reproduce the shipped model set from the shared shards (<= 90 min on 2 cores with bf16 kernels)
	FIELDLENS_DATA_DIR=$(DATA) $(PY) -m fieldlens.trainer.train --profile full

calibrate: setup  ## refit the shipped set's calibration: stated probabilities, default threshold, learned-class bias (make train runs it last)
	$(PY) -m fieldlens.trainer.calibrate --data $(DATA)

train-smoke: setup
	FIELDLENS_DATA_DIR=$(DATA) $(PY) -m fieldlens.trainer.train --profile smoke \
		--work-dir build/smoke/train --models-dir build/smoke/models \
		--model-repository build/smoke/model_repository

lint: setup
	$(PY) -m ruff check services tests scripts

check: lint proto-check test

clean:
	rm -rf build .run bench/results
