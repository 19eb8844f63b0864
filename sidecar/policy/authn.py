"""JWT authentication on the inbound path (RequestAuthentication, Istio's word for it).

For each configured issuer: `issuer`, `audiences`, keys from `jwks_uri` or
`jwks_file`, `algorithms` (default ES256, RS256, EdDSA), an HMAC secret only if
an HS* algorithm is configured explicitly, clock `leeway`, where the token is
read (`from_header`, `prefix`), whether it is forwarded, and a header that gets
the verified claims (base64url JSON).

Outcomes: no token, the request goes on unauthenticated and policy decides;
any invalid token, 401 with `WWW-Authenticate: Bearer error="invalid_token"`.
`none` is never accepted; a public key is never used as an HMAC secret (the
algorithm must be one configured for the issuer, and asymmetric algorithms
only ever get JWKS keys of a matching type). Verified claims are cached per
token until it expires, together with the key that verified them: a cache hit
holds only while the issuer's key set still has that same key, so a key that
left the JWKS (after a successful refresh) takes every token it signed with it,
cached or not. While the JWKS endpoint is down, the last good key set stays, and
so do the tokens it verified. A token enters the cache the second time it
verifies, not the first (see `SEEN_SIZE`): tokens used once each neither fill
the cache nor push out the ones callers reuse.
"""

from __future__ import annotations

import base64
import json
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshca import jwtcore
from meshca.jwtcore import HMAC
from sidecar.config import JwtConfig

if TYPE_CHECKING:  # meshca.jwks (and pyjwt under it) is loaded by from_config, when an
    from meshca.jwks import JwksSource  # issuer is configured: the inbound imports this module

DEFAULT_ALGORITHMS = ("ES256", "RS256", "EdDSA")
# Verified tokens kept, oldest out first. A hit saves the cold path (a signature check and
# the claims: 150-200 us of CPU here, docs/sidecar.md); an entry costs about 1 KiB (the
# token itself, its claims), so 4,096 tokens in use at once come to about 4 MiB of a
# sidecar's 40 MiB budget (issue 16; at 10,000 entries of 1.5 KiB the cache alone held
# 15 MiB). Callers reuse a token for its life, so that covers 4,096 live callers or users
# per pod; past that, tokens are verified on every request, as HAProxy's `jwt_verify`
# always does (it has no cache).
CACHE_SIZE = 4096
# Admission, a doorkeeper as in TinyLFU (Einziger et al.; Caffeine's cache): a verified token
# is cached only if it verified before, within the last two generations of SEEN_SIZE
# tokens verified for the first time (kept in a Bloom filter per generation, `Doorkeeper`:
# 8 KiB each, where sets of their hash() held about 0.5 MiB). A caller that reuses its
# token pays a second verification, once; a stream of tokens used once each (a new token
# per request, JWT-SVIDs minted per call) costs no cache insertion and eviction, does not
# grow the sidecar by the cache's 4 MiB, and does not push out the tokens in use. (It does
# not help callers that reuse their tokens but outnumber CACHE_SIZE: each is admitted, and
# they push each other out, oldest first.) A false positive of the filter (about 0.5 %
# of tokens seen once, below) or a hash collision only admits a token that has just
# verified; it never lets one skip verification.
SEEN_SIZE = CACHE_SIZE


class Doorkeeper:
    """Which hashes were added lately: two generations of `per_generation` additions, each
    in a Bloom filter of 16 bits per addition (at least 1,024) with 4 probes, so a hash
    never added reads as added with a probability of about 0.24 % per generation (0.5 %
    for the two). Memory is the two filters, whatever was added."""

    PROBES = 4

    def __init__(self, per_generation: int) -> None:
        bits = 1024
        while bits < 16 * per_generation:
            bits *= 2
        self.per_generation = per_generation
        self.mask = bits - 1
        self.nbytes = bits // 8
        self._current = bytearray(self.nbytes)
        self._previous = bytearray(self.nbytes)
        self._added = 0

    def _probes(self, h: int) -> list[int]:
        h &= 0xFFFFFFFFFFFFFFFF
        a, b, mask = h & 0xFFFFFFFF, (h >> 32) | 1, self.mask  # double hashing
        return [(a + i * b) & mask for i in range(self.PROBES)]

    @staticmethod
    def _has(bits: bytearray, probes: list[int]) -> bool:
        for p in probes:
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True

    def __contains__(self, h: int) -> bool:
        probes = self._probes(h)
        return self._has(self._current, probes) or self._has(self._previous, probes)

    def seen_again(self, h: int) -> bool:
        """Was `h` added within the last two generations? If not, add it now."""
        probes = self._probes(h)
        current = self._current
        if self._has(current, probes) or self._has(self._previous, probes):
            return True
        for p in probes:
            current[p >> 3] |= 1 << (p & 7)
        self._added += 1
        if self._added >= self.per_generation:
            self._previous = current
            self._current = bytearray(self.nbytes)
            self._added = 0
        return False


class InvalidToken(Exception):
    """401: the reason is safe to show (it never contains the token)."""


class NeedKeys(Exception):
    """The token's `kid` is unknown: refresh `source` (async) and try once more."""

    def __init__(self, source: JwksSource) -> None:
        super().__init__("unknown kid")
        self.source = source


@dataclass(frozen=True)
class IssuerRule:
    """One trusted issuer."""

    issuer: str
    audiences: tuple[str, ...]
    jwks: JwksSource | None
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    hmac_secret: bytes | None = field(default=None, repr=False)
    leeway: float = 60.0
    from_header: bytes = b"authorization"
    prefix: bytes = b"bearer "
    forward: bool = True
    claims_header: bytes | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified token; `key` is the JWKS key that verified it (None for HMAC).

    Kept in the verified-token cache (one per distinct token, up to CACHE_SIZE), so it is
    small: slots rather than a `__dict__`, and `claims` sharing its names and its issuer
    and audience strings with every other token (`compact_claims`).
    """

    issuer: IssuerRule
    claims: dict[str, Any]
    exp: float
    kid: str | None = field(default=None, repr=False)
    key: Any = field(default=None, repr=False, compare=False)

    @property
    def request_principal(self) -> str:
        """`iss/sub`, as Istio's requestPrincipals (for the access log)."""
        return f"{self.claims.get('iss')}/{self.claims.get('sub')}"

    @property
    def principal_parts(self) -> tuple[str, str]:
        """(issuer, subject) kept apart, for policy: the joined string is ambiguous."""
        return str(self.claims.get("iss", "")), str(self.claims.get("sub", ""))


# The registered claim names (RFC 7519 4.1): each decoded token has its own copies of the
# names it uses, which the cache keeps once through these.
_CLAIM_NAMES = {n: n for n in ("iss", "sub", "aud", "exp", "nbf", "iat", "jti")}


def compact_claims(claims: dict[str, Any], rule: IssuerRule) -> dict[str, Any]:
    """`claims` (verified, from `rule`'s issuer), equal, but with the registered claim names
    and the `iss` and `aud` values that are the issuer's own strings shared, not copied
    (with Identity's slots, a cached token of bench/bench_peers.py's kind went from 1,550
    to 1,040 bytes). Once per verified token (the cold path)."""
    names = _CLAIM_NAMES
    out = {names.get(k, k): v for k, v in claims.items()}
    if out.get("iss") == rule.issuer:
        out["iss"] = rule.issuer
    aud = out.get("aud")
    if type(aud) is str:
        for a in rule.audiences:
            if a == aud:
                out["aud"] = a
                break
    return out


def claims_header_value(claims: dict[str, Any]) -> bytes:
    """base64url (unpadded) of the compact JSON claims."""
    raw = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


class Authenticator:
    """Finds and verifies the JWT of a request against the configured issuers."""

    def __init__(
        self,
        issuers: list[IssuerRule],
        max_token_bytes: int = 8192,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuers = {r.issuer: r for r in issuers}
        self.max_token_bytes = max_token_bytes
        self.clock = clock
        self.sources = sorted({(r.from_header, r.prefix) for r in issuers})
        self.strip = frozenset(r.claims_header for r in issuers if r.claims_header)
        self._cache: OrderedDict[str, Identity] = OrderedDict()
        self._seen = Doorkeeper(SEEN_SIZE)  # hash() of tokens verified once, lately

    def find_token(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The token from the configured header; InvalidToken if malformed or duplicated."""
        found: list[bytes] = []
        for name, prefix in self.sources:
            for k, v in headers:
                if k.lower() == name:
                    v = v.strip()
                    if prefix:
                        if v[: len(prefix)].lower() != prefix:
                            if name == b"authorization":
                                continue  # another scheme (Basic ...): not ours to judge
                            raise InvalidToken(
                                f"{name.decode()} must be '{prefix.decode()}<token>'"
                            )
                        v = v[len(prefix) :].strip()
                    found.append(v)
        if not found:
            return None
        if len(found) > 1:
            raise InvalidToken("more than one token in the request")
        token = found[0]
        if len(token) > self.max_token_bytes:
            raise InvalidToken(f"token is larger than {self.max_token_bytes} bytes")
        try:
            return token.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidToken("malformed token (not ASCII)") from None

    def verify(self, token: str) -> Identity:
        """Verify `token` fully, or from the cache; InvalidToken, or NeedKeys (refresh once).

        A token that verified is cached if it was cached already (its key set changed) or
        verified before (`SEEN_SIZE`)."""
        now = self.clock()
        cache = self._cache
        hit = cache.get(token)
        if hit is not None:
            if now < hit.exp + hit.issuer.leeway and self._key_still_there(hit):
                return hit
            del cache[token]
            ident = self._verify(token, now)
        else:
            ident = self._verify(token, now)
            if not self._seen_again(token):
                return ident
        cache[token] = ident
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return ident

    def _seen_again(self, token: str) -> bool:
        """Has `token` verified before (within two generations of SEEN_SIZE tokens)? If not,
        remember that it has now."""
        return self._seen.seen_again(hash(token))  # the cache lookup computed it: kept

    def is_cached(self, token: str) -> bool:
        """Is `token` in the verified-token cache (in use, not a token seen once)?"""
        return token in self._cache

    @staticmethod
    def _key_still_there(hit: Identity) -> bool:
        """The key that verified `hit` is still the one its issuer's JWKS has for that kid.

        Identity, not equality: a new key set document builds new key objects, so the
        first use of a cached token after it verifies it once more (with the key now
        served, which may be a different key under the same kid). A refresh that brings
        the same document keeps the same objects (`JwksSource._take`): nothing to verify.
        Looking the key up also lets a stale key set start its background refresh, as an
        uncached token would.
        """
        if hit.key is None or hit.issuer.jwks is None:  # HMAC: the secret is fixed
            return True
        return hit.issuer.jwks.get(hit.kid) is hit.key

    def _verify(self, token: str, now: float) -> Identity:
        """The cold path: parse once, pick the issuer and key, verify, check the claims."""
        if len(token) > self.max_token_bytes:
            raise InvalidToken(f"token is larger than {self.max_token_bytes} bytes")
        try:
            jws = jwtcore.parse(token)
        except jwtcore.TokenError as e:
            raise InvalidToken(str(e)) from None
        alg = jws.alg
        iss = jws.claims.get("iss")
        rule = self.issuers.get(iss) if isinstance(iss, str) else None
        if rule is None:
            raise InvalidToken("token issuer is not trusted")
        if alg not in rule.algorithms:
            raise InvalidToken(f"token algorithm {alg} is not accepted for this issuer")
        if alg in HMAC:
            if rule.hmac_secret is None:
                raise InvalidToken(f"token algorithm {alg} is not accepted for this issuer")
            key: Any = rule.hmac_secret
            jwk = None
            kid = None
        else:
            if rule.jwks is None:
                raise InvalidToken("no keys configured for this issuer")
            kid = jws.kid
            jwk = rule.jwks.get(kid)
            if jwk is None:
                raise NeedKeys(rule.jwks)
            if not jwk.fits(alg):
                raise InvalidToken("token algorithm does not match its signing key")
            key = jwk.key
        try:
            jwtcore.verify_signature(jws, alg, key)
            exp = jwtcore.check_claims(
                jws.claims, rule.audiences or None, rule.issuer, now, rule.leeway
            )
        except jwtcore.TokenError as e:
            raise InvalidToken(str(e)) from None
        return Identity(rule, compact_claims(jws.claims, rule), exp, kid, jwk)


def from_config(cfg: JwtConfig, mesh_trust: Callable[[], ssl.SSLContext]) -> Authenticator:
    """Build the Authenticator. A `jwks_uri` without its own `jwks_ca` is the CA's (or
    another mesh service's): its fetches trust `mesh_trust()`, the current mesh bundle,
    read at each new connection."""
    from meshca.jwks import FileJwks, UrlJwks

    rules = []
    for ic in cfg.issuers:
        source: JwksSource | None = None
        if ic.jwks_file is not None:
            source = FileJwks(ic.jwks_file)
        elif ic.jwks_uri is not None:
            trust: ssl.SSLContext | Callable[[], ssl.SSLContext]
            if ic.jwks_ca is not None:
                trust = ssl.create_default_context(cafile=str(ic.jwks_ca))
            else:
                trust = mesh_trust
            source = UrlJwks(
                ic.jwks_uri,
                refresh=ic.jwks_refresh,
                min_interval=ic.jwks_min_interval,
                ssl_context=trust,
            )
        secret = ic.hmac_secret_file.read_bytes().strip() if ic.hmac_secret_file else None
        rules.append(
            IssuerRule(
                issuer=ic.issuer,
                audiences=ic.audiences,
                jwks=source,
                algorithms=ic.algorithms,
                hmac_secret=secret,
                leeway=ic.leeway,
                from_header=ic.from_header.lower().encode(),
                prefix=ic.prefix.lower().encode(),
                forward=ic.forward,
                claims_header=ic.claims_header.lower().encode() if ic.claims_header else None,
            )
        )
    return Authenticator(rules, cfg.max_token_bytes)
