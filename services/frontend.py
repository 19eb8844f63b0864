"""The demo frontend: plain HTTP; calls the backend through its own sidecar via HTTP_PROXY.

`GET /` calls `http://backend.default/process` and `/headers` with plain HTTP;
the sidecar (HTTP_PROXY=http://127.0.0.1:15001) turns that into mutual TLS.
Run: `HTTP_PROXY=http://127.0.0.1:15001 python -m services.frontend`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import aiohttp
from aiohttp import web


async def index(request: web.Request) -> web.Response:
    """Call the backend twice and show what it answered and what it saw."""
    base = request.app["backend"]
    # trust_env: take HTTP_PROXY from the environment, like any ordinary HTTP client.
    async with aiohttp.ClientSession(trust_env=True) as session:
        async with session.post(f"{base}/process", data=b"hello from frontend") as r:
            processed = await r.json(content_type=None)
            status = r.status
        async with session.get(f"{base}/headers") as r:
            seen = await r.json(content_type=None)
    return web.json_response(
        {
            "service": "frontend",
            "backend_status": status,
            "backend_answer": processed,
            "backend_saw_headers": seen,
        }
    )


def app(backend: str) -> web.Application:
    """The frontend application."""
    application = web.Application()
    application["backend"] = backend.rstrip("/")
    application.router.add_get("/", index)
    return application


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(prog="frontend", description="demo frontend (plain HTTP)")
    p.add_argument("--listen", default="127.0.0.1:5001", help="HOST:PORT (default 127.0.0.1:5001)")
    p.add_argument(
        "--backend",
        default="http://backend.default",
        help="the backend's URL, reached through HTTP_PROXY (default http://backend.default)",
    )
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    web.run_app(
        app(args.backend),
        host=host,
        port=int(port),
        access_log=None,
        print=lambda s: print(f"frontend: listening on http://{host}:{port}", flush=True),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
