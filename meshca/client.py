"""The enrollment client (shared with the sidecar): enroll with a token, renew over mTLS.

Errors are split the way a caller must act on them: `CAUnavailable` (network,
timeout, 5xx, 429: retry later with backoff) and `CARefused` (any other 4xx:
the credential or request is wrong; retrying the same thing will not help).
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca import tlsutil
from meshca.trust import MAX_BUNDLE_BYTES, BundleDoc, BundleError, endorsed_roots, load_roots

MAX_ANSWER_BYTES = 256 * 1024


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
    return isinstance(e, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError)


async def fetch_bundle(
    url: str,
    trusted_pem: str,
    now: dt.datetime,
    trust_domain: str | None = None,
    etag: str | None = None,
    timeout: float = 10.0,
    ca_id: str | None = None,
) -> tuple[BundleDoc | None, str | None, bool]:
    """GET /v1/bundle from the CA at `url`: (document or None if unchanged, ETag, discovered).

    The CA's certificate is verified against `trusted_pem`. If it does not verify
    (the CA issues under a root we have not seen yet), the document is fetched once
    without verifying, accepted only if endorsements lead from a root in
    `trusted_pem` to each of its roots, and then fetched again verifying the CA
    against those roots: `discovered` is True. CAUnavailable for network errors
    and bad documents, CAUntrusted when nothing we trust leads to the CA. With
    `ca_id`, a verified server must also present that SPIFFE ID (the CA's own),
    so that a workload certificate with the CA's DNS name cannot stand in for it.
    """
    bundle_url = url.rstrip("/") + "/v1/bundle"
    try:
        doc, tag = await _get_bundle(
            bundle_url, ca_context(trusted_pem), now, trust_domain, etag, timeout, ca_id
        )
        return doc, tag, False
    except CAUntrusted:
        pass
    trusted = load_roots(trusted_pem, now, "the trusted bundle")
    offered, _ = await _get_bundle(
        bundle_url, _untrusted_context(), now, trust_domain, None, timeout
    )
    assert offered is not None
    try:
        endorsed_roots(trusted, offered.roots, offered.endorsements, now)
    except BundleError as e:
        raise CAUntrusted(f"the CA at {url} is not trusted: {e}") from None
    # Now prove the server holds a certificate under the roots just accepted.
    doc, tag = await _get_bundle(
        bundle_url, ca_context(offered.roots_pem), now, trust_domain, None, timeout, ca_id
    )
    assert doc is not None
    try:
        endorsed_roots(trusted, doc.roots, doc.endorsements, now)
    except BundleError as e:
        raise CAUntrusted(f"the CA at {url} is not trusted: {e}") from None
    return doc, tag, True


async def _get_bundle(
    url: str,
    ctx: ssl.SSLContext,
    now: dt.datetime,
    trust_domain: str | None,
    etag: str | None,
    timeout: float,
    ca_id: str | None = None,
) -> tuple[BundleDoc | None, str | None]:
    headers = {"If-None-Match": etag} if etag else {}
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=timeout), connector=_CAConnector(ca_id)
            ) as session,
            session.get(url, headers=headers, ssl=ctx, allow_redirects=False) as resp,
        ):
            if resp.status == 304:
                return None, etag
            if resp.status != 200:
                raise CAUnavailable(f"the CA answered {resp.status} for {url}")
            raw = await read_capped(resp, MAX_BUNDLE_BYTES, "the CA's bundle")
            tag = resp.headers.get("ETag")
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        if isinstance(e, NotTheCA):
            raise CAUnavailable(f"{url}: {e}") from None
        if _is_cert_error(e):
            raise CAUntrusted(f"the CA's certificate at {url} does not verify") from None
        raise CAUnavailable(f"cannot reach the CA at {url}: {type(e).__name__}") from None
    try:
        return BundleDoc.parse(raw, now, trust_domain), tag
    except BundleError as e:
        raise CAUnavailable(f"the CA's bundle is unusable: {e}") from None


async def read_capped(resp: aiohttp.ClientResponse, cap: int, what: str) -> bytes:
    """The whole body (however it is split into records and chunks), CAUnavailable past `cap`."""
    if (resp.content_length or 0) > cap:
        raise CAUnavailable(f"{what} is over {cap} bytes")
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise CAUnavailable(f"{what} is over {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class NotTheCA(aiohttp.ClientError):
    """The server's certificate verified, but it does not carry the CA's SPIFFE ID."""


def _uri_sans(der: bytes | None) -> list[str]:
    if not der:
        return []
    try:
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (ValueError, x509.ExtensionNotFound):
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


class _CAConnector(aiohttp.TCPConnector):
    """A connector that checks, right after each TLS handshake and before a byte of the
    request is sent, that a verified server presents the CA's SPIFFE ID. aiohttp has no
    public hook there (a small answer releases its connection before the response object
    is returned), so this extends its connection factory."""

    def __init__(self, ca_id: str | None) -> None:
        super().__init__(force_close=True)
        self._ca_id = ca_id

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, proto = await super()._wrap_create_connection(*args, **kwargs)
        sslobj = transport.get_extra_info("ssl_object")
        verified = sslobj is not None and sslobj.context.verify_mode != ssl.CERT_NONE
        if self._ca_id is not None and verified:
            uris = _uri_sans(sslobj.getpeercert(binary_form=True))
            if uris != [self._ca_id]:
                transport.close()
                raise NotTheCA(
                    f"the server is not the CA: its certificate names "
                    f"{', '.join(uris) or 'no SPIFFE ID'}, not {self._ca_id}"
                )
        return transport, proto


def ca_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """The CA's URLs, in the order they are tried (one URL, or several replicas)."""
    urls = (url,) if isinstance(url, str) else tuple(url)
    return tuple(u.rstrip("/") for u in urls)


class EnrollmentClient:
    """Talks to `POST /v1/certificates` and `/v1/jwt` of the CA.

    `url` is one URL or several (CA replicas): a request that cannot connect, times
    out or is answered 5xx or 429 goes to the next one, starting from the last that
    answered; a refusal (4xx) is the answer. `trust` is the PEM bundle the CA's
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
    ) -> None:
        self.urls = ca_urls(url)
        self._preferred = 0  # the replica that answered last
        self._trust = trust
        self.timeout = timeout
        self.on_untrusted = on_untrusted
        self.ca_id = ca_id  # the CA's SPIFFE ID, checked on its certificate when given

    @property
    def url(self) -> str:
        """The replica tried first (the one that answered last)."""
        return self.urls[self._preferred]

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
        n = len(self.urls)
        failure: CAUnavailable | None = None
        for i in range(n):
            k = (self._preferred + i) % n
            try:
                status, doc = await self._call_at(self.urls[k], ctx, path, body, headers)
            except CAUntrusted:
                raise  # the trust is ours to fix, wherever the CA runs
            except CAUnavailable as e:
                failure = e
                continue
            if (status == 429 or status >= 500) and i < n - 1:
                failure = self._error(status, doc)  # type: ignore[assignment]
                continue
            self._preferred = k
            return status, doc
        assert failure is not None
        raise failure

    async def _call_at(
        self, url: str, ctx: ssl.SSLContext, path: str, body: dict, headers: dict[str, str]
    ) -> tuple[int, dict]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=timeout, connector=_CAConnector(self.ca_id)
                ) as session,
                session.post(
                    url + path, json=body, headers=headers, ssl=ctx, allow_redirects=False
                ) as resp,
            ):
                raw = await read_capped(resp, MAX_ANSWER_BYTES, "the CA's answer")
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            if isinstance(e, NotTheCA):
                raise CAUnavailable(f"{url}: {e}") from None
            if _is_cert_error(e):
                raise CAUntrusted(
                    f"cannot reach the CA at {url}: its certificate does not verify "
                    f"against our trust bundle ({type(e).__name__})"
                ) from None
            raise CAUnavailable(f"cannot reach the CA at {url}: {type(e).__name__}") from None
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            raise CAUnavailable(f"the CA answered {status} with a body that is not JSON") from None
        return status, doc if isinstance(doc, dict) else {}

    @staticmethod
    def _error(status: int, doc: dict) -> CAError:
        code = str(doc.get("error", "unknown"))
        detail = str(doc.get("detail", ""))
        if status == 429 or status >= 500:
            return CAUnavailable(f"the CA answered {status} {code}: {detail}")
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
