"""The admin endpoint (loopback only) and the kubelet's health port.

Admin: `GET /healthz`, `GET /ready`, `GET /identity`, `GET /status`,
`POST /rotate`. Health port: only `GET /healthz/ready`. Errors are JSON
`{"error", "detail"}`; nothing here ever returns a key.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from meshca.client import CAError
from sidecar.certmanager import CertManager
from sidecar.creds import CredentialStore

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(doc: object, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(doc, indent=2) + "\n", status=status, content_type="application/json"
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's HTML errors (404, 405) into the project's JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return _json({"error": code, "detail": exc.reason}, exc.status)


class Admin:
    """Routes of the admin and health listeners."""

    def __init__(self, store: CredentialStore, manager: CertManager) -> None:
        self.store = store
        self.manager = manager

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the process answers."""
        return _json({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: 200 only while holding an unexpired certificate."""
        creds = self.store.current
        if creds is None:
            return _json({"ready": False, "reason": "no certificate yet"}, 503)
        if self.manager.clock() >= creds.leaf.not_valid_after_utc:
            return _json({"ready": False, "reason": "certificate expired"}, 503)
        return _json({"ready": True, "spiffe_id": str(creds.spiffe_id)})

    async def identity(self, request: web.Request) -> web.Response:
        """The current certificate, as `sidecar identity` prints it."""
        creds = self.store.current
        if creds is None:
            return _json({"error": "not_ready", "detail": "no certificate yet"}, 503)
        doc = creds.describe(self.manager.clock())
        doc["manager"] = self.manager.status.__dict__
        return _json(doc)

    async def status(self, request: web.Request) -> web.Response:
        """The certificate manager's state (renewals, failures, next renewal)."""
        return _json(self.manager.status.__dict__)

    async def rotate(self, request: web.Request) -> web.Response:
        """Renew now; answers with the new serial, or 502 with why the CA did not."""
        try:
            serial = await self.manager.rotate_now()
        except CAError as e:
            return _json({"error": "rotation_failed", "detail": str(e)}, 502)
        creds = self.store.current
        assert creds is not None
        return _json({"serial": serial, "spiffe_id": str(creds.spiffe_id)})

    def admin_app(self) -> web.Application:
        """The loopback admin application."""
        app = web.Application(middlewares=[json_errors])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/identity", self.identity)
        app.router.add_get("/status", self.status)
        app.router.add_post("/rotate", self.rotate)
        return app

    def health_app(self) -> web.Application:
        """The kubelet's probe port: readiness only, nothing else exposed."""
        app = web.Application(middlewares=[json_errors])
        app.router.add_get("/healthz/ready", self.ready)
        return app
