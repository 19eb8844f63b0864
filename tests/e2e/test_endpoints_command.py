"""`sidecar endpoints` and `GET /endpoints`: an operator with `kubectl exec` sees each outbound
service's endpoints, their labels and weights, requests and failures, and which are ejected.

One endpoint is a real backend sidecar; the other is a closed port. Calls succeed (a failed
connect is retried on the good endpoint), the closed one is ejected after its failures, and
both outputs say so.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest import BACKEND
from mesh import admin_get, hostport, proxy_get, sidecar_config, start_echo, start_sidecar

pytestmark = pytest.mark.e2e


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"  # closed once the socket is


def test_endpoints_show_labels_health_and_ejection(ca, tmp_path):
    procs = []
    try:
        echo = start_echo()
        procs.append(echo)
        backend = start_sidecar(
            sidecar_config(tmp_path, "backend", ca, BACKEND, app=hostport(echo.urls["echo"]))
        )
        procs.append(backend)
        good = hostport(backend.urls["inbound"])
        dead = closed_port()
        services = {
            "backend.default": {
                "identity": BACKEND,
                "endpoints": [
                    {"address": good, "labels": {"version": "v1"}, "weight": 2},
                    {"address": dead, "labels": {"version": "v2"}},
                ],
                "lb": "round_robin",
                "retries": {"attempts": 2, "retry_on": ["connect-failure"]},
                "outlier_detection": {"consecutive_errors": 2, "base_ejection_time": 60},
            }
        }
        frontend = start_sidecar(
            sidecar_config(tmp_path, "frontend", ca, "spiffe://cluster.local/ns/default/sa/web",
                           services=services)
        )  # fmt: skip
        procs.append(frontend)

        statuses = [proxy_get(frontend, "http://backend.default/x")[0] for _ in range(12)]
        assert statuses == [200] * 12  # the dead endpoint's connects were retried elsewhere

        status, doc = admin_get(frontend, "/endpoints")
        assert status == 200
        svc = doc["services"]["backend.default"]
        eps = {e["address"]: e for e in svc["endpoints"]}
        assert eps[good]["labels"] == {"version": "v1"} and eps[good]["weight"] == 2
        assert eps[good]["healthy"] and eps[good]["requests"] == 12 and eps[good]["failures"] == 0
        assert not eps[dead]["healthy"] and eps[dead]["ejections"] == 1
        assert 0 < eps[dead]["ejected_for"] <= 60 and eps[dead]["failures"] == 2
        assert svc["lb"] == "round_robin"

        admin = hostport(frontend.urls["admin"])
        cmd = [sys.executable, "-m", "sidecar", "endpoints", "--admin", admin]
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
        lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
        assert "healthy" in lines[good] and "version=v1" in lines[good]
        assert "EJECTED" in lines[dead] and "version=v2" in lines[dead]
        assert text.startswith("backend.default  (lb round_robin")
        out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True).stdout
        assert set(json.loads(out)["services"]) == {"backend.default"}
    finally:
        for p in reversed(procs):
            p.stop()


def test_endpoints_without_outbound_is_a_clear_error(ca, tmp_path):
    echo = start_echo()
    try:
        side = start_sidecar(
            sidecar_config(tmp_path, "b", ca, BACKEND, app=hostport(echo.urls["echo"]))
        )
        try:
            status, doc = admin_get(side, "/endpoints")
            assert status == 404 and doc["error"] == "no_outbound"
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sidecar",
                    "endpoints",
                    "--admin",
                    hostport(side.urls["admin"]),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert r.returncode == 2 and "no outbound listener" in r.stderr
        finally:
            side.stop()
    finally:
        echo.stop()
