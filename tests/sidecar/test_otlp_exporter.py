"""The OTLP span exporter against a collector in the test that decodes the real OTLP
protobuf: spans of sampled exchanges arrive batched with their ids, kinds, times and
attributes; unsampled ones are not sent; a full queue and a collector that fails or is
gone drop spans (counted) without ever blocking `write`."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sidecar.config import TracingConfig
from sidecar.telemetry.otlp import OtlpExporter
from sidecar.telemetry.record import ExchangeRecord

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def rec(n: int, sampled: bool = True, direction: str = "outbound") -> ExchangeRecord:
    return ExchangeRecord(
        direction, method="GET", path=f"/item/{n}", status=200 if n % 2 else 503, ms=12.5,
        peer="spiffe://cluster.local/ns/default/sa/backend", service="backend.default",
        trace_id=TRACE, span_id=f"{n + 1:016x}", parent_span_id="00f067aa0ba902b7",
        sampled=sampled,
    )  # fmt: skip


async def collector(status: int = 200):
    got: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        got.append(msg)
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/v1/traces", got


async def test_sampled_spans_arrive_decoded_in_batches():
    runner, url, got = await collector()
    ex = OtlpExporter(TracingConfig(otlp_endpoint=url, otlp_batch=4, otlp_interval=0.1), "web")
    ex.start()
    try:
        for n in range(10):
            ex.write(rec(n))
        ex.write(rec(99, sampled=False))
        deadline = time.monotonic() + 5
        while ex.exported < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await ex.stop()
        await runner.cleanup()
    spans = [s for m in got for rs in m.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert len(spans) == 10 and ex.exported == 10 and ex.dropped == 0
    assert all(len(ss.spans) <= 4 for m in got for rs in m.resource_spans for ss in rs.scope_spans)
    service = got[0].resource_spans[0].resource.attributes[0]
    assert (service.key, service.value.string_value) == ("service.name", "web")
    first = spans[0]
    assert first.trace_id.hex() == TRACE and first.span_id.hex() == f"{1:016x}"
    assert first.parent_span_id.hex() == "00f067aa0ba902b7"
    assert first.kind == Span.SPAN_KIND_CLIENT and first.name == "GET backend.default"
    assert first.end_time_unix_nano - first.start_time_unix_nano == 12_500_000
    attrs = {a.key: a.value for a in first.attributes}
    assert attrs["url.path"].string_value == "/item/0"
    assert attrs["http.response.status_code"].int_value == 503
    assert first.status.code == first.status.STATUS_CODE_ERROR
    assert spans[1].status.code == spans[1].status.STATUS_CODE_UNSET


async def test_full_queue_and_failing_collector_drop_and_count_never_block():
    runner, url, got = await collector(status=500)
    ex = OtlpExporter(TracingConfig(otlp_endpoint=url, otlp_queue=5, otlp_interval=0.1), "web")
    t0 = time.perf_counter()
    for n in range(8):  # not started yet: the queue fills, three are dropped at once
        ex.write(rec(n))
    assert time.perf_counter() - t0 < 0.1  # write never waits on the network
    assert ex.dropped == 3 and len(ex.queue) == 5
    ex.start()
    deadline = time.monotonic() + 5
    while ex.dropped < 8 and time.monotonic() < deadline:  # the collector answers 500
        await asyncio.sleep(0.05)
    await ex.stop()
    await runner.cleanup()
    assert ex.dropped == 8 and ex.exported == 0 and len(got) == 1


async def test_collector_gone():
    ex = OtlpExporter(TracingConfig(otlp_endpoint="http://127.0.0.1:9/v1/traces"), "web")
    ex.write(rec(1))
    await ex.flush()
    assert ex.dropped == 1 and ex.exported == 0
