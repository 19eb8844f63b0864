"""The app drops its connection mid-response: the client sees a clean error, others go on.

Calls go app -> frontend's sidecar -> backend's sidecar -> echo app, whose
`abort=` parameter makes it drop the connection before the response head, halfway
through a Content-Length body, or in the middle of a chunked body. Before the head,
the client gets 502 with the JSON error `upstream_reset`. After the head, the
response cannot be turned into an error any more, so the client must see it cut
short (Python's http.client raises IncompleteRead, curl exits 18), never a response
that looks complete. A request with a method that is not idempotent (POST) reaches
the app once, even on a kept-alive upstream connection. Calls made meanwhile on
other connections, and afterwards, are answered 200.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import BACKEND, FRONTEND
from helpers import run_meshca, start_ca
from mesh import app_log, hostport, proxy_get, sidecar_config, start_echo, start_sidecar


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """CA; echo app (logging each request) behind backend's sidecar; frontend's sidecar."""
    root: Path = tmp_path_factory.mktemp("abort")
    home = root / "ca"
    run_meshca("init", "--home", str(home))
    procs: list = []
    try:
        ca = start_ca(home)
        procs.append(ca)
        log = root / "app.log"
        app = start_echo(log)
        procs.append(app)
        backend = start_sidecar(
            sidecar_config(root, "backend", ca, BACKEND, app=hostport(app.urls["echo"]))
        )
        procs.append(backend)
        frontend = start_sidecar(
            sidecar_config(
                root,
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
        yield {"frontend": frontend, "backend": backend, "app_log": log}
    finally:
        for p in reversed(procs):
            p.stop()


class Others:
    """Calls on their own connections, in a thread, while the test misbehaves elsewhere."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, _, _ = proxy_get(self.env["frontend"], "http://backend.default/other")
            except OSError as e:
                status = -1
                print(f"other call failed: {e!r}")
            self.statuses.append(status)
            self._stop.wait(0.02)

    def __enter__(self) -> Others:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(20)


def outbound(env: dict) -> http.client.HTTPConnection:
    host, port = hostport(env["frontend"].urls["outbound"]).split(":")
    return http.client.HTTPConnection(host, int(port), timeout=20)


def curl_through(env: dict, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            env["frontend"].urls["outbound"],
            f"http://backend.default{path}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def seen_by_app(env: dict, path: str) -> int:
    return sum(1 for r in app_log(env["app_log"]) if r["path"] == path)


def still_serving(env: dict) -> None:
    for i in range(5):
        status, body, _ = proxy_get(env["frontend"], f"http://backend.default/after/{i}")
        assert status == 200, body


@pytest.mark.parametrize("mode", ["body", "chunked"])
def test_cut_after_the_head_is_a_truncated_response(env, mode):
    with Others(env) as others:
        for i in range(3):
            conn = outbound(env)
            try:
                conn.request("GET", f"http://backend.default/cut-{mode}/{i}?abort={mode}")
                resp = conn.getresponse()
                assert resp.status == 200  # the head was on its way before the app failed
                with pytest.raises(http.client.IncompleteRead):
                    resp.read()
            finally:
                conn.close()
            done = curl_through(env, f"/cut-{mode}/curl-{i}?abort={mode}")
            assert done.returncode == 18, (done.returncode, done.stderr)  # CURLE_PARTIAL_FILE
    assert others.statuses and set(others.statuses) == {200}, others.statuses
    still_serving(env)


def test_closed_before_the_head_is_502(env):
    with Others(env) as others:
        for i in range(3):
            status, body, _ = proxy_get(env["frontend"], f"http://backend.default/x/{i}?abort=head")
            doc = json.loads(body)
            assert status == 502 and doc["error"] == "upstream_reset", doc
            assert "abort" not in doc["detail"]  # says what failed, not what was asked
    assert others.statuses and set(others.statuses) == {200}, others.statuses
    still_serving(env)


def test_post_reaches_the_app_once_when_it_drops_the_connection(env):
    """The backend sidecar's connection to the app is kept alive from the call before;
    a POST the app received must not be sent again because the app then dropped it."""
    still_serving(env)  # warm: an idle kept-alive connection to the app
    conn = outbound(env)
    try:
        conn.request(
            "POST",
            "http://backend.default/order?abort=head",
            headers={"Content-Length": "0"},
        )
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 502, body
    assert seen_by_app(env, "/order") == 1
    still_serving(env)
