"""The app down (503), too slow (504), oversized heads (431) and bodies (413), slow clients:
each answered with a short JSON body, and the sidecar keeps serving afterwards."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest
from conftest import BACKEND, FRONTEND
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca, start_ca
from mesh import app_log, hostport, proxy_get, sidecar_config, start_echo, start_sidecar


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """CA; backend sidecar with tight limits in front of an echo app; a frontend sidecar."""
    root = tmp_path_factory.mktemp("limits")
    home = root / "ca"
    run_meshca("init", "--home", str(home))
    ca = start_ca(home)
    app_log_path = root / "app.log"
    app = start_echo(app_log_path)
    backend = start_sidecar(
        sidecar_config(
            root,
            "backend",
            ca,
            BACKEND,
            app=hostport(app.urls["echo"]),
            inbound_extra={
                "app_timeout": 1.0,
                "max_header_bytes": 4096,
                "max_body_bytes": 100_000,
                "header_timeout": 1.0,
            },
        )
    )
    inbound = hostport(backend.urls["inbound"])
    # "down.default" points at an inbound whose app port has nothing listening.
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    dead_port = free.getsockname()[1]
    free.close()
    down = start_sidecar(
        sidecar_config(
            root,
            "down",
            ca,
            "spiffe://cluster.local/ns/default/sa/down",
            app=f"127.0.0.1:{dead_port}",
        )
    )
    frontend = start_sidecar(
        sidecar_config(
            root,
            "frontend",
            ca,
            FRONTEND,
            services={
                "backend.default": {"endpoints": [inbound], "identity": BACKEND},
                "down.default": {
                    "endpoints": [hostport(down.urls["inbound"])],
                    "identity": "spiffe://cluster.local/ns/default/sa/down",
                },
                "nowhere.default": {
                    "endpoints": [f"127.0.0.1:{dead_port}"],
                    "identity": "spiffe://cluster.local/ns/default/sa/x",
                },
            },
        )
    )
    procs = [ca, app, backend, down, frontend]
    try:
        yield {
            "ca": ca,
            "frontend": frontend,
            "inbound": inbound,
            "app_log": app_log_path,
            "root": root,
        }
    finally:
        for p in reversed(procs):
            p.stop()


def still_serving(s):
    status, body, _ = proxy_get(s["frontend"], "http://backend.default/still-ok")
    assert status == 200, body


def test_app_down_is_503(setup):
    status, body, _ = proxy_get(setup["frontend"], "http://down.default/x")
    assert status == 503 and json.loads(body)["error"] == "app_unavailable"
    still_serving(setup)


def test_service_endpoints_unreachable_is_503(setup):
    status, body, _ = proxy_get(setup["frontend"], "http://nowhere.default/x")
    assert status == 503 and json.loads(body)["error"] == "service_unavailable"


def test_slow_app_is_504(setup):
    t = time.monotonic()
    status, body, _ = proxy_get(setup["frontend"], "http://backend.default/slow?delay=3")
    assert status == 504 and json.loads(body)["error"] == "upstream_timeout"
    assert time.monotonic() - t < 2.9
    still_serving(setup)


def test_header_too_large_is_431(setup):
    before = len(app_log(setup["app_log"]))
    status, body, _ = proxy_get(
        setup["frontend"], "http://backend.default/big-head", headers={"X-Big": "a" * 8000}
    )
    assert status == 431 and json.loads(body)["error"] == "headers_too_large"
    assert len(app_log(setup["app_log"])) == before
    still_serving(setup)


def test_body_over_limit_is_413(setup):
    before = len(app_log(setup["app_log"]))
    status, body, _ = proxy_get(
        setup["frontend"], "http://backend.default/upload", data=b"x" * 200_000
    )
    assert status == 413 and json.loads(body)["error"] == "too_large"
    assert len(app_log(setup["app_log"])) == before
    still_serving(setup)


def client_tls(setup, tmp_path):
    ca = setup["ca"]
    key, csr = openssl_csr(tmp_path, "slowloris")
    status, doc = curl_enroll(ca, csr, mint_token(ca.home, "spiffe://cluster.local/ns/x/sa/slow"))
    assert status == 200
    chain = tmp_path / "slow.pem"
    chain.write_text(doc["certificate_chain"])
    ctx = ssl.create_default_context(cafile=str(ca.bundle))
    ctx.check_hostname = False
    ctx.load_cert_chain(str(chain), str(key))
    host, port = setup["inbound"].split(":")
    return ctx.wrap_socket(socket.create_connection((host, int(port))))


def test_slow_client_is_cut_off(setup, tmp_path):
    """A client that never finishes its request head is answered 408 and closed."""
    s = client_tls(setup, tmp_path)
    s.settimeout(10)
    s.sendall(b"GET /slow-head HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    t = time.monotonic()
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    assert time.monotonic() - t < 5
    assert data.startswith(b"HTTP/1.1 408")
    s.close()


def test_idle_connection_without_request_is_closed(setup, tmp_path):
    s = client_tls(setup, tmp_path)
    s.settimeout(10)
    t = time.monotonic()
    assert s.recv(10) == b""
    assert time.monotonic() - t < 5
    s.close()
