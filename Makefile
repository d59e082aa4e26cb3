# fieldlens: every target sets itself up (virtualenv, packages, generated code) idempotently.
# The interpreter the virtualenv is made from; it must be Python 3.11 (the Triton Python-backend
# stub links libpython3.11). PYTHON=... overrides the search: python3.11, else python3.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# The training shards; FIELDLENS_DATA_DIR in the environment moves them too.
DATA ?= $(or $(FIELDLENS_DATA_DIR),../shared/data/tiny-imagenet)

.PHONY: setup demo up down status learn-eval test test-fast train train-smoke calibrate lint check clean

include mk/proto.mk
include mk/deploy.mk
include mk/bench.mk

$(STAMP): pyproject.toml
	@test -x $(PY) || { \
		$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
			echo "fieldlens needs Python 3.11: $(if $(PYTHON),$(PYTHON) is another version,neither python3.11 nor python3 is on PATH);" \
				"install Python 3.11, or run: make $(or $(MAKECMDGOALS),setup) PYTHON=/path/to/python3.11" >&2; \
			exit 1; }; \
		$(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@rm -f $(VENV)/.installed-*
	@touch $@

# Python 3.11 and the data are all `setup` needs; the targets that run promtool, prometheus or
# kubectl (test, deploy-check, deploy-render) depend on deploy-tools themselves.
setup: $(STAMP) proto

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

# FIELDLENS_REQUIRE_ALL=1: a missing prerequisite (the data, kubectl, promtool) fails the run
# before any test starts, instead of skipping what needs it (tests/conftest.py).
test: setup deploy-tools  ## unit, integration (real tritonserver, redis-server, Qdrant) and end-to-end tests
	FIELDLENS_DATA_DIR="$(DATA)" FIELDLENS_REQUIRE_ALL=1 $(PY) -m pytest -q

test-fast: setup
	FIELDLENS_DATA_DIR="$(DATA)" $(PY) -m pytest -q tests/unit

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
