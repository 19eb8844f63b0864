"""HTTP/1.1 message framing, pure: how a body is delimited, and the bytes of heads and chunks.

Nothing here does I/O. llhttp (httptools) parses; these functions decide what a
parsed head means for framing and build what is written:

- a request is framed by `Transfer-Encoding: chunked` (alone, HTTP/1.1 only:
  `check_transfer_encoding`) or `Content-Length`; only HTTP/1.0 and HTTP/1.1
  request lines are served (`check_version`); `Expect: 100-continue` is
  answered by the sidecar and not forwarded (`request_framing`);
- a response's framing follows RFC 9112 section 6.3 (`response_framing`): none
  for HEAD, 1xx, 204 and 304, else chunked, a length, or until the app closes;
  the client gets a length or chunks (an HTTP/1.0 client: until close);
- hop-by-hop headers (RFC 9110 section 7.6.1, and any named in `Connection`)
  and framing headers are removed in both directions (`strip_hop_by_hop`);
  the sidecar writes its own framing.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.errors import SidecarError

# Header names are lowercase everywhere past the parsers (the HTTP/1.1 engines lower each
# name once as llhttp reports it; HTTP/2 names are lowercase by the protocol), so nothing
# after them lowers a name again. They are forwarded lowercase, as HAProxy and Envoy do.
Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
_STRIPPED = HOP_BY_HOP | FRAMING_HEADERS
BODYLESS_STATUS = frozenset({204, 304})
LAST_CHUNK = b"0\r\n\r\n"

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

# RFC 9110 5.6.2: tchar. A transfer coding is a token (parameters are not accepted).
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

# What a request target and an authority may hold: printable ASCII, no space (llhttp takes
# the same from an HTTP/1.1 request line; RFC 3986 is stricter, real clients are not).
_TARGET = frozenset(range(0x21, 0x7F))


def check_request_line(method: bytes, target: bytes, authority: bytes | None) -> None:
    """A request that did not come as an HTTP/1.1 request line (HTTP/2 pseudo-headers)
    becomes one: its method must be a token and its target and authority free of
    whitespace and control bytes, or the line the app parses would say something else
    (`:path` `/a /admin`). SidecarError 400 otherwise."""
    if not method or not _TCHAR.issuperset(method):
        raise SidecarError("bad_request", "the method is not a token")
    if not _TARGET.issuperset(target) or not (target[:1] == b"/" or target == b"*"):
        raise SidecarError("bad_request", "the path is not a valid request target")
    if target == b"*" and method != b"OPTIONS":
        raise SidecarError("bad_request", "'*' is a target only for OPTIONS")
    if authority is not None and (
        not authority or not _TARGET.issuperset(authority) or authority.find(b"@") >= 0
    ):
        raise SidecarError("bad_request", "the authority is not a host and port")


class Kind(enum.Enum):
    """How a message body is delimited."""

    NONE = "none"  # no body
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # chunked transfer coding
    CLOSE = "close"  # until the connection closes (a response only)


@dataclass(frozen=True, slots=True)
class Framing:
    """A body's framing: its kind and, for LENGTH, the length."""

    kind: Kind
    length: int = 0

    @staticmethod
    def of_length(n: int) -> Framing:
        """`Content-Length: n` (a zero length is no body)."""
        return length_framing(n) if n else NO_BODY

    @property
    def has_body(self) -> bool:
        """Whether body bytes may follow the head."""
        return self.kind is not Kind.NONE


_LENGTHS: dict[int, Framing] = {}


def length_framing(n: int) -> Framing:
    """`Framing(Kind.LENGTH, n)`, kept for the lengths seen lately (most answers of a
    service come in a few sizes; a frozen dataclass costs more to make than to look up)."""
    f = _LENGTHS.get(n)
    if f is None:
        if len(_LENGTHS) >= 4096:
            _LENGTHS.clear()
        f = _LENGTHS[n] = Framing(Kind.LENGTH, n)
    return f


NO_BODY = Framing(Kind.NONE)
CHUNKED = Framing(Kind.CHUNKED)
UNTIL_CLOSE = Framing(Kind.CLOSE)


def check_version(version: str) -> None:
    """Refuse anything but HTTP/1.0 and HTTP/1.1 (SidecarError 400 or 505).

    llhttp also lets through a request line without a version (HTTP/0.9, which
    has no headers and no framing; llhttp reports `HTTP/0.9` the same way: both
    get 400) and `HTTP/2.0` (a version an HTTP/1 request line cannot carry: 505);
    it refuses `HTTP/1.2`, `http/1.1` and the like itself (400).
    """
    if version == "1.1" or version == "1.0":
        return
    if version == "0.9":
        raise SidecarError(
            "bad_request",
            "HTTP/0.9 is not served (no HTTP/1.x version in the request line)",
            close=True,
        )
    raise SidecarError(
        "http_version_not_supported", f"HTTP/{version} is not supported: use HTTP/1.1", close=True
    )


def check_transfer_encoding(value: bytes, version: str) -> None:
    """Accept `Transfer-Encoding: chunked` (alone, HTTP/1.1) only; else SidecarError 400 or 501.

    400: in an HTTP/1.0 request (RFC 9112 6.1: the framing is faulty), an empty
    or malformed list, or `chunked` anywhere but once at the end (RFC 9112 6.3:
    the body length cannot be determined). 501: any other coding (`xchunked`,
    `gzip`, `gzip, chunked`: RFC 9112 6.1, and what Envoy answers): the sidecar
    does not decode codings, and re-chunking would silently drop them.
    """
    coding = value.strip(b" \t").lower()
    if coding == b"chunked" and version == "1.1":
        return
    if version != "1.1":
        raise SidecarError(
            "bad_transfer_encoding", "Transfer-Encoding in an HTTP/1.0 request", close=True
        )
    codings = [c.strip(b" \t") for c in coding.split(b",")]
    if not all(c and _TCHAR.issuperset(c) for c in codings):
        raise SidecarError("bad_transfer_encoding", "malformed Transfer-Encoding", close=True)
    if b"chunked" in codings[:-1]:
        raise SidecarError(
            "bad_transfer_encoding", "chunked must be the final transfer coding, once", close=True
        )
    unknown = ", ".join(c.decode("ascii") for c in codings if c != b"chunked")
    raise SidecarError(
        "unsupported_transfer_encoding", f"transfer coding not supported: {unknown}", close=True
    )


def request_framing(
    headers: Headers, version: str
) -> tuple[Framing, bool | None, frozenset[bytes]]:
    """A request's body framing, whether it asked for `100 Continue` (None: it has no
    Expect header at all) and the header names its `Connection` header lists (they are
    hop-by-hop too), all in one pass over the headers.

    llhttp has already refused a Content-Length that is not a number, two that
    differ, and Content-Length together with Transfer-Encoding.
    """
    framing = NO_BODY
    chunked = False
    expect_continue: bool | None = None
    listed: frozenset[bytes] = frozenset()
    for lk, v in headers:
        if lk == b"transfer-encoding":
            if chunked:
                raise SidecarError(
                    "bad_transfer_encoding", "more than one Transfer-Encoding", close=True
                )
            check_transfer_encoding(v, version)
            chunked = True
            framing = CHUNKED
        elif lk == b"content-length":
            try:
                framing = Framing.of_length(int(v))
            except ValueError:
                raise SidecarError("bad_request", "bad Content-Length", close=True) from None
        elif lk == b"expect":
            expect_continue = expect_continue or v.lower() == b"100-continue"
        elif lk == b"connection":
            listed = listed.union(t.strip().lower() for t in v.split(b","))
    return framing, expect_continue, listed


def response_framing(headers: Headers, status: int, head_request: bool) -> Framing:
    """How a response from upstream is delimited (RFC 9112 6.3); for a HEAD request the
    length it announces (no body follows, whatever it says)."""
    length = None
    chunked = False
    for lk, v in headers:
        if lk == b"content-length":
            length = int(v.strip())  # llhttp refused a non-number
        elif lk == b"transfer-encoding":
            chunked = True
    if head_request:
        return NO_BODY if length is None else length_framing(length)
    if status in BODYLESS_STATUS:
        return NO_BODY
    if chunked:
        return CHUNKED
    if length is not None:
        return length_framing(length)
    return UNTIL_CLOSE


def to_client(upstream: Framing, version: str) -> Framing:
    """How a body framed as `upstream` is framed to a client speaking HTTP/`version`:
    lengths pass through; anything else is chunked (until close for HTTP/1.0)."""
    if upstream.kind is Kind.NONE or upstream.kind is Kind.LENGTH:
        return upstream
    return UNTIL_CLOSE if version == "1.0" else CHUNKED


def framing_header(framing: Framing) -> bytes:
    """The header line that announces `framing` (none for no body or until close)."""
    if framing.kind is Kind.CHUNKED:
        return b"transfer-encoding: chunked\r\n"
    if framing.kind is Kind.LENGTH:
        return b"content-length: %d\r\n" % framing.length
    return b""


def response_head(
    status: int, reason: bytes, headers: Headers, framing: Framing, close: bool, version: str
) -> bytes:
    """A response head for a client speaking HTTP/`version` (`Connection: close` when
    `close`; an HTTP/1.0 client kept alive is told so)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, "").encode())]
    lines += [b"%s: %s\r\n" % (k, v) for k, v in headers]
    lines.append(framing_header(framing))
    if close:
        lines.append(b"connection: close\r\n")
    elif version == "1.0":  # an HTTP/1.0 client closes unless told otherwise
        lines.append(b"connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def client_head(
    status: int, reason: bytes, headers: Headers, framing: Framing, close: bool, version: str
) -> bytes:
    """`response_head` of the upstream's headers minus hop-by-hop and framing ones, in one
    pass over them (the common case: a `Connection` header naming nothing but keep-alive or
    close; one that names other headers takes the general path)."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, "").encode())]
    for k, v in headers:
        if k in _STRIPPED or k == b"close":  # ("close" is a reserved name, RFC 9110 16.3.2.2)
            if k == b"connection" and v.strip().lower() not in _PLAIN_CONNECTION:
                return response_head(
                    status, reason, strip_hop_by_hop(headers), framing, close, version
                )
            continue
        lines.append(b"%s: %s\r\n" % (k, v))
    if framing.kind is Kind.LENGTH:
        lines.append(b"content-length: %d\r\n" % framing.length)
    elif framing.kind is Kind.CHUNKED:
        lines.append(b"transfer-encoding: chunked\r\n")
    if close:
        lines.append(b"connection: close\r\n\r\n")
    elif version == "1.0":  # an HTTP/1.0 client closes unless told otherwise
        lines.append(b"connection: keep-alive\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def error_response(err: SidecarError, close: bool, head_only: bool = False) -> bytes:
    """The sidecar's own JSON answer for `err`; with `head_only` (the answer to a HEAD)
    the same head and no body."""
    body = json.dumps({"error": err.code, "detail": err.detail, **err.fields}).encode() + b"\n"
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (err.status, REASONS.get(err.status, "Error").encode()),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    lines += [b"%s: %s\r\n" % (k, v) for k, v in err.headers]
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines) + (b"" if head_only else body)


def connection_tokens(headers: Headers) -> set[bytes]:
    """Header names listed in Connection (they are hop-by-hop too)."""
    names: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            names.update(t.strip().lower() for t in v.split(b","))
    return names


def strip_hop_by_hop(headers: Headers, also: frozenset[bytes] = frozenset()) -> Headers:
    """Headers minus hop-by-hop ones, framing ones and `also` (all names lowercase)."""
    drop = connection_tokens(headers) | also
    skip = _STRIPPED | drop if drop else _STRIPPED
    return [(k, v) for k, v in headers if k not in skip]


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lowercase), or None."""
    for k, v in headers:
        if k == name:
            return v
    return None
