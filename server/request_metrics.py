"""Request count and latency per route, as a pure ASGI middleware.

Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`) runs every request in an extra
task group with memory streams; at many concurrent single-image requests that overhead held
the GIL the forward thread needed. This wraps the ASGI callables directly instead.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ttaserve.server.metrics import ServerMetrics


class RequestMetricsMiddleware:
    """Counts HTTP requests by method, route template and status; observes their latency."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]  # an exception before the response starts is a 500 to the client

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self._observe(scope, status[0], time.perf_counter() - started)

    def _observe(self, scope: dict[str, Any], status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        method = scope["method"]
        self.metrics.requests.labels(method, route, str(status)).inc()
        self.metrics.request_latency.labels(method, route).observe(seconds)
