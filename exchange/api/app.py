"""The FastAPI application factory. Settings, keys and the database come in through a Node built
by the caller, so a bad configuration is reported before the server starts."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import exchange
from exchange.api import auth, lifecycle_routes, observability, openapi, problems
from exchange.api.guard import ConcurrencyLimit, RequestGuard, SecurityHeaders
from exchange.api.routes import (
    CONSOLE_PATH,
    WITNESS_PATH,
    audit_router,
    client_router,
    console_router,
    health_router,
    peer_router,
)
from exchange.auditing import AuditService
from exchange.checkpoints import CheckpointService
from exchange.db.coordination import (
    AGREEMENT_CHANNEL,
    CLIENTS_CHANNEL,
    LEDGER_CHANNEL,
    OUTBOX_CHANNEL,
    coordination_for,
)
from exchange.envelope import peer_body_limit
from exchange.errors import ExchangeError, FieldError
from exchange.keys.rotation import KeyAdmin
from exchange.loops import LoopRunner
from exchange.messages import raw_vocabulary_errors
from exchange.node import Node
from exchange.retention import PeriodicLoop
from exchange.transport.checkpointer import Checkpointer
from exchange.transport.peer import PEER_PATH, HttpWitness, PeerTransport
from exchange.transport.worker import DeliveryWorker


def payload_errors(node: Node, body: dict[str, Any]) -> list[FieldError]:
    """The payload's schema errors and the vocabulary errors (unknown TLP, purposes, codes) of a
    submission whose other fields failed validation: one answer names every invalid field."""
    terms = node.agreements.in_force(read=False)  # from the event loop (the validation error handler)
    errors = raw_vocabulary_errors(terms.agreement, body)
    message_type, payload = body.get("type"), body.get("payload")
    if (
        isinstance(message_type, str)
        and message_type in terms.agreement.message_types
        and isinstance(payload, dict)
    ):
        errors += terms.catalogue.payload_errors(message_type, payload)
    return errors


def create_app(node: Node, transport: PeerTransport | None = None, *, run_worker: bool = True) -> FastAPI:
    """The node's ASGI app. With ``run_worker``, a delivery thread drains the outbox to
    ``transport`` (required then) for the lifetime of the app."""
    checkpoints = CheckpointService(node)
    worker = DeliveryWorker(node, transport) if transport is not None else None
    fixed = node.agreements.first  # parties, witnesses and the envelope limit: the same in every version
    witnesses = [HttpWitness(w.name, w.url, node.settings.peer_timeout_seconds) for w in fixed.witnesses]
    checkpointer = (
        Checkpointer(checkpoints, transport, node.settings.checkpoint_interval_seconds, witnesses)
        if transport is not None
        else None
    )

    settings = node.settings
    keys = KeyAdmin(settings, node.registry)
    loops: list[tuple[str, Any]] = [  # every background loop of the node: adding one is a line here
        ("delivery", worker),
        ("checkpointer", checkpointer),
        ("retention", PeriodicLoop("retention", node.retention.run, settings.retention_interval_seconds)),
        ("deadlines", PeriodicLoop("deadlines", node.deadlines.run, settings.deadline_interval_seconds)),
        ("keys", PeriodicLoop("keys", keys.maintain, settings.key_maintenance_interval_seconds)),
    ]
    wakes = {"delivery": (OUTBOX_CHANNEL,), "checkpointer": (LEDGER_CHANNEL,)}  # NOTIFY channels
    coordination = coordination_for(node.db, settings.leader_retry_seconds, f"exchange {node.party}")
    runners = [LoopRunner(name, loop, coordination, wakes.get(name, ())) for name, loop in loops if loop]
    coordination.subscribe(CLIENTS_CHANNEL, node.clients.forget)  # `exchange clients` changed one
    coordination.subscribe(AGREEMENT_CHANNEL, node.agreements.forget)  # `exchange agreement install`

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threads = []
        if run_worker:
            coordination.start()
            threads = [threading.Thread(target=r.run_forever, name=r.name, daemon=True) for r in runners]
        for thread in threads:
            thread.start()
        try:
            yield
        finally:
            for runner in runners:
                runner.stop()
            for thread in threads:
                thread.join(timeout=30)
            if worker is not None:
                worker.close()  # the answers of its last round settled, while still the leader
            coordination.close()  # after the loops: a successor leads at once
            app.state.audit.close()
            if transport is not None:
                transport.close()
            if checkpointer is not None:
                checkpointer.close()

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
        docs_url=None,  # no third-party scripts in the node's origin: read /openapi.json with local tools
        redoc_url=None,
        # no OpenTelemetry: the node's metrics are /metrics and its logs never carry content, while
        # FastAPI's own telemetry records request bodies and exception messages when a provider is
        # configured (and costs every request its checks when none is)
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
        # a path with a trailing slash is not found (problem JSON), not redirected before any
        # authorisation to a Location built from the caller's Host header
        redirect_slashes=False,
    )
    openapi.install(app)
    app.state.node = node
    app.state.checkpoints = checkpoints
    app.state.transport = transport
    app.state.audit = AuditService(  # its keys, witnesses and bundles come from the fixed fields
        node.db,
        fixed,
        node.party,
        settings.clock_skew,
        concurrent=settings.audit_verify_concurrency,
        workers=settings.audit_verify_workers,
    )
    delivery = next((r for r in runners if r.name == "delivery"), None)
    wake: Callable[[], None] = delivery.wake if delivery is not None else (lambda: None)
    app.state.worker_wake = wake
    node.wake_delivery = wake
    if transport is not None:
        node.fetch_partner_key_sets = transport.fetch_key_sets
    app.state.worker = worker
    setattr(app.state, problems.MORE_FIELD_ERRORS, {"/v1/messages": partial(payload_errors, node)})
    app.include_router(client_router)
    app.include_router(lifecycle_routes.router)
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
    raw_paths = frozenset({peer_router.prefix + WITNESS_PATH})
    app.add_middleware(
        RequestGuard,
        max_bytes=node.settings.max_body_bytes,
        body_timeout_seconds=node.settings.body_timeout_seconds,
        navigable=frozenset({CONSOLE_PATH}),
        raw_paths=raw_paths,
        # the partner node may send one envelope as large as the agreement allows
        # (exchange/envelope/size.py); any other caller of the path is held to the common limit
        path_limits={
            PEER_PATH: (
                peer_body_limit(fixed.max_envelope_bytes),
                lambda scope: auth.is_partner_node(node, auth.certificate_of(scope), held=True),
            )
        },
    )
    app.add_middleware(  # before any body is read
        ConcurrencyLimit,
        total=node.settings.max_requests_in_progress,
        per_caller=node.settings.max_requests_in_progress_per_caller,
        per_partner=node.settings.max_partner_requests_in_progress,
        retry_after=node.settings.unavailable_retry_after_seconds,
        caller_of=auth.certificate_of,
        kind_of=lambda pem: auth.caller_kind(node, pem),
    )
    app.add_middleware(SecurityHeaders)  # outermost: the guard's refusals carry the headers too
    observability.install(app, node)  # /metrics, and the request id around everything
    return app
