"""Messages from local systems: the submission body, payload schemas, and the signed message.

A submission is parsed once at the API edge (pydantic for the security metadata, the type's JSON
Schema in ``schemas/messages/`` for the payload); only the resulting signed-message dict moves on.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field, field_validator

from exchange.agreement import Agreement
from exchange.errors import ConfigurationError, FieldError, InvalidInput
from exchange.policy import Actor, Marking
from exchange.types import MessageId, PartyId

TLP = Literal["CLEAR", "GREEN", "AMBER", "AMBER+STRICT", "RED"]
MESSAGE_FORMAT = "exchange-message/1"


def data_dir(name: str) -> Path:
    """A top-level data folder of the project (``schemas``, ``migrations``), in a checkout or wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(f"cannot find the {name}/ folder next to the exchange package")


class ClassificationIn(BaseModel):
    """A classification in the sender's national scheme."""

    model_config = ConfigDict(extra="forbid")

    scheme: str = Field(examples=["POLRI"])
    level: str = Field(examples=["RAHASIA"])


class MessageSubmission(BaseModel):
    """What a local system POSTs to ``/v1/messages``."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(examples=["REQUEST_FOR_INFORMATION"])
    case_ref: str = Field(pattern=r"^[A-Z0-9][A-Z0-9/._-]{2,63}$", examples=["ID-MY/2026/0042"])
    purposes: list[str] = Field(min_length=1, examples=[["TIP_INVESTIGATION"]])
    classification: ClassificationIn
    tlp: TLP
    handling_codes: list[str] = Field(default_factory=list, examples=[["H0", "H2"]])
    legal_basis: list[str] = Field(default_factory=list, max_length=16)
    thread_id: str | None = Field(default=None, max_length=64)
    in_reply_to: str | None = Field(default=None, max_length=64)
    priority: Literal["ROUTINE", "URGENT"] = "ROUTINE"
    response_due: dt.datetime | None = None
    payload: dict[str, Any]

    @field_validator("response_due")
    @classmethod
    def _due_is_future_and_zoned(cls, value: dt.datetime | None) -> dt.datetime | None:
        """A deadline names its time zone and lies ahead (checked at the API edge, on arrival)."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("must name its time zone (Z or +07:00)")
        if value <= dt.datetime.now(dt.UTC):
            raise ValueError("is in the past")
        return value


@functools.cache
def _validator(schema_file: str) -> Draft202012Validator:
    path = data_dir("schemas") / "messages" / schema_file
    try:
        schema = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot load payload schema {path}: {exc}") from exc
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_payload(agreement: Agreement, message_type: str, payload: dict[str, Any]) -> None:
    """Validate a payload against its type's JSON Schema.

    Raises:
        InvalidInput: one FieldError per violation, located as ``payload/<json pointer>``.
    """
    spec = agreement.message_types.get(message_type)
    if spec is None:
        raise InvalidInput(
            "unknown message type",
            [FieldError("type", f"{message_type!r} is not one of {sorted(agreement.message_types)}")],
        )
    errors = sorted(_validator(spec.schema_file).iter_errors(payload), key=lambda e: list(e.absolute_path))
    if errors:
        raise InvalidInput(
            f"the payload does not match the {message_type} schema",
            [FieldError("/".join(["payload", *map(str, e.absolute_path)]), e.message) for e in errors],
        )


def build_message(
    submission: MessageSubmission,
    *,
    agreement: Agreement,
    sender: PartyId,
    actor: Actor,
    marking: Marking,
    now: dt.datetime,
    message_id: MessageId | None = None,
    thread_id: str | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """The message as it is signed: submission, marking, parties, agreement identity, time, and the
    sender's latest signed ledger checkpoint (so the receiver catches a rollback or split view)."""
    mid = message_id or MessageId(str(uuid.uuid4()))
    return {
        "format": MESSAGE_FORMAT,
        "id": mid,
        "type": submission.type,
        "sender": sender,
        "recipient": agreement.partner_of(sender),
        "created_at": now.astimezone(dt.UTC).isoformat(timespec="microseconds"),
        "agreement": {"version": agreement.version, "digest": agreement.digest},
        "case_ref": submission.case_ref,
        "thread_id": thread_id or submission.thread_id or mid,
        "in_reply_to": submission.in_reply_to,
        "purposes": list(submission.purposes),
        "classification": {"scheme": marking.scheme, "level": marking.level, "common": marking.common},
        "tlp": submission.tlp,
        "handling_codes": sorted(set(submission.handling_codes)),
        "legal_basis": list(submission.legal_basis),
        "priority": submission.priority,
        "response_due": submission.response_due.isoformat() if submission.response_due else None,
        "origin": {"agency": actor.agency, "unit": actor.unit},
        "checkpoint": checkpoint,
        "payload": submission.payload,
    }
