"""The demo backend: plain HTTP on 127.0.0.1, no TLS, no idea who calls it.

`/process` does a little "work" and answers who asked (from the
X-Forwarded-Client-Cert its sidecar wrote); `/headers` returns the headers it
received as JSON. Run: `python -m services.backend --listen 127.0.0.1:5000`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Sequence

from aiohttp import web

_URI = re.compile(r"URI=([^;,]+)")


def caller(request: web.Request) -> str | None:
    """The caller's SPIFFE ID from the sidecar's X-Forwarded-Client-Cert, if any."""
    m = _URI.search(request.headers.get("X-Forwarded-Client-Cert", ""))
    return m.group(1) if m else None


async def process(request: web.Request) -> web.Response:
    """Hash the body (the 'work') and say who asked."""
    body = await request.read()
    return web.json_response(
        {
            "service": "backend",
            "processed_bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
            "caller": caller(request),
        }
    )


async def headers(request: web.Request) -> web.Response:
    """Every header the app received."""
    return web.json_response(dict(request.headers))


async def index(request: web.Request) -> web.Response:
    """A greeting, for curl."""
    return web.json_response({"service": "backend", "caller": caller(request)})


def app() -> web.Application:
    """The backend application."""
    application = web.Application()
    application.router.add_route("*", "/process", process)
    application.router.add_get("/headers", headers)
    application.router.add_get("/", index)
    return application


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="backend", description="demo backend (plain HTTP)")
    p.add_argument("--listen", default="127.0.0.1:5000", help="HOST:PORT (default 127.0.0.1:5000)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    web.run_app(
        app(),
        host=host,
        port=int(port),
        access_log=None,
        print=lambda s: print(f"backend: listening on http://{host}:{port}", flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
