"""The FastAPI application factory. Settings, keys and the database come in through a Node built
by the caller, so a bad configuration is reported before the server starts."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import exchange
from exchange.api import problems
from exchange.api.routes import audit_router, client_router, console_router, health_router, peer_router
from exchange.auditing import AuditService
from exchange.checkpoints import CheckpointService
from exchange.envelope import peer_body_limit
from exchange.errors import ExchangeError
from exchange.node import Node
from exchange.transport.checkpointer import Checkpointer
from exchange.transport.peer import PEER_PATH, PeerTransport
from exchange.transport.worker import DeliveryWorker


class BodyLimit:
    """Refuse request bodies above ``max_bytes`` with 413 problem JSON, declared or streamed.
    ``path_limits`` overrides the limit for exact paths (the peer envelope batches)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.path_limits = path_limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.path_limits.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._refuse(scope, receive, send, max_bytes)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, receive, send, max_bytes)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        response = problems.problem(
            413, "too-large", "Request body too large", f"the body exceeds {max_bytes} bytes"
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(node: Node, transport: PeerTransport | None = None, *, run_worker: bool = True) -> FastAPI:
    """The node's ASGI app. With ``run_worker``, a delivery thread drains the outbox to
    ``transport`` (required then) for the lifetime of the app."""
    checkpoints = CheckpointService(node)
    worker = DeliveryWorker(node, transport) if transport is not None else None
    checkpointer = (
        Checkpointer(checkpoints, transport, node.settings.checkpoint_interval_seconds)
        if transport is not None
        else None
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threads = []
        if run_worker:
            for name, loop in (("delivery", worker), ("checkpointer", checkpointer)):
                if loop is not None:
                    threads.append(threading.Thread(target=loop.run_forever, name=name, daemon=True))
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            for loop in (worker, checkpointer):
                if loop is not None:
                    loop.stop()
            for thread in threads:
                thread.join(timeout=30)
            if transport is not None:
                transport.close()

    app = FastAPI(
        title=f"exchange node ({node.party})",
        version=exchange.__version__,
        summary="Secure gateway for Polri-PDRM intelligence exchange on trafficking in persons",
        description=(
            "Every connection must present a client certificate. Local systems use `/v1/messages` "
            "and `/v1/inbox` with a certificate from this node's CA registered by an administrator; "
            "the partner node alone uses `/v1/peer/*`. Errors are RFC 9457 problem JSON."
        ),
        lifespan=lifespan,
    )
    app.state.node = node
    app.state.checkpoints = checkpoints
    app.state.transport = transport
    app.state.audit = AuditService(node.db, node.agreement, node.party)
    wake: Callable[[], None] = worker.wake if worker is not None else (lambda: None)
    app.state.worker_wake = wake
    app.state.worker = worker
    app.include_router(client_router)
    app.include_router(peer_router)
    app.include_router(health_router)
    app.include_router(audit_router)
    app.include_router(console_router)
    handlers: list[tuple[Any, Any]] = [
        (ExchangeError, problems.exchange_error_handler),
        (RequestValidationError, problems.validation_error_handler),
        (StarletteHTTPException, problems.http_error_handler),
        (Exception, problems.unexpected_error_handler),
    ]
    for exc_class, handler in handlers:
        app.add_exception_handler(exc_class, handler)
    app.add_middleware(
        BodyLimit,
        max_bytes=node.settings.max_body_bytes,
        # the partner may send one envelope as large as the agreement allows (exchange/envelope/size.py)
        path_limits={PEER_PATH: peer_body_limit(node.agreement.max_envelope_bytes)},
    )
    return app
