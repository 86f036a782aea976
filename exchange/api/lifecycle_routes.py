"""HTTP routes after delivery: a message's content, consent requests and decisions, onward
releases, reclassification, return-or-destroy, and requests awaiting an answer. Thin: authenticate,
parse, call the node's lifecycle use cases (``exchange.lifecycle``), shape the answer."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from exchange.api.auth import local_client, node_of
from exchange.lifecycle import IncidentNotice
from exchange.policy import Actor

PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}
router = APIRouter(
    prefix="/v1",
    tags=["after delivery"],
    responses={
        403: {
            "description": "Not registered, or refused by the agreement's rules (names every rule)",
            **PROBLEM,
        },
        404: {"description": "No such message or request for this system", **PROBLEM},
        410: {"description": "The message's content was destroyed (when and why)", **PROBLEM},
        422: {"description": "Invalid request (names every invalid field)", **PROBLEM},
    },
)
LocalClient = Annotated[Actor, Depends(local_client)]
Purpose = Annotated[str, Field(max_length=64)]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ConsentRequestBody(BaseModel):
    recipient: Annotated[str, Field(max_length=64)] | None = Field(
        default=None, description="a third party of the agreement; none for this police's own use (judicial)"
    )
    purposes: list[Purpose] = Field(min_length=1, max_length=16)
    justification: Annotated[str, Field(min_length=1, max_length=2000, description="no identities")]


class ConsentDecisionBody(BaseModel):
    decision: Literal["GRANTED", "REFUSED"]
    conditions: Annotated[str, Field(max_length=2000)] | None = None
    expires_at: dt.datetime | None = Field(default=None, description="required for a grant: a future time")


class OnwardReleaseBody(BaseModel):
    recipient: Annotated[str, Field(max_length=64, description="a third party of the agreement")]
    purposes: list[Purpose] = Field(min_length=1, max_length=16)


class ReclassificationBody(BaseModel):
    level: Annotated[str, Field(max_length=64, description="a level of this node's scheme")]
    reason: Annotated[str, Field(min_length=1, max_length=2000)]


class ReturnOrDestroyBody(BaseModel):
    reason: Annotated[
        str,
        Field(
            min_length=1,
            max_length=2000,
            description="why the partner must destroy it: sealed in the request, never written in clear;"
            " the partner's readers learn only that the originator asked, and which request",
        ),
    ]


@router.get("/messages/{message_id}/content", summary="A message's content, as this system may see it")
def message_content(message_id: str, actor: LocalClient, request: Request) -> dict[str, Any]:
    """The sender reads what it sent; a received message is released by the rules (redacted,
    ledgered). 410 with when and why if its content was destroyed."""
    return node_of(request).read(actor, message_id, _now())


@router.post(
    "/messages/{message_id}/consent-requests", status_code=201, summary="Ask the originator's consent"
)
def request_consent(
    message_id: str, body: ConsentRequestBody, actor: LocalClient, request: Request
) -> dict[str, Any]:
    """Ask the originating node to allow passing a received message to a third party, or a use such
    as judicial evidence; the request travels signed to the originator and shows as pending."""
    return node_of(request).lifecycle.request_consent(
        actor,
        message_id,
        recipient=body.recipient,
        purposes=body.purposes,
        justification=body.justification,
        now=_now(),
    )


@router.get("/consent-requests", summary="Consent requests, with their age")
def consent_requests(
    actor: LocalClient,
    request: Request,
    status: Annotated[Literal["pending", "granted", "refused", "revoked"] | None, Query()] = None,
) -> dict[str, Any]:
    """Requests about this node's messages (for the agreement's consent deciders) and this system's
    own requests to the partner."""
    return {"items": node_of(request).lifecycle.consent_requests(actor, _now(), status=status)}


@router.post("/consent-requests/{request_id}/decision", summary="Grant or refuse a consent request")
def decide_consent(
    request_id: str, body: ConsentDecisionBody, actor: LocalClient, request: Request
) -> dict[str, Any]:
    return node_of(request).lifecycle.decide_consent(
        actor,
        request_id,
        grant=body.decision == "GRANTED",
        conditions=body.conditions,
        expires_at=body.expires_at,
        now=_now(),
    )


@router.post("/consent-requests/{request_id}/revocation", summary="Revoke a granted consent")
def revoke_consent(request_id: str, actor: LocalClient, request: Request) -> dict[str, Any]:
    return node_of(request).lifecycle.revoke_consent(actor, request_id, _now())


@router.post("/messages/{message_id}/releases", summary="Release a received message to a third party")
def release_onward(
    message_id: str, body: OnwardReleaseBody, actor: LocalClient, request: Request
) -> dict[str, Any]:
    """Allowed only under an unexpired consent of the originator naming that recipient and purpose
    (and never for TLP:RED or AMBER+STRICT); answers the content as it may be passed on."""
    return node_of(request).lifecycle.release_onward(
        actor, message_id, recipient=body.recipient, purposes=body.purposes, now=_now()
    )


@router.post("/messages/{message_id}/reclassification", summary="Reclassify a message this system sent")
def reclassify(
    message_id: str, body: ReclassificationBody, actor: LocalClient, request: Request
) -> dict[str, Any]:
    return node_of(request).lifecycle.reclassify(
        actor, message_id, level=body.level, reason=body.reason, now=_now()
    )


@router.post(
    "/messages/{message_id}/return-or-destroy",
    status_code=202,
    summary="Ask the partner to destroy a message",
)
def return_or_destroy(
    message_id: str, body: ReturnOrDestroyBody, actor: LocalClient, request: Request
) -> dict[str, Any]:
    """The partner destroys the message's content and answers with a signed destruction certificate."""
    return node_of(request).lifecycle.return_or_destroy(actor, message_id, reason=body.reason, now=_now())


class IncidentBody(BaseModel):
    kind: Literal["UNAUTHORISED_ACCESS", "DISCLOSURE", "LOSS", "KEY_COMPROMISE", "OTHER"]
    message_ids: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=1000)
    detected_at: dt.datetime
    personal_data: bool = Field(description="personal data is affected (UU 27/2022: a 72-hour notice)")
    summary: Annotated[str, Field(min_length=1, max_length=2000, description="no identities")]


@router.post("/incidents", status_code=202, summary="Notify the originator of a security incident")
def notify_incident(body: IncidentBody, actor: LocalClient, request: Request) -> dict[str, Any]:
    """For this node's consent deciders: tell the partner that messages it sent were accessed or
    disclosed without authority. Both nodes ledger the incident."""
    notice = IncidentNotice(
        kind=body.kind,
        message_ids=tuple(body.message_ids),
        detected_at=body.detected_at,
        personal_data=body.personal_data,
        summary=body.summary,
    )
    return node_of(request).lifecycle.notify_incident(actor, notice, _now())


@router.get("/requests", summary="Requests awaiting an answer (and the overdue ones)")
def open_requests(
    actor: LocalClient, request: Request, overdue: Annotated[bool, Query()] = False
) -> dict[str, Any]:
    """Requests with a response due and no answer that this system may see, with their age."""
    node, now = node_of(request), _now()
    found = node.deadlines.open_requests(now, overdue_only=overdue)
    return {"items": [r.view(now) for r in found if node.may_see(actor, r.row, now)]}
