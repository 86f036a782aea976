"""Releases to local systems: status, case views, the inbox and a message's content, each decided
by the rule engine on the protection stored here and ledgered (allowed or refused).

Reading, deciding, decrypting and redacting run outside the ledger lock; only the ledger entries go
through the group committer. A refused message is never decrypted (the metadata decides first).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from exchange import envelope
from exchange.agreement import Agreement
from exchange.agreement_history import Terms
from exchange.canonical import canonical_json
from exchange.config import NodeSettings
from exchange.content import ContentStore
from exchange.control import consent_of
from exchange.db import repo, rows
from exchange.db.engine import Database
from exchange.errors import (
    ContentDestroyed,
    ContentUnavailable,
    EnvelopeError,
    NotFound,
)
from exchange.ledger import EntryDraft
from exchange.ledger.events import LedgerEvent
from exchange.messages import (
    MalformedMessage,
    Message,
    parse_signed,
)
from exchange.observability import metrics
from exchange.policy import (
    Actor,
    Consent,
    Decision,
    Use,
    decide,
    redacted_payload,
)

if TYPE_CHECKING:
    from exchange.lifecycle import Lifecycle

log = logging.getLogger("exchange.release")


def default_use(actor: Actor, message: Message, agreement: Agreement) -> Use:
    """The use of a release that declares none: the client's purposes that the message allows,
    except those the agreement wants declared (judicial use)."""
    return Use((actor.purposes & frozenset(message.purposes)) - frozenset(agreement.explicit_purposes))


@dataclass(frozen=True)
class InboxPage:
    items: list[dict[str, Any]]
    next_cursor: int


class Releases:
    """The release use cases of a node (mixed into :class:`exchange.node.Node`)."""

    db: Database
    settings: NodeSettings
    content: ContentStore
    lifecycle: Lifecycle

    @property
    def agreement(self) -> Agreement:
        """The agreement version in force now."""
        raise NotImplementedError

    def terms_of(self, version: str) -> Terms:
        """The agreement version a stored message was signed under, read again if this process does
        not hold it yet (the newest held, the widest vocabulary, if it is no longer held)."""
        raise NotImplementedError

    def ledger(self, now: dt.datetime, *drafts: EntryDraft) -> None:
        raise NotImplementedError

    def status(self, actor: Actor, message_id: str, now: dt.datetime) -> dict[str, Any]:
        """What a local system may know of a message's delivery.

        Raises:
            NotFound: no such message, or the caller may not see it (indistinguishable).
        """
        with self.db.read() as conn:
            row = repo.get_message(conn, message_id)
            history = repo.reclassifications_of(conn, message_id) if row else []
        if row is None or not self.may_see(actor, row, now):
            raise NotFound(f"no message {message_id}")
        view = rows.status_view(row)
        view["reclassifications"] = self.lifecycle.reclassification_history(history)  # the marking over time
        return view

    def case(self, actor: Actor, case_ref: str, now: dt.datetime) -> dict[str, Any]:
        """Every message of a case that this local system may see (metadata only), oldest first.

        Raises:
            NotFound: the case holds no message the caller may see.
        """
        with self.db.read() as conn:
            found = repo.messages_in_case(conn, case_ref, self.settings.case_view_max)
        visible = [rows.case_item(row) for row in found if self.may_see(actor, row, now)]
        if not visible:
            raise NotFound(f"no case {case_ref}")
        return {"case_ref": case_ref, "messages": visible}

    def may_see(self, actor: Actor, row: dict[str, Any], now: dt.datetime, *, asking: bool = False) -> bool:
        """A sent message is seen by the system that sent it; a received one by a system the release
        rules allow (metadata decision, no decryption), with the originator's consents held for it
        where only a consent would open it (an H2 message to a system outside the police).
        ``asking``: also one only a consent would open (the system may ask the originator for it)."""
        if row["kind"] == "control":
            return False  # a node's own protocol: no local system reads it
        if row["direction"] == "out":
            return bool(row["submitted_by"] == actor.client_id)
        message = rows.message_view(row)
        agreement = self.agreement
        use = default_use(actor, message, agreement)

        def allowed(**consent: Any) -> bool:
            return decide(
                "release", agreement=agreement, message=message, actor=actor, use=use, now=now, **consent
            ).allowed

        if allowed():
            return True
        if not allowed(assume_consent=True):
            return False
        if asking:
            return True
        held = self.consents_for([row["id"]]).get(row["id"], [])
        return bool(held) and allowed(consents=held)

    # --- release to local systems ----------------------------------------------------------------

    def inbox(
        self, actor: Actor, after: int, limit: int, now: dt.datetime, purposes: frozenset[str] | None = None
    ) -> InboxPage:
        """The next page of inbound messages this local system may receive, decrypted and redacted,
        in order.

        The cursor is the inbox sequence of the last message examined, so successive pages never
        repeat or skip a message. Reading, deciding, decrypting and redacting run outside the ledger
        lock; every decision (release or refusal) is appended through the group committer.
        ``purposes`` is the declared use (default: the client's purposes the message allows).
        """
        items: list[dict[str, Any]] = []
        drafts: list[EntryDraft] = []
        cursor = after
        budget = self.settings.inbox_scan_max  # examined per call, so a pull is bounded
        while len(items) < limit and budget > 0:
            with self.db.read() as conn:
                batch = repo.inbound_after(conn, cursor, min(limit * 2, budget))
            if not batch:
                break
            budget -= len(batch)
            consents = self.consents_for([row["id"] for row in batch])
            for row in batch:
                if len(items) >= limit:
                    break
                cursor = int(row["inbox_seq"])
                if row["destroyed_at"] is not None:
                    continue  # nothing left to release; its metadata stays in the case view
                item, entry, _decision = self._release(
                    actor, row, cursor, now, purposes, consents.get(row["id"], [])
                )
                drafts.append(entry)
                if item is not None:
                    items.append(item)
        drafts = self.unrepeated(actor, drafts)
        if drafts:
            self.ledger(now, *drafts)
        return InboxPage(items=items, next_cursor=cursor)

    def unrepeated(self, actor: Actor, drafts: Sequence[EntryDraft]) -> list[EntryDraft]:
        """``drafts`` less each refusal that repeats, on the same grounds (rules, agreement, data),
        the latest decision on the same message for the same client already in the ledger (a
        refusal, not a release: a refusal after a release is always ledgered): a client
        pulling the same page again and again cannot grow the ledger, which is kept for good. Every
        release is kept (each is a disclosure), and so is a refusal on new grounds."""
        refused = [d.message_id for d in drafts if d.event == LedgerEvent.RELEASE_REFUSED and d.message_id]
        if not refused:
            return list(drafts)
        with self.db.read() as conn:
            latest = repo.latest_entries_of(
                conn, (LedgerEvent.RELEASE_REFUSED, LedgerEvent.RELEASED), actor.client_id, refused
            )

        def repeats(draft: EntryDraft) -> bool:
            before = latest.get(draft.message_id or "")
            return (
                draft.event == LedgerEvent.RELEASE_REFUSED
                and before is not None
                and before.event == LedgerEvent.RELEASE_REFUSED  # (not after a release)
                and (before.decision, before.rules, before.case_ref)
                == (draft.decision, draft.rules, draft.case_ref)
                and canonical_json(dict(before.data)) == canonical_json(dict(draft.data))
            )

        return [d for d in drafts if not repeats(d)]

    def _release(
        self,
        actor: Actor,
        row: dict[str, Any],
        cursor: int,
        now: dt.datetime,
        purposes: frozenset[str] | None,
        consents: Sequence[Consent] = (),
    ) -> tuple[dict[str, Any] | None, EntryDraft, Decision]:
        """Decide one release (on metadata first, so a refused message is never decrypted)."""
        view = rows.message_view(row)
        agreement = self.agreement  # one version for both decisions
        use = Use(purposes) if purposes is not None else default_use(actor, view, agreement)
        decision = decide(
            "release",
            agreement=agreement,
            message=view,
            actor=actor,
            use=use,
            consents=consents,
            now=now,
        )
        metrics.decided("release", decision)
        if decision.allowed:
            try:
                message = self.stored_message(row)
            except (MalformedMessage, ContentUnavailable, ContentDestroyed, EnvelopeError) as exc:
                log.error("message %s cannot be released: %s", row["id"], type(exc).__name__)
                return None, self._unreadable(actor, row, decision, type(exc).__name__), decision
            decision = decide(
                "release",
                agreement=agreement,
                message=rows.as_protected_here(row, message),
                actor=actor,
                use=use,
                consents=consents,
                now=now,
            )
        entry = EntryDraft(
            event=LedgerEvent.RELEASED if decision.allowed else LedgerEvent.RELEASE_REFUSED,
            message_id=row["id"],
            case_ref=row["case_ref"],
            actor=actor.client_id,
            decision=decision.decision,
            rules=decision.evaluated,
            data={"level": row["common_level"], "use": sorted(use.purposes), **decision.ledger_data()},
        )
        if not decision.allowed:
            return None, entry, decision
        payload = redacted_payload(message, decision)
        return rows.inbox_item(row, message, payload, decision, cursor), entry, decision

    def consents_for(self, message_ids: Sequence[str]) -> dict[str, list[Consent]]:
        """The originator's consents this node holds, by message (one query for a page)."""
        with self.db.read() as conn:
            held = repo.consent_requests_for(conn, direction="out", message_ids=list(message_ids))
        found: dict[str, list[Consent]] = {}
        for request in held:
            consent = consent_of(request)
            if consent is not None:
                found.setdefault(consent.message_id, []).append(consent)
        return found

    def _unreadable(self, actor: Actor, row: dict[str, Any], decision: Decision, why: str) -> EntryDraft:
        return EntryDraft(
            event=LedgerEvent.RELEASE_REFUSED,
            message_id=row["id"],
            case_ref=row["case_ref"],
            actor=actor.client_id,
            decision="deny",
            rules=decision.evaluated,
            data={"reason": "unreadable", "error": why},
        )

    def stored_message(self, row: dict[str, Any]) -> Message:
        """The typed message of a stored row, from its content at rest. The signature is not checked
        again: it was verified when the message was admitted (or made here), under the keys then.

        Raises:
            ContentDestroyed: its content was destroyed.
        """
        try:
            compact = self.content.open(row)
        except ContentUnavailable:  # re-wrapped meanwhile by a destruction in its period: read again
            with self.db.read() as conn:
                fresh = repo.get_message(conn, row["id"])
            if fresh is None or fresh["content_kid"] == row["content_kid"]:
                raise
            compact = self.content.open(fresh)
        signed = envelope.signed_payload(compact)
        terms = self.terms_of(row["agreement_version"])  # its own vocabulary, even if newer than in force
        return parse_signed(signed, agreement=terms.agreement, catalogue=terms.catalogue, stored=True)

    def read(self, actor: Actor, message_id: str, now: dt.datetime) -> dict[str, Any]:
        """A message's content for a local system: the sender reads what it sent; a received one is
        released by the rules (redacted, ledgered) as from the inbox.

        Raises:
            NotFound: no such message, or the caller may not see it.
            ContentDestroyed: it may, but the content was destroyed (when and why).
            PolicyRefusal: the release rules refused (ledgered).
        """
        with self.db.read() as conn:
            row = repo.get_message(conn, message_id)
        if row is None or not self.may_see(actor, row, now):
            raise NotFound(f"no message {message_id}")
        if row["destroyed_at"] is not None:
            raise ContentDestroyed(row["id"], row["destroyed_at"], row["destroyed_reason"])
        if row["direction"] == "out":
            message = self.stored_message(row)
            self.ledger(
                now,
                EntryDraft(
                    event=LedgerEvent.READ,
                    message_id=row["id"],
                    case_ref=row["case_ref"],
                    actor=actor.client_id,
                    decision="allow",
                ),
            )
            return rows.content_view(row, message, dict(message.payload), ())
        held = self.consents_for([row["id"]]).get(row["id"], [])
        item, entry, decision = self._release(actor, row, int(row["inbox_seq"] or 0), now, None, held)
        for unrepeated in self.unrepeated(actor, [entry]):
            self.ledger(now, unrepeated)
        if item is None and decision.allowed:  # allowed, but the content does not open
            raise ContentUnavailable(f"the content of message {message_id} cannot be opened")
        if item is None:
            raise decision.refusal()
        return item
