"""The certificate manager: enroll with the token, renew over mTLS at about half-life, never die.

Timing is pure (`renew_delay`, `backoff`) and table-tested; the loop does the
I/O. A fresh key is made for every request. When the CA is unreachable the
loop retries with capped, jittered exponential backoff and the sidecar keeps
serving on the current certificate until it expires; a renewal the CA refuses,
or an expired certificate, falls back to enrolling with the token again (the
kubelet refreshes projected tokens in place).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from meshca.client import (
    CAError,
    CARefused,
    CAUnavailable,
    EnrollmentClient,
    new_key_and_csr,
    private_key_pem,
)
from meshca.trust import BundleError
from sidecar.config import CAConfig
from sidecar.identity.creds import CredentialError, Credentials, CredentialStore, chain_valid

log = logging.getLogger("sidecar.certmanager")

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    """The real clock, UTC-aware."""
    return dt.datetime.now(dt.UTC)


def renew_delay(
    not_before: dt.datetime,
    not_after: dt.datetime,
    now: dt.datetime,
    fraction: float = 0.5,
    jitter: float = 0.1,
    rand: float = 0.5,
) -> float:
    """Seconds from `now` until renewal: `fraction` of the lifetime, +-`jitter` of it.

    `rand` in [0, 1) picks the point in the jitter window (0.5 = the middle).
    Never negative; never later than 90 % of the lifetime, so there is time to retry.
    """
    life = (not_after - not_before).total_seconds()
    offset = life * (fraction + jitter * (2 * rand - 1))
    offset = min(max(offset, 0.0), life * 0.9)
    at = not_before + dt.timedelta(seconds=offset)
    return max(0.0, (at - now).total_seconds())


def backoff(attempt: int, base: float = 0.5, cap: float = 60.0, rand: float = 1.0) -> float:
    """Capped exponential backoff with "equal jitter": between half and all of
    `min(cap, base * 2**(attempt-1))`, so retries spread out but never hammer the CA."""
    step = min(cap, base * (2 ** min(max(attempt - 1, 0), 30)))
    return step / 2 + rand * step / 2


@dataclass
class Status:
    """What the admin endpoint reports about the certificate manager."""

    state: str = "enrolling"  # enrolling | ready | renewal_failing | expired
    last_error: str | None = None
    last_renewal: str | None = None
    next_renewal: str | None = None
    failures: int = 0
    renewals: int = 0


class CertManager:
    """Keeps `store` holding a valid certificate for as long as the process runs."""

    def __init__(
        self,
        ca: CAConfig,
        store: CredentialStore,
        clock: Clock = utcnow,
        client: EnrollmentClient | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.ca = ca
        self.store = store
        self.clock = clock
        # The client to the CA trusts whatever the trust store holds at each request.
        self.client = client or EnrollmentClient(ca.url, lambda: store.trust.pem)
        self.rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self.status = Status()
        self._received_at: dt.datetime | None = None
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[str]] = []
        self._after: list[Callable[[], None]] = []
        store.on_stale(self._wake.set)  # the CA retired the root of our certificate

    def _token(self) -> str:
        try:
            token = self.ca.token_file.read_text().strip()
        except OSError as e:
            raise CARefused(0, "no_token", f"cannot read token file ({e.strerror})") from None
        if not token:
            raise CARefused(0, "no_token", "token file is empty")
        return token

    async def obtain(self) -> Credentials:
        """One enrollment or renewal attempt; publishes and returns the new credentials."""
        key, csr = new_key_and_csr()
        key_pem = private_key_pem(key)
        current = self.store.current
        now = self.clock()
        # Renewal needs a certificate the CA still accepts: unexpired, and chaining to the
        # roots we (and so the CA) trust. After a retirement that stranded it, use the token.
        usable = current is not None and now < current.not_after and current.chains_now(now)
        if usable and current is not None:
            try:
                got = await self.client.renew(csr, current.chain_pem, current.key_pem)
            except CARefused as e:
                log.warning("renewal refused (%s); enrolling with the token instead", e.code)
                got = await self.client.enroll(csr, self._token())
        else:
            got = await self.client.enroll(csr, self._token())
        now = self.clock()
        try:
            creds = Credentials.build(
                key_pem,
                got.chain_pem,
                got.bundle_pem,
                self.store.trust_domain,
                now,
                alpn=self.store.alpn,
            )
        except CredentialError as e:
            raise CAUnavailable(f"the CA's certificate is unusable: {e}") from None
        # The answer carries the CA's current roots: the trust store checks them (and
        # that they are not older than what it holds) and publishes them for everyone.
        try:
            self.store.trust.offer(
                got.bundle_pem, now, got.bundle_sequence, where="the bundle in the CA's answer"
            )
        except BundleError as e:
            log.warning("not adopting the bundle that came with the certificate: %s", e)
        if not chain_valid(
            creds.leaf, list(creds.intermediates), list(self.store.trust.current.roots), now
        ):
            # The trust store kept roots this certificate does not chain to (say, the
            # answer came from a CA replica that lags behind): not a usable result.
            raise CAUnavailable(
                "the new certificate does not chain to the trust bundle we hold; retrying"
            )
        self.store.publish(creds)
        if not self._waiters:
            # New roots in the answer may have made the old certificate look stranded for
            # a moment (which asks for a renewal): this one is that renewal.
            self._wake.clear()
        self._received_at = self.clock()
        return creds

    def after_each(self, fn: Callable[[], None]) -> None:
        """Call `fn()` each time a certificate was obtained, once the manager is done with
        it (published, logged, waiters told); an error in `fn` is logged, not raised."""
        self._after.append(fn)

    async def rotate_now(self) -> str:
        """Renew at once; the new serial, or CAError."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._wake.set()
        return await fut

    async def run(self) -> None:
        """The loop: runs until cancelled, never raises."""
        attempt = 0
        while True:
            current = self.store.current
            now = self.clock()
            if current is not None and not self._wake.is_set():
                # The lifetime counts from when we got the certificate: notBefore is
                # back-dated for clock skew, which would make short lifetimes look half gone.
                delay = renew_delay(
                    max(current.not_before, self._received_at or now),
                    current.not_after,
                    now,
                    self.ca.renew_fraction,
                    rand=self.rng.random(),
                )
                if attempt:  # the last try failed: back off, however overdue renewal is
                    delay = backoff(attempt, cap=self.ca.retry_max, rand=self.rng.random())
                self.status.next_renewal = (now + dt.timedelta(seconds=delay)).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            try:
                creds = await self.obtain()
            except CAError as e:
                attempt += 1
                self.status.failures += 1
                self.status.last_error = str(e)
                self._note_failure()
                for w in waiters:
                    if not w.done():
                        w.set_exception(e)
                if self.store.current is None:
                    await asyncio.sleep(
                        backoff(attempt, cap=self.ca.retry_max, rand=self.rng.random())
                    )
                continue
            except Exception as e:  # never let the loop die
                attempt += 1
                self.status.failures += 1
                self.status.last_error = f"internal error: {type(e).__name__}"
                log.exception("certificate manager error")
                for w in waiters:
                    if not w.done():
                        w.set_exception(CAError(self.status.last_error))
                await asyncio.sleep(backoff(attempt, cap=self.ca.retry_max, rand=self.rng.random()))
                continue
            attempt = 0
            self.status.state = "ready"
            self.status.last_error = None
            self.status.renewals += 1
            self.status.last_renewal = self.clock().strftime("%Y-%m-%dT%H:%M:%SZ")
            log.info(
                "certificate for %s serial=%s not_after=%s",
                creds.spiffe_id,
                creds.serial,
                creds.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
            )
            for w in waiters:
                if not w.done():
                    w.set_result(creds.serial)
            for fn in self._after:
                try:
                    fn()
                except Exception:
                    log.exception("after a new certificate: %r failed", fn)

    def _note_failure(self) -> None:
        current = self.store.current
        if current is None:
            self.status.state = "enrolling"
            log.warning("enrollment failed, retrying: %s", self.status.last_error)
        elif self.clock() >= current.not_after:
            self.status.state = "expired"
            log.error("certificate EXPIRED and renewal failing: %s", self.status.last_error)
        else:
            self.status.state = "renewal_failing"
            left = (current.not_after - self.clock()).total_seconds()
            log.warning(
                "renewal failed, serving on the current certificate (%.0f s left): %s",
                left,
                self.status.last_error,
            )
