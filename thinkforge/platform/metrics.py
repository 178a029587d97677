"""Prometheus metrics of the control plane, served at ``GET /metrics`` (no key: scrapers).

One registry per app (no import-time globals). Routes are labelled by their template
(``/v1/fine_tuning/jobs/{job_id}``), never the raw path, so ids do not blow up the series.

    metrics = ApiMetrics(); app.add_middleware(MetricsMiddleware, metrics=metrics)
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "thinkforge_api_requests_total",
            "REST API requests answered, by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "thinkforge_api_request_duration_seconds",
            "REST API request latency until the response starts, by method and route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                route = _route(scope)
                self.metrics.latency.labels(scope["method"], route).observe(
                    time.perf_counter() - start
                )
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(scope["method"], _route(scope), str(status)).inc()


def _route(scope: Scope) -> str:
    """The matched route's template: the router records the route in the scope it shares."""
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))
