# meshca + sidecar. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all deps venv test test-unit test-e2e demo lint bench bench-ca bench-sidecar clean

all: test

# Debian tools the tests and the demo call as real clients (installed only when missing).
deps:
	@missing=""; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

test: deps venv
	$(BIN)/python -m pytest -q

test-unit: venv
	$(BIN)/python -m pytest -q tests/meshca tests/sidecar

test-e2e: deps venv
	$(BIN)/python -m pytest -q tests/e2e

demo: deps venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash deploy/local/demo.sh

lint: venv
	$(BIN)/ruff check .

# ApacheBench drives the sidecar benchmark (installed only when missing).
bench-deps:
	@command -v ab >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq apache2-utils; }

bench: bench-sidecar

bench-sidecar: deps bench-deps venv
	$(BIN)/python bench/bench_sidecar.py

bench-ca: deps venv
	$(BIN)/python bench/bench_ca.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
