"""After delivery: the use cases of consent for onward use, reclassification and return-or-destroy.

Each use case runs in one transaction holding the ledger lock, composes the control message that
tells the partner (:class:`exchange.control.ControlProtocol`), ledgers what it did, and wakes the
delivery loop. The protocol (``docs/lifecycle.md``):

- CONSENT_REQUEST (receiver -> originator), CONSENT_DECISION (originator -> receiver: GRANTED,
  REFUSED or REVOKED, with conditions and an expiry). An onward release (``onward``) or a judicial
  use of an H1 message is decided by the engine with the consents held, and a RELEASE_NOTICE tells
  the originator what was passed on.
- RECLASSIFICATION_NOTICE (originator -> receiver): the new marking; both nodes keep the history and
  still protect the message at its floor.
- RETURN_OR_DESTROY_REQUEST (originator -> receiver): the receiver destroys the content at once and
  answers with a DESTRUCTION_CERTIFICATE naming the digests, which the originator checks and ledgers.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from exchange.control import (
    CONSENT_DECISION,
    CONSENT_REQUEST,
    RECLASSIFICATION_NOTICE,
    RELEASE_NOTICE,
    RETURN_OR_DESTROY_REQUEST,
    SECURITY_INCIDENT_NOTIFICATION,
    ControlProtocol,
    iso,
)
from exchange.db import repo, rows
from exchange.errors import ContentDestroyed, FieldError, InvalidInput, NotFound, Unauthorised
from exchange.ledger import EntryDraft
from exchange.ledger.events import LedgerEvent
from exchange.observability import metrics
from exchange.policy import Actor, Marking, Use, decide, redacted_payload

if TYPE_CHECKING:
    from exchange.node import Node

log = logging.getLogger("exchange.lifecycle")


def request_view(
    row: dict[str, Any], now: dt.datetime, payloads: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """A consent request as its parties see it, with its age. Its words (the justification, the
    decision's conditions) come from the payloads of the control messages that carried them
    (:meth:`ControlProtocol.sealed_payloads`): null once those were destroyed."""
    view = {
        k: row[k]
        for k in (
            "id",
            "message_id",
            "direction",
            "recipient",
            "purposes",
            "status",
            "requested_by",
            "requested_at",
            "decided_by",
            "decided_at",
            "expires_at",
            "revoked_at",
        )
    }
    view["justification"] = payloads.get(row["request_control_id"] or "", {}).get("justification")
    view["conditions"] = payloads.get(row["decision_control_id"] or "", {}).get("conditions")
    view["age_seconds"] = int((now - dt.datetime.fromisoformat(row["requested_at"])).total_seconds())
    return view


class Lifecycle(ControlProtocol):
    """The use cases after delivery, for one node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def _transaction(self, now: dt.datetime, work: Any) -> Any:
        """Run ``work(conn) -> (result, drafts, retired)`` under the ledger lock, ledger its drafts,
        destroy retired KEKs after the commit and wake the delivery loop."""
        with self.node.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            result, drafts, retired = work(conn)
            repo.append_ledger(conn, head, drafts, iso(now))
        self.node.content.retire(retired, self.node.db)
        self.node.wake_delivery()
        return result

    def _visible_inbound(
        self, actor: Actor, message_id: str, now: dt.datetime, *, asking: bool = False
    ) -> dict[str, Any]:
        with self.node.db.read() as conn:
            row = repo.get_message(conn, message_id)
        if row is None or row["direction"] != "in" or not self.node.may_see(actor, row, now, asking=asking):
            raise NotFound(f"no received message {message_id}")
        if row["destroyed_at"] is not None:
            raise ContentDestroyed(row["id"], row["destroyed_at"], row["destroyed_reason"])
        return row

    def _own_outbound(self, actor: Actor, message_id: str) -> dict[str, Any]:
        with self.node.db.read() as conn:
            row = repo.get_message(conn, message_id)
        if row is None or not self._acts_for_originator(actor, row):
            raise NotFound(f"no message {message_id} sent by this system")
        return row

    def _decides(self, actor: Actor) -> bool:
        return bool(actor.roles & frozenset(self.agreement.consent_decider_roles))

    def _acts_for_originator(self, actor: Actor, row: dict[str, Any]) -> bool:
        """Whether ``actor`` speaks for this node as the originator of ``row``: the system that sent
        it, or a consent decider of the originating agency and unit, cleared for its level and
        entitled to its case (never another unit's decider, never beyond)."""
        if row["direction"] != "out" or row["kind"] != "information":
            return False
        if row["submitted_by"] == actor.client_id:
            return True
        cleared = self.agreement.level_rank(actor.clearance) >= self.agreement.level_rank(row["common_level"])
        entitled = actor.cases is None or row["case_ref"] in actor.cases
        return (
            self._decides(actor)
            and cleared
            and entitled
            and self._origin_of(row) == (actor.agency, actor.unit)
        )

    @staticmethod
    def _origin_of(row: dict[str, Any]) -> tuple[str, str] | None:
        """The agency and unit that originated a sent message, as signed; None when unknown (a row
        of before migration 0015 whose submitting client was removed and whose content does not
        open: NULL until the next start, then ``''``): then only the system that sent it acts."""
        if not row["origin_unit"]:
            return None
        return row["origin_agency"], row["origin_unit"]

    def seal_legacy_rows(self) -> int:
        """Bring rows written before migration 0015 under it, once, holding the ledger lock (one
        process does it; the others find nothing left): the free text that consent requests and
        reclassifications kept in clear is emptied, each row linked to the sealed control message
        that carried the very same words about the same message (words whose message was destroyed
        are gone with it, as they should be); a sent message whose submitting client was removed
        (the migration filled the others from the registrations) gets its origin from its content,
        or none (``''``) if it does not open (logged by id). Returns the rows changed."""
        with self.node.db.read() as conn:
            if not repo.rows_before_0015(conn):
                return 0
        with self.node.db.transaction() as conn:
            repo.lock_ledger_head(conn)
            consents, reclassed = repo.words_in_clear(conn)
            origins = repo.sent_without_origin(conn)
            threads = repo.threads_of(conn, [r["message_id"] for r in [*consents, *reclassed]])
            controls = repo.control_messages(
                conn, [CONSENT_REQUEST, CONSENT_DECISION, RECLASSIFICATION_NOTICE], threads
            )
            fields = {
                CONSENT_REQUEST: ("request_id", "justification"),
                CONSENT_DECISION: ("request_id", "conditions"),
                RECLASSIFICATION_NOTICE: ("notice_id", "reason"),
            }
            # (type, id, about, direction) -> the words and the id of each control message that
            # carried them; none the node refused (a partner's reusing an id it knew, a late one)
            refused = {
                str(e.data.get("control")) for e in repo.entries_of(conn, [LedgerEvent.CONTROL_REJECTED])
            }
            carried: dict[tuple[str, str, str, str], list[tuple[Any, str]]] = {}
            for row in controls:
                payload = self._payload_or_none(row) if row["id"] not in refused else None
                if payload is None or payload.get("decision") == "REVOKED":  # (a revocation carries no words)
                    continue
                key, words = fields[row["type"]]
                about = (row["type"], str(payload.get(key)), str(payload.get("message_id")), row["direction"])
                carried.setdefault(about, []).append((payload.get(words), row["id"]))
            targets = repo.get_messages(conn, [r["message_id"] for r in reclassed])

            def link(message_type: str, ref: str, about: str, direction: str, words: Any) -> str | None:
                """The control message that carried ``words`` (the very same) about ``about`` in
                ``direction``; for a row a downgrade left with its placeholder, the first this node
                sent (it never reuses an id), or the only one it received, if only one."""
                found = carried.get((message_type, ref, about, direction), [])
                if words == DOWNGRADED:
                    return found[0][1] if found and (direction == "out" or len(found) == 1) else None
                return next((control for said, control in found if said == words), None)

            for request in consents:
                asked, decided = request["justification"], request["conditions"]
                on = (request["id"], request["message_id"])
                if asked == DOWNGRADED and decided is None and request["status"] != "pending":
                    decided = DOWNGRADED  # (its conditions were sealed before the downgrade too)
                # the request went the row's way (out: we asked), the decision the other way
                answered = "in" if request["direction"] == "out" else "out"
                repo.update_consent_request(
                    conn,
                    request["id"],
                    justification=None,
                    conditions=None,
                    request_control_id=request["request_control_id"]
                    or link(CONSENT_REQUEST, *on, request["direction"], asked),
                    decision_control_id=request["decision_control_id"]
                    or (link(CONSENT_DECISION, *on, answered, decided) if decided is not None else None),
                )
            for history in reclassed:
                target = targets.get(history["message_id"])  # the notice went the message's way
                way = target["direction"] if target else ""
                notice = link(
                    RECLASSIFICATION_NOTICE,
                    history["notice_id"],
                    history["message_id"],
                    way,
                    history["reason"],
                )
                repo.update_reclassification(
                    conn, history["id"], reason=None, control_id=history["control_id"] or notice
                )
            for row in origins:  # ('' where its content does not open: only the system that sent it acts)
                message = self._payload_or_none(row, whole=True)
                agency, unit = (
                    (message.origin.agency, message.origin.unit) if message is not None else ("", "")
                )
                repo.update_message(conn, row["id"], origin_agency=agency, origin_unit=unit)
        log.info(
            "rows written before migration 0015 brought under it: the words of %d consent request(s)"
            " and %d reclassification(s) now only in their sealed control messages; %d origin(s) read",
            len(consents),
            len(reclassed),
            len(origins),
        )
        if consents or reclassed:  # the emptied words, out of the database's files
            self.node.db.compact(["consent_requests", "reclassifications"])
        return len(consents) + len(reclassed) + len(origins)

    # --- consent: the receiving side ------------------------------------------------------------------

    def request_consent(
        self,
        actor: Actor,
        message_id: str,
        *,
        recipient: str | None,
        purposes: list[str],
        justification: str,
        now: dt.datetime,
    ) -> dict[str, Any]:
        """Ask the originator to allow a use of a received message: passing it to a third party named
        in the agreement (``recipient``), or a use by this police outside the message's terms (judicial
        use of an H1 message: ``recipient`` None, ``JUDICIAL_EVIDENCE``).

        Raises:
            NotFound: no such received message the caller may see.
            InvalidInput: an unknown recipient or purpose, or no justification.
        """
        row = self._visible_inbound(actor, message_id, now, asking=True)  # (a consent may open it)
        errors = []
        if recipient is not None and recipient not in self.agreement.third_parties:
            errors.append(
                FieldError("recipient", f"{recipient!r} is not among {sorted(self.agreement.third_parties)}")
            )
        unknown = [p for p in purposes if p not in self.agreement.purposes]
        if unknown or not purposes:
            errors.append(
                FieldError("purposes", f"give purposes of the agreement ({unknown or 'none given'})")
            )
        if not justification.strip():
            errors.append(FieldError("justification", "say why the use is needed"))
        if errors:
            raise InvalidInput("the consent request is invalid", errors)
        request_id, control_id = str(uuid.uuid4()), str(uuid.uuid4())
        stored = {
            "id": request_id,
            "message_id": message_id,
            "direction": "out",
            "requested_by": actor.client_id,
            "recipient": recipient,
            "purposes": list(purposes),
            "justification": None,  # the words stay sealed in the request
            "status": "pending",
            "requested_at": iso(now),
            "decided_by": None,
            "decided_at": None,
            "conditions": None,
            "expires_at": None,
            "revoked_at": None,
            "request_control_id": control_id,
            "decision_control_id": None,
        }
        payload = {
            "request_id": request_id,
            "message_id": message_id,
            "recipient": recipient,
            "purposes": list(purposes),
            "justification": justification,
        }

        def work(conn: Connection) -> tuple[dict[str, Any], list[EntryDraft], list[str]]:
            repo.insert_consent_request(conn, stored)
            drafts = self.queue_control(conn, CONSENT_REQUEST, row, payload, now, message_id=control_id)
            drafts.append(self._consent_entry(LedgerEvent.CONSENT_REQUESTED, stored, actor.client_id, row))
            return request_view(stored, now, {control_id: payload}), drafts, []

        return dict(self._transaction(now, work))

    def release_onward(
        self, actor: Actor, message_id: str, *, recipient: str, purposes: list[str], now: dt.datetime
    ) -> dict[str, Any]:
        """Pass a received message to a third party: decided by the engine with the originator's
        consents; the release is ledgered here and notified to the originator, who ledgers it too.

        Raises:
            NotFound, ContentDestroyed: as :meth:`request_consent`.
            PolicyRefusal: the rules refused (naming the consent that would allow it); ledgered.
        """
        row = self._visible_inbound(actor, message_id, now)
        if recipient not in self.agreement.third_parties:
            raise InvalidInput(
                "unknown recipient",
                [FieldError("recipient", f"not among {sorted(self.agreement.third_parties)}")],
            )
        message = rows.as_protected_here(row, self.node.stored_message(row))
        consents = self.node.consents_for([message_id]).get(message_id, [])
        use = Use(frozenset(purposes), recipient=recipient)
        decision = decide(
            "onward",
            agreement=self.agreement,
            message=message,
            actor=actor,
            use=use,
            consents=consents,
            now=now,
        )
        metrics.decided("onward", decision)
        entry = EntryDraft(
            event=LedgerEvent.ONWARD_RELEASED if decision.allowed else LedgerEvent.ONWARD_REFUSED,
            message_id=message_id,
            case_ref=row["case_ref"],
            actor=actor.client_id,
            decision=decision.decision,
            rules=decision.evaluated,
            data={"recipient": recipient, "use": sorted(purposes), **decision.ledger_data()},
        )
        if not decision.allowed:
            self.node.ledger(now, entry)
            raise decision.refusal()

        def work(conn: Connection) -> tuple[None, list[EntryDraft], list[str]]:
            drafts = self.queue_control(
                conn,
                RELEASE_NOTICE,
                row,
                {
                    "message_id": message_id,
                    "recipient": recipient,
                    "purposes": sorted(purposes),
                    "released_at": iso(now),
                },
                now,
            )
            return None, [entry, *drafts], []

        self._transaction(now, work)
        item = rows.content_view(row, message, redacted_payload(message, decision), decision.redactions)
        item["released_to"] = recipient
        return item

    # --- consent: the originating side ------------------------------------------------------------------

    def consent_requests(
        self, actor: Actor, now: dt.datetime, *, status: str | None = None
    ) -> list[dict[str, Any]]:
        """Requests about this node's messages (for the agreement's consent deciders) and the
        caller's own requests to the partner, with their age."""
        with self.node.db.read() as conn:
            asked_of_us = [
                r
                for r in (repo.consent_requests_for(conn, direction="in") if self._decides(actor) else [])
                if (target := repo.get_message(conn, r["message_id"]))
                and self._acts_for_originator(actor, target)
            ]
            ours = [
                r
                for r in repo.consent_requests_for(conn, direction="out")
                if r["requested_by"] == actor.client_id
            ]
        found = [r for r in [*asked_of_us, *ours] if status is None or r["status"] == status]
        payloads = self.sealed_payloads(
            [c for r in found for c in (r["request_control_id"], r["decision_control_id"])]
        )
        return [request_view(r, now, payloads) for r in found]

    def decide_consent(
        self,
        actor: Actor,
        request_id: str,
        *,
        grant: bool,
        conditions: str | None,
        expires_at: dt.datetime | None,
        now: dt.datetime,
    ) -> dict[str, Any]:
        """The originator's decision on a pending request, sent back to the partner.

        Raises:
            NotFound: no such pending request, or the caller is not a consent decider.
            InvalidInput: a grant without a future expiry; conditions that say nothing.
        """
        request = self._request_to_decide(actor, request_id, pending=True)
        if grant and (expires_at is None or expires_at.tzinfo is None or expires_at <= now):
            raise InvalidInput(
                "a consent expires", [FieldError("expires_at", "give a future time with a time zone")]
            )
        if conditions is not None and not conditions.strip():
            raise InvalidInput(
                "the decision is invalid",
                [FieldError("conditions", "state the conditions, or leave them out")],
            )
        values = {
            "status": "granted" if grant else "refused",
            "decided_by": actor.client_id,
            "decided_at": iso(now),
            "expires_at": iso(expires_at) if grant and expires_at else None,
        }
        return self._send_decision(
            actor, request, values, "GRANTED" if grant else "REFUSED", now, conditions=conditions
        )

    def revoke_consent(self, actor: Actor, request_id: str, now: dt.datetime) -> dict[str, Any]:
        """Revoke a granted consent from now on. Raises NotFound if there is no granted one."""
        request = self._request_to_decide(actor, request_id, pending=False)
        if request["status"] != "granted":
            raise NotFound(f"no granted consent {request_id}")
        return self._send_decision(
            actor, request, {"status": "revoked", "revoked_at": iso(now)}, "REVOKED", now
        )

    def _request_to_decide(self, actor: Actor, request_id: str, *, pending: bool) -> dict[str, Any]:
        with self.node.db.read() as conn:
            request = repo.get_consent_request(conn, request_id)
            target = repo.get_message(conn, request["message_id"]) if request else None
        if (
            request is None
            or target is None
            or request["direction"] != "in"
            or not self._decides(actor)
            or not self._acts_for_originator(actor, target)
            or (pending and request["status"] != "pending")
        ):
            raise NotFound(f"no {'pending ' if pending else ''}consent request {request_id} for this system")
        return request

    def _send_decision(
        self,
        actor: Actor,
        request: dict[str, Any],
        values: dict[str, Any],
        verdict: str,
        now: dt.datetime,
        *,
        conditions: str | None = None,
    ) -> dict[str, Any]:
        """Record and send a decision; the conditions travel sealed in it (a revocation keeps the
        grant's decision as the one whose conditions stand)."""
        expected = "granted" if verdict == "REVOKED" else "pending"
        control_id = str(uuid.uuid4())
        if verdict != "REVOKED":
            values = {**values, "decision_control_id": control_id}
        payloads = self.sealed_payloads([request["request_control_id"], request["decision_control_id"]])
        payload = {
            "request_id": request["id"],
            "message_id": request["message_id"],
            "decision": verdict,
            "conditions": conditions,
            "expires_at": values.get("expires_at", request["expires_at"]),
        }

        def work(conn: Connection) -> tuple[dict[str, Any], list[EntryDraft], list[str]]:
            current = repo.get_consent_request(conn, request["id"])  # under the ledger lock: decided once
            if current is None or current["status"] != expected:
                raise NotFound(f"no {expected} consent request {request['id']}")
            repo.update_consent_request(conn, request["id"], **values)
            target = repo.get_message(conn, request["message_id"])
            assert target is not None
            updated = {**request, **values}
            drafts = self.queue_control(conn, CONSENT_DECISION, target, payload, now, message_id=control_id)
            drafts.append(self._consent_entry(LedgerEvent.CONSENT_DECIDED, updated, actor.client_id, target))
            return request_view(updated, now, {**payloads, control_id: payload}), drafts, []

        return dict(self._transaction(now, work))

    # --- reclassification and return-or-destroy (the originator) -------------------------------------------

    def reclassify(
        self, actor: Actor, message_id: str, *, level: str, reason: str, now: dt.datetime
    ) -> dict[str, Any]:
        """The originator's new marking of a message it sent, applied here and sent to the partner.
        The message stays protected at least at its floor on both sides.

        Raises:
            NotFound: no such message sent by the caller (or the caller is no consent decider).
            InvalidInput: a level that is not of this node's scheme, or no reason.
        """
        row = self._own_outbound(actor, message_id)
        own = self.agreement.parties[self.node.party].scheme
        levels = self.agreement.schemes[own].levels
        errors = [] if level in levels else [FieldError("level", f"one of {list(levels)}")]
        if level in levels and self.agreement.level_rank(levels[level]) > self.agreement.level_rank(
            actor.clearance
        ):
            errors.append(FieldError("level", "above this system's clearance"))
        errors += [] if reason.strip() else [FieldError("reason", "say why")]
        if errors:
            raise InvalidInput("the reclassification is invalid", errors)
        notice_id, control_id = str(uuid.uuid4()), str(uuid.uuid4())

        def work(conn: Connection) -> tuple[dict[str, Any], list[EntryDraft], list[str]]:
            drafts = self._apply_marking(
                conn, row, Marking(own, level, levels[level]), notice_id, control_id, now
            )
            drafts += self.queue_control(
                conn,
                RECLASSIFICATION_NOTICE,
                row,
                {
                    "notice_id": notice_id,
                    "message_id": message_id,
                    "classification": {"scheme": own, "level": level},
                    "reason": reason,
                },
                now,
                message_id=control_id,
            )
            updated = repo.get_message(conn, message_id)
            assert updated is not None
            return rows.status_view(updated), drafts, []

        return dict(self._transaction(now, work))

    def notify_incident(self, actor: Actor, notice: IncidentNotice, now: dt.datetime) -> dict[str, Any]:
        """Tell the originator of received messages that they were accessed or disclosed without
        authority (a security incident), signed; both nodes ledger it.

        Raises:
            Unauthorised: the caller is not a consent decider of this node.
            NotFound: a message is not one received from the partner that the caller may see.
        """
        if not self._decides(actor):
            raise Unauthorised("only this node's consent deciders notify security incidents")
        with self.node.db.read() as conn:
            found = [repo.get_message(conn, mid) for mid in notice.message_ids]
        targets = [  # (one the caller may not see answers as one that does not exist)
            r
            for r in found
            if r is not None
            and r["direction"] == "in"
            and r["kind"] == "information"
            and self.node.may_see(actor, r, now)
        ]
        if not notice.message_ids or len(targets) != len(notice.message_ids):
            raise NotFound("name messages received from the partner that this system may see")
        incident_id = str(uuid.uuid4())
        payload = {
            "incident_id": incident_id,
            "kind": notice.kind,
            "message_ids": list(notice.message_ids),
            "detected_at": notice.detected_at.isoformat(),
            "personal_data": notice.personal_data,
            "summary": notice.summary,
        }

        def work(conn: Connection) -> tuple[dict[str, Any], list[EntryDraft], list[str]]:
            drafts = self.queue_control(conn, SECURITY_INCIDENT_NOTIFICATION, targets[0], payload, now)
            drafts.append(
                EntryDraft(
                    event=LedgerEvent.INCIDENT_NOTIFIED,
                    message_id=targets[0]["id"],
                    case_ref=targets[0]["case_ref"],
                    actor=actor.client_id,
                    decision="incident",
                    data={
                        "kind": notice.kind,
                        "about": list(notice.message_ids),
                        "personal_data": notice.personal_data,
                    },
                )
            )
            return {"incident_id": incident_id, "status": "notified"}, drafts, []

        return dict(self._transaction(now, work))

    def return_or_destroy(
        self, actor: Actor, message_id: str, *, reason: str, now: dt.datetime
    ) -> dict[str, Any]:
        """Ask the partner to destroy a message this node sent; it answers with a certificate."""
        row = self._own_outbound(actor, message_id)
        if not reason.strip():
            raise InvalidInput("say why", [FieldError("reason", "say why the partner must destroy it")])

        def work(conn: Connection) -> tuple[dict[str, Any], list[EntryDraft], list[str]]:
            drafts = self.queue_control(
                conn,
                RETURN_OR_DESTROY_REQUEST,
                row,
                {
                    "message_id": message_id,
                    "reason": reason,
                },
                now,
            )
            return {"message_id": message_id, "status": "requested"}, drafts, []

        return dict(self._transaction(now, work))


#: what a downgrade below migration 0015 writes where the words were (they stay sealed)
DOWNGRADED = ""


@dataclass(frozen=True)
class IncidentNotice:
    """What a security incident notice says."""

    kind: str
    message_ids: tuple[str, ...]
    detected_at: dt.datetime
    personal_data: bool
    summary: str
