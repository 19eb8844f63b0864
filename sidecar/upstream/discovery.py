"""Keeps the pools of outbound services configured with `dns` or `endpoints_file` filled with
their current endpoints.

- `dns`: every A and AAAA record of the name (at most 1024), at the configured port, resolved with
  dnspython's asyncio resolver. Resolved again every `refresh` seconds, or sooner when the
  records' TTL is shorter, but never more often than every 0.5 s. A failed resolution
  (timeout, SERVFAIL, NXDOMAIN, no records) keeps the last good set, is logged once per
  change of error, and is retried with a backoff (0.5 s doubling, at most `refresh`).
  When only one of the two queries fails (some servers refuse or drop AAAA queries), the
  other's records are used with the failed type's addresses last seen.
- `endpoints_file`: a YAML list in the shape of the `endpoints` key, checked every second
  (its inode, size, mtime and ctime). A changed file that parses without a single problem
  replaces the set; a missing, unreadable or bad file keeps the last good set and the log
  names the file and the problem (never its contents). Write it with a rename: an
  in-place rewrite of the same size within one clock tick is not seen.

Until a service's first good answer its pool is empty, so its requests are refused
(`service_unavailable`); `Discovery.start` waits at most `START_WAIT` seconds in all for
the first answers, so a slow DNS server does not hold the sidecar's start-up.

Environment:
    SIDECAR_DNS_SERVER=HOST:PORT  the one DNS server to ask (an IP address, `[V6]:PORT`
        for IPv6), instead of the nameservers, search list and options of
        /etc/resolv.conf. Meant for tests that run their own DNS server on loopback.

dnspython is imported only when a service uses `dns`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from meshca.config import Listen
from sidecar.trafficconfig import MAX_ENDPOINTS, EndpointSpec, parse_endpoints
from sidecar.upstream.pool import UpstreamPool

if TYPE_CHECKING:
    from sidecar.config import Service

log = logging.getLogger("sidecar.discovery")

ENV_DNS_SERVER = "SIDECAR_DNS_SERVER"
MIN_INTERVAL = 0.5  # never resolve a name more often than this, whatever its TTL
FILE_POLL = 1.0  # how often an endpoints file is checked for a change
START_WAIT = 2.0  # how long `start` waits, in all, for the first answers
DNS_LIFETIME = 3.0  # one resolution (A and AAAA together), every try included
MAX_FILE_BYTES = 1 << 20  # an endpoints file larger than this is refused
MAX_PROBLEMS_LOGGED = 5  # of a bad endpoints file's problems, the first ones are logged

Sleep = Callable[[float], Awaitable[None]]
FileSig = tuple[int, int, int, int, int]  # inode, size, mtime_ns, ctime_ns, mode


class DnsError(Exception):
    """A resolution gave no usable answer; `str()` is the reason, the same for the same
    cause (so a failure that repeats is logged once)."""


@dataclass(frozen=True)
class DnsAnswer:
    """The addresses a name resolved to (A and AAAA) and the shortest TTL among them."""

    addresses: tuple[str, ...]
    ttl: float | None
    problem: str | None = None  # a partial answer: which query failed, and why


class Resolver(Protocol):
    """What `Discovery` asks for a name's addresses (tests pass their own)."""

    async def resolve(self, name: str) -> DnsAnswer:
        """Every A and AAAA address of `name`; DnsError when there is no usable answer."""
        ...


def dns_delay(refresh: float, ttl: float | None, failures: int) -> float:
    """Seconds until a name is resolved again: after a good answer, `refresh` or the TTL if
    shorter; after `failures` failed resolutions in a row, 0.5 s doubling up to `refresh`.
    Never under `MIN_INTERVAL`."""
    if failures > 0:
        delay = min(refresh, MIN_INTERVAL * 2 ** min(failures - 1, 30))
    elif ttl is None:
        delay = refresh
    else:
        delay = min(refresh, ttl)
    return max(MIN_INTERVAL, delay)


def parse_server(text: str) -> tuple[str, int]:
    """`IP:PORT` or `[V6]:PORT` (the `SIDECAR_DNS_SERVER` value); ValueError naming it."""
    host, sep, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
        num = int(port) if bracketed == (ip.version == 6) else -1  # `::1:53` is ambiguous
    except ValueError:
        num = -1
    if not sep or not 1 <= num <= 65535:
        raise ValueError(f"{ENV_DNS_SERVER}={text!r}: must be IP:PORT (or [IPV6]:PORT)")
    return host, num


def address_order(address: str) -> tuple[int, int | str]:
    """IPv4 before IPv6, then numeric order (what we do not parse sorts last, by text)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (7, address)
    return (ip.version, int(ip))


def dns_reason(exc: BaseException) -> str:
    """A failed dnspython query as a short reason, stable per cause."""
    name = type(exc).__name__
    if name == "NXDOMAIN":
        return "NXDOMAIN (no such name)"
    if name in ("LifetimeTimeout", "Timeout"):
        return "timeout"
    if name == "NoNameservers":
        return "no nameserver answered (SERVFAIL, REFUSED or unreachable)"
    if name == "NoResolverConfiguration":
        return "no nameserver configured (/etc/resolv.conf)"
    if isinstance(exc, OSError):
        return f"network error: {exc.strerror or name}"
    return name


class DnspythonResolver:
    """Resolves A and AAAA at once with `dns.asyncresolver`: the nameservers of
    /etc/resolv.conf (search list included), or the one `server`."""

    def __init__(
        self, server: tuple[str, int] | None = None, lifetime: float = DNS_LIFETIME
    ) -> None:
        self.server = server
        self.lifetime = lifetime
        self._resolver: Any = None  # a dns.asyncresolver.Resolver, made on first use
        self._last: dict[tuple[str, str], tuple[str, ...]] = {}  # (name, type) -> addresses

    @classmethod
    def from_env(cls) -> DnspythonResolver:
        """Configured from `SIDECAR_DNS_SERVER` when set; ValueError if it is malformed."""
        text = os.environ.get(ENV_DNS_SERVER)
        return cls(parse_server(text) if text else None)

    def _make(self) -> Any:
        import dns.asyncresolver
        import dns.nameserver

        if self.server is None:
            return dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(*self.server)]
        return resolver

    async def resolve(self, name: str) -> DnsAnswer:
        """Every A and AAAA address of `name`. When one of the two queries fails, the other's
        records are used with the failed type's addresses last seen (some servers refuse or
        drop AAAA queries), and the answer's `problem` says so. DnsError when both fail or
        there is no address at all."""
        if self._resolver is None:
            try:
                self._resolver = self._make()
            except Exception as e:  # resolv.conf missing or empty: try again next time
                raise DnsError(dns_reason(e)) from None
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        addresses: list[str] = []
        ttls: list[float] = []
        failed: dict[str, str] = {}
        nxdomain = False
        for rdtype, got in zip(("A", "AAAA"), results, strict=True):
            if isinstance(got, asyncio.CancelledError):
                raise got
            found: list[str] = []
            if isinstance(got, BaseException):
                if type(got).__name__ != "NXDOMAIN":
                    failed[rdtype] = dns_reason(got)
                    addresses += self._last.get((name, rdtype), ())
                    continue
                nxdomain = True
            elif got.rrset is not None:  # (None: NOERROR, no record of this type)
                found = [rdata.address for rdata in got.rrset]
                ttls.append(float(got.rrset.ttl))
            self._last[(name, rdtype)] = tuple(found)
            addresses += found
        problem = None
        if len(failed) == 2:
            a, aaaa = failed["A"], failed["AAAA"]
            raise DnsError(a if a == aaaa else f"A: {a}; AAAA: {aaaa}")
        if failed:
            ((rdtype, reason),) = failed.items()
            problem = f"{rdtype} query failed ({reason})"
        if not addresses:
            if problem is not None:
                raise DnsError(problem)
            raise DnsError("NXDOMAIN (no such name)" if nxdomain else "no A or AAAA records")
        return DnsAnswer(tuple(addresses), min(ttls) if ttls else None, problem)

    async def _query(self, name: str, rdtype: str) -> Any:
        return await self._resolver.resolve(
            name,
            rdtype,
            raise_on_no_answer=False,
            lifetime=self.lifetime,
            search=self.server is None,  # as getaddrinfo would: ndots and the search list
        )


class _Source:
    """One dynamic service: where its endpoints come from and how the last attempt went."""

    def __init__(self, name: str, kind: str, pool: UpstreamPool) -> None:
        self.name = name
        self.kind = kind  # "dns" or "file"
        self.pool = pool
        self.current: tuple[EndpointSpec, ...] | None = None  # the last good set
        self.last_update: float | None = None  # wall clock of the last good answer
        self.last_error: str | None = None  # the current error (None: the last try was good)
        self.failures = 0  # in a row
        self.sig: FileSig | None = None  # the endpoints file as last looked at
        self.look_again = True  # read the file at the next poll even if `sig` is the same
        self.first = asyncio.Event()


class Discovery:
    """Fills the pools of `dns` and `endpoints_file` services and keeps them current."""

    def __init__(
        self,
        services: Mapping[str, Service],
        pools: Mapping[str, UpstreamPool],
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        file_poll: float = FILE_POLL,
        start_wait: float = START_WAIT,
    ) -> None:
        self.services = services
        self.resolver = resolver
        self.clock = clock
        self._sleep = sleep
        self.file_poll = file_poll
        self.start_wait = start_wait
        self.sources: dict[str, _Source] = {}
        for name, svc in services.items():
            t = svc.traffic
            kind = "dns" if t.dns is not None else "file" if t.endpoints_file else None
            if kind is None:
                continue
            if name not in pools:
                raise ValueError(f"discovery: service {name} has no pool")
            self.sources[name] = _Source(name, kind, pools[name])
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """The first resolution or read of every dynamic service (waiting `start_wait`
        seconds at most, in all), then keeps polling in the background."""
        if not self.sources or self._tasks:
            return
        if self.resolver is None and any(s.kind == "dns" for s in self.sources.values()):
            self.resolver = DnspythonResolver.from_env()
        loop = asyncio.get_running_loop()
        for src in self.sources.values():
            self._tasks.append(loop.create_task(self._run(src), name=f"discovery-{src.name}"))
        firsts = [s.first.wait() for s in self.sources.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*firsts), self.start_wait)
        except TimeoutError:
            late = sorted(s.name for s in self.sources.values() if not s.first.is_set())
            log.warning(
                "no endpoints yet for %s after %.1f s; still trying in the background",
                ", ".join(late),
                self.start_wait,
            )

    async def stop(self) -> None:
        """Stops the background polling (the pools keep their endpoints)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per service: where its endpoints come from, when they were last confirmed (wall
        clock, seconds) and the current error."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.services:
            src = self.sources.get(name)
            if src is None:
                out[name] = {"source": "static", "last_update": None, "last_error": None}
            else:
                out[name] = {
                    "source": src.kind,
                    "last_update": src.last_update,
                    "last_error": src.last_error,
                }
        return out

    async def poll_once(self, name: str) -> float:
        """One resolution (DNS) or one look at the file of service `name`; the seconds to
        wait before the next."""
        src = self.sources[name]
        try:
            if src.kind == "dns":
                return await self._resolve(src)
            await self._check_file(src)
            return self.file_poll
        finally:
            src.first.set()

    # -- the loops ---------------------------------------------------------------------------

    async def _run(self, src: _Source) -> None:
        while True:
            try:
                delay = await self.poll_once(src.name)
            except Exception as e:  # a bug of ours: log it, keep the set, try again later
                src.failures += 1
                self._fail(src, f"internal error: {e!r}", exc_info=True)
                delay = dns_delay(self._refresh(src), None, src.failures)
            await self._sleep(delay)

    def _refresh(self, src: _Source) -> float:
        dns = self.services[src.name].traffic.dns
        return dns.refresh if dns is not None else self.file_poll

    async def _resolve(self, src: _Source) -> float:
        dns = self.services[src.name].traffic.dns
        assert dns is not None and self.resolver is not None
        try:
            answer = await self.resolver.resolve(dns.name)
            if not answer.addresses:
                raise DnsError("no A or AAAA records")
        except DnsError as e:
            src.failures += 1
            self._fail(src, f"{dns.name}: {e}")
            return dns_delay(dns.refresh, None, src.failures)
        addresses = sorted(set(answer.addresses), key=address_order)[:MAX_ENDPOINTS]
        specs = tuple(EndpointSpec(Listen(a, dns.port)) for a in addresses)
        problem = None if answer.problem is None else f"{dns.name}: {answer.problem}"
        self._apply(src, specs, f"DNS {dns.name}", problem)
        delay = dns_delay(dns.refresh, answer.ttl, 0)
        if problem is None:
            src.failures = 0
            return delay
        src.failures += 1  # a partial answer: ask again as after a failure, or sooner
        return min(delay, dns_delay(dns.refresh, None, src.failures))

    async def _check_file(self, src: _Source) -> None:
        path = self.services[src.name].traffic.endpoints_file
        assert path is not None
        try:
            sig: FileSig | None = _stat(path)
        except FileNotFoundError:
            sig = None
        except OSError as e:
            src.look_again = True
            self._fail(src, f"endpoints file {path}: cannot stat ({e.strerror})")
            return
        if not src.look_again and sig == src.sig:
            return  # unchanged since the last look (good or bad)
        src.sig, src.look_again = sig, False
        if sig is None:
            self._fail(src, f"endpoints file {path}: missing")
            return
        if not stat.S_ISREG(sig[4]):  # a FIFO would block the loop, a folder cannot be read
            self._fail(src, f"endpoints file {path}: not a regular file")
            return
        if sig[1] > MAX_FILE_BYTES:
            self._fail(src, f"endpoints file {path}: larger than {MAX_FILE_BYTES} bytes")
            return
        try:
            # in a thread: a slow disk, or a large file of YAML to parse, holds no request
            got = await asyncio.to_thread(_read_endpoints_file, path, sig)
        except OSError as e:
            src.look_again = True  # perhaps passing (EIO): try again at the next poll
            self._fail(src, f"endpoints file {path}: cannot read ({e.strerror})")
            return
        if got is None:  # written while we read: look again at the next poll
            src.look_again = True
            return
        specs, problems = got
        if problems:
            shown = "; ".join(problems[:MAX_PROBLEMS_LOGGED])
            more = len(problems) - MAX_PROBLEMS_LOGGED
            if more > 0:
                shown += f"; and {more} more"
            self._fail(src, f"endpoints file {shown}")  # each problem names the file
            return
        if not specs:
            log.warning("%s: endpoints file %s lists no endpoints", src.name, path)
        self._apply(src, specs, f"endpoints file {path}")

    # -- outcomes ----------------------------------------------------------------------------

    def _apply(
        self,
        src: _Source,
        specs: tuple[EndpointSpec, ...],
        where: str,
        problem: str | None = None,
    ) -> None:
        """A good (or, with `problem`, partial) answer: publish it if it changed."""
        src.last_update = self.clock()
        if problem is not None:
            self._fail(src, problem, "using the records that did answer")
        elif src.last_error is not None:
            log.info("%s: %s answers again", src.name, where)
            src.last_error = None
        if specs == src.current:
            return
        src.pool.set_endpoints(specs)
        src.current = specs
        log.info(
            "%s: %d endpoint(s) from %s: %s",
            src.name,
            len(specs),
            where,
            ", ".join(str(s.address) for s in specs[:8]) + (" ..." if len(specs) > 8 else ""),
        )

    def _fail(
        self, src: _Source, error: str, then: str | None = None, exc_info: bool = False
    ) -> None:
        """Record the current error; log it only when it differs from the last one."""
        if error == src.last_error:
            return
        src.last_error = error
        if then is None:
            kept = len(src.current) if src.current is not None else 0
            then = f"keeping the last good set ({kept} endpoint(s))"
        log.warning("%s: %s; %s", src.name, error, then, exc_info=exc_info)


def _stat(path: str) -> FileSig:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def _read_endpoints_file(
    path: str, sig: FileSig
) -> tuple[tuple[EndpointSpec, ...], list[str]] | None:
    """Read and parse the file last seen as `sig` (None: it changed meanwhile); OSError."""
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if _stat(path) != sig:
        return None
    return parse_endpoints_file(data, path)


def parse_endpoints_file(data: bytes, where: str) -> tuple[tuple[EndpointSpec, ...], list[str]]:
    """An endpoints file's bytes: the endpoints and every problem (YAML errors by line and
    column, never quoting the file)."""
    try:
        raw = yaml.safe_load(data)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return (), [f"{where}: not YAML: {e.problem or 'syntax error'}{at}"]
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        return (), [f"{where}: not YAML ({type(e).__name__})"]
    if raw == []:
        return (), []  # an explicit empty list: no endpoints now (a controller scaled to 0)
    return parse_endpoints(raw, where)
