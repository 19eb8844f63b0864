"""A gRPC app for the end-to-end tests: service `meshtest.Echo` over h2c, bytes in, bytes out.

No protoc and no generated code: generic handlers without (de)serializers, so every
request and response is raw bytes (tests/grpcclient.py calls it the same way). Methods:

- `Unary`: answers the request bytes, with the trailing metadata `x-app-trailer: done`.
- `Whoami`: answers JSON `{key: value}` of the metadata it received (values of a key sent
  more than once joined with ", "; `-bin` values base64), to show which headers reached it.
- `ServerStream`: request JSON `{"count": N, "size": S}`; streams N messages of S bytes,
  message i being `stream_message(i, S)`, made one at a time (100 MB never sits in memory).
- `ClientStream`: answers JSON `{"count": n, "bytes": total, "sha256": hex}` of the stream.
- `Bidi`: echoes each message as it arrives.
- `Slow`: request JSON `{"seconds": x}`; answers `b"late"` after x s, or gives up as soon
  as the call is no longer active (deadline passed or cancelled; counted as `cancelled`).
- `Fail`: aborts with the status code named by the request (`b"NOT_FOUND"`), message
  `failed as asked: NOT_FOUND`; an unknown name (or OK) gives INVALID_ARGUMENT.
- `Stats`: JSON `{"calls": {method: n}, "cancelled": {method: n}}`, counting every call of
  the other methods from its start, so a test can check that a refused call never came.

Run: `python tests/grpc_app.py --listen 127.0.0.1:0`; it prints
`grpc listening on http://127.0.0.1:PORT` once it serves, and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from mesh import Proc

SERVICE = "meshtest.Echo"
# Big enough that the app is never what limits a large message sent through a sidecar.
MAX_MESSAGE = 64 * 1024 * 1024


def stream_message(i: int, size: int) -> bytes:
    """Message `i` of a ServerStream: its index (mod 256) repeated `size` times."""
    return bytes([i % 256]) * size


class Echo:
    """The handlers, with per-method counts of calls (and of calls given up when cancelled)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()

    def _count(self, method: str, counter: Counter[str] | None = None) -> None:
        with self._lock:
            (self.calls if counter is None else counter)[method] += 1

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Unary")
        context.set_trailing_metadata((("x-app-trailer", "done"),))
        return request

    def whoami(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Whoami")
        seen: dict[str, str] = {}
        for key, value in context.invocation_metadata():
            if isinstance(value, bytes):
                value = base64.b64encode(value).decode()
            seen[key] = f"{seen[key]}, {value}" if key in seen else value
        return json.dumps(seen).encode()

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("ServerStream")
        doc = json.loads(request)
        count, size = int(doc["count"]), int(doc["size"])
        for i in range(count):
            # grpc sends one message before asking for the next: memory stays one message
            yield stream_message(i, size)

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._count("ClientStream")
        digest, count, total = hashlib.sha256(), 0, 0
        for message in requests:
            digest.update(message)
            count += 1
            total += len(message)
        return json.dumps({"count": count, "bytes": total, "sha256": digest.hexdigest()}).encode()

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._count("Bidi")
        yield from requests

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Slow")
        until = time.monotonic() + float(json.loads(request)["seconds"])
        while time.monotonic() < until:
            if not context.is_active():  # the deadline passed or the client went away
                self._count("Slow", self.cancelled)
                return b""
            time.sleep(min(0.02, max(0.0, until - time.monotonic())))
        return b"late"

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._count("Fail")
        name = request.decode(errors="replace").strip()
        code = getattr(grpc.StatusCode, name, None)
        if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no status code named {name!r}")
        context.abort(code, f"failed as asked: {name}")
        raise AssertionError("context.abort returned")  # abort raises; keeps the type honest

    def stats(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            doc = {"calls": dict(self.calls), "cancelled": dict(self.cancelled)}
        return json.dumps(doc).encode()

    def handler(self) -> grpc.GenericRpcHandler:
        unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": unary(self.unary),
                "Whoami": unary(self.whoami),
                "ServerStream": stream(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "Slow": unary(self.slow),
                "Fail": unary(self.fail),
                "Stats": unary(self.stats),
            },
        )


def serve(listen: str) -> int:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=128),  # a thread per call: 100+ at once
        options=[
            # grpc sets SO_REUSEPORT by default: two apps could then share a fixed port
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    server.add_generic_rpc_handlers((Echo().handler(),))
    host = listen.rpartition(":")[0]
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError:  # grpc >= 1.53 raises where older ones returned 0
        port = 0
    if port == 0:
        print(f"grpc: cannot listen on {listen}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server.start()
    print(f"grpc listening on http://{host}:{port}", flush=True)
    stop.wait()
    server.stop(grace=1).wait()
    return 0


def start_grpc_app(port: int = 0) -> Proc:
    """This app on 127.0.0.1:`port` (a free one when 0); its URL is `urls["grpc"]`."""
    from mesh import _spawn

    return _spawn([sys.executable, str(Path(__file__)), "--listen", f"127.0.0.1:{port}"], ["grpc"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0: a free one)")
    return serve(p.parse_args().listen)


if __name__ == "__main__":
    sys.exit(main())
