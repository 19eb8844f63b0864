"""A small HTTP/1.1 server for the sidecar's own ports (admin, health, metrics): exact-path
routes, JSON errors, one request at a time per connection.

These ports answer a few fixed GET and POST paths with small bodies, to the kubelet,
Prometheus and `sidecar identity`; a web framework was most of the sidecar's memory
at start-up (aiohttp and its dependencies: 10 MiB of 57 MiB idle), so requests are
parsed with httptools, which the data path loads anyway. Unknown paths answer 404,
known paths with another method 405 (both `{"error", "detail"}`), a handler that
fails 500; a malformed request 400 and close; a request head over MAX_HEAD_BYTES
431, a body over MAX_BODY_BYTES 413 (the routes read none); an idle connection
closes after IDLE_TIMEOUT seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl

import httptools

log = logging.getLogger("sidecar.localhttp")

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
IDLE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Request:
    """What a handler gets: the method, the path, the query (last value of each name) and
    the headers (names in lower case)."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    """What a handler returns."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]


def json_response(doc: object, status: int = 200) -> Response:
    """`doc` as indented JSON."""
    return Response(status, (json.dumps(doc, indent=2) + "\n").encode())


def error(status: int, code: str, detail: str | None = None) -> Response:
    """The project's JSON error `{"error": code, "detail": ...}`."""
    return json_response({"error": code, "detail": detail or HTTPStatus(status).phrase}, status)


class Routes:
    """Handlers by exact path and method; a GET route answers HEAD too."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        """Route `method path` to `handler`."""
        methods = self._by_path.setdefault(path, {})
        methods[method] = handler
        if method == "GET":
            methods.setdefault("HEAD", handler)

    async def answer(self, request: Request) -> Response:
        """The handler's response, or the error that stands for it."""
        methods = self._by_path.get(request.path)
        if methods is None:
            return error(404, "not_found")
        handler = methods.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            r = error(405, "method_not_allowed")
            return Response(r.status, r.body, r.content_type, (("Allow", allow),))
        try:
            return await handler(request)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error(500, "internal_error", "the handler failed; see the sidecar's log")


def _head(status: int, resp: Response, length: int, keep_alive: bool) -> bytes:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {resp.content_type}"]
    lines += [f"{k}: {v}" for k, v in resp.headers]
    lines += [
        f"Content-Length: {length}",
        "Connection: " + ("keep-alive" if keep_alive else "close"),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Conn(asyncio.Protocol):
    """One client connection: requests are parsed as they come and answered in order."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: dict[str, str] = {}
        self.head_bytes = 0
        self.body_bytes = 0
        self.pending: asyncio.Queue[tuple[Request, bool] | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.idle: asyncio.TimerHandle | None = None

    # -- transport ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns.add(self)
        self.task = asyncio.get_running_loop().create_task(self._serve())
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if self.idle is not None:
            self.idle.cancel()
        if self.task is not None:
            self.task.cancel()
        self.parser = None  # type: ignore[assignment]  # its callbacks hold this object

    def data_received(self, data: bytes) -> None:
        self._arm()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "bad_request", "upgrades are not served here")
        except httptools.HttpParserError as e:
            big = e.__context__  # what a callback raised (httptools wraps it)
            if isinstance(big, _TooLarge):
                self._fail(big.status, big.code)
            else:
                self._fail(400, "bad_request", "malformed request")

    # -- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self.url, self.headers, self.head_bytes, self.body_bytes = b"", {}, 0, 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes > MAX_BODY_BYTES:
            raise _TooLarge(413, "body_too_large")

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self.url)
        query = dict(parse_qsl((url.query or b"").decode("latin-1")))
        request = Request(
            self.parser.get_method().decode("latin-1"),
            (url.path or b"/").decode("latin-1"),
            query,
            self.headers,
        )
        self.pending.put_nowait((request, self.parser.should_keep_alive()))

    def _count_head(self, n: int) -> None:
        self.head_bytes += n
        if self.head_bytes > MAX_HEAD_BYTES:
            raise _TooLarge(431, "header_too_large")

    # -- answering -------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            item = await self.pending.get()
            if item is None or self.transport is None or self.transport.is_closing():
                return
            request, keep_alive = item
            resp = await self.server.routes.answer(request)
            keep_alive = keep_alive and not self.server.closing
            body = b"" if request.method == "HEAD" else resp.body
            self.transport.write(_head(resp.status, resp, len(resp.body), keep_alive) + body)
            if not keep_alive:
                self.transport.close()
                return

    def _fail(self, status: int, code: str, detail: str | None = None) -> None:
        self.pending.put_nowait(None)  # answer nothing queued after this
        if self.transport is not None and not self.transport.is_closing():
            resp = error(status, code, detail)
            self.transport.write(_head(status, resp, len(resp.body), False) + resp.body)
            self.transport.close()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None:
            self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.transport.close)


class _TooLarge(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status, self.code = status, code


class LocalServer:
    """A listening server for `routes`; `close()` stops it and closes its connections."""

    def __init__(self, routes: Routes) -> None:
        self.routes = routes
        self.conns: set[_Conn] = set()
        self.closing = False
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (0: any free port); the URL it answers on."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self), host, port)
        sockets = getattr(self.server, "sockets", None) or ()
        bound = sockets[0].getsockname()[1] if sockets else port
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}"

    async def close(self) -> None:
        """Stop listening and close every connection (an answer being written is sent first)."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
