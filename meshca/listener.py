"""Listening sockets of the CA and the sidecar: a connection limit, a TLS protocol_version alert.

The event loop's own TLS servers (asyncio's and uvloop's `create_server(ssl=...)`)
close a connection whose handshake failed without sending what OpenSSL wrote
for the peer (https://github.com/python/cpython/issues/98078; uvloop's sslproto
is the same code), so a TLS 1.0
or 1.1 client sees a bare EOF instead of the `protocol_version` alert RFC 8996
requires. A `Listener` accepts connections itself and, on a TLS listener, looks
at the first eleven bytes without consuming them (MSG_PEEK): a ClientHello whose
`client_version` is below TLS 1.2 is answered with a plaintext fatal
`protocol_version` alert record and closed; every other connection is handed
untouched to the loop's TLS transport (`connect_accepted_socket`).

It also bounds the connections of one listener: at `max_connections` it stops
accepting, so new connections wait in the kernel's accept queue (`backlog`)
until an open one closes; open connections are never touched. The application
calls `release()` once for every connection whose handshake completed, when it
closes; the listener itself releases the ones that never got that far.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("meshca.listener")

PEEK_BYTES = 11  # record header (5) + handshake header (4) + client_version (2)
LIMIT_LOG_EVERY = 10.0  # seconds between two "at the limit" warnings
LINGER = 2.0  # seconds to wait for a refused legacy client to close after the alert
_FD_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def legacy_client_version(head: bytes) -> bytes | None:
    """The `client_version` of a TLS ClientHello offering less than TLS 1.2, else None.

    `head` is the start of what a client sent: a handshake record (0x16) whose
    message is a ClientHello (0x01), `client_version` at bytes 9-10. TLS 1.3
    clients send 0x0303 there (RFC 8446 4.1.2), so only a client whose best
    version is TLS 1.1 or older (or SSL 3.0) is matched.
    """
    if len(head) < PEEK_BYTES or head[0] != 0x16 or head[5] != 0x01:
        return None
    if head[1] != 3 or head[9] != 3 or head[10] >= 3:
        return None
    return head[9:11]


def protocol_version_alert(version: bytes) -> bytes:
    """A plaintext fatal `protocol_version` (70) alert record in the client's version."""
    if version < b"\x03\x01":
        version = b"\x03\x01"
    return b"\x15" + version + b"\x00\x02\x02\x46"


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening, non-blocking TCP socket on the first address `host` resolves to."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def handshake_failure_reason(exc: BaseException) -> str:
    """A short, bounded name for why a TLS handshake failed (for metrics)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or "").lower()
        if "expired" in message:
            return "expired"
        if "not yet valid" in message:
            return "not_yet_valid"
        if "issuer" in message or "self-signed" in message or "self signed" in message:
            return "unknown_ca"
        return "bad_certificate"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_certificate"
        if "VERSION" in reason or "PROTOCOL" in reason:
            return "protocol_version"
        return "tls_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "reset"


class Listener:
    """A listening socket: accept up to `max_connections`, refuse legacy TLS, hand over the rest."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol] | None,
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext] | None = None,
        max_connections: int = 4096,
        handshake_timeout: float = 10.0,
        name: str = "listener",
        on_handshake_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.sock = sock
        self.on_handshake_failure = on_handshake_failure  # called with a reason name
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.name = name
        self.open = 0  # accepted and not yet released
        self.legacy_refused = 0
        self.limit_reached = 0  # times accepting paused at the limit
        self.loop = asyncio.get_running_loop()
        if ssl_context is not None and hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Linux: accept only once the client has sent something (its ClientHello), so
            # the peek nearly never has to wait for readability (most connections did, at
            # accept time), and a connection that never sends holds no descriptor here.
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, max(1, int(handshake_timeout))
                )
        self._accepting = False
        self._closed = False
        self._warned_at = -LIMIT_LOG_EVERY
        self._waiting: dict[socket.socket, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port."""
        return self.sock.getsockname()[1]

    @property
    def host(self) -> str:
        """The bound address."""
        return self.sock.getsockname()[0]

    def start(self) -> None:
        """Start accepting."""
        self._resume()

    def close(self) -> None:
        """Stop accepting and close the listening socket; open connections stay."""
        if self._closed:
            return
        self._closed = True
        self._pause()
        for conn in list(self._waiting):
            self._drop(conn)
        self.sock.close()

    def release(self) -> None:
        """One connection (accepted by this listener, handshake done) has closed."""
        self.open -= 1
        if not self._accepting and not self._closed and self.open < self.max_connections:
            self._resume()

    # -- accepting -------------------------------------------------------

    def _resume(self) -> None:
        if not self._accepting and not self._closed:
            self._accepting = True
            self.loop.add_reader(self.sock.fileno(), self._on_accept)

    def _pause(self) -> None:
        if self._accepting:
            self._accepting = False
            self.loop.remove_reader(self.sock.fileno())

    def _on_accept(self) -> None:
        while self.open < self.max_connections:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in _FD_ERRORS:
                    # Out of descriptors or memory: stop for a moment rather than spin.
                    log.warning("%s: cannot accept (%s); pausing 0.1 s", self.name, e.strerror)
                    self._pause()
                    self.loop.call_later(0.1, self._resume)
                    return
                log.warning("%s: accept failed: %s", self.name, e)
                return
            self.open += 1
            # No setblocking(): the loop's transport makes the socket non-blocking, and
            # until then every call here passes MSG_DONTWAIT (one system call fewer).
            if self.ssl_context is None:
                self._hand_over(conn)
            else:
                self._peek(conn)
        self.limit_reached += 1
        now = self.loop.time()
        if now - self._warned_at >= LIMIT_LOG_EVERY:  # once per episode, not per freed slot
            self._warned_at = now
            log.warning(
                "%s: %d connections open (the limit): new connections wait in the backlog",
                self.name,
                self.open,
            )
        self._pause()

    def _drop(self, conn: socket.socket) -> None:
        timer = self._waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(OSError, ValueError):
                self.loop.remove_reader(conn.fileno())
        conn.close()
        self.release()

    # -- the first bytes of a TLS connection -------------------------------

    def _peek(self, conn: socket.socket) -> None:
        try:
            head = conn.recv(PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            # Nothing sent yet: wait (no longer than a handshake may take).
            self._waiting[conn] = self.loop.call_later(self.handshake_timeout, self._drop, conn)
            self.loop.add_reader(conn.fileno(), self._readable, conn)
            return
        except OSError:
            self._drop(conn)
            return
        if not head:
            self._drop(conn)
            return
        version = legacy_client_version(head)
        if version is not None:
            self._refuse_legacy(conn, version)
            return
        # A TLS 1.2+ ClientHello, anything else (TLS says why), or fewer than eleven
        # bytes so far (TLS reads the rest; a legacy hello split that early just gets
        # the transport's silent close).
        self._hand_over(conn)

    def _readable(self, conn: socket.socket) -> None:
        timer = self._waiting.pop(conn)
        timer.cancel()
        self.loop.remove_reader(conn.fileno())
        self._peek(conn)

    def _refuse_legacy(self, conn: socket.socket, version: bytes) -> None:
        self.legacy_refused += 1
        if self.on_handshake_failure is not None:
            self.on_handshake_failure("protocol_version")
        log.info(
            "%s: refused a TLS %s ClientHello (protocol_version alert; TLS 1.2 or newer only)",
            self.name,
            {b"\x03\x00": "SSL 3.0", b"\x03\x01": "1.0", b"\x03\x02": "1.1"}.get(version, "?"),
        )
        try:
            conn.send(protocol_version_alert(version), socket.MSG_DONTWAIT)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        # Read and drop what the client still sends until it closes: closing with its
        # unread ClientHello in our buffer would send a reset that can discard the alert.
        self._waiting[conn] = self.loop.call_later(LINGER, self._drop, conn)
        self.loop.add_reader(conn.fileno(), self._linger, conn)

    def _linger(self, conn: socket.socket) -> None:
        try:
            while conn.recv(4096, socket.MSG_DONTWAIT):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._drop(conn)

    # -- handing over to the loop's transport ------------------------------

    def _hand_over(self, conn: socket.socket) -> None:
        task = self.loop.create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        assert self.protocol_factory is not None
        try:
            if self.ssl_context is None:
                await self.loop.connect_accepted_socket(self.protocol_factory, conn)
            else:
                ctx = self.ssl_context
                await self.loop.connect_accepted_socket(
                    self.protocol_factory,
                    conn,
                    # a function: the context of the moment, asked per connection
                    ssl=ctx if isinstance(ctx, ssl.SSLContext) else ctx(),
                    ssl_handshake_timeout=self.handshake_timeout,
                )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as e:
            # A failed handshake (no or a bad client certificate, a timeout, a reset):
            # the transport has closed the socket; the protocol never saw it.
            log.debug("%s: handshake failed: %s", self.name, e)
            self.release()
            if self.on_handshake_failure is not None:
                self.on_handshake_failure(handshake_failure_reason(e))
        except Exception:
            log.exception("%s: handing over a connection failed", self.name)
            with contextlib.suppress(OSError):
                conn.close()
            self.release()
