"""DNS discovery against a real DNS server: dnsmasq on a free loopback port answers for
`backend.test` with a TTL of 1 s. A service with `dns: {name: backend.test, port: 8443,
refresh: 30}` gets the name's address in its pool; when the record changes (to an A and an
AAAA record) the pool follows within the TTL, not the 30 s refresh; when the DNS server is
killed the pool keeps its endpoints, the error is recorded and logged once; when a server
answers again the pool follows it.

Needs dnsmasq (Debian's dnsmasq-base, installed by `make deps`); skipped without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Lines, gave_up, tail

from meshca.spiffe import SpiffeId
from sidecar.config import Service
from sidecar.trafficconfig import DnsDiscovery, TrafficConfig
from sidecar.upstream.discovery import Discovery
from sidecar.upstream.pool import UpstreamPool

pytestmark = pytest.mark.e2e

NAME = "backend.test"


def dnsmasq_path() -> str | None:
    """dnsmasq on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("dnsmasq")
    if found is None and os.access("/usr/sbin/dnsmasq", os.X_OK):
        found = "/usr/sbin/dnsmasq"
    return found


def free_port() -> int:
    """A loopback port free for both UDP and TCP (dnsmasq listens on both)."""
    for _ in range(50):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no loopback port free for both UDP and TCP")


class DnsServer:
    """dnsmasq answering only from `hosts` (an /etc/hosts-style file) for names in `.test`,
    with a TTL of 1 s; SIGHUP makes it read `hosts` again."""

    def __init__(self, binary: str, hosts: Path, port: int) -> None:
        self.binary = binary
        self.hosts = hosts
        self.port = port
        self.proc: subprocess.Popen | None = None
        self.log: Lines | None = None
        self.reads = 0  # times it has read the hosts file

    def args(self) -> list[str]:
        return [
            self.binary,
            "--no-daemon",  # foreground, no pid file, no change of user
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={self.hosts}",
            # answer for .test from the hosts file alone: NODATA for a missing AAAA and
            # NXDOMAIN for an unknown name (without it, dnsmasq refuses what it would forward)
            "--local=/test/",
            "--local-ttl=1",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--log-facility=-",
            "--log-queries",
        ]

    def start(self, timeout: float = 10) -> None:
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        assert self.proc.stderr is not None
        self.log = Lines(self.proc.stderr)
        self.reads = 0
        self.wait_read(timeout)

    def wait_read(self, timeout: float = 10) -> None:
        """Until dnsmasq says it has read the hosts file once more."""
        assert self.proc is not None and self.log is not None
        want = self.reads + 1
        seen = 0

        def is_read(line: str) -> bool:
            nonlocal seen
            if f"read {self.hosts}" in line:
                seen += 1
            return seen >= want

        if not self.log.follow(is_read, timeout):
            raise AssertionError(gave_up("dnsmasq", self.proc, timeout, {"log": self.log}))
        self.reads = want

    def reload(self, text: str) -> None:
        """New records: rewrite the hosts file, SIGHUP, wait until it is read."""
        assert self.proc is not None
        self.hosts.write_text(text)
        self.proc.send_signal(signal.SIGHUP)
        self.wait_read()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_tail(self) -> str:
        return tail(self.log.lines if self.log is not None else None)


@pytest.fixture
def dns_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DnsServer]:
    binary = dnsmasq_path()
    if binary is None:
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base; `make deps`)")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 {NAME}\n")
    server = DnsServer(binary, hosts, free_port())
    try:
        for attempt in range(3):  # the port may be taken between our look and its bind
            try:
                server.start()
                break
            except AssertionError as e:
                if attempt == 2 or "Address already in use" not in str(e):
                    raise
                server.port = free_port()
        monkeypatch.setenv("SIDECAR_DNS_SERVER", f"127.0.0.1:{server.port}")
        yield server
    finally:
        server.kill()


async def until(what: str, check: Callable[[], bool], timeout: float, server: DnsServer) -> float:
    """Poll `check` until it holds (the seconds it took) or fail saying what did not happen."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s\n{server.log_tail()}")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def never_connect(pool, host, port):
    raise AssertionError("this test dials nothing")


async def test_dns_discovery_follows_a_real_dns_server(dns_server, caplog):
    caplog.set_level(logging.INFO, "sidecar.discovery")
    pool = UpstreamPool("backend", [], never_connect)
    identity = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/backend")
    svc = Service("backend", identity, TrafficConfig(dns=DnsDiscovery(NAME, 8443, 30.0)))
    disc = Discovery({"backend": svc}, {"backend": pool})

    def endpoints() -> list[str]:
        return [str(ep) for ep in pool.endpoints]

    def status() -> dict:
        return disc.describe()["backend"]

    try:
        await disc.start()
        # the first answer is in the pool when start() returns
        assert endpoints() == ["127.0.0.1:8443"], dns_server.log_tail()
        assert status()["source"] == "dns" and status()["last_error"] is None
        first = pool.endpoints[0]

        # the record changes: the pool follows within the TTL (1 s), not the 30 s refresh
        dns_server.reload(f"127.0.0.2 {NAME}\n::1 {NAME}\n")
        await until(
            "the pool took the new records",
            lambda: endpoints() == ["127.0.0.2:8443", "[::1]:8443"],
            5,  # well under the refresh: only the TTL can have brought it
            dns_server,
        )
        assert first.removed  # no longer listed: takes no new requests

        # the DNS server dies: the pool keeps its endpoints, the error is logged once
        dns_server.kill()
        await until(
            "a second failed resolution",
            lambda: disc.sources["backend"].failures >= 2,
            15,
            dns_server,
        )
        assert endpoints() == ["127.0.0.2:8443", "[::1]:8443"]
        assert status()["last_error"] == f"{NAME}: timeout"
        failures = [
            r.getMessage()
            for r in caplog.records
            if r.name == "sidecar.discovery" and r.levelno >= logging.WARNING
        ]
        assert failures == [f"backend: {NAME}: timeout; keeping the last good set (2 endpoint(s))"]

        # a server answers again on the same address: the pool follows it
        dns_server.hosts.write_text(f"127.0.0.3 {NAME}\n")
        dns_server.start()
        await until(
            "the pool took the records of the restarted server",
            lambda: endpoints() == ["127.0.0.3:8443"],
            10,
            dns_server,
        )
        assert status()["last_error"] is None
    finally:
        await disc.stop()
