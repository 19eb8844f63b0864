"""Discovery through a running sidecar: the app keeps calling `http://backend.default/` while
the service's endpoints change under it, and each call is answered by whichever backend the
source names now.

- `endpoints_file`: the file is replaced (written, then renamed over) mid-test: calls move
  from backend A to backend B within a few seconds, with no failed call.
- `dns`: a real DNS server (dnsmasq) on loopback answers for the service name; the record
  changes from 127.0.0.1 to 127.0.0.2 (both loopback, the same port, two backends) and the
  calls follow within the record's TTL.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import yaml
from conftest import BACKEND
from dnsserver import NAME
from mesh import admin_get, app_log, hostport, proxy_get, sidecar_config, start_echo, start_sidecar

pytestmark = pytest.mark.e2e
FRONT = "spiffe://cluster.local/ns/default/sa/web"


def backend(tmp_path: Path, ca, name: str, listen: str | None = None):
    """An echo app (logging to NAME.log) behind its sidecar; optionally on `listen`."""
    app = start_echo(tmp_path / f"{name}.log")
    cfg = sidecar_config(tmp_path, name, ca, BACKEND, app=hostport(app.urls["echo"]))
    if listen is not None:
        doc = yaml.safe_load(cfg.read_text())
        doc["inbound"]["listen"] = listen
        cfg.write_text(yaml.safe_dump(doc))
    try:
        return app, start_sidecar(cfg)
    except BaseException:
        app.stop()
        raise


def answered_by(tmp_path: Path, names: tuple[str, ...]) -> dict[str, int]:
    return {n: len(app_log(tmp_path / f"{n}.log")) for n in names}


def calls_until(frontend, tmp_path: Path, names, want: str, timeout: float) -> list[int]:
    """Call until backend `want` answers; the statuses of every call made."""
    statuses = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = answered_by(tmp_path, names)[want]
        statuses.append(proxy_get(frontend, "http://backend.default/")[0])
        if answered_by(tmp_path, names)[want] > before:
            return statuses
        time.sleep(0.1)
    raise AssertionError(f"no call reached {want} in {timeout:g} s: {frontend.stdout[-2000:]}")


def test_endpoints_file_rewritten_mid_test(ca, tmp_path):
    procs = []
    try:
        for name in ("a", "b"):
            procs += backend(tmp_path, ca, name)
        a_in, b_in = (hostport(p.urls["inbound"]) for p in procs[1::2])
        (tmp_path / "frontend").mkdir()
        eps = tmp_path / "frontend" / "endpoints.yaml"
        eps.write_text(yaml.safe_dump([{"address": a_in, "labels": {"name": "a"}}]))
        services = {"backend.default": {"identity": BACKEND, "endpoints_file": "endpoints.yaml"}}
        frontend = start_sidecar(sidecar_config(tmp_path, "frontend", ca, FRONT, services=services))
        procs.append(frontend)

        statuses = [proxy_get(frontend, "http://backend.default/")[0] for _ in range(5)]
        assert statuses == [200] * 5 and answered_by(tmp_path, ("a", "b")) == {"a": 5, "b": 0}

        new = eps.with_suffix(".new")  # as a controller writes it: a new file, then a rename
        new.write_text(yaml.safe_dump([b_in]))
        os.replace(new, eps)
        statuses = calls_until(frontend, tmp_path, ("a", "b"), "b", timeout=10)
        assert set(statuses) == {200}  # no call failed while the set changed
        before = answered_by(tmp_path, ("a", "b"))
        assert [proxy_get(frontend, "http://backend.default/")[0] for _ in range(5)] == [200] * 5
        after = answered_by(tmp_path, ("a", "b"))
        assert after["a"] == before["a"] and after["b"] == before["b"] + 5

        _, doc = admin_get(frontend, "/endpoints")
        svc = doc["services"]["backend.default"]
        assert [e["address"] for e in svc["endpoints"]] == [b_in]
        assert svc["discovery"]["source"] == "file" and svc["discovery"]["last_error"] is None

        eps.write_text("- {address: [not, an, address]}\n")  # a bad rewrite: the set stays
        time.sleep(2.5)
        assert [proxy_get(frontend, "http://backend.default/")[0] for _ in range(3)] == [200] * 3
        _, doc = admin_get(frontend, "/endpoints")
        svc = doc["services"]["backend.default"]
        assert [e["address"] for e in svc["endpoints"]] == [b_in]
        assert "endpoints.yaml" in svc["discovery"]["last_error"]
    finally:
        for p in reversed(procs):
            p.stop()


def free_port_on(*hosts: str) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
            try:
                for h in hosts[1:]:
                    with socket.socket() as t:
                        t.bind((h, port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free on every address")


def test_dns_record_changed_mid_test(ca, tmp_path, dns_server):
    procs = []
    try:
        port = free_port_on("127.0.0.1", "127.0.0.2")
        procs += backend(tmp_path, ca, "a", f"127.0.0.1:{port}")
        procs += backend(tmp_path, ca, "b", f"127.0.0.2:{port}")
        services = {
            "backend.default": {
                "identity": BACKEND,
                "dns": {"name": NAME, "port": port, "refresh": 30},
            }
        }
        # the sidecar asks the test's DNS server (SIDECAR_DNS_SERVER, set by the fixture)
        assert os.environ["SIDECAR_DNS_SERVER"] == f"127.0.0.1:{dns_server.port}"
        frontend = start_sidecar(sidecar_config(tmp_path, "frontend", ca, FRONT, services=services))
        procs.append(frontend)

        statuses = [proxy_get(frontend, "http://backend.default/")[0] for _ in range(4)]
        assert statuses == [200] * 4 and answered_by(tmp_path, ("a", "b")) == {"a": 4, "b": 0}

        dns_server.reload(f"127.0.0.2 {NAME}\n")
        t0 = time.monotonic()
        statuses = calls_until(frontend, tmp_path, ("a", "b"), "b", timeout=10)
        took = time.monotonic() - t0
        assert set(statuses) == {200}
        assert took < 10  # the TTL (1 s), not the 30 s refresh
        _, doc = admin_get(frontend, "/endpoints")
        svc = doc["services"]["backend.default"]
        assert [e["address"] for e in svc["endpoints"]] == [f"127.0.0.2:{port}"]
        assert svc["discovery"]["source"] == "dns"
    finally:
        for p in reversed(procs):
            p.stop()
