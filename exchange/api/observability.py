"""The API's share of observability: ``GET /metrics`` for monitoring clients, and a request id on
every request (taken from a well-formed ``X-Request-ID``, else made here), echoed in the answer,
carried by every log line written while serving it, and logged once as ``http.request`` with the
route template (never the raw path), status, duration and the caller's registered client id."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exchange.api.auth import monitoring_client
from exchange.node import Node
from exchange.observability import logs, metrics
from exchange.observability.collector import NodeCollector

HEADER = "X-Request-ID"
log = logging.getLogger("exchange.api")

metrics_router = APIRouter(tags=["operations"], dependencies=[Depends(monitoring_client)])


@metrics_router.get(
    "/metrics",
    summary="Prometheus metrics (monitoring clients only)",
    response_class=Response,
    responses={
        200: {
            "description": "The Prometheus text exposition format 0.0.4 (docs/operator.md, Monitoring)",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics_exposition(request: Request) -> Response:
    """Counters of this node's processes and gauges read from its database and key directory. Only
    a client registered with ``exchange clients add-monitoring`` may read them (403 otherwise)."""
    collector: NodeCollector = request.app.state.metrics_collector
    return Response(metrics.render(collector), media_type=metrics.CONTENT_TYPE)


class RequestContext:
    """ASGI middleware: the request id, its echo, and the ``http.request`` log line and metric."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = (
            logs.well_formed_request_id(given.decode("latin-1") if given else None) or uuid.uuid4().hex
        )
        token = logs.REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            route: Any = scope.get("route")
            template = str(getattr(route, "path", "")) or "(unmatched)"
            state = scope.get("state") or {}
            metrics.http_request(scope["method"], template, status, seconds)
            log.info(
                "%s %s %d",
                scope["method"],
                template,
                status,
                extra=logs.fields(
                    logs.Event.HTTP_REQUEST,
                    method=scope["method"],
                    route=template,
                    status=status,
                    duration_ms=round(seconds * 1000, 2),
                    client_id=state.get("client_id"),
                ),
            )
            logs.REQUEST_ID.reset(token)


def install(app: FastAPI, node: Node) -> None:
    """Mount ``/metrics`` and the request-id middleware (outermost: every answer carries the id,
    the edge's refusals included). Call after every other middleware is added."""
    app.state.metrics_collector = NodeCollector(node)
    app.include_router(metrics_router)
    app.add_middleware(RequestContext)
