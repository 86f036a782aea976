"""Conversions between stored rows and the values the services hand out.

Views returned to local systems never contain the envelope; only :func:`inbox_item` carries
content, decrypted for a release the policy allowed.
"""

from __future__ import annotations

from typing import Any

from exchange.agreement import Agreement
from exchange.policy import Actor
from exchange.types import PartyId


def message_row(
    message: dict[str, Any],
    *,
    direction: str,
    local_level: str,
    status: str,
    envelope: str,
    envelope_sha256: str,
    submitted_by: str | None,
    now: str,
) -> dict[str, Any]:
    """The ``messages`` row for a signed message: metadata only, content inside ``envelope``."""
    cls = message["classification"]
    return {
        "id": message["id"],
        "direction": direction,
        "type": message["type"],
        "case_ref": message["case_ref"],
        "thread_id": message["thread_id"],
        "in_reply_to": message.get("in_reply_to"),
        "sender": message["sender"],
        "recipient": message["recipient"],
        "scheme": cls["scheme"],
        "level": cls["level"],
        "common_level": cls["common"],
        "local_level": local_level,
        "tlp": message["tlp"],
        "handling_codes": list(message["handling_codes"]),
        "purposes": list(message["purposes"]),
        "agreement_version": message["agreement"]["version"],
        "created_at": message["created_at"],
        "submitted_by": submitted_by,
        "status": status,
        "envelope": envelope,
        "envelope_sha256": envelope_sha256,
        "updated_at": now,
    }


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
        "agreement_version": row["agreement_version"],
        "created_at": row["created_at"],
    }


def status_view(row: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /v1/messages/{id}`` shows: metadata, status, reason and receipt."""
    view = _metadata(row)
    view.update(
        status=row["status"],
        status_reason=row["status_reason"],
        attempts=row["attempts"],
        envelope_sha256=row["envelope_sha256"],
        receipt=(
            {"jws": row["receipt"], "received_at": row["receipt_at"]} if row["receipt"] is not None else None
        ),
        updated_at=row["updated_at"],
    )
    return view


def inbox_item(row: dict[str, Any], message: dict[str, Any], cursor: int) -> dict[str, Any]:
    """One released message: metadata, the decrypted payload and its cursor."""
    item = _metadata(row)
    item.update(
        cursor=cursor,
        legal_basis=message.get("legal_basis", []),
        priority=message.get("priority"),
        response_due=message.get("response_due"),
        origin=message.get("origin"),
        payload=message["payload"],
    )
    return item


def actor_from_row(agreement: Agreement, party: PartyId, row: dict[str, Any]) -> Actor | None:
    """The Actor for a client row; None if its clearance is not a level of the node's scheme."""
    scheme = agreement.schemes[agreement.parties[party].scheme]
    common = scheme.levels.get(row["clearance"])
    if common is None:
        return None
    return Actor(
        client_id=row["id"],
        agency=row["agency"],
        unit=row["unit"],
        roles=tuple(row["roles"]),
        clearance=common,
        message_types=tuple(row["message_types"]),
        purposes=tuple(row["purposes"]),
    )
