"""Answers the sidecar gives itself: one table from error code to HTTP status.

Every request the sidecar refuses or cannot forward is answered with
`{"error": CODE, "detail": TEXT}` and the status this table gives the code (the
CA's errors work the same way, in `meshca/errors.py`). `detail` is for the peer:
it names what was wrong with the request or which service failed, never a key, a
token, a file path or an internal error; anything more goes to the log.
docs/sidecar.md lists the codes, and a test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Sequence

STATUS: dict[str, int] = {
    # The request itself is malformed or refused by a hardening rule.
    "bad_request": 400,
    "bad_transfer_encoding": 400,
    "bad_path": 400,
    "bad_request_target": 400,
    "underscore_in_header_name": 400,
    "use_plain_http": 400,
    "no_host": 400,
    "no_client_certificate": 400,
    # Authentication and authorization (inbound).
    "invalid_token": 401,
    "jwt_required": 401,
    "forbidden": 403,
    "revoked": 403,
    "foreign_trust_domain": 403,
    "bad_peer_certificate": 403,
    # Where the request goes.
    "unknown_service": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "too_large": 413,
    "headers_too_large": 431,
    "internal": 500,
    "unsupported_transfer_encoding": 501,
    # The upstream (the app inbound, another sidecar outbound).
    "bad_upstream_response": 502,
    "upstream_reset": 502,
    "peer_verification_failed": 502,
    "peer_identity_mismatch": 502,
    "peer_revoked": 502,
    "upstream_protocol": 502,
    "app_unavailable": 503,
    "upstream_unavailable": 503,
    "service_unavailable": 503,
    "not_ready": 503,
    "no_jwt": 503,
    "overloaded": 503,
    "fault_abort": 503,
    "upstream_timeout": 504,
    "http_version_not_supported": 505,
}


class SidecarError(Exception):
    """A request the sidecar answers itself: `code` (a key of STATUS) and `detail` for the peer.

    `close` ends the connection after the answer (the framing can no longer be
    trusted); `headers` are added to the answer (a `WWW-Authenticate` challenge),
    `fields` to its JSON body (the policy rule that refused). Only an injected fault
    (`fault_abort`) sets its own `status`, the one its route configures.
    """

    __slots__ = ("code", "detail", "status", "close", "headers", "fields")

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        close: bool = False,
        headers: Sequence[tuple[bytes, bytes]] = (),
        fields: dict[str, str] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.code = code
        self.status = STATUS[code]  # an unknown code is a bug, caught by the tests
        if status is not None and code == "fault_abort":
            self.status = status
        self.detail = detail
        self.close = close
        self.headers = headers
        self.fields = fields or {}


# gRPC status codes for the sidecar's own answers to a gRPC call (grpc/doc/statuscodes.md),
# from the HTTP status as gRPC maps it (doc/http-grpc-status-mapping.md), with the codes
# that say more than their status.
GRPC_BY_STATUS = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
GRPC_BY_CODE = {
    "upstream_timeout": 4,  # DEADLINE_EXCEEDED
    "request_timeout": 4,
    "too_large": 8,  # RESOURCE_EXHAUSTED
    "headers_too_large": 8,
    "overloaded": 14,  # UNAVAILABLE (a client may retry elsewhere)
    "method_not_allowed": 12,  # UNIMPLEMENTED
    "internal": 13,  # INTERNAL
}


def grpc_status(err: SidecarError) -> int:
    """The gRPC status a gRPC client gets for `err` (2, UNKNOWN, when nothing fits)."""
    return GRPC_BY_CODE.get(err.code) or GRPC_BY_STATUS.get(err.status, 2)
