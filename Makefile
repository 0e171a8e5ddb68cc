# spiffe-sidecar: `make test` and `make demo` are the two commands a fresh machine needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install proto services lint test unit demo bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever the project's metadata changes.
$(INSTALLED): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --editable '.[test]'
	touch $@

install: $(INSTALLED) ## create .venv and install the project with its test tools

proto: $(INSTALLED) ## regenerate spiffeproto/ if a .proto changed
	$(PY) proto/generate.py

lint: proto ## ruff, mypy --strict and the import-linter contracts
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The store's tests run against PostgreSQL on 127.0.0.1:5432 as well as SQLite; the proxy's
# PROXY-protocol tests talk to a real HAProxy and its TLS scan runs sslscan; bench/proxy.py runs
# HAProxy and stunnel4 next to spiffe-proxy and Envoy (Debian's packages).
services: ## start the local PostgreSQL if it is not running, install HAProxy, sslscan and stunnel4 if missing
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
	  command -v pg_ctlcluster >/dev/null || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 1; }; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start && \
	  for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
	  pg_isready -h 127.0.0.1 -p 5432; }
	@missing=$$(for tool in haproxy sslscan stunnel4; do command -v $$tool >/dev/null || echo $$tool; done); [ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }

unit: proto services ## the test suite alone
	$(PY) -m pytest $(PYTEST_ARGS)

test: lint unit ## lint, types, import contracts and the whole test suite

# demo/run.py takes --duration SECONDS, --keep, --quiet, --pause SECONDS: make demo DEMO_ARGS=--keep
DEMO_ARGS ?=

demo: $(INSTALLED) ## run the whole system on this machine, narrated (control plane, agent, Envoy sidecars, a legacy service behind spiffe-proxy); Ctrl-C stops it
	$(PY) -m demo $(DEMO_ARGS)

bench: $(INSTALLED) services ## the benchmarks in bench/ (each prints a table against its peers)
	$(PY) bench/verify.py
	$(PY) bench/proxy_relay.py
	$(PY) bench/proxy.py
	$(PY) bench/frontdoor.py
	$(PY) bench/controlplane.py
	$(PY) bench/agent.py
	$(PY) bench/sds.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build *.egg-info
