"""The app killed (SIGKILL) while its sidecar holds kept-alive connections to it, then back.

Calls go through frontend's and backend's sidecars to an echo app on a fixed port.
Once backend's sidecar has pooled connections to the app, the app is killed: calls
are answered 503 with the JSON error `app_unavailable` (none hangs, none is a 500),
while backend's sidecar keeps serving its admin and readiness endpoints. When the
app comes back on the same port, calls are answered 200 again.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
from conftest import BACKEND, FRONTEND
from helpers import run_meshca, start_ca
from mesh import Proc, _spawn, admin_get, hostport, proxy_get, sidecar_config, start_sidecar
from rotation_rig import free_port, wait_for


def start_app(port: int) -> Proc:
    """The echo app on a fixed loopback port (so it can come back where it was)."""
    return _spawn(
        [sys.executable, "-m", "services.echo", "--listen", f"127.0.0.1:{port}"], ["echo"]
    )


@pytest.fixture
def env(tmp_path: Path):
    home = tmp_path / "ca"
    run_meshca("init", "--home", str(home))
    procs: list = []
    try:
        ca = start_ca(home)
        procs.append(ca)
        port = free_port()
        app = start_app(port)
        procs.append(app)
        backend = start_sidecar(
            sidecar_config(tmp_path, "backend", ca, BACKEND, app=f"127.0.0.1:{port}")
        )
        procs.append(backend)
        frontend = start_sidecar(
            sidecar_config(
                tmp_path,
                "frontend",
                ca,
                FRONTEND,
                services={
                    "backend.default": {
                        "endpoints": [hostport(backend.urls["inbound"])],
                        "identity": BACKEND,
                    }
                },
            )
        )
        procs.append(frontend)
        yield {"app": app, "port": port, "backend": backend, "frontend": frontend, "procs": procs}
    finally:
        for p in reversed(procs):
            p.stop()


def test_app_killed_is_503_and_back_is_200(env):
    for i in range(10):  # backend's sidecar now has kept-alive connections to the app
        status, body, _ = proxy_get(env["frontend"], f"http://backend.default/warm/{i}")
        assert status == 200, body
    env["app"].proc.send_signal(signal.SIGKILL)
    env["app"].proc.wait(timeout=10)
    for i in range(10):
        status, body, _ = proxy_get(env["frontend"], f"http://backend.default/down/{i}", timeout=20)
        doc = json.loads(body)
        assert status == 503 and doc["error"] == "app_unavailable", (status, doc)
    code, ready = admin_get(env["backend"], "/ready")
    assert code == 200, ready  # the sidecar itself is fine: its certificate is
    app = start_app(env["port"])
    env["procs"].insert(1, app)
    wait_for(
        "calls to succeed once the app is back",
        lambda: proxy_get(env["frontend"], "http://backend.default/back")[0] == 200,
        15,
        [env["backend"]],
    )
    for i in range(10):
        status, body, _ = proxy_get(env["frontend"], f"http://backend.default/back/{i}")
        assert status == 200, body
