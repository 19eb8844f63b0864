"""The running CA swaps its generation in one step: after a rotation the enrollment API, the
bundle and new handshakes all use the new authority; a state that does not load changes
nothing at all."""

import asyncio
import os

from meshca import rotation_plan as rotation
from meshca import store
from meshca.authority import init_ca
from meshca.config import build_serve_config
from meshca.rotate import rotate
from meshca.server import CAServer


def bump_mtime(path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_swaps_everything_at_once(tmp_path):
    home = tmp_path / "ca"
    init_ca(home)
    ca = CAServer(build_serve_config(str(home)))
    try:
        first = ca.active
        assert ca.enroller.authority is first.authority
        rotate(home, rotation.Settings(), start_root_rotation=True)
        bump_mtime(home / store.STATE_FILE)
        assert ca.reload_if_changed()
        second = ca.active
        assert second is not first and second.ssl_context is not first.ssl_context
        assert ca.enroller.authority is second.authority is ca.authority
        assert len(second.authority.roots) == 2 and len(second.authority.endorsements) == 1
        # The bundle document carries the endorsement of the new root.
        body = asyncio.run(_bundle(ca))
        assert body.count(b"BEGIN CERTIFICATE") == 3  # two roots + one endorsement

        # A broken state.json: nothing changes, not even part of it.
        (home / store.STATE_FILE).write_text("{not json")
        bump_mtime(home / store.STATE_FILE)
        assert not ca.reload_if_changed()
        assert ca.active is second and ca.enroller.authority is second.authority
    finally:
        asyncio.run(ca.close())


async def _bundle(ca: CAServer) -> bytes:
    from aiohttp.test_utils import make_mocked_request

    resp = await ca.get_bundle(make_mocked_request("GET", "/v1/bundle"))
    return resp.body


def test_a_reload_that_fails_for_a_passing_reason_is_tried_again(tmp_path, monkeypatch):
    """A new state that cannot be applied for a reason that may pass (the ledger, a full disk,
    a key file's permissions) is tried again at the next check, without state.json changing."""
    import sqlite3

    home = tmp_path / "ca"
    init_ca(home)
    ca = CAServer(build_serve_config(str(home)))
    try:
        first = ca.active
        rotate(home, rotation.Settings(), force_intermediate=True)
        bump_mtime(home / store.STATE_FILE)
        real = ca._activate
        calls = []

        def flaky(authority):
            calls.append(1)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database or disk is full")
            return real(authority)

        monkeypatch.setattr(ca, "_activate", flaky)
        assert not ca.reload_if_changed()
        assert ca.active is first
        assert ca.reload_if_changed()  # same state.json, tried again
        assert ca.active.authority.intermediate != first.authority.intermediate
    finally:
        asyncio.run(ca.close())
