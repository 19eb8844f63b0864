"""The admin, health and metrics ports' routing: exact paths, 404 for others, 405 with
`Allow` for another method, HEAD wherever GET is, 500 (and no detail) for a handler
that fails; every error is the project's JSON error."""

from __future__ import annotations

import json

import pytest

from sidecar.localhttp import Request, Response, Routes, json_response


async def ok(request: Request) -> Response:
    return json_response({"path": request.path, "query": request.query})


async def broken(request: Request) -> Response:
    raise RuntimeError("secret detail")


def routes() -> Routes:
    r = Routes()
    r.add("GET", "/ready", ok)
    r.add("POST", "/rotate", ok)
    r.add("GET", "/broken", broken)
    return r


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/ready", 200, None),
        ("HEAD", "/ready", 200, None),
        ("POST", "/rotate", 200, None),
        ("GET", "/rotate", 405, "method_not_allowed"),
        ("POST", "/ready", 405, "method_not_allowed"),
        ("GET", "/ready/", 404, "not_found"),
        ("GET", "/", 404, "not_found"),
        ("GET", "/broken", 500, "internal_error"),
    ],
)
async def test_answers(method, path, status, error):
    resp = await routes().answer(Request(method, path, {"a": "1"}))
    doc = json.loads(resp.body)
    assert resp.status == status
    assert resp.content_type == "application/json"
    if error is None:
        assert doc == {"path": path, "query": {"a": "1"}}
    else:
        assert doc["error"] == error and "secret" not in doc["detail"]


async def test_405_says_which_methods_are_allowed():
    resp = await routes().answer(Request("DELETE", "/ready"))
    assert dict(resp.headers) == {"Allow": "GET, HEAD"}
