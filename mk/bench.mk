# Benchmarks (included by the top-level Makefile).
# `make bench` starts its own local cluster on free ports, runs the load scenarios and the
# micro-benchmarks (under 10 minutes on 2 CPU cores), stops the cluster and writes
# bench/results/latest.{json,md,png} plus a dated run-*.json. Options go in BENCH_ARGS, e.g.
#   make bench BENCH_ARGS="--compare bench/results/run-20261123T120000Z.json"
#   make bench BENCH_ARGS="--addr 127.0.0.1:50051"      # an already-running cluster (make up)
#   make bench-quick                                      # about a minute, fewer points
#   make bench BENCH_ARGS=--profile   # plus a py-spy profile of the router (profile-router.*)

PY ?= .venv/bin/python
BENCH_OUT ?= bench/results
BENCH_ARGS ?=
BENCH_DATA = $(if $(DATA),--data $(DATA))

.PHONY: bench bench-quick

bench: setup  ## load scenarios, concurrency sweep, micro-benchmarks; results in bench/results/
	$(PY) -m fieldlens.bench --out $(BENCH_OUT) $(BENCH_DATA) $(BENCH_ARGS)

bench-quick: setup
	$(PY) -m fieldlens.bench --quick --out $(BENCH_OUT) $(BENCH_DATA) $(BENCH_ARGS)
