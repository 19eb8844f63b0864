"""The CA client fails over between the replicas behind one name, address by address.

A headless Service gives one address per CA replica under one name. Each address is a
candidate tried like a separate URL: a replica that answers 503 or 429, or refuses the
connection, is passed over for the next address; the handshake still verifies the CA's
certificate against the *name* (a certificate for another name is refused at once, not
passed over); the next request starts from the address that answered. The order table
needs no sockets; the rest runs real HTTPS servers on 127.0.0.2 and 127.0.0.3 (one port
for both), with a fixed resolver standing in for DNS.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
import trustme
from aiohttp import web

from meshca.client import (
    Candidate,
    CAReplicas,
    CAUnavailable,
    CAUntrusted,
    EnrollmentClient,
    fetch_bundle,
    new_key_and_csr,
)

NAME = "ca.test"
FIRST, SECOND = "127.0.0.2", "127.0.0.3"
NOW = dt.datetime.now(dt.UTC)


def fixed_resolver(table: dict[str, Sequence[str]], calls: list[str] | None = None):
    """A resolver answering from `table`; an unknown name fails as getaddrinfo would."""

    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(table[host])

    return resolve


# --- the order in which candidates are tried (no sockets) ---


def tried_in_order(replicas: CAReplicas, answer_at: str | None = None) -> list[str]:
    """The candidates one request tries (as `str`), every one failing but `answer_at`."""
    seen: list[str] = []

    async def attempt(c: Candidate) -> str:
        seen.append(str(c))
        if str(c) == answer_at:
            return str(c)
        raise CAUnavailable("down")

    async def go() -> None:
        try:
            await replicas.first_answer(attempt)
        except CAUnavailable:
            pass

    asyncio.run(go())
    return seen


A1, A2 = "https://a.test:8443 (10.0.0.1)", "https://a.test:8443 (10.0.0.2)"
IP = "https://10.0.9.9:8443"
B1 = "https://b.test (10.0.1.1)"


@pytest.mark.parametrize(
    "answered_before,order",
    [
        (None, [A1, A2, IP, B1]),  # as listed, each name in the resolver's order
        (A2, [A2, IP, B1, A1]),  # from the last that answered, round to the ones before it
        (IP, [IP, B1, A1, A2]),
        (B1, [B1, A1, A2, IP]),
    ],
)
def test_candidates_are_the_urls_as_listed_each_name_address_by_address(answered_before, order):
    table = {"a.test": ["10.0.0.1", "10.0.0.2"], "b.test": ["10.0.1.1"]}
    replicas = CAReplicas(
        ["https://a.test:8443/", IP, "https://b.test"], resolver=fixed_resolver(table)
    )
    if answered_before is not None:
        tried_in_order(replicas, answer_at=answered_before)
    assert tried_in_order(replicas) == order
    assert replicas.urls == ("https://a.test:8443", IP, "https://b.test")  # as configured


def test_a_candidate_says_where_to_connect_and_what_name_to_verify():
    table = {"a.test": ["10.0.0.1", "fd00::1"], "b.test": ["10.0.1.1"]}
    replicas = CAReplicas(
        ["https://a.test:8443", "https://b.test", IP], resolver=fixed_resolver(table)
    )
    got: list[Candidate] = []

    async def attempt(c: Candidate) -> None:
        got.append(c)
        raise CAUnavailable("down")

    with pytest.raises(CAUnavailable):
        asyncio.run(replicas.first_answer(attempt))
    assert [(c.target("/v1/jwt"), c.name, c.headers({})) for c in got] == [
        ("https://10.0.0.1:8443/v1/jwt", "a.test", {"Host": "a.test:8443"}),
        ("https://[fd00::1]:8443/v1/jwt", "a.test", {"Host": "a.test:8443"}),
        ("https://10.0.1.1/v1/jwt", "b.test", {"Host": "b.test"}),  # the default port
        (IP + "/v1/jwt", None, {}),  # an IP address: as configured, not resolved
    ]


def test_names_are_resolved_only_as_far_as_the_request_gets():
    calls: list[str] = []
    table = {"a.test": ["10.0.0.1"], "b.test": ["10.0.1.1"], "localhost": ["127.0.0.1"]}
    replicas = CAReplicas(
        ["https://localhost:1", "https://a.test", "https://b.test"],
        resolver=fixed_resolver(table, calls),
    )
    assert tried_in_order(replicas, answer_at="https://localhost:1 (127.0.0.1)") == [
        "https://localhost:1 (127.0.0.1)"
    ]
    assert calls == ["localhost"]  # a name like any other; the others were not needed
    tried_in_order(replicas, answer_at="https://localhost:1 (127.0.0.1)")
    assert calls == ["localhost", "localhost"]  # resolved again for every request


def test_an_address_gone_from_the_name_starts_the_name_from_its_first_address():
    table = {"a.test": ["10.0.0.1", "10.0.0.2"]}
    replicas = CAReplicas(["https://a.test:8443"], resolver=fixed_resolver(table))
    tried_in_order(replicas, answer_at=A2)
    table["a.test"] = ["10.0.0.3", "10.0.0.1"]  # the replica at 10.0.0.2 went away
    assert tried_in_order(replicas) == [
        "https://a.test:8443 (10.0.0.3)",
        "https://a.test:8443 (10.0.0.1)",
    ]
    assert replicas.url == "https://a.test:8443"


def test_a_lookup_that_hangs_is_a_candidate_that_failed():
    async def hangs(host: str, port: int) -> list[str]:
        await asyncio.sleep(60)
        return []

    replicas = CAReplicas(["https://a.test", IP], timeout=0.1, resolver=hangs)
    assert tried_in_order(replicas) == [IP]


# --- real HTTPS servers on two loopback addresses, one port ---


@dataclass
class Replica:
    """An HTTPS server standing in for one CA replica; remembers what it was asked."""

    status: int = 200
    hosts: list[str] = field(default_factory=list)  # the Host header of each request
    sni: list[str | None] = field(default_factory=list)  # the server name of each handshake

    def saw_sni(self, sslobj: object, name: str | None, ctx: object) -> None:
        self.sni.append(name)

    @property
    def requests(self) -> int:
        return len(self.hosts)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hosts.append(request.headers.get("Host", ""))
        if self.status != 200:
            return web.json_response(
                {"error": "unavailable", "detail": "the store is down"}, status=self.status
            )
        if request.path == "/v1/bundle":
            return web.Response(status=304)  # as for the ETag the client sends
        if request.path == "/v1/jwt":
            return web.json_response({"token": "a.b.c", "expires_at": NOW.isoformat()})
        return web.json_response(
            {
                "spiffe_id": "spiffe://cluster.local/ns/default/sa/web",
                "certificate_chain": "chain",
                "trust_bundle": "bundle",
                "expires_at": NOW.isoformat(),
                "serial": request.transport.get_extra_info("sockname")[0],  # who issued
            }
        )


def bind_pair() -> tuple[socket.socket, socket.socket]:
    """Two listening-ready sockets, on 127.0.0.2:P and 127.0.0.3:P (the same free P)."""
    for _ in range(20):
        first = socket.socket()
        first.bind((FIRST, 0))
        port = first.getsockname()[1]
        second = socket.socket()
        try:
            second.bind((SECOND, port))
        except OSError:  # taken on 127.0.0.3: another port
            first.close()
            second.close()
            continue
        return first, second
    raise AssertionError("no port free on both 127.0.0.2 and 127.0.0.3")


@dataclass
class World:
    port: int
    trust: str  # the PEM bundle the client trusts
    first: Replica
    second: Replica

    @property
    def url(self) -> str:
        return f"https://{NAME}:{self.port}"

    def client(self, *urls: str) -> EnrollmentClient:
        resolver = fixed_resolver({NAME: [FIRST, SECOND]})
        return EnrollmentClient(list(urls) or [self.url], self.trust, timeout=5, resolver=resolver)


@pytest.fixture
def tls() -> trustme.CA:
    return trustme.CA()


async def serve(tls: trustme.CA, first_name: str = NAME, first: str = "serves"):
    """Replicas at 127.0.0.2:P (certificate for `first_name`) and 127.0.0.3:P (for
    ca.test). At 127.0.0.2:P, with `first` "refuses", nothing listens; with "hangs",
    a connection attempt is never answered (the listen queue is full)."""
    replicas = Replica(), Replica()
    sock1, sock2 = bind_pair()
    port = sock1.getsockname()[1]
    runners, filler = [], socket.socket()
    try:
        for replica, sock, name, mode in (
            (replicas[0], sock1, first_name, first),
            (replicas[1], sock2, NAME, "serves"),
        ):
            if mode == "refuses":
                sock.close()
                continue
            if mode == "hangs":
                sock.listen(0)  # room for one queued connection, which `filler` takes:
                filler.connect((FIRST, port))  # Linux drops the SYNs after it
                continue
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.issue_cert(name).configure_cert(ctx)
            ctx.sni_callback = replica.saw_sni
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", replica.handle)
            runner = web.AppRunner(app)
            await runner.setup()
            runners.append(runner)
            await web.SockSite(runner, sock, ssl_context=ctx).start()
        yield World(port, tls.cert_pem.bytes().decode(), *replicas)
    finally:
        for runner in runners:
            await runner.cleanup()
        for sock in (filler, sock1, sock2):
            sock.close()


@pytest.fixture
async def world(tls: trustme.CA) -> AsyncIterator[World]:
    async for w in serve(tls):
        yield w


@pytest.fixture
async def first_refuses(tls: trustme.CA) -> AsyncIterator[World]:
    async for w in serve(tls, first="refuses"):
        yield w


@pytest.fixture
async def first_hangs(tls: trustme.CA) -> AsyncIterator[World]:
    async for w in serve(tls, first="hangs"):
        yield w


@pytest.fixture
async def first_impostor(tls: trustme.CA) -> AsyncIterator[World]:
    async for w in serve(tls, "other.test"):
        yield w


async def enroll(client: EnrollmentClient) -> str:
    _, csr = new_key_and_csr()
    return (await client.enroll(csr, "token")).serial


@pytest.mark.parametrize("status", [503, 429])
async def test_an_address_answering_503_or_429_is_passed_over_for_the_next(world, status):
    world.first.status = status
    assert await enroll(world.client()) == SECOND
    assert (world.first.requests, world.second.requests) == (1, 1)
    for replica in (world.first, world.second):  # both were asked as `ca.test`
        assert replica.hosts == [f"{NAME}:{world.port}"] and replica.sni == [NAME]


async def test_an_address_that_refuses_connections_is_passed_over(first_refuses):
    assert await enroll(first_refuses.client()) == SECOND
    assert first_refuses.second.sni == [NAME]


async def test_an_address_that_never_answers_the_connection_is_passed_over_soon(
    first_hangs, monkeypatch
):
    monkeypatch.setattr("meshca.client.CONNECT_TIMEOUT", 0.2)  # (3 s as shipped)
    start = time.monotonic()
    assert await enroll(first_hangs.client()) == SECOND  # whose whole timeout is 5 s
    assert time.monotonic() - start < 2


async def test_a_certificate_for_another_name_is_refused_not_passed_over(first_impostor):
    with pytest.raises(CAUntrusted, match=r"127\.0\.0\.2"):
        await enroll(first_impostor.client())
    assert first_impostor.second.requests == 0


async def test_a_name_that_does_not_resolve_is_passed_over_for_the_next_url(world, caplog):
    client = world.client("https://gone.test:1", world.url)
    with caplog.at_level(logging.WARNING, logger="meshca.client"):
        assert await enroll(client) == FIRST
    assert world.first.requests == 1 and world.second.requests == 0
    assert [r.getMessage() for r in caplog.records] == [
        "cannot resolve gone.test (of the CA URL https://gone.test:1): Name or service not known"
    ]


async def test_a_name_that_keeps_failing_to_resolve_is_logged_once(world, caplog):
    world.first.status = world.second.status = 503
    client = world.client("https://gone.test:1", world.url)
    with caplog.at_level(logging.WARNING, logger="meshca.client"):
        for _ in range(3):
            with pytest.raises(CAUnavailable, match="answered 503"):
                await enroll(client)
    assert len(caplog.records) == 1
    assert world.first.requests == world.second.requests == 3


async def test_the_next_request_starts_at_the_address_that_answered(world):
    world.first.status = 503
    client = world.client()
    await enroll(client)
    world.first.status = 200  # back, but the second answered last
    await enroll(client)
    assert (world.first.requests, world.second.requests) == (1, 2)
    world.second.status = 503  # now the second fails: round to the first
    await enroll(client)
    assert (world.first.requests, world.second.requests) == (2, 3)
    assert client.url == world.url  # what operators see is the configured URL


async def test_jwt_svids_fail_over_between_addresses(world, tls):
    world.first.status = 503
    leaf = tls.issue_cert("web.test")  # the client certificate (the server asks for none)
    chain = "".join(b.bytes().decode() for b in leaf.cert_chain_pems)
    token, _ = await world.client().fetch_jwt("api", chain, leaf.private_key_pem.bytes())
    assert token == "a.b.c"
    assert world.second.hosts == [f"{NAME}:{world.port}"] and world.second.sni == [NAME]


async def test_bundle_polls_fail_over_between_addresses(world):
    world.first.status = 503
    replicas = CAReplicas([world.url], resolver=fixed_resolver({NAME: [FIRST, SECOND]}))
    for _ in range(2):  # 304 Not Modified: the document we hold is current
        got = await fetch_bundle(replicas, world.trust, NOW, etag='"7"', timeout=5)
        assert got == (None, '"7"', False)
    assert (world.first.requests, world.second.requests) == (1, 2)
    assert world.second.sni == [NAME, NAME]
