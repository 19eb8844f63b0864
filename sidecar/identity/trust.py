"""The one owner of the pod's trust bundle: the roots it trusts and the serials the CA revoked.

Everything that verifies a peer reads the current bundle here at each new
connection: inbound and outbound handshakes (through the credential store,
which rebuilds its TLS contexts on every change), the client to the CA
(enrollment, renewal, JWT-SVIDs, the bundle poll itself), JWKS fetches from the
CA, and `sidecar check`. The writers (the bundle poll, and an enrollment that
comes back with the CA's bundle) hand in a candidate; it is checked first and
published with one assignment, or refused with the last good bundle kept.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from meshca import pki
from meshca.client import ca_context
from meshca.trust import BundleError, fingerprints, load_roots

log = logging.getLogger("sidecar.trust")


@dataclass(frozen=True)
class TrustBundle:
    """One checked generation of trust: roots (PEM and parsed), where it came from, revocations."""

    roots: tuple[x509.Certificate, ...] = field(repr=False)
    pem: str = field(repr=False)
    source: str  # "bootstrap" (the file in the config) or "ca"
    sequence: int | None = None  # the CA's bundle sequence, None for the bootstrap file
    revoked: frozenset[str] = frozenset()  # serials (lowercase hex) the CA revoked
    # (subject, SHA-256) of each root, read once: `/status` then runs no X.509 code, which
    # would map cryptography's pages back into the process after start-up released them
    root_names: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not self.root_names and self.roots:
            names = tuple(
                (c.subject.rfc4514_string(), fp)
                for c, fp in zip(self.roots, fingerprints(self.roots), strict=True)
            )
            object.__setattr__(self, "root_names", names)

    @classmethod
    def check(
        cls,
        pem: str,
        now: dt.datetime,
        source: str,
        sequence: int | None = None,
        revoked: frozenset[str] = frozenset(),
        where: str = "the bundle",
    ) -> TrustBundle:
        """A bundle whose roots passed `meshca.trust.load_roots`; BundleError otherwise.

        What is kept (and handed to OpenSSL) is the PEM of the parsed roots, never the
        text as given: the two parsers disagree on odd PEM (headers, indentation, text
        before a block), and what was checked must be exactly what is trusted.
        """
        roots = load_roots(pem, now, where)
        canonical = pki.pem_join(roots)
        try:
            ca_context(canonical)  # the TLS layer must accept it too, before anyone relies on it
        except (ssl.SSLError, ValueError) as e:
            raise BundleError(f"{where}: the TLS library refuses it ({e})") from None
        return cls(roots, canonical, source, sequence, revoked)

    def describe(self) -> dict[str, object]:
        """What `/status` shows: where the bundle came from and which roots it holds."""
        return {
            "source": self.source,
            "sequence": self.sequence,
            "roots": [{"subject": name, "sha256": fp} for name, fp in self.root_names],
            "revoked": sorted(self.revoked),
        }


class TrustStore:
    """Holds the current TrustBundle; readers take `current` (or a context) per connection."""

    def __init__(self, bootstrap: TrustBundle, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._current = bootstrap
        self._ca_context: tuple[TrustBundle, ssl.SSLContext] | None = None
        self._roots_listeners: list[Callable[[TrustBundle], None]] = []
        self._revoked_listeners: list[Callable[[frozenset[str]], None]] = []
        self.publishes = 0
        self.last_refusal: str | None = None

    @property
    def current(self) -> TrustBundle:
        """The bundle in force now."""
        return self._current

    @property
    def pem(self) -> str:
        """The current roots as PEM (what the client to the CA trusts)."""
        return self._current.pem

    def ca_context(self) -> ssl.SSLContext:
        """A client context for the CA and for JWKS fetches from it: verifies the server's
        chain against the current roots and its host name. Made once per bundle."""
        cached = self._ca_context
        if cached is not None and cached[0] is self._current:
            return cached[1]
        bundle = self._current
        ctx = ca_context(bundle.pem)
        self._ca_context = (bundle, ctx)
        return ctx

    def on_roots(self, fn: Callable[[TrustBundle], None]) -> None:
        """Call `fn(bundle)` after every change of the trusted roots."""
        self._roots_listeners.append(fn)

    def on_revoked(self, fn: Callable[[frozenset[str]], None]) -> None:
        """Call `fn(serials)` after every change of the revoked serials."""
        self._revoked_listeners.append(fn)

    def offer(
        self,
        pem: str,
        now: dt.datetime,
        sequence: int | None,
        revoked: frozenset[str] | None = None,
        where: str = "the CA's bundle",
        allow_older: bool = False,
    ) -> bool:
        """Check a bundle from the CA and publish it; True if anything changed.

        BundleError (the last good bundle stays, `last_refusal` says why) if the
        roots are unusable, or if the sequence is older than the one held (a stale
        answer must not undo a rotation) unless `allow_older` (the bundle poll has
        seen the CA insist on it: a CA restored from a backup). `revoked` None keeps
        the current revocations (an enrollment answer carries roots only).
        """
        held = self._current
        try:
            if (
                not allow_older
                and sequence is not None
                and held.sequence is not None
                and sequence < held.sequence
            ):
                raise BundleError(
                    f"{where} has sequence {sequence}, older than the {held.sequence} we hold"
                )
            checked = TrustBundle.check(pem, now, "ca", where=where)
        except BundleError as e:
            self.last_refusal = str(e)
            log.error("keeping the current trust bundle: %s", e)
            raise
        candidate = TrustBundle(
            checked.roots,
            checked.pem,
            "ca",
            sequence if sequence is not None else held.sequence,
            held.revoked if revoked is None else revoked,
            checked.root_names,
        )
        self.last_refusal = None
        return self.publish(candidate)

    def publish(self, bundle: TrustBundle) -> bool:
        """Swap in a checked bundle (one assignment), then tell the listeners what changed."""
        held = self._current
        roots_changed = bundle.pem != held.pem
        revoked_changed = bundle.revoked != held.revoked
        if not roots_changed and not revoked_changed and bundle.sequence == held.sequence:
            return False
        self._current = bundle
        self.publishes += 1
        if roots_changed:
            log.info(
                "trust bundle now %d root(s) (sequence %s, from %s)",
                len(bundle.roots),
                bundle.sequence,
                bundle.source,
            )
            for fn in self._roots_listeners:
                self._tell(fn, bundle)
        if revoked_changed:
            for tell in self._revoked_listeners:
                self._tell(tell, bundle.revoked)
        return roots_changed or revoked_changed

    @staticmethod
    def _tell(fn: Callable[[Any], None], value: object) -> None:
        # One listener's failure must not keep the others (closing revoked peers, say)
        # from hearing of a bundle that is already in force.
        try:
            fn(value)
        except Exception:
            log.exception("a trust-bundle listener failed")
