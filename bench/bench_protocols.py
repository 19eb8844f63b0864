"""`make bench-protocols`: gRPC unary calls and opaque TCP throughput through both sidecars,
against the same app called directly.

Two paths for each protocol, interleaved round by round, medians printed with the
ratio (both sidecars / direct) and the sidecars' CPU per unit of work (from
/proc/PID/stat, utime + stime of the two sidecars on the path): on a busy
two-core machine the CPU per request or per GB is steadier than the rate.

- gRPC: `h2load` (Debian's nghttp2-client, C) sends unary calls of
  `/meshtest.Echo/Unary` (a 5-byte gRPC prefix + the message, `content-type:
  application/grpc`, `te: trailers`) with h2c prior knowledge, `-c` connections
  of `-m` concurrent streams each; through the sidecars it dials the frontend's
  outbound listener with `:authority` set to the service name (client -> outbound
  h2c -> mTLS, ALPN meshca-h2 -> inbound -> app h2c). p50/p99 come from h2load's
  per-request log (h2load gives no percentiles). h2load only sees HTTP statuses, not
  `grpc-status`, so every run first makes real grpcio calls directly and through the
  sidecars (5 sizes up to 60 kB: each must echo, with the app's trailer), counts the
  calls h2load saw fail, and checks afterwards that no access-log line of the
  sidecars records an error (and that the apps logged none).

  The app (`--app`) must not be what bounds the direct path, or the ratio measures
  the app. Both Python gRPC servers at hand spend about 420 us of CPU per call on
  this machine and saturate a core near 2,300 calls/s: grpcio's (tests/grpc_app.py,
  `--app grpcio`) and an echo on the `h2` library (`--app h2`, the HTTP/2 the sidecar
  uses). The default (`--app frames`) is an echo that works on HTTP/2 frames and never
  decodes a header block (`FrameEcho`): about 13 us per call, so the direct path is
  bound by h2load and the loopback, as with a real server in a compiled language.
  Every app answers with the request's message, `grpc-status: 0` and the
  `x-app-trailer: done` of tests/grpc_app.py. The output says, for each path,
  how much of a core the app, the sidecars and h2load used, and which one bounds it.

- TCP: the app is a sink (a thread per connection) that reads an 8-byte length,
  that many bytes, and answers the count it got; the client (threads here, 1 MiB
  `sendall`) pushes `--mib` MiB over one connection, then split over 8, directly
  and through `client -> the frontend's tcp service port -> mTLS (ALPN
  meshca-tcp) -> the backend sidecar (app_protocol: tcp) -> sink`. The count is
  answered before the client closes because a TLS pipe cannot pass a half-close
  (sidecar/engines/tcp/pipe.py). MB are 10^6 bytes; the time includes the
  connection (and mTLS handshake) setup.

Everything is on 127.0.0.1 and shares this machine's two cores. The sidecars'
access logs go to files; their lines other than access-log lines, and access-log
lines with an error, are reported at the end.

    .venv/bin/python bench/bench_protocols.py [--rounds 3] [--quick] [--app frames|h2|grpcio]
        [-n CALLS] [-c CONNS] [-m STREAMS] [--size BYTES] [--mib MIB] [--profile DIR] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import socketserver
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from meshca.authority import init_ca

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/meshtest.Echo/Unary"
GRPC_SERVICE = "echo.grpc"  # the outbound service names (and the gRPC :authority)
TCP_SERVICE = "sink.tcp"
BACKEND = "spiffe://cluster.local/ns/bench/sa/backend"
FRONTEND = "spiffe://cluster.local/ns/bench/sa/frontend"
CHUNK = 1 << 20  # the TCP client's and the sink's buffer


# ---------------------------------------------------------------------------- apps


# HTTP/2 (RFC 9113) frame types and flags the frame-level echo uses.
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
BIG_WINDOW = 1 << 30
# Header blocks in HPACK (RFC 7541) that never touch a dynamic table: `:status: 200` is
# static entry 8 (indexed, 0x88); `content-type` (static 31) and the trailers are literals
# without indexing (6.2.2), their lengths under 127.
RESPONSE_HEAD = b"\x88\x0f\x10\x10application/grpc"
TRAILERS = b"\x00\x0bgrpc-status\x010\x00\x0dx-app-trailer\x04done"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + struct.pack("!BBI", kind, flags, sid) + payload


class FrameEcho(asyncio.Protocol):
    """A gRPC unary echo that works on HTTP/2 frames: it answers every request stream with
    the bytes of its DATA (a unary request's message, prefix included) and grpc-status 0.

    It never decodes a header block (no HPACK state: every call is answered alike, the
    path unread), acknowledges SETTINGS and PING, opens its receive windows wide, and
    keeps to the peer's send windows and frame size; a reply that does not fit them gets
    RESOURCE_EXHAUSTED and a line on stdout, so the bench can tell.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""
        self.preface = True
        self.streams: dict[int, bytearray] = {}
        self.credit: dict[int, int] = {}  # WINDOW_UPDATEs per stream
        self.initial = 65535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = 16384
        self.window = 65535  # the connection's send window
        self.unacked = 0  # DATA bytes received, not yet given back
        transport.write(  # type: ignore[attr-defined]
            frame(SETTINGS, 0, 0, struct.pack("!HI", 4, BIG_WINDOW))
            + frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", BIG_WINDOW - 65535))
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        if self.preface:
            if len(buf) < 24:
                self.buf = buf
                return
            buf, self.preface = buf[24:], False
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            kind, flags, sid = struct.unpack_from("!BBI", buf, pos + 3)
            sid &= 0x7FFFFFFF
            payload = buf[pos + 9 : pos + 9 + length]
            pos += 9 + length
            if kind == DATA:
                self.unacked += length
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                self.streams.setdefault(sid, bytearray()).extend(payload)
            elif kind == HEADERS:
                self.streams.setdefault(sid, bytearray())
            elif kind == SETTINGS and not flags & ACK:
                for i in range(0, length, 6):
                    key, value = struct.unpack_from("!HI", payload, i)
                    if key == 4:
                        self.initial = value
                    elif key == 5:
                        self.max_frame = value
                out.append(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                out.append(frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE:
                grant = struct.unpack("!I", payload)[0] & 0x7FFFFFFF
                if sid == 0:
                    self.window += grant
                else:
                    self.credit[sid] = self.credit.get(sid, 0) + grant
            elif kind == RST_STREAM:
                self.streams.pop(sid, None)
                self.credit.pop(sid, None)
            elif kind == GOAWAY:
                self.transport.close()
                return
            if kind in (DATA, HEADERS) and flags & END_STREAM and sid in self.streams:
                out.append(self.answer(sid, self.streams.pop(sid)))
        self.buf = buf[pos:]
        if self.unacked > BIG_WINDOW // 2:
            out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", self.unacked)))
            self.unacked = 0
        if out:
            self.transport.write(b"".join(out))

    def answer(self, sid: int, body: bytearray) -> bytes:
        window = self.initial + self.credit.pop(sid, 0)
        if len(body) > min(window, self.window):
            print(f"error: stream {sid}: {len(body)} bytes, send window {window}", flush=True)
            refusal = b"\x00\x0bgrpc-status\x018"  # RESOURCE_EXHAUSTED, trailers-only
            return frame(HEADERS, END_HEADERS | END_STREAM, sid, RESPONSE_HEAD + refusal)
        self.window -= len(body)
        step = self.max_frame
        data = [frame(DATA, 0, sid, body[i : i + step]) for i in range(0, len(body), step)]
        return b"".join(
            [frame(HEADERS, END_HEADERS, sid, RESPONSE_HEAD), *data]
            + [frame(HEADERS, END_HEADERS | END_STREAM, sid, TRAILERS)]
        )


class LibraryEcho(asyncio.Protocol):
    """The same echo with the `h2` library (the sidecar's HTTP/2): calls of other paths
    than METHOD get UNIMPLEMENTED."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        import h2.config
        import h2.connection

        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.streams: dict[int, tuple[bytes, bytearray]] = {}
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events
        import h2.exceptions

        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(self.conn.data_to_send())
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                path = dict(ev.headers).get(b":path", b"")
                self.streams[ev.stream_id] = (path, bytearray())
            elif isinstance(ev, h2.events.DataReceived):
                self.streams[ev.stream_id][1].extend(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                self.answer(ev.stream_id, *self.streams.pop(ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                self.streams.pop(ev.stream_id, None)
        self.transport.write(self.conn.data_to_send())

    def answer(self, sid: int, path: bytes, body: bytearray) -> None:
        head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        self.conn.send_headers(sid, head)
        if path != METHOD.encode():
            status = b"12"  # UNIMPLEMENTED
        elif len(body) > self.conn.local_flow_control_window(sid):
            print(f"error: stream {sid}: {len(body)} bytes do not fit the window", flush=True)
            status = b"8"  # RESOURCE_EXHAUSTED
        else:
            status = b"0"
            step = self.conn.max_outbound_frame_size
            for i in range(0, len(body), step):
                self.conn.send_data(sid, bytes(body[i : i + step]))
        trailers = [(b"grpc-status", status), (b"x-app-trailer", b"done")]
        self.conn.send_headers(sid, trailers, end_stream=True)


def serve_grpc(listen: str, proto: type[asyncio.Protocol]) -> None:
    """Serve `proto` (h2c, prior knowledge) on `listen` until SIGTERM."""

    async def main() -> None:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.get_running_loop().create_server(proto, host, int(port))
        bound = server.sockets[0].getsockname()
        print(f"h2c listening on http://{bound[0]}:{bound[1]}", flush=True)
        await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


class SinkHandler(socketserver.BaseRequestHandler):
    """One connection: an 8-byte length, that many bytes (discarded), answered with the count."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        head = recv_exactly(sock, 8)
        if head is None:
            return
        want = struct.unpack("!Q", head)[0]
        buf = memoryview(bytearray(CHUNK))
        got = 0
        while got < want:
            n = sock.recv_into(buf, min(CHUNK, want - got))
            if n == 0:
                break
            got += n
        sock.sendall(struct.pack("!Q", got))


def serve_sink(listen: str) -> None:
    host, port = listen.rsplit(":", 1)
    socketserver.ThreadingTCPServer.daemon_threads = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer((host, int(port)), SinkHandler) as server:
        bound = server.server_address
        print(f"sink listening on tcp://{bound[0]}:{bound[1]}", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server.serve_forever()


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    out = b""
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            return None
        out += part
    return out


# ---------------------------------------------------------------------------- processes


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        args,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(log: Path, pattern: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text() if log.exists() else "")
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {pattern!r} in {log}:\n{log.read_text()}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy so far (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


class Mesh:
    """A CA and the processes started around it; `stop` ends them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.py = sys.executable
        self.home = tmp / "ca"

    def start_ca(self) -> None:
        init_ca(self.home)
        self.start(
            "ca",
            [self.py, "-m", "meshca", "--log-level", "WARNING", "serve"]
            + ["--home", str(self.home), "--listen", "127.0.0.1:0"],
        )
        self.ca_url = wait_for(self.tmp / "ca.log", r"serving on (https://\S+)")
        self.bundle = self.meshca("bundle", "--home", str(self.home))

    def meshca(self, *args: str) -> str:
        return subprocess.run(
            [self.py, "-m", "meshca", *args], capture_output=True, text=True, check=True
        ).stdout

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        p = spawn(args, self.tmp / f"{name}.log")
        self.procs.append(p)
        return p

    def app(self, name: str, args: list[str]) -> tuple[subprocess.Popen, str]:
        """Start an app that prints `... listening on SCHEME://HOST:PORT`; its `HOST:PORT`."""
        p = self.start(name, args)
        return p, wait_for(self.tmp / f"{name}.log", r"listening on \S+://(\S+)")

    def sidecar(
        self, name: str, spiffe_id: str, extra: dict, listeners: tuple[str, ...]
    ) -> tuple[subprocess.Popen, dict[str, str]]:
        """Enroll and start a sidecar; `HOST:PORT` of each of `listeners`, once it is ready."""
        d = self.tmp / name
        d.mkdir()
        (d / "ca-root.pem").write_text(self.bundle)
        token = self.meshca("token", "--home", str(self.home), "--spiffe-id", spiffe_id)
        (d / "token").write_text(token)
        doc = {
            "ca": {"url": self.ca_url, "bundle": "ca-root.pem", "token_file": "token"},
            "admin": {"listen": "127.0.0.1:0"},
            "health": {"listen": "127.0.0.1:0"},
            **extra,
        }
        (d / "sidecar.yaml").write_text(yaml.safe_dump(doc))
        p = self.start(
            f"{name}/out",
            [self.py, "-m", "sidecar", "--log-level", "WARNING", "run"]
            + ["--config", str(d / "sidecar.yaml")],
        )
        urls = {
            k: wait_for(d / "out.log", rf"{re.escape(k)} listening on \S+://(\S+)")
            for k in ("admin", *listeners)
        }
        for _ in range(400):
            try:
                urllib.request.urlopen(f"http://{urls['admin']}/ready")
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit(f"sidecar {name} never got ready:\n{(d / 'out.log').read_text()}")
        return p, urls

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------------------- load


def run_h2load(
    url: str, n: int, c: int, m: int, body: Path, log: Path, authority: str | None
) -> dict:
    """`n` unary calls by h2load; req/s, p50/p99 (ms, from its per-request log), failures."""
    cmd = ["h2load", "-n", str(n), "-c", str(c), "-m", str(m), "-d", str(body)]
    cmd += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    if authority:
        cmd += ["-H", f":authority: {authority}"]
    cmd += ["--log-file", str(log), url]
    log.unlink(missing_ok=True)  # h2load appends to it
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    text = out.stdout
    done = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total.*?(\d+) succeeded, (\d+) failed", text)
    if out.returncode != 0 or not done or not counts:
        raise SystemExit(f"h2load failed on {url}: {out.stderr}\n{text}")
    lat, statuses = [], {}
    for line in log.read_text().splitlines():
        _, status, us = line.split("\t")
        lat.append(int(us) / 1000)
        statuses[status] = statuses.get(status, 0) + 1
    lat.sort()
    return {
        "rps": float(done.group(1)),
        "p50": lat[len(lat) // 2] if lat else float("nan"),
        "p99": lat[min(len(lat) - 1, len(lat) * 99 // 100)] if lat else float("nan"),
        "failed": int(counts.group(1)) - int(counts.group(2)),
        "statuses": statuses,
        "h2load_us": cpu * 1e6 / n,
    }


def push(addr: str, nbytes: int, conns: int) -> float:
    """Send `nbytes` to the sink over `conns` connections at once; the seconds it took,
    once the sink has counted every byte."""
    host, port = addr.rsplit(":", 1)
    data = memoryview(os.urandom(CHUNK))
    share = [nbytes // conns + (i < nbytes % conns) for i in range(conns)]
    errors: list[str] = []

    def one(n: int) -> None:
        try:
            with socket.create_connection((host, int(port)), timeout=120) as s:
                s.sendall(struct.pack("!Q", n))
                left = n
                while left:
                    k = min(CHUNK, left)
                    s.sendall(data[:k])
                    left -= k
                got = recv_exactly(s, 8)
            if got is None or struct.unpack("!Q", got)[0] != n:
                counted = "nothing" if got is None else struct.unpack("!Q", got)[0]
                errors.append(f"sent {n} bytes to {addr}, the sink counted {counted}")
        except OSError as e:
            errors.append(f"{addr}: {e}")

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in share]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise SystemExit("TCP push failed: " + "; ".join(errors))
    return took


def grpc_check(target: str, authority: str | None) -> str | None:
    """A few real grpcio calls of METHOD; None when all echo with the app's trailer."""
    import grpc

    opts = [("grpc.enable_http_proxy", 0), ("grpc.use_local_subchannel_pool", 1)]
    if authority:
        opts.append(("grpc.default_authority", authority))
    with grpc.insecure_channel(target, options=opts) as ch:
        call = ch.unary_unary(METHOD)
        for i, size in enumerate((0, 1, 100, 10_000, 60_000)):
            msg = bytes([i + 1]) * size
            try:
                reply, info = call.with_call(msg, timeout=10)
            except grpc.RpcError as e:
                return f"{target} ({authority}): {e.code().name} {e.details()}"
            if reply != msg:
                return f"{target} ({authority}): wrong reply of {len(reply)} bytes for {size}"
            if ("x-app-trailer", "done") not in tuple(info.trailing_metadata() or ()):
                return f"{target} ({authority}): no x-app-trailer in {info.trailing_metadata()}"
    return None


def log_problems(log: Path) -> tuple[int, list[str]]:
    """A sidecar log: how many access-log lines, and the lines that tell of a problem (a
    non-200 access-log line, one with an error, anything that is not an access-log line)."""
    lines, bad = 0, []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith('{"ts"'):
            lines += 1
            doc = json.loads(line)
            if doc.get("status") != 200 or "error" in doc:
                bad.append(line)
        elif line.strip() and " listening on " not in line:
            bad.append(line)
    return lines, bad


def profile(
    out: Path, what: str, procs: list[tuple[str, subprocess.Popen]], load: Callable[[], object]
) -> None:
    """Record `procs` with py-spy for 8 s (raw, for flame graphs) while `load` runs again
    and again; the files are OUT/WHAT-NAME.txt."""
    out.mkdir(parents=True, exist_ok=True)
    spies = [
        subprocess.Popen(
            ["py-spy", "record", "--format", "raw", "-r", "200", "-d", "8"]
            + ["-o", str(out / f"{what}-{name}.txt"), "-p", str(p.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, p in procs
    ]
    while any(spy.poll() is None for spy in spies):
        load()
    print(f"py-spy: {what} profiles in {out}", flush=True)


def median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


# ---------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small runs while developing")
    ap.add_argument("-n", type=int, help="gRPC calls per path per round (20000; quick 3000)")
    ap.add_argument("-c", type=int, default=4, help="h2load connections (default 4)")
    ap.add_argument("-m", type=int, default=8, help="concurrent streams per connection (8)")
    ap.add_argument("--size", type=int, default=128, help="gRPC message bytes (default 128)")
    ap.add_argument("--mib", type=int, help="MiB pushed per TCP row and round (256; quick 64)")
    ap.add_argument(
        "--app",
        choices=("frames", "h2", "grpcio"),
        default="frames",
        help="the gRPC app: a frame-level echo (default), one on the h2 library, grpcio's",
    )
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="first record the sidecars with py-spy (if installed) under gRPC, then TCP load",
    )
    ap.add_argument("--keep", action="store_true", help="keep the logs (their folder is printed)")
    ap.add_argument("--serve", choices=("frames", "h2", "sink"), help=argparse.SUPPRESS)
    ap.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve in ("frames", "h2"):
        return serve_grpc(args.listen, FrameEcho if args.serve == "frames" else LibraryEcho)
    if args.serve == "sink":
        return serve_sink(args.listen)
    n = args.n or (3000 if args.quick else 20000)
    mib = args.mib or (64 if args.quick else 256)
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client (make bench does this)")

    python = os.path.relpath(sys.executable)
    print("$ " + shlex.join([python if not python.startswith("..") else sys.executable, *sys.argv]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as on Ctrl-C
    tmp = Path(tempfile.mkdtemp(prefix="meshca-bench-protocols-"))
    mesh = Mesh(tmp)
    try:
        mesh.start_ca()
        me = [sys.executable, str(Path(__file__).resolve())]
        if args.app != "grpcio":
            app, grpc_app = mesh.app("app-grpc", [*me, "--serve", args.app])
        else:
            grpcio_app = [sys.executable, str(ROOT / "tests" / "grpc_app.py")]
            app, grpc_app = mesh.app("app-grpc", [*grpcio_app, "--listen", "127.0.0.1:0"])
        sinkp, sink = mesh.app("app-sink", [*me, "--serve", "sink"])

        bgrpc, bg_urls = mesh.sidecar(
            "backend-grpc",
            BACKEND,
            {"inbound": {"listen": "127.0.0.1:0", "app": grpc_app, "app_protocol": "grpc"}},
            ("inbound",),
        )
        btcp, bt_urls = mesh.sidecar(
            "backend-tcp",
            BACKEND,
            {"inbound": {"listen": "127.0.0.1:0", "app": sink, "app_protocol": "tcp"}},
            ("inbound",),
        )
        services = {
            GRPC_SERVICE: {
                "endpoints": [bg_urls["inbound"]],
                "identity": BACKEND,
                "protocol": "grpc",
            },
            TCP_SERVICE: {
                "endpoints": [bt_urls["inbound"]],
                "identity": BACKEND,
                "protocol": "tcp",
                "listen": "127.0.0.1:0",
            },
        }
        front, f_urls = mesh.sidecar(
            "frontend",
            FRONTEND,
            {"outbound": {"listen": "127.0.0.1:0", "services": services}},
            ("outbound", TCP_SERVICE),
        )

        # Correctness once per run: real gRPC calls must echo, directly and through both.
        for target, authority in ((grpc_app, None), (f_urls["outbound"], GRPC_SERVICE)):
            problem = grpc_check(target, authority)
            if problem:
                raise SystemExit(f"gRPC check failed: {problem}")
        print("grpcio check: 5 unary calls echoed, directly and through both sidecars")

        body = tmp / "call.bin"
        body.write_bytes(b"\0" + struct.pack("!I", args.size) + os.urandom(args.size))
        grpc_paths = {
            "direct (app)": (f"http://{grpc_app}{METHOD}", None, []),
            "both sidecars": (
                f"http://{f_urls['outbound']}{METHOD}",
                GRPC_SERVICE,
                [front.pid, bgrpc.pid],
            ),
        }
        tcp_paths = {
            "direct (app)": (sink, []),
            "both sidecars": (f_urls[TCP_SERVICE], [front.pid, btcp.pid]),
        }
        for url, authority, _ in grpc_paths.values():  # warm-up: connections, caches
            run_h2load(url, min(n, 2000), args.c, args.m, body, tmp / "h2load.log", authority)
        for addr, _ in tcp_paths.values():
            push(addr, 8 << 20, 1)

        if args.profile and shutil.which("py-spy"):
            url, authority, _ = grpc_paths["both sidecars"]
            addr, _ = tcp_paths["both sidecars"]
            loads = {
                "grpc": (
                    lambda: run_h2load(
                        url, 2000, args.c, args.m, body, tmp / "h2load.log", authority
                    ),
                    [("frontend", front), ("backend", bgrpc)],
                ),
                "tcp": (lambda: push(addr, 64 << 20, 1), [("frontend", front), ("backend", btcp)]),
            }
            for what, (load, procs) in loads.items():
                profile(Path(args.profile), what, procs, load)
        grpc_results: dict[str, list[dict]] = {k: [] for k in grpc_paths}
        tcp_results: dict[tuple[str, int], list[dict]] = {
            (k, conns): [] for conns in (1, 8) for k in tcp_paths
        }
        nbytes = mib << 20
        for rnd in range(args.rounds):
            for name, (url, authority, pids) in grpc_paths.items():
                cpu0, app0, all0 = cpu_seconds(pids), cpu_seconds([app.pid]), machine_busy()
                t0 = time.perf_counter()
                r = run_h2load(url, n, args.c, args.m, body, tmp / "h2load.log", authority)
                wall = time.perf_counter() - t0
                r["sidecars_us"] = (cpu_seconds(pids) - cpu0) * 1e6 / n
                r["app_us"] = (cpu_seconds([app.pid]) - app0) * 1e6 / n
                ours = (r["sidecars_us"] + r["app_us"] + r["h2load_us"]) * n / 1e6
                r["others"] = max(0.0, (machine_busy() - all0 - ours) / wall)
                grpc_results[name].append(r)
                print(
                    f"round {rnd + 1} gRPC {name:14} {r['rps']:8.0f} calls/s  "
                    f"p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  CPU us/call: "
                    f"sidecars {r['sidecars_us']:4.0f}, app {r['app_us']:4.0f}, "
                    f"h2load {r['h2load_us']:3.0f}  failed {r['failed']}  "
                    f"(other work: {r['others']:.2f} cores)",
                    flush=True,
                )
            for conns in (1, 8):
                for name, (addr, pids) in tcp_paths.items():
                    cpu0, sink0 = cpu_seconds(pids), cpu_seconds([sinkp.pid])
                    me0, all0 = time.process_time(), machine_busy()
                    took = push(addr, nbytes, conns)
                    gb = nbytes / 1e9
                    r = {
                        "mbs": nbytes / took / 1e6,
                        "cpu_gb": (cpu_seconds(pids) - cpu0) / gb,
                        "sink_gb": (cpu_seconds([sinkp.pid]) - sink0) / gb,
                        "client_gb": (time.process_time() - me0) / gb,
                    }
                    ours = (r["cpu_gb"] + r["sink_gb"] + r["client_gb"]) * gb
                    r["others"] = max(0.0, (machine_busy() - all0 - ours) / took)
                    tcp_results[(name, conns)].append(r)
                    print(
                        f"round {rnd + 1} TCP x{conns} {name:14} {r['mbs']:8.0f} MB/s  "
                        f"CPU s/GB: sidecars {r['cpu_gb']:5.2f}, sink {r['sink_gb']:4.2f}, "
                        f"client {r['client_gb']:4.2f}  (other work: {r['others']:.2f} cores)",
                        flush=True,
                    )

        app_name = {
            "frames": "frame-level echo (this file)",
            "h2": "echo on the h2 library (this file)",
            "grpcio": "grpcio (tests/grpc_app.py)",
        }[args.app]
        print(
            f"\n{args.rounds} rounds, medians. gRPC: {n} unary calls of {args.size} bytes per "
            f"path and round, h2load -c {args.c} -m {args.m}; app: {app_name}\n"
        )
        print(f"{'':46} {'CPU us/call':^22}")
        print(
            f"{'gRPC unary':22} {'calls/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'sidecars':>8} {'app':>6} {'h2load':>6} {'failed':>7}"
        )
        direct = median(grpc_results["direct (app)"], "rps")
        for name, rs in grpc_results.items():
            rps = median(rs, "rps")
            cpu = f"{median(rs, 'sidecars_us'):8.0f}" if grpc_paths[name][2] else f"{'-':>8}"
            print(
                f"{name:22} {rps:8.0f} {rps / direct:6.2f} {median(rs, 'p50'):7.2f} "
                f"{median(rs, 'p99'):7.2f} {cpu} {median(rs, 'app_us'):6.0f} "
                f"{median(rs, 'h2load_us'):6.0f} {sum(r['failed'] for r in rs):7d}"
            )
        print()
        for name, rs in grpc_results.items():
            rps = median(rs, "rps")
            cores = {k: median(rs, f"{k}_us") * rps / 1e6 for k in ("sidecars", "app", "h2load")}
            others = median(rs, "others")
            if cores["app"] > 0.8:
                what = "the app bounds this path"
            elif cores["sidecars"] > 1.4:
                what = "the sidecars' CPU bounds this path"
            elif sum(cores.values()) + others > 1.6:
                what = "the two cores, shared with other work, bound this path"
            else:
                what = "no process is saturated: they wait on each other"
            used = ", ".join(f"{k} {v:.2f}" for k, v in cores.items())
            print(f"{name}: cores used: {used}, other work {others:.2f}: {what}")
        print(
            f"\nTCP, {mib} MiB per row and round, one way (MB = 10^6 bytes)\n\n"
            f"{'':38} {'CPU s/GB':^20}\n"
            f"{'TCP':22} {'MB/s':>8} {'ratio':>6} {'sidecars':>8} {'sink':>5} {'client':>6}"
        )
        for conns in (1, 8):
            direct = median(tcp_results[("direct (app)", conns)], "mbs")
            for name, (_, pids) in tcp_paths.items():
                rs = tcp_results[(name, conns)]
                mbs = median(rs, "mbs")
                cpu = f"{median(rs, 'cpu_gb'):8.2f}" if pids else f"{'-':>8}"
                label = f"{name}, {conns} conn{'s' if conns > 1 else ''}"
                print(
                    f"{label:22} {mbs:8.0f} {mbs / direct:6.2f} {cpu} "
                    f"{median(rs, 'sink_gb'):5.2f} {median(rs, 'client_gb'):6.2f}"
                )

        failed = sum(r["failed"] for rs in grpc_results.values() for r in rs)
        if failed:
            statuses: dict[str, int] = {}
            for rs in grpc_results.values():
                for r in rs:
                    for k, v in r["statuses"].items():
                        statuses[k] = statuses.get(k, 0) + v
            print(f"\nERROR: {failed} h2load calls failed at the HTTP level; statuses {statuses}")
        print()
        logs = {f"{k} sidecar": tmp / k / "out.log" for k in ("frontend", "backend-grpc")}
        logs |= {"backend-tcp sidecar": tmp / "backend-tcp" / "out.log"}
        logs |= {"gRPC app": tmp / "app-grpc.log", "TCP sink": tmp / "app-sink.log"}
        for name, path in logs.items():
            lines, bad = log_problems(path)
            print(f"{name} log: {lines} access-log lines, {len(bad)} telling of a problem")
            for line in bad[:10]:
                print(f"  ERROR: {line[:300]}")
    finally:
        mesh.stop()
        if args.keep:
            print(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
