"""WebSocket through both sidecars, with aiohttp's client and server.

The app (tests/ws_app.py) sits behind the `chat` sidecar; the frontend's client
upgrades through its outbound listener (a `Host` header, or the listener as an
HTTP proxy). The upgrade request is authenticated and authorized like any
request; after 101 both hops are byte pipes. Checked: text and binary echo, a
10 MB message, close codes both ways, the identity headers on the upgrade, and
that a denied upgrade gets 403 and the app sees nothing at all.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from e2e.protocol_rig import FRONTEND, INTRUDER, Rig, inbound_of, logged
from ws_app import start_ws_app

CHAT = "spiffe://cluster.local/ns/default/sa/chat"
SERVICE = "chat.default"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("ws"))
    try:
        app = rig.add(start_ws_app())
        chat = rig.sidecar(
            "chat",
            CHAT,
            app=app.urls["ws"].removeprefix("http://"),
            policy={
                "rules": [
                    {"name": "frontend", "action": "ALLOW", "from": {"principals": [FRONTEND]}}
                ]
            },
        )
        svc = {SERVICE: {"endpoints": [inbound_of(chat)], "identity": CHAT}}
        front = rig.sidecar("frontend", FRONTEND, services=svc)
        intruder = rig.sidecar("intruder", INTRUDER, services=svc)
        yield {"rig": rig, "app": app, "chat": chat, "front": front, "intruder": intruder}
    finally:
        rig.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def seen(env) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(env["app"].urls["ws"] + "/seen") as r:
            return await r.json()


def test_text_binary_and_a_10_mb_message_echo(env):
    async def go():
        async with aiohttp.ClientSession() as s:
            url = env["front"].urls["outbound"] + "/ws"
            async with s.ws_connect(url, headers={"Host": SERVICE}, max_msg_size=32 << 20) as ws:
                await ws.send_str("hello")
                assert (await ws.receive()).data == "hello"
                blob = os.urandom(1000)
                await ws.send_bytes(blob)
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == blob
                big = os.urandom(10 * 1024 * 1024)
                await ws.send_bytes(big)
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.BINARY and msg.data == big
                for i in range(100):  # a conversation: each answer before the next message
                    await ws.send_str(f"line {i}")
                    assert (await ws.receive()).data == f"line {i}"

    run(go())
    doc = run(seen(env))
    headers = doc["last_upgrade_headers"]
    assert f"URI={FRONTEND}" in headers["x-forwarded-client-cert"]
    assert headers["upgrade"].lower() == "websocket"
    lines = logged(env["chat"], "inbound", lambda r: r["path"] == "/ws")
    assert lines[-1]["status"] == 101 and lines[-1]["protocol"] == "websocket"


def test_close_codes_pass_both_ways(env):
    async def go():
        async with aiohttp.ClientSession() as s:
            proxy = env["front"].urls["outbound"]
            # as an HTTP proxy (absolute-form target), the way clients with HTTP_PROXY do it
            async with s.ws_connect(f"http://{SERVICE}/ws", proxy=proxy) as ws:
                await ws.send_str("close:4001")
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001
                assert msg.extra == "bye"
            async with s.ws_connect(f"http://{SERVICE}/ws", proxy=proxy) as ws:
                await ws.send_str("ping")
                assert (await ws.receive()).data == "ping"
                await ws.close(code=4002, message=b"client done")

    run(go())
    for _ in range(50):  # the app records the client's close once it has processed it
        if 4002 in run(seen(env))["client_closes"]:
            break
        run(asyncio.sleep(0.1))
    assert 4002 in run(seen(env))["client_closes"]


def test_a_denied_upgrade_gets_403_and_the_app_sees_nothing(env):
    before = run(seen(env))

    async def go():
        async with aiohttp.ClientSession() as s:
            url = env["intruder"].urls["outbound"] + "/ws"
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(url, headers={"Host": SERVICE})
            assert info.value.status == 403

    run(go())
    after = run(seen(env))
    assert (after["upgrades"], after["requests"]) == (before["upgrades"], before["requests"])
