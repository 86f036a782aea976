"""HTTP routes. Handlers are thin: authenticate, parse, call the node, shape the answer."""

from __future__ import annotations

import datetime as dt
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from exchange.api.auth import auditor, local_client, node_of, partner_node
from exchange.auditing import AuditService, EntryFilter
from exchange.checkpoints import CheckpointService
from exchange.db import repo
from exchange.errors import FieldError, InvalidInput, LedgerIntegrityError, TransportError
from exchange.idempotency import HEADER as IDEMPOTENCY_HEADER
from exchange.idempotency import IdempotentSubmission
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
audit_router = APIRouter(
    prefix="/v1/audit", tags=["auditors"], dependencies=[Depends(auditor)], responses=COMMON_PROBLEMS
)

LocalClient = Annotated[Actor, Depends(local_client)]
IDEMPOTENCY_DOC = (
    "1-128 visible ASCII characters chosen by the client: a retry with the same key and body returns"
    " the original answer; the same key with another body is refused (422)"
)


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
def submit_message(
    submission: MessageSubmission,
    actor: LocalClient,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None, Header(alias=IDEMPOTENCY_HEADER, description=IDEMPOTENCY_DOC)
    ] = None,
) -> dict[str, Any]:
    """Validate, classify, apply the agreement's rules, seal and queue a message for the partner.

    Answers 202 with the message id and its final classification (in both national schemes), or a
    problem naming every invalid field (422) or every rule that refused (403). With an
    ``Idempotency-Key``, a retry answers the original 202 (``Idempotent-Replayed: true``).
    """
    node = node_of(request)
    accepted, replayed = IdempotentSubmission(node).submit(actor, submission, idempotency_key, _now())
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
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


@peer_router.get(
    "/audit/messages/{message_id}", summary="This node's record of a message (partner node only)"
)
def peer_message_history(message_id: str, request: Request) -> dict[str, Any]:
    """For the partner's auditors: this node's ledger entries about one message, metadata only."""
    return {"entries": audit_of(request).message_history(message_id)}


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


def audit_of(request: Request) -> AuditService:
    service: AuditService = request.app.state.audit
    return service


@audit_router.get("/entries", summary="Ledger entries (no content)")
def audit_entries(
    request: Request,
    case: str | None = None,
    message: str | None = None,
    event: str | None = None,
    rule: str | None = None,
    since: Annotated[str | None, Query(description="RFC 3339 time, inclusive")] = None,
    until: Annotated[str | None, Query(description="RFC 3339 time, exclusive")] = None,
    after: Annotated[int, Query(ge=-1, description="cursor: next_cursor of the previous page")] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Entries matching every filter given: ids, case references, decisions, rule ids, hashes."""
    where = EntryFilter(case_ref=case, message_id=message, event=event, rule=rule, since=since, until=until)
    return audit_of(request).entries(where, after, limit)


@audit_router.get("/messages/{message_id}", summary="A message's history on both nodes")
def audit_message_history(message_id: str, request: Request) -> dict[str, Any]:
    """This node's ledger entries about the message and the partner node's (fetched over the peer
    link; metadata only). ``partner_error`` says why the partner's part is missing, if it is."""
    node = node_of(request)
    own = audit_of(request).message_history(message_id)
    partner: list[dict[str, Any]] = []
    error = None
    transport = request.app.state.transport
    if transport is None:
        error = "no peer link in this process"
    else:
        try:
            partner = transport.message_history(message_id)
        except TransportError as exc:
            error = str(exc)
    return {
        "message_id": message_id,
        "nodes": {node.party: own, node.partner_party: partner},
        "partner_error": error,
    }


@audit_router.get("/checkpoints", summary="Signed checkpoints, cosignatures, witnessed checkpoints")
def audit_checkpoints(request: Request) -> dict[str, Any]:
    return audit_of(request).checkpoints()


@audit_router.get("/proofs/inclusion", summary="Inclusion proof of an entry")
def audit_inclusion(
    request: Request, seq: Annotated[int, Query(ge=0)], size: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    return audit_of(request).inclusion(seq, size)


@audit_router.get("/proofs/consistency", summary="Consistency proof between two tree sizes")
def audit_consistency(
    request: Request, old: Annotated[int, Query(ge=1)], new: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    return audit_of(request).consistency(old, new)


@audit_router.post("/verify", summary="Verify the whole ledger now")
def audit_verify(request: Request) -> dict[str, Any]:
    """Recompute the tree and check every checkpoint and cosignature; names the first failure."""
    try:
        report = audit_of(request).verify()
    except LedgerIntegrityError as exc:
        return {"ok": False, "error": str(exc), "first_bad_entry": exc.seq}
    return {
        "ok": True,
        "summary": report.summary(),
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "cosignatures": report.cosignatures,
        "witnessed": report.witnessed,
    }


@audit_router.get("/export", summary="Download an audit bundle")
def audit_export(
    request: Request,
    start: Annotated[int, Query(alias="from", ge=0)] = 0,
    end: Annotated[int | None, Query(alias="to")] = None,
) -> JSONResponse:
    """Entries, the signed and cosigned checkpoint, and the range proof, for offline verification
    with ``exchange audit verify --bundle FILE --agreement AGREEMENT``."""
    bundle = audit_of(request).export(start, end)
    name = f"audit-{bundle['party']}-{bundle['range']['start']}-{bundle['range']['end']}.json"
    return JSONResponse(bundle, headers={"content-disposition": f'attachment; filename="{name}"'})


console_router = APIRouter(tags=["auditors"], dependencies=[Depends(auditor)])
CONSOLE_HTML = files("exchange.api").joinpath("static/audit.html")
CONSOLE_CSP = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"


@console_router.get("/audit", summary="The auditor console (HTML)", response_class=HTMLResponse)
def audit_console() -> HTMLResponse:
    """A browser console over the audit API, for clients registered with the AUDITOR role."""
    return HTMLResponse(
        CONSOLE_HTML.read_text(),
        headers={"content-security-policy": CONSOLE_CSP},
    )
