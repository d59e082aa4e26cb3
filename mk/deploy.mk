# Kubernetes manifests and observability checks (included by the top-level Makefile).
# Nothing is applied: overlays are rendered and validated against the Kubernetes schemas,
# the PrometheusRule is checked and unit-tested with promtool, and tests/deploy/ checks the
# rules' and dashboard's metrics against a live local cluster scraped by a real Prometheus.

PY ?= .venv/bin/python
DEPLOY_K8S := deploy/k8s
DEPLOY_OVERLAYS := cpu gpu

.PHONY: deploy-tools deploy-check deploy-render deploy-pin-model-set

# Idempotent: installs only what is missing (the Python packages come from pyproject's dev extra). promtool and prometheus come from Debian's
# prometheus package (the end-to-end test runs the real server); kubectl, with its built-in
# kustomize, must already be on the machine.
deploy-tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
		sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing prometheus (promtool) from Debian"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends prometheus; }
	@command -v kubectl >/dev/null 2>&1 || { \
		echo "kubectl (with kustomize) is missing; install it from your Kubernetes vendor" >&2; exit 1; }

# Render every overlay into build/k8s/<overlay>.yaml.
deploy-render: deploy-tools
	@mkdir -p build/k8s
	@for o in $(DEPLOY_OVERLAYS); do \
		kubectl kustomize $(DEPLOY_K8S)/overlays/$$o > build/k8s/$$o.yaml || exit 1; \
		echo "rendered build/k8s/$$o.yaml"; \
	done

# Render + schema validation + promtool check/test (tests/deploy without the live-cluster
# checks, which `make test` runs).
deploy-check: setup deploy-tools deploy-render
	$(PY) deploy/k8s/pin_model_set.py --check
	$(PY) -m pytest -q -m "not e2e" tests/deploy

# After `make train`: point the manifests at the new model set.
deploy-pin-model-set:
	$(PY) deploy/k8s/pin_model_set.py
