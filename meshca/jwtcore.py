"""JWT verification core (shared by the CA's token checks and the sidecar's authenticator).

One table of accepted algorithms and the key type each needs, and one `decode()`
that checks signature, algorithm, audience and issuer with pyjwt and the times
against an injected clock, turning every failure into a `TokenError` whose
message is safe to show (it never contains the token). Callers wrap it in their
own error type (the CA's 401, the sidecar's `invalid_token`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jwt

# Asymmetric algorithms and the JWK key type (`kty`) their key must have.
ASYMMETRIC = {
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "PS384": "RSA",
    "PS512": "RSA",
    "ES256": "EC",
    "ES384": "EC",
    "ES512": "EC",
    "EdDSA": "OKP",
}
HMAC = ("HS256", "HS384", "HS512")
KNOWN = frozenset(ASYMMETRIC) | frozenset(HMAC)


class TokenError(ValueError):
    """A token failed a check; the message says which, and is safe to show."""


def key_fits(alg: str, key_type: str | None) -> bool:
    """Does a JWK of `key_type` fit algorithm `alg` (an RSA key for RS256, ...)?"""
    return ASYMMETRIC.get(alg) == key_type


def decode(
    token: str,
    key: Any,
    alg: str,
    audiences: Sequence[str] | None,
    issuer: str,
    now: float,
    leeway: float,
    require: Sequence[str] = ("exp",),
    malformed: str = "malformed token",
) -> dict[str, Any]:
    """Verify `token` signed with `alg` by `key`; its claims, or TokenError.

    pyjwt checks the signature, audience (if `audiences`) and issuer; the times
    (`exp`, `nbf`, `iat`) are checked here against `now` (seconds since the epoch,
    from the caller's clock, so tests can move it) with `leeway` seconds of skew.
    """
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=list(audiences) if audiences else None,
            issuer=issuer,
            options={
                "require": list(require),
                "verify_aud": bool(audiences),
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise TokenError("token signature does not verify") from None
    except jwt.InvalidAudienceError:
        raise TokenError("token audience is not accepted") from None
    except jwt.InvalidIssuerError:
        raise TokenError("token issuer is not trusted") from None
    except jwt.InvalidAlgorithmError:
        raise TokenError("token algorithm is not accepted") from None
    except jwt.MissingRequiredClaimError as e:
        raise TokenError(f"token lacks the {e.claim!r} claim") from None
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        raise TokenError(malformed) from None
    try:
        exp = float(claims["exp"])
        nbf = float(claims.get("nbf", claims.get("iat", 0)))
        iat = float(claims.get("iat", 0))
    except (TypeError, ValueError):
        raise TokenError("token time claims are not numbers") from None
    if now >= exp + leeway:
        raise TokenError("token has expired")
    if nbf > now + leeway or iat > now + leeway:
        raise TokenError("token is not valid yet (nbf or iat in the future)")
    return claims
