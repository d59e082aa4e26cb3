# Protobuf/gRPC code generation (included by the top-level Makefile).
# The generated package services/fieldlens/v1/ is not committed; `proto` rebuilds it whenever a
# .proto is newer than it, and `proto-check` fails when it has drifted from protos/.

PY ?= .venv/bin/python
PROTO_SRCS := $(wildcard protos/fieldlens/v1/*.proto)
PROTO_OUT := services/fieldlens/v1
# __init__.py is written last by the generator, so it doubles as the up-to-date stamp.
PROTO_STAMP := $(PROTO_OUT)/__init__.py

.PHONY: proto proto-check proto-clean

proto: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRCS) scripts/gen_protos.py
	$(PY) scripts/gen_protos.py

proto-check:
	$(PY) scripts/gen_protos.py --check

proto-clean:
	rm -rf $(PROTO_OUT)
