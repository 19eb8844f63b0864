"""Bearer credentials the CA accepts at enrollment: its own join tokens and Kubernetes SA tokens.

- Join tokens are ES256 JWTs signed with the CA's token-signing key, bound to one
  SPIFFE ID, short-lived, and single-use (the ledger records each `jti` when used).
- Kubernetes projected ServiceAccount tokens are verified against the cluster's
  JWKS (a file, or an HTTPS URL that is cached and refreshed) with issuer and
  audience checks; the SPIFFE ID comes from the `kubernetes.io` claims.

Every failure is `Unauthenticated` with code `invalid_token` and a detail that
never contains the token.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca import jwtcore
from meshca.errors import BadRequest, Unauthenticated
from meshca.jwks import JwksSource
from meshca.spiffe import InvalidSpiffeId, SpiffeId

if TYPE_CHECKING:
    from meshca.store import LedgerStore

log = logging.getLogger("meshca.tokens")

JOIN_AUDIENCE = "meshca"
MAX_JOIN_TTL = dt.timedelta(hours=24)
DEFAULT_JOIN_TTL = dt.timedelta(minutes=10)
MAX_TOKEN_BYTES = 16 * 1024
CLOCK_LEEWAY = dt.timedelta(seconds=60)


def join_issuer(trust_domain: str) -> str:
    """The `iss` of this CA's join tokens."""
    return f"meshca-join/{trust_domain}"


def _invalid(detail: str) -> Unauthenticated:
    return Unauthenticated(detail, code="invalid_token")


def peek_issuer(token: str) -> str:
    """The unverified `iss` claim, only to pick which verifier to use."""
    if len(token) > MAX_TOKEN_BYTES:
        raise _invalid("bearer token is too long")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise _invalid("bearer token is not a valid JWT") from None
    iss = claims.get("iss")
    if not isinstance(iss, str):
        raise _invalid("bearer token has no issuer (iss)")
    return iss


def _decode(
    token: str,
    key: Any,
    alg: str,
    audience: str | Sequence[str],
    issuer: str,
    now: dt.datetime,
    leeway: dt.timedelta,
) -> dict[str, Any]:
    """Verify signature, algorithm, audience, issuer and times (meshca.jwtcore)."""
    try:
        return jwtcore.decode(
            token,
            key,
            alg,
            [audience] if isinstance(audience, str) else audience,
            issuer,
            now.timestamp(),
            leeway.total_seconds(),
            require=("exp", "iat", "sub"),
            malformed="bearer token is not a valid JWT",
        )
    except jwtcore.TokenError as e:
        raise _invalid(str(e)) from None


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A stable key id: the first 16 hex digits of SHA-256 of the SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True)
class MintedToken:
    """A join token and what the ledger records of it (the jti, never the token)."""

    token: str = field(repr=False)
    jti: str
    spiffe_id: SpiffeId
    expires_at: dt.datetime


@dataclass(frozen=True)
class JoinClaims:
    """What a verified join token grants."""

    spiffe_id: SpiffeId
    jti: str
    dns_names: tuple[str, ...] = ()


class JoinTokens:
    """Mints and verifies this CA's single-use join tokens."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, trust_domain: str) -> None:
        self._key = key
        self._public = key.public_key()
        self.trust_domain = trust_domain
        self.issuer = join_issuer(trust_domain)
        self.kid = key_id(self._public)

    def __repr__(self) -> str:
        return f"JoinTokens(trust_domain={self.trust_domain!r}, kid={self.kid!r})"

    def mint(
        self,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_JOIN_TTL,
        dns_names: Sequence[str] = (),
    ) -> MintedToken:
        """A new token for `spiffe_id`; the caller records its jti in the ledger."""
        if spiffe_id.trust_domain != self.trust_domain or not spiffe_id.is_workload:
            raise BadRequest(
                f"{spiffe_id} is not a workload ID in trust domain {self.trust_domain}"
            )
        if not dt.timedelta(seconds=1) <= ttl <= MAX_JOIN_TTL:
            raise BadRequest(
                f"token TTL must be between 1 s and {int(MAX_JOIN_TTL.total_seconds())} s"
            )
        jti = secrets.token_hex(16)
        expires_at = now + ttl
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": JOIN_AUDIENCE,
            "sub": str(spiffe_id),
            "iat": int(now.timestamp()),
            "exp": int(expires_at.timestamp()),
            "jti": jti,
        }
        if dns_names:
            claims["dns"] = list(dns_names)
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})
        return MintedToken(token, jti, spiffe_id, expires_at)

    def mint_recorded(
        self,
        ledger: LedgerStore,
        spiffe_id: SpiffeId,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_JOIN_TTL,
        dns_names: Sequence[str] = (),
    ) -> MintedToken:
        """`mint`, and record the token's jti in `ledger` (what `meshca token` does): only a
        recorded token is accepted."""
        minted = self.mint(spiffe_id, now, ttl, dns_names)
        ledger.add_join_token(minted.jti, str(spiffe_id), minted.expires_at)
        return minted

    def verify(self, token: str, now: dt.datetime) -> JoinClaims:
        """Check signature, audience, issuer, times and the bound ID; not single use (ledger)."""
        # The CA minted it on its own clock: no skew to allow for.
        claims = _decode(
            token, self._public, "ES256", JOIN_AUDIENCE, self.issuer, now, dt.timedelta(0)
        )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _invalid("token lacks the 'jti' claim")
        try:
            sid = SpiffeId.parse(claims["sub"])
        except InvalidSpiffeId:
            raise _invalid("token subject is not a SPIFFE ID") from None
        if sid.trust_domain != self.trust_domain:
            raise _invalid("token subject is not in this trust domain")
        dns = claims.get("dns", [])
        if not isinstance(dns, list) or not all(isinstance(d, str) for d in dns):
            raise _invalid("token 'dns' claim must be a list of names")
        return JoinClaims(sid, jti, tuple(dns))


class K8sTokens:
    """Verifies projected ServiceAccount tokens and maps them to SPIFFE IDs."""

    def __init__(
        self,
        issuer: str,
        audiences: Sequence[str],
        jwks: JwksSource,
        trust_domain: str,
        algorithms: Sequence[str] = ("RS256", "ES256"),
    ) -> None:
        self.issuer = issuer
        self.audiences = list(audiences)
        self.jwks = jwks
        self.trust_domain = trust_domain
        self.algorithms = list(algorithms)

    async def verify(self, token: str, now: dt.datetime) -> SpiffeId:
        """The SPIFFE ID `spiffe://<td>/ns/<namespace>/sa/<name>` of a valid SA token."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("bearer token is not a valid JWT") from None
        if header.get("alg") not in self.algorithms:
            raise _invalid("token algorithm is not accepted")
        kid = header.get("kid")
        jwk = await self.jwks.key(kid if isinstance(kid, str) else None)
        if jwk is None:
            raise _invalid("token signing key is not in the cluster's JWKS")
        alg = header["alg"]
        if not jwk.fits(alg):
            raise _invalid("token algorithm does not match its signing key")
        claims = _decode(token, jwk.key, alg, self.audiences, self.issuer, now, CLOCK_LEEWAY)
        k8s: Any = claims.get("kubernetes.io")
        try:
            namespace = k8s["namespace"]
            account = k8s["serviceaccount"]["name"]
        except (TypeError, KeyError):
            raise _invalid(
                "token lacks kubernetes.io namespace and serviceaccount claims"
            ) from None
        if not isinstance(namespace, str) or not isinstance(account, str):
            raise _invalid("token kubernetes.io claims must be strings")
        if claims["sub"] != f"system:serviceaccount:{namespace}:{account}":
            raise _invalid("token subject does not match its kubernetes.io claims")
        try:
            return SpiffeId.for_service_account(self.trust_domain, namespace, account)
        except InvalidSpiffeId:
            raise _invalid("token namespace or service account is not a valid name") from None
