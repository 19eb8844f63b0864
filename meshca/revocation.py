"""Revocation in the ledger: by serial, or every unexpired certificate of a SPIFFE ID.

The CA's bundle endpoint then lists the revoked serials that have not expired;
sidecars refuse and disconnect them, and the CA refuses their renewal. Revoking
an ID also blocks new certificates for it (a new join token, its ServiceAccount
token) until `unrevoke`, or until a time the operator gives.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from meshca import store
from meshca.authority import Authority
from meshca.errors import BadRequest, NotFound
from meshca.spiffe import InvalidSpiffeId, SpiffeId


def _spiffe_id(authority: Authority, spiffe_id: str) -> SpiffeId:
    try:
        sid = SpiffeId.parse(spiffe_id)
    except InvalidSpiffeId as e:
        raise BadRequest(f"spiffe_id: {e}") from None
    if sid.trust_domain != authority.trust_domain:
        raise BadRequest(f"spiffe_id: not in trust domain {authority.trust_domain}")
    return sid


def revoke(
    where: Path | store.StateStore,
    serial: str | None,
    spiffe_id: str | None,
    ban_for: dt.timedelta | None = None,
    clock: store.Clock = store.utcnow,
) -> dict[str, Any]:
    """Revoke by serial or by SPIFFE ID in the ledger; what was revoked.

    By ID, new certificates for it are refused until `unrevoke` (or for `ban_for`).
    NotFound for an unknown serial, BadRequest for a bad or foreign ID."""
    if ban_for is not None and (serial is not None or ban_for.total_seconds() <= 0):
        raise BadRequest("ban_for: give a positive number of seconds, with a SPIFFE ID only")
    authority = Authority.load(where)
    ledger = authority.source.ledger(clock)
    try:
        if serial is not None:
            rec = ledger.revoke_serial(serial)
            if rec is None:
                raise NotFound(f"no certificate with serial {serial} in the ledger")
            revoked = [rec]
        else:
            assert spiffe_id is not None
            sid = _spiffe_id(authority, spiffe_id)
            until = clock() + ban_for if ban_for is not None else None
            revoked = ledger.revoke_id(str(sid), ban=True, until=until)
        doc: dict[str, Any] = {
            "revoked": [
                {
                    "serial": r.serial,
                    "spiffe_id": r.spiffe_id,
                    "not_after": r.not_after,
                    "revoked_at": r.revoked_at,
                }
                for r in revoked
            ]
        }
        if spiffe_id is not None:
            doc["blocked"] = {"spiffe_id": spiffe_id, "until": until.isoformat() if until else None}
        ledger.record_event(
            "revoke",
            {
                "serial": serial,
                "spiffe_id": spiffe_id,
                "serials": [r.serial for r in revoked],
                **({"blocked_until": doc["blocked"]["until"]} if spiffe_id else {}),
            },
        )
        return doc
    finally:
        ledger.close()


def unrevoke(where: Path | store.StateStore, spiffe_id: str) -> dict[str, Any]:
    """Let `spiffe_id` get certificates again (those already revoked stay revoked).

    NotFound if it was not blocked, BadRequest for a bad or foreign ID."""
    authority = Authority.load(where)
    sid = _spiffe_id(authority, spiffe_id)
    ledger = authority.source.ledger()
    try:
        if not ledger.unban(str(sid)):
            raise NotFound(f"{sid} is not blocked")
        ledger.record_event("unrevoke", {"spiffe_id": str(sid)})
        return {"spiffe_id": str(sid), "unblocked": True}
    finally:
        ledger.close()
