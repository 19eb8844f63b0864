"""The running CA swaps its generation in one step: after a rotation the enrollment API, the
bundle and new handshakes all use the new authority; a state that does not load changes
nothing at all."""

import asyncio
import os

from meshca import rotation, store
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
