"""Polls the CA's trust bundle (with ETag) and publishes it into the TrustStore.

New roots are trusted for new handshakes at once (the TrustStore tells the
credential store, which republishes the same key and certificate with new
contexts; open connections keep theirs). A revoked serial makes the listeners
refuse new handshakes from that certificate and close the connections already
open with it. When the CA's certificate does not verify against what we trust
(a sidecar started from a bootstrap bundle older than a root rotation), the
poll follows the CA's endorsements from a root we trust to the new one
(`meshca.client.fetch_bundle`). Never dies: errors are logged and the next poll
tries again, with the last good bundle kept meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence

from meshca.client import CAError, CAReplicas, fetch_bundle
from meshca.trust import BundleDoc, BundleError
from sidecar.identity.trust import TrustStore

log = logging.getLogger("sidecar.bundle")

ROLLBACK_POLLS = 3  # polls in a row with the same older sequence before we follow the CA


class BundleWatcher:
    """GET /v1/bundle every `interval` seconds; If-None-Match makes an unchanged bundle cheap."""

    def __init__(
        self,
        ca_url: str | Sequence[str],
        trust: TrustStore,
        interval: float = 30.0,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        # Replicas (each URL's addresses, too): each in turn until one answers, starting
        # from the one that answered last.
        self.replicas = CAReplicas(ca_url)
        self.urls = self.replicas.urls
        self.trust = trust
        self.interval = interval
        self.clock = clock
        self.etag: str | None = None
        self.last_error: str | None = None
        self.last_success: str | None = None
        self.polls = 0
        self.discoveries = 0  # new roots accepted through endorsements
        self.ca_id = f"spiffe://{trust.trust_domain}/ns/mesh-system/sa/meshca"
        self._lock = asyncio.Lock()
        self._older: tuple[int, int] | None = None  # (sequence, polls in a row) below ours
        self._last_catch_up = -1e9
        self._after: list[Callable[[], None]] = []

    @property
    def sequence(self) -> int | None:
        """The sequence of the bundle in force (None while only the bootstrap file is)."""
        return self.trust.current.sequence

    def after_each(self, fn: Callable[[], None]) -> None:
        """Call `fn()` after each poll that brought a document (not a 304), once it was
        taken in or refused; an error in `fn` is logged, not raised."""
        self._after.append(fn)

    async def poll(self, use_etag: bool = True) -> bool:
        """One poll; True if the bundle or the revocations changed. CAError, BundleError."""
        async with self._lock:
            now = self.clock()
            doc, etag, discovered = await self._fetch(now, use_etag)
            self.polls += 1
            self.last_success = now.strftime("%Y-%m-%dT%H:%M:%SZ")
            if doc is None:
                return False
            try:
                return self._take(doc, etag, discovered, now)
            finally:
                for fn in self._after:
                    try:
                        fn()
                    except Exception:
                        log.exception("after a bundle poll: %r failed", fn)

    def _take(self, doc: BundleDoc, etag: str | None, discovered: bool, now: dt.datetime) -> bool:
        """Take in a fetched document; True if the bundle or the revocations changed."""
        if discovered:
            self.discoveries += 1
            log.warning(
                "the CA's certificate did not verify against our bundle; accepted its "
                "roots (sequence %d) through endorsements from a root we trust",
                doc.sequence,
            )
        old = self.trust.current.revoked
        changed = self.trust.offer(
            doc.roots_pem, now, doc.sequence, doc.revoked, allow_older=self._insists(doc)
        )
        self._older = None
        added = doc.revoked - old
        if added:
            log.warning("certificates revoked by the CA: %s", ", ".join(sorted(added)))
        self.etag = etag
        return changed

    async def _fetch(
        self, now: dt.datetime, use_etag: bool
    ) -> tuple[BundleDoc | None, str | None, bool]:
        """GET /v1/bundle from the replica that answered last, else from each other one."""
        return await fetch_bundle(
            self.replicas,
            self.trust.pem,
            now,
            self.trust.trust_domain,
            self.etag if use_etag else None,
            ca_id=self.ca_id,
        )

    def _insists(self, doc: BundleDoc) -> bool:
        """True once the CA has answered the same older sequence on ROLLBACK_POLLS polls
        in a row (its state was restored from a backup): then we follow it, loudly."""
        held = self.trust.current.sequence
        if held is None or doc.sequence >= held:
            return False
        seq, n = self._older or (doc.sequence, 0)
        n = n + 1 if seq == doc.sequence else 1
        self._older = (doc.sequence, n)
        if n >= ROLLBACK_POLLS:
            log.warning(
                "the CA has served bundle sequence %d (older than our %d) %d times in a row; "
                "following it (was its state restored from a backup?)",
                doc.sequence,
                held,
                n,
            )
            return True
        return False

    async def catch_up(self) -> bool:
        """Poll now, without the ETag (the CA's certificate did not verify): True if the
        trusted roots changed, so that the caller may try again. At most once per poll
        interval: each discovery costs signature checks a stranger on the path could
        otherwise make us repeat at will."""
        if time.monotonic() - self._last_catch_up < self.interval:
            return False
        self._last_catch_up = time.monotonic()
        before = self.trust.pem
        try:
            await self.poll(use_etag=False)
        except (CAError, BundleError) as e:
            self._failed(e)
            return False
        return self.trust.pem != before

    def _failed(self, e: Exception) -> None:
        self.last_error = f"{type(e).__name__}: {e}"
        log.warning("bundle poll failed (keeping the last good bundle): %s", self.last_error)

    async def run(self) -> None:
        """Poll at once and then forever (also before the first certificate: the poll needs
        none); never dies."""
        while True:
            try:
                await self.poll()
                self.last_error = None
            except (CAError, BundleError) as e:
                self._failed(e)
            except Exception:
                log.exception("bundle poll failed")
            await asyncio.sleep(self.interval)
