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

import asyncio
import datetime as dt
import hashlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.errors import BadRequest, Unauthenticated
from meshca.spiffe import InvalidSpiffeId, SpiffeId

log = logging.getLogger("meshca.credentials")

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
    token: str, key: Any, algorithms: Sequence[str], audience: str | Sequence[str], issuer: str
) -> dict[str, Any]:
    """Verify signature, algorithm, audience and issuer; times are checked by the caller."""
    try:
        return jwt.decode(
            token,
            key,
            algorithms=list(algorithms),
            audience=audience,
            issuer=issuer,
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": ["exp", "iat", "sub"],
            },
        )
    except jwt.InvalidSignatureError:
        raise _invalid("token signature does not verify") from None
    except jwt.InvalidAudienceError:
        raise _invalid("token audience is not accepted") from None
    except jwt.InvalidIssuerError:
        raise _invalid("token issuer is not trusted") from None
    except jwt.InvalidAlgorithmError:
        raise _invalid("token algorithm is not accepted") from None
    except jwt.MissingRequiredClaimError as e:
        raise _invalid(f"token lacks the {e.claim!r} claim") from None
    except (jwt.PyJWTError, TypeError, ValueError):
        raise _invalid("bearer token is not a valid JWT") from None


def _check_times(claims: dict[str, Any], now: dt.datetime, leeway: dt.timedelta) -> None:
    """Check exp / nbf / iat against the injected clock, with `leeway` for clock skew."""
    ts = now.timestamp()
    skew = leeway.total_seconds()
    try:
        exp = float(claims["exp"])
        iat = float(claims["iat"])
        nbf = float(claims.get("nbf", iat))
    except (TypeError, ValueError):
        raise _invalid("token time claims are not numbers") from None
    if exp <= ts - skew:
        raise _invalid("token has expired")
    if nbf > ts + skew or iat > ts + skew:
        raise _invalid("token is not valid yet")


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

    def verify(self, token: str, now: dt.datetime) -> JoinClaims:
        """Check signature, audience, issuer, times and the bound ID; not single use (ledger)."""
        claims = _decode(token, self._public, ["ES256"], JOIN_AUDIENCE, self.issuer)
        # The CA minted it on its own clock: no skew to allow for.
        _check_times(claims, now, dt.timedelta(0))
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


class JwksSource:
    """Where the Kubernetes issuer's public keys come from."""

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The verification key for `kid` (None: the only key), or None if unknown."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources."""


def _pick(keyset: jwt.PyJWKSet | None, kid: str | None) -> jwt.PyJWK | None:
    if keyset is None:
        return None
    keys = keyset.keys
    if kid is None:
        return keys[0] if len(keys) == 1 else None
    for k in keys:
        if k.key_id == kid:
            return k
    return None


def parse_jwks(data: bytes, where: str) -> jwt.PyJWKSet:
    """Parse a JWKS document; ValueError naming `where` if it is not one."""
    try:
        doc = json.loads(data)
        return jwt.PyJWKSet.from_dict(doc)
    except (ValueError, jwt.PyJWTError, TypeError, AttributeError) as e:
        raise ValueError(f"{where} is not a usable JWKS: {e}") from None


class FileJwks(JwksSource):
    """A JWKS file, re-read when it changes (a mounted ConfigMap updates in place)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._set: jwt.PyJWKSet | None = None
        self._load()  # fail closed at start-up if the file is bad

    def _load(self) -> None:
        st = self.path.stat()
        if st.st_mtime_ns != self._mtime:
            self._set = parse_jwks(self.path.read_bytes(), str(self.path))
            self._mtime = st.st_mtime_ns

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid`; a bad new file keeps the last good keys."""
        try:
            self._load()
        except (OSError, ValueError) as e:
            log.warning("keeping previous JWKS: %s", e)
        return _pick(self._set, kid)


MAX_JWKS_BYTES = 1 << 20


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise ValueError(f"{resp.url} answered more than {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class UrlJwks(JwksSource):
    """A JWKS fetched over HTTPS, cached, refreshed periodically and on an unknown `kid`.

    With `discover`, `url` is the issuer and the JWKS address is read from its
    `/.well-known/openid-configuration` (OIDC discovery, as the API server serves).
    Refetches are rate-limited; when the endpoint is down the cached keys keep working.
    """

    def __init__(
        self,
        url: str,
        ca_file: Path | None = None,
        bearer_file: Path | None = None,
        refresh: float = 300.0,
        min_interval: float = 10.0,
        discover: bool = False,
    ) -> None:
        if not url.startswith("https://"):
            raise ValueError("JWKS URL must be https://")
        self.url = url
        self._discover = discover
        self._jwks_uri: str | None = None if discover else url
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._bearer_file = bearer_file
        self._refresh = refresh
        self._min_interval = min_interval
        self._set: jwt.PyJWKSet | None = None
        self._fetched_at = -1e9
        self._tried_at = -1e9
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def _get(self, url: str) -> bytes:
        headers = {"Accept": "application/json"}
        if self._bearer_file is not None:
            headers["Authorization"] = "Bearer " + self._bearer_file.read_text().strip()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        async with self._session.get(url, headers=headers, ssl=self._ssl) as resp:
            if resp.status != 200:
                raise ValueError(f"{url} answered {resp.status}")
            return await _read_capped(resp, MAX_JWKS_BYTES)

    async def _fetch(self) -> None:
        self._tried_at = time.monotonic()
        if self._jwks_uri is None:
            where = self.url.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = json.loads(await self._get(where))
                jwks_uri = doc["jwks_uri"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{where} has no usable jwks_uri ({e})") from None
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
                raise ValueError(f"{where}: jwks_uri must be an https:// URL")
            self._jwks_uri = jwks_uri
        self._set = parse_jwks(await self._get(self._jwks_uri), self._jwks_uri)
        self._fetched_at = time.monotonic()

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid`, refetching when stale or unknown (at most every min_interval)."""
        now = time.monotonic()
        stale = now - self._fetched_at > self._refresh
        found = _pick(self._set, kid)
        if (found is None or stale) and now - self._tried_at >= self._min_interval:
            async with self._lock:
                if time.monotonic() - self._tried_at >= self._min_interval:
                    try:
                        await self._fetch()
                    except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as e:
                        log.warning("JWKS fetch from %s failed, using cached keys: %s", self.url, e)
            found = _pick(self._set, kid)
        return found

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()


_KEY_TYPE_OF_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


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
        if _KEY_TYPE_OF_ALG.get(alg[:2]) != jwk.key_type:
            raise _invalid("token algorithm does not match its signing key")
        claims = _decode(token, jwk.key, [alg], self.audiences, self.issuer)
        _check_times(claims, now, CLOCK_LEEWAY)
        k8s = claims.get("kubernetes.io")
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
