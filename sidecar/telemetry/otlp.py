"""Span export with OpenTelemetry's OTLP over HTTP (protobuf), off the request path.

One span per sampled exchange per sidecar (kind SERVER inbound, CLIENT outbound) goes into
a bounded queue as the exchange ends; a background task sends batches every
`tracing.otlp_interval` seconds (or as soon as `otlp_batch` are waiting) to
`tracing.otlp_endpoint`. A full queue drops the span, a failed export drops its batch:
both are counted (`dropped`), logged once per change of error, and never make a request
wait. The protobuf classes (opentelemetry-proto) are imported only when export is on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from sidecar.config import TracingConfig
from sidecar.telemetry.record import ExchangeRecord

log = logging.getLogger("sidecar.otlp")

# trace id, span id, parent span id, direction, method, path, status, peer, service,
# start (unix ns), duration (ms)
Span = tuple[str, str, str | None, str, str, str | None, int, str | None, str | None, int, float]


class OtlpExporter:
    """Queues sampled exchanges as spans and exports them in batches."""

    def __init__(self, cfg: TracingConfig, service_name: str | Callable[[], str]) -> None:
        assert cfg.otlp_endpoint is not None
        self.cfg = cfg
        self.endpoint = cfg.otlp_endpoint
        self.service_name = service_name
        self.queue: collections.deque[Span] = collections.deque()
        self.dropped = 0  # spans never delivered (queue full, or their batch failed)
        self.exported = 0
        self._wake = asyncio.Event()
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the request path -----------------------------------------------------------

    def write(self, rec: ExchangeRecord) -> None:
        """Queue the exchange's span if it was sampled (never blocks, never raises)."""
        if not rec.sampled or rec.trace_id is None or rec.span_id is None:
            return
        if len(self.queue) >= self.cfg.otlp_queue:
            self.dropped += 1
            return
        end_ns = time.time_ns()
        self.queue.append(
            (
                rec.trace_id,
                rec.span_id,
                rec.parent_span_id,
                rec.direction,
                rec.method,
                rec.path,
                rec.status,
                rec.peer,
                rec.service,
                end_ns - int(rec.ms * 1_000_000),
                rec.ms,
            )
        )
        if len(self.queue) >= self.cfg.otlp_batch:
            self._wake.set()

    # -- the background task --------------------------------------------------------

    def start(self) -> None:
        """Start exporting."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Send what is queued (briefly), then stop."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await asyncio.wait_for(self.flush(), 2)
        except TimeoutError:
            pass

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.cfg.otlp_interval)
                except TimeoutError:
                    pass
                self._wake.clear()
                await self.flush(session)

    async def flush(self, session: Any = None) -> None:
        """Export everything queued now, a batch at a time."""
        import aiohttp

        own = session is None
        if own:
            session = aiohttp.ClientSession()
        try:
            while self.queue:
                batch = [
                    self.queue.popleft() for _ in range(min(len(self.queue), self.cfg.otlp_batch))
                ]
                await self._send(session, batch)
        finally:
            if own:
                await session.close()

    async def _send(self, session: Any, batch: list[Span]) -> None:
        import aiohttp

        name = self.service_name if isinstance(self.service_name, str) else self.service_name()
        body = encode(batch, name)
        try:
            async with session.post(
                self.endpoint,
                data=body,
                headers={"Content-Type": "application/x-protobuf"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                if resp.status >= 300:
                    raise OSError(f"collector answered {resp.status}")
            self.exported += len(batch)
            if self._last_error is not None:
                log.info("span export to %s works again", self.endpoint)
                self._last_error = None
        except (OSError, aiohttp.ClientError, TimeoutError) as e:
            self.dropped += len(batch)
            why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if why != self._last_error:
                log.warning("span export to %s failed (%s); spans dropped", self.endpoint, why)
                self._last_error = why


def encode(batch: list[Span], service_name: str) -> bytes:
    """An OTLP ExportTraceServiceRequest (protobuf) for `batch`."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

    def attr(key: str, value: str | int) -> KeyValue:
        v = AnyValue(int_value=value) if isinstance(value, int) else AnyValue(string_value=value)
        return KeyValue(key=key, value=v)

    spans = []
    for (
        trace_id,
        span_id,
        parent,
        direction,
        method,
        path,
        status,
        peer,
        service,
        start,
        ms,
    ) in batch:
        attrs = [
            attr("http.request.method", method),
            attr("http.response.status_code", status),
            attr("meshca.direction", direction),
        ]
        if path is not None:
            attrs.append(attr("url.path", path))
        if peer is not None:
            attrs.append(attr("meshca.peer.spiffe_id", peer))
        if service is not None:
            attrs.append(attr("meshca.service", service))
        spans.append(
            Span(
                trace_id=bytes.fromhex(trace_id),
                span_id=bytes.fromhex(span_id),
                parent_span_id=bytes.fromhex(parent) if parent else b"",
                name=f"{method} {service}" if service else f"{direction} {method}",
                kind=Span.SPAN_KIND_SERVER if direction == "inbound" else Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=start,
                end_time_unix_nano=start + int(ms * 1_000_000),
                attributes=attrs,
                status=Status(
                    code=Status.STATUS_CODE_ERROR if status >= 500 else Status.STATUS_CODE_UNSET
                ),
            )
        )
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[attr("service.name", service_name)]),
                scope_spans=[ScopeSpans(spans=spans)],
            )
        ]
    )
    return request.SerializeToString()
