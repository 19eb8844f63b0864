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
import time
from collections.abc import Callable

import pytest
from dnsserver import NAME, DnsServer

from meshca.spiffe import SpiffeId
from sidecar.config import Service
from sidecar.trafficconfig import DnsDiscovery, TrafficConfig
from sidecar.upstream.discovery import Discovery
from sidecar.upstream.pool import UpstreamPool

pytestmark = pytest.mark.e2e


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
