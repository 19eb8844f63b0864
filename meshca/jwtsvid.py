"""JWT-SVIDs: short-lived JWTs the CA signs for a workload's own SPIFFE ID (pure; no I/O).

Claims: `iss` = `meshca/<trust-domain>` (the CA's issuer name), `sub` = the
caller's SPIFFE ID, `aud` = the audience asked for, `iat`, `exp` (default 5
minutes, never over 1 hour), a random `jti`. Signed ES256 with the CA's
jwt-signing key, whose public half is served at `GET /v1/jwks` (`kid` = the
first 16 hex digits of SHA-256 of the public key).
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.errors import BadRequest
from meshca.spiffe import SpiffeId
from meshca.tokens import key_id

DEFAULT_TTL = dt.timedelta(minutes=5)
MAX_TTL = dt.timedelta(hours=1)
MAX_AUDIENCE = 256


def issuer_name(trust_domain: str) -> str:
    """The `iss` of this CA's JWT-SVIDs."""
    return f"meshca/{trust_domain}"


@dataclass(frozen=True)
class MintedJwt:
    """A JWT-SVID and when it expires."""

    token: str = field(repr=False)
    expires_at: dt.datetime


def check_audience(value: Any) -> str:
    """A usable audience string, or BadRequest naming what is wrong."""
    if not isinstance(value, str) or not value.strip():
        raise BadRequest("field 'audience' (a non-empty string) is required", code="bad_json")
    if len(value) > MAX_AUDIENCE or any(c.isspace() or ord(c) < 32 for c in value):
        raise BadRequest(
            f"audience must be at most {MAX_AUDIENCE} characters without spaces", code="bad_json"
        )
    return value


class JwtIssuer:
    """Signs JWT-SVIDs; its repr never shows the key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, trust_domain: str) -> None:
        self._key = key
        self.trust_domain = trust_domain
        self.issuer = issuer_name(trust_domain)
        self.kid = key_id(key.public_key())

    def __repr__(self) -> str:
        return f"JwtIssuer(issuer={self.issuer!r}, kid={self.kid!r})"

    def mint(
        self,
        sub: SpiffeId,
        audience: str,
        now: dt.datetime,
        ttl: dt.timedelta = DEFAULT_TTL,
    ) -> MintedJwt:
        """Sign a JWT-SVID for `sub`; BadRequest for a bad audience or lifetime."""
        check_audience(audience)
        if sub.trust_domain != self.trust_domain or not sub.is_workload:
            raise BadRequest(f"{sub} is not a workload ID in trust domain {self.trust_domain}")
        if not dt.timedelta(seconds=1) <= ttl <= MAX_TTL:
            raise BadRequest(
                f"JWT lifetime must be between 1 and {int(MAX_TTL.total_seconds())} seconds",
                code="bad_json",
            )
        exp = now + ttl
        claims = {
            "iss": self.issuer,
            "sub": str(sub),
            "aud": audience,
            "iat": int(now.timestamp()),
            "exp": int(exp.timestamp()),
            "jti": secrets.token_hex(12),
        }
        token = jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})
        return MintedJwt(token, dt.datetime.fromtimestamp(int(exp.timestamp()), dt.UTC))

    def jwks(self) -> dict[str, Any]:
        """The public key set served at GET /v1/jwks."""
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update(kid=self.kid, alg="ES256", use="sig")
        return {"keys": [jwk]}
