"""HTTP routes. Handlers are thin: authenticate, parse, call the node, shape the answer."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from exchange.api.auth import local_client, node_of, partner_node
from exchange.db import repo
from exchange.messages import MessageSubmission
from exchange.policy import Actor

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
COMMON_PROBLEMS: dict[int | str, dict[str, Any]] = {
    403: {"description": "Certificate not registered, or refused by policy (names every rule)", **PROBLEM},
    422: {"description": "Invalid request (names every invalid field)", **PROBLEM},
}

client_router = APIRouter(prefix="/v1", tags=["local systems"], responses=COMMON_PROBLEMS)
peer_router = APIRouter(prefix="/v1/peer", tags=["partner node"], dependencies=[Depends(partner_node)])
health_router = APIRouter(tags=["operations"])

LocalClient = Annotated[Actor, Depends(local_client)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Accepted(BaseModel):
    id: str
    status: str
    thread_id: str
    classification: dict[str, Any]
    envelope_sha256: str


@client_router.post("/messages", status_code=202, response_model=Accepted, summary="Submit a message")
def submit_message(submission: MessageSubmission, actor: LocalClient, request: Request) -> dict[str, Any]:
    """Validate, classify, apply the agreement's rules, seal and queue a message for the partner.

    Answers 202 with the message id and its final classification (in both national schemes), or a
    problem naming every invalid field (422) or every rule that refused (403).
    """
    node = node_of(request)
    accepted = node.submit(actor, submission, _now())
    request.app.state.worker_wake()
    return accepted


@client_router.get("/messages/{message_id}", summary="Status of a message")
def message_status(message_id: str, actor: LocalClient, request: Request) -> dict[str, Any]:
    """queued, sent, delivered (with the partner's signed receipt) or failed (with the reason)."""
    return node_of(request).status(actor, message_id)


@client_router.get("/inbox", summary="Pull received messages")
def inbox(
    actor: LocalClient,
    request: Request,
    after: Annotated[int, Query(ge=0, description="cursor: next_cursor of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Messages from the partner this system is cleared for, in order, from the cursor on."""
    node = node_of(request)
    page = node.inbox(actor, after, min(limit, node.settings.inbox_page_max), _now())
    return {"items": page.items, "next_cursor": page.next_cursor}


class EnvelopeBatch(BaseModel):
    envelopes: list[str] = Field(min_length=1, max_length=1000)


@peer_router.post("/envelopes", summary="Deliver envelopes (partner node only)")
def receive_envelopes(batch: EnvelopeBatch, request: Request) -> dict[str, Any]:
    """One result per envelope, in order: ``accepted`` with a signed receipt, or ``rejected``."""
    results = node_of(request).receive(batch.envelopes, _now())
    return {
        "results": [
            {"status": "accepted", "receipt": r.receipt} if r.accepted else {"status": "rejected"}
            for r in results
        ]
    }


@health_router.get("/healthz", summary="Liveness and a few gauges")
def health(request: Request) -> dict[str, Any]:
    node = node_of(request)
    with node.db.read() as conn:
        outbox = repo.outbox_size(conn)
        head = repo.read_ledger_head(conn)
    return {
        "status": "ok",
        "party": node.party,
        "agreement": {"version": node.agreement.version, "digest": node.agreement.digest},
        "outbox": outbox,
        "ledger_size": head.size,
    }
