"""JWKS key sources (shared by the CA and the sidecar): a file, or an HTTPS URL with a cache.

`get(kid)` is synchronous and never does network I/O, so a data path can call
it per request; `refresh()` fetches (at most every `min_interval` seconds) and
is awaited only when a `kid` is unknown. A URL source whose keys are older than
`refresh` seconds starts a background refresh the next time a key is asked for
(the caller does not wait for it); when the endpoint is down the cached keys
keep working. A bad new document never replaces the last good one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import jwt

from meshca import https

log = logging.getLogger("meshca.jwks")

MAX_JWKS_BYTES = 1 << 20
FETCH_TIMEOUT = 5.0  # seconds for one fetch: connect, TLS, the answer
MAX_REDIRECTS = 3
REDIRECTS = frozenset((301, 302, 303, 307, 308))


def parse_jwks(data: bytes, where: str) -> jwt.PyJWKSet:
    """Parse a JWKS document; ValueError naming `where` if it is not one."""
    try:
        doc = json.loads(data)
        return jwt.PyJWKSet.from_dict(doc)
    except (ValueError, jwt.PyJWTError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"{where} is not a usable JWKS: {e}") from None


def index(keyset: jwt.PyJWKSet) -> dict[str | None, jwt.PyJWK]:
    """Each key by its `kid` (the first, if a document repeats one), and under None the
    only key, if there is only one (a token without a kid may use it, and no other).

    Built once per document, so a lookup per request is one dictionary access. A kid that
    is not a string in the document is left out: a token's kid always is one, and never
    matches it."""
    keys = keyset.keys
    out: dict[str | None, jwt.PyJWK] = {}
    for k in keys:
        kid = k.key_id
        if isinstance(kid, str):
            out.setdefault(kid, k)
    if len(keys) == 1:
        out[None] = keys[0]
    return out


class JwksSource:
    """Where an issuer's public keys come from."""

    def get(self, kid: str | None) -> jwt.PyJWK | None:
        """The cached key for `kid`, or None."""
        raise NotImplementedError

    async def refresh(self) -> bool:
        """Fetch again if allowed now; True if a fetch was attempted."""
        return False

    async def key(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid`, refreshing once if it is unknown."""
        found = self.get(kid)
        if found is None and await self.refresh():
            found = self.get(kid)
        return found

    async def close(self) -> None:
        """Release resources."""


class FileJwks(JwksSource):
    """A JWKS file, re-read when it changes (a mounted ConfigMap updates in place)."""

    def __init__(self, path: Path, check_every: float = 1.0) -> None:
        self.path = path
        self._mtime: int | None = None
        self._checked = 0.0
        self._check_every = check_every
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._load()  # fail closed at start-up if the file is bad

    def _load(self) -> None:
        st = self.path.stat()
        if st.st_mtime_ns != self._mtime:
            self._keys = index(parse_jwks(self.path.read_bytes(), str(self.path)))
            self._mtime = st.st_mtime_ns

    def get(self, kid: str | None) -> jwt.PyJWK | None:
        """The key for `kid`; the file is looked at no more than once a second."""
        now = time.monotonic()
        if now - self._checked >= self._check_every:
            self._checked = now
            try:
                self._load()
            except (OSError, ValueError) as e:
                log.warning("keeping the previous JWKS: %s", e)
        return self._keys.get(kid)

    async def refresh(self) -> bool:
        """Look at the file again now."""
        self._checked = 0.0
        return True


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an https:// URL: a bearer token goes to one origin only."""
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or 443


class UrlJwks(JwksSource):
    """A JWKS fetched over HTTPS, cached, refreshed periodically and on an unknown `kid`.

    With `discover`, `url` is the issuer and the JWKS address is read from its
    `/.well-known/openid-configuration` (OIDC discovery, as the API server serves).
    `ssl_context` (or `ca_file`) decides whom to trust for the fetch: a context, or a
    function returning the current one, called for every fetch.

    Each fetch is one request on a connection of its own (`meshca.https`: no HTTP
    client library, whose 10 MiB a sidecar would hold for a fetch every few minutes);
    each document (the discovery document, the JWKS) within FETCH_TIMEOUT seconds,
    following up to MAX_REDIRECTS redirects to https:// URLs. The bearer token goes
    only to the origin (scheme, host, port) of the URL it was sent to first.
    """

    def __init__(
        self,
        url: str,
        ca_file: Path | None = None,
        bearer_file: Path | None = None,
        refresh: float = 300.0,
        min_interval: float = 10.0,
        discover: bool = False,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
    ) -> None:
        if not url.startswith("https://"):
            raise ValueError("JWKS URL must be https://")
        self.url = url
        self._discover = discover
        self._jwks_uri: str | None = None if discover else url
        self._ssl = ssl_context or ssl.create_default_context(
            cafile=str(ca_file) if ca_file else None
        )
        self._bearer_file = bearer_file
        self._refresh = refresh
        self._min_interval = min_interval
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = -1e9
        self._tried_at = -1e9
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[bool] | None = None

    async def _get(self, url: str) -> bytes:
        headers = {"Accept": "application/json"}
        if self._bearer_file is not None:
            bearer = self._bearer_file.read_text().strip()
            if not bearer or not bearer.isascii() or not bearer.isprintable():
                # (never quoted: the file holds a credential)
                raise ValueError(f"{self._bearer_file} does not hold a usable bearer token")
            headers["Authorization"] = "Bearer " + bearer
        # A function gives the trust in force now (the sidecar's mesh bundle), per fetch.
        ctx = self._ssl() if callable(self._ssl) else self._ssl
        async with asyncio.timeout(FETCH_TIMEOUT):  # the redirects included
            for _ in range(MAX_REDIRECTS + 1):
                try:
                    answer = await https.fetch(
                        "GET",
                        url,
                        ssl_context=ctx,
                        headers=headers,
                        timeout=FETCH_TIMEOUT,
                        cap=MAX_JWKS_BYTES,
                    )
                except https.BodyTooLarge:
                    raise ValueError(f"{url} answered more than {MAX_JWKS_BYTES} bytes") from None
                location = answer.headers.get("location")
                if answer.status in REDIRECTS and location:
                    target = urljoin(url, location)
                    if not target.startswith("https://"):
                        raise ValueError(f"{url} redirects to a URL that is not https://")
                    if _origin(target) != _origin(url):
                        # the credential is for the issuer's server, not where it points
                        headers.pop("Authorization", None)
                    url = target
                    continue
                if answer.status != 200:
                    raise ValueError(f"{url} answered {answer.status}")
                return answer.body
        raise ValueError(f"{url}: more than {MAX_REDIRECTS} redirects")

    async def _fetch(self) -> None:
        self._tried_at = time.monotonic()
        if self._jwks_uri is None:
            where = self.url.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = json.loads(await self._get(where))
                jwks_uri = doc["jwks_uri"]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise ValueError(f"{where} has no usable jwks_uri ({type(e).__name__})") from None
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith("https://"):
                raise ValueError(f"{where}: jwks_uri must be an https:// URL")
            self._jwks_uri = jwks_uri
        self._keys = index(parse_jwks(await self._get(self._jwks_uri), self._jwks_uri))
        self._fetched_at = time.monotonic()

    def get(self, kid: str | None) -> jwt.PyJWK | None:
        """The cached key; a stale cache starts a background refresh (never waits for it)."""
        if time.monotonic() - self._fetched_at > self._refresh and (
            self._background is None or self._background.done()
        ):
            try:
                self._background = asyncio.get_running_loop().create_task(self.refresh())
            except RuntimeError:  # no running loop (a synchronous caller): skip
                pass
        return self._keys.get(kid)

    async def refresh(self) -> bool:
        """Fetch now unless one was tried within `min_interval`; True if tried.

        A fetch already under way (say, the background refresh) is waited for.
        """
        if self._lock.locked():
            async with self._lock:
                return True
        if time.monotonic() - self._tried_at < self._min_interval:
            return False
        async with self._lock:
            if time.monotonic() - self._tried_at < self._min_interval:
                return True  # another caller just fetched
            try:
                await self._fetch()
            except (OSError, ValueError, TimeoutError) as e:
                log.warning("JWKS fetch from %s failed, using cached keys: %s", self.url, e)
            except Exception:  # a refresh (often a background one) never dies
                log.exception("JWKS fetch from %s failed, using cached keys", self.url)
        return True

    async def close(self) -> None:
        """Stop a background refresh (each fetch closes its own connection)."""
        if self._background is not None:
            self._background.cancel()
