"""A real DNS server for tests: dnsmasq on a free loopback port, answering names in `.test`
from a hosts file with a TTL of 1 s (Debian's dnsmasq-base, installed by `make deps`)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Lines, free_port, gave_up, tail

NAME = "backend.test"


def dnsmasq_path() -> str | None:
    """dnsmasq on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("dnsmasq")
    if found is None and os.access("/usr/sbin/dnsmasq", os.X_OK):
        found = "/usr/sbin/dnsmasq"
    return found


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
    server = DnsServer(binary, hosts, free_port(udp=True))
    try:
        for attempt in range(3):  # the port may be taken between our look and its bind
            try:
                server.start()
                break
            except AssertionError as e:
                if attempt == 2 or "Address already in use" not in str(e):
                    raise
                server.port = free_port(udp=True)
        monkeypatch.setenv("SIDECAR_DNS_SERVER", f"127.0.0.1:{server.port}")
        yield server
    finally:
        server.kill()
