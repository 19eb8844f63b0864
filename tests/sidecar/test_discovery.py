"""Discovery of outbound endpoints without a network: the endpoints-file watcher (rewrites,
bad files keep the last good set, a missing file, labels and weights) and DNS through a
fake resolver (when the next resolution is due, failures keep the last good set and are
logged once per change, A and AAAA both used), as a pool sees them."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshca.spiffe import SpiffeId
from sidecar.config import Service
from sidecar.trafficconfig import DnsDiscovery, EndpointSpec, TrafficConfig, parse_endpoints
from sidecar.upstream import discovery
from sidecar.upstream.discovery import (
    Discovery,
    DnsAnswer,
    DnsError,
    DnspythonResolver,
    dns_delay,
    parse_endpoints_file,
    parse_server,
)
from sidecar.upstream.pool import UpstreamPool

ROOT = Path(__file__).resolve().parents[2]
IDENTITY = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/backend")


async def never_connect(pool, host, port):  # discovery never dials
    raise AssertionError("no connection expected")


def service(name: str, **traffic) -> Service:
    return Service(name, IDENTITY, TrafficConfig(**traffic))


def pool(name: str = "backend", endpoints=()) -> UpstreamPool:
    return UpstreamPool(name, endpoints, never_connect)


def addresses(p: UpstreamPool) -> list[str]:
    return [str(ep) for ep in p.endpoints]


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeResolver:
    """Answers from a script: a DnsAnswer or a DnsError each call (the last one repeats)."""

    def __init__(self, *script: DnsAnswer | DnsError) -> None:
        self.script = list(script)
        self.asked: list[str] = []

    async def resolve(self, name: str) -> DnsAnswer:
        self.asked.append(name)
        step = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(step, DnsError):
            raise step
        return step


class Steps:
    """A sleep the test releases one step at a time; records every delay asked for."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.go: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        await self.go.get()

    async def step(self) -> None:
        n = len(self.delays)
        self.go.put_nowait(None)
        for _ in range(1000):
            if len(self.delays) > n:
                return
            await asyncio.sleep(0)
        raise AssertionError("the loop did not come back to sleep")


def warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sidecar.discovery" and r.levelno >= logging.WARNING
    ]


# -- when the next resolution is due (pure) -----------------------------------------------


@pytest.mark.parametrize(
    ("refresh", "ttl", "failures", "delay"),
    [
        (5.0, None, 0, 5.0),  # no TTL known: every refresh
        (5.0, 30.0, 0, 5.0),  # a longer TTL does not stretch refresh
        (5.0, 2.0, 0, 2.0),  # a shorter TTL brings it forward
        (5.0, 0.0, 0, 0.5),  # TTL 0: still not more often than every 0.5 s
        (5.0, 0.2, 0, 0.5),
        (0.1, None, 0, 0.5),  # refresh below the floor
        (5.0, 1.0, 1, 0.5),  # after failures: 0.5 s doubling ...
        (5.0, None, 2, 1.0),
        (5.0, None, 3, 2.0),
        (5.0, None, 4, 4.0),
        (5.0, None, 5, 5.0),  # ... up to refresh
        (5.0, None, 500, 5.0),
        (0.1, None, 3, 0.5),
    ],
)
def test_dns_delay(refresh, ttl, failures, delay):
    assert dns_delay(refresh, ttl, failures) == delay


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 10.1.2.3:53 ", ("10.1.2.3", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_dns_server_override_parses(text, expected):
    assert parse_server(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1",
        "localhost:53",
        "127.0.0.1:0",
        "127.0.0.1:99999",
        "::1:53",
        ":53",
        "[127.0.0.1]:53",
    ],
)
def test_dns_server_override_refuses_what_is_not_ip_port(text):
    with pytest.raises(ValueError, match="SIDECAR_DNS_SERVER"):
        parse_server(text)


# -- DNS through a fake resolver ----------------------------------------------------------


def dns_discovery(resolver, refresh=5.0, port=8443, **kw):
    p = pool()
    svc = service("backend", dns=DnsDiscovery("backend.example", port, refresh))
    return Discovery({"backend": svc}, {"backend": p}, resolver=resolver, **kw), p


async def test_dns_a_and_aaaa_records_all_become_endpoints_at_the_port():
    resolver = FakeResolver(DnsAnswer(("10.0.0.2", "fd00::1", "10.0.0.1", "10.0.0.2"), 30.0))
    disc, p = dns_discovery(resolver)
    assert await disc.poll_once("backend") == 5.0
    assert resolver.asked == ["backend.example"]
    assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443", "[fd00::1]:8443"]
    assert disc.describe()["backend"]["last_error"] is None


async def test_dns_ttl_shorter_than_refresh_brings_the_next_resolution_forward():
    resolver = FakeResolver(
        DnsAnswer(("10.0.0.1",), 1.0),
        DnsAnswer(("10.0.0.1",), 60.0),
        DnsAnswer(("10.0.0.1",), 0.0),
        DnsAnswer(("10.0.0.1",), None),
    )
    disc, _ = dns_discovery(resolver, refresh=5.0)
    delays = [await disc.poll_once("backend") for _ in range(4)]
    assert delays == [1.0, 5.0, 0.5, 5.0]


async def test_dns_loop_sleeps_as_scheduled_and_stops():
    steps = Steps()
    resolver = FakeResolver(
        DnsAnswer(("10.0.0.1",), 2.0),
        DnsError("timeout"),
        DnsError("timeout"),
        DnsAnswer(("10.0.0.1",), 30.0),
    )
    disc, p = dns_discovery(resolver, refresh=10.0, sleep=steps.sleep)
    await disc.start()  # the first resolution is done when start returns
    assert addresses(p) == ["10.0.0.1:8443"]
    for _ in range(3):
        await steps.step()
    assert steps.delays == [2.0, 0.5, 1.0, 10.0]  # TTL, backoff, backoff, refresh
    await disc.stop()
    assert disc._tasks == []


async def test_dns_failures_keep_the_last_good_set_and_are_logged_once_per_change(caplog):
    caplog.set_level(logging.INFO, "sidecar.discovery")
    clock = Clock()
    resolver = FakeResolver(
        DnsAnswer(("10.0.0.1", "10.0.0.2"), 30.0),
        DnsError("timeout"),
        DnsError("timeout"),
        DnsError("timeout"),
        DnsError("no nameserver answered (SERVFAIL, REFUSED or unreachable)"),
        DnsError("NXDOMAIN (no such name)"),
        DnsError("no A or AAAA records"),
        DnsAnswer((), 30.0),  # an empty answer is a failure too, never an empty set
        DnsAnswer(("10.0.0.3",), 30.0),
    )
    disc, p = dns_discovery(resolver, clock=clock)
    await disc.poll_once("backend")
    first = p.endpoints[0]
    first.requests = 7  # state an endpoint that stays must keep
    good_at = clock.now
    for _ in range(7):
        clock.now += 1
        await disc.poll_once("backend")
        assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443"]
        assert disc.describe()["backend"]["last_update"] == good_at
    assert p.endpoints[0] is first and first.requests == 7
    assert disc.describe()["backend"]["last_error"] == "backend.example: no A or AAAA records"
    logged = warnings(caplog)
    assert [m.split(";")[0] for m in logged] == [
        "backend: backend.example: timeout",  # three timeouts in a row: one line
        "backend: backend.example: no nameserver answered (SERVFAIL, REFUSED or unreachable)",
        "backend: backend.example: NXDOMAIN (no such name)",
        "backend: backend.example: no A or AAAA records",
    ]
    assert all("keeping the last good set (2 endpoint(s))" in m for m in logged)
    clock.now += 1
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.3:8443"]
    assert disc.describe()["backend"] == {
        "source": "dns",
        "last_update": clock.now,
        "last_error": None,
    }
    assert first.removed  # dropped by the new answer: drains


async def test_dns_failure_before_any_answer_leaves_the_pool_empty_and_retries_soon():
    disc, p = dns_discovery(FakeResolver(DnsError("timeout")), refresh=30.0)
    assert await disc.poll_once("backend") == 0.5
    assert await disc.poll_once("backend") == 1.0
    assert p.endpoints == []
    assert disc.describe()["backend"] == {
        "source": "dns",
        "last_update": None,
        "last_error": "backend.example: timeout",
    }


async def test_dns_unchanged_answer_does_not_touch_the_pool():
    disc, p = dns_discovery(FakeResolver(DnsAnswer(("10.0.0.2", "10.0.0.1"), 30.0)))
    await disc.poll_once("backend")
    endpoints = p.endpoints
    chosen = p.candidates(None)  # memoized until the endpoint set is replaced
    await disc.poll_once("backend")
    # set_endpoints was not called: it would have put a new list and dropped the memo
    # (a method of the compiled pool cannot be patched over to count calls).
    assert p.endpoints is endpoints and p.candidates(None) is chosen


async def test_start_waits_at_most_start_wait_for_a_slow_resolver(caplog):
    class Hanging:
        async def resolve(self, name):
            await asyncio.Event().wait()

    disc, p = dns_discovery(Hanging(), start_wait=0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await disc.start()
    assert loop.time() - t0 < 1.0
    assert p.endpoints == []
    assert any("no endpoints yet for backend" in m for m in warnings(caplog))
    await disc.stop()


# -- DNS: the dnspython adapter (its answers faked, no socket) ----------------------------


class RRSet(list):
    """Stands in for a dnspython RRset: its rdatas (with `.address`) and its TTL."""

    def __init__(self, addrs, ttl):
        super().__init__(SimpleNamespace(address=a) for a in addrs)
        self.ttl = ttl


def adapter(answers) -> DnspythonResolver:
    """The real adapter over a stand-in for dns.asyncresolver.Resolver: per record type
    (addresses, ttl), None (NOERROR, no record of the type) or an exception."""
    r = DnspythonResolver(("127.0.0.1", 53))

    class Fake:
        async def resolve(self, name, rdtype, **kw):
            got = answers[rdtype]
            if isinstance(got, BaseException):
                raise got
            return SimpleNamespace(rrset=None if got is None else RRSet(*got))

    r._resolver = Fake()
    return r


async def test_adapter_joins_a_and_aaaa_with_the_shortest_ttl():
    r = adapter({"A": (["10.0.0.1", "10.0.0.2"], 30), "AAAA": (["fd00::1"], 5)})
    assert await r.resolve("x") == DnsAnswer(("10.0.0.1", "10.0.0.2", "fd00::1"), 5.0)
    r = adapter({"A": (["10.0.0.1"], 30), "AAAA": None})  # NOERROR, no AAAA
    assert await r.resolve("x") == DnsAnswer(("10.0.0.1",), 30.0)


async def test_adapter_maps_dnspython_failures():
    import dns.resolver

    nx = dns.resolver.NXDOMAIN()
    timeout = dns.resolver.LifetimeTimeout(timeout=3.0, errors=[])
    servfail = dns.resolver.NoNameservers()
    for answers, reason in [
        ({"A": nx, "AAAA": nx}, "NXDOMAIN (no such name)"),
        ({"A": timeout, "AAAA": timeout}, "timeout"),
        (
            {"A": servfail, "AAAA": servfail},
            "no nameserver answered (SERVFAIL, REFUSED or unreachable)",
        ),
        ({"A": None, "AAAA": None}, "no A or AAAA records"),
        ({"A": timeout, "AAAA": servfail}, "A: timeout; AAAA: no nameserver answered"),
    ]:
        with pytest.raises(DnsError) as e:
            await adapter(answers).resolve("x")
        assert str(e.value).startswith(reason)


async def test_adapter_one_failed_type_keeps_its_last_addresses():
    import dns.resolver

    answers = {"A": (["10.0.0.1"], 30), "AAAA": (["fd00::1"], 30)}
    r = adapter(answers)
    await r.resolve("x")
    answers["AAAA"] = dns.resolver.NoNameservers()  # a server that refuses AAAA
    answers["A"] = (["10.0.0.9"], 30)
    got = await r.resolve("x")
    assert got.addresses == ("10.0.0.9", "fd00::1")
    assert got.problem == (
        "AAAA query failed (no nameserver answered (SERVFAIL, REFUSED or unreachable))"
    )
    # a fresh resolver has no AAAA to keep: the A records alone, still reported
    fresh = adapter(answers)
    assert (await fresh.resolve("x")).addresses == ("10.0.0.9",)


async def test_partial_answer_is_used_and_reported_once(caplog):
    caplog.set_level(logging.INFO, "sidecar.discovery")
    partial = DnsAnswer(("10.0.0.1",), 30.0, "AAAA query failed (timeout)")
    disc, p = dns_discovery(FakeResolver(partial), refresh=10.0)
    assert await disc.poll_once("backend") == 0.5
    assert await disc.poll_once("backend") == 1.0
    assert addresses(p) == ["10.0.0.1:8443"]
    assert disc.describe()["backend"]["last_error"] == (
        "backend.example: AAAA query failed (timeout)"
    )
    assert warnings(caplog) == [
        "backend: backend.example: AAAA query failed (timeout); using the records that did answer"
    ]


def test_dnspython_is_imported_only_when_a_service_uses_dns(tmp_path):
    efile = tmp_path / "eps.yaml"
    efile.write_text("- 10.0.0.1:80\n")
    code = f"""
import asyncio, sys
from meshca.spiffe import SpiffeId
from sidecar.config import Service
from sidecar.trafficconfig import DnsDiscovery, TrafficConfig
from sidecar.upstream.discovery import Discovery
from sidecar.upstream.pool import UpstreamPool

async def main():
    ident = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/backend")
    services = {{"f": Service("f", ident, TrafficConfig(endpoints_file={str(efile)!r}))}}
    pools = {{"f": UpstreamPool("f", [], None)}}
    d = Discovery(services, pools)
    await d.start()
    await d.stop()
    assert [str(e) for e in pools["f"].endpoints] == ["10.0.0.1:80"]
    assert "dns" not in sys.modules, "imported without a dns service"
    services["d"] = Service("d", ident, TrafficConfig(dns=DnsDiscovery("x.invalid", 80)))
    pools["d"] = UpstreamPool("d", [], None)
    d = Discovery(services, pools, start_wait=0.01)
    await d.start()
    await d.stop()
    assert "dns.asyncresolver" in sys.modules
    print("ok")

asyncio.run(main())
"""
    env = {**os.environ, "SIDECAR_DNS_SERVER": "127.0.0.1:9"}  # never asked: start_wait
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- the endpoints file -------------------------------------------------------------------


def file_discovery(path: Path, **kw):
    p = pool()
    svc = service("backend", endpoints_file=str(path))
    return Discovery({"backend": svc}, {"backend": p}, **kw), p


def write(path: Path, text: str) -> None:
    """As a controller should: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


V1 = """\
- 10.0.0.1:8443
- address: 10.0.0.2:8443
  labels: {version: v2, zone: a}
  weight: 3
"""


async def test_file_endpoints_with_labels_and_weights_then_a_rewrite(tmp_path):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    clock = Clock()
    disc, p = file_discovery(efile, clock=clock)
    assert await disc.poll_once("backend") == 1.0
    assert [(str(ep), dict(ep.labels), ep.weight) for ep in p.endpoints] == [
        ("10.0.0.1:8443", {}, 1),
        ("10.0.0.2:8443", {"version": "v2", "zone": "a"}, 3),
    ]
    kept = p.endpoints[1]
    assert disc.describe()["backend"] == {
        "source": "file",
        "last_update": clock.now,
        "last_error": None,
    }
    clock.now += 5
    write(efile, "- address: 10.0.0.2:8443\n  weight: 1\n- '[fd00::3]:8443'\n")
    await disc.poll_once("backend")
    assert [(str(ep), ep.weight) for ep in p.endpoints] == [
        ("10.0.0.2:8443", 1),
        ("[fd00::3]:8443", 1),
    ]
    assert p.endpoints[0] is kept and kept.labels == {}  # same endpoint, new labels/weight
    assert disc.describe()["backend"]["last_update"] == clock.now


async def test_file_rewritten_in_place_is_seen(tmp_path):
    efile = tmp_path / "eps.yaml"
    efile.write_text("- 10.0.0.1:80\n")
    disc, p = file_discovery(efile)
    await disc.poll_once("backend")
    with open(efile, "a") as f:  # same inode, other size
        f.write("- 10.0.0.2:80\n")
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.1:80", "10.0.0.2:80"]


async def test_file_unchanged_is_not_read_again(tmp_path, monkeypatch):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    clock = Clock()
    disc, _ = file_discovery(efile, clock=clock)
    await disc.poll_once("backend")
    read = []
    monkeypatch.setattr(
        "sidecar.upstream.discovery.parse_endpoints_file", lambda *a: read.append(a)
    )
    clock.now += 1
    await disc.poll_once("backend")
    assert read == []
    assert disc.describe()["backend"]["last_update"] == clock.now - 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- 10.0.0.3:80\n- [unclosed, SECRET-ish\n", "not YAML: expected ',' or ']'"),
        ("\t- 10.0.0.3:80\n", "not YAML: found character '\\t' that cannot start any token"),
        ("", ": must be a non-empty list"),
        ("address: 10.0.0.3:80\n", ": must be a non-empty list"),
        ("- 10.0.0.3:80\n- address: 10.0.0.4:80\n  weight: 0\n", "[1].weight: must be"),
        ("- 10.0.0.3:80\n- nonsense\n", "[1]: 'nonsense' is not HOST:PORT"),
        ("- 10.0.0.3:80\n- 10.0.0.3:80\n", "[1]: 10.0.0.3:80 is listed twice"),
        ("- address: 10.0.0.3:80\n  colour: red\n", "[0].colour: unknown key"),
        ("[" * 1000, "not YAML (RecursionError)"),
    ],
)
async def test_bad_file_keeps_the_last_good_set_and_names_the_problem(
    tmp_path, caplog, text, problem
):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    disc, p = file_discovery(efile)
    await disc.poll_once("backend")
    write(efile, text)
    await disc.poll_once("backend")
    await disc.poll_once("backend")  # unchanged: not logged again
    assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443"]
    error = disc.describe()["backend"]["last_error"]
    assert error.startswith(f"endpoints file {efile}") and problem in error
    (logged,) = warnings(caplog)
    assert str(efile) in logged and problem in logged
    assert "keeping the last good set (2 endpoint(s))" in logged
    assert "SECRET" not in logged  # the problem is named, the file is not quoted
    write(efile, "- 10.0.0.9:80\n")  # fixed
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.9:80"]
    assert disc.describe()["backend"]["last_error"] is None


async def test_missing_file_at_start_then_written_by_a_controller(tmp_path, caplog):
    efile = tmp_path / "eps.yaml"
    disc, p = file_discovery(efile, start_wait=0.5)
    await disc.start()  # no error: starts empty
    try:
        assert p.endpoints == []
        assert disc.describe()["backend"] == {
            "source": "file",
            "last_update": None,
            "last_error": f"endpoints file {efile}: missing",
        }
        assert warnings(caplog) == [
            f"backend: endpoints file {efile}: missing; keeping the last good set (0 endpoint(s))"
        ]
    finally:
        await disc.stop()
    write(efile, V1)
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443"]


async def test_file_removed_or_unreadable_later_keeps_the_set(tmp_path, caplog):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    disc, p = file_discovery(efile)
    await disc.poll_once("backend")
    efile.unlink()
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443"]
    assert disc.describe()["backend"]["last_error"].endswith(": missing")
    efile.mkdir()  # something there that is not a file
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443"]
    assert disc.describe()["backend"]["last_error"].endswith(": not a regular file")
    efile.rmdir()
    os.mkfifo(efile)  # would block a reader until a writer comes: never opened
    await disc.poll_once("backend")
    assert disc.describe()["backend"]["last_error"].endswith(": not a regular file")
    assert len(warnings(caplog)) == 2  # missing, not a regular file (the same twice)


async def test_file_read_error_is_kept_and_tried_again_at_the_next_poll(tmp_path, monkeypatch):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    disc, p = file_discovery(efile)
    await disc.poll_once("backend")
    write(efile, "- 10.0.0.5:80\n")

    def eio(*a, **kw):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(discovery, "open", eio, raising=False)
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443"]
    assert disc.describe()["backend"]["last_error"] == (
        f"endpoints file {efile}: cannot read (Input/output error)"
    )
    monkeypatch.delattr(discovery, "open")
    await disc.poll_once("backend")  # the file has not changed since, but is read again
    assert addresses(p) == ["10.0.0.5:80"]


async def test_file_too_large_is_refused(tmp_path):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    disc, p = file_discovery(efile)
    await disc.poll_once("backend")
    write(efile, "- 10.0.0.5:80\n" + "#" * (1 << 20))
    await disc.poll_once("backend")
    assert addresses(p) == ["10.0.0.1:8443", "10.0.0.2:8443"]
    assert "larger than 1048576 bytes" in disc.describe()["backend"]["last_error"]


async def test_file_with_an_empty_list_empties_the_set(tmp_path, caplog):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    disc, p = file_discovery(efile)
    await disc.poll_once("backend")
    write(efile, "[]\n")
    await disc.poll_once("backend")
    assert p.endpoints == []
    assert disc.describe()["backend"]["last_error"] is None
    assert warnings(caplog) == [f"backend: endpoints file {efile} lists no endpoints"]


async def test_file_loop_polls_every_second_in_the_background(tmp_path):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    steps = Steps()
    disc, p = file_discovery(efile, sleep=steps.sleep)
    await disc.start()
    assert len(p.endpoints) == 2
    write(efile, "- 10.0.0.7:80\n")
    await steps.step()
    assert addresses(p) == ["10.0.0.7:80"]
    assert steps.delays == [1.0, 1.0]
    await disc.stop()


def test_parse_endpoints_file_reads_what_the_endpoints_key_reads():
    specs, problems = parse_endpoints_file(V1.encode(), "f")
    assert problems == []
    assert (
        specs
        == parse_endpoints(
            [
                "10.0.0.1:8443",
                {"address": "10.0.0.2:8443", "labels": {"version": "v2", "zone": "a"}, "weight": 3},
            ],
            "f",
        )[0]
    )
    assert specs[1] == EndpointSpec(specs[1].address, {"version": "v2", "zone": "a"}, 3)


# -- the whole -------------------------------------------------------------------------------


async def test_describe_names_every_service_and_its_source(tmp_path):
    efile = tmp_path / "eps.yaml"
    write(efile, V1)
    services = {
        "static": service("static", endpoints=parse_endpoints(["10.0.0.1:80"], "x")[0]),
        "dns": service("dns", dns=DnsDiscovery("backend.example", 80)),
        "file": service("file", endpoints_file=str(efile)),
    }
    pools = {name: pool(name) for name in services}
    disc = Discovery(services, pools, resolver=FakeResolver(DnsError("timeout")))
    await disc.start()
    try:
        d = disc.describe()
    finally:
        await disc.stop()
    assert d["static"] == {"source": "static", "last_update": None, "last_error": None}
    assert d["dns"] == {
        "source": "dns",
        "last_update": None,
        "last_error": "backend.example: timeout",
    }
    assert d["file"]["source"] == "file" and d["file"]["last_error"] is None
    assert isinstance(d["file"]["last_update"], float)
    assert len(pools["file"].endpoints) == 2


def test_a_dynamic_service_without_a_pool_is_a_wiring_error():
    with pytest.raises(ValueError, match="no pool"):
        Discovery({"backend": service("backend", dns=DnsDiscovery("x", 80))}, {})
