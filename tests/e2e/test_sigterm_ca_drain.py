"""SIGTERM to the CA: it stops accepting, lets the request in flight finish (its response
says `Connection: close`), closes an idle kept-alive connection cleanly (TLS close_notify),
and exits 0 (aiohttp's graceful shutdown, bounded by --drain-timeout)."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import time

import pytest
from helpers import start_ca
from tlsclient import read_response


def connect(ca) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca.bundle))
    raw = socket.create_connection(ca.host_port, timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)


def test_in_flight_finishes_idle_closes_cleanly_exit_0(ca_home):
    ca = start_ca(ca_home, "--drain-timeout", "20")
    try:
        idle = connect(ca)
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head, _ = read_response(idle)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        # A request in flight: the head and half the body are sent; the rest comes after
        # the signal. (Reading the head's answer proves the CA took the request: it is
        # answered below, once the body is complete.)
        busy = connect(ca)
        body = json.dumps({"csr": "not a CSR"}).encode()
        busy.sendall(
            b"POST /v1/certificates HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer nope\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body[:5]
        )
        # The healthz answer on a third connection proves the CA is past the head above
        # (one event loop, requests handled in order of arrival).
        probe = connect(ca)
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        read_response(probe)
        ca.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while "stopping: no new connections" not in ca.log:
            assert time.monotonic() < deadline, ca.log
            time.sleep(0.05)
        assert idle.recv(1) == b""  # close_notify, then EOF
        with pytest.raises(OSError):
            connect(ca)
        busy.sendall(body[5:])
        try:
            head, answer = read_response(busy)
        except AssertionError as e:
            ca.stop()
            raise AssertionError(f"{e}\n--- the CA's log:\n{ca.log}") from None
        assert head.startswith(b"HTTP/1.1 401"), head
        assert b"connection: close" in head.lower()
        assert json.loads(answer)["error"]
        assert busy.recv(1) == b""
        assert ca.proc.wait(timeout=30) == 0
        assert "stopped" in ca.log
    finally:
        ca.stop()
