"""The `sidecar` command line: `run` the sidecar; `identity`, `rotate` and `check` for kubectl exec.

`identity`, `rotate` and `check` talk to the running sidecar's loopback admin
endpoint (the running process alone holds the private key).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshca import defaults, p256
from meshca.listener import Listener, bind
from sidecar import __version__
from sidecar.config import ConfigError, SidecarConfig, load_config

if TYPE_CHECKING:
    from sidecar.engines.base import ConnGroup
    from sidecar.localhttp import LocalServer, Routes

log = logging.getLogger("sidecar")
DEFAULT_ADMIN = f"127.0.0.1:{defaults.ADMIN_PORT}"
BACKLOG = 1024  # connections the kernel queues while a listener is at its limit
FD_RESERVE = 256  # descriptors for everything but proxied connections
TABLE_SETTLE_INTERVAL = 60.0  # s between releases of file pages after ES256 tables


async def _start_site(routes: Routes, host: str, port: int) -> tuple[LocalServer, str]:
    from sidecar.localhttp import LocalServer

    server = LocalServer(routes)
    return server, await server.start(host, port)


def _bound(lst: Listener, scheme: str) -> str:
    return f"{scheme}://{lst.host}:{lst.port}"


async def run(config: SidecarConfig) -> None:
    """Run the certificate manager, the listeners and the admin endpoint until SIGTERM."""
    import datetime as dt

    from meshca.client import EnrollmentClient
    from meshca.trust import BundleError
    from sidecar.admin import Admin
    from sidecar.engines.base import ConnGroup, Limits
    from sidecar.engines.h2.lazy import H2Downstream
    from sidecar.engines.http1.downstream import DownstreamConn
    from sidecar.heap import HeapKeeper
    from sidecar.identity.bundlewatch import BundleWatcher
    from sidecar.identity.certmanager import CertManager
    from sidecar.identity.creds import CredentialStore
    from sidecar.identity.trust import TrustBundle, TrustStore
    from sidecar.policy.authn import from_config as authn_from_config
    from sidecar.policy.holder import PolicyHolder
    from sidecar.protocols import HTTP, HTTP2, TCP, accepted_alpn
    from sidecar.routing.dispatch import InboundDispatch
    from sidecar.routing.inbound import InboundRouter
    from sidecar.routing.outbound import JwtSvids, OutboundRouter
    from sidecar.routing.tcp import TcpInbound
    from sidecar.telemetry.accesslog import AccessLog
    from sidecar.telemetry.sink import Telemetry
    from sidecar.telemetry.window import Window

    loop = asyncio.get_running_loop()
    try:
        bootstrap = TrustBundle.check(
            config.ca.bundle.read_text(),
            dt.datetime.now(dt.UTC),
            "bootstrap",
            where=f"ca.bundle ({config.ca.bundle.name})",
        )
    except OSError as e:
        raise ConfigError([f"ca.bundle: cannot read {config.ca.bundle}: {e.strerror}"]) from None
    except BundleError as e:
        raise ConfigError([str(e)]) from None
    # One owner of the trust bundle; everything that verifies a peer reads it per connection.
    trust = TrustStore(bootstrap, config.trust_domain)
    app_protocol = config.inbound.app_protocol if config.inbound is not None else HTTP
    if app_protocol == HTTP2 or (
        config.outbound is not None
        and any(svc.protocol == HTTP2 for svc in config.outbound.services.values())
    ):
        # HTTP/2 is configured (an h2c app, an http2 service): load its engines now, not
        # at the first connection (engines/h2/lazy: 70-90 ms on the event loop here).
        import importlib

        for name in ("sidecar.engines.h2.downstream", "sidecar.engines.h2.upstream"):
            importlib.import_module(name)
    store = CredentialStore(trust, alpn=accepted_alpn(app_protocol))
    urls = config.ca.urls or (config.ca.url,)
    watcher = BundleWatcher(urls, trust, config.ca.bundle_poll)
    client = EnrollmentClient(
        urls, lambda: trust.pem, on_untrusted=watcher.catch_up, ca_id=watcher.ca_id
    )
    manager = CertManager(config.ca, store, client=client)
    issuers = tuple(ic.issuer for ic in config.jwt.issuers) if config.jwt is not None else ()
    policy = PolicyHolder(config.policy, issuers) if config.inbound is not None else None
    authn = None
    if config.jwt is not None:
        try:
            authn = authn_from_config(config.jwt, trust.ca_context)
        except (OSError, ValueError) as e:
            raise ConfigError([f"jwt: {e}"]) from None
    admin = Admin(store, manager, policy, watcher)
    background = [asyncio.create_task(watcher.run())]
    runners: list[LocalServer] = []
    listeners: list[Listener] = []
    groups: list[ConnGroup] = []
    stoppers: list[Callable[[], Awaitable[None]]] = []
    unhook: Callable[[], None] | None = None
    log_cfg = config.access_log
    access_log = None
    if log_cfg.mode != "off":
        access_log = AccessLog(sys.stdout, log_cfg.mode == "errors", log_cfg.sample)
    metrics = None
    pools: dict[str, Any] = {}
    if config.metrics is not None:
        from sidecar.telemetry.metrics import SidecarMetrics, Sources

        def not_after() -> float | None:
            creds = store.current
            return creds.not_after.timestamp() if creds is not None else None

        def last_poll() -> float | None:
            when = watcher.last_success
            if when is None:
                return None
            return (
                dt.datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()
            )

        metrics = SidecarMetrics(
            lambda: str(store.current.spiffe_id) if store.current is not None else None,
            config.metrics.workload,
            config.metrics.namespace,
            Sources(
                not_after=not_after,
                renewals=lambda: (manager.status.renewals, manager.status.failures),
                bundle_sequence=lambda: trust.current.sequence,
                last_poll=last_poll,
                pools=lambda: pools,
            ),
        )
    window = Window(time.monotonic)  # the last minute, for `sidecar stats`
    admin.window = window
    exporter = None
    if config.tracing.otlp_endpoint is not None:
        from sidecar.telemetry.metrics import workload_of
        from sidecar.telemetry.otlp import OtlpExporter

        def service_name() -> str:  # OTel's service.name: the pod's workload
            named = config.metrics.workload if config.metrics is not None else None
            named = named or os.environ.get("SIDECAR_WORKLOAD")
            own = store.current
            return named or workload_of(str(own.spiffe_id) if own else None)[0]

        exporter = OtlpExporter(config.tracing, service_name)
        if metrics is not None:
            metrics.sources.spans = lambda: (exporter.exported, exporter.dropped)
    telemetry = Telemetry(access_log, metrics, window, exporter)

    def handshake_failed(direction: str) -> Callable[[str], None]:
        return lambda reason: telemetry.refused(direction, reason)

    raise_fd_limit(config)
    heap = HeapKeeper()  # counts the listeners' connections; trims the heap when they stop
    try:
        if config.inbound is not None:
            ib = config.inbound
            in_limits = Limits(
                header_timeout=ib.header_timeout,
                idle_timeout=ib.idle_timeout,
                upstream_timeout=ib.app_timeout,
                max_header_bytes=ib.max_header_bytes,
                max_body_bytes=ib.max_body_bytes,
            )
            in_router = InboundRouter(ib, store, authn, policy, tracing=config.tracing)
            admin.inbound_tls = lambda: dict(in_router.tls_sessions)
            assert policy is not None  # made whenever there is an inbound listener
            background.append(asyncio.create_task(policy.watch()))
            in_group = ConnGroup()
            engines = {
                HTTP: lambda: DownstreamConn(in_router, in_limits, telemetry, in_group),
                HTTP2: lambda: H2Downstream(in_router, in_limits, telemetry, in_group),
                TCP: lambda: TcpInbound(in_router, ib.idle_timeout, telemetry, in_group),
            }
            refused_in = handshake_failed("inbound")
            lst = Listener(
                bind(ib.listen.host, ib.listen.port, BACKLOG),
                heap.counting(
                    lambda: InboundDispatch(engines, ib.app_protocol, in_group, refused_in)
                ),
                ssl_context=store.server_context,
                max_connections=ib.max_connections,
                handshake_timeout=ib.header_timeout,
                name="inbound",
                on_handshake_failure=handshake_failed("inbound"),
            )
            in_group.on_release = lst.release
            lst.start()
            listeners.append(lst)
            groups.append(in_group)
            print(f"sidecar: inbound listening on {_bound(lst, 'https')}", flush=True)
        if config.outbound is not None:
            ob = config.outbound
            out_limits = Limits(upstream_timeout=ob.upstream_timeout)
            jwts = JwtSvids(store, manager.client)
            out_router = OutboundRouter(ob, store, jwts, tracing=config.tracing)
            pools.update(out_router.pools)
            if any(svc.traffic.dns or svc.traffic.endpoints_file for svc in ob.services.values()):
                from sidecar.upstream.discovery import Discovery

                discovery = Discovery(ob.services, out_router.pools)
                await discovery.start()
                stoppers.append(discovery.stop)

                def endpoints_doc() -> dict[str, Any]:
                    doc = out_router.describe()
                    for name, found in discovery.describe().items():
                        doc[name]["discovery"] = found
                    return doc

                admin.endpoints_doc = endpoints_doc
            else:
                admin.endpoints_doc = out_router.describe
            out_group = ConnGroup()
            lst = Listener(
                bind(ob.listen.host, ob.listen.port, BACKLOG),
                heap.counting(lambda: out_router.engines(out_limits, telemetry, out_group)),
                max_connections=ob.max_connections,
                name="outbound",
            )
            out_group.on_release = lst.release
            lst.start()
            listeners.append(lst)
            groups.append(out_group)
            print(f"sidecar: outbound listening on {_bound(lst, 'http')}", flush=True)
            for name, svc in ob.services.items():
                if svc.listen is None:
                    continue
                tcp_group = ConnGroup()
                lst = Listener(
                    bind(svc.listen.host, svc.listen.port, BACKLOG),
                    heap.counting(
                        lambda name=name, g=tcp_group: out_router.tcp_conn(  # type: ignore[misc]
                            name, out_limits, telemetry, g
                        )
                    ),
                    max_connections=ob.max_connections,
                    name=f"outbound {name}",
                )
                tcp_group.on_release = lst.release
                lst.start()
                listeners.append(lst)
                groups.append(tcp_group)
                print(f"sidecar: {name} listening on {_bound(lst, 'tcp')}", flush=True)
        admin_runner, admin_url = await _start_site(
            admin.admin_routes(), config.admin.host, config.admin.port
        )
        runners.append(admin_runner)
        health_runner, health_url = await _start_site(
            admin.health_routes(), config.health.host, config.health.port
        )
        runners.append(health_runner)
        if metrics is not None:
            from prometheus_client import CollectorRegistry

            from sidecar.telemetry.metrics import scrape_routes

            assert config.metrics is not None
            registry = CollectorRegistry()
            registry.register(metrics)
            metrics_runner, metrics_url = await _start_site(
                scrape_routes(registry), config.metrics.listen.host, config.metrics.listen.port
            )
            runners.append(metrics_runner)
            print(f"sidecar: metrics listening on {metrics_url}", flush=True)
        print(f"sidecar: admin listening on {admin_url}", flush=True)
        print(f"sidecar: health listening on {health_url}", flush=True)

        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if exporter is not None:
            exporter.start()
            stoppers.append(exporter.stop)
        heap.start()
        # Enrollment, renewals and bundle documents run code the data path does not: once
        # each is done, its pages of cryptography and the rest go back (sidecar/heap.py).
        manager.after_each(heap.settle)
        watcher.after_each(heap.settle)
        # So does an ES256 key's table (built in a thread): the verifications before it
        # went through cryptography's ECDSA, which the table's leave unused from then on.
        # At most once a minute (more keys in use than tables kept rebuild every second),
        # and libcrypto is bound here, on the loop, so that no build thread maps a library.
        if config.jwt is not None and p256.prepare():
            settled_at = [-math.inf]

            def settle_soon() -> None:
                if time.monotonic() - settled_at[0] < TABLE_SETTLE_INTERVAL:
                    return
                settled_at[0] = time.monotonic()
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(heap.settle)

            unhook = p256.after_build(settle_soon)
        task = asyncio.create_task(manager.run())
        try:
            await stop.wait()
            runners.remove(health_runner)  # drain closes it first
            await drain(listeners, groups, health_runner, config.drain_timeout)
        finally:
            for t in (task, *background):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
    finally:
        heap.stop()
        if unhook is not None:
            unhook()
        for lst in listeners:
            lst.close()
        for stop_it in stoppers:
            await stop_it()
        for r in runners:
            await r.close()
        sys.stdout.flush()


async def drain(
    listeners: Sequence[Listener], groups: Sequence[ConnGroup], health: Any, timeout: float
) -> None:
    """SIGTERM: stop accepting, report not ready, let in-flight requests finish (at most
    `timeout` seconds; their responses say `Connection: close`), close idle connections."""
    for lst in listeners:
        lst.close()
    await health.close()  # the readiness probe fails from now on: no new traffic is sent here
    for g in groups:
        g.drain()
    open_now = sum(len(g.conns) for g in groups)
    print(
        f"sidecar: stopping: no new connections; draining {open_now} open (at most {timeout:g} s)",
        flush=True,
    )
    cut = await asyncio.gather(*(g.wait_closed(timeout) for g in groups))
    if sum(cut):
        print(f"sidecar: drain time over: closed {sum(cut)} busy connection(s)", flush=True)
    print("sidecar: stopped", flush=True)


def raise_fd_limit(config: SidecarConfig) -> None:
    """Make room for the connection limits: each inbound or outbound connection may hold
    an upstream one too. The soft RLIMIT_NOFILE is raised (up to the hard limit) when it
    is lower; a limit that still does not fit is logged."""
    import resource

    need = FD_RESERVE
    for part in (config.inbound, config.outbound):
        if part is not None:
            need += 2 * part.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
        if soft < need:
            log.warning(
                "open-file limit %d is below the %d the connection limits may need; "
                "lower max_connections or raise the limit",
                soft,
                need,
            )


def cmd_run(args: argparse.Namespace) -> int:
    """sidecar run --config FILE."""
    try:
        if args.config_env:
            import os

            text = os.environ.get(args.config_env)
            if not text:
                raise ConfigError([f"environment variable {args.config_env} is not set"])
            config = load_config(Path.cwd() / f"${args.config_env}", text)
        else:
            config = load_config(Path(args.config))
    except ConfigError as e:
        for p in e.problems:
            print(f"sidecar run: config error: {p}", file=sys.stderr)
        return 1
    try:
        import uvloop
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    from sidecar.policy.authz import PolicyError

    try:
        runner(run(config))
    except PolicyError as e:
        for p in e.problems:
            print(f"sidecar run: policy error: {p}", file=sys.stderr)
        return 1
    except ConfigError as e:
        for p in e.problems:
            print(f"sidecar run: config error: {p}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"sidecar run: cannot listen: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _admin_call(admin: str, method: str, path: str, timeout: float = 30) -> tuple[int, dict]:
    import urllib.error  # (the admin commands only: not loaded by `sidecar run`)
    import urllib.request

    req = urllib.request.Request(
        f"http://{admin}{path}", method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http to loopback admin)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {"error": "http_error", "detail": str(e)}
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"sidecar: cannot reach the admin endpoint at {admin}: {e}") from None


def cmd_identity(args: argparse.Namespace) -> int:
    """sidecar identity: the pod's current certificate."""
    status, doc = _admin_call(args.admin, "GET", "/identity")
    if status != 200:
        print(f"sidecar identity: {doc.get('detail', doc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        left = int(doc["seconds_remaining"])
        print(f"SPIFFE ID:   {doc['spiffe_id']}")
        print(f"serial:      {doc['serial']}")
        print(f"issuer:      {doc['issuer']}")
        print(f"valid:       {doc['not_before']} .. {doc['not_after']}")
        print(
            f"remaining:   {left // 3600}h{left % 3600 // 60:02d}m{left % 60:02d}s"
            + ("  (EXPIRED)" if doc["expired"] else "")
        )
        print(f"sha256:      {doc['sha256']}")
        chain = (
            "valid against the current bundle"
            if doc["chain_valid"]
            else ("DOES NOT CHAIN to the current bundle")
        )
        print(f"chain:       {chain}")
        mgr = doc.get("manager") or {}
        print(
            f"renewal:     {mgr.get('state')}, next {mgr.get('next_renewal')}"
            + (f", last error: {mgr['last_error']}" if mgr.get("last_error") else "")
        )
    return 0 if doc["chain_valid"] and not doc["expired"] else 1


def cmd_endpoints(args: argparse.Namespace) -> int:
    """sidecar endpoints: each outbound service's endpoints and their state."""
    status, doc = _admin_call(args.admin, "GET", "/endpoints")
    if status != 200:
        print(f"sidecar endpoints: {doc.get('detail', doc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    for name, svc in sorted(doc["services"].items()):
        print(
            f"{name}  (lb {svc['lb']}, {svc['active_requests']} in flight, "
            f"{svc['connections']} connections, {svc['overloaded']} overloaded)"
        )
        if not svc["endpoints"]:
            print("  (no endpoints)")
        for ep in svc["endpoints"]:
            labels = ",".join(f"{k}={v}" for k, v in sorted(ep["labels"].items())) or "-"
            state = "healthy" if ep["healthy"] else f"EJECTED {ep['ejected_for']:g}s"
            print(
                f"  {ep['address']:<24} {state:<16} weight {ep['weight']:<4} "
                f"active {ep['active_requests']:<4} requests {ep['requests']:<7} "
                f"failures {ep['failures']:<5} {labels}"
            )
    return 0


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}ms"


def stats_table(doc: dict) -> str:
    """The last minute per peer, as `sidecar stats` prints it."""
    lines = [
        f"{'DIRECTION':<9} {'PEER':<48} {'SUCCESS':>8} {'RPS':>7} {'P50':>9} {'P95':>9} "
        f"{'P99':>9} {'DENIED':>6}"
    ]
    for r in doc["peers"]:
        lines.append(
            f"{r['direction']:<9} {r['peer']:<48} {r['success_rate'] * 100:7.2f}% "
            f"{r['rps']:7.2f} {_ms(r['p50_ms']):>9} {_ms(r['p95_ms']):>9} "
            f"{_ms(r['p99_ms']):>9} {r['authz_denials']:>6}"
        )
    if not doc["peers"]:
        lines.append("(no requests in the last minute)")
    refused = doc.get("tls_handshake_failures") or {}
    failed = ", ".join(f"{d} {n}" for d, n in sorted(refused.items())) or "none"
    lines.append(f"TLS handshakes refused in the last {doc['window_seconds']} s: {failed}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    """sidecar stats: success rate, request rate and latency per peer over the last minute."""
    import time

    while True:
        status, doc = _admin_call(args.admin, "GET", "/stats")
        if status != 200:
            print(f"sidecar stats: {doc.get('detail', doc)}", file=sys.stderr)
            return 2
        if args.json:
            print(json.dumps(doc, indent=2), flush=True)
        else:
            if args.watch:
                print("\033[H\033[2J", end="")  # clear the screen, top left
            print(stats_table(doc), flush=True)
        if not args.watch:
            return 0
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    """sidecar rotate: renew now, print the new serial."""
    status, doc = _admin_call(args.admin, "POST", "/rotate")
    if status != 200:
        print(f"sidecar rotate: {doc.get('detail', doc)}", file=sys.stderr)
        return 1
    print(doc["serial"])
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """sidecar check HOST:PORT: the running sidecar handshakes with the peer and reports it."""
    import urllib.parse

    query = urllib.parse.urlencode(
        {"target": args.target, **({"expect": args.expect_id} if args.expect_id else {})}
    )
    status, doc = _admin_call(args.admin, "POST", "/check?" + query)
    if status != 200:
        print(f"sidecar check: {doc.get('detail', doc)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"target:      {doc['target']}")
        if doc.get("error"):
            print(f"error:       {doc['error']}")
        if "spiffe_id" in doc:
            print(f"SPIFFE ID:   {doc['spiffe_id']}")
            print(f"issuer:      {doc['issuer']}")
            print(f"valid:       {doc['not_before']} .. {doc['not_after']}")
            print(f"sha256:      {doc['sha256']}")
        chain = (
            "valid against our bundle"
            if doc["chain_valid"]
            else (f"DOES NOT VERIFY ({doc.get('chain_error', 'no handshake')})")
        )
        print(f"chain:       {chain}")
        if doc.get("expected"):
            verdict = "matches" if doc.get("identity_ok") else "DOES NOT MATCH"
            print(f"expected:    {doc['expected']} ({verdict})")
    return 0 if doc["chain_valid"] and doc.get("identity_ok") and not doc.get("error") else 1


def cmd_init_net(args: argparse.Namespace) -> int:
    """sidecar init-net: install the transparent-interception rules in this network namespace."""
    from sidecar.initnet import InitNetError, NetPlan, apply, parse_ports, rules

    try:
        plan = NetPlan(
            app_ports=parse_ports(args.app_port or [], "--app-port"),
            inbound_port=args.inbound_port,
            outbound_port=args.outbound_port,
            sidecar_uid=args.uid,
            exclude_outbound_ports=parse_ports(
                args.exclude_outbound_port or [], "--exclude-outbound-port"
            ),
        )
    except ValueError as e:
        print(f"sidecar init-net: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(rules(plan))
        return 0
    try:
        done = apply(plan, args.iptables)
    except InitNetError as e:
        print(f"sidecar init-net: {e}", file=sys.stderr)
        return 1
    print("sidecar init-net: " + ("rules installed" if done else "rules already in place"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sidecar` console script."""
    p = argparse.ArgumentParser(prog="sidecar", description="The meshca mTLS sidecar.")
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="run the sidecar")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="the YAML configuration file")
    src.add_argument(
        "--config-env",
        metavar="NAME",
        help="read the YAML configuration from this environment variable",
    )
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("identity", help="show the pod's current certificate")
    s.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"admin HOST:PORT (default {DEFAULT_ADMIN})"
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_identity)

    s = sub.add_parser("endpoints", help="show each outbound service's endpoints and health")
    s.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"admin HOST:PORT (default {DEFAULT_ADMIN})"
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_endpoints)

    s = sub.add_parser("stats", help="success rate, requests/s and latency per peer (last minute)")
    s.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"admin HOST:PORT (default {DEFAULT_ADMIN})"
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--watch", action="store_true", help="refresh in place until interrupted")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    s.set_defaults(func=cmd_stats)

    s = sub.add_parser("rotate", help="renew the certificate now and print the new serial")
    s.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"admin HOST:PORT (default {DEFAULT_ADMIN})"
    )
    s.set_defaults(func=cmd_rotate)

    s = sub.add_parser("check", help="handshake with HOST:PORT using the pod's certificate")
    s.add_argument("target", metavar="HOST:PORT", help="the peer to check")
    s.add_argument(
        "--admin", default=DEFAULT_ADMIN, help=f"admin HOST:PORT (default {DEFAULT_ADMIN})"
    )
    s.add_argument("--expect-id", help="the SPIFFE ID the peer must present")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "init-net",
        help="install transparent interception (run as an init "
        "container with NET_ADMIN, like istio-init)",
    )
    s.add_argument(
        "--app-port",
        action="append",
        metavar="PORT",
        help="app port(s) whose incoming traffic goes to the inbound port",
    )
    s.add_argument("--inbound-port", type=int, default=defaults.INBOUND_PORT)
    s.add_argument("--outbound-port", type=int, default=defaults.OUTBOUND_PORT)
    s.add_argument(
        "--uid",
        type=int,
        default=defaults.SIDECAR_UID,
        help="the sidecar's uid (its own traffic is not intercepted; default %(default)s)",
    )
    s.add_argument(
        "--exclude-outbound-port",
        action="append",
        metavar="PORT",
        help="outgoing ports to leave alone (repeatable)",
    )
    s.add_argument("--iptables", default="iptables", help="iptables or iptables-legacy")
    s.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    s.set_defaults(func=cmd_init_net)

    args = p.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
