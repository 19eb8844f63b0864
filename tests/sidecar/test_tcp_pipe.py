"""The opaque byte pipe (`sidecar.engines.tcp.pipe`): bytes both ways in order, bounded
memory under a slow reader, half-close, loss of one side, idle timeout, `on_close`.

Socket tests run a client -> front -> app chain on loopback: the front's protocol stops
reading, dials the app (whose connection is paused too, as a previous owner may leave
it) and splices the two transports. They run on asyncio's loop and on uvloop, over plain
TCP, TLS on both legs, and TLS to the client with plain TCP to the app ("mixed", what an
inbound sidecar does). In-memory transports pin the exact decisions no socket shows
(close or abort, what `eof_received` returns).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import random
import socket
import ssl
import struct
import time
import weakref
from collections.abc import Callable

import pytest
import trustme
import uvloop

from sidecar.engines.base import DEADLINES
from sidecar.engines.tcp.pipe import Pipe, splice

HOST = "127.0.0.1"
STEP = 3.0  # seconds any single await may take
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
BANNER = b"<app banner>"


@pytest.fixture(params=sorted(LOOPS))
def run(request):
    """Runs a test's coroutine on the loop under test, cut off after 15 s."""
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield lambda coro: runner.run(asyncio.wait_for(coro, 15))


@pytest.fixture(scope="module")
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client TLS contexts for 127.0.0.1."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(HOST).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def wait(aw, timeout: float = STEP):
    return asyncio.wait_for(aw, timeout)


def blob(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


# -- the chain ---------------------------------------------------------------------------


class Chain:
    """Client -> front -> app; `pipes` are what the front spliced, `closed` what `on_close`
    reported (in order)."""

    def __init__(self, app_ssl, splice_args: dict, on_close: Callable[[Pipe], None] | None):
        self.app_ssl = app_ssl
        self.app_port = 0
        self.splice_args = splice_args
        self.user_on_close = on_close
        self.pipes: list[Pipe] = []
        self.closed: list[Pipe] = []
        self.tasks: list[asyncio.Task] = []
        self.spliced = asyncio.Event()
        self.all_closed = asyncio.Event()
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def dial(self, front: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        app, _ = await loop.create_connection(Dialer, HOST, self.app_port, ssl=self.app_ssl)
        self.pipes.append(splice(front, app, on_close=self.on_close, **self.splice_args))
        self.spliced.set()

    def on_close(self, pipe: Pipe) -> None:
        self.closed.append(pipe)
        if len(self.closed) == len(self.pipes):
            self.all_closed.set()
        if self.user_on_close is not None:
            self.user_on_close(pipe)

    async def pipe(self) -> Pipe:
        await wait(self.spliced.wait())
        return self.pipes[-1]

    async def connect(self, client_ssl) -> None:
        self.reader, self.writer = await wait(
            asyncio.open_connection(HOST, self.front_port, ssl=client_ssl)
        )


class Front(asyncio.Protocol):
    """The listener's protocol before the pipe: stops reading and dials the app."""

    def __init__(self, chain: Chain):
        self.chain = chain

    def connection_made(self, transport):
        transport.pause_reading()
        self.chain.tasks.append(asyncio.ensure_future(self.chain.dial(transport)))


class Dialer(asyncio.Protocol):
    """The throwaway protocol of the connection to the app: reads nothing."""

    def connection_made(self, transport):
        transport.pause_reading()


@contextlib.asynccontextmanager
async def chain(app, mode: str, contexts, *, on_close=None, idle_timeout: float = 10.0, **kw):
    """A client connected through a front to `app` (an `asyncio.start_server` handler)."""
    server_ctx, client_ctx = contexts
    front_tls, app_tls = mode != "plain", mode == "tls"
    c = Chain(client_ctx if app_tls else None, dict(idle_timeout=idle_timeout, **kw), on_close)
    loop = asyncio.get_running_loop()
    app_server = await asyncio.start_server(app, HOST, 0, ssl=server_ctx if app_tls else None)
    front = await loop.create_server(
        lambda: Front(c), HOST, 0, ssl=server_ctx if front_tls else None
    )
    c.app_port = app_server.sockets[0].getsockname()[1]
    c.front_port = front.sockets[0].getsockname()[1]
    try:
        await c.connect(client_ctx if front_tls else None)
        yield c
    finally:
        if hasattr(c, "writer"):
            c.writer.transport.abort()
        for pipe in c.pipes:
            pipe.abort()
        for task in c.tasks:
            task.cancel()
        app_server.close()
        front.close()
        await asyncio.sleep(0.01)


async def echo_app(reader, writer):
    """Greets, then sends back what it reads; closes after the client's EOF."""
    writer.write(BANNER)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


MODES = pytest.mark.parametrize("mode", ["plain", "tls", "mixed"])


# -- over sockets ------------------------------------------------------------------------


@MODES
def test_bytes_flow_both_ways_in_order_pending_bytes_first(run, mode, contexts):
    """What the previous owners had read goes first; what the client sent before the splice
    (both transports paused) is not lost; the echo comes back byte-exact."""
    payload = blob(300_000)
    expected = b"<b-pending>" + BANNER + b"<a-pending>" + payload

    async def main():
        pending = dict(a_pending=b"<a-pending>", b_pending=b"<b-pending>")
        async with chain(echo_app, mode, contexts, **pending) as c:
            for i in range(0, len(payload), 7000):
                c.writer.write(payload[i : i + 7000])
            assert await wait(c.reader.readexactly(len(expected))) == expected
            pipe = await c.pipe()
            assert (pipe.bytes_a_to_b, pipe.bytes_b_to_a) == (11 + len(payload), len(expected))
            c.writer.close()
            await wait(c.all_closed.wait())
            assert c.closed == [pipe] and pipe.closed
            assert await wait(c.reader.read()) == b""

    run(main())


@MODES
def test_a_slow_reader_keeps_the_pipe_buffer_bounded(run, mode, contexts):
    """The app sends 20 MiB at once to a client that reads slowly: the pipe stops reading
    the app while the client's side is full, its write buffer never passes 4 MiB, and
    every byte arrives."""
    size, bound = 20 * 2**20, 4 * 2**20
    data = blob(size)

    async def blast(reader, writer):
        writer.write(data)
        writer.close()

    async def main():
        async with chain(blast, mode, contexts) as c:
            pipe = await c.pipe()
            sizes: list[int] = []
            paused: list[bool] = []

            async def sample():
                while not pipe.closed:
                    if pipe.a.transport is not None:
                        sizes.append(pipe.a.transport.get_write_buffer_size())
                        paused.append(pipe.a.write_paused)
                    await asyncio.sleep(0.001)

            sampler = asyncio.ensure_future(sample())
            await asyncio.sleep(0.3)  # the client reads nothing yet
            digest, got = hashlib.sha256(), 0
            while chunk := await wait(c.reader.read(1 << 16)):
                digest.update(chunk)
                got += len(chunk)
                if got % 4 == 0:
                    await asyncio.sleep(0.0005)
            sampler.cancel()
            assert got == size and digest.digest() == hashlib.sha256(data).digest()
            assert any(paused), "the pipe never stopped reading the app"
            assert max(sizes) <= bound
            assert pipe.bytes_b_to_a == size

    run(main())


def test_half_close_between_plain_transports(run, contexts):
    """The client shuts down its write side: the app gets every byte, then EOF, and its
    answer still reaches the client."""
    payload = blob(1_000_000)

    async def count_then_answer(reader, writer):
        got = await reader.read()  # up to EOF
        writer.write(b"%d bytes, sha256 %s" % (len(got), hashlib.sha256(got).hexdigest().encode()))
        writer.close()

    async def main():
        async with chain(count_then_answer, "plain", contexts) as c:
            c.writer.write(payload)
            c.writer.write_eof()
            answer = await wait(c.reader.read())
            assert answer == b"%d bytes, sha256 %s" % (
                len(payload),
                hashlib.sha256(payload).hexdigest().encode(),
            )
            await wait(c.all_closed.wait())

    run(main())


@MODES
def test_the_app_closing_flushes_everything_to_the_client(run, mode, contexts):
    """The app writes and closes: the client reads all of it, then EOF. Between plain
    transports that is a half-close (the pipe stays until the client closes too); with
    TLS on either leg the pipe closes both sides."""
    data = blob(2_000_000)

    async def send_and_close(reader, writer):
        writer.write(data)
        writer.close()

    async def main():
        async with chain(send_and_close, mode, contexts) as c:
            assert await wait(c.reader.read()) == data
            pipe = await c.pipe()
            if mode == "plain":
                await asyncio.sleep(0.05)
                assert not pipe.closed
                c.writer.close()
            await wait(c.all_closed.wait())
            assert pipe.bytes_b_to_a == len(data)

    run(main())


@MODES
def test_the_app_resetting_closes_the_client(run, mode, contexts):
    """The app resets its connection (RST): the client's connection ends too, and
    `on_close` reports the pipe once."""

    async def reset(reader, writer):
        writer.write(b"partial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def main():
        async with chain(reset, mode, contexts) as c:
            assert await wait(c.reader.readexactly(7)) == b"partial"
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert await wait(c.reader.read()) == b""
            await wait(c.all_closed.wait())
            await asyncio.sleep(0.05)
            assert len(c.closed) == 1

    run(main())


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_idle_timeout_closes_both_sides_and_traffic_defers_it(run, mode, contexts):
    """With a 0.5 s idle timeout, a byte every 0.15 s keeps the pipe open past 1 s; once
    quiet, both sides are closed within 0.5 s to 1.5 s."""

    async def main():
        done = asyncio.Event()

        async def echo_then_note(reader, writer):
            await echo_app(reader, writer)
            done.set()

        async with chain(echo_then_note, mode, contexts, idle_timeout=0.5) as c:
            assert await wait(c.reader.readexactly(len(BANNER))) == BANNER
            for _ in range(8):
                c.writer.write(b".")
                assert await wait(c.reader.readexactly(1)) == b"."
                await asyncio.sleep(0.15)
            pipe = await c.pipe()
            assert not pipe.closed
            quiet = time.monotonic()
            assert await wait(c.reader.read()) == b""
            waited = time.monotonic() - quiet
            assert 0.5 <= waited < 1.5
            await wait(done.wait())
            await wait(c.all_closed.wait())

    run(main())


def test_a_failing_or_slow_on_close_breaks_nothing(run, contexts, caplog):
    """`on_close` that takes 0.1 s and raises is called once per pipe, logged, and the
    next connection through the same front still works."""
    calls: list[Pipe] = []

    def bad(pipe: Pipe) -> None:
        calls.append(pipe)
        time.sleep(0.1)
        raise RuntimeError("consumer bug")

    async def main():
        async with chain(echo_app, "plain", contexts, on_close=bad) as c:
            for i in range(2):
                if i:
                    await c.connect(None)
                assert await wait(c.reader.readexactly(len(BANNER))) == BANNER
                c.writer.write(b"ping")
                assert await wait(c.reader.readexactly(4)) == b"ping"
                c.writer.close()
                await wait(c.all_closed.wait())
                c.all_closed.clear()
            assert calls == c.pipes == c.closed

    with caplog.at_level(logging.ERROR, logger="sidecar.engines.tcp.pipe"):
        run(main())
    failures = [r for r in caplog.records if "on_close" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info[0] is RuntimeError


@pytest.mark.parametrize("mode", ["plain", "tls"])
def test_a_closed_pipe_holds_no_transport_and_is_freed(run, mode, contexts):
    """After close nothing (transports, the deadline sweep, the loop) keeps the pipe."""

    async def main():
        async with chain(echo_app, mode, contexts) as c:
            pipe = await c.pipe()
            c.writer.close()
            await wait(c.all_closed.wait())
            assert pipe.a.transport is None and pipe.b.transport is None
            assert pipe not in DEADLINES.members
            ref = weakref.ref(pipe)
            del pipe
            c.pipes.clear()
            c.closed.clear()
            await asyncio.sleep(0.05)  # let the transports finish
            gc.collect()
            assert ref() is None

    run(main())


# -- in memory: the decisions ------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """A transport in memory: records writes, EOF, how it was closed and read pauses."""

    def __init__(self, *, tls: bool = False, buffered: int = 0, reading: bool = True):
        super().__init__()
        self.protocol: asyncio.Protocol | None = None
        self.tls = tls
        self.buffered = buffered  # what get_write_buffer_size says
        self.reading = reading
        self.written = bytearray()
        self.eof_written = False
        self.how: str | None = None  # "close", "abort", "lost"

    def set_protocol(self, protocol):
        self.protocol = protocol

    def get_protocol(self):
        return self.protocol

    def write(self, data):
        assert not self.eof_written
        self.written += data

    def can_write_eof(self):
        return not self.tls

    def write_eof(self):
        assert not self.tls
        self.eof_written = True

    def is_closing(self):
        return self.how is not None

    def close(self):
        self._end("close")

    def abort(self):
        self._end("abort")

    def lose(self, exc: Exception | None) -> None:
        """The peer went away."""
        self.how = "lost"
        self.protocol.connection_lost(exc)

    def _end(self, how: str) -> None:
        if self.how is None:
            self.how = how
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_reading(self):
        return self.reading

    def get_write_buffer_size(self):
        return self.buffered

    def get_write_buffer_limits(self):
        return (16384, 65536)


def fake_splice(a_tls=False, b_tls=False, **kw) -> tuple[Pipe, FakeTransport, FakeTransport]:
    a, b = FakeTransport(tls=a_tls, reading=False), FakeTransport(tls=b_tls, reading=False)
    calls: list[Pipe] = []
    pipe = splice(a, b, idle_timeout=kw.pop("idle_timeout", 10.0), on_close=calls.append, **kw)
    pipe.calls = calls  # type: ignore[attr-defined]
    return pipe, a, b


async def test_splice_sends_pending_first_and_resumes_reading_both():
    pipe, a, b = fake_splice(a_pending=b"A0", b_pending=b"B0")
    assert a.protocol is pipe.a and b.protocol is pipe.b
    assert a.reading and b.reading
    pipe.a.data_received(b"A1")
    pipe.b.data_received(b"B1")
    assert (bytes(b.written), bytes(a.written)) == (b"A0A1", b"B0B1")
    assert (pipe.bytes_a_to_b, pipe.bytes_b_to_a) == (4, 4)
    pipe.abort()


@pytest.mark.parametrize("exc, how", [(None, "close"), (ConnectionResetError(), "abort")])
async def test_a_lost_side_closes_the_other_gracefully_or_aborts_it(exc, how):
    pipe, a, b = fake_splice()
    b.lose(exc)
    assert a.how == how and not pipe.closed
    await asyncio.sleep(0)
    assert pipe.closed and pipe.calls == [pipe]
    assert pipe not in DEADLINES.members
    a.protocol.connection_lost(None)  # a late duplicate changes nothing
    assert pipe.calls == [pipe]


async def test_eof_between_plain_transports_is_passed_on_and_the_other_way_stays_open():
    pipe, a, b = fake_splice()
    assert pipe.a.eof_received() is True
    assert b.eof_written and b.how is None and a.how is None
    pipe.b.data_received(b"answer")
    assert a.written == b"answer"
    assert pipe.b.eof_received() is False  # both ways done: b closes itself, a is closed
    assert a.how == "close"


@pytest.mark.parametrize("a_tls, b_tls", [(True, False), (False, True), (True, True)])
async def test_eof_with_tls_on_either_side_closes_the_other_after_its_flush(a_tls, b_tls):
    pipe, a, b = fake_splice(a_tls, b_tls)
    assert pipe.a.eof_received() is False  # TLS ignores True (and logs a warning)
    assert b.how == "close" and not b.eof_written


async def test_a_full_side_stops_the_reading_of_the_other_until_it_drains():
    pipe, a, b = fake_splice()
    pipe.a.pause_writing()
    assert not b.reading and a.reading
    pipe.a.resume_writing()
    assert b.reading
    pipe.b.pause_writing()
    pipe.a.eof_received()  # a has ended: it is never read again
    pipe.b.resume_writing()
    assert not a.reading


async def test_a_side_left_full_by_its_previous_owner_keeps_the_other_unread():
    a, b = FakeTransport(reading=False), FakeTransport(buffered=100_000, reading=False)
    pipe = splice(a, b, idle_timeout=10.0)
    assert pipe.b.write_paused and not a.reading and b.reading
    b.protocol.resume_writing()
    assert a.reading
    pipe.abort()


async def test_a_side_already_closing_at_splice_closes_the_other_after_the_pending_bytes():
    a, b = FakeTransport(), FakeTransport()
    a.how = "close"
    calls: list[Pipe] = []
    pipe = splice(a, b, idle_timeout=10.0, a_pending=b"last words", on_close=calls.append)
    assert b.written == b"last words"
    await asyncio.sleep(0)
    assert b.how == "close"
    await asyncio.sleep(0)
    assert calls == [pipe]


async def test_idle_pipe_is_closed_and_a_stuck_buffer_dropped():
    pipe, a, b = fake_splice(idle_timeout=0.3)
    a.buffered = 100  # never drains: the client stopped reading
    start = time.monotonic()
    while not pipe.closed and time.monotonic() - start < STEP:
        await asyncio.sleep(0.05)
    assert pipe.closed and 0.3 <= time.monotonic() - start < 1.2
    assert (a.how, b.how) == ("abort", "close")


async def test_a_draining_buffer_is_not_idle():
    pipe, a, b = fake_splice(idle_timeout=0.3)
    a.buffered = 1_000_000
    start = time.monotonic()
    while a.buffered:  # a slow client still reading: 1 s of draining
        await asyncio.sleep(0.1)
        a.buffered -= 100_000
        assert a.how is None
    while not pipe.closed and time.monotonic() - start < STEP:
        await asyncio.sleep(0.05)
    assert (a.how, b.how) == ("close", "close")
    assert 1.3 <= time.monotonic() - start < 2.3
