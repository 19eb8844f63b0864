"""W3C Trace Context and x-request-id through both sidecars (frontend app -> its sidecar ->
mTLS -> backend's sidecar -> echo app).

A valid `traceparent` from the client is continued: the app sees the same trace
id, a parent id that is not the client's, the client's sampled flag and its
`tracestate`. Without one, or with an invalid one, the trace starts at the
frontend's sidecar: the app sees a new valid `traceparent` and no stale
`tracestate`. The client's `x-request-id` reaches the app, or one is made up.
Both sidecars' access logs carry the trace id and the request id the app saw.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
import uuid

import pytest
from mesh import Proc, proxy_get

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def call(mesh, path: str, headers: dict[str, str]) -> dict[str, str]:
    """GET http://backend.default<path> through the frontend; the headers the app saw."""
    status, body, _ = proxy_get(mesh.frontend, f"http://backend.default{path}", headers)
    assert status == 200, body
    return {k.lower(): v for k, v in json.loads(body)["headers"].items()}


def logged(proc: Proc, path: str, timeout: float = 5) -> dict:
    """The access-log line (stdout, flushed at least every second) for a request to `path`."""
    deadline = time.monotonic() + timeout
    while True:
        for line in reversed(proc.lines):
            if line.startswith("{") and json.loads(line).get("path") == path:
                return json.loads(line)
        assert time.monotonic() < deadline, f"no access-log line for {path}"
        time.sleep(0.1)


def both_logs(mesh, path: str) -> tuple[dict, dict]:
    out, inb = logged(mesh.frontend, path), logged(mesh.backend, path)
    assert (out["direction"], inb["direction"]) == ("outbound", "inbound")
    return out, inb


def unique_path() -> str:
    return f"/trace/{secrets.token_hex(6)}"


@pytest.mark.parametrize("flags", ["01", "00"])
def test_client_traceparent_is_continued(mesh, flags):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    path = unique_path()
    seen = call(
        mesh,
        path,
        {
            "traceparent": f"00-{trace_id}-{parent_id}-{flags}",
            "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        },
    )
    m = TRACEPARENT.match(seen["traceparent"])
    assert m, seen["traceparent"]
    assert m.group(1) == trace_id
    assert m.group(2) != parent_id
    assert m.group(3) == flags
    assert seen["tracestate"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    out, inb = both_logs(mesh, path)
    assert out["trace_id"] == inb["trace_id"] == trace_id


def test_no_traceparent_starts_a_trace_at_the_frontend(mesh):
    path = unique_path()
    seen = call(mesh, path, {})
    m = TRACEPARENT.match(seen["traceparent"])
    assert m, seen["traceparent"]
    assert m.group(1) != "0" * 32 and m.group(2) != "0" * 16
    assert m.group(3) in ("00", "01")
    assert "tracestate" not in seen
    out, inb = both_logs(mesh, path)
    assert out["trace_id"] == inb["trace_id"] == m.group(1)
    # Another call is another trace.
    assert TRACEPARENT.match(call(mesh, unique_path(), {})["traceparent"]).group(1) != m.group(1)


@pytest.mark.parametrize(
    "bad",
    [
        "00-{t}-{p}-01-extra",  # version 00 has exactly four fields
        "00-{T}-{p}-01",  # uppercase hex
        "00-00000000000000000000000000000000-{p}-01",
        "ff-{t}-{p}-01",
        "not a traceparent",
    ],
)
def test_invalid_traceparent_is_replaced_and_its_tracestate_dropped(mesh, bad):
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    value = bad.format(t=trace_id, T=trace_id.upper(), p=parent_id)
    path = unique_path()
    seen = call(mesh, path, {"traceparent": value, "tracestate": "congo=t61rcWkgMzE"})
    m = TRACEPARENT.match(seen["traceparent"])
    assert m, seen["traceparent"]
    assert m.group(1) not in (trace_id, "0" * 32) and m.group(2) != parent_id
    assert "tracestate" not in seen
    out, inb = both_logs(mesh, path)
    assert out["trace_id"] == inb["trace_id"] == m.group(1)


def test_request_id_kept_when_sent(mesh):
    request_id = f"order-{secrets.token_hex(8)}"
    path = unique_path()
    env = {**os.environ, "http_proxy": mesh.frontend.urls["outbound"], "no_proxy": ""}
    out = subprocess.run(
        ["curl", "-sS", "-H", f"X-Request-Id: {request_id}", f"http://backend.default{path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    ).stdout
    seen = {k.lower(): v for k, v in json.loads(out)["headers"].items()}
    assert seen["x-request-id"] == request_id
    out_line, in_line = both_logs(mesh, path)
    assert out_line["request_id"] == in_line["request_id"] == request_id


def test_request_id_made_when_absent_or_unusable(mesh):
    made = []
    for headers in ({}, {"x-request-id": "x" * 129}):
        path = unique_path()
        seen = call(mesh, path, headers)
        request_id = seen["x-request-id"]
        assert uuid.UUID(request_id).version == 4 and str(uuid.UUID(request_id)) == request_id
        out, inb = both_logs(mesh, path)
        assert out["request_id"] == inb["request_id"] == request_id
        made.append(request_id)
    assert made[0] != made[1]
