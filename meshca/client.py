"""The enrollment client (shared with the sidecar): enroll with a token, renew over mTLS.

Errors are split the way a caller must act on them: `CAUnavailable` (network,
timeout, 5xx, 429: retry later with backoff) and `CARefused` (any other 4xx:
the credential or request is wrong; retrying the same thing will not help).

Every request goes to the CA's replicas (`CAReplicas`) in turn until one answers: each
configured URL, and a URL whose host is a name once per address the name resolves to
(a headless Service gives one per replica), so that a replica answering 503 or 429 is
passed over for the other replicas behind the same name.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca import https, tlsutil
from meshca.trust import MAX_BUNDLE_BYTES, BundleDoc, BundleError, endorsed_roots, load_roots

log = logging.getLogger("meshca.client")

MAX_ANSWER_BYTES = 256 * 1024
# A replica whose address swallows the connection attempt (its node is gone, its address
# not yet out of DNS) is passed over after this long (TLS handshake included), not after
# the whole request's timeout.
CONNECT_TIMEOUT = 3.0
T = TypeVar("T")


class CAError(Exception):
    """Enrollment did not succeed."""


class CAUnavailable(CAError):
    """The CA could not be reached or is overloaded; retry with backoff."""


class CAUntrusted(CAUnavailable):
    """The CA's TLS certificate does not chain to the bundle we trust."""


class CARefused(CAError):
    """The CA refused the request (4xx other than 429)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(f"CA refused ({status} {code}): {detail}")
        self.status, self.code, self.detail = status, code, detail


@dataclass(frozen=True)
class Enrollment:
    """A certificate the CA issued, with the chain and bundle it came with."""

    spiffe_id: str
    chain_pem: str = field(repr=False)
    bundle_pem: str = field(repr=False)
    expires_at: dt.datetime
    serial: str
    bundle_sequence: int | None = None  # None from a CA that does not say


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A fresh ECDSA P-256 key and a CSR for it (its subject is ignored by the CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshca-workload")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, for loading into an SSLContext (never written anywhere lasting)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


TrustSource = str | Callable[[], str]
OnUntrusted = Callable[[], Awaitable[bool]]


def ca_context(bundle_pem: str) -> ssl.SSLContext:
    """A client context that verifies the CA's certificate (chain and host name) against
    `bundle_pem`."""
    ctx = ssl.create_default_context(cadata=bundle_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _untrusted_context() -> ssl.SSLContext:
    # Only for GET /v1/bundle during discovery: what it returns is checked against
    # endorsements from roots we already trust, never believed because of the channel.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _is_cert_error(e: BaseException) -> bool:
    return isinstance(e, ssl.SSLCertVerificationError)


async def fetch_bundle(
    url: str | Sequence[str] | CAReplicas,
    trusted_pem: str,
    now: dt.datetime,
    trust_domain: str | None = None,
    etag: str | None = None,
    timeout: float = 10.0,
    ca_id: str | None = None,
    resolver: Resolver | None = None,
) -> tuple[BundleDoc | None, str | None, bool]:
    """GET /v1/bundle from the CA at `url`: (document or None if unchanged, ETag, discovered).

    `url` is one URL, several, or `CAReplicas` (which remember the replica that answered
    last); each replica is tried in turn until one answers (see `CAReplicas.first_answer`).
    The CA's certificate is verified against `trusted_pem`. If it does not verify
    (the CA issues under a root we have not seen yet), the document is fetched once
    without verifying, accepted only if endorsements lead from a root in
    `trusted_pem` to each of its roots, and then fetched again verifying the CA
    against those roots: `discovered` is True. CAUnavailable for network errors
    and bad documents, CAUntrusted when nothing we trust leads to the CA. With
    `ca_id`, a verified server must also present that SPIFFE ID (the CA's own),
    so that a workload certificate with the CA's DNS name cannot stand in for it.
    """
    replicas = url if isinstance(url, CAReplicas) else CAReplicas(url, timeout, resolver)

    async def at(c: Candidate) -> tuple[BundleDoc | None, str | None, bool]:
        return await _fetch_bundle_at(c, trusted_pem, now, trust_domain, etag, timeout, ca_id)

    return await replicas.first_answer(at)


async def _fetch_bundle_at(
    c: Candidate,
    trusted_pem: str,
    now: dt.datetime,
    trust_domain: str | None,
    etag: str | None,
    timeout: float,
    ca_id: str | None,
) -> tuple[BundleDoc | None, str | None, bool]:
    """`fetch_bundle` at one replica: a discovery asks the same replica all three times."""
    try:
        doc, tag = await _get_bundle(
            c, ca_context(trusted_pem), now, trust_domain, etag, timeout, ca_id
        )
        return doc, tag, False
    except CAUntrusted:
        pass
    trusted = load_roots(trusted_pem, now, "the trusted bundle")
    offered, _ = await _get_bundle(c, _untrusted_context(), now, trust_domain, None, timeout)
    assert offered is not None
    try:
        endorsed_roots(trusted, offered.roots, offered.endorsements, now)
    except BundleError as e:
        raise CAUntrusted(f"the CA at {c} is not trusted: {e}") from None
    # Now prove the server holds a certificate under the roots just accepted.
    doc, tag = await _get_bundle(
        c, ca_context(offered.roots_pem), now, trust_domain, None, timeout, ca_id
    )
    assert doc is not None
    try:
        endorsed_roots(trusted, doc.roots, doc.endorsements, now)
    except BundleError as e:
        raise CAUntrusted(f"the CA at {c} is not trusted: {e}") from None
    return doc, tag, True


async def _get_bundle(
    c: Candidate,
    ctx: ssl.SSLContext,
    now: dt.datetime,
    trust_domain: str | None,
    etag: str | None,
    timeout: float,
    ca_id: str | None = None,
) -> tuple[BundleDoc | None, str | None]:
    headers = c.headers({"If-None-Match": etag} if etag else {})
    try:
        resp = await https.fetch(
            "GET",
            c.target("/v1/bundle"),
            ssl_context=ctx,
            server_hostname=c.name,
            headers=headers,
            timeout=timeout,
            connect_timeout=CONNECT_TIMEOUT,
            cap=MAX_BUNDLE_BYTES,
            after_handshake=_ca_check(ca_id),
        )
    except https.BodyTooLarge:
        raise CAUnavailable(f"the CA's bundle is over {MAX_BUNDLE_BYTES} bytes") from None
    except NotTheCA as e:
        raise CAUnavailable(f"{c}: {e}") from None
    except (OSError, TimeoutError) as e:
        if _is_cert_error(e):
            raise CAUntrusted(f"the CA's certificate at {c} does not verify") from None
        raise CAUnavailable(f"cannot reach the CA at {c}: {type(e).__name__}") from None
    if resp.status == 304:
        return None, etag
    if resp.status != 200:
        raise CAUnavailable(f"the CA at {c} answered {resp.status} for /v1/bundle")
    try:
        return BundleDoc.parse(resp.body, now, trust_domain), resp.headers.get("etag")
    except BundleError as e:
        raise CAUnavailable(f"the CA's bundle is unusable: {e}") from None


class NotTheCA(Exception):
    """The server's certificate verified, but it does not carry the CA's SPIFFE ID."""


def _uri_sans(der: bytes | None) -> list[str]:
    """The URI SANs of a certificate (DER), read once per certificate: a bundle poll every
    half minute then parses nothing (an X.509 parse maps some MiB of cryptography's code
    back into a sidecar that released it after start-up; see sidecar/heap.py)."""
    if not der:
        return []
    hit = _SANS.get(der)
    if hit is None:
        try:
            san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            )
            hit = tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))
        except (ValueError, x509.ExtensionNotFound):
            hit = ()
        if len(_SANS) >= _SANS_KEPT:
            _SANS.clear()
        _SANS[der] = hit
    return list(hit)


_SANS_KEPT = 16  # CA certificates whose URI SANs are kept (cleared whole when full)
_SANS: dict[bytes, tuple[str, ...]] = {}


def _ca_check(ca_id: str | None) -> Callable[[ssl.SSLObject], None] | None:
    """With `ca_id`: a check, right after each TLS handshake and before a byte of the
    request is sent, that a verified server presents the CA's SPIFFE ID (NotTheCA)."""
    if ca_id is None:
        return None

    def check(sslobj: ssl.SSLObject) -> None:
        if sslobj is None or sslobj.context.verify_mode == ssl.CERT_NONE:
            return
        uris = _uri_sans(sslobj.getpeercert(binary_form=True))
        if uris != [ca_id]:
            raise NotTheCA(
                f"the server is not the CA: its certificate names "
                f"{', '.join(uris) or 'no SPIFFE ID'}, not {ca_id}"
            )

    return check


def ca_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """The CA's URLs, in the order they are tried (one URL, or several replicas)."""
    urls = (url,) if isinstance(url, str) else tuple(url)
    return tuple(u.rstrip("/") for u in urls)


Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address of `host`, in the system resolver's order (/etc/hosts, DNS, the search
    list: what aiohttp would have asked); OSError if there is none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _with_host(u: SplitResult, address: str) -> str:
    """The URL `u` with `address` in place of its host (its port kept as configured)."""
    host = f"[{address}]" if ":" in address else address
    netloc = host if u.port is None else f"{host}:{u.port}"
    return urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Candidate:
    """One place a request can go: a configured URL, at one address of its host name.

    The connection goes to `address`, but the TLS handshake verifies the CA's certificate
    against the name (and sends it as SNI), and the request says `Host: name[:port]`: to
    the replica it is the same request as through the name."""

    url: str  # as configured
    address: str | None = None  # None: the URL's host is an IP address; connect to it
    name: str | None = None  # the URL's host name, for the handshake (None: as aiohttp does)
    host: str | None = None  # the Host header
    base: str = ""  # the URL with the address in place of the name

    def target(self, path: str) -> str:
        return (self.base or self.url) + path

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        return headers if self.host is None else {**headers, "Host": self.host}

    def __str__(self) -> str:
        return self.url if self.address is None else f"{self.url} ({self.address})"


class CAReplicas:
    """The CA's replicas, in the order a request tries them, from the one that answered last.

    The candidates are the configured URLs in order, each URL whose host is a name (not
    an IP address; `localhost` is a name) expanded into the name's addresses in the
    resolver's order. The name is resolved again for every request (replicas come and
    go), and only when the request gets to it: the usual request costs one lookup, as it
    did when aiohttp resolved the name itself. A name that does not resolve is a
    candidate that failed (logged once until it resolves again).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        timeout: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        self.urls = ca_urls(url)
        self.timeout = timeout  # for one lookup
        self.resolver = resolver or resolve_host
        self._last: tuple[int, str | None] = (0, None)  # (URL index, address) that answered
        self._unresolved: set[str] = set()  # names whose failure has been logged

    @property
    def url(self) -> str:
        """The configured URL tried first (of the replica that answered last)."""
        return self.urls[self._last[0]]

    async def first_answer(self, attempt: Callable[[Candidate], Awaitable[T]]) -> T:
        """`attempt` at each candidate in turn until one returns, and what it returned.

        Starts from the candidate that answered last (if its name still resolves to its
        address; else from its URL's first address), goes round the rest in order and
        ends with its URL's addresses before it. CAUnavailable passes to the next (the
        last one is raised when none answers); CAUntrusted is raised at once: a replica
        whose certificate does not verify is an attack or a misconfiguration that the
        trust must fix, not an outage to route around.
        """
        n = len(self.urls)
        if n == 0:
            raise CAUnavailable("no CA URL is configured")
        failure: CAUnavailable | None = None
        first, address = self._last
        rest: list[Candidate] = []  # the first URL's addresses before the last good one
        for i in range(n + 1):
            k = (first + i) % n
            if i == n:
                batch = rest
            else:
                try:
                    batch = await self._expand(self.urls[k])
                except CAUnavailable as e:
                    failure = e
                    continue
                if i == 0:
                    j = next((x for x, c in enumerate(batch) if c.address == address), 0)
                    batch, rest = batch[j:], batch[:j]
            for c in batch:
                try:
                    result = await attempt(c)
                except CAUntrusted:
                    raise
                except CAUnavailable as e:
                    log.debug("passing over the CA at %s: %s", c, e)
                    failure = e
                    continue
                self._last = (k, c.address)
                return result
        assert failure is not None
        raise failure

    async def _expand(self, url: str) -> list[Candidate]:
        """The candidates of one URL: itself if its host is an IP address, else one per
        address of its name. CAUnavailable if the name does not resolve."""
        u = urlsplit(url)
        name = u.hostname
        try:
            port = u.port or https.DEFAULT_PORTS.get(u.scheme)
        except ValueError:  # a port that is not a number: the request says so
            port = None
        if not name or port is None or _is_ip(name):
            return [Candidate(url)]
        try:
            async with asyncio.timeout(self.timeout):
                addresses = list(dict.fromkeys(await self.resolver(name, port)))
            if not addresses:
                raise OSError(f"no address for {name}")
        except (OSError, TimeoutError, UnicodeError) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            if name not in self._unresolved:
                self._unresolved.add(name)
                log.warning("cannot resolve %s (of the CA URL %s): %s", name, url, reason)
            raise CAUnavailable(f"cannot resolve {name} (of the CA URL {url}): {reason}") from None
        if name in self._unresolved:
            self._unresolved.discard(name)
            log.info("%s (of the CA URL %s) resolves again", name, url)
        host = https.host_header(url)
        return [Candidate(url, a, name, host, _with_host(u, a)) for a in addresses]


class EnrollmentClient:
    """Talks to `POST /v1/certificates` and `/v1/jwt` of the CA.

    `url` is one URL or several (CA replicas), a name in one standing for each of its
    addresses (`CAReplicas`; `resolver` is for tests): a request that cannot connect,
    times out or is answered 5xx or 429 goes to the next one, starting from the last
    that answered; a refusal (4xx) is the answer. `trust` is the PEM bundle the CA's
    certificate must chain to, or a function returning the current one (the
    sidecar's trust store), read for every request. When the CA's certificate does
    not verify, `on_untrusted` (if given) may catch up with the CA's roots (see
    `fetch_bundle`); it returns True if the trust changed, and the request is tried
    once more.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        trust: TrustSource,
        timeout: float = 10.0,
        on_untrusted: OnUntrusted | None = None,
        ca_id: str | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.replicas = CAReplicas(url, timeout, resolver)
        self.urls = self.replicas.urls
        self._trust = trust
        self.timeout = timeout
        self.on_untrusted = on_untrusted
        self.ca_id = ca_id  # the CA's SPIFFE ID, checked on its certificate when given

    @property
    def url(self) -> str:
        """The configured URL tried first (of the replica that answered last)."""
        return self.replicas.url

    @property
    def bundle_pem(self) -> str:
        """The bundle the next request trusts."""
        return self._trust() if callable(self._trust) else self._trust

    def _context(self) -> ssl.SSLContext:
        return ca_context(self.bundle_pem)

    async def enroll(self, csr_pem: str, token: str) -> Enrollment:
        """First certificate, authenticated by a join or ServiceAccount token."""
        return await self._post(self._context(), csr_pem, {"Authorization": f"Bearer {token}"})

    async def renew(self, csr_pem: str, chain_pem: str, key_pem: bytes) -> Enrollment:
        """A new certificate for the same ID, authenticated by the current one over mTLS."""
        ctx = self._context()
        tlsutil.load_chain(ctx, chain_pem, key_pem)
        return await self._post(ctx, csr_pem, {}, (chain_pem, key_pem))

    async def fetch_jwt(
        self, audience: str, chain_pem: str, key_pem: bytes
    ) -> tuple[str, dt.datetime]:
        """A JWT-SVID for our own ID and `audience`, over mTLS: (token, expires_at)."""
        ctx = self._context()
        tlsutil.load_chain(ctx, chain_pem, key_pem)
        status, doc = await self._call(
            ctx, "/v1/jwt", {"audience": audience}, {}, (chain_pem, key_pem)
        )
        if status == 200:
            try:
                return doc["token"], dt.datetime.fromisoformat(doc["expires_at"])
            except (KeyError, TypeError, ValueError):
                raise CAUnavailable("the CA's answer lacks fields") from None
        raise self._error(status, doc)

    async def _call(
        self,
        ctx: ssl.SSLContext,
        path: str,
        body: dict,
        headers: dict[str, str],
        client_chain: tuple[str, bytes] | None = None,
    ) -> tuple[int, dict]:
        used = self.bundle_pem
        try:
            return await self._call_once(ctx, path, body, headers)
        except CAUntrusted:
            if self.on_untrusted is None:
                raise
            await self.on_untrusted()
            # Retry whenever the trust differs from what this request used: a poll may
            # have published the CA's new roots while it was on its way.
            if self.bundle_pem == used:
                raise
        ctx = self._context()  # the trust has changed: once more with it
        if client_chain is not None:
            tlsutil.load_chain(ctx, *client_chain)
        return await self._call_once(ctx, path, body, headers)

    async def _call_once(
        self, ctx: ssl.SSLContext, path: str, body: dict, headers: dict[str, str]
    ) -> tuple[int, dict]:
        """One request, to each replica in turn until one answers (a 4xx is an answer)."""

        async def at(c: Candidate) -> tuple[int, dict]:
            status, doc = await self._call_at(c, ctx, path, body, headers)
            if status == 429 or status >= 500:
                raise self._error(status, doc, c)
            return status, doc

        return await self.replicas.first_answer(at)

    async def _call_at(
        self, c: Candidate, ctx: ssl.SSLContext, path: str, body: dict, headers: dict[str, str]
    ) -> tuple[int, dict]:
        try:
            resp = await https.fetch(
                "POST",
                c.target(path),
                ssl_context=ctx,
                server_hostname=c.name,
                headers={"Content-Type": "application/json", **c.headers(headers)},
                body=json.dumps(body).encode(),
                timeout=self.timeout,
                connect_timeout=CONNECT_TIMEOUT,
                cap=MAX_ANSWER_BYTES,
                after_handshake=_ca_check(self.ca_id),
            )
            raw, status = resp.body, resp.status
        except https.BodyTooLarge:
            raise CAUnavailable(f"the CA's answer is over {MAX_ANSWER_BYTES} bytes") from None
        except NotTheCA as e:
            raise CAUnavailable(f"{c}: {e}") from None
        except (OSError, TimeoutError) as e:
            if _is_cert_error(e):
                raise CAUntrusted(
                    f"cannot reach the CA at {c}: its certificate does not verify "
                    f"against our trust bundle ({type(e).__name__})"
                ) from None
            raise CAUnavailable(f"cannot reach the CA at {c}: {type(e).__name__}") from None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise CAUnavailable(
                f"the CA at {c} answered {status} with a body that is not JSON"
            ) from None
        return status, doc if isinstance(doc, dict) else {}

    @staticmethod
    def _error(status: int, doc: dict, at: Candidate | None = None) -> CAError:
        code = str(doc.get("error", "unknown"))
        detail = str(doc.get("detail", ""))
        if status == 429 or status >= 500:
            where = f" at {at}" if at is not None else ""
            return CAUnavailable(f"the CA{where} answered {status} {code}: {detail}")
        return CARefused(status, code, detail)

    async def _post(
        self,
        ctx: ssl.SSLContext,
        csr_pem: str,
        headers: dict[str, str],
        client_chain: tuple[str, bytes] | None = None,
    ) -> Enrollment:
        status, doc = await self._call(
            ctx, "/v1/certificates", {"csr": csr_pem}, headers, client_chain
        )
        if status == 200:
            try:
                return Enrollment(
                    spiffe_id=doc["spiffe_id"],
                    chain_pem=doc["certificate_chain"],
                    bundle_pem=doc["trust_bundle"],
                    expires_at=dt.datetime.fromisoformat(doc["expires_at"]),
                    serial=doc["serial"],
                    bundle_sequence=_int_or_none(doc.get("bundle_sequence")),
                )
            except (KeyError, TypeError, ValueError):
                raise CAUnavailable("the CA's answer lacks fields") from None
        raise self._error(status, doc)
