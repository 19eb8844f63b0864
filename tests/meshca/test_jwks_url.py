"""A JWKS fetched over HTTPS (`meshca.jwks.UrlJwks`): one request per fetch on a connection
of its own (`meshca.https`), no HTTP client library, so a sidecar whose issuer names a
JWKS URL does not hold aiohttp (10 MiB) for a fetch every few minutes.

Against a real TLS server on 127.0.0.1 (trustme certificates): keys arrive, with the
bearer token sent; redirects to https:// are followed (relative and absolute, at most
three), to http:// refused; an error status, an oversized document or a bad bearer file
keep the keys held, and the bearer never appears in a message.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.jwks import MAX_JWKS_BYTES, UrlJwks

ROOT = Path(__file__).resolve().parents[2]


def jwks_doc(kid: str) -> bytes:
    nums = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def b64(n: int) -> str:
        import base64

        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    key = {"kty": "EC", "crv": "P-256", "x": b64(nums.x), "y": b64(nums.y), "kid": kid}
    return json.dumps({"keys": [{**key, "use": "sig", "alg": "ES256"}]}).encode()


class Server:
    """An HTTPS server answering each path from `routes`: (status, headers, body)."""

    def __init__(
        self,
        ca: trustme.CA,
        routes: dict[str, tuple[int, dict[str, str], bytes]],
        delay: float = 0.0,
    ):
        self.routes = routes
        self.delay = delay
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self.ctx)
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.answer, "127.0.0.1", 0, ssl=self.ctx)
        port = self.server.sockets[0].getsockname()[1]
        return f"https://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = dict(line.split(": ", 1) for line in head[1:] if line)
            self.seen.append((path, {k.lower(): v for k, v in headers.items()}))
            status, extra, body = self.routes.get(path, (404, {}, b"not here"))
            await asyncio.sleep(self.delay)
            lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
            lines += [f"{k}: {v}" for k, v in extra.items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def test_keys_arrive_with_the_bearer_token_sent(ca, tmp_path):
    bearer = tmp_path / "token"
    bearer.write_text("eyJhbGciOi.payload.sig\n")
    server = Server(ca, {"/keys": (200, {"Content-Type": "application/json"}, jwks_doc("k1"))})

    async def go() -> object:
        async with server as base:
            src = UrlJwks(f"{base}/keys", bearer_file=bearer, ssl_context=client_ctx(ca))
            assert await src.refresh() is True
            got = src.get("k1")
            await src.close()
            return got

    key = asyncio.run(go())
    assert key is not None and key.key_type == "EC"
    assert [path for path, _ in server.seen] == ["/keys"]
    assert server.seen[0][1]["authorization"] == "Bearer eyJhbGciOi.payload.sig"
    assert server.seen[0][1]["connection"] == "close"


@pytest.mark.parametrize(
    "location,lands",
    [
        ("/moved", "/moved"),
        ("https://127.0.0.1:{port}/moved", "/moved"),
        ("moved", "/keys/moved"),  # relative to /keys/x
    ],
)
def test_redirects_to_https_are_followed(ca, location, lands):
    routes = {"/keys/x": (302, {"Location": ""}, b""), lands: (200, {}, jwks_doc("k2"))}
    server = Server(ca, routes)  # the other path answers 404

    async def go() -> object:
        async with server as base:
            port = base.rsplit(":", 1)[1]
            routes["/keys/x"] = (302, {"Location": location.format(port=port)}, b"")
            src = UrlJwks(f"{base}/keys/x", ssl_context=client_ctx(ca))
            await src.refresh()
            return src.get("k2")

    assert asyncio.run(go()) is not None
    assert [p for p, _ in server.seen] == ["/keys/x", lands]


def test_the_bearer_token_goes_to_its_origin_only(ca, tmp_path):
    """A redirect to the same origin keeps the Authorization header; one to another host
    (here `localhost` for `127.0.0.1`) drops it, as curl and browsers do: a service
    account token must not follow an issuer's (or an open redirect's) Location."""
    bearer = tmp_path / "token"
    bearer.write_text("sa-token-value")
    doc = jwks_doc("k1")
    server = Server(ca, {"/a": (302, {}, b""), "/b": (302, {}, b""), "/c": (200, {}, doc)})

    async def go() -> object:
        async with server as base:
            port = base.rsplit(":", 1)[1]
            server.routes["/a"] = (302, {"Location": "/b"}, b"")
            server.routes["/b"] = (302, {"Location": f"https://localhost:{port}/c"}, b"")
            src = UrlJwks(f"{base}/a", bearer_file=bearer, ssl_context=client_ctx(ca))
            await src.refresh()
            return src.get("k1")

    assert asyncio.run(go()) is not None
    sent = {path: headers.get("authorization") for path, headers in server.seen}
    assert sent == {"/a": "Bearer sa-token-value", "/b": "Bearer sa-token-value", "/c": None}


def test_an_upgrade_answer_or_a_slow_redirect_chain_keeps_the_keys(ca, caplog, monkeypatch):
    """A 101 answer (httptools raises an upgrade, not a parser error) and a chain of slow
    redirects (one FETCH_TIMEOUT for the document, its redirects included) each fail the
    fetch, log why, and keep the keys held; `refresh` never raises."""
    import meshca.jwks as jwks

    monkeypatch.setattr(jwks, "FETCH_TIMEOUT", 1.0)
    upgrade = (101, {"Upgrade": "websocket", "Connection": "Upgrade"}, b"")
    server = Server(ca, {"/keys": (200, {}, jwks_doc("k1"))})

    async def go() -> object:
        async with server as base:
            src = UrlJwks(f"{base}/keys", ssl_context=client_ctx(ca), min_interval=0)
            await src.refresh()
            held = src.get("k1")
            server.routes["/keys"] = upgrade
            assert await src.refresh() is True
            assert src.get("k1") is held
            server.routes["/keys"] = (302, {"Location": "/keys2"}, b"")
            server.routes["/keys2"] = (302, {"Location": "/keys3"}, b"")
            server.routes["/keys3"] = (200, {}, jwks_doc("k9"))
            # each answer within the second, the three of them not: the document is not
            # taken (with a timeout per answer, it would be)
            server.delay = 0.6
            await src.refresh()
            assert src.get("k9") is None and src.get("k1") is held
            return held

    assert asyncio.run(go()) is not None
    assert "a protocol upgrade" in caplog.text
    assert "TimeoutError" in caplog.text or "failed, using cached keys" in caplog.text


@pytest.mark.parametrize(
    "routes,why",
    [
        ({"/keys": (302, {"Location": "http://127.0.0.1:1/keys"}, b"")}, "not https://"),
        ({"/keys": (302, {"Location": "/keys"}, b"")}, "more than 3 redirects"),
        ({"/keys": (500, {}, b"oops")}, "answered 500"),
        ({"/keys": (200, {}, b"x" * (MAX_JWKS_BYTES + 1))}, f"more than {MAX_JWKS_BYTES} bytes"),
        ({"/keys": (200, {}, b'{"keys": 3}')}, "not a usable JWKS"),
    ],
    ids=["redirect-to-http", "redirect-loop", "error-status", "too-large", "not-a-jwks"],
)
def test_a_bad_answer_keeps_the_keys_held(ca, caplog, routes, why):
    good = {"/keys": (200, {}, jwks_doc("k1"))}
    server = Server(ca, dict(good))

    async def go() -> tuple[object, object]:
        async with server as base:
            src = UrlJwks(f"{base}/keys", ssl_context=client_ctx(ca), min_interval=0)
            await src.refresh()
            held = src.get("k1")
            server.routes.clear()
            server.routes.update(routes)
            await src.refresh()
            return held, src.get("k1")

    before, after = asyncio.run(go())
    assert before is not None and after is before
    assert why in caplog.text
    if why == "more than 3 redirects":
        assert len(server.seen) == 1 + 4  # the first fetch, then the first try and 3 redirects


def test_a_bearer_file_with_a_line_break_inside_is_refused_unquoted(ca, tmp_path, caplog):
    bearer = tmp_path / "token"
    bearer.write_text("secret-part-one\r\nX-Injected: yes")
    server = Server(ca, {"/keys": (200, {}, jwks_doc("k1"))})

    async def go() -> object:
        async with server as base:
            src = UrlJwks(f"{base}/keys", bearer_file=bearer, ssl_context=client_ctx(ca))
            await src.refresh()
            return src.get("k1")

    assert asyncio.run(go()) is None
    assert server.seen == []  # nothing was sent
    assert "does not hold a usable bearer token" in caplog.text
    assert "secret-part-one" not in caplog.text


SCRIPT = """
import asyncio, json, ssl, sys
sys.path.insert(0, {tests!r})
import trustme
sys.path.insert(0, {here!r})
from test_jwks_url import Server, client_ctx, jwks_doc
import sidecar.cli
from meshca.jwks import UrlJwks

async def go():
    ca = trustme.CA()
    server = Server(ca, {{"/keys": (200, {{}}, jwks_doc("k1"))}})
    async with server as base:
        src = UrlJwks(base + "/keys", ssl_context=client_ctx(ca))
        await src.refresh()
        return src.get("k1") is not None

print(json.dumps({{"key": asyncio.run(go()), "aiohttp": "aiohttp" in sys.modules}}))
"""


def test_a_sidecar_fetching_a_jwks_never_loads_aiohttp():
    script = SCRIPT.format(tests=str(ROOT / "tests"), here=str(Path(__file__).parent))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"key": True, "aiohttp": False}


def test_a_refresh_to_the_same_document_keeps_its_keys_and_says_nothing_again(ca, caplog):
    """The same document fetched again (every refresh, as an unchanged issuer serves it):
    the same key objects (a verified token cached with its key stays cached), and the
    left-out key's warning once; a changed document: new objects."""
    good = json.loads(jwks_doc("k1"))["keys"][0]
    small = {"kty": "RSA", "n": "AQAB" * 30, "e": "AQAB", "kid": "old"}
    same = json.dumps({"keys": [good, small]}).encode()
    routes = {"/keys": (200, {}, same)}
    server = Server(ca, routes)

    async def go() -> tuple[object, ...]:
        async with server as base:
            src = UrlJwks(f"{base}/keys", ssl_context=client_ctx(ca), min_interval=0)
            await src.refresh()
            first = src.get("k1")
            await src.refresh()
            await src.refresh()
            kept = src.get("k1")
            routes["/keys"] = (200, {}, json.dumps({"keys": [good]}).encode())
            await src.refresh()
            changed = src.get("k1")
            return first, kept, changed

    with caplog.at_level("INFO", logger="meshca.jwks"):
        first, kept, changed = asyncio.run(go())
    assert len(server.seen) == 4  # each refresh fetched
    assert first is not None and kept is first
    assert changed is not None and changed is not first and changed.key_type == "EC"
    assert caplog.text.count("keys left out") == 1
