"""Fixtures shared by unit and end-to-end tests."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from dnsserver import dns_server  # noqa: E402, F401 (a fixture for the tests that need DNS)
from helpers import CAProcess, mint_token, run_meshca, start_ca  # noqa: E402
from redisserver import redis_server_fixture  # noqa: E402, F401 (the opaque-TCP tests' Redis)

try:
    from hypothesis import settings
except ImportError:  # only the fuzz tests need it; they say so when it is missing
    settings = None
if settings is not None:
    # Fuzz tests (test_fuzz_*.py) stay bounded so that `make test` stays fast: 200 examples
    # each, no per-example deadline (the machine may be busy), nothing written to the
    # checkout; a failure prints the smallest example found and how to reproduce it.
    # HYPOTHESIS_PROFILE=thorough searches longer, for a fuzzing session by hand.
    settings.register_profile("bounded", max_examples=200, deadline=None, database=None)
    settings.register_profile("thorough", max_examples=20_000, deadline=None, database=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bounded"))


@pytest.fixture
def ca_home(tmp_path: Path) -> Path:
    """A CA initialised with the real `meshca init`."""
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    return home


@pytest.fixture
def ca(ca_home: Path) -> Iterator[CAProcess]:
    """A running `meshca serve` on a free loopback port, stopped after the test."""
    proc = start_ca(ca_home)
    try:
        yield proc
    finally:
        proc.stop()


BACKEND = "spiffe://cluster.local/ns/default/sa/backend"
FRONTEND = "spiffe://cluster.local/ns/default/sa/frontend"


class Mesh:
    """CA, backend echo app behind its sidecar, frontend sidecar with backend as a service."""

    def __init__(
        self, root: Path, ca_args: tuple[str, ...] = (), inbound_extra=None, ca_extra=None
    ):
        self.root = root
        self.procs = []
        try:  # a failed start-up stops what it started (no fixture teardown runs then)
            self._start(root, ca_args, inbound_extra, ca_extra)
        except BaseException:
            self.stop()
            raise

    def _start(self, root: Path, ca_args: tuple[str, ...], inbound_extra, ca_extra) -> None:
        from mesh import hostport, sidecar_config, start_echo, start_sidecar

        home = root / "ca"
        run_meshca("init", "--home", str(home))
        self.ca = start_ca(home, *ca_args)
        self.procs.append(self.ca)
        self.app_log = root / "app.log"
        self.app = start_echo(self.app_log)
        self.procs.append(self.app)
        self.backend = start_sidecar(
            sidecar_config(
                root,
                "backend",
                self.ca,
                BACKEND,
                app=hostport(self.app.urls["echo"]),
                inbound_extra=inbound_extra,
                ca_extra=ca_extra,
                # A DNS SAN (a Kubernetes Service name) lets curl --cacert check the host name.
                token=mint_token(home, BACKEND, dns=("backend.default.svc",)),
            )
        )
        self.procs.append(self.backend)
        self.inbound = hostport(self.backend.urls["inbound"])
        self.frontend = start_sidecar(
            sidecar_config(
                root,
                "frontend",
                self.ca,
                FRONTEND,
                ca_extra=ca_extra,
                services={
                    "backend.default": {"endpoints": [self.inbound], "identity": BACKEND},
                    "impostor.default": {
                        "endpoints": [self.inbound],
                        "identity": "spiffe://cluster.local/ns/default/sa/db",
                    },
                },
            )
        )
        self.procs.append(self.frontend)

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[Mesh]:
    """A running two-sidecar mesh shared by the tests of one module."""
    m = Mesh(tmp_path_factory.mktemp("mesh"))
    try:
        yield m
    finally:
        m.stop()
