"""The inbound HTTP path under arbitrary client bytes (hypothesis), without sockets: bytes go
into the real connection handler (llhttp head parsing, framing checks, the inbound router's
header rewriting) and what it writes to the app and back to the client is read with an
independent parser. Whatever the client sends:

- the app receives well-formed HTTP/1.1 with exactly the sidecar's identity headers, in no
  spelling the client chose (CGI/WSGI apps read `X_Foo` and `x-foo` as one variable);
- a refused request gets a 4xx/5xx (never the 500 of an internal error), and a refused
  single request sends nothing to the app.
"""

from __future__ import annotations

import asyncio

import httptools
from hypothesis import example, given
from hypothesis import strategies as st

from meshca.config import parse_listen
from sidecar.config import InboundConfig
from sidecar.engines.base import Limits
from sidecar.engines.http1.downstream import DownstreamConn
from sidecar.engines.http1.upstream import UpstreamConn
from sidecar.identity.peer import Peer, Verdict
from sidecar.policy.authn import Authenticator, IssuerRule
from sidecar.routing.inbound import InboundRouter

XFCC = b"By=spiffe://cluster.local/ns/default/sa/backend;Hash=abc;URI=spiffe://cluster.local/ns/default/sa/frontend"
PEER = Peer("spiffe://cluster.local/ns/default/sa/frontend", Verdict.VERIFIED, "01", "abc")
# CGI names (upper case, `_` for `-`) of what only the sidecar may tell the app.
IDENTITY = {"X_FORWARDED_CLIENT_CERT", "X_FORWARDED_PROTO", "X_JWT_CLAIMS"}
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Store:
    """The little of CredentialStore the router reads."""

    class current:  # noqa: N801 (the attribute CredentialStore has)
        spiffe_id = "spiffe://cluster.local/ns/default/sa/backend"

    revoked: frozenset[str] = frozenset()
    trust_domain = "cluster.local"

    def on_revoked(self, fn):
        pass


class Transport:
    """One end of a connection: records what is written to it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "nothing is written after close"
        self.data += data

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default


def make_router() -> InboundRouter:
    cfg = InboundConfig(parse_listen("127.0.0.1:0"), parse_listen("127.0.0.1:5000"))
    issuer = IssuerRule(
        "test",
        (),
        None,
        algorithms=("HS256",),
        hmac_secret=b"s" * 32,
        from_header=b"x-jwt-token",
        prefix=b"",
        claims_header=b"x-jwt-claims",
    )
    return InboundRouter(cfg, Store(), Authenticator([issuer]))


def run(pieces: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Feed `pieces` to a connection as they would arrive; the app answers 200 to each request.

    Returns, after each piece, (what the client has received, what the app has received).
    """

    async def go() -> list[tuple[bytes, bytes]]:
        router = make_router()
        app = Transport()
        up = UpstreamConn(router.pool)
        up.transport = app
        (endpoint,) = router.pool.endpoints
        up.endpoint = endpoint
        endpoint.idle.append(up)

        async def no_second_connection(pool, host, port):
            raise ConnectionRefusedError

        router.pool._connect = no_second_connection
        conn = DownstreamConn(router, Limits(max_header_bytes=4096), None)
        client = Transport()
        conn.transport = client
        conn.peer = PEER
        answered, seen = 0, 0
        after: list[tuple[bytes, bytes]] = []
        for piece in pieces:
            if not client.closed:
                conn.data_received(piece)
                await asyncio.sleep(0)
            # answer every request head that reached the app, as a small app would
            while len(app.data) > seen and not app.closed and up.ex is not None and answered < 8:
                seen = len(app.data)
                answered += 1
                up.data_received(ANSWER)
                await asyncio.sleep(0)
            after.append((bytes(client.data), bytes(app.data)))
        return after

    return asyncio.run(go())


class Requests:
    """Parses what the app received, as an app server would (llhttp, separate instance)."""

    def __init__(self, data: bytes) -> None:
        self.heads: list[list[tuple[bytes, bytes]]] = []
        self._headers: list[tuple[bytes, bytes]] = []
        parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise AssertionError("the sidecar forwarded an upgrade") from None

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.heads.append(self._headers)


def check_identity_headers(app_data: bytes) -> int:
    """Every request the app got carries the sidecar's identity headers only; returns how many."""
    heads = Requests(app_data).heads
    for headers in heads:
        cgi = [(k.decode("latin-1").upper().replace("-", "_"), v) for k, v in headers]
        identity = [(k, v) for k, v in cgi if k in IDENTITY]
        assert sorted(identity) == [
            ("X_FORWARDED_CLIENT_CERT", XFCC),
            ("X_FORWARDED_PROTO", b"https"),
        ]
    return len(heads)


# -- structured requests: heads a client could plausibly send, with forged identity headers --

IDENTITY_SPELLINGS = [
    b"X-Forwarded-Client-Cert", b"x-forwarded-client-cert", b"X_Forwarded_Client_Cert",
    b"x_forwarded-client_cert", b"X-FORWARDED-CLIENT-CERT", b"X-Forwarded-Proto",
    b"X_Forwarded_Proto", b"X-Jwt-Claims", b"x_jwt_claims", b"X-Jwt-Token",
]  # fmt: skip
OTHER_NAMES = [
    b"Host", b"Accept", b"Connection", b"Transfer-Encoding", b"Content-Length", b"Expect",
    b"Upgrade", b"Keep-Alive", b"TE", b"Trailer", b"Proxy-Connection", b"X_Custom", b"X-Custom",
]  # fmt: skip
token_chars = st.sampled_from(list(b"abcXYZ019-_!#$%&'*+.^`|~"))
names = st.one_of(
    st.sampled_from(IDENTITY_SPELLINGS + OTHER_NAMES),
    st.lists(token_chars, min_size=1, max_size=12).map(bytes),
)
VALUES = [
    b"chunked", b"xchunked", b"gzip, chunked", b"chunked, chunked", b" chunked ", b"CHUNKED",
    b"identity", b"0", b"5", b"-1", b"1, 2", b"close", b"keep-alive", b"upgrade",
    b"x-forwarded-client-cert", b"X-Forwarded-Client-Cert, x-forwarded-proto", b"h2c",
    b"websocket", b"100-continue", b"By=x;URI=spiffe://cluster.local/ns/kube-system/sa/admin",
]  # fmt: skip
values = st.one_of(
    st.sampled_from(VALUES),
    st.binary(max_size=20).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)),
)
# Mostly requests the sidecar forwards, and the cases it must refuse.
methods = st.sampled_from([b"GET"] * 4 + [b"POST", b"HEAD", b"PUT", b"OPTIONS", b"CONNECT"])
request_targets = st.sampled_from(
    [b"/", b"/x?y=1", b"/a/../b"] * 3 + [b"/%2e%2e/x", b"*", b"/a;b", b"x", b"/a%2Fb"]
)
versions = st.sampled_from([b" HTTP/1.1"] * 6 + [b" HTTP/1.0", b"", b" HTTP/2.0", b" HTTP/0.9"])


BODIES = [
    (b"", b""),
    (b"Content-Length: 5\r\n", b"hello"),
    (b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"),
]


@st.composite
def heads(draw) -> tuple[bytes, bytes]:
    """(a request head, the body its framing announces)."""
    line = draw(methods) + b" " + draw(request_targets) + draw(versions) + b"\r\n"
    headers = draw(st.lists(st.tuples(names, values), max_size=8))
    if draw(st.booleans()):
        headers.insert(0, (b"Host", b"backend"))
    framing, body = draw(st.sampled_from(BODIES))
    head = line + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + framing + b"\r\n"
    return head, body


def cut(draw, raw: bytes) -> list[bytes]:
    """The same bytes arriving in one piece or several."""
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=3)))
    bounds = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [raw]


@st.composite
def split(draw, data: st.SearchStrategy[bytes]) -> list[bytes]:
    return cut(draw, draw(data))


@st.composite
def one_request(draw) -> tuple[list[bytes], list[bytes]]:
    head, body = draw(heads())
    return cut(draw, head), [body] if body else []


def request_methods(sent: bytes) -> list[bytes]:
    """The methods of the requests in `sent`, in order, as llhttp reads them (up to the
    first byte it refuses)."""
    methods: list[bytes] = []

    class Collect:
        def on_headers_complete(self) -> None:
            methods.append(parser.get_method())

    parser = httptools.HttpRequestParser(Collect())
    try:
        parser.feed_data(sent)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass  # what follows a refused byte or an upgrade is not HTTP/1.1 requests
    return methods


class _Headers:
    def __init__(self) -> None:
        self.got: dict[bytes, bytes] = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self.got[name.lower()] = value


def statuses(data: bytes, sent: bytes = b"") -> list[int]:
    """Statuses of the responses the client received; fails on anything but HTTP/1.1.

    Responses are split one by one: the answer to a HEAD (known from the requests
    `sent`) has no body whatever its Content-Length says, which one response parser
    fed the whole stream cannot know."""
    methods = request_methods(sent)
    codes: list[int] = []
    rest = data
    while rest:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            raise AssertionError(f"the client got a cut head: {rest[:200]!r}")
        head, rest = rest[: end + 4], rest[end + 4 :]
        collect = _Headers()
        got = collect.got
        parser = httptools.HttpResponseParser(collect)
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            raise AssertionError(f"the client got malformed HTTP: {head[:200]!r}") from None
        code = parser.get_status_code()
        codes.append(code)
        if code < 200:
            continue  # interim: the same request's final answer follows
        if got.get(b"connection", b"").lower() == b"close":
            break  # the last answer on this connection: whatever follows is not read
        final = len([c for c in codes if c >= 200]) - 1
        method = methods[final] if final < len(methods) else b""
        if method == b"HEAD" or code in (204, 304):
            continue
        if got.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                line_end = rest.index(b"\r\n")
                size = int(rest[:line_end].split(b";")[0], 16)
                rest = rest[line_end + 2 + size + (2 if size else 0) :]
                if size == 0:
                    rest = rest[rest.index(b"\r\n") + 2 :]  # no trailers from the sidecar
                    break
        elif b"content-length" in got:
            rest = rest[int(got[b"content-length"]) :]
        else:
            rest = b""  # delimited by the close
    return codes


@given(one_request())
@example(
    (
        [
            b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_Client_Cert: By=x;URI=spiffe://x/sa/admin\r\n\r\n"
        ],
        [],
    )
)
@example(
    (
        [b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n"],
        [b"5\r\nhello\r\n0\r\n\r\n"],
    )
)
@example(([b"GET /\r\n"], []))
@example(([b"GET / HTTP/1.1\r\nConnection: x-forwarded-proto\r\nX_Jwt_Claims: e30\r\n\r\n"], []))
def test_one_request_reaches_the_app_with_only_the_sidecars_identity(request):
    head, body = request
    after = run(head + body)
    client, app = after[len(head) - 1]  # once the head is in
    codes = statuses(client)
    if codes and codes[-1] >= 400:
        assert app == b"", "a request refused on its head sends nothing to the app"
    client, app = after[-1]
    check_identity_headers(app)
    codes = statuses(client)
    assert 500 not in codes, client
    assert all(c in (100, 200) or 400 <= c < 600 for c in codes), client


@given(split(st.lists(heads().map(b"".join), min_size=1, max_size=3).map(b"".join)))
# The app answers a body even to HEAD: that body never reaches the next pipelined answer.
@example([b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"])
# A refusal answered to a HEAD has no body either.
@example(
    [
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
        b"HEAD / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    ]
)
@example([b"HEAD /%2e%2e/x HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"])
def test_pipelined_requests(pieces):
    client, app = run(pieces)[-1]
    check_identity_headers(app)
    assert 500 not in statuses(client, b"".join(pieces))


@st.composite
def mutated(draw) -> bytes:
    """A plausible request with a few bytes inserted, removed or replaced."""
    data = bytearray(b"".join(draw(heads())))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        what = draw(st.sampled_from(["insert", "delete", "replace"]))
        junk = draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b"_", b"\xff"]))
        if what == "insert":
            data[at:at] = junk
        elif what == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            data[at : at + len(junk)] = junk
    return bytes(data)


@given(split(st.one_of(st.binary(max_size=200), mutated())))
@example([b"GET / HTTP/1.1\r\n\r\n", b"\x00"])
def test_arbitrary_bytes(pieces):
    client, app = run(pieces)[-1]
    check_identity_headers(app)
    assert 500 not in statuses(client, b"".join(pieces))
