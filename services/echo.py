"""An echo app: answers every request with JSON describing what it received.

Used behind a sidecar to show (and test) exactly what reaches an app: method,
path, query, headers (including X-Forwarded-Client-Cert) and the body's size
and SHA-256. Run: `python -m services.echo --listen 127.0.0.1:5000`.

A few query parameters let tests play a misbehaving app: `delay=S` answers
after S seconds, `status=N` answers N, `download=N` streams N bytes, `chunked=1`
answers without a Content-Length, and `abort=head|body|chunked` drops the
connection before the response head, halfway through a Content-Length body, or
in the middle of a chunked body (the request is logged first).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import Sequence

from aiohttp import web


async def echo(request: web.Request) -> web.StreamResponse:
    """Describe the request; the body is streamed and hashed, never held whole."""
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    abort = request.query.get("abort")
    if abort in ABORTS:
        _log(request)
        return await ABORTS[abort](request)
    delay = float(request.query.get("delay", "0") or 0)
    if delay > 0:  # lets tests play a slow app
        await asyncio.sleep(min(delay, 60))
    download = int(request.query.get("download", "0") or 0)
    if download > 0:  # stream that many bytes back (a large response for tests)
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = download
        await resp.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        left = download
        while left > 0:
            await resp.write(block[: min(left, len(block))])
            left -= len(block)
        await resp.write_eof()
        return resp
    _log(request)
    doc = {
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": {k: v for k, v in request.headers.items()},
        "body_bytes": size,
        "body_sha256": digest.hexdigest(),
    }
    status = int(request.query.get("status", "200") or 200)
    if status in (204, 304):
        return web.Response(status=status)
    if request.query.get("chunked"):  # no Content-Length: aiohttp sends it chunked
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        text = json.dumps(doc).encode()
        for i in range(0, len(text), 50):
            await resp.write(text[i : i + 50])
        await resp.write_eof()
        return resp
    return web.json_response(doc, status=status)


def _log(request: web.Request) -> None:
    log_to = request.app.get("log")
    if log_to is not None:
        with open(log_to, "a") as f:
            f.write(json.dumps({"method": request.method, "path": request.path}) + "\n")


def _drop(request: web.Request) -> None:
    """Close the connection at once (an RST where the OS allows), as a crashing app does."""
    if request.transport is not None:
        request.transport.abort()


async def _abort_head(request: web.Request) -> web.StreamResponse:
    _drop(request)
    return web.Response()  # never sent: the connection is gone


async def _abort_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = 100_000
    await resp.prepare(request)
    await resp.write(b"x" * 50_000)
    _drop(request)
    return resp


async def _abort_chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    for _ in range(5):
        await resp.write(b"y" * 1000)
    _drop(request)
    return resp


ABORTS = {"head": _abort_head, "body": _abort_body, "chunked": _abort_chunked}


def app(log: str | None = None) -> web.Application:
    """The aiohttp application: every method, every path; `log` records each request."""
    application = web.Application()
    application["log"] = log
    application.router.add_route("*", "/{tail:.*}", echo)
    return application


async def serve(host: str, port: int, log: str | None = None) -> None:
    """Serve until cancelled; print the bound address once listening."""
    runner = web.AppRunner(app(log), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname() if site._server else (host, port)
    print(f"echo: listening on http://{bound[0]}:{bound[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `python -m services.echo --listen 127.0.0.1:5000`."""
    p = argparse.ArgumentParser(prog="echo", description="echo what the app receives")
    p.add_argument("--listen", default="127.0.0.1:5000", help="HOST:PORT (default 127.0.0.1:5000)")
    p.add_argument("--log", help="append one JSON line per request received to this file")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        asyncio.run(serve(host, int(port), args.log))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
