"""One HTTPS request on a connection of its own, for the enrollment client (`meshca.client`).

The client makes a handful of small requests (an enrollment, a renewal every few hours,
a bundle poll every half minute), each on a new connection that closes after the answer,
so an HTTP client library's pools, cookies, redirects and proxies are not needed, and
it was most of the sidecar's memory at start-up (aiohttp and its dependencies: 10 MiB
of 57 MiB idle). This is asyncio's TLS streams and httptools' response parser (which
the sidecar's data path loads anyway): connect (within `connect_timeout`, handshake
included), let `after_handshake` look at the TLS object before a byte is sent, write
the request with `Connection: close`, read the answer (Content-Length, chunked, or to
the end) up to `cap` bytes of body, all within `timeout`.

Errors: `ssl.SSLCertVerificationError` when the server's certificate does not verify;
`BodyTooLarge` past `cap`; `OSError` (including `ssl.SSLError` and a malformed answer)
or `TimeoutError` for the rest; and whatever `after_handshake` raises.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

DEFAULT_PORTS = {"https": 443, "http": 80}
READ_SIZE = 64 * 1024


class BodyTooLarge(Exception):
    """The answer's body is over the cap."""


@dataclass(frozen=True)
class Answer:
    """A response: its status, headers (names in lower case) and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def host_header(url: str) -> str:
    """`Host` for `url`: its host, with the port unless it is the scheme's default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is None or port == DEFAULT_PORTS.get(parts.scheme):
        return host
    return f"{host}:{port}"


class _Reader:
    """httptools' callbacks: collects one response."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.head_done = False
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.cap:
            raise BodyTooLarge
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True


async def fetch(
    method: str,
    url: str,
    *,
    ssl_context: ssl.SSLContext,
    server_hostname: str | None = None,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
    connect_timeout: float = 3.0,
    cap: int = 256 * 1024,
    after_handshake: Callable[[ssl.SSLObject], None] | None = None,
) -> Answer:
    """`method url` over TLS on a new connection; the answer (any status)."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme != "https" or not host:
        raise OSError(f"not an https URL: {url}")
    port = parts.port or DEFAULT_PORTS["https"]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    sent = {"Host": host_header(url), **(headers or {})}
    if body is not None:
        sent["Content-Length"] = str(len(body))
    sent["Connection"] = "close"
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in sent.items())
    async with asyncio.timeout(timeout):
        async with asyncio.timeout(min(timeout, connect_timeout)):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=ssl_context,
                server_hostname=server_hostname or host,
                ssl_handshake_timeout=min(timeout, connect_timeout),
            )
        try:
            sslobj = writer.get_extra_info("ssl_object")
            if after_handshake is not None:
                after_handshake(sslobj)
            writer.write(head.encode("latin-1") + b"\r\n" + (body or b""))
            got = _Reader(cap)
            parser = httptools.HttpResponseParser(got)
            while not got.done:
                data = await reader.read(READ_SIZE)
                if not data:
                    if (
                        got.head_done
                        and "content-length" not in got.headers
                        and ("chunked" not in got.headers.get("transfer-encoding", "").lower())
                    ):
                        break  # the body ends with the connection
                    raise OSError("the connection closed before the answer was complete")
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:  # (not an HttpParserError)
                    raise OSError("malformed answer: a protocol upgrade") from None
                except httptools.HttpParserError as e:
                    if isinstance(e.__context__, BodyTooLarge):
                        raise BodyTooLarge from None
                    raise OSError(f"malformed answer: {e}") from None
            return Answer(parser.get_status_code(), got.headers, b"".join(got.chunks))
        finally:
            writer.close()  # (not waited for: the answer is complete)
