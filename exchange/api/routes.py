"""HTTP routes. Handlers are thin: authenticate, parse, call the node, shape the answer."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from exchange.api.auth import local_client, node_of, partner_node
from exchange.checkpoints import CheckpointService
from exchange.db import repo
from exchange.errors import CheckpointConflict, FieldError, InvalidInput
from exchange.ledger.checkpoint import CheckpointError
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


def checkpoints_of(request: Request) -> CheckpointService:
    service: CheckpointService = request.app.state.checkpoints
    return service


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
    checkpoint: str | None = Field(default=None, description="the sender's latest signed checkpoint")


@peer_router.post("/envelopes", summary="Deliver envelopes (partner node only)")
def receive_envelopes(batch: EnvelopeBatch, request: Request) -> dict[str, Any]:
    """One result per envelope, in order: ``accepted`` with a signed receipt, or ``rejected``.

    ``checkpoint`` says what the receiver made of the sender's attached checkpoint: ``ok``,
    ``conflict`` (a split view: a security incident on both sides) or ``invalid``.
    """
    results = node_of(request).receive(batch.envelopes, _now())
    checkpoint_status = None
    if batch.checkpoint is not None:
        try:
            checkpoints_of(request).observe(batch.checkpoint, _now())
            checkpoint_status = "ok"
        except CheckpointConflict:
            checkpoint_status = "conflict"
        except CheckpointError:
            checkpoint_status = "invalid"
    return {
        "results": [
            {"status": "accepted", "receipt": r.receipt} if r.accepted else {"status": "rejected"}
            for r in results
        ],
        "checkpoint": checkpoint_status,
    }


class WitnessBody(BaseModel):
    checkpoint: str = Field(description="a C2SP signed-note checkpoint of the partner's ledger")
    from_size: int = Field(ge=0, description="the size the consistency proof starts from")
    proof: list[str] = Field(default_factory=list, max_length=64, description="hex SHA-256 hashes")


@peer_router.post("/checkpoints", summary="Witness a checkpoint (partner node only)")
def witness_checkpoint(body: WitnessBody, request: Request) -> dict[str, Any]:
    """Cosign the partner's checkpoint (C2SP cosignature/v1) if it is consistent with the last one
    witnessed. 409 with ``witnessed_size`` when the proof starts elsewhere or the checkpoint
    conflicts (fork, rollback, failed proof: a security incident, ledgered)."""
    try:
        proof = [bytes.fromhex(p) for p in body.proof]
    except ValueError as exc:
        raise InvalidInput("proof elements must be hex", [FieldError("proof", str(exc))]) from exc
    line = checkpoints_of(request).witness(body.checkpoint, body.from_size, proof, _now())
    return {"cosignature": line}


@health_router.get("/healthz", summary="Liveness and a few gauges")
def health(request: Request) -> dict[str, Any]:
    node = node_of(request)
    with node.db.read() as conn:
        outbox = repo.outbox_size(conn)
        head = repo.read_ledger_head(conn)
    status = checkpoints_of(request).status()
    return {
        "status": "ok",
        "party": node.party,
        "agreement": {"version": node.agreement.version, "digest": node.agreement.digest},
        "outbox": outbox,
        "ledger_size": head.size,
        "checkpoint_size": status["latest"]["size"] if status["latest"] else 0,
        "cosigned_size": status["latest_cosigned"]["size"] if status["latest_cosigned"] else 0,
        "partner_witnessed_size": status["partner_witnessed"]["size"] if status["partner_witnessed"] else 0,
    }
