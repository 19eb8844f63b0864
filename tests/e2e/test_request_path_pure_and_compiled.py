"""The sidecar answers alike whether its request path runs compiled (what `make venv`
builds: sidecar/compiled.py) or as plain Python (SIDECAR_PURE=1, or no C compiler), and its
`/status` says which one runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket

from conftest import BACKEND, FRONTEND, Mesh
from mesh import admin_get, hostport, proxy_get

from sidecar import compiled


def expected_mode() -> str:
    """What `make venv` gives on this machine."""
    if shutil.which("cc") is None or importlib.util.find_spec("mypyc") is None:
        return "pure"
    return "compiled"


def call_and_check(m: Mesh) -> None:
    status, body, _ = proxy_get(m.frontend, "http://backend.default/orders/7?q=1")
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["method"], seen["path"], seen["query"]) == ("GET", "/orders/7", "q=1")
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-forwarded-client-cert"].endswith(f";URI={FRONTEND}")
    status, body, _ = proxy_get(m.frontend, "http://impostor.default/x")
    assert (status, json.loads(body)["error"]) == (502, "peer_identity_mismatch")
    # A forged identity header is still replaced, a request smuggling attempt still refused.
    status, body, _ = proxy_get(
        m.frontend,
        "http://backend.default/h",
        headers={"X-Forwarded-Client-Cert": "By=x;URI=spiffe://cluster.local/ns/a/sa/admin"},
    )
    seen = {k.lower(): v for k, v in json.loads(body)["headers"].items()}
    assert "sa/admin" not in seen["x-forwarded-client-cert"]
    host, port = hostport(m.frontend.urls["outbound"]).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST http://backend.default/x HTTP/1.1\r\nHost: backend.default\r\n"
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400 "), answer


def test_status_names_the_mode_and_calls_work(mesh):
    assert compiled.state() in ("compiled", "pure")  # this checkout was built (or not) whole
    for side in (mesh.frontend, mesh.backend):
        status, doc = admin_get(side, "/status")
        assert status == 200
        assert doc["request_path"] == expected_mode(), doc
    call_and_check(mesh)
    _, ident = admin_get(mesh.backend, "/identity")
    assert ident["spiffe_id"] == BACKEND


def test_sidecars_under_sidecar_pure_answer_alike(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    m = Mesh(tmp_path)
    try:
        for side in (m.frontend, m.backend):
            assert admin_get(side, "/status")[1]["request_path"] == "pure"
        call_and_check(m)
    finally:
        m.stop()
