"""The control-message protocol between the nodes: composing a control message in the transaction of
the use case that causes it, and applying a received one in the transaction that admits it.

Control messages are ordinary signed, encrypted envelopes of message types whose ``kind`` is
``control`` in the agreement; they never enter an inbox. Each names the message it is about; one about
a message the receiving node does not hold in the expected direction, or from a party that is not
its originator, changes nothing and is ledgered as ``control.rejected``. The use cases that send
them are in :mod:`exchange.lifecycle`; the protocol is described in ``docs/lifecycle.md``.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import AwareDatetime, TypeAdapter
from sqlalchemy.engine import Connection

from exchange import envelope
from exchange.content import destroy_after
from exchange.db import repo, rows
from exchange.errors import ContentDestroyed, ContentUnavailable, EnvelopeError
from exchange.ledger import EntryDraft
from exchange.ledger.events import LedgerEvent
from exchange.messages import MalformedMessage, Message, Origin, personal_data
from exchange.observability import logs
from exchange.policy import Consent, Marking, Use, decide, national_equivalent

if TYPE_CHECKING:
    from exchange.agreement import Agreement
    from exchange.node import Node

log = logging.getLogger("exchange.control")

CONSENT_REQUEST = "CONSENT_REQUEST"
CONSENT_DECISION = "CONSENT_DECISION"
RELEASE_NOTICE = "RELEASE_NOTICE"
RECLASSIFICATION_NOTICE = "RECLASSIFICATION_NOTICE"
RETURN_OR_DESTROY_REQUEST = "RETURN_OR_DESTROY_REQUEST"
DESTRUCTION_CERTIFICATE = "DESTRUCTION_CERTIFICATE"
SECURITY_INCIDENT_NOTIFICATION = "SECURITY_INCIDENT_NOTIFICATION"
NODE_UNIT = "NODE"  # the origin unit of what a node composes itself (no local system sent it)
DESTROYED_ON_REQUEST = "destroyed at the originator's request"


def iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).isoformat(timespec="microseconds")


@dataclass
class Effects:
    """What applying a control message did: ledger entries, and work for after the commit."""

    drafts: list[EntryDraft] = field(default_factory=list)
    retired_keks: list[str] = field(default_factory=list)
    wake: bool = False


def consent_of(row: dict[str, Any]) -> Consent | None:
    """The Consent a granted request gives (None if it is not granted)."""
    if row["status"] not in ("granted", "revoked") or row["expires_at"] is None:
        return None
    return Consent(
        message_id=row["message_id"],
        recipient=row["recipient"],
        purposes=frozenset(row["purposes"]),
        expires_at=dt.datetime.fromisoformat(row["expires_at"]),
        revoked_at=dt.datetime.fromisoformat(row["revoked_at"]) if row["revoked_at"] else None,
    )


class ControlProtocol:
    """Compose and apply control messages for one node (see the module docstring)."""

    node: Node

    @property
    def agreement(self) -> Agreement:
        """The agreement version in force now."""
        return self.node.agreement

    # --- composing control messages ---------------------------------------------------------------

    def queue_control(
        self,
        conn: Connection,
        message_type: str,
        target: dict[str, Any],
        payload: dict[str, Any],
        now: dt.datetime,
        *,
        message_id: str | None = None,
    ) -> list[EntryDraft]:
        """Compose, decide, seal, store and queue a control message about ``target`` inside the
        caller's transaction (which holds the ledger lock); its id is ``message_id`` if given (a row
        that keeps only a reference to the words it carries). Returns its ledger entry."""
        node = self.node
        keys, now = node.keys_at(now)  # one key set version for the message, in force at its time
        terms = node.agreements.in_force(now)  # one version for the whole control message
        agreement = terms.agreement
        own = agreement.parties[node.party].scheme
        level = national_equivalent(agreement, target["common_level"], own)
        spec = agreement.message_types[message_type]
        purposes = tuple(p for p in target["purposes"] if p in spec.purposes) or spec.purposes[:1]
        mid = message_id or str(uuid.uuid4())
        message = Message(
            id=mid,
            type=message_type,
            sender=node.party,
            recipient=node.partner_party,
            created_at=now,
            agreement_version=agreement.version,
            agreement_digest=agreement.digest,
            case_ref=target["case_ref"],
            thread_id=target["thread_id"],
            thread_ref=target["thread_id"],
            in_reply_to=None,
            purposes=purposes,
            marking=Marking(own, level, agreement.schemes[own].levels[level]),
            tlp=agreement.control_tlp,
            handling_codes=tuple(sorted(agreement.control_handling_codes)),
            legal_basis=agreement.control_legal_basis,
            grading=None,
            priority=agreement.priorities[0],
            response_due=None,
            origin=Origin(agency=node.party, unit=NODE_UNIT),
            addressed_to=(),
            recipients=(),
            data_subjects=(),
            mla_reference=None,
            checkpoint=None,
            payload=payload,
            **personal_data(terms.catalogue, message_type, payload, (), agreement.child_age),
        )
        errors = terms.catalogue.payload_errors(message_type, payload)
        decision = decide("receive", agreement=agreement, message=message, now=now)  # as the partner will
        if errors or not decision.allowed:
            raise ValueError(f"a {message_type} this node composed is invalid: {errors or decision.refusals}")
        signed_json = message.signed_json()
        signed = envelope.sign(signed_json, signing_key=keys.signing)
        sealed = envelope.seal_signed(signed, signed_json, recipient_key=node.partner.encryption)
        digest = envelope.envelope_digest(sealed)
        row = rows.message_row(
            message,
            direction="out",
            decision=decision,
            local_level=level,
            status="queued",
            envelope=sealed,
            envelope_sha256=digest,
            submitted_by=None,
            now=iso(now),
        )
        row.update(
            kind="control",
            destroy_after=destroy_after(agreement, message_type, now),
            signer_kid=keys.signing_kid,
        )
        row.update(node.content.seal(row, signed))
        repo.insert_message(conn, row)
        repo.enqueue(conn, mid, now.timestamp())
        return [
            EntryDraft(
                event=LedgerEvent.SUBMITTED,
                message_id=mid,
                case_ref=target["case_ref"],
                actor=node.party,
                decision=decision.decision,
                rules=decision.evaluated,
                data={
                    "type": message_type,
                    "about": target["id"],
                    "envelope_sha256": digest,
                    "signer_kid": keys.signing_kid,
                    "signed_at": iso(now),
                },
            )
        ]

    def _apply_marking(
        self,
        conn: Connection,
        row: dict[str, Any],
        marking: Marking,
        notice_id: str,
        control_id: str,
        now: dt.datetime,
    ) -> list[EntryDraft]:
        """Apply the originator's new marking to a stored message, kept at its floor; history kept
        (its reason only in the control message ``control_id``, sealed)."""
        message = self.node.stored_message(row)
        agreement = self.agreement  # a reclassification is a new act: the floors in force now
        floors = decide("receive", agreement=agreement, message=_remarked(message, marking), now=now)
        assert floors.level is not None
        local = rows.local_marking(agreement, self.node.party, floors.level)
        repo.insert_reclassification(
            conn,
            {
                "message_id": row["id"],
                "scheme": marking.scheme,
                "from_level": row["level"],
                "to_level": marking.level,
                "reason": None,
                "notice_id": notice_id,
                "at": iso(now),
                "control_id": control_id,
            },
        )
        repo.update_message(
            conn,
            row["id"],
            level=marking.level,
            common_level=floors.level,
            local_level=local,
            tlp=floors.tlp,
            handling_codes=list(floors.handling_codes),
            updated_at=iso(now),
        )
        return [
            EntryDraft(
                event=LedgerEvent.RECLASSIFIED,
                message_id=row["id"],
                case_ref=row["case_ref"],
                actor=row["sender"],
                decision=floors.decision,
                rules=floors.evaluated,
                data={
                    "from": row["level"],
                    "to": marking.level,
                    "protected_at": floors.level,
                    "notice_id": notice_id,
                },
            )
        ]

    def sealed_payloads(self, control_ids: Iterable[str | None]) -> dict[str, dict[str, Any]]:
        """The payloads of stored control messages by id, opened from their content at rest: the
        free text (a justification, conditions, a reason) that consent and reclassification rows
        only refer to. One whose content was destroyed (retention) is absent."""
        wanted = sorted({c for c in control_ids if c})
        if not wanted:
            return {}
        with self.node.db.read() as conn:
            found = repo.get_messages(conn, wanted)
        payloads = {}
        for control_id, row in found.items():
            payload = self._payload_or_none(row) if row["kind"] == "control" else None
            if payload is not None:
                payloads[control_id] = payload
        return payloads

    def _payload_or_none(self, row: dict[str, Any], *, whole: bool = False) -> Any:
        """A stored message's payload (or, ``whole``, the message); None if its content was
        destroyed, or does not open (logged by id: a database restored from before a destruction
        holds content under KEKs retired since), so that one such message fails no listing."""
        try:
            message = self.node.stored_message(row)
        except ContentDestroyed:
            return None
        except (ContentUnavailable, MalformedMessage, EnvelopeError) as exc:
            log.error("stored message %s does not open (%s): left out", row["id"], type(exc).__name__)
            return None
        return message if whole else dict(message.payload)

    def reclassification_history(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A message's reclassifications as its readers see them, each reason read from the sealed
        notice that carried it (null once that was destroyed)."""
        payloads = self.sealed_payloads(h["control_id"] for h in history)
        return [
            {
                **{k: v for k, v in h.items() if k != "control_id"},
                "reason": payloads.get(h["control_id"] or "", {}).get("reason"),
            }
            for h in history
        ]

    # --- applying a received control message ---------------------------------------------------------------

    def apply_control(self, conn: Connection, message: Message, now: dt.datetime) -> Effects:
        """Apply a verified control message inside the admitting transaction (ledger lock held)."""
        payload = message.payload
        target = repo.get_message(conn, str(payload.get("message_id")))
        handler = {
            CONSENT_REQUEST: (self._on_consent_request, "out"),
            CONSENT_DECISION: (self._on_consent_decision, "in"),
            RELEASE_NOTICE: (self._on_release_notice, "out"),
            RECLASSIFICATION_NOTICE: (self._on_reclassification, "in"),
            RETURN_OR_DESTROY_REQUEST: (self._on_return_or_destroy, "in"),
            DESTRUCTION_CERTIFICATE: (self._on_certificate, "out"),
        }.get(message.type)
        if message.type == SECURITY_INCIDENT_NOTIFICATION:
            logs.security_incident(
                log,
                "partner-notified",
                "notified by the partner: %s",
                payload.get("kind"),
                message_id=message.id,
            )
            return Effects([self._incident_entry(message, payload)])
        if handler is None:
            return Effects(
                [
                    self._control_entry(
                        LedgerEvent.CONTROL_REJECTED, message, "deny", {"reason": "unknown-type"}
                    )
                ]
            )
        apply, direction = handler
        if target is None or target["direction"] != direction or target["kind"] != "information":
            log.warning("control message %s about an unknown message", message.id)
            return Effects(
                [
                    self._control_entry(
                        LedgerEvent.CONTROL_REJECTED, message, "deny", {"reason": "unknown-message"}
                    )
                ]
            )
        return apply(conn, message, target, now)

    def _rejected(self, message: Message, reason: str) -> Effects:
        return Effects(
            [self._control_entry(LedgerEvent.CONTROL_REJECTED, message, "deny", {"reason": reason})]
        )

    def _incident_entry(self, message: Message, payload: Any) -> EntryDraft:
        """What the ledger keeps of an incident notice: its kind, the messages, the notice clock."""
        data: dict[str, Any] = {
            "kind": payload.get("kind"),
            "personal_data": payload.get("personal_data"),
            "about": list(payload.get("message_ids", [])),
            "detected_at": str(payload.get("detected_at")),
        }
        if payload.get("personal_data") and message.recipient == "ID":  # UU 27/2022: 72 hours to notify
            detected = dt.datetime.fromisoformat(str(payload.get("detected_at")))
            data["notify_by"] = (detected + dt.timedelta(hours=72)).isoformat()
        about = data["about"][0] if data["about"] else message.id
        return EntryDraft(
            event=LedgerEvent.INCIDENT_NOTIFIED,
            message_id=about,
            case_ref=message.case_ref,
            actor=message.sender,
            decision="incident",
            data={"control": message.id, **data},
        )

    def _control_entry(
        self, event: LedgerEvent, message: Message, decision: str, data: dict[str, Any]
    ) -> EntryDraft:
        return EntryDraft(
            event=event,
            message_id=str(message.payload.get("message_id") or message.id),
            case_ref=message.case_ref,
            actor=message.sender,
            decision=decision,
            data={"control": message.id, "type": message.type, **data},
        )

    def _on_consent_request(
        self, conn: Connection, message: Message, target: dict[str, Any], now: dt.datetime
    ) -> Effects:
        p = message.payload
        recipient = p.get("recipient")
        agreement = self.node.terms_of(message.agreement_version).agreement  # the request's own terms
        if (recipient is not None and recipient not in agreement.third_parties) or not set(
            p["purposes"]
        ) <= set(agreement.purposes):
            return self._rejected(message, "not-in-the-agreement")
        stored = {
            "id": p["request_id"],
            "message_id": target["id"],
            "direction": "in",
            "requested_by": None,
            "recipient": p.get("recipient"),
            "purposes": list(p["purposes"]),
            "justification": None,  # sealed in the request (request_control_id)
            "status": "pending",
            "requested_at": iso(now),
            "decided_by": None,
            "decided_at": None,
            "conditions": None,
            "expires_at": None,
            "revoked_at": None,
            "request_control_id": message.id,
            "decision_control_id": None,
        }
        if repo.get_consent_request(conn, stored["id"]) is not None:
            return Effects(
                [self._control_entry(LedgerEvent.CONTROL_REJECTED, message, "deny", {"reason": "duplicate"})]
            )
        repo.insert_consent_request(conn, stored)
        return Effects([self._consent_entry(LedgerEvent.CONSENT_REQUESTED, stored, message.sender, target)])

    def _on_consent_decision(
        self, conn: Connection, message: Message, target: dict[str, Any], now: dt.datetime
    ) -> Effects:
        p = message.payload
        request = repo.get_consent_request(conn, str(p["request_id"]))
        if request is None or request["direction"] != "out" or request["message_id"] != target["id"]:
            return self._rejected(message, "unknown-request")
        verdict = p["decision"]
        if request["status"] == "revoked" or (verdict != "REVOKED" and request["status"] != "pending"):
            return self._rejected(message, "already-decided")  # a late or repeated decision changes nothing
        values: dict[str, Any] = (
            {"status": "revoked", "revoked_at": iso(now)}
            if verdict == "REVOKED"
            else {
                "status": "granted" if verdict == "GRANTED" else "refused",
                "decided_at": iso(now),
                "decision_control_id": message.id,  # its conditions stay sealed in it
                "expires_at": _utc(p.get("expires_at")),
            }
        )
        repo.update_consent_request(conn, request["id"], **values)
        return Effects(
            [self._consent_entry(LedgerEvent.CONSENT_DECIDED, {**request, **values}, message.sender, target)]
        )

    def _on_release_notice(
        self, conn: Connection, message: Message, target: dict[str, Any], now: dt.datetime
    ) -> Effects:
        p = message.payload
        agreement = self.node.terms_of(message.agreement_version).agreement  # the notice's own terms
        # the ledger keeps for good only the agreement's own words: a recipient or a use outside it
        # (free text of the partner's, which could name a person) is an incident, not quoted
        known = p["recipient"] in agreement.third_parties and set(p["purposes"]) <= set(agreement.purposes)
        # judged by what this node consented to, in force when the partner released (on its clock,
        # the skew allowed): a release under no consent of ours is an incident
        released_at = _AWARE.validate_python(p["released_at"])
        use, skew = Use(frozenset(p["purposes"]), recipient=p["recipient"]), self.node.settings.clock_skew

        def in_force(request: dict[str, Any]) -> bool:
            consent = consent_of(request)
            return (
                consent is not None
                and request["decided_at"] is not None
                and dt.datetime.fromisoformat(request["decided_at"]) - skew <= released_at
                and consent.covers(target["id"], use, released_at - skew)
            )

        held = repo.consent_requests_for(conn, direction="in", message_ids=[target["id"]])
        granted = known and [r for r in held if in_force(r)]
        if not granted:
            logs.security_incident(
                log,
                "onward-without-consent",
                "the partner released message %s without our consent%s",
                target["id"],
                "" if known else ", to a recipient or for a use outside the agreement",
                message_id=target["id"],
            )
        return Effects(
            [
                self._control_entry(
                    LedgerEvent.ONWARD_RELEASED,
                    message,
                    "allow" if granted else "incident",
                    {
                        "recipient": p["recipient"] if known else None,
                        "use": [u for u in p["purposes"] if u in agreement.purposes],
                        "released_at": p["released_at"],
                        "consented": bool(granted),
                        **({} if known else {"outside_the_agreement": True}),
                    },
                )
            ]
        )

    def _on_reclassification(
        self, conn: Connection, message: Message, target: dict[str, Any], now: dt.datetime
    ) -> Effects:
        p = message.payload
        cls = p["classification"]
        scheme = self.agreement.schemes.get(cls["scheme"])
        if (
            target["sender"] != message.sender
            or scheme is None
            or cls["level"] not in scheme.levels
            or (cls["scheme"] != target["scheme"])
        ):
            return Effects(
                [
                    self._control_entry(
                        LedgerEvent.CONTROL_REJECTED, message, "deny", {"reason": "invalid-marking"}
                    )
                ]
            )
        marking = Marking(cls["scheme"], cls["level"], scheme.levels[cls["level"]])
        return Effects(self._apply_marking(conn, target, marking, p["notice_id"], message.id, now))

    def _on_return_or_destroy(
        self, conn: Connection, message: Message, target: dict[str, Any], now: dt.datetime
    ) -> Effects:
        if target["sender"] != message.sender:
            return Effects(
                [
                    self._control_entry(
                        LedgerEvent.CONTROL_REJECTED, message, "deny", {"reason": "not-originator"}
                    )
                ]
            )
        at = iso(now)
        # the originator's words stay in its request, sealed at rest with the other messages: the
        # row, the ledger (kept for good) and the certificate name the request, never quote it
        reason = f"{DESTROYED_ON_REQUEST} ({RETURN_OR_DESTROY_REQUEST} {message.id})"
        drafts, retired = self.node.content.destroy(
            conn, [target], reason=reason, at=at, actor=message.sender
        )
        destroyed = repo.get_message(conn, target["id"])
        assert destroyed is not None
        drafts += self.queue_control(
            conn,
            DESTRUCTION_CERTIFICATE,
            target,
            {
                "message_id": target["id"],
                "envelope_sha256": target["envelope_sha256"],
                "content_sha256": target["content_sha256"] or "",
                "destroyed_at": destroyed["destroyed_at"] or at,
                "reason": reason,
            },
            now,
        )
        return Effects(drafts, retired, wake=True)

    def _on_certificate(
        self, conn: Connection, message: Message, target: dict[str, Any], now: dt.datetime
    ) -> Effects:
        p = message.payload
        matches = (
            p["envelope_sha256"] == target["envelope_sha256"]
            and p["content_sha256"] == target["content_sha256"]
        )
        event = LedgerEvent.DESTRUCTION_CERTIFIED if matches else LedgerEvent.CONTROL_REJECTED
        return Effects(
            [
                self._control_entry(
                    event,
                    message,
                    "allow" if matches else "deny",
                    {
                        "destroyed_at": p["destroyed_at"],
                        "envelope_sha256": p["envelope_sha256"],
                        "content_sha256": p["content_sha256"],
                    }
                    if matches
                    else {"reason": "digests-differ"},
                )
            ]
        )

    @staticmethod
    def _consent_entry(
        event: LedgerEvent, request: dict[str, Any], actor: str, target: dict[str, Any]
    ) -> EntryDraft:
        return EntryDraft(
            event=event,
            message_id=target["id"],
            case_ref=target["case_ref"],
            actor=actor,
            decision=request["status"],
            data={
                "request_id": request["id"],
                "recipient": request["recipient"],
                "use": list(request["purposes"]),
                "expires_at": request["expires_at"],
            },
        )


def _utc(value: Any) -> str | None:
    """An aware time of a validated control payload, normalised to UTC ISO 8601 for storage."""
    if value is None:
        return None
    return _AWARE.validate_python(value).astimezone(dt.UTC).isoformat()


_AWARE: TypeAdapter[dt.datetime] = TypeAdapter(AwareDatetime)


def _remarked(message: Message, marking: Marking) -> Message:
    from dataclasses import replace

    return replace(message, marking=marking)
