# meshca + sidecar. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all deps venv test test-unit test-e2e demo demo-pods lint bench bench-deps bench-ca bench-sidecar bench-protocols bench-peers bench-peers-deps bench-path soak k8s-demo clean

all: test

# Debian tools the tests and the demos use: real clients (openssl, curl), a DNS server for
# the discovery test (dnsmasq-base: the binary, without the system service), promtool (in
# prometheus) to lint the metrics pages and, for the pod tests, network namespaces and
# iptables, redis-server (with redis-cli) for the opaque-TCP test, and postgresql for the
# CA's store on PostgreSQL (installed only when missing). The tests run initdb and postgres
# themselves (tests/pgserver.py), so no `main` cluster is created: the package would otherwise
# make one and start it as a service on port 5432 (createcluster.conf(5), create_main_cluster).
deps:
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v dnsmasq >/dev/null || missing="$$missing dnsmasq-base"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v iptables >/dev/null || missing="$$missing iptables"; \
	command -v setpriv >/dev/null || missing="$$missing util-linux"; \
	command -v cc >/dev/null || missing="$$missing gcc libc6-dev"; \
	$(PYTHON) -c 'import os, sys, sysconfig; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || missing="$$missing python3-dev"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  case "$$missing" in *postgresql*) mkdir -p /etc/postgresql-common/createcluster.d && \
	    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/meshca-tests.conf;; \
	  esac; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The request path compiled with mypyc (sidecar/compiled.py): rebuilt when a source of it
# changed, skipped (the sidecar runs as plain Python) without a C compiler.
venv: $(STAMP)
	@$(BIN)/python -m sidecar.mypycbuild

test: deps venv
	$(BIN)/python -m pytest -q

test-unit: venv
	$(BIN)/python -m pytest -q tests/meshca tests/sidecar

test-e2e: deps venv
	$(BIN)/python -m pytest -q tests/e2e

demo: deps venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash deploy/local/demo.sh

# Pods on one machine (network namespaces; needs root).
demo-pods: deps venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python deploy/local/podmesh.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# ApacheBench drives the sidecar benchmark, h2load (nghttp2-client) the gRPC one
# (installed only when missing).
bench-deps:
	@missing=""; \
	command -v ab >/dev/null || missing="$$missing apache2-utils"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench: bench-sidecar bench-protocols

bench-sidecar: deps bench-deps venv
	$(BIN)/python bench/bench_sidecar.py

# gRPC unary calls and opaque TCP through both sidecars against the app directly.
bench-protocols: deps bench-deps venv
	$(BIN)/python bench/bench_protocols.py

bench-ca: deps venv
	$(BIN)/python bench/bench_ca.py

# The sidecar beside HAProxy doing the same work (bench/bench_peers.py): HAProxy (the peer and
# the load generator's TLS shim), nginx-light (the app; the bench starts its own, with its own
# config and prefix, so the package's system service is not used) and wrk (installed only
# when missing). Not part of `bench`: it takes several minutes.
bench-peers-deps:
	@export PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v taskset >/dev/null || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

bench-peers: bench-peers-deps venv
	$(BIN)/python bench/bench_peers.py

# The HTTP/1.1 path's own CPU per request, in process (no sockets, no TLS): what the
# Python work above a byte pipe costs, inbound and outbound.
bench-path: venv
	$(BIN)/python bench/bench_http_path.py

# A bounded soak, not part of `make test`: steady traffic through two sidecars with
# renewals and CA rotations; prints each sidecar's RSS at the start and the end.
SOAK_SECONDS ?= 180
soak: deps venv
	$(BIN)/python tests/soak.py --seconds $(SOAK_SECONDS)

# Regenerate the demo overlay's injected manifests from their plain sources.
k8s-demo: venv
	{ echo "# Generated by: meshca inject -f deploy/k8s/demo/src/workloads.yaml (make k8s-demo). Do not edit."; \
	  $(BIN)/meshca inject -f deploy/k8s/demo/src/workloads.yaml; } > deploy/k8s/demo/workloads.yaml

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
