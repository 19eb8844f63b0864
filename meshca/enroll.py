"""Enrollment: authenticate the caller, check the CSR, sign an SVID, and record it in the ledger.

The identity in the certificate comes only from the credential (join token,
Kubernetes SA token, or the current certificate for a renewal); from the CSR
only the public key is taken. Every outcome, issued or refused, is recorded.
No HTTP here: the server passes in the body, the bearer token and the peer's
verified certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509

from meshca import pki, store, svid
from meshca.authority import Authority
from meshca.errors import (
    BadRequest,
    Forbidden,
    MeshcaError,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from meshca.ratelimit import RateLimiter
from meshca.spiffe import SpiffeId
from meshca.tokens import JoinTokens, K8sTokens, peek_issuer

_T = TypeVar("_T")

log = logging.getLogger("meshca.enroll")

JOIN, K8S, RENEWAL, NONE = "join_token", "k8s_token", "renewal", "none"


@dataclass(frozen=True)
class Issued:
    """An issued SVID and everything the API answers with."""

    spiffe_id: SpiffeId
    certificate: x509.Certificate = field(repr=False)
    chain_pem: str = field(repr=False)
    bundle_pem: str = field(repr=False)
    serial: str
    expires_at: dt.datetime
    bundle_sequence: int = 0

    def to_json(self) -> dict[str, str | int]:
        """The 200 answer of POST /v1/certificates."""
        return {
            "spiffe_id": str(self.spiffe_id),
            "certificate_chain": self.chain_pem,
            "trust_bundle": self.bundle_pem,
            "expires_at": pki.rfc3339(self.expires_at),
            "serial": self.serial,
            "bundle_sequence": self.bundle_sequence,
        }


@dataclass
class _Caller:
    """What is known about the requester so far (for the ledger if refused)."""

    credential: str = NONE
    spiffe_id: SpiffeId | None = None
    dns_names: tuple[str, ...] = ()
    jti: str | None = None
    peer: str | None = None


def json_object(body: bytes, fields: set[str]) -> dict:
    """A JSON object with no keys beyond `fields`; BadRequest naming what is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("body is not valid JSON", code="bad_json") from None
    except RecursionError:  # a few KiB of "[[[[..." is enough to reach it
        raise BadRequest("body is nested too deeply", code="bad_json") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object", code="bad_json")
    unknown = sorted(set(doc) - fields)
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}", code="bad_json")
    return doc


def parse_request(body: bytes) -> str:
    """The `csr` field of a JSON enrollment body; BadRequest naming what is wrong."""
    doc = json_object(body, {"csr"})
    csr = doc.get("csr")
    if not isinstance(csr, str) or not csr.strip():
        raise BadRequest("field 'csr' (a PEM certificate request) is required", code="bad_json")
    return csr


class Enroller:
    """Turns an authenticated request into a signed, recorded certificate."""

    def __init__(
        self,
        authority: Authority | Callable[[], Authority],
        ledger: store.LedgerStore,
        join_tokens: JoinTokens,
        k8s: K8sTokens | None,
        limiter: RateLimiter,
        cert_ttl: dt.timedelta = pki.DEFAULT_LEAF_TTL,
        clock: store.Clock = store.utcnow,
        offload: bool = False,
    ) -> None:
        # The CA server passes a reader of its current generation, so a reload is one swap
        # that the enroller sees with everything else; a fixed Authority suits tests.
        self._authority = authority if callable(authority) else (lambda: authority)
        self.ledger = ledger
        self.join_tokens = join_tokens
        self.k8s = k8s
        self.limiter = limiter
        self.cert_ttl = cert_ttl
        self.clock = clock
        # A ledger over the network (PostgreSQL) is called on a worker thread, so that a
        # slow or unreachable database never stalls the event loop (and every other request).
        self.offload = offload

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)`: on a worker thread when the ledger is remote, else here."""
        if self.offload:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    @property
    def authority(self) -> Authority:
        """The CA's current signing material."""
        return self._authority()

    async def enroll(
        self,
        body: bytes,
        bearer: str | None,
        peer_cert: x509.Certificate | None,
        peer: str | None = None,
    ) -> Issued:
        """Issue a certificate or raise a MeshcaError; both outcomes go to the ledger."""
        caller = _Caller(peer=peer)
        try:
            csr = parse_request(body)
            await self._authenticate(caller, bearer, peer_cert)
            assert caller.spiffe_id is not None
            await self.call(self.check_not_blocked, caller.spiffe_id)
            wait = self.limiter.check(str(caller.spiffe_id))
            if wait > 0:
                raise RateLimited(f"too many requests for {caller.spiffe_id}", retry_after=wait)
            public_key = pki.check_csr(csr)
            return await self.call(self._issue, caller, public_key)
        except MeshcaError as err:
            await self.call(self.record_refusal, err, caller.credential, caller.spiffe_id, peer)
            raise

    def record_refusal(
        self, err: MeshcaError, credential: str, spiffe_id: SpiffeId | None, peer: str | None
    ) -> None:
        """Write a refusal to the ledger and the log (the detail is safe to show)."""
        sid = str(spiffe_id) if spiffe_id else None
        log.info(
            "refused enrollment: %s (%s) id=%s credential=%s peer=%s",
            err.code,
            err.detail,
            sid,
            credential,
            peer,
        )
        try:
            self.ledger.record_refusal(sid, credential, err.code, err.detail, peer)
        except Unavailable:
            pass  # the ledger cannot be written (logged there); the refusal stands

    async def _authenticate(
        self, caller: _Caller, bearer: str | None, peer_cert: x509.Certificate | None
    ) -> None:
        now = self.clock()
        if bearer is not None:
            issuer = peek_issuer(bearer)
            if issuer == self.join_tokens.issuer:
                caller.credential = JOIN
                claims = self.join_tokens.verify(bearer, now)
                caller.spiffe_id, caller.jti = claims.spiffe_id, claims.jti
                caller.dns_names = claims.dns_names
                status = await self.call(self.ledger.join_token_status, claims.jti)
                if status == "used":
                    raise Unauthenticated("join token has already been used", code="invalid_token")
                if status == "unknown":
                    raise Unauthenticated(
                        "join token is not known to this CA", code="invalid_token"
                    )
                return
            if self.k8s is not None and issuer == self.k8s.issuer:
                caller.credential = K8S
                caller.spiffe_id = await self.k8s.verify(bearer, now)
                return
            raise Unauthenticated("token issuer is not trusted", code="invalid_token")
        if peer_cert is not None:
            caller.credential = RENEWAL
            with contextlib.suppress(ValueError):  # name the caller in the ledger if refused
                caller.spiffe_id = pki.spiffe_id_of(peer_cert)
            caller.spiffe_id, caller.dns_names = await self.call(
                self.check_peer_svid, peer_cert, now
            )
            return
        raise Unauthenticated(
            "missing credential: send 'Authorization: Bearer <token>' or present your "
            "current certificate over mTLS to renew",
            code="missing_credential",
        )

    def check_not_blocked(self, sid: SpiffeId) -> None:
        """Forbidden (`revoked_identity`) while an admin's revocation blocks `sid`."""
        ban = self.ledger.ban_of(str(sid))
        if ban is not None:
            until = f" until {ban[1]}" if ban[1] else " until an admin runs `meshca unrevoke`"
            raise Forbidden(
                f"{sid} was revoked at {ban[0]}; no new certificate{until}",
                code="revoked_identity",
            )

    def check_peer_svid(
        self, cert: x509.Certificate, now: dt.datetime
    ) -> tuple[SpiffeId, tuple[str, ...]]:
        """The TLS layer verified the chain; check it is a current SVID this CA issued.

        Returns the ID and the DNS names; Unauthenticated / Forbidden otherwise.
        """
        try:
            sid = svid.verify_peer(cert, self.authority.trust_domain, now=now)
        except svid.SvidError as e:
            if e.code == "not_svid":
                raise Unauthenticated(
                    "client certificate is not an X.509-SVID", code="bad_certificate"
                ) from None
            if e.code == "not_valid_now":
                raise Unauthenticated(
                    "client certificate is not valid now", code="bad_certificate"
                ) from None
            raise Forbidden(
                "client certificate is not a workload SVID of this trust domain"
            ) from None
        record = self.ledger.certificate(pki.serial_hex(cert))
        if record is None:
            raise Forbidden("client certificate was not issued by this CA")
        if record.revoked_at is not None:
            raise Forbidden("client certificate has been revoked", code="revoked")
        self.check_not_blocked(sid)
        return sid, svid.dns_sans(cert)

    def _issue(self, caller: _Caller, public_key: pki.LeafPublicKey) -> Issued:
        assert caller.spiffe_id is not None
        authority = self.authority
        now = self.clock()
        cert = authority.issue(public_key, caller.spiffe_id, now, self.cert_ttl, caller.dns_names)
        rec = store.IssuedRecord(
            serial=pki.serial_hex(cert),
            spiffe_id=str(caller.spiffe_id),
            not_before=store.iso(cert.not_valid_before_utc),
            not_after=store.iso(cert.not_valid_after_utc),
            issued_at=store.iso(now),
            credential=caller.credential,
            issuer=pki.serial_hex(authority.intermediate),
            sha256=pki.fingerprint(cert),
            peer=caller.peer,
        )
        try:
            self.ledger.record_issued(rec, caller.jti)
        except store.TokenAlreadyUsed:
            # Lost a race with a concurrent request on the same token: refuse, hand out nothing.
            raise Unauthenticated(
                "join token has already been used", code="invalid_token"
            ) from None
        except store.UnknownToken:
            raise Unauthenticated(
                "join token is not known to this CA", code="invalid_token"
            ) from None
        log.info(
            "issued serial=%s id=%s credential=%s not_after=%s",
            rec.serial,
            rec.spiffe_id,
            rec.credential,
            rec.not_after,
        )
        return Issued(
            spiffe_id=caller.spiffe_id,
            certificate=cert,
            chain_pem=authority.chain_pem(cert),
            bundle_pem=authority.bundle_pem(),
            serial=rec.serial,
            expires_at=cert.not_valid_after_utc,
            bundle_sequence=authority.state.sequence,
        )
