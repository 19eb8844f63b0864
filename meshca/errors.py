"""The CA's exception hierarchy; each error carries the HTTP status and JSON code a server sends.

`detail` is what the peer is told: it names what was wrong with *their* input and
never contains a key, a token or an internal path. Anything more goes to the log.
"""

from __future__ import annotations


class MeshcaError(Exception):
    """Base class. `status` and `code` are what the API answers with."""

    status = 500
    code = "internal"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code

    def to_json(self) -> dict[str, str]:
        """The `{"error": CODE, "detail": TEXT}` body every API error uses."""
        return {"error": self.code, "detail": self.detail}


class BadRequest(MeshcaError):
    """The peer sent something malformed (400)."""

    status = 400
    code = "bad_request"


class Unauthenticated(MeshcaError):
    """Missing or invalid credential (401)."""

    status = 401
    code = "unauthenticated"


class Forbidden(MeshcaError):
    """Authenticated, but not allowed (403)."""

    status = 403
    code = "forbidden"


class NotFound(MeshcaError):
    """No such resource (404)."""

    status = 404
    code = "not_found"


class TooLarge(MeshcaError):
    """Request body over the limit (413)."""

    status = 413
    code = "too_large"


class RateLimited(MeshcaError):
    """Too many requests for this identity (429); `retry_after` in seconds."""

    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Unavailable(MeshcaError):
    """The CA cannot do it now (its ledger cannot be written: a full disk, say); 503."""

    status = 503
    code = "unavailable"


class StateError(MeshcaError):
    """The CA's state directory is missing, incomplete or would be overwritten (CLI errors)."""

    status = 500
    code = "state"
