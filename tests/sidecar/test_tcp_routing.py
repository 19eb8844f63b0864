"""Opaque TCP routing (sidecar/routing/tcp.py) at the unit level: an upstream connection that
is already gone when the dial returns must not leave the client hanging."""

from __future__ import annotations

import asyncio
import socket

from sidecar.engines.base import ConnGroup
from sidecar.routing.tcp import TcpOutbound, TcpUpstream


class FakeEp:
    def __str__(self) -> str:
        return "10.0.0.1:15006"


class LostTransport:
    """A transport that has closed already."""

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return True


class FakePool:
    label = "cache.default"

    def __init__(self) -> None:
        self.endpoints = [FakeEp()]
        self.active = 0
        self.discarded: list[object] = []

    def admit(self) -> bool:
        self.active += 1
        return True

    def done(self, retried: bool) -> None:
        self.active -= 1

    def pick(self, subset, tried):
        return self.endpoints[0] if not tried else None

    def failed(self, ep) -> None:
        pass

    def answered(self, ep, status: int) -> None:
        pass

    def discard(self, conn) -> None:
        self.discarded.append(conn)

    async def connect(self, ep) -> TcpUpstream:
        up = TcpUpstream(None)
        up.transport = LostTransport()  # type: ignore[assignment]
        up.lost = True  # its connection_lost ran before the dial resumed
        return up


def test_an_upstream_lost_before_the_splice_closes_the_client_and_frees_everything():
    async def go():
        released: list[int] = []
        group = ConnGroup(on_release=lambda: released.append(1))
        a, b = socket.socketpair()
        logs = []

        class Log:
            def write(self, rec) -> None:
                logs.append(rec)

        pool = FakePool()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(
            lambda: TcpOutbound(pool, "spiffe://cluster.local/ns/a/sa/b", 5.0, Log(), group), a
        )
        for _ in range(50):
            await asyncio.sleep(0.01)
            if released:
                break
        b.close()
        return transport.is_closing(), len(group.conns), released, logs, pool

    closing, members, released, logs, pool = asyncio.run(go())
    assert closing and members == 0 and released == [1]
    assert pool.active == 0 and len(pool.discarded) == 1
    assert [r.error for r in logs] == ["upstream_reset"]
