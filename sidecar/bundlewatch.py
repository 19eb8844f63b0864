"""Polls the CA's trust bundle (with ETag) and applies new roots and revocations.

New roots are trusted for new handshakes at once (the same key and certificate
are republished with the new bundle; open connections keep theirs). A revoked
serial makes the listeners refuse new handshakes from that certificate and
close the connections already open with it. Never dies: errors are logged and
the next poll tries again, with the last good bundle kept meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import ssl
from collections.abc import Callable

import aiohttp

from sidecar.creds import CredentialError, CredentialStore

log = logging.getLogger("sidecar.bundle")


class BundleWatcher:
    """GET /v1/bundle every `interval` seconds; If-None-Match makes an unchanged bundle cheap."""

    def __init__(
        self,
        ca_url: str,
        bootstrap_bundle: str,
        store: CredentialStore,
        interval: float = 30.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.url = ca_url.rstrip("/") + "/v1/bundle"
        self.bootstrap = bootstrap_bundle
        self.store = store
        self.interval = interval
        self.clock = clock
        self.etag: str | None = None
        self.sequence: int | None = None
        self.last_error: str | None = None
        self.polls = 0

    def _trust(self) -> ssl.SSLContext:
        creds = self.store.current
        return ssl.create_default_context(cadata=creds.bundle_pem if creds else self.bootstrap)

    async def poll(self) -> bool:
        """One poll; True if something changed."""
        headers = {"If-None-Match": self.etag} if self.etag else {}
        timeout = aiohttp.ClientTimeout(total=10)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.url, headers=headers, ssl=self._trust()) as resp,
        ):
            self.polls += 1
            if resp.status == 304:
                return False
            if resp.status != 200:
                raise ValueError(f"the CA answered {resp.status}")
            doc = json.loads(await resp.read())
            etag = resp.headers.get("ETag")
        roots, revoked = doc["roots"], doc.get("revoked", [])
        if not isinstance(roots, str) or not isinstance(revoked, list):
            raise ValueError("the bundle document lacks roots or revoked")
        changed = False
        try:
            if self.store.adopt_bundle(roots, self.clock()):
                changed = True
                log.info("new trust bundle adopted (sequence %s)", doc.get("sequence"))
        except CredentialError as e:
            # Our own certificate does not chain to the new bundle: keep the old one
            # until the certificate manager renews (and gets the bundle with it).
            log.error("not adopting the new trust bundle yet: %s", e)
            raise
        new_revoked = frozenset(str(s).lower() for s in revoked)
        if new_revoked != self.store.revoked:
            added = new_revoked - self.store.revoked
            if added:
                log.warning("certificates revoked by the CA: %s", ", ".join(sorted(added)))
            self.store.set_revoked(new_revoked)
            changed = True
        self.etag = etag
        self.sequence = doc.get("sequence")
        return changed

    async def run(self) -> None:
        """Poll forever; never dies."""
        while True:
            await asyncio.sleep(self.interval)
            if self.store.current is None:
                continue
            try:
                await self.poll()
                self.last_error = None
            except (
                aiohttp.ClientError,
                OSError,
                TimeoutError,
                ValueError,
                KeyError,
                CredentialError,
            ) as e:
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning(
                    "bundle poll failed (keeping the last good bundle): %s", self.last_error
                )
            except Exception:
                log.exception("bundle poll failed")
