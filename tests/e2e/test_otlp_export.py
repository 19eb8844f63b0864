"""Span export through both sidecars to an OTLP/HTTP collector in the test, which decodes
the real OTLP protobuf: a sampled request gives one CLIENT span from the frontend sidecar
and one SERVER span from the backend's, in the caller's trace and chained parent to child;
an unsampled one gives none; a trace the frontend starts is exported from both too."""

from __future__ import annotations

import http.server
import threading
import time

import pytest
import yaml
from conftest import BACKEND
from mesh import hostport, proxy_get, sidecar_config, start_echo, start_sidecar
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

pytestmark = pytest.mark.e2e
FRONT = "spiffe://cluster.local/ns/shop/sa/web"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Collector(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, Span]] = []  # (service.name, span)
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        with self.server.lock:
            for rs in msg.resource_spans:
                name = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.server.spans += [(name["service.name"], s) for s in ss.spans]
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def traced(cfg, endpoint: str):
    doc = yaml.safe_load(cfg.read_text())
    doc["tracing"] = {"sampling": 1.0, "otlp_endpoint": endpoint, "otlp_interval": 0.2}
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def test_spans_from_both_sidecars_chain_in_the_callers_trace(ca, tmp_path):
    collector = Collector()
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}/v1/traces"
    procs = []
    try:
        echo = start_echo()
        procs.append(echo)
        bcfg = sidecar_config(tmp_path, "backend", ca, BACKEND, app=hostport(echo.urls["echo"]))
        backend = start_sidecar(traced(bcfg, endpoint))
        procs.append(backend)
        services = {
            "backend.default": {
                "identity": BACKEND,
                "endpoints": [hostport(backend.urls["inbound"])],
            }
        }
        frontend = start_sidecar(
            traced(sidecar_config(tmp_path, "frontend", ca, FRONT, services=services), endpoint)
        )
        procs.append(frontend)

        sampled = {"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"}
        assert proxy_get(frontend, "http://backend.default/sampled", headers=sampled)[0] == 200
        unsampled = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
        assert proxy_get(frontend, "http://backend.default/unsampled", headers=unsampled)[0] == 200
        assert proxy_get(frontend, "http://backend.default/fresh")[0] == 200

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with collector.lock:
                if len(collector.spans) >= 4:
                    break
            time.sleep(0.1)
        time.sleep(0.5)  # nothing more is coming
        with collector.lock:
            spans = list(collector.spans)
        paths = {
            (svc, {a.key: a.value for a in s.attributes}["url.path"].string_value): s
            for svc, s in spans
        }
        assert sorted(paths) == [
            ("backend", "/fresh"),
            ("backend", "/sampled"),
            ("web", "/fresh"),
            ("web", "/sampled"),
        ]  # fmt: skip  (no span of the unsampled trace)
        client, server = paths[("web", "/sampled")], paths[("backend", "/sampled")]
        assert client.trace_id.hex() == server.trace_id.hex() == TRACE
        assert client.kind == Span.SPAN_KIND_CLIENT and server.kind == Span.SPAN_KIND_SERVER
        assert client.parent_span_id.hex() == CALLER_SPAN
        assert server.parent_span_id.hex() == client.span_id.hex()
        assert client.start_time_unix_nano <= server.start_time_unix_nano
        assert server.end_time_unix_nano <= client.end_time_unix_nano
        fresh_c, fresh_s = paths[("web", "/fresh")], paths[("backend", "/fresh")]
        assert fresh_c.trace_id == fresh_s.trace_id and fresh_c.parent_span_id == b""
        assert fresh_s.parent_span_id == fresh_c.span_id
    finally:
        for p in reversed(procs):
            p.stop()
        collector.shutdown()
