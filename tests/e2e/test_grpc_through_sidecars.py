"""gRPC through both sidecars with the real grpcio client and server.

The app (tests/grpc_app.py, h2c) sits behind the `orders` sidecar (`app_protocol:
grpc`, JWT from the CA, a policy over gRPC methods); the frontend's gRPC client
calls its outbound listener with h2c prior knowledge and `:authority
orders.shop`; the sidecars speak HTTP/2 over mTLS (ALPN `meshca-h2`). Checked:
unary with trailers, server streaming of 100 MB with both sidecars' memory
bounded, client streaming, bidirectional streaming, 100 concurrent calls on one
channel, and the refusals a gRPC client understands (PERMISSION_DENIED for a
method the policy does not allow, UNAUTHENTICATED without a JWT, UNAVAILABLE
with the app down, DEADLINE_EXCEEDED past the call's deadline), none of which
reaches the app.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import subprocess
import threading
import time

import grpc
import grpcclient as gc
import pytest
from e2e.protocol_rig import (
    FRONTEND,
    INTRUDER,
    Rig,
    inbound_of,
    logged,
    outbound_of,
    rss_kib,
    sample,
    scrape,
)
from grpc_app import start_grpc_app, stream_message
from helpers import curl_enroll, mint_token, openssl_csr, run_meshca
from mesh import admin_get
from rotation_rig import free_port

ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
AUTHORITY = "orders.shop"
ALLOWED = [f"/meshtest.Echo/{m}" for m in ("Unary", "Whoami", "ServerStream", "ClientStream")]
ALLOWED += [f"/meshtest.Echo/{m}" for m in ("Bidi", "Slow", "Stats")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("grpc"))
    try:
        port = free_port()
        app = rig.add(start_grpc_app(port))
        policy = {
            "rules": [
                {
                    "name": "frontend-calls",
                    "action": "ALLOW",
                    "from": {
                        "principals": [FRONTEND],
                        "request_principals": ["meshca/cluster.local/*"],
                    },
                    "to": {"paths": ALLOWED},
                }
            ]
        }
        orders = rig.sidecar(
            "orders",
            ORDERS,
            app=f"127.0.0.1:{port}",
            inbound={"app_protocol": "grpc", "app_timeout": 30},
            policy=policy,
            jwt=True,
            metrics=True,
        )
        svc = {"endpoints": [inbound_of(orders)], "identity": ORDERS, "protocol": "grpc"}
        front = rig.sidecar(
            "frontend",
            FRONTEND,
            services={AUTHORITY: {**svc, "jwt_audience": "orders"}},
            ca_extra={"bundle_poll": 0.5},  # learns a revocation soon (the last test)
        )
        tokenless = rig.sidecar("tokenless", FRONTEND, services={AUTHORITY: svc})
        intruder = rig.sidecar(
            "intruder", INTRUDER, services={AUTHORITY: {**svc, "jwt_audience": "orders"}}
        )
        yield {
            "rig": rig,
            "app": app,
            "port": port,
            "orders": orders,
            "front": front,
            "tokenless": tokenless,
            "intruder": intruder,
        }
    finally:
        rig.stop()


def chan(env, who="front", **options):
    return gc.channel(outbound_of(env[who]), AUTHORITY, **options)


def app_calls(env) -> dict:
    with gc.channel(f"127.0.0.1:{env['port']}") as ch:
        return gc.stats(ch)["calls"]


def test_unary_with_trailers_and_identity_headers(env):
    with chan(env) as ch:
        reply, call = gc.unary(ch, b"hello over h2")
        seen = gc.whoami(ch, metadata=[("x-custom", "kept")])
    assert reply == b"hello over h2"
    assert ("x-app-trailer", "done") in tuple(call.trailing_metadata())
    xfcc = seen["x-forwarded-client-cert"]
    assert f"URI={FRONTEND}" in xfcc and f"By={ORDERS}" in xfcc
    assert seen["x-custom"] == "kept" and seen.get("traceparent", "").startswith("00-")
    assert seen["authorization"].startswith("Bearer ")  # the JWT-SVID the frontend attached
    line = logged(env["orders"], "inbound", lambda r: r["path"].endswith("/Whoami"))
    assert line[-1]["protocol"] == "grpc" and line[-1]["status"] == 200


def test_server_stream_of_100_mb_keeps_both_sidecars_small(env):
    count, size = 1600, 64 * 1024  # 100 MiB
    pids = {n: env[n].proc.pid for n in ("front", "orders")}
    before = {n: rss_kib(p) for n, p in pids.items()}
    peak = dict(before)
    got = 0
    digest = hashlib.sha256()
    with chan(env) as ch:
        for i, msg in enumerate(gc.server_stream(ch, count, size, timeout=120)):
            assert msg == stream_message(i, size)
            got += len(msg)
            if i % 50 == 0:
                digest.update(msg)
                for n, p in pids.items():
                    peak[n] = max(peak[n], rss_kib(p))
                time.sleep(0.01)  # a client slower than the app: the sidecars must not buffer
    assert got == count * size
    growth = {n: (peak[n] - before[n]) // 1024 for n in pids}
    # Each stream holds at most its windows (1 MiB) and 256 KiB of output per hop.
    assert all(g < 40 for g in growth.values()), f"RSS growth in MiB: {growth}"


def test_client_stream_and_bidi(env):
    chunks = [bytes([i]) * (256 * 1024) for i in range(40)]  # 10 MiB up
    with chan(env) as ch:
        doc = gc.client_stream(ch, iter(chunks))
        assert doc["count"] == 40 and doc["bytes"] == 40 * 256 * 1024
        assert doc["sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()
        # bidi: each message waits for the previous echo (a real conversation)
        echoed: list[bytes] = []
        ready = threading.Event()
        ready.set()

        def talk():
            for i in range(50):
                assert ready.wait(10)
                ready.clear()
                yield b"msg %d" % i

        for reply in gc.bidi(ch, talk()):
            echoed.append(reply)
            ready.set()
    assert echoed == [b"msg %d" % i for i in range(50)]


def test_100_concurrent_calls_share_one_channel_and_one_upstream_connection(env):
    with chan(env) as ch:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            replies = list(pool.map(lambda _: gc.slow(ch, 0.5, timeout=20), range(100)))
    assert replies == [b"late"] * 100
    status, doc = admin_get(env["front"], "/endpoints")
    assert status == 200
    svc = doc["services"][AUTHORITY]
    assert svc["connections"] == 1, svc  # one HTTP/2 connection, multiplexed


def test_a_method_the_policy_does_not_allow_gets_permission_denied(env):
    before = app_calls(env)
    with chan(env) as ch:
        err = gc.fail(ch, "NOT_FOUND")  # /meshtest.Echo/Fail is not in the ALLOW rule
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
    assert "no ALLOW rule matched" in err.details()
    with chan(env, "intruder") as ch:
        with pytest.raises(grpc.RpcError) as info:
            gc.unary(ch, b"x")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert app_calls(env) == before  # the app saw neither


def test_a_call_without_a_jwt_gets_unauthenticated(env):
    before = app_calls(env)
    with chan(env, "tokenless") as ch:
        with pytest.raises(grpc.RpcError) as info:
            gc.unary(ch, b"x")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value
    assert "JWT is required" in info.value.details()
    assert app_calls(env) == before
    refused = logged(env["orders"], "inbound", lambda r: r.get("error") == "jwt_required")
    assert refused[-1]["grpc_status"] == 16


def test_a_deadline_shorter_than_the_app_gives_deadline_exceeded(env):
    with chan(env) as ch:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            gc.slow(ch, 3, timeout=0.5)
        took = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert took < 2.5, took  # not the app's 3 s
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the cancellation reaches the app
        with gc.channel(f"127.0.0.1:{env['port']}") as direct:
            if gc.stats(direct).get("cancelled", {}).get("Slow"):
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the app's Slow call was never cancelled")


def test_a_plain_client_offering_h2_gets_h2(env):
    """A plain mTLS client (openssl) offering h2 is given h2 by a gRPC app's sidecar."""
    rig = env["rig"]
    folder = rig.root / "frontend"
    key, csr = openssl_csr(rig.root, "plain")
    status, enrolled = curl_enroll(rig.ca, csr, mint_token(rig.home, FRONTEND))
    assert status == 200, enrolled
    chain = rig.root / "plain.pem"
    chain.write_text(enrolled["certificate_chain"])
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            inbound_of(env["orders"]),
            "-alpn",
            "h2,http/1.1",
            "-CAfile",
            str(folder / "ca-root.pem"),
            "-cert",
            str(chain),
            "-key",
            str(key),
        ],
        input=b"",
        capture_output=True,
        timeout=20,
    )
    assert b"ALPN protocol: h2" in out.stdout, out.stdout[-2000:]


def test_app_down_gives_unavailable(env):
    env["app"].stop()
    try:
        with chan(env) as ch:
            with pytest.raises(grpc.RpcError) as info:
                gc.unary(ch, b"x", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "app" in info.value.details()
    finally:
        env["app"] = env["rig"].add(start_grpc_app(env["port"]))
    with chan(env) as ch:  # and back
        assert gc.unary(ch, b"again")[0] == b"again"


def test_grpc_calls_are_counted_as_grpc(env):
    lines = logged(env["front"], "outbound", lambda r: r.get("protocol") == "grpc")
    assert all(r["service"] == AUTHORITY for r in lines)
    page = scrape(env["orders"])
    mine = {"reporter": "destination", "source_principal": FRONTEND, "request_protocol": "grpc"}
    assert sample(page, "istio_requests_total", **mine, grpc_response_status="0") >= 100
    # a refusal is HTTP 200 on the wire, with the gRPC status the sidecar gave
    unauthenticated = {"grpc_response_status": "16", "response_flags": "-"}
    assert sample(page, "istio_requests_total", response_code="200", **unauthenticated) >= 1


def test_a_grpc_client_with_a_proxy_tunnels_through_connect(env):
    """grpcio with `grpc.http_proxy` (as with `grpc_proxy`/`https_proxy` in its environment)
    sends CONNECT orders.shop:80; the tunnel carries its h2c, proxied like any call."""
    proxy = "http://" + outbound_of(env["front"])
    with gc.channel(f"{AUTHORITY}:80", enable_http_proxy=1, http_proxy=proxy) as ch:
        reply, _ = gc.unary(ch, b"through a tunnel")
        seen = gc.whoami(ch)
    assert reply == b"through a tunnel"
    assert f"URI={FRONTEND}" in seen["x-forwarded-client-cert"]


def test_an_http1_client_reaches_the_grpc_app_over_http2(env):
    """An HTTP/1.1 request on the outbound to a `grpc` service rides an HTTP/2 stream of the
    shared upstream connection (the HTTP/1.1 engine with an HTTP/2 upstream), to the app
    as HTTP/2 (h2c): a unary call framed by hand gets its answer, twice on one connection.
    (The HTTP/1.1 answer carries no trailers: grpc-status stays on the HTTP/2 side.)"""
    message = b"ping-over-http1"
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    host, port = outbound_of(env["front"]).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as s:
        for _ in range(2):  # twice: a new stream, then a stream of the kept connection
            s.sendall(
                b"POST http://orders.shop/meshtest.Echo/Unary HTTP/1.1\r\n"
                b"Host: orders.shop\r\ncontent-type: application/grpc\r\nte: trailers\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(framed), framed)
            )
            got = b""
            while b"\r\n0\r\n" not in got or not got.endswith(b"\r\n\r\n"):
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), got
            assert b"content-type: application/grpc" in head.lower(), got
            assert message in body, got


def test_revoking_the_app_sidecar_closes_the_outbound_http2_connection(env):
    """Last in this module: it revokes the `orders` sidecar's certificate. The frontend
    closes its shared HTTP/2 connection to orders (a pool of another protocol than
    HTTP/1.1), and a new call is refused: the revoked peer is not dialled again."""
    with chan(env) as ch:  # a live HTTP/2 connection from the frontend's pool
        assert gc.unary(ch, b"before")[0] == b"before"
    status, ident = admin_get(env["orders"], "/identity")
    assert status == 200
    run_meshca("revoke", "--home", str(env["rig"].home), "--serial", ident["serial"])
    front = env["front"]
    deadline = time.monotonic() + 15  # the frontend polls the bundle every 0.5 s
    while time.monotonic() < deadline and "certificate revoked" not in front.stderr:
        time.sleep(0.1)
    assert "connection(s) to orders.shop: certificate revoked" in front.stderr, front.stderr[-3000:]
    with chan(env) as ch, pytest.raises(grpc.RpcError) as refused:
        gc.unary(ch, b"after", timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
