"""`meshca rotate`: carry out one rotation step on a state directory, safely.

Safe to run repeatedly (it only acts when a step is due), twice at the same
time (an exclusive lock on the state directory; the second run waits, then
decides on what the first left), and after a crash at any point: new keys and
certificates are written to new files first, and only then is state.json
replaced atomically, so a crash leaves either the old state or the new one,
never a mix (files of an interrupted step are simply unused). Each step is
recorded in the ledger and returned for printing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
from pathlib import Path
from typing import Any

from cryptography import x509

from meshca import pki, store
from meshca import rotation_plan as rotation
from meshca.authority import Authority, ca_name
from meshca.errors import StateError, Unavailable

FAULT_ENV = "MESHCA_FAULT"  # fault injection for crash tests: "rotate:<point>"


def _fault(point: str) -> None:
    """Die by SIGKILL at `point` when the crash tests ask for it."""
    if os.environ.get(FAULT_ENV) == f"rotate:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _write_pair(sd: store.StateStore, kind: str, key: Any, cert: x509.Certificate) -> str:
    name = ca_name(kind, cert)
    # replace: a leftover of an interrupted run with the same key is impossible in
    # practice (fresh keys), but must never block a rotation.
    sd.write_pair(name, pki.key_pem(key), pki.cert_pem(cert), replace=True)
    return name


def _write_cert(sd: store.StateStore, kind: str, cert: x509.Certificate) -> str:
    name = f"{ca_name(kind, cert)}-{pki.serial_hex(cert)[:8]}"
    sd.write_cert(name, pki.cert_pem(cert), replace=True)
    return name


def _unexpired(sd: store.StateStore, names: tuple[str, ...], now: dt.datetime) -> tuple[str, ...]:
    """The endorsements still worth publishing (an unreadable one is dropped, not fatal)."""
    keep = []
    for name in names:
        try:
            if sd.cert(name).not_valid_after_utc > now:
                keep.append(name)
        except StateError:
            continue
    return tuple(keep)


def _intermediates_under(sd: store.StateStore, root: x509.Certificate) -> list[str]:
    return [pki.serial_hex(c) for c in sd.certs("issuing") if c.issuer == root.subject]


def old_root_leaves_until(
    sd: store.StateStore, old_root: x509.Certificate, ledger: store.LedgerStore
) -> dt.datetime | None:
    """The latest not_after of unexpired, unrevoked workload leaves under `old_root`."""
    latest = ledger.latest_not_after(_intermediates_under(sd, old_root))
    return _parse_time(latest) if latest else None


def facts_for(authority: Authority, ledger: store.LedgerStore, now: dt.datetime) -> rotation.Facts:
    """What the pure planner needs, read from the state directory and the ledger."""
    state = authority.state
    rot = state.root_rotation
    issuing_root = authority.roots[state.roots.index(state.issuing_root)]
    until, count = None, 0
    if rot["stage"] == rotation.ACTIVATED:
        sd = authority.source
        old = sd.cert(rot["old_root"])
        until = old_root_leaves_until(sd, old, ledger)
        count = ledger.leaves_in_use(_intermediates_under(sd, old))
    return rotation.Facts(
        now=now,
        root_not_before=issuing_root.not_valid_before_utc,
        root_not_after=issuing_root.not_valid_after_utc,
        intermediate_not_before=authority.intermediate.not_valid_before_utc,
        intermediate_not_after=authority.intermediate.not_valid_after_utc,
        stage=rot["stage"],
        stage_since=_parse_time(rot["since"]) if "since" in rot else None,
        old_root_leaves_until=until,
        old_root_leaves=count,
    )


def rotate(
    where: Path | store.StateStore,
    settings: rotation.Settings | None = None,
    force_intermediate: bool = False,
    start_root_rotation: bool = False,
    dry_run: bool = False,
    clock: store.Clock = store.utcnow,
    wait_for_lock: bool = True,
    force_retire: bool = False,
) -> dict[str, Any]:
    """Take at most one step; a dict describing what was (or would be) done."""
    settings = settings or rotation.Settings()
    sd = store.open_state(where)
    with sd.locked(wait=wait_for_lock):
        authority = Authority.load(sd)
        ledger = sd.ledger(clock)
        try:
            now = clock()
            p = rotation.plan(
                facts_for(authority, ledger, now),
                settings,
                force_intermediate,
                start_root_rotation,
                force_retire,
            )
            result: dict[str, Any] = {
                "action": p.action,
                "reason": p.reason,
                "dry_run": dry_run,
                "stage_before": authority.state.root_rotation["stage"],
            }
            if p.action == rotation.Action.NONE or dry_run:
                result["stage"] = result["stage_before"]
                result["next_due"] = pki.rfc3339(p.next_due) if p.next_due else None
                return result
            before = sd.revision()
            try:
                new_state, details = _apply(p.action, authority, now)
                _fault("before-state")
                sd.write_state(new_state)
            except OSError as e:
                # A full disk, say: the state record is the old one (written last,
                # atomically), so nothing changed; the step's new files are removed.
                # (Unless the record was replaced and only its fsync failed: then the
                # files are the CA's, and stay.)
                sd.abandon()
                changed = sd.revision() != before
                raise StateError(
                    f"cannot write the new CA files in {sd.describe()} ({e.strerror}); "
                    + (
                        "the new state is in place but may not survive a power loss"
                        if changed
                        else "nothing changed"
                    )
                ) from None
            except BaseException:
                sd.abandon()  # (a store that cannot be reached: nothing was committed)
                raise
            _fault("after-state")
            result.update(details)
            result["stage"] = new_state.root_rotation["stage"]
            result["bundle_sequence"] = new_state.sequence
            try:
                ledger.record_event(p.action, {k: v for k, v in result.items() if k != "dry_run"})
            except Unavailable:
                result["ledger_event"] = "not recorded: the ledger cannot be written"
            return result
        finally:
            ledger.close()


def _apply(action: str, authority: Authority, now: dt.datetime) -> tuple[store.State, dict]:
    sd, state = authority.source, authority.state
    rot = state.root_rotation
    if action == rotation.Action.ROTATE_INTERMEDIATE:
        root_name = state.issuing_root
        root, root_key = sd.cert(root_name), sd.key(root_name)
        key = pki.new_key()
        cert = pki.build_intermediate(key, root, root_key, now)
        name = _write_pair(sd, "issuing", key, cert)
        return dataclasses.replace(state, intermediate=name), {
            "intermediate": pki.serial_hex(cert),
            "under_root": root_name,
            "old_intermediate": pki.serial_hex(authority.intermediate),
        }
    if action == rotation.Action.PREPARE_ROOT:
        key = pki.new_key()
        cert = pki.build_root(key, now)
        name = _write_pair(sd, "root", key, cert)
        # The old root endorses the new one, so that clients whose bootstrap bundle still
        # holds only the old root can accept the new one (meshca.trust.endorsed_roots).
        endorsement = pki.build_endorsement(
            cert, sd.cert(state.issuing_root), sd.key(state.issuing_root), now
        )
        end_name = _write_cert(sd, "endorse", endorsement)
        rec = {
            "stage": rotation.PREPARED,
            "old_root": state.issuing_root,
            "new_root": name,
            "since": pki.rfc3339(now),
        }
        return dataclasses.replace(
            state,
            roots=(*state.roots, name),
            sequence=state.sequence + 1,
            rotation=tuple(rec.items()),
            endorsements=(*_unexpired(sd, state.endorsements, now), end_name),
        ), {
            "new_root": pki.serial_hex(cert),
            "new_root_sha256": pki.fingerprint(cert),
            "endorsed_by": state.issuing_root,
        }
    if action == rotation.Action.ACTIVATE_ROOT:
        new_name = rot["new_root"]
        root, root_key = sd.cert(new_name), sd.key(new_name)
        key = pki.new_key()
        cert = pki.build_intermediate(key, root, root_key, now)
        name = _write_pair(sd, "issuing", key, cert)
        rec = {**rot, "stage": rotation.ACTIVATED, "since": pki.rfc3339(now)}
        return dataclasses.replace(
            state, issuing_root=new_name, intermediate=name, rotation=tuple(rec.items())
        ), {"intermediate": pki.serial_hex(cert), "under_root": new_name}
    if action == rotation.Action.RETIRE_ROOT:
        old = rot["old_root"]
        roots = tuple(r for r in state.roots if r != old)
        if not roots or state.issuing_root == old:
            raise StateError("refusing to retire the root that issues")
        return dataclasses.replace(
            state,
            roots=roots,
            sequence=state.sequence + 1,
            rotation=(("stage", rotation.Stage.NONE.value),),
        ), {"retired_root": old}
    raise ValueError(f"unknown action {action}")
