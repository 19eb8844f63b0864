"""Calls to the test gRPC app (tests/grpc_app.py) with a real grpcio client, bytes in, bytes out.

Every function takes a channel from `channel()` and makes one call of `meshtest.Echo`; a
call that fails raises `grpc.RpcError` (which is also a `grpc.Call`: `.code()`,
`.details()`, `.trailing_metadata()`), except `fail()`, which returns it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence

import grpc
from grpc_app import MAX_MESSAGE, SERVICE

Metadata = Sequence[tuple[str, str | bytes]]


def channel(target: str, authority: str | None = None, **options: object) -> grpc.Channel:
    """An insecure (h2c) channel to `target` (`host:port`, or the app's `http://host:port`).

    `authority` sets the `:authority` the calls carry (`grpc.default_authority`). Other
    channel options as keywords, `grpc.` left off (`max_receive_message_length=...`) or given
    whole (`**{"grpc.primary_user_agent": "x"}`). Unless asked otherwise: no proxy from the
    environment (`enable_http_proxy=0`), a connection of its own (not shared with other
    channels of this process), and messages up to 64 MiB received.
    """
    opts: dict[str, object] = {
        "grpc.enable_http_proxy": 0,
        "grpc.use_local_subchannel_pool": 1,
        "grpc.max_receive_message_length": MAX_MESSAGE,
    }
    if authority is not None:
        opts["grpc.default_authority"] = authority
    for key, value in options.items():
        opts[key if "." in key else f"grpc.{key}"] = value
    return grpc.insecure_channel(target.removeprefix("http://"), options=list(opts.items()))


def _method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def unary(
    ch: grpc.Channel, data: bytes, timeout: float = 10, metadata: Metadata | None = None
) -> tuple[bytes, grpc.Call]:
    """Echo `data`; returns (the answer, the call: `.trailing_metadata()` has x-app-trailer)."""
    return ch.unary_unary(_method("Unary")).with_call(data, timeout=timeout, metadata=metadata)


def server_stream(ch: grpc.Channel, count: int, size: int, timeout: float = 30) -> Iterator[bytes]:
    """`count` messages of `size` bytes (message i is `grpc_app.stream_message(i, size)`),
    as they come; the iterator is also the call (`.cancel()`, `.code()`)."""
    return ch.unary_stream(_method("ServerStream"))(
        _json({"count": count, "size": size}), timeout=timeout
    )


def client_stream(ch: grpc.Channel, chunks: Iterable[bytes], timeout: float = 30) -> dict:
    """Send `chunks` as a stream; the app's `{"count", "bytes", "sha256"}` of what it got."""
    return json.loads(ch.stream_unary(_method("ClientStream"))(iter(chunks), timeout=timeout))


def bidi(ch: grpc.Channel, chunks: Iterable[bytes], timeout: float = 30) -> Iterator[bytes]:
    """Send `chunks`; the echoes as they come (the iterator is also the call). `chunks` may
    be a generator that waits for each echo before it gives the next message."""
    return ch.stream_stream(_method("Bidi"))(iter(chunks), timeout=timeout)


def slow(ch: grpc.Channel, seconds: float, timeout: float = 10) -> bytes:
    """An answer (`b"late"`) after `seconds`; DEADLINE_EXCEEDED if `timeout` comes first."""
    return ch.unary_unary(_method("Slow"))(_json({"seconds": seconds}), timeout=timeout)


def whoami(ch: grpc.Channel, metadata: Metadata | None = None, timeout: float = 10) -> dict:
    """The metadata (headers) the app received, `{key: value}`."""
    return json.loads(ch.unary_unary(_method("Whoami"))(b"", timeout=timeout, metadata=metadata))


def stats(ch: grpc.Channel, timeout: float = 10) -> dict:
    """`{"calls": {method: n}, "cancelled": {method: n}}`: what the app has served so far."""
    return json.loads(ch.unary_unary(_method("Stats"))(b"", timeout=timeout))


def fail(ch: grpc.Channel, code_name: str, timeout: float = 10) -> grpc.RpcError:
    """The error of a call the app fails with status `code_name` (e.g. "NOT_FOUND")."""
    try:
        ch.unary_unary(_method("Fail"))(code_name.encode(), timeout=timeout)
    except grpc.RpcError as e:
        return e
    raise AssertionError(f"Fail({code_name}) succeeded")
