"""The protocol rigs work on their own, with no sidecar in between, so that a failure through
the sidecars is never the rig's: the gRPC app (tests/grpc_app.py) called with grpcio echoes,
streams 10 MB each way, sends its trailer, honours a deadline, fails with the code asked
for and counts what it served; the WebSocket app (tests/ws_app.py) echoes text and binary
frames, closes with the code asked for and records what reached it; redis-server
(tests/redisserver.py) answers redis-cli. Both apps exit 0 on SIGTERM.
"""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import time
from collections.abc import Iterator

import aiohttp
import grpc
import pytest
from grpc_app import start_grpc_app, stream_message
from grpcclient import bidi, channel, client_stream, fail, server_stream, slow, stats, unary, whoami
from mesh import Proc
from redisserver import RedisServer
from redisserver import redis_server_fixture as redis_server_fixture  # the fixture `redis_server`
from ws_app import start_ws_app

pytestmark = pytest.mark.e2e

KIB = 1024


@pytest.fixture(scope="module")
def grpc_app() -> Iterator[Proc]:
    app = start_grpc_app()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture
def ch(grpc_app: Proc) -> Iterator[grpc.Channel]:
    with channel(grpc_app.urls["grpc"]) as c:
        yield c


@pytest.fixture(scope="module")
def ws_app() -> Iterator[Proc]:
    app = start_ws_app()
    try:
        yield app
    finally:
        app.stop()


def test_grpc_unary_echoes_with_trailer(ch):
    data = b"hello\x00\xffworld"
    reply, call = unary(ch, data, metadata=[("x-test", "1")])
    assert reply == data
    assert call.code() is grpc.StatusCode.OK
    assert ("x-app-trailer", "done") in call.trailing_metadata()


def test_grpc_whoami_shows_the_metadata_received(ch):
    sent = {
        "x-forwarded-client-cert": "By=spiffe://cluster.local/ns/default/sa/backend",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    got = whoami(ch, metadata=list(sent.items()))
    assert {k: got.get(k) for k in sent} == sent
    assert got["user-agent"].startswith("grpc-python")


def test_grpc_server_stream_of_10_mb(ch):
    size, count, total = 64 * KIB, 160, 0
    for i, message in enumerate(server_stream(ch, count, size, timeout=30)):
        assert message == stream_message(i, size), f"message {i} differs"
        total += len(message)
    assert (i + 1, total) == (count, count * size)


def test_grpc_client_stream_digest_matches(ch):
    chunks = [os.urandom(n) for n in (1, 64 * KIB, 3 * 1024 * KIB, 0, 7)] * 3
    doc = client_stream(ch, chunks)
    assert doc == {
        "count": len(chunks),
        "bytes": sum(map(len, chunks)),
        "sha256": hashlib.sha256(b"".join(chunks)).hexdigest(),
    }


def test_grpc_bidi_echoes_each_message_as_it_arrives(ch):
    messages = [f"m{i}".encode() * (i + 1) for i in range(5)] + [os.urandom(256 * KIB)]
    echoed: queue.Queue[bytes] = queue.Queue()

    def requests() -> Iterator[bytes]:
        for m in messages:
            yield m
            echoed.get(timeout=5)  # the next message goes only after this one's echo came

    got = []
    for reply in bidi(ch, requests(), timeout=30):
        got.append(reply)
        echoed.put(reply)
    assert got == messages


def test_grpc_slow_call_runs_out_of_time_and_the_app_notices(ch):
    before = stats(ch)["cancelled"].get("Slow", 0)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        slow(ch, 5, timeout=0.5)
    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 2
    deadline = time.monotonic() + 3
    while stats(ch)["cancelled"].get("Slow", 0) == before:
        assert time.monotonic() < deadline, "the app kept sleeping after the deadline"
        time.sleep(0.05)
    assert slow(ch, 0.1, timeout=5) == b"late"


@pytest.mark.parametrize("name", ["NOT_FOUND", "PERMISSION_DENIED", "UNAVAILABLE"])
def test_grpc_fail_gives_the_code_asked_for(ch, name):
    err = fail(ch, name)
    assert err.code() is grpc.StatusCode[name]
    assert err.details() == f"failed as asked: {name}"


def test_grpc_stats_count_served_calls_only(ch):
    before = stats(ch)["calls"]
    unary(ch, b"a")
    unary(ch, b"b")
    whoami(ch)
    with pytest.raises(grpc.RpcError) as e:  # a method the app does not have
        ch.unary_unary("/meshtest.Echo/Nope")(b"", timeout=5)
    assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
    after = stats(ch)["calls"]
    delta = {m: after.get(m, 0) - before.get(m, 0) for m in after}
    assert {m: n for m, n in delta.items() if n} == {"Unary": 2, "Whoami": 1}


def test_grpc_app_exits_0_on_sigterm():
    app = start_grpc_app()
    try:
        with channel(app.urls["grpc"]) as c:
            assert unary(c, b"x")[0] == b"x"
        app.proc.send_signal(signal.SIGTERM)
        assert app.proc.wait(timeout=10) == 0, app.stderr
    finally:
        app.stop()


async def test_ws_echoes_text_and_binary_and_closes_with_the_code_asked_for(ws_app):
    url = ws_app.urls["ws"]
    big = os.urandom(8 * 1024 * KIB)
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/seen") as r:
            before = await r.json()
        async with s.get(url + "/") as r:
            assert (r.status, await r.text()) == (200, "ok")
        async with s.ws_connect(
            url + "/ws", headers={"x-test": "rig"}, max_msg_size=32 * 1024 * KIB
        ) as ws:
            await ws.send_str("héllo")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "héllo")
            await ws.send_bytes(big)
            msg = await ws.receive(timeout=10)
            assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == big
            await ws.send_str("close:4001")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data, msg.extra) == (aiohttp.WSMsgType.CLOSE, 4001, "bye")
        assert ws.close_code == 4001
        async with s.ws_connect(url + "/ws") as ws:
            await ws.close(code=4002)
        deadline = time.monotonic() + 3
        while True:
            async with s.get(url + "/seen") as r:
                after = await r.json()
            if 4002 in after["client_closes"] or time.monotonic() > deadline:
                break
    assert after["upgrades"] - before["upgrades"] == 2
    assert after["requests"] - before["requests"] == 1  # GET /; /seen is not counted
    assert after["messages"] - before["messages"] == 2
    assert after["client_closes"][len(before["client_closes"]) :] == [4002]
    assert after["last_upgrade_headers"]["upgrade"].lower() == "websocket"
    assert "x-test" not in after["last_upgrade_headers"]  # the last one sent no x-test


async def test_ws_app_closes_open_sockets_and_exits_0_on_sigterm():
    app = start_ws_app()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(app.urls["ws"] + "/ws") as ws:
                app.proc.send_signal(signal.SIGTERM)
                msg = await ws.receive(timeout=5)
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert app.proc.wait(timeout=10) == 0, app.stderr
    finally:
        app.stop()


def test_redis_answers_redis_cli(redis_server: RedisServer):
    assert redis_server.cli("SET", "k", "v").stdout.strip() == "OK"
    got = redis_server.cli("GET", "k")
    assert (got.returncode, got.stdout.strip()) == (0, "v"), redis_server.log_tail()
    assert redis_server.address == f"127.0.0.1:{redis_server.port}"
    assert "Ready to accept connections" in redis_server.log.read_text()
