"""The metrics listener: `/metrics` and `/stats/prometheus` (where Istio's Envoy serves them),
in Prometheus text or OpenMetrics, as the scraper's Accept header asks. Nothing else is
served on it: it is meant to be reachable by the scraper, unlike the loopback admin port."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """The aiohttp application of the metrics listener."""

    async def scrape(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/stats/prometheus", scrape)
    return app
