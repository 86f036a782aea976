"""The message catalogue: one payload model per information type of the agreement.

The JSON Schemas in ``schemas/messages/`` are generated from these models (``python -m
exchange.catalogue``; a test checks they are current). Personal data is typed, never guessed from
key names: a field that identifies a person carries ``x-exchange-category`` (person-identity,
contact, location, document, biometric, financial, operational-plan), and the object holding it
names its data subject by pseudonym in a field marked ``x-exchange-subject-ref``. Redaction, floors
and ledger hygiene work from those annotations at any depth (``exchange.policy.redaction``).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

CATEGORY = "x-exchange-category"
SUBJECT_REF = "x-exchange-subject-ref"

#: the data categories a payload field may carry
DATA_CATEGORIES = (
    "person-identity",
    "contact",
    "location",
    "document",
    "biometric",
    "financial",
    "operational-plan",
)

#: categories that are not personal data: no data subject owns them
NON_PERSONAL_CATEGORIES = frozenset({"operational-plan"})

#: the roles a data subject may hold (domain.md), and those that are victims
Role = Literal["SUSPECT", "VICTIM_ADULT", "VICTIM_CHILD", "AGE_UNKNOWN", "WITNESS", "INFORMANT"]
SUBJECT_ROLES: tuple[str, ...] = get_args(Role)
VICTIM_ROLES = frozenset({"VICTIM_ADULT", "VICTIM_CHILD", "AGE_UNKNOWN"})

PSEUDONYM_PATTERN = r"^[A-Z0-9][A-Z0-9-]{2,39}$"
Pseudonym = Annotated[str, Field(pattern=PSEUDONYM_PATTERN)]
Text = Annotated[str, Field(min_length=1, max_length=4000)]
Short = Annotated[str, Field(min_length=1, max_length=200)]


def personal(category: str, description: str) -> Any:
    """A field holding personal data of ``category`` (optional, so it can be withheld)."""
    assert category in DATA_CATEGORIES
    return Field(default=None, description=description, json_schema_extra={CATEGORY: category})


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Document(_Part):
    kind: Literal["PASSPORT", "NATIONAL_ID", "BIRTH_CERTIFICATE", "WORK_PERMIT", "OTHER"]
    number: Short
    issuing_country: Annotated[str, Field(pattern=r"^[A-Z]{2,3}$")]


class Person(_Part):
    """What is known of one data subject. Every identifying field is optional and categorised."""

    subject: Pseudonym = Field(
        description="pseudonym of the data subject, as listed in the message's data_subjects",
        json_schema_extra={SUBJECT_REF: True},
    )
    names: list[Short] | None = personal("person-identity", "full names")
    aliases: list[Short] | None = personal("person-identity", "other names, nicknames")
    date_of_birth: Short | None = personal("person-identity", "date of birth as known")
    nationality: Short | None = personal("person-identity", "nationality")
    parents: list[Short] | None = personal("person-identity", "names of the parents or guardians")
    physical_description: Text | None = personal("person-identity", "appearance, marks")
    address: Text | None = personal("location", "home address")
    school: Short | None = personal("location", "school attended")
    last_known_location: Text | None = personal("location", "where the person was last seen")
    phone_numbers: list[Short] | None = personal("contact", "telephone numbers")
    online_accounts: list[Short] | None = personal("contact", "social media and messaging accounts")
    documents: list[Document] | None = personal("document", "identity and travel documents")
    photographs: list[Annotated[str, Field(max_length=200_000)]] | None = personal(
        "biometric", "face photographs (base64) or references to them"
    )
    remarks: Text | None = Field(default=None, description="no identities here")


class Route(_Part):
    origin: Short
    transit: list[Short] = Field(default_factory=list, max_length=20)
    destination: Short
    means: Short | None = None


class Account(_Part):
    holder: Pseudonym = Field(description="pseudonym of the holder", json_schema_extra={SUBJECT_REF: True})
    institution: Short
    country: Annotated[str, Field(pattern=r"^[A-Z]{2,3}$")]
    account_number: Short | None = personal("financial", "account number")


class Transfer(_Part):
    from_account: int = Field(ge=0, description="index into accounts")
    to_account: int = Field(ge=0, description="index into accounts")
    amount: Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]{1,2})?$")]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    on: dt.date


class EvidenceItem(_Part):
    subject: Pseudonym | None = Field(
        default=None,
        description="the data subject the item shows or speaks of (none: treated as a child victim's)",
        json_schema_extra={SUBJECT_REF: True},
    )
    description: Text = Field(description="what the item is, without identities")
    kind: Literal["DOCUMENT", "PHOTOGRAPH", "DEVICE_EXTRACT", "STATEMENT", "OTHER"]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    content: Annotated[str, Field(max_length=200_000)] | None = personal(
        "document", "base64 content (a photograph, a statement, an extract), or none when sent out of band"
    )


def persons() -> Any:
    """A list of data subjects' details."""
    return Field(default_factory=list, max_length=100, description="data subjects' details")


class RequestForInformation(_Part):
    summary: Text = Field(description="what the request is about, without identities")
    questions: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(min_length=1, max_length=50)
    persons: list[Person] = persons()
    urgency_reason: Text | None = None


class Answer(_Part):
    question: int = Field(ge=0)
    answer: Annotated[str, Field(min_length=1, max_length=20000)] = Field(
        description="the answer, without identities: a person it speaks of goes in persons, by pseudonym,"
        " so the rules can protect them"
    )


class Response(_Part):
    outcome: Literal["ANSWERED", "PARTIAL", "REFUSED"]
    answers: list[Answer] = Field(default_factory=list, max_length=50)
    refusal_reasons: list[
        Literal[
            "NO_LEGAL_BASIS",
            "NATIONAL_SECURITY",
            "ONGOING_INVESTIGATION",
            "NOT_HELD",
            "DISPROPORTIONATE",
            "OTHER",
        ]
    ] = Field(default_factory=list, max_length=20)
    persons: list[Person] = persons()
    remarks: Text | None = None

    @model_validator(mode="after")
    def _outcome(self) -> Response:
        if self.outcome == "REFUSED" and not self.refusal_reasons:
            raise ValueError("a REFUSED response names its refusal_reasons")
        if self.outcome == "ANSWERED" and not self.answers:
            raise ValueError("an ANSWERED response has answers")
        return self


class SpontaneousIntelligence(_Part):
    summary: Text
    modus_operandi: Text | None = None
    routes: list[Route] = Field(default_factory=list, max_length=20)
    indicators: list[Short] = Field(default_factory=list, max_length=50)
    persons: list[Person] = persons()


class SuspectIdentification(_Part):
    summary: Text
    suspect: Person
    offences: list[Short] = Field(min_length=1, max_length=20)
    identification_basis: Text


class FinancialTrail(_Part):
    summary: Text
    accounts: list[Account] = Field(min_length=1, max_length=100)
    transfers: list[Transfer] = Field(default_factory=list, max_length=1000)
    persons: list[Person] = persons()


class RequestForAssistance(_Part):
    assistance: Literal["LOCATE", "RESCUE", "JOINT_OPERATION", "FUGITIVE_HANDOVER"]
    summary: Text
    persons: list[Person] = persons()
    operation_plan: Text | None = personal("operational-plan", "timing, places and forces of an operation")
    requested_by: dt.date | None = None


class ArrestNotification(_Part):
    arrested: Person
    arrested_at: dt.datetime
    place: Short
    charges: list[Short] = Field(min_length=1, max_length=20)
    custody_unit: Short


class VictimIdentificationReferral(_Part):
    summary: Text
    victims: list[Person] = Field(min_length=1, max_length=100)
    indicators: list[Short] = Field(default_factory=list, max_length=50)
    needs: list[Literal["SHELTER", "MEDICAL", "PSYCHOSOCIAL", "LEGAL", "INTERPRETER", "FAMILY_TRACING"]] = (
        Field(default_factory=list)
    )


class Relative(_Part):
    """A relative traced for a victim: identifying the relative identifies the victim, so the
    relative's details belong to the victim's subject and are protected as the victim's."""

    subject: Pseudonym = Field(
        description="pseudonym of the victim this is a relative of", json_schema_extra={SUBJECT_REF: True}
    )
    relationship: Literal["MOTHER", "FATHER", "GUARDIAN", "SIBLING", "OTHER"]
    names: list[Short] | None = personal("person-identity", "full names of the relative")
    address: Text | None = personal("location", "the relative's address")
    phone_numbers: list[Short] | None = personal("contact", "the relative's telephone numbers")


class FamilyTracing(_Part):
    required: bool
    status: Literal["NOT_STARTED", "IN_PROGRESS", "FOUND", "NOT_FOUND"]
    relatives: list[Relative] = Field(default_factory=list, max_length=20)


class VictimRepatriation(_Part):
    subject: Pseudonym = Field(
        description="pseudonym of the victim repatriated", json_schema_extra={SUBJECT_REF: True}
    )
    victim: Person
    handover_point: Short | None = personal("location", "where the victim is handed over")
    handover_at: dt.datetime | None = personal("location", "when the victim is handed over")
    escort: Short
    receiving_agency: Short
    family_tracing: FamilyTracing | None = None


class EvidenceTransfer(_Part):
    summary: Text
    items: list[EvidenceItem] = Field(min_length=1, max_length=100)
    persons: list[Person] = persons()


# --- control messages: they change the state of an earlier message (exchange.lifecycle) -----------

MessageRef = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9/._:-]*$")]
Reason = Annotated[str, Field(min_length=1, max_length=2000, description="without identities")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ConsentRequest(_Part):
    request_id: MessageRef
    message_id: MessageRef = Field(description="the originator's message the use is asked for")
    recipient: Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")] | None = Field(
        description="a third party of the agreement, or none for a use by the receiving police itself"
    )
    purposes: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=16)
    justification: Reason


class ConsentDecision(_Part):
    request_id: MessageRef
    message_id: MessageRef
    decision: Literal["GRANTED", "REFUSED", "REVOKED"]
    conditions: Reason | None = None
    expires_at: AwareDatetime | None = None


class ReleaseNotice(_Part):
    message_id: MessageRef
    recipient: Annotated[str, Field(max_length=64)]
    purposes: list[Annotated[str, Field(max_length=64)]] = Field(min_length=1, max_length=16)
    released_at: AwareDatetime


class NewMarking(_Part):
    scheme: Annotated[str, Field(max_length=32)]
    level: Annotated[str, Field(max_length=64)]


class ReclassificationNotice(_Part):
    notice_id: MessageRef
    message_id: MessageRef
    classification: NewMarking
    reason: Reason


class ReturnOrDestroyRequest(_Part):
    message_id: MessageRef
    reason: Reason


class DestructionCertificate(_Part):
    message_id: MessageRef
    envelope_sha256: Sha256
    content_sha256: Sha256
    destroyed_at: AwareDatetime
    reason: Reason


class SecurityIncidentNotification(_Part):
    incident_id: MessageRef
    kind: Literal["UNAUTHORISED_ACCESS", "DISCLOSURE", "LOSS", "KEY_COMPROMISE", "OTHER"]
    message_ids: list[MessageRef] = Field(default_factory=list, max_length=1000)
    detected_at: AwareDatetime
    personal_data: bool = Field(description="personal data is affected (UU 27/2022: a 72-hour notice)")
    summary: Reason


PAYLOAD_MODELS: dict[str, type[BaseModel]] = {
    "request_for_information": RequestForInformation,
    "response": Response,
    "spontaneous_intelligence": SpontaneousIntelligence,
    "suspect_identification": SuspectIdentification,
    "financial_trail": FinancialTrail,
    "request_for_assistance": RequestForAssistance,
    "arrest_notification": ArrestNotification,
    "victim_identification_referral": VictimIdentificationReferral,
    "victim_repatriation": VictimRepatriation,
    "evidence_transfer": EvidenceTransfer,
    "consent_request": ConsentRequest,
    "consent_decision": ConsentDecision,
    "release_notice": ReleaseNotice,
    "reclassification_notice": ReclassificationNotice,
    "return_or_destroy_request": ReturnOrDestroyRequest,
    "destruction_certificate": DestructionCertificate,
    "security_incident_notification": SecurityIncidentNotification,
}


def payload_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of one payload model, as published in ``schemas/messages/``."""
    schema = PAYLOAD_MODELS[name].model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:exchange:message:{name.upper()}:2",
        **schema,
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    """Write every payload schema into ``folder/messages`` and the signed message's schema into
    ``folder/message.schema.json``; returns the files written."""
    from exchange.messages import signed_message_schema  # the signed form is built on the catalogue

    written = []
    for name in PAYLOAD_MODELS:
        path = folder / "messages" / f"{name}.schema.json"
        path.write_text(render(payload_schema(name)))
        written.append(path)
    path = folder / "message.schema.json"
    path.write_text(render(signed_message_schema()))
    return [*written, path]


if __name__ == "__main__":  # pragma: no cover - a developer's tool: python -m exchange.catalogue schemas
    for written in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas")):
        print(written)
