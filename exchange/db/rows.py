"""Conversions between stored rows and the values the services hand out.

Views returned to local systems never contain the envelope; only :func:`inbox_item` carries
content, decrypted and redacted for a release the policy allowed. A row stores what release
decisions read without decrypting (roles, categories, addressing), never a personal value.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

from exchange.agreement import Agreement
from exchange.messages import Message, Origin
from exchange.policy import Actor, Decision, Marking, Redaction, national_equivalent
from exchange.types import PartyId

ALL = "ALL"  # a client entitled to every type, purpose or case says so explicitly


def message_row(
    message: Message,
    *,
    direction: str,
    decision: Decision,
    local_level: str,
    status: str,
    envelope: str | None,
    envelope_sha256: str,
    submitted_by: str | None,
    now: str,
) -> dict[str, Any]:
    """The ``messages`` row: metadata and the protection decided (level, TLP, handling codes)."""
    assert message.marking is not None
    assert decision.level is not None
    assert decision.tlp is not None
    return {
        "id": message.id,
        "direction": direction,
        "type": message.type,
        "case_ref": message.case_ref,
        "thread_id": message.thread_id,
        "in_reply_to": message.in_reply_to,
        "sender": message.sender,
        "recipient": message.recipient,
        "scheme": message.marking.scheme,
        "level": message.marking.level,
        "common_level": decision.level,
        "local_level": local_level,
        "tlp": decision.tlp,
        "handling_codes": list(decision.handling_codes),
        "purposes": list(message.purposes),
        "agreement_version": message.agreement_version,
        "created_at": message.created_at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "submitted_by": submitted_by,
        "status": status,
        "envelope": envelope,
        "envelope_sha256": envelope_sha256,
        "updated_at": now,
        "addressed_to": list(message.addressed_to),
        "recipients": list(message.recipients),
        "subject_roles": sorted(message.subject_roles),
        "categories": sorted(message.categories),
        "mla_reference": message.mla_reference,
        "response_due": message.response_due.isoformat() if message.response_due else None,
        "origin_agency": message.origin.agency,
        "origin_unit": message.origin.unit,
    }


def message_view(row: dict[str, Any]) -> Message:
    """A metadata-only Message of a stored row (no payload): enough for release decisions that need
    no redaction, without decrypting. Its marking is the protection decided, not the originator's."""
    return Message(
        id=row["id"],
        type=row["type"],
        sender=row["sender"],
        recipient=row["recipient"],
        created_at=dt.datetime.fromisoformat(row["created_at"]),
        agreement_version=row["agreement_version"],
        agreement_digest="",
        case_ref=row["case_ref"],
        thread_id=row["thread_id"],
        thread_ref=row["thread_id"],
        in_reply_to=row["in_reply_to"],
        purposes=tuple(row["purposes"]),
        marking=Marking(row["scheme"], row["level"], row["common_level"]),
        tlp=row["tlp"],
        handling_codes=tuple(row["handling_codes"]),
        legal_basis=(),
        grading=None,
        priority="",
        response_due=None,
        origin=Origin(agency="", unit=""),
        addressed_to=tuple(row["addressed_to"]),
        recipients=tuple(row["recipients"]),
        data_subjects=(),
        mla_reference=row["mla_reference"],
        checkpoint=None,
        payload={},
        protected=(),
        roles={},
        subject_roles=frozenset(row["subject_roles"]),
        categories=frozenset(row["categories"]),
    )


def as_protected_here(row: dict[str, Any], message: Message) -> Message:
    """The stored message with the protection this node decided for it (its floors, the
    originator's reclassifications, a reply's addressee), not the marking its sender signed: what
    every release is decided on."""
    view = message_view(row)
    return replace(
        message,
        marking=view.marking,
        tlp=view.tlp,
        handling_codes=view.handling_codes,
        addressed_to=view.addressed_to,
    )


def _metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "type": row["type"],
        "direction": row["direction"],
        "case_ref": row["case_ref"],
        "thread_id": row["thread_id"],
        "in_reply_to": row["in_reply_to"],
        "sender": row["sender"],
        "recipient": row["recipient"],
        "classification": {
            "scheme": row["scheme"],
            "level": row["level"],
            "common": row["common_level"],
            "local_equivalent": row["local_level"],
        },
        "tlp": row["tlp"],
        "handling_codes": row["handling_codes"],
        "purposes": row["purposes"],
        "addressed_to": row["addressed_to"],
        "recipients": row["recipients"],
        "agreement_version": row["agreement_version"],
        "created_at": row["created_at"],
    }


def status_view(row: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /v1/messages/{id}`` shows: metadata, status, reason and receipt."""
    view = _metadata(row)
    view.update(
        status=row["status"],
        status_reason=row["status_reason"],
        destroyed=(
            {"at": row["destroyed_at"], "reason": row["destroyed_reason"]} if row["destroyed_at"] else None
        ),
        destroy_after=row["destroy_after"],
        attempts=row["attempts"],
        envelope_sha256=row["envelope_sha256"],
        receipt=(
            {"jws": row["receipt"], "received_at": row["receipt_at"]} if row["receipt"] is not None else None
        ),
        updated_at=row["updated_at"],
    )
    return view


def case_item(row: dict[str, Any]) -> dict[str, Any]:
    """One message of a case as a client sees it in the case listing (metadata only)."""
    item = _metadata(row)
    item["status"] = row["status"]
    return item


def inbox_item(
    row: dict[str, Any], message: Message, payload: dict[str, Any], decision: Decision, cursor: int
) -> dict[str, Any]:
    """One released message: metadata, the redacted payload, what was redacted, and its cursor."""
    item = content_view(row, message, payload, decision.redactions)
    item["cursor"] = cursor
    return item


def content_view(
    row: dict[str, Any], message: Message, payload: dict[str, Any], redactions: tuple[Redaction, ...]
) -> dict[str, Any]:
    """A message with its content as a local system may see it: metadata, markings, subjects, the
    (redacted) payload and what was redacted."""
    item = _metadata(row)
    item.update(
        legal_basis=list(message.legal_basis),
        grading=message.grading.model_dump(mode="json") if message.grading else None,
        priority=message.priority,
        response_due=message.response_due.isoformat() if message.response_due else None,
        origin=message.origin.model_dump(mode="json"),
        data_subjects=[s.model_dump(mode="json", exclude_none=True) for s in message.data_subjects],
        mla_reference=message.mla_reference,
        redacted=[{"path": r.pointer, "rule": r.rule} for r in redactions],
        payload=payload,
    )
    return item


def local_marking(agreement: Agreement, party: PartyId, common: str) -> str:
    """This node's national level protecting ``common`` (mapped up, never down)."""
    return national_equivalent(agreement, common, agreement.parties[party].scheme)


def _entitled(values: list[str], every: list[str] | tuple[str, ...]) -> frozenset[str]:
    return frozenset(every) if ALL in values else frozenset(values)


def actor_from_row(agreement: Agreement, party: PartyId, row: dict[str, Any]) -> Actor | None:
    """The Actor for a client row; None if its clearance is not a level of the node's scheme.

    ``ALL`` entitles to every type, purpose or case of the agreement; an empty list to nothing.
    """
    scheme = agreement.schemes[agreement.parties[party].scheme]
    common = scheme.levels.get(row["clearance"])
    if common is None:
        return None
    cases = list(row.get("cases") or [])
    return Actor(
        client_id=row["id"],
        agency=row["agency"],
        unit=row["unit"],
        roles=frozenset(row["roles"]),
        clearance=common,
        message_types=_entitled(row["message_types"], tuple(agreement.message_types)),
        purposes=_entitled(row["purposes"], tuple(agreement.purposes)),
        cases=None if ALL in cases else frozenset(cases),
        party=party,
        police=row["agency"] in agreement.organisations[party].police_agencies,
    )
