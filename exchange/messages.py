"""Messages: the submission body, the signed form, and the typed :class:`Message` that moves on.

A message is parsed once wherever it enters: :func:`draft_from_submission` at the API edge (a
local system's JSON) and :func:`parse_signed` at admission (the verified JWS payload). Past those
edges only a :class:`Message` moves; nothing indexes a dict by string. Both parsers validate the
payload against its type's model in the catalogue and index its personal data by category and
data subject (:mod:`exchange.policy.redaction`), failing closed: a protected value that cannot be
attributed to a listed subject counts as a child victim's, and a victim younger than the
agreement's child age counts as a child whatever role the sender gave.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exchange.agreement import Agreement
from exchange.catalogue import (
    NON_PERSONAL_CATEGORIES,
    PAYLOAD_MODELS,
    PSEUDONYM_PATTERN,
    VICTIM_ROLES,
    Role,
    payload_schema,
)
from exchange.errors import ConfigurationError, FieldError, InvalidInput
from exchange.policy.classification import Marking, classify
from exchange.policy.redaction import ProtectedValue, Shape, protected_values, shape_of
from exchange.types import MessageId, PartyId

MESSAGE_FORMAT = "exchange-message/2"
#: the role a protected value counts as when no listed subject owns it (fail closed)
UNATTRIBUTED_ROLE = "VICTIM_CHILD"
Reference = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9/._:-]*$")]
CaseRef = Annotated[str, Field(pattern=r"^[A-Z0-9][A-Z0-9/._-]{2,63}$", examples=["ID-MY/2026/0042"])]


def data_dir(name: str) -> Path:
    """A top-level data folder of the project (``schemas``, ``migrations``), in a checkout or wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / name, here / "_data" / name):
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(f"cannot find the {name}/ folder next to the exchange package")


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClassificationIn(_Value):
    """A classification in the sender's national scheme."""

    scheme: str = Field(examples=["POLRI"])
    level: str = Field(examples=["RAHASIA"])


class Classification(_Value):
    """The originator's marking as signed, with its common level."""

    scheme: str
    level: str
    common: str


class Grading(_Value):
    """Intelligence grading: source reliability and information validity."""

    source: Literal["A", "B", "C", "X"]
    information: Literal[1, 2, 3, 4]


class Age(_Value):
    years: int | None = Field(default=None, ge=0, le=130)
    basis: Literal["DOCUMENTED", "ESTIMATED", "CLAIMED", "UNKNOWN"]


class DataSubject(_Value):
    """A person the message speaks of, by pseudonym and role; never by identity."""

    pseudonym: str = Field(pattern=PSEUDONYM_PATTERN)
    role: Role
    status: dict[str, Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=dict,
        description="a victim's status under each party's law, e.g. "
        "{ID: TRAFFICKING_VICTIM, MY: ILLEGAL_MIGRANT}",
    )
    age: Age | None = None
    handler_ref: str | None = Field(
        default=None, pattern=PSEUDONYM_PATTERN, description="an informant's handler reference"
    )

    @model_validator(mode="after")
    def _role_needs(self) -> DataSubject:
        if self.role in VICTIM_ROLES and (set(self.status) != {"ID", "MY"} or self.age is None):
            raise ValueError("a victim carries a status under each party's law (ID and MY) and an age")
        if self.role == "INFORMANT" and self.handler_ref is None:
            raise ValueError("an informant carries a handler_ref, which replaces the identity")
        return self


class MessageSubmission(_Value):
    """What a local system POSTs to ``/v1/messages``. The security metadata is checked by the
    agreement's completeness rule, so that a refusal names every missing field at once."""

    type: str = Field(examples=["REQUEST_FOR_INFORMATION"])
    case_ref: CaseRef
    purposes: list[str] = Field(default_factory=list, examples=[["TIP_INVESTIGATION"]])
    classification: ClassificationIn | None = None
    tlp: str | None = Field(default=None, examples=["AMBER"])
    handling_codes: list[str] = Field(default_factory=list, examples=[["H0", "H2"]])
    legal_basis: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=16
    )
    grading: Grading | None = None
    thread_id: Reference | None = None
    in_reply_to: Reference | None = None
    priority: str | None = Field(default=None, description="one of the agreement's (default: its first)")
    response_due: dt.datetime | None = None
    addressed_to: list[str] = Field(default_factory=list, max_length=16, description="units of the partner")
    recipients: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32, description="named recipients (partner clients or units)"
    )
    data_subjects: list[DataSubject] = Field(default_factory=list, max_length=200)
    mla_reference: str | None = Field(default=None, max_length=128)
    payload: dict[str, Any]


class AgreementRef(_Value):
    version: str
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


class Origin(_Value):
    agency: str
    unit: str


class SignedMessage(_Value):
    """The signed payload of the inner JWS, exactly (``schemas/message.schema.json``)."""

    format: Literal["exchange-message/2"]
    id: Reference
    type: str
    sender: PartyId
    recipient: PartyId
    created_at: dt.datetime
    agreement: AgreementRef
    case_ref: CaseRef
    thread_id: Reference
    in_reply_to: Reference | None
    purposes: tuple[str, ...] = Field(min_length=1)
    classification: Classification
    tlp: str
    handling_codes: tuple[str, ...]
    legal_basis: tuple[str, ...] = Field(min_length=1)
    grading: Grading | None
    priority: str
    response_due: dt.datetime | None
    origin: Origin
    addressed_to: tuple[str, ...]
    recipients: tuple[str, ...]
    data_subjects: tuple[DataSubject, ...]
    mla_reference: str | None
    checkpoint: str | None
    payload: dict[str, Any]

    @field_validator("created_at", "response_due")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must carry a time zone")
        return value


def signed_message_schema() -> dict[str, Any]:
    """The JSON Schema of the signed message, as published in ``schemas/message.schema.json``."""
    schema = SignedMessage.model_json_schema()
    schema["description"] = (
        "The payload of the inner JWS (RFC 8785 canonical JSON). JWS header: {alg: EdDSA, kid: the "
        "sender's Ed25519 key id, typ: exchange-message+jws}. `payload` is valid against the schema "
        "of its type in messages/."
    )
    header = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "urn:exchange:message:2"}
    return {**header, **schema}


@dataclass(frozen=True)
class Message:
    """A message as every core function sees it: typed, its personal data indexed.

    A draft (from a submission, before the rules) may lack security metadata (``marking`` or
    ``tlp`` None, empty ``purposes`` or ``legal_basis``); a parsed signed message never does.
    """

    id: str
    type: str
    sender: PartyId
    recipient: PartyId
    created_at: dt.datetime
    agreement_version: str
    agreement_digest: str
    case_ref: str
    thread_id: str
    thread_ref: str | None  # the thread a draft asked to join (None: a new thread)
    in_reply_to: str | None
    purposes: tuple[str, ...]
    marking: Marking | None
    tlp: str | None
    handling_codes: tuple[str, ...]
    legal_basis: tuple[str, ...]
    grading: Grading | None
    priority: str
    response_due: dt.datetime | None
    origin: Origin
    addressed_to: tuple[str, ...]
    recipients: tuple[str, ...]
    data_subjects: tuple[DataSubject, ...]
    mla_reference: str | None
    checkpoint: str | None
    payload: Mapping[str, Any]
    protected: tuple[ProtectedValue, ...]
    roles: Mapping[str, str]  # pseudonym -> the role it counts as
    subject_roles: frozenset[str]  # every role present, the unattributed one included
    categories: frozenset[str]  # every data category present

    def role_of(self, pseudonym: str | None) -> str:
        """The role a subject counts as; an unknown or missing subject counts as a child victim."""
        if pseudonym is None:
            return UNATTRIBUTED_ROLE
        return self.roles.get(pseudonym, UNATTRIBUTED_ROLE)

    def signed_json(self) -> dict[str, Any]:
        """The JSON that is signed. Raises ValueError if the message is an incomplete draft."""
        if self.marking is None or self.tlp is None:
            raise ValueError("an incomplete draft cannot be signed")
        return {
            "format": MESSAGE_FORMAT,
            "id": self.id,
            "type": self.type,
            "sender": self.sender,
            "recipient": self.recipient,
            "created_at": self.created_at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
            "agreement": {"version": self.agreement_version, "digest": self.agreement_digest},
            "case_ref": self.case_ref,
            "thread_id": self.thread_id,
            "in_reply_to": self.in_reply_to,
            "purposes": list(self.purposes),
            "classification": {
                "scheme": self.marking.scheme,
                "level": self.marking.level,
                "common": self.marking.common,
            },
            "tlp": self.tlp,
            "handling_codes": list(self.handling_codes),
            "legal_basis": list(self.legal_basis),
            "grading": self.grading.model_dump(mode="json") if self.grading else None,
            "priority": self.priority,
            "response_due": self.response_due.isoformat() if self.response_due else None,
            "origin": self.origin.model_dump(mode="json"),
            "addressed_to": list(self.addressed_to),
            "recipients": list(self.recipients),
            "data_subjects": [s.model_dump(mode="json", exclude_none=True) for s in self.data_subjects],
            "mla_reference": self.mla_reference,
            "checkpoint": self.checkpoint,
            "payload": dict(self.payload),
        }


def _effective_role(subject: DataSubject, child_age: int) -> str:
    """The role a subject counts as: a victim the sender calls adult counts as a child when younger
    than the agreement's child age, and as of unknown age when its age is not known (fail closed)."""
    if subject.role != "VICTIM_ADULT":
        return subject.role
    age = subject.age
    if age is None or age.years is None or age.basis == "UNKNOWN":
        return "AGE_UNKNOWN"
    return "VICTIM_CHILD" if age.years < child_age else subject.role


@dataclass(frozen=True)
class Catalogue:
    """Each message type of an agreement with its payload model and shape. Built once per node."""

    models: Mapping[str, type[BaseModel]]
    shapes: Mapping[str, Shape]

    @classmethod
    def for_agreement(cls, agreement: Agreement) -> Catalogue:
        """Raises ConfigurationError if the agreement names a payload schema with no model."""
        models: dict[str, type[BaseModel]] = {}
        shapes: dict[str, Shape] = {}
        for name, spec in agreement.message_types.items():
            stem = spec.schema_file.removesuffix(".schema.json")
            if stem not in PAYLOAD_MODELS:
                raise ConfigurationError(
                    f"message_types.{name}.schema: {spec.schema_file!r} is not a schema of the catalogue "
                    f"({', '.join(f'{s}.schema.json' for s in PAYLOAD_MODELS)})"
                )
            models[name] = PAYLOAD_MODELS[stem]
            shapes[name] = shape_of(payload_schema(stem))
        return cls(models, shapes)

    def payload_errors(self, message_type: str, payload: Any, *, strict: bool = True) -> list[FieldError]:
        """The payload's schema errors, judged as the JSON that is signed and sent: ``strict``, so a
        value of the wrong JSON type (``"7"`` or ``true`` for an integer, ``0`` for a date) is an
        error, not converted here and then signed as it came (the partner's schema would refuse
        it). Not ``strict`` for a message stored before that check, read again."""
        model = self.models.get(message_type)
        if model is None:
            return [FieldError("type", f"{message_type!r} is not one of {sorted(self.models)}")]
        try:
            model.model_validate_json(json.dumps(payload), strict=strict)
        except ValidationError as exc:
            return [_field_error("payload", e) for e in exc.errors()]
        except (TypeError, ValueError) as exc:  # not JSON at all (only from Python callers)
            return [FieldError("payload", f"is not JSON: {type(exc).__name__}")]
        return []


def _field_error(prefix: str, err: Any) -> FieldError:
    return FieldError("/".join([prefix, *(str(p) for p in err["loc"])]), str(err["msg"]))


def raw_vocabulary_errors(agreement: Agreement, body: Mapping[str, Any]) -> list[FieldError]:
    """The vocabulary errors of a raw submission body whose shape failed validation, so that one
    answer names every invalid field (values of the wrong shape are left to the shape's errors)."""

    def strings(value: Any) -> list[str]:
        return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []

    tlp, priority, mtype = body.get("tlp"), body.get("priority"), body.get("type")
    fields = {
        "type": mtype if isinstance(mtype, str) and mtype else next(iter(agreement.message_types)),
        "purposes": strings(body.get("purposes")),
        "tlp": tlp if isinstance(tlp, str) else None,
        "handling_codes": strings(body.get("handling_codes")),
        "priority": priority if isinstance(priority, str) else agreement.priorities[0],
        "data_subjects": [],
    }
    return _vocabulary_errors(agreement, fields)


def _vocabulary_errors(agreement: Agreement, fields: Mapping[str, Any]) -> list[FieldError]:
    """Values the agreement does not define (types, purposes, TLP, codes, priorities, units)."""
    errors: list[FieldError] = []

    def unknown(field: str, values: Sequence[str], known: Sequence[str] | Mapping[str, Any]) -> None:
        bad = [v for v in values if v not in known]
        if bad:
            errors.append(FieldError(field, f"{bad} not among {sorted(known)}"))

    unknown("type", [fields["type"]], agreement.message_types)
    unknown("purposes", fields["purposes"], agreement.purposes)
    unknown("tlp", [t for t in [fields["tlp"]] if t is not None], agreement.tlp)
    unknown("handling_codes", fields["handling_codes"], agreement.handling_codes)
    unknown("priority", [p for p in [fields["priority"]] if p is not None], agreement.priorities)
    pseudonyms = [s["pseudonym"] for s in fields["data_subjects"]]
    if len(set(pseudonyms)) != len(pseudonyms):
        errors.append(FieldError("data_subjects", "each pseudonym is listed once"))
    return errors


def personal_data(
    catalogue: Catalogue,
    message_type: str,
    payload: Mapping[str, Any],
    subjects: Sequence[DataSubject],
    child_age: int,
) -> dict[str, Any]:
    """The personal-data index of a payload: ``protected``, ``roles``, ``subject_roles`` and
    ``categories`` (the fields of :class:`Message` derived from its payload and subjects)."""
    roles = {s.pseudonym: _effective_role(s, child_age) for s in subjects}
    protected = tuple(
        replace(p, role=roles.get(p.subject, UNATTRIBUTED_ROLE) if p.subject else UNATTRIBUTED_ROLE)
        for p in protected_values(catalogue.shapes[message_type], payload)
    )
    present = set(roles.values())
    present.update(  # personal data no listed subject owns counts as a child victim's
        roles.get(p.subject, UNATTRIBUTED_ROLE) if p.subject else UNATTRIBUTED_ROLE
        for p in protected
        if p.category not in NON_PERSONAL_CATEGORIES
    )
    return {
        "protected": protected,
        "roles": roles,
        "subject_roles": frozenset(present),
        "categories": frozenset(p.category for p in protected),
    }


def draft_from_submission(
    submission: MessageSubmission,
    *,
    agreement: Agreement,
    catalogue: Catalogue,
    sender: PartyId,
    origin: Origin,
    now: dt.datetime,
    checkpoint: str | None,
    message_id: MessageId | None = None,
) -> Message:
    """The draft of a submitted message, before the rules.

    Raises:
        InvalidInput: naming every field that is not valid (payload, vocabulary, marking, times).
    """
    errors = _vocabulary_errors(agreement, submission.model_dump())
    errors += catalogue.payload_errors(submission.type, submission.payload)
    marking = None
    if submission.classification is not None:
        own = agreement.parties[sender].scheme
        if submission.classification.scheme != own:
            errors.append(FieldError("classification/scheme", f"classify in this node's scheme {own}"))
        else:
            found = classify(agreement, own, submission.classification.level)
            if isinstance(found, Marking):
                marking = found
            else:
                errors.append(FieldError("classification/level", found.reason))
    if submission.response_due is not None and submission.response_due.tzinfo is None:
        errors.append(FieldError("response_due", "must carry a time zone"))
    elif submission.response_due is not None and submission.response_due <= now:
        errors.append(FieldError("response_due", "must be in the future"))
    if errors:
        raise InvalidInput("the message is invalid", errors)
    mid = message_id or MessageId(str(uuid.uuid4()))
    return Message(
        id=mid,
        type=submission.type,
        sender=sender,
        recipient=agreement.partner_of(sender),
        created_at=now,
        agreement_version=agreement.version,
        agreement_digest=agreement.digest,
        case_ref=submission.case_ref,
        thread_id=submission.thread_id or mid,
        thread_ref=submission.thread_id,
        in_reply_to=submission.in_reply_to,
        purposes=tuple(dict.fromkeys(submission.purposes)),
        marking=marking,
        tlp=submission.tlp,
        handling_codes=tuple(sorted(set(submission.handling_codes))),
        legal_basis=tuple(submission.legal_basis),
        grading=submission.grading,
        priority=submission.priority or agreement.priorities[0],
        response_due=submission.response_due,
        origin=origin,
        addressed_to=tuple(sorted(set(submission.addressed_to))),
        recipients=tuple(sorted(set(submission.recipients))),
        data_subjects=tuple(submission.data_subjects),
        mla_reference=submission.mla_reference,
        checkpoint=checkpoint,
        payload=submission.payload,
        **personal_data(
            catalogue, submission.type, submission.payload, submission.data_subjects, agreement.child_age
        ),
    )


class MalformedMessage(ValueError):
    """A signed message that is not a valid message of the agreement (detail for the log only)."""


def parse_signed(raw: Any, *, agreement: Agreement, catalogue: Catalogue, stored: bool = False) -> Message:
    """The typed message of a verified signed payload; ``stored``: one this node admitted or sent
    before (its payload judged as it was then: not strictly, see :meth:`Catalogue.payload_errors`).

    Raises:
        MalformedMessage: naming what is wrong (for the log and the ledger, never the peer).
    """
    try:
        signed = SignedMessage.model_validate(raw)
    except ValidationError as exc:
        detail = "; ".join(f"{e.field}: {e.message}" for e in map(_msg_error, exc.errors()))
        raise MalformedMessage(detail) from exc
    errors = _vocabulary_errors(agreement, signed.model_dump())
    errors += catalogue.payload_errors(signed.type, signed.payload, strict=not stored) if not errors else []
    cls = signed.classification
    found = classify(agreement, cls.scheme, cls.level)
    if not isinstance(found, Marking) or found.common != cls.common:
        errors.append(FieldError("classification", "not a consistent marking of the agreement"))
    elif cls.scheme != agreement.parties[signed.sender].scheme:
        errors.append(FieldError("classification/scheme", "not the sender's national scheme"))
    if errors:
        raise MalformedMessage("; ".join(f"{e.field}: {e.message}" for e in errors))
    assert isinstance(found, Marking)
    return Message(
        id=signed.id,
        type=signed.type,
        sender=signed.sender,
        recipient=signed.recipient,
        created_at=signed.created_at,
        agreement_version=signed.agreement.version,
        agreement_digest=signed.agreement.digest,
        case_ref=signed.case_ref,
        thread_id=signed.thread_id,
        thread_ref=signed.thread_id,
        in_reply_to=signed.in_reply_to,
        purposes=signed.purposes,
        marking=found,
        tlp=signed.tlp,
        handling_codes=signed.handling_codes,
        legal_basis=signed.legal_basis,
        grading=signed.grading,
        priority=signed.priority,
        response_due=signed.response_due,
        origin=signed.origin,
        addressed_to=signed.addressed_to,
        recipients=signed.recipients,
        data_subjects=signed.data_subjects,
        mla_reference=signed.mla_reference,
        checkpoint=signed.checkpoint,
        payload=signed.payload,
        **personal_data(catalogue, signed.type, signed.payload, signed.data_subjects, agreement.child_age),
    )


def _msg_error(err: Any) -> FieldError:
    return _field_error("message", err)


def with_payload(
    message: Message, payload: Mapping[str, Any], *, catalogue: Catalogue, child_age: int, **changes: Any
) -> Message:
    """A copy of ``message`` with another payload (its personal-data index recomputed) and fields."""
    index = personal_data(catalogue, message.type, payload, message.data_subjects, child_age)
    return replace(message, payload=payload, **index, **changes)
