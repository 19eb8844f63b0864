"""Opaque TCP through both sidecars: a real Redis (Debian's redis-server) and redis-cli.

Redis sits behind the `cache` sidecar (`app_protocol: tcp`, a policy that allows
the frontend's SPIFFE ID); the frontend's sidecar gives the `tcp` service
`cache.default` a loopback port of its own, and also tunnels `CONNECT
cache.default:6379` from its HTTP listener. Between the sidecars: mTLS with ALPN
`meshca-tcp`, both SPIFFE IDs verified. A denied principal, a client without a
certificate and one with a certificate from another CA are all cut off before
Redis sees a connection (its own `total_connections_received` says so).
"""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest
import trustme
from e2e.protocol_rig import (
    FRONTEND,
    INTRUDER,
    Rig,
    inbound_of,
    logged,
    outbound_of,
    sample,
    scrape,
)
from helpers import run_meshca
from mesh import admin_get, proxy_get
from redisserver import redis_server
from rotation_rig import free_port

CACHE = "spiffe://cluster.local/ns/default/sa/cache"
SERVICE = "cache.default"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tcp")
    with redis_server(root) as redis:
        rig = Rig(root)
        try:
            cache = rig.sidecar(
                "cache",
                CACHE,
                app=redis.address,
                inbound={"app_protocol": "tcp"},
                metrics=True,
                ca_extra={"bundle_poll": 0.5},
                policy={
                    "rules": [
                        {"name": "frontend", "action": "ALLOW", "from": {"principals": [FRONTEND]}},
                        # HTTP-only ALLOW rules never match a TCP connection
                        {"name": "http-only", "action": "ALLOW", "to": {"paths": ["/*"]}},
                    ]
                },
            )
            ports = {"frontend": free_port(), "intruder": free_port(), "victim": free_port()}
            sidecars = {}
            for name, sid in (("frontend", FRONTEND), ("intruder", INTRUDER), ("victim", FRONTEND)):
                svc = {
                    "endpoints": [inbound_of(cache)],
                    "identity": CACHE,
                    "protocol": "tcp",
                    "listen": f"127.0.0.1:{ports[name]}",
                }
                # and the same sidecar misdeclared as an HTTP service
                wrong = {"endpoints": [inbound_of(cache)], "identity": CACHE}
                sidecars[name] = rig.sidecar(
                    name, sid, services={SERVICE: svc, "cachehttp.default": wrong}
                )
            yield {"rig": rig, "redis": redis, "cache": cache, "ports": ports, **sidecars}
        finally:
            rig.stop()


def connections(env) -> int:
    """How many connections Redis has accepted so far (asked directly)."""
    out = env["redis"].cli("INFO", "stats").stdout
    for line in out.splitlines():
        if line.startswith("total_connections_received:"):
            return int(line.split(":")[1])
    raise AssertionError(out)


def test_redis_cli_through_both_sidecars(env, tmp_path):
    port = env["ports"]["frontend"]
    assert env["redis"].cli("SET", "greeting", "hello", port=port).stdout.strip() == "OK"
    assert env["redis"].cli("GET", "greeting", port=port).stdout.strip() == "hello"
    value = tmp_path / "big"
    value.write_bytes(b"x" * (4 << 20))  # 4 MiB in one command
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "-x", "SET", "big"],
        stdin=value.open("rb"),
        capture_output=True,
        timeout=30,
    )
    assert done.stdout.strip() == b"OK", done
    assert env["redis"].cli("STRLEN", "big").stdout.strip() == str(4 << 20)
    lines = logged(env["cache"], "inbound", lambda r: r.get("protocol") == "tcp")
    assert lines[-1]["peer"] == FRONTEND and lines[-1]["decision"] == "allow"
    assert lines[-1]["bytes_in"] > 4 << 20


def test_connect_tunnels_to_a_tcp_service(env):
    with socket.create_connection(
        ("127.0.0.1", int(outbound_of(env["frontend"]).split(":")[1]))
    ) as s:
        s.settimeout(10)
        s.sendall(b"CONNECT cache.default:6379 HTTP/1.1\r\nHost: cache.default:6379\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 "), head
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"


def test_connect_to_an_unknown_service_is_refused(env):
    with socket.create_connection(
        ("127.0.0.1", int(outbound_of(env["frontend"]).split(":")[1]))
    ) as s:
        s.settimeout(10)
        s.sendall(b"CONNECT nowhere.default:1 HTTP/1.1\r\nHost: nowhere.default:1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 404 ")


def test_a_denied_principal_is_cut_off_before_redis_sees_a_connection(env):
    before = connections(env)
    got = env["redis"].cli("PING", port=env["ports"]["intruder"])
    assert "PONG" not in got.stdout
    assert connections(env) == before + 1  # only our own INFO call above
    refused = logged(env["cache"], "inbound", lambda r: r.get("peer") == INTRUDER)
    assert refused[-1]["decision"] == "deny" and refused[-1]["error"] == "forbidden"


def _tls_client(ctx: ssl.SSLContext, address: str) -> bytes:
    host, port = address.rsplit(":", 1)
    got = b""
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(b"PING\r\n")
                got = s.recv(100)
    except (ssl.SSLError, OSError):
        pass
    return got


def test_peers_without_a_valid_certificate_get_nothing(env, tmp_path):
    before = connections(env)
    address = inbound_of(env["cache"])
    bundle = (env["rig"].root / "cache" / "ca-root.pem").read_text()
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cadata=bundle)
    assert _tls_client(no_cert, address) == b""
    other_ca = trustme.CA()
    foreign = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    foreign.check_hostname = False
    foreign.load_verify_locations(cadata=bundle)
    other_ca.issue_cert("frontend.default.svc").configure_cert(foreign)
    assert _tls_client(foreign, address) == b""
    assert connections(env) == before + 1  # our own INFO call


def test_tcp_metrics_count_connections_and_bytes(env):
    env["redis"].cli("SET", "m", "1" * 1000, port=env["ports"]["frontend"])
    page = scrape(env["cache"])
    mine = {"reporter": "destination", "source_principal": FRONTEND, "request_protocol": "tcp"}
    assert sample(page, "istio_tcp_connections_opened_total", **mine) >= 1
    assert sample(page, "istio_tcp_connections_closed_total", **mine) >= 1
    assert sample(page, "istio_tcp_received_bytes_total", **mine) >= 1000
    assert sample(page, "istio_tcp_sent_bytes_total", **mine) > 0
    assert sample(page, "istio_tcp_connections_opened_total", source_principal=INTRUDER) == 0


def test_http_sent_to_a_tcp_app_is_refused_before_redis_sees_it(env):
    before = connections(env)
    status, body, _ = proxy_get(env["frontend"], "http://cachehttp.default/x")
    assert status == 502, body
    assert connections(env) == before + 1  # our own INFO call
    assert "protocol_mismatch" in scrape(env["cache"])


def test_an_open_connection_is_cut_when_its_peer_is_revoked(env):
    """Last in this module: it revokes the `victim` sidecar's certificate."""
    with socket.create_connection(("127.0.0.1", env["ports"]["victim"]), timeout=10) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"
        status, ident = admin_get(env["victim"], "/identity")
        assert status == 200
        run_meshca("revoke", "--home", str(env["rig"].home), "--serial", ident["serial"])
        s.settimeout(15)  # the cache sidecar polls the bundle every 0.5 s
        try:
            cut = s.recv(100) == b""
        except (ConnectionResetError, TimeoutError) as e:
            cut = not isinstance(e, TimeoutError)
        assert cut, "the revoked peer's connection stayed open"
    assert "revoked" in env["cache"].stderr
