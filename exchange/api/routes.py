"""HTTP routes. Handlers are thin: authenticate, parse, call the node, shape the answer."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import logging
import re
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from exchange.api import models
from exchange.api.audit_models import (
    AuditBundle,
    Checkpoints,
    ConsistencyProof,
    EntriesPage,
    InclusionProof,
    MessageHistory,
    Verification,
)
from exchange.api.auth import auditor, in_peer_thread, known_caller, local_client, node_of, partner_node
from exchange.api.problems import problem
from exchange.auditing import AuditService, EntryFilter, partner_history
from exchange.checkpoints import CheckpointService
from exchange.db import repo
from exchange.errors import CheckpointConflict, FieldError, InvalidInput, LedgerIntegrityError, TransportError
from exchange.idempotency import HEADER as IDEMPOTENCY_HEADER
from exchange.idempotency import IdempotentSubmission
from exchange.keys.announcement import AnnouncementRejected
from exchange.keys.inventory import certificate_health
from exchange.ledger.checkpoint import CheckpointError, parse_body, split_note
from exchange.ledger.witness_protocol import (
    ADD_CHECKPOINT,
    SIZE_MEDIA_TYPE,
    encode_size,
    parse_add_checkpoint,
)
from exchange.messages import MessageSubmission
from exchange.observability import logs
from exchange.policy import Actor

log = logging.getLogger("exchange.api")

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
COMMON_PROBLEMS: dict[int | str, dict[str, Any]] = {
    403: {"description": "Certificate not registered, or refused by policy (names every rule)", **PROBLEM},
    422: {"description": "Invalid request (names every invalid field)", **PROBLEM},
}

client_router = APIRouter(prefix="/v1", tags=["local systems"], responses=COMMON_PROBLEMS)
peer_router = APIRouter(prefix="/v1/peer", tags=["partner node"], dependencies=[Depends(partner_node)])
health_router = APIRouter(
    tags=["operations"], dependencies=[Depends(known_caller)], responses=COMMON_PROBLEMS
)
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


class Raised(BaseModel):
    rule: str
    version: str = Field(description="id@version of the rule")
    kind: str = Field(description="level, tlp or handling")
    from_: str = Field(alias="from")
    to: str
    reason: str


class Replaced(BaseModel):
    path: str = Field(description="where in the message a value was replaced (never the value)")
    rule: str


class Accepted(BaseModel):
    id: str
    status: str
    thread_id: str
    classification: dict[str, Any] = Field(
        description="the final marking in this node's scheme and its equivalent in the partner's"
    )
    tlp: str
    handling_codes: list[str]
    raised: list[Raised] = Field(description="every floor that raised the marking, with its rule and reason")
    replaced: list[Replaced] = Field(description="identities replaced before sealing (an informant's)")
    envelope_sha256: str


@client_router.post("/messages", status_code=202, response_model=Accepted, summary="Submit a message")
def submit_message(
    submission: MessageSubmission,
    actor: LocalClient,
    request: Request,
    idempotency_key: Annotated[
        str | None, Header(alias=IDEMPOTENCY_HEADER, description=IDEMPOTENCY_DOC)
    ] = None,
) -> JSONResponse:
    """Validate, classify, apply the agreement's rules, seal and queue a message for the partner.

    Answers 202 with the message id, its final classification (in both national schemes) and every
    floor that raised it, or a problem naming every invalid field (422) or every rule that refused
    with what would satisfy it (403). With an
    ``Idempotency-Key``, a retry answers the original 202 (``Idempotent-Replayed: true``).
    """
    node = node_of(request)
    accepted, replayed = IdempotentSubmission(node).submit(actor, submission, idempotency_key, _now())
    # Node.submit builds the answer in Accepted's shape (the e2e idempotency test validates it
    # against the model); answering it as it is spares validating our own output on every message
    response = JSONResponse(accepted, status_code=202)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        request.app.state.worker_wake()
        log.info(
            "accepted message %s",
            accepted["id"],
            extra=logs.fields(
                logs.Event.MESSAGE_ACCEPTED, message_id=accepted["id"], client_id=actor.client_id
            ),
        )
    return response


@client_router.get(
    "/messages/{message_id}", summary="Status of a message", response_model=models.MessageStatus
)
def message_status(message_id: str, actor: LocalClient, request: Request) -> dict[str, Any]:
    """queued, sent, delivered (with the partner's signed receipt) or failed (with the reason)."""
    return node_of(request).status(actor, message_id, _now())


@client_router.get("/cases/{case_ref:path}", summary="A case with its messages, in this client's view")
def case_view(case_ref: str, actor: LocalClient, request: Request) -> dict[str, Any]:
    """Every message of the case this system may see (sent by it, or released to it by the rules),
    oldest first, metadata only; 404 if it may see none."""
    return node_of(request).case(actor, case_ref, _now())


@client_router.get("/inbox", summary="Pull received messages", response_model=models.InboxPage)
def inbox(
    actor: LocalClient,
    request: Request,
    after: Annotated[
        int, Query(ge=0, le=models.MAX_INT64, description="cursor: next_cursor of the previous page")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    purpose: Annotated[
        list[str] | None, Query(description="the use of this pull (default: the client's purposes)")
    ] = None,
) -> dict[str, Any]:
    """Messages from the partner this system may receive, in order, from the cursor on, each with
    its marking in both schemes and the paths the rules redacted. Every release is ledgered with the
    rules that decided it, and every refusal once on the same grounds."""
    node = node_of(request)
    unknown = [p for p in purpose or [] if p not in node.agreement.purposes]
    if unknown:
        raise InvalidInput("unknown purpose", [FieldError("purpose", f"{unknown} not among the purposes")])
    use = frozenset(purpose) if purpose else None
    page = node.inbox(actor, after, min(limit, node.settings.inbox_page_max), _now(), use)
    return {"items": page.items, "next_cursor": page.next_cursor}


class EnvelopeBatch(BaseModel):
    envelopes: list[str] = Field(min_length=1, max_length=1000)


@peer_router.post(
    "/envelopes",
    summary="Deliver envelopes (partner node only)",
    response_model=models.EnvelopeResults,
    response_model_exclude_none=True,
)
async def receive_envelopes(batch: EnvelopeBatch, request: Request) -> dict[str, Any]:
    """One result per envelope, in order: ``accepted`` with a signed receipt, or ``rejected``."""
    results = await in_peer_thread(request, node_of(request).receive, batch.envelopes, _now())
    return {
        "results": [
            {"status": "accepted", "receipt": r.receipt} if r.accepted else {"status": "rejected"}
            for r in results
        ]
    }


@peer_router.get(
    "/audit/messages/{message_id}",
    summary="This node's record of a message (partner node only)",
    response_model=models.LedgerEntries,
)
async def peer_message_history(message_id: str, request: Request) -> dict[str, Any]:
    """For the partner's auditors: this node's ledger entries about one message, metadata only."""
    return {"entries": await in_peer_thread(request, audit_of(request).message_history, message_id)}


class KeySetAnnouncements(BaseModel):
    announcements: list[str] = Field(
        min_length=1, max_length=100, description="signed key-set versions, oldest first (JWS JSON)"
    )


@peer_router.post(
    "/key-sets",
    summary="Announce key sets (partner node only)",
    response_model=models.KeySetReceipt,
    responses={
        409: {"description": "a version is refused (names why); nothing after it is taken", **PROBLEM}
    },
)
async def receive_key_sets(body: KeySetAnnouncements, request: Request) -> Any:
    """Accept the partner's key-set versions, each on top of the last trusted one (TUF rules:
    no rollback, replay or skipped version; signed by the old and the new signing keys), and answer
    with this node's signed receipt of the version now trusted."""
    node = node_of(request)
    try:
        return {"receipt": await in_peer_thread(request, node.accept_key_sets, body.announcements, _now())}
    except AnnouncementRejected as exc:
        return problem(409, "key-set-refused", "The key set is refused", str(exc))


@peer_router.get(
    "/key-sets", summary="This node's key sets (partner node only)", response_model=models.KeySets
)
async def key_sets(request: Request, after: Annotated[int, Query(ge=0, le=1_000_000)] = 0) -> dict[str, Any]:
    """Every version of this node's key set after ``after``, oldest first: a partner that met a
    key id it did not know walks them from the version it trusts."""
    node = node_of(request)
    return {
        "announcements": await in_peer_thread(request, node.registry.announcements_after, node.party, after)
    }


WITNESS_STATUS = {"bad-request": 400, "inconsistent": 422}
WITNESS_PATH = "/witness" + ADD_CHECKPOINT  # under /v1/peer: its body is the spec's text, not JSON


@peer_router.post(
    WITNESS_PATH,
    summary="C2SP tlog-witness add-checkpoint (partner node only)",
    response_class=PlainTextResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "old <size>, consistency proof lines (base64), an empty line, the checkpoint",
        }
    },
    responses={
        200: {"description": "the cosignature line(s)", "content": {"text/plain": {}}},
        400: {"description": "malformed, or an old size beyond the checkpoint", **PROBLEM},
        403: {"description": "not signed by the partner's pinned checkpoint key", **PROBLEM},
        404: {"description": "a checkpoint of another log than the partner's", **PROBLEM},
        409: {
            "description": "the witness's size (old size mismatch, or a fork)",
            "content": {SIZE_MEDIA_TYPE: {}},
        },
        422: {"description": "the consistency proof does not verify (an incident)", **PROBLEM},
        502: {
            "description": "signed by a key not known here, and the partner's key sets could not be"
            " fetched: neither refused nor cosigned yet, ask again",
            **PROBLEM,
        },
    },
)
async def witness_add_checkpoint(request: Request) -> Response:
    """Cosign the partner's checkpoint as a C2SP tlog-witness (https://c2sp.org/tlog-witness) if it
    is consistent with the last one witnessed. A fork, a rollback or a failed proof is refused and
    ledgered as a security incident."""
    try:
        add = parse_add_checkpoint(await request.body())
        origin, size, _, _ = parse_body(split_note(add.note)[0])
    except CheckpointError as exc:
        return problem(400, "invalid-checkpoint", "Malformed add-checkpoint request", str(exc))
    service = checkpoints_of(request)
    if origin != node_of(request).partner.ledger_origin:
        return problem(404, "unknown-log", "Unknown log", "this node witnesses only its partner's log")
    try:
        line = await in_peer_thread(request, service.witness, add.note, add.old_size, add.proof, _now())
    except CheckpointError as exc:
        return problem(403, "invalid-checkpoint", "The checkpoint is not validly signed", str(exc))
    except CheckpointConflict as exc:
        status = WITNESS_STATUS.get(exc.reason, 409)
        if exc.reason == "rollback" and add.old_size > size:
            status = 400  # the spec's first check: an old size beyond the checkpoint
        if status == 409:
            # exactly the media type the spec names (Starlette would append a charset to a text/ type)
            return Response(encode_size(exc.witnessed_size), 409, headers={"content-type": SIZE_MEDIA_TYPE})
        return problem(status, "checkpoint-conflict", "The checkpoint is refused", str(exc))
    return PlainTextResponse(line + "\n")


@health_router.get("/healthz", summary="Liveness and a few gauges", response_model=models.Health)
def health(request: Request) -> dict[str, Any]:
    """For the partner node and registered clients of any role (a monitoring system's probe
    included); any other certificate is refused 403."""
    node = node_of(request)
    held = node.agreements.history()  # one view for the version in force and the versions held
    terms = held.in_force(_now())
    with node.db.read() as conn:
        outbox = repo.outbox_size(conn)
        head = repo.read_ledger_head(conn)
    status = checkpoints_of(request).status()
    settings = node.settings
    certificates = certificate_health(
        settings.tls_dir, node.agreement, node.party, _now(), settings.expiry_warning_days
    )
    return {
        "status": "warning" if any(c["expiring"] for c in certificates) else "ok",
        "certificates": certificates,
        "party": node.party,
        "agreement": {
            "version": terms.version,
            "digest": terms.agreement.digest,
            "held": [t.version for t in held.versions],
        },
        "outbox": outbox,
        "ledger_size": head.size,
        "checkpoint_size": status["latest"]["size"] if status["latest"] else 0,
        "cosigned_size": status["latest_cosigned"]["size"] if status["latest_cosigned"] else 0,
        "partner_witnessed_size": status["partner_witnessed"]["size"] if status["partner_witnessed"] else 0,
        "overdue_requests": len(node.deadlines.open_requests(_now(), overdue_only=True)),
        "key_sets": {
            "version": node.registry.history(node.party).version,
            "unacknowledged": len(node.registry.unacknowledged()),
            "partner_version": node.partner.history.version,
        },
    }


def audit_of(request: Request) -> AuditService:
    service: AuditService = request.app.state.audit
    return service


@audit_router.get("/entries", summary="Ledger entries (no content)", response_model=EntriesPage)
def audit_entries(
    request: Request,
    case: str | None = None,
    message: str | None = None,
    event: str | None = None,
    rule: str | None = None,
    since: Annotated[models.RFC3339, Query(description="RFC 3339 time, inclusive")] = None,
    until: Annotated[models.RFC3339, Query(description="RFC 3339 time, exclusive")] = None,
    after: Annotated[
        int, Query(ge=-1, le=models.MAX_INT64, description="cursor: next_cursor of the previous page")
    ] = -1,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Entries matching every filter given: ids, case references, decisions, rule ids, hashes."""
    where = EntryFilter(case_ref=case, message_id=message, event=event, rule=rule, since=since, until=until)
    return audit_of(request).entries(where, after, limit)


@audit_router.get(
    "/messages/{message_id}", summary="A message's history on both nodes", response_model=MessageHistory
)
def audit_message_history(message_id: str, request: Request) -> dict[str, Any]:
    """This node's ledger entries about the message and the partner node's (fetched over the peer
    link; metadata only; each of the partner's rebuilt from its leaf, its inclusion in the partner's
    log not proven here: the partner's audit bundle proves it). ``partner_error`` says why the
    partner's part is missing, if it is."""
    node = node_of(request)
    own = audit_of(request).message_history(message_id)
    partner: list[dict[str, Any]] = []
    error = None
    transport = request.app.state.transport
    if transport is None:
        error = "no peer link in this process"
    else:
        try:
            partner = partner_history(transport.message_history(message_id), message_id)
        except TransportError as exc:
            error = str(exc)
        except LedgerIntegrityError as exc:  # shown as the partner's error, never as its history
            error = f"the partner's answer is refused: {exc}"
    return {
        "message_id": message_id,
        "nodes": {node.party: own, node.partner_party: partner},
        "partner_error": error,
    }


@audit_router.get(
    "/checkpoints",
    summary="Signed checkpoints, cosignatures, witnessed checkpoints, verifier keys",
    response_model=Checkpoints,
)
def audit_checkpoints(
    request: Request,
    before: Annotated[int | None, Query(ge=1, le=models.MAX_INT64, description="sizes below this")] = None,
    witnessed_before: Annotated[
        int | None, Query(ge=1, le=models.MAX_INT64, description="witnessed sizes below this")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The newest checkpoints this node signed with their cosignatures, the newest partner
    checkpoints it witnessed (``limit`` of each, oldest first; ``next_before`` and
    ``next_witnessed_before`` page back), and the note verifier keys (name+keyid+base64) that
    check them."""
    return audit_of(request).checkpoints(before=before, witnessed_before=witnessed_before, limit=limit)


@audit_router.get("/proofs/inclusion", summary="Inclusion proof of an entry", response_model=InclusionProof)
def audit_inclusion(
    request: Request,
    seq: Annotated[int, Query(ge=0, le=models.MAX_INT64)],
    size: Annotated[int | None, Query(ge=1, le=models.MAX_INT64)] = None,
) -> dict[str, Any]:
    return audit_of(request).inclusion(seq, size)


@audit_router.get(
    "/proofs/consistency", summary="Consistency proof between two tree sizes", response_model=ConsistencyProof
)
def audit_consistency(
    request: Request,
    old: Annotated[int, Query(ge=1, le=models.MAX_INT64)],
    new: Annotated[int | None, Query(ge=1, le=models.MAX_INT64)] = None,
) -> dict[str, Any]:
    return audit_of(request).consistency(old, new)


@audit_router.post("/verify", summary="Verify the whole ledger now", response_model=Verification)
def audit_verify(request: Request) -> dict[str, Any]:
    """Recompute the tree, walk both key-set histories, check every checkpoint and cosignature by
    the keys in force when it was made (names the first failure), and list every entry signed by a
    key not in force when it signed (``flagged``; ``ok`` is then false)."""
    try:
        report = audit_of(request).verify()
    except LedgerIntegrityError as exc:
        return {"ok": False, "error": str(exc), "first_bad_entry": exc.seq}
    flagged = [dataclasses.asdict(f) for f in report.flagged]
    return {
        "ok": not flagged,
        "summary": report.summary(),
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "cosignatures": report.cosignatures,
        "witness_cosignatures": dict(report.witness_cosignatures),
        "witnessed": report.witnessed,
        "key_versions": dict(report.key_versions),
        "flagged": flagged,
        "error": f"{len(flagged)} entries signed by a key not in force when it signed" if flagged else None,
    }


@audit_router.get("/export", summary="Download an audit bundle", response_model=AuditBundle)
def audit_export(
    request: Request,
    start: Annotated[int, Query(alias="from", ge=0, le=models.MAX_INT64)] = 0,
    end: Annotated[int | None, Query(alias="to", ge=1, le=models.MAX_INT64)] = None,
) -> JSONResponse:
    """Entries with their RFC 9162 inclusion proofs, the cosigned checkpoint and a consistency proof
    (schemas/audit-bundle.schema.json), for offline verification with
    ``exchange audit verify --bundle FILE --agreement AGREEMENT`` or public tools."""
    bundle = audit_of(request).export(start, end)
    first, last = bundle["entries"][0]["index"], bundle["entries"][-1]["index"]
    name = f"audit-{bundle['party']}-{first}-{last + 1}.json"
    return JSONResponse(bundle, headers={"content-disposition": f'attachment; filename="{name}"'})


console_router = APIRouter(tags=["auditors"], dependencies=[Depends(auditor)])
CONSOLE_HTML = files("exchange.api").joinpath("static/audit.html").read_text()


def _inline_hashes(html: str, tag: str) -> str:
    """The CSP source list allowing exactly the inline ``<tag>`` blocks of ``html`` (by SHA-256)."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks
    )


#: only the console's own script and style run (never an injected one), it talks to this node only,
#: and no form or <base> sends anything elsewhere
CONSOLE_CSP = (
    f"default-src 'none'; connect-src 'self'; script-src {_inline_hashes(CONSOLE_HTML, 'script')};"
    f" style-src {_inline_hashes(CONSOLE_HTML, 'style')}; base-uri 'none'; form-action 'self'"
)


CONSOLE_PATH = "/audit"


@console_router.get(CONSOLE_PATH, summary="The auditor console (HTML)", response_class=HTMLResponse)
def audit_console() -> HTMLResponse:
    """A browser console over the audit API, for clients registered with the AUDITOR role."""
    return HTMLResponse(CONSOLE_HTML, headers={"content-security-policy": CONSOLE_CSP})
