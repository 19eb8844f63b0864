"""A WebSocket app for the end-to-end tests: an echo on `/ws` that records what reached it.

Routes:
- `GET /ws`: WebSocket echo, text frames as text and binary as binary, messages up to
  32 MiB. The text message `close:<code>` makes the app close with that code and the
  reason `bye`. The code a client closes with is recorded.
- `GET /seen`: JSON of what the app has seen so far (itself not counted): `upgrades`
  (WebSocket upgrade requests), `requests` (other requests), `messages` (echoed),
  `client_closes` (the codes clients closed with, in order; 1006 for a connection that
  ended without a close frame) and `last_upgrade_headers`
  (`{lower-case name: value}` of the last upgrade request, repeated names joined with ", ";
  null before the first).
- `GET /`: `ok`.

Run: `python tests/ws_app.py --listen 127.0.0.1:0`; it prints
`ws listening on http://127.0.0.1:PORT` once it serves, and exits 0 on SIGTERM or SIGINT
(open WebSockets are closed with 1001, going away).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, WSMsgType, web

if TYPE_CHECKING:
    from mesh import Proc

MAX_MESSAGE = 32 * 1024 * 1024

SEEN = web.AppKey("seen", dict)
SOCKETS = web.AppKey("sockets", set)


def is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


@web.middleware
async def record(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count every request that reached the app (before it is answered, whatever the answer)."""
    seen = request.app[SEEN]
    if request.path != "/seen":
        if is_upgrade(request):
            seen["upgrades"] += 1
            headers: dict[str, str] = {}
            for name, value in request.headers.items():
                name = name.lower()
                headers[name] = f"{headers[name]}, {value}" if name in headers else value
            seen["last_upgrade_headers"] = headers
        else:
            seen["requests"] += 1
    return await handler(request)


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
    await ws.prepare(request)
    seen = request.app[SEEN]
    request.app[SOCKETS].add(ws)
    closed_here = False
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    closed_here = True
                    await ws.close(code=int(msg.data.removeprefix("close:")), message=b"bye")
                    break
                seen["messages"] += 1
                await ws.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                seen["messages"] += 1
                await ws.send_bytes(msg.data)
    finally:
        request.app[SOCKETS].discard(ws)
    if ws.close_code is not None and not closed_here:
        seen["client_closes"].append(ws.close_code)
    return ws


async def seen(request: web.Request) -> web.Response:
    return web.json_response(request.app[SEEN])


async def index(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"shutting down")


def make_app() -> web.Application:
    app = web.Application(middlewares=[record])
    app[SEEN] = {
        "upgrades": 0,
        "requests": 0,
        "messages": 0,
        "client_closes": [],
        "last_upgrade_headers": None,
    }
    app[SOCKETS] = set()
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/seen", seen)
    app.router.add_get("/", index)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname() if site._server else (host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ws listening on http://{bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    await runner.cleanup()


def start_ws_app(port: int = 0) -> Proc:
    """This app on 127.0.0.1:`port` (a free one when 0); its URL is `urls["ws"]`."""
    from mesh import _spawn

    return _spawn([sys.executable, str(Path(__file__)), "--listen", f"127.0.0.1:{port}"], ["ws"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: a free one)")
    host, _, port = p.parse_args().listen.rpartition(":")
    asyncio.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
