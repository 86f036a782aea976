"""The node's application services: submit, receive, release, report status.

This is the I/O shell around the pure core: it loads settings, the agreement and keys once, and
runs each use case as one unit of work. Every state change and its ledger entries commit in the
same transaction; the ledger holds ids, hashes and decisions, never content.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from exchange import envelope
from exchange.agreement import Agreement, load_agreement
from exchange.canonical import sha256_hex
from exchange.config import NodeSettings
from exchange.crypto import constant_time_equal
from exchange.db import repo, rows
from exchange.db.committer import GroupCommitter
from exchange.db.engine import Database
from exchange.errors import EnvelopeError, NotFound, PolicyRefusal
from exchange.keys.store import NodeKeys, PartnerKeys, check_keys_match_agreement, load_node_keys
from exchange.ledger import EntryDraft
from exchange.ledger.checkpoint import CheckpointError, verify_checkpoint
from exchange.messages import MessageSubmission, build_message, validate_payload
from exchange.policy import (
    Actor,
    evaluate_inbound,
    evaluate_release,
    evaluate_submission,
    national_equivalent,
)
from exchange.types import KeyId, MessageId, PartyId

log = logging.getLogger("exchange.node")


def iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class PeerResult:
    """The answer to one envelope: a receipt, or an opaque rejection."""

    accepted: bool
    receipt: str | None = None


@dataclass(frozen=True)
class InboxPage:
    items: list[dict[str, Any]]
    next_cursor: int


class Node:
    """One node: settings, agreement, keys and database, loaded and checked once."""

    def __init__(self, settings: NodeSettings, db: Database | None = None) -> None:
        self.settings = settings
        self.party: PartyId = settings.party
        self.agreement: Agreement = load_agreement(settings.agreement_file)
        self.keys: NodeKeys = load_node_keys(settings.key_dir, settings.passphrase())
        check_keys_match_agreement(self.keys, self.agreement)
        self.partner_party: PartyId = self.agreement.partner_of(self.party)
        self.partner: PartnerKeys = PartnerKeys.from_agreement(self.agreement, self.partner_party)
        self.db = db or Database(settings.database_url)
        self.db.check_migrated()
        self.committer = GroupCommitter(self.db)

    def close(self) -> None:
        """Commit what is pending and release the database."""
        self.committer.close()
        self.db.dispose()

    @property
    def accepted_agreements(self) -> dict[str, str]:
        return {self.agreement.version: self.agreement.digest}

    # --- identity --------------------------------------------------------------------------------

    def actor_for(self, fingerprint: str) -> Actor | None:
        """The registered local system holding the certificate with this fingerprint, if any."""
        with self.db.read() as conn:
            row = repo.client_by_fingerprint(conn, fingerprint)
        return rows.actor_from_row(self.agreement, self.party, row) if row else None

    # --- outbound --------------------------------------------------------------------------------

    def submit(
        self,
        actor: Actor,
        submission: MessageSubmission,
        now: dt.datetime,
        on_write: Callable[[Connection, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Accept a local system's message: validate, decide, seal and queue it in one transaction.

        ``on_write(conn, answer)`` runs inside that transaction with the answer this returns (an
        idempotency key is stored with its message and answer); if it raises, nothing is written.

        Raises:
            InvalidInput: the payload does not match its type's schema.
            MessageTooLarge: the sealed envelope would exceed the agreement's limit.
            PolicyRefusal: naming every rule that refused (the refusal itself is ledgered).
        """
        validate_payload(self.agreement, submission.type, submission.payload)
        with self.db.read() as conn:  # one read: the message answered, and our latest checkpoint
            replied_to = repo.get_message(conn, submission.in_reply_to) if submission.in_reply_to else None
            latest = repo.latest_checkpoint(conn)
        try:
            decision = evaluate_submission(
                self.agreement,
                party=self.party,
                actor=actor,
                message_type=submission.type,
                purposes=submission.purposes,
                scheme=submission.classification.scheme,
                level=submission.classification.level,
                tlp=submission.tlp,
                handling_codes=submission.handling_codes,
                replied_to=replied_to,
                in_reply_to=submission.in_reply_to,
            )
        except PolicyRefusal as refusal:
            self._ledger(
                now,
                EntryDraft(
                    event="submission.refused",
                    actor=actor.client_id,
                    decision="deny",
                    rules=tuple(v.rule_id for v in refusal.violations),
                    case_ref=submission.case_ref,
                    data={
                        "type": submission.type,
                        "agreement": self.agreement.version,
                    },
                ),
            )
            raise
        thread_id = replied_to["thread_id"] if replied_to else None
        message = build_message(
            submission,
            agreement=self.agreement,
            sender=self.party,
            actor=actor,
            marking=decision.marking,
            now=now,
            thread_id=thread_id,
            checkpoint=str(latest["note"]) if latest else None,
        )
        sealed = envelope.seal(message, signing_key=self.keys.signing, recipient_key=self.partner.encryption)
        envelope.check_envelope_size(sealed, self.agreement.max_envelope_bytes)
        digest = envelope.envelope_digest(sealed)
        mid = message["id"]

        partner_scheme = self.agreement.parties[self.partner_party].scheme
        answer: dict[str, Any] = {
            "id": mid,
            "status": "queued",
            "thread_id": message["thread_id"],
            "classification": {
                **message["classification"],
                "partner_equivalent": {
                    "scheme": partner_scheme,
                    "level": national_equivalent(self.agreement, decision.marking.common, partner_scheme),
                },
            },
            "envelope_sha256": digest,
        }

        def write(conn: Connection, head: repo.LedgerHead) -> repo.LedgerHead:
            repo.insert_message(
                conn,
                rows.message_row(
                    message,
                    direction="out",
                    local_level=decision.marking.level,
                    status="queued",
                    envelope=sealed,
                    envelope_sha256=digest,
                    submitted_by=actor.client_id,
                    now=iso(now),
                ),
            )
            repo.enqueue(conn, mid, now.timestamp())
            if on_write is not None:
                on_write(conn, answer)
            return repo.append_ledger(
                conn,
                head,
                [
                    EntryDraft(
                        event="message.submitted",
                        message_id=mid,
                        actor=actor.client_id,
                        decision="allow",
                        rules=tuple(r.rule_id for r in decision.rules),
                        case_ref=message["case_ref"],
                        data={
                            "type": message["type"],
                            "level": decision.marking.common,
                            "envelope_sha256": digest,
                            "agreement": self.agreement.version,
                        },
                    )
                ],
                iso(now),
            )

        self.committer.run(write)
        return answer

    def status(self, actor: Actor, message_id: str) -> dict[str, Any]:
        """What a local system may know of a message's delivery.

        Raises:
            NotFound: no such message, or the caller may not see it (indistinguishable).
        """
        with self.db.read() as conn:
            row = repo.get_message(conn, message_id)
        if row is None or not self._may_see(actor, row):
            raise NotFound(f"no message {message_id}")
        return rows.status_view(row)

    def _may_see(self, actor: Actor, row: dict[str, Any]) -> bool:
        if row["direction"] == "out":
            return bool(row["submitted_by"] == actor.client_id)
        return evaluate_release(
            self.agreement, actor=actor, message_type=row["type"], common_level=row["common_level"]
        ).allowed

    # --- inbound ---------------------------------------------------------------------------------

    def receive(self, envelopes: Sequence[str], now: dt.datetime) -> list[PeerResult]:
        """Verify, de-duplicate, store and receipt a batch of envelopes from the partner node.

        An admitted message's inbox position is 1 + the ledger sequence of its ``envelope.received``
        entry: assigned under the ledger lock, so positions grow in commit order.

        Crypto runs before the ledger lock is taken; the batch's state changes and ledger entries
        commit in one transaction. A redelivered envelope gets its original receipt and stores
        nothing twice. A rejection tells the peer nothing but "rejected"; the reason goes to the
        log and the ledger.
        """
        opened: list[envelope.OpenedEnvelope | EnvelopeError] = []
        for compact in envelopes:
            try:
                opened.append(self._open(compact, now))
            except EnvelopeError as exc:
                log.warning("rejected envelope %s: %s", envelope.envelope_digest(compact)[:16], exc)
                opened.append(exc)
        results: list[PeerResult] = []
        drafts: list[EntryDraft] = []
        at = iso(now)
        with self.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            for compact, item in zip(envelopes, opened, strict=True):
                if isinstance(item, EnvelopeError):
                    drafts.append(self._rejection(envelope.envelope_digest(compact), item.reason, None))
                    results.append(PeerResult(False))
                    continue
                result, new = self._admit(conn, compact, item, now, head.size + len(drafts) + 1)
                drafts.extend(new)
                results.append(result)
            repo.append_ledger(conn, head, drafts, at)
        return results

    def _open(self, compact: str, now: dt.datetime) -> envelope.OpenedEnvelope:
        return envelope.open_envelope(
            compact,
            decryption_keys=self.keys.decryption,
            verification_keys=self.partner.verification,
            expected_sender=self.partner_party,
            expected_recipient=self.party,
            accepted_agreements=self.accepted_agreements,
            now=now,
            clock_skew=dt.timedelta(seconds=self.settings.clock_skew_seconds),
            replay_window=dt.timedelta(seconds=self.settings.replay_window_seconds),
            max_envelope_bytes=self.agreement.max_envelope_bytes,
        )

    def _rejection(
        self, digest: str, reason: str, message_id: str | None, rules: tuple[str, ...] = ()
    ) -> EntryDraft:
        return EntryDraft(
            event="envelope.rejected",
            message_id=message_id,
            actor=self.partner_party,
            decision="deny",
            rules=rules,
            data={"envelope_sha256": digest, "reason": reason},
        )

    def _admit(
        self, conn: Any, compact: str, opened: envelope.OpenedEnvelope, now: dt.datetime, inbox_seq: int
    ) -> tuple[PeerResult, list[EntryDraft]]:
        message = opened.message
        mid = str(message["id"])
        existing = repo.get_message(conn, mid)
        if existing is not None:
            if existing["direction"] == "in" and existing["envelope_sha256"] == opened.digest:
                return PeerResult(True, existing["receipt"]), [
                    EntryDraft(
                        event="envelope.redelivered",
                        message_id=mid,
                        actor=self.partner_party,
                        decision="allow",
                        data={"envelope_sha256": opened.digest},
                    )
                ]
            log.warning("rejected envelope for message %s: id reused with other content", mid)
            return PeerResult(False), [self._rejection(opened.digest, "duplicate-id", mid)]
        try:
            common, local_level = evaluate_inbound(self.agreement, party=self.party, message=message)
        except PolicyRefusal as refusal:
            rules = tuple(v.rule_id for v in refusal.violations)
            log.warning("rejected envelope for message %s by policy: %s", mid, refusal)
            return PeerResult(False), [self._rejection(opened.digest, "policy", mid, rules)]
        receipt = envelope.sign_receipt(
            message_id=mid,
            envelope_sha256=opened.digest,
            receiver=self.party,
            sender=self.partner_party,
            received_at=now,
            signing_key=self.keys.signing,
        )
        row = rows.message_row(
            message,
            direction="in",
            local_level=local_level,
            status="received",
            envelope=compact,
            envelope_sha256=opened.digest,
            submitted_by=None,
            now=iso(now),
        )
        row.update(receipt=receipt, receipt_at=iso(now), inbox_seq=inbox_seq)
        repo.insert_message(conn, row)
        data = {
            "type": message["type"],
            "level": common,
            "envelope_sha256": opened.digest,
            "signer_kid": opened.signer_kid,
            "agreement": message["agreement"]["version"],
        }
        drafts = [
            EntryDraft(
                event="envelope.received",
                message_id=mid,
                case_ref=message["case_ref"],
                actor=self.partner_party,
                decision="allow",
                rules=("R-TYPE-KNOWN", "R-PURPOSE-TYPE"),
                data=data,
            ),
            EntryDraft(
                event="receipt.issued",
                message_id=mid,
                case_ref=message["case_ref"],
                actor=self.party,
                data={"receipt_sha256": envelope.envelope_digest(receipt)},
            ),
        ]
        incident = self._judge_checkpoint(conn, message)
        if incident is not None:
            log.error("SECURITY INCIDENT: message %s carries a partner checkpoint that %s", mid, incident)
            drafts.append(
                EntryDraft(
                    event="checkpoint.incident",
                    message_id=mid,
                    actor=self.partner_party,
                    decision="deny",
                    data={
                        "reason": incident.split(":")[0],
                        "note_sha256": sha256_hex(str(message.get("checkpoint"))),
                    },
                )
            )
        return PeerResult(True, receipt), drafts

    def _judge_checkpoint(self, conn: Any, message: dict[str, Any]) -> str | None:
        """What is wrong with the sender's checkpoint carried in a verified message, if anything.

        A split view: a checkpoint of a size already witnessed, with another root. A rollback: a
        checkpoint smaller than one witnessed before the message was sealed (an honest sender's
        larger checkpoint is signed, and so witnessed, only after it sealed the message).
        """
        note = message.get("checkpoint")
        if note is None:
            return None
        try:
            checkpoint = verify_checkpoint(
                str(note), origin=self.partner.ledger_origin, key=self.partner.checkpoint
            )
        except CheckpointError as exc:
            return f"invalid: {exc}"
        same = repo.witnessed_at_size(conn, checkpoint.size)
        if same is not None and not constant_time_equal(bytes(same["root_hash"]), checkpoint.root):
            return f"split view: a second root for size {checkpoint.size}"
        sealed = dt.datetime.fromisoformat(str(message["created_at"]))
        earlier = repo.first_witnessed_above(conn, checkpoint.size)
        skew = dt.timedelta(seconds=self.settings.clock_skew_seconds)
        if earlier is not None and dt.datetime.fromisoformat(earlier) + skew < sealed:
            return f"rollback: size {checkpoint.size} sealed after a larger one was witnessed at {earlier}"
        return None

    # --- release to local systems ----------------------------------------------------------------

    def inbox(self, actor: Actor, after: int, limit: int, now: dt.datetime) -> InboxPage:
        """The next page of inbound messages this local system may receive, decrypted, in order.

        The cursor is the inbox sequence of the last message examined, so successive pages never
        repeat or skip a message; each release is ledgered with the rules that allowed it.
        """
        items: list[dict[str, Any]] = []
        drafts: list[EntryDraft] = []
        cursor = after
        with self.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            while len(items) < limit:
                batch = repo.inbound_after(conn, cursor, limit * 2)
                if not batch:
                    break
                for row in batch:
                    if len(items) >= limit:
                        break
                    cursor = int(row["inbox_seq"])
                    decision = evaluate_release(
                        self.agreement,
                        actor=actor,
                        message_type=row["type"],
                        common_level=row["common_level"],
                    )
                    if not decision.allowed:
                        continue
                    message = self._decrypt_stored(row["envelope"])
                    items.append(rows.inbox_item(row, message, cursor))
                    drafts.append(
                        EntryDraft(
                            event="message.released",
                            message_id=row["id"],
                            case_ref=row["case_ref"],
                            actor=actor.client_id,
                            decision="allow",
                            rules=tuple(r.rule_id for r in decision.rules),
                            data={"redacted": list(decision.redacted), "level": row["common_level"]},
                        )
                    )
            repo.append_ledger(conn, head, drafts, iso(now))
        return InboxPage(items=items, next_cursor=cursor)

    def _decrypt_stored(self, compact: str) -> dict[str, Any]:
        return envelope.open_stored(
            compact,
            decryption_keys=self.keys.decryption,
            verification_keys=self.partner.verification,
            max_envelope_bytes=self.agreement.max_envelope_bytes,
        ).message

    # --- ledger ----------------------------------------------------------------------------------

    def _ledger(self, now: dt.datetime, *drafts: EntryDraft) -> None:
        self.committer.run(lambda conn, head: repo.append_ledger(conn, head, list(drafts), iso(now)))


__all__ = ["InboxPage", "KeyId", "MessageId", "Node", "NotFound", "PeerResult"]
