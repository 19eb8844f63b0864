"""Revocation in the ledger: by serial, or every unexpired certificate of a SPIFFE ID.

The CA's bundle endpoint then lists the revoked serials that have not expired;
sidecars refuse and disconnect them, and the CA refuses their renewal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshca import store
from meshca.authority import Authority
from meshca.errors import BadRequest, NotFound
from meshca.spiffe import InvalidSpiffeId, SpiffeId


def revoke(home: Path, serial: str | None, spiffe_id: str | None) -> dict[str, Any]:
    """Revoke by serial or by SPIFFE ID in the ledger; what was revoked.

    NotFound for an unknown serial, BadRequest for a bad or foreign ID."""
    authority = Authority.load(home)
    ledger = store.Ledger(home / store.LEDGER_FILE)
    try:
        if serial is not None:
            rec = ledger.revoke_serial(serial)
            if rec is None:
                raise NotFound(f"no certificate with serial {serial} in the ledger")
            revoked = [rec]
        else:
            assert spiffe_id is not None
            try:
                sid = SpiffeId.parse(spiffe_id)
            except InvalidSpiffeId as e:
                raise BadRequest(f"spiffe_id: {e}") from None
            if sid.trust_domain != authority.trust_domain:
                raise BadRequest(f"spiffe_id: not in trust domain {authority.trust_domain}")
            revoked = ledger.revoke_id(str(sid))
        doc = {
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
        ledger.record_event(
            "revoke",
            {"serial": serial, "spiffe_id": spiffe_id, "serials": [r.serial for r in revoked]},
        )
        return doc
    finally:
        ledger.close()
