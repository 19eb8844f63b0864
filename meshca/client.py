"""The enrollment client (shared with the sidecar): enroll with a token, renew over mTLS.

Errors are split the way a caller must act on them: `CAUnavailable` (network,
timeout, 5xx, 429: retry later with backoff) and `CARefused` (any other 4xx:
the credential or request is wrong; retrying the same thing will not help).
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from dataclasses import dataclass, field

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca import tlsutil

MAX_ANSWER_BYTES = 256 * 1024


class CAError(Exception):
    """Enrollment did not succeed."""


class CAUnavailable(CAError):
    """The CA could not be reached or is overloaded; retry with backoff."""


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


class EnrollmentClient:
    """Talks to `POST /v1/certificates` of one CA, trusting `bundle_pem` for its server."""

    def __init__(self, url: str, bundle_pem: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.bundle_pem = bundle_pem
        self.timeout = timeout

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.bundle_pem)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def enroll(self, csr_pem: str, token: str) -> Enrollment:
        """First certificate, authenticated by a join or ServiceAccount token."""
        return await self._post(self._context(), csr_pem, {"Authorization": f"Bearer {token}"})

    async def renew(self, csr_pem: str, chain_pem: str, key_pem: bytes) -> Enrollment:
        """A new certificate for the same ID, authenticated by the current one over mTLS."""
        ctx = self._context()
        tlsutil.load_chain(ctx, chain_pem, key_pem)
        return await self._post(ctx, csr_pem, {})

    async def fetch_jwt(
        self, audience: str, chain_pem: str, key_pem: bytes
    ) -> tuple[str, dt.datetime]:
        """A JWT-SVID for our own ID and `audience`, over mTLS: (token, expires_at)."""
        ctx = self._context()
        tlsutil.load_chain(ctx, chain_pem, key_pem)
        status, doc = await self._call(ctx, "/v1/jwt", {"audience": audience}, {})
        if status == 200:
            try:
                return doc["token"], dt.datetime.fromisoformat(doc["expires_at"])
            except (KeyError, TypeError, ValueError):
                raise CAUnavailable("the CA's answer lacks fields") from None
        raise self._error(status, doc)

    async def _call(
        self, ctx: ssl.SSLContext, path: str, body: dict, headers: dict[str, str]
    ) -> tuple[int, dict]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.url + path, json=body, headers=headers, ssl=ctx) as resp,
            ):
                if (resp.content_length or 0) > MAX_ANSWER_BYTES:
                    raise CAUnavailable(f"the CA's answer is over {MAX_ANSWER_BYTES} bytes")
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise CAUnavailable(f"cannot reach the CA at {self.url}: {type(e).__name__}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise CAUnavailable(f"the CA answered {status} with a body that is not JSON") from None
        return status, doc if isinstance(doc, dict) else {}

    @staticmethod
    def _error(status: int, doc: dict) -> CAError:
        code = str(doc.get("error", "unknown"))
        detail = str(doc.get("detail", ""))
        if status == 429 or status >= 500:
            return CAUnavailable(f"the CA answered {status} {code}: {detail}")
        return CARefused(status, code, detail)

    async def _post(self, ctx: ssl.SSLContext, csr_pem: str, headers: dict[str, str]) -> Enrollment:
        status, doc = await self._call(ctx, "/v1/certificates", {"csr": csr_pem}, headers)
        if status == 200:
            try:
                return Enrollment(
                    spiffe_id=doc["spiffe_id"],
                    chain_pem=doc["certificate_chain"],
                    bundle_pem=doc["trust_bundle"],
                    expires_at=dt.datetime.fromisoformat(doc["expires_at"]),
                    serial=doc["serial"],
                )
            except (KeyError, TypeError, ValueError):
                raise CAUnavailable("the CA's answer lacks fields") from None
        raise self._error(status, doc)
