"""A named backend app for the traffic-management tests: says who answered, fails on demand.

Every request is answered with JSON naming the app (`{"name": ..., "n": ...}`) and is
recorded (method, path, the headers tests look at, body size), unless it is a control
call. Control calls, made to the app directly (never through a sidecar):
`POST /_ctl/mode` with `{"status": N, "delay": S}` sets how the app answers every
request from then on (status 200 and no delay when a key is absent), and
`GET /_ctl/log` returns the requests recorded so far. A request may also ask for its
own `?delay=S` (the longer of the two delays wins), or with `?cut=1` for an answer that
breaks off: a 200 head promising 100000 bytes, 1000 of them, then the connection is
dropped. Run:
`python tests/e2e/traffic_app.py --name a --listen 127.0.0.1:0`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiohttp import web

SEEN_HEADERS = ("x-canary", "x-sidecar-fault", "x-id")


async def ctl_mode(request: web.Request) -> web.Response:
    doc = await request.json()
    request.app["mode"] = {"status": int(doc.get("status", 200)), "delay": doc.get("delay", 0)}
    return web.json_response(request.app["mode"])


async def ctl_log(request: web.Request) -> web.Response:
    return web.json_response(request.app["log"])


async def answer(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    app = request.app
    entry = {
        "method": request.method,
        "path": request.path,
        "headers": {h: request.headers[h] for h in SEEN_HEADERS if h in request.headers},
        "body_bytes": len(body),
    }
    app["log"].append(entry)
    mode = app["mode"]
    delay = max(float(mode["delay"]), float(request.query.get("delay", "0") or 0))
    if delay > 0:
        await asyncio.sleep(delay)
    if request.query.get("cut"):
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 100_000
        await resp.prepare(request)
        await resp.write(b"x" * 1000)
        await asyncio.sleep(0.05)  # the head and the first bytes go out first
        if request.transport is not None:
            request.transport.abort()
        return resp
    doc = {"name": app["name"], "n": len(app["log"]), **entry}
    return web.json_response(doc, status=mode["status"])


async def serve(name: str, host: str, port: int) -> None:
    app = web.Application()
    app["name"] = name
    app["mode"] = {"status": 200, "delay": 0}
    app["log"] = []
    app.router.add_post("/_ctl/mode", ctl_mode)
    app.router.add_get("/_ctl/log", ctl_log)
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname() if site._server else (host, port)
    print(f"app: listening on http://{bound[0]}:{bound[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--listen", default="127.0.0.1:0")
    args = p.parse_args()
    host, _, port = args.listen.rpartition(":")
    try:
        asyncio.run(serve(args.name, host, int(port)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
