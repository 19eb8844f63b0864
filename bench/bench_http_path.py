"""The HTTP/1.1 path's own cost, in process: µs of CPU per request through the real
inbound and outbound routers and engines, with in-memory transports instead of sockets.

What a socket benchmark cannot separate out: no TLS, no syscalls, no other
process, so what is left is the sidecar's Python per request (parsing callbacks,
routing, header rewriting, the response, the record). A client connection sends
a keep-alive GET as a curl-like client would; the "app" answers as nginx does,
as soon as the request head has gone out. The figures are what the HTTP work
costs on top of a byte pipe, and move with the code rather than with the
machine's load (process CPU time, medians of rounds).

The JWT paths put a bearer ES256 token on each request to an inbound with one issuer
and a policy that allows its request principals: one token reused (the verified-token
cache hits) or a new token on every request (each verified in full).

Then each path one request at a time, twice: as is (warm: what the request path touches
is still in the CPU's caches from the request before), and cold, with `--cold-mib` MiB of
memory written between requests (64 by default: more than this machine's 32 MiB L3
cache), so that the request finds its code and data in main memory: harsher than what a
request that comes alone after other processes ran meets (the c=1 row of bench-peers), an
upper bound that moves with how much memory one request touches, which the warm figure
hides. Wall time per
request, around the request alone (`perf_counter_ns`; a CPU clock is a system call
here), medians: on a quiet machine.

    python bench/bench_http_path.py [--requests N] [--rounds R] [--cold-mib M] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from meshca import pki
from meshca.spiffe import SpiffeId
from sidecar.config import parse_config
from sidecar.engines.base import Limits
from sidecar.engines.http1.downstream import DownstreamConn
from sidecar.engines.http1.upstream import UpstreamConn
from sidecar.identity.creds import Credentials, CredentialStore
from sidecar.identity.trust import TrustBundle, TrustStore
from sidecar.policy.authn import from_config as authn_from_config
from sidecar.policy.holder import PolicyHolder
from sidecar.routing.inbound import InboundRouter
from sidecar.routing.outbound import OutboundRouter
from sidecar.telemetry.sink import Telemetry
from sidecar.telemetry.window import Window
from sidecar.upstream.pool import UpstreamPool

NGINX_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 03 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 3\r\n"
    b"Connection: keep-alive\r\n\r\nok\n"
)
INBOUND_REQUEST = (
    b"GET / HTTP/1.1\r\nHost: api.default\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n"
)
OUTBOUND_REQUEST = INBOUND_REQUEST
ISSUER = "https://idp.bench.local"
API_ID = "spiffe://cluster.local/ns/default/sa/api"
KID = "bench-es256"


def b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


class Tokens:
    """ES256 tokens of one key (a new `sub` and `jti` each), and its JWKS."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.now = int(time.time())
        self.head = b64url(json.dumps({"alg": "ES256", "typ": "JWT", "kid": KID}).encode())

    def token(self, n: int) -> bytes:
        claims = {
            "iss": ISSUER,
            "aud": API_ID,
            "sub": f"user-{n}",
            "iat": self.now,
            "exp": self.now + 3600,
            "jti": f"bench-{n:08d}",
        }
        signing_input = self.head + b"." + b64url(json.dumps(claims).encode())
        r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        return signing_input + b"." + b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def jwks(self) -> dict:
        nums = self.key.public_key().public_numbers()
        x, y = (b64url(v.to_bytes(32, "big")).decode() for v in (nums.x, nums.y))
        return {"keys": [{"kty": "EC", "crv": "P-256", "kid": KID, "x": x, "y": y}]}


class Wire:
    """An in-memory transport: writes go to `on_write`; enough of asyncio's for the engines."""

    def __init__(self, on_write: Callable[[bytes], None], ssl_object: Any = None) -> None:
        self.on_write = on_write
        self.ssl_object = ssl_object
        self.closing = False

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def writelines(self, data: Any) -> None:
        self.on_write(b"".join(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.ssl_object
        if name == "peername":
            return ("127.0.0.1", 40000)
        if name == "sockname":
            return ("127.0.0.1", 15006)
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class PeerCert:
    """The client certificate of a full (not resumed) handshake, as ssl.SSLObject shows it."""

    session_reused = False

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der

    def selected_alpn_protocol(self) -> str | None:
        return None


def app_connect(loop: asyncio.AbstractEventLoop) -> Callable[..., Any]:
    """A pool connector whose connection answers each request head as nginx would."""

    async def connect(pool: UpstreamPool, host: str, port: int) -> UpstreamConn:
        conn = UpstreamConn(pool)

        def on_write(data: bytes) -> None:
            if data.endswith(b"\r\n\r\n"):
                loop.call_soon(conn.data_received, NGINX_ANSWER)

        conn.connection_made(Wire(on_write))  # type: ignore[arg-type]
        return conn

    return connect


def setup(
    folder: Path, tokens: Tokens
) -> tuple[InboundRouter, InboundRouter, OutboundRouter, bytes]:
    now = dt.datetime.now(dt.UTC)
    root_key = pki.new_key()
    root = pki.build_root(root_key, now)
    int_key = pki.new_key()
    inter = pki.build_intermediate(int_key, root, root_key, now)

    def leaf(sid: str) -> tuple[Credentials, bytes]:
        key = pki.new_key()
        cert = pki.build_leaf(key.public_key(), SpiffeId.parse(sid), inter, int_key, now)
        creds = Credentials.build(
            pki.key_pem(key),
            pki.pem_join([cert, inter]),
            pki.pem_join([root]),
            "cluster.local",
            now,
        )
        return creds, cert.public_bytes(serialization.Encoding.DER)

    (folder / "ca-root.pem").write_text(pki.pem_join([root]))
    (folder / "token").write_text("x")
    api = API_ID
    (folder / "jwks.json").write_text(json.dumps(tokens.jwks()))
    rule = {"name": "bench-jwt", "action": "ALLOW", "from": {"request_principals": [f"{ISSUER}/*"]}}
    (folder / "policy.json").write_text(json.dumps({"rules": [rule]}))
    doc = {
        "ca": {"url": "https://ca:8443", "bundle": "ca-root.pem", "token_file": "token"},
        "inbound": {"listen": "127.0.0.1:0", "app": "127.0.0.1:8080"},
        "outbound": {
            "listen": "127.0.0.1:0",
            "services": {"api.default": {"endpoints": ["127.0.0.1:15006"], "identity": api}},
        },
        "access_log": {"mode": "off"},
    }
    cfg = parse_config(doc, folder / "sidecar.yaml")
    jwt_doc = {
        **doc,
        "jwt": {
            "issuers": [
                {
                    "issuer": ISSUER,
                    "audiences": [api],
                    "jwks_file": str(folder / "jwks.json"),
                    "algorithms": ["ES256"],
                }
            ]
        },
        "policy": {"file": str(folder / "policy.json")},
    }
    jwt_cfg = parse_config(jwt_doc, folder / "sidecar.yaml")
    assert jwt_cfg.jwt is not None
    trust = TrustStore(
        TrustBundle.check((folder / "ca-root.pem").read_text(), now, "bench"), "cluster.local"
    )
    api_creds, _ = leaf(api)
    web_creds, web_der = leaf("spiffe://cluster.local/ns/default/sa/web")
    in_store = CredentialStore(trust)
    in_store.publish(api_creds)
    out_store = CredentialStore(trust)
    out_store.publish(web_creds)
    assert cfg.inbound is not None and cfg.outbound is not None
    inbound = InboundRouter(cfg.inbound, in_store)
    authn = authn_from_config(jwt_cfg.jwt, lambda: None)  # type: ignore[arg-type,return-value]
    policy = PolicyHolder(jwt_cfg.policy, (ISSUER,))
    assert jwt_cfg.inbound is not None
    inbound_jwt = InboundRouter(jwt_cfg.inbound, in_store, authn, policy)
    outbound = OutboundRouter(cfg.outbound, out_store)
    return inbound, inbound_jwt, outbound, web_der


async def drive(
    make_conn: Callable[[Wire], DownstreamConn],
    request: bytes | Callable[[], bytes],
    n: int,
    conns: int,
) -> float:
    """`n` requests over `conns` keep-alive client connections; CPU seconds spent.
    `request`: the request's bytes, or what makes each request's."""
    next_request = request if callable(request) else lambda: request
    loop = asyncio.get_running_loop()
    left = n
    done = loop.create_future()
    active = conns

    def client() -> None:
        holder: list[DownstreamConn] = []

        def on_write(data: bytes) -> None:
            nonlocal left, active
            if not data.endswith(b"ok\n"):
                raise SystemExit(f"unexpected answer: {data[:200]!r}")
            left -= 1
            if left > 0:
                loop.call_soon(holder[0].data_received, next_request())
            else:
                active -= 1
                if active == 0 and not done.done():
                    done.set_result(None)

        conn = make_conn(Wire(on_write))
        holder.append(conn)
        loop.call_soon(conn.data_received, next_request())

    t0 = time.process_time()
    for _ in range(conns):
        client()
    await done
    return time.process_time() - t0


async def drive_alone(
    make_conn: Callable[[Wire], DownstreamConn],
    request: bytes | Callable[[], bytes],
    n: int,
    evict: bytearray | None,
) -> list[int]:
    """`n` requests on one connection, one at a time, `evict` written over before each
    (outside the timing); nanoseconds of each, from its bytes arriving to its answer."""
    next_request = request if callable(request) else lambda: request
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    samples: list[int] = []
    started = 0
    ones = b"\x01" * (len(evict) // 64) if evict is not None else b""

    def start() -> None:
        nonlocal started
        if evict is not None:
            evict[::64] = ones  # one byte per 64-byte cache line
        started = time.perf_counter_ns()
        conn.data_received(next_request())

    def on_write(data: bytes) -> None:
        samples.append(time.perf_counter_ns() - started)
        if not data.endswith(b"ok\n"):
            raise SystemExit(f"unexpected answer: {data[:200]!r}")
        if len(samples) < n:
            loop.call_soon(start)
        elif not done.done():
            done.set_result(None)

    conn = make_conn(Wire(on_write))
    loop.call_soon(start)
    await done
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2000, help="requests per path before measuring")
    ap.add_argument("--profile", action="store_true", help="cProfile one round of each path")
    ap.add_argument(
        "--cold-mib",
        type=int,
        default=64,
        help="MiB written between requests for the cold figures (0: no cold figures)",
    )
    ap.add_argument("--alone", type=int, default=2000, help="requests per path, one at a time")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()  # the JWKS file is read while the bench runs
    tokens = Tokens()
    inbound, inbound_jwt, outbound, web_der = setup(Path(tmp.name), tokens)
    alone: dict[str, tuple[float, float]] = {}
    drives = 1 + args.rounds + (1 if args.profile else 0)
    count = args.warmup + args.requests * (drives - 1) + args.conns * drives
    count += (2 * args.alone + 2) if args.cold_mib else 0  # the warm and cold runs alone
    print(f"signing {count} tokens ...", file=sys.stderr, flush=True)
    fresh = iter(
        [
            INBOUND_REQUEST + b"authorization: Bearer %s\r\n\r\n" % tokens.token(n)
            for n in range(count)
        ]
    )
    one = INBOUND_REQUEST + b"authorization: Bearer %s\r\n\r\n" % tokens.token(count)

    async def run() -> dict[str, list[float]]:
        loop = asyncio.get_running_loop()
        inbound.pool._connect = app_connect(loop)
        inbound_jwt.pool._connect = app_connect(loop)
        for pool in outbound.pools.values():
            pool._connect = app_connect(loop)
        window = Window(time.monotonic)
        sink = Telemetry(None, None, window, None)
        limits = Limits()
        peer = PeerCert(web_der)

        def make_in(wire: Wire) -> DownstreamConn:
            wire.ssl_object = peer
            conn = DownstreamConn(inbound, limits, sink)
            conn.connection_made(wire)  # type: ignore[arg-type]
            return conn

        def make_in_jwt(wire: Wire) -> DownstreamConn:
            wire.ssl_object = peer
            conn = DownstreamConn(inbound_jwt, limits, sink)
            conn.connection_made(wire)  # type: ignore[arg-type]
            return conn

        def make_out(wire: Wire) -> DownstreamConn:
            conn = DownstreamConn(outbound, limits, sink)
            conn.connection_made(wire)  # type: ignore[arg-type]
            return conn

        paths = {
            "inbound (mTLS peer -> app)": (make_in, INBOUND_REQUEST + b"\r\n"),
            "outbound (app -> service)": (make_out, OUTBOUND_REQUEST + b"\r\n"),
            "inbound, JWT reused": (make_in_jwt, one),
            "inbound, a new JWT each": (make_in_jwt, fresh.__next__),
        }
        got: dict[str, list[float]] = {k: [] for k in paths}
        for make, req in paths.values():  # warm-up
            await drive(make, req, args.warmup, args.conns)
        if args.profile:
            import cProfile
            import pstats

            for name, (make, req) in paths.items():
                prof = cProfile.Profile()
                prof.enable()
                await drive(make, req, args.requests, args.conns)
                prof.disable()
                print(f"\n{name}: {args.requests} requests")
                pstats.Stats(prof).sort_stats("tottime").print_stats(60)
        for _ in range(args.rounds):
            for name, (make, req) in paths.items():
                cpu = await drive(make, req, args.requests, args.conns)
                got[name].append(cpu * 1e6 / args.requests)
        if args.cold_mib:
            evict = bytearray(args.cold_mib << 20)
            for name, (make, req) in paths.items():
                warm = await drive_alone(make, req, args.alone, None)
                cold = await drive_alone(make, req, args.alone, evict)
                alone[name] = (statistics.median(warm) / 1e3, statistics.median(cold) / 1e3)
        return got

    try:
        try:
            import uvloop

            got = uvloop.run(run())
        except ImportError:
            got = asyncio.run(run())
    finally:
        tmp.cleanup()
    print(f"{'path':32s} {'µs CPU/request (median)':>24s}  rounds")
    for name, vals in got.items():
        print(f"{name:32s} {statistics.median(vals):24.2f}  {' '.join(f'{v:.2f}' for v in vals)}")
    if alone:
        print(
            f"\none request at a time, µs per request (median of {args.alone}): warm, and cold"
            f" ({args.cold_mib} MiB written between requests)"
        )
        for name, (warm_us, cold_us) in alone.items():
            print(f"{name:32s} {warm_us:10.2f} {cold_us:10.2f}  (x{cold_us / warm_us:.1f})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
