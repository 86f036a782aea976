"""The node's application services: submit, receive, release, report status.

This is the I/O shell around the pure core: it loads settings, the agreement and keys once, and
runs each use case as one unit of work. Every state change and its ledger entries commit in the
same transaction; the ledger holds ids, hashes and decisions, never content.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from joserfc.jwk import OKPKey
from sqlalchemy.engine import Connection

from exchange import envelope
from exchange.agreement import Agreement, Party, load_agreement
from exchange.agreement_history import Terms
from exchange.canonical import sha256_hex
from exchange.catalogue import NON_PERSONAL_CATEGORIES
from exchange.config import NodeSettings
from exchange.content import ContentStore, RewrapFailed, destroy_after
from exchange.crypto import constant_time_equal
from exchange.db import repo, rows
from exchange.db.agreement_book import AgreementBook
from exchange.db.client_directory import UNREAD, ClientDirectory, Unread
from exchange.db.committer import GroupCommitter
from exchange.db.engine import Database, defer_inserts, is_conflict, is_unavailable
from exchange.errors import (
    DatabaseUnavailable,
    EnvelopeError,
    FieldError,
    InvalidInput,
    NotFound,
    PartnerKeysUnavailable,
    TransactionConflict,
    TransportError,
)
from exchange.keys.announcement import AnnouncementRejected, KeySetReceipt, sign_receipt, verify_receipt
from exchange.keys.kek import KekStore
from exchange.keys.registry import KeyRegistry, PartnerKeys
from exchange.keys.store import NodeKeys, load_node_keys
from exchange.ledger import EntryDraft
from exchange.ledger.checkpoint import (
    Checkpoint,
    CheckpointError,
    signed_by_unknown_key,
    verify_checkpoint_any,
)
from exchange.ledger.events import LedgerEvent
from exchange.lifecycle import Lifecycle
from exchange.messages import (
    MalformedMessage,
    Message,
    MessageSubmission,
    Origin,
    draft_from_submission,
    parse_signed,
    with_payload,
)
from exchange.observability import logs, metrics
from exchange.policy import (
    Actor,
    Decision,
    Marking,
    ReplyContext,
    decide,
    national_equivalent,
    redacted_payload,
)
from exchange.policy.redaction import pointer
from exchange.release import InboxPage, Releases
from exchange.retention import DeadlineService, RetentionService
from exchange.types import KeyId, MessageId, PartyId

log = logging.getLogger("exchange.node")


def iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).isoformat(timespec="microseconds")


T = TypeVar("T")

#: how many partner checkpoint notes a node keeps verified (each is a few hundred bytes)
NOTES_KEPT = 64


@dataclass(frozen=True)
class PeerResult:
    """The answer to one envelope: a receipt, or an opaque rejection."""

    accepted: bool
    receipt: str | None = None


@dataclass(frozen=True)
class Admitted:
    """A verified envelope and the typed message it carries."""

    opened: envelope.OpenedEnvelope
    message: Message
    terms: Terms  # the agreement version it was sent under, in force when it was signed


class Node(Releases):
    """One node: settings, agreement, keys and database, loaded and checked once."""

    def __init__(self, settings: NodeSettings, db: Database | None = None) -> None:
        self.settings = settings
        self.party: PartyId = settings.party
        first = load_agreement(settings.agreement_file)  # the node's first version
        self.content = ContentStore(KekStore(settings.key_dir / "kek", settings.passphrase()))
        self.partner_party: PartyId = first.partner_of(self.party)
        self.db = db or Database(settings.database_url, pool_size=settings.database_pool_size)
        #: every agreement version held; parties never change between versions (agreement_history)
        self.agreements = AgreementBook(self.db, first, settings.agreement_refresh_seconds)
        self.registry = KeyRegistry(
            self.db, first, self.party, self.partner_party, settings.key_refresh_seconds
        )
        self._keys_lock = threading.Lock()
        self._latest_note: tuple[float, str | None] = (-math.inf, None)  # (read at, checkpoint)
        self._verified_notes: dict[tuple[str, str, tuple[str, ...]], Checkpoint | str] = {}
        self._notes_lock = threading.Lock()
        self._keys: NodeKeys | None = None
        try:
            self.db.check_migrated()
            self.agreements.history()  # refuse to start on installed versions that do not follow
            _ = self.keys  # refuse to start without the private keys of the node's key set in force
        except BaseException:
            if db is None:
                self.db.dispose()  # ours: its connections closed with the refusal
            raise
        #: fetches the partner's key-set announcements after a version (set by the app)
        self.fetch_partner_key_sets: Callable[[int], list[str]] | None = None
        self.committer = GroupCommitter(self.db)
        #: the registered local systems. On PostgreSQL read at most client_cache_seconds before use
        #: and forgotten at once on a change (the app subscribes ``forget`` to the clients channel);
        #: on SQLite read on every request: nothing tells this process of the CLI's changes
        self.clients = ClientDirectory(
            self.db, settings.client_cache_seconds if self.db.dialect == "postgresql" else 0.0
        )
        self.wake_delivery: Callable[[], None] = lambda: None  # set by the app to its delivery loop
        self.lifecycle = Lifecycle(self)
        self.retention = RetentionService(self.db, self.content, self.party)
        self.deadlines = DeadlineService(self.db, lambda: self.agreement, self.committer, self.party)
        self._seal_legacy()
        self.lifecycle.seal_legacy_rows()

    @property
    def terms(self) -> Terms:
        """The agreement version in force now, with its catalogue (see :class:`AgreementBook`)."""
        return self.agreements.in_force()

    @property
    def agreement(self) -> Agreement:
        """The agreement version in force now. A use case that reads it more than once takes
        :attr:`terms` once instead, so that a switch cannot fall in its middle."""
        return self.agreements.in_force().agreement

    def terms_of(self, version: str) -> Terms:
        held = self.agreements.history()
        found = held.held(version)
        if found is None:  # installed since this process last read the versions?
            held = self.agreements.refresh()
            found = held.held(version)
        return found or held.newest  # no longer held (the file replaced): the widest vocabulary

    @property
    def parties(self) -> dict[PartyId, Party]:
        """Both parties (their nodes, CAs and first keys): the same in every agreement version, so
        read without the database (on the event loop too)."""
        return self.agreements.first.parties

    @property
    def keys(self) -> NodeKeys:
        """The private keys the node's own key set in force makes active (reloaded when a new
        version is published, by this process or another).

        Raises:
            KeyManagementError: the key directory does not hold a key the set makes active.
        """
        own = self.registry.history(self.party)
        keys = self._keys
        if keys is None or keys.version != own.version:
            with self._keys_lock:
                keys = self._keys
                if keys is None or keys.version != own.version:
                    keys = load_node_keys(self.settings.key_dir, self.settings.passphrase(), own.current)
                    self._keys = keys
        return keys

    @property
    def partner(self) -> PartnerKeys:
        """The partner's public keys as its key set in force has them."""
        return self.registry.partner_keys()

    def learn_partner_keys(self, now: dt.datetime) -> bool:
        """Learn the partner's newer key sets: first those another process of this node stored
        less than ``key_refresh_seconds`` ago, else those fetched from the partner, at most once
        per ``key_fetch_interval_seconds`` (a key id this node does not know may be a key
        announced while it was away). True if a newer version is now trusted.

        Raises:
            PartnerKeysUnavailable: the fetch failed, or the rate allows none now and the last one
                failed or is still in flight: a key not looked up is neither the partner's nor
                refused yet. A failed fetch may be tried again at once, once per interval.
        """
        cached = self.registry.history(self.partner_party).version
        self.registry.refresh()
        known = self.registry.history(self.partner_party).version
        if known > cached:
            return True
        fetch = self.fetch_partner_key_sets
        if fetch is None:
            return False
        if not self.registry.may_fetch(self.settings.key_fetch_interval_seconds):
            if not self.registry.looked_up_lately:
                raise PartnerKeysUnavailable(
                    f"the key sets of {self.partner_party} could not be fetched lately: try again later"
                )
            return False
        try:
            announcements = fetch(known)
        except TransportError as exc:
            self.registry.fetch_failed()  # the next unknown key id may look again at once (once)
            raise PartnerKeysUnavailable(
                f"could not fetch the key sets of {self.partner_party}: {exc}"
            ) from exc
        self.registry.fetch_succeeded()
        if not announcements:
            return False
        try:
            learnt = self.registry.accept_partner(
                announcements, now, max_per_day=self.settings.key_versions_per_day
            )
        except AnnouncementRejected:
            return False  # logged and ledgered by the registry
        return learnt.version > known

    def verify_by_partner(
        self,
        verify: Callable[[PartnerKeys], T],
        unknown_key: Callable[[Exception], bool],
        now: dt.datetime,
    ) -> T:
        """``verify(the partner's keys)``; if it fails for a key this node does not know yet
        (``unknown_key(error)``), learn the partner's newer key sets once (:meth:`learn_partner_keys`)
        and verify again with them. Raises what ``verify`` raises, or PartnerKeysUnavailable for
        a fetch that failed (a key we could not look up is no evidence of forgery)."""
        try:
            return verify(self.partner)
        except Exception as exc:
            if not unknown_key(exc) or not self.learn_partner_keys(now):
                raise
        return verify(self.partner)

    def accept_key_sets(self, announcements: Sequence[str], now: dt.datetime) -> str:
        """Take the partner's key-set announcements (each version on top of the last trusted) and
        answer with our signed receipt of the version now trusted.

        Raises:
            AnnouncementRejected: a version refused (ledgered; nothing after it is taken).
        """
        history = self.registry.accept_partner(
            announcements, now, max_per_day=self.settings.key_versions_per_day
        )
        keys, signed_at = self.keys_at(now)
        receipt = KeySetReceipt(
            party=self.party,
            of=self.partner_party,
            version=history.version,
            digest=history.digest,
            accepted_at=signed_at,
        )
        return sign_receipt(receipt, keys.signing)

    def keys_at(self, now: dt.datetime) -> tuple[NodeKeys, dt.datetime]:
        """Our keys in force, and the time to date what their signing key signs: ``now``, or the
        moment that key came into force if that is later (it was activated, by this process or
        another, while the request that took ``now`` was handled). A message or receipt dated
        before its key came into force would be refused by the partner (``key-not-in-force``)."""
        keys = self.keys
        start = self.registry.history(self.party).in_force_from(keys.signing_kid)
        return keys, (now if start is None or start <= now else start)

    def announce_keys(self, announce: Callable[[list[str]], str], now: dt.datetime) -> int | None:
        """Send the partner every version of our key set it has not acknowledged, verify its signed
        receipt and keep it. Returns the version acknowledged, None if there was nothing to send.

        Raises:
            TransportError: the partner could not be reached (PartnerRefused: it refused them;
                PartnerKeysUnavailable: its receipt names a key we could not look up).
            AnnouncementRejected: its receipt is not valid for what was sent (a security incident,
                ledgered as ``keys.rejected`` of our own party).
        """
        pending = self.registry.unacknowledged()
        if not pending:
            return None
        compact = announce([a for _, a in pending])
        try:
            receipt = self._receipt_of_key_sets(compact, pending, now)
        except AnnouncementRejected as exc:  # a forged or mismatched receipt: tampering, or a bug
            logs.security_incident(
                log,
                "key-receipt",
                "the receipt of our key set by %s is refused: %s",
                self.partner_party,
                exc,
            )
            self.ledger(now, self.registry.refused_receipt([v for v, _ in pending], compact, exc.reason))
            raise
        self.registry.acknowledge([v for v, _ in pending if v <= receipt.version], compact, now)
        log.info("key set version %d acknowledged by %s", receipt.version, self.partner_party)
        return receipt.version

    def _receipt_of_key_sets(
        self, compact: str, pending: Sequence[tuple[int, str]], now: dt.datetime
    ) -> KeySetReceipt:
        """The partner's receipt of our ``pending`` announcements, verified: signed by a key of the
        partner in force when it says it signed, acknowledging one of them by version and digest.

        Raises:
            AnnouncementRejected: ``bad-signature``, ``unknown-key`` (after fetching the partner's
                newer key sets once), or ``bad-receipt``.
            PartnerKeysUnavailable: the receipt names a key we do not know and the partner's key
                sets could not be fetched (a condition to retry, not an incident).
        """
        used: list[PartnerKeys] = []  # the partner's keys the receipt verified with

        def verify(partner: PartnerKeys) -> tuple[KeySetReceipt, str]:
            used.append(partner)
            return verify_receipt(compact, partner.verification)

        receipt, kid = self.verify_by_partner(
            verify,
            lambda exc: isinstance(exc, AnnouncementRejected) and exc.reason == "unknown-key",
            now,
        )
        partner = used[-1]
        newest = self.registry.history(self.party)
        sent = {v: sha256_hex(a) for v, a in pending}
        skew = self.settings.clock_skew
        earliest = self.registry.recorded_at(self.party, pending[0][0]) - skew
        if (
            receipt.party != self.partner_party
            or receipt.of != self.party
            or sent.get(receipt.version) != receipt.digest
            or not earliest <= receipt.accepted_at <= now + skew  # judged at its own time: bound it
            or partner.history.in_force(kid, receipt.accepted_at) is None
            or self.settings.waited_out(partner.history.ended(kid), now)  # backdated
        ):
            raise AnnouncementRejected(
                "bad-receipt", f"the receipt does not acknowledge version {newest.version}"
            )
        return receipt

    def check_partner_signature(self, kid: str, signed_at: dt.datetime, now: dt.datetime) -> None:
        """Raise EnvelopeError ``key-not-in-force`` unless the partner's key ``kid`` was trusted
        for a signature made at ``signed_at``: listed and not ``next`` in the key set in force then,
        not revoked before it (the partner's newer key sets are fetched once before refusing).
        Raise ``key-superseded`` if the partner ended the key (its end of validity or revocation)
        longer ago than a message signed before that end may wait: ``signed_at`` is the signer's
        word, and a stolen key could otherwise backdate into the whole replay window.
        Raises PartnerKeysUnavailable if that fetch failed: not looked up is not refused."""
        if self.partner.history.in_force(kid, signed_at) is None:
            learnt = self.learn_partner_keys(now)
            if not learnt or self.partner.history.in_force(kid, signed_at) is None:
                raise EnvelopeError("key-not-in-force", f"{kid} was not trusted at {signed_at.isoformat()}")
        ended = self.partner.history.ended(kid)
        if self.settings.waited_out(ended, now):
            raise EnvelopeError(
                "key-superseded", f"{kid} stopped signing at {iso(ended)}, longer ago than a message waits"
            )

    def _seal_legacy(self) -> None:
        """Bring messages stored before content at rest (migration 0007) under it: a received one's
        kept transport envelope is opened with this node's keys and its signed JWS sealed at rest; a
        sent one's content was only ever sealed for the partner and cannot be recovered here. Both
        get their destroy date, so retention applies. Idempotent; runs under the ledger lock."""
        with self.db.read() as conn:
            if not repo.legacy_rows(conn, limit=1):
                return
        with self.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            drafts: list[EntryDraft] = []
            for row in repo.legacy_rows(conn, limit=100_000):
                created = dt.datetime.fromisoformat(row["created_at"])
                row["destroy_after"] = destroy_after(self.agreement, row["type"], created)
                values: dict[str, Any] = {"destroy_after": row["destroy_after"]}
                if row["direction"] == "in" and row["envelope"]:
                    opened = envelope.open_stored(
                        row["envelope"],
                        decryption_keys=self.keys.decryption,
                        verification_keys=self.partner.verification,
                    )
                    values.update(
                        self.content.seal(row, opened.signed), envelope=None, signer_kid=opened.signer_kid
                    )
                repo.update_message(conn, row["id"], **values)
                drafts.append(
                    EntryDraft(
                        event=LedgerEvent.SEALED_AT_REST,
                        message_id=row["id"],
                        case_ref=row["case_ref"],
                        actor=self.party,
                        data={"content": "sealed" if "content" in values else "not kept here"},
                    )
                )
            repo.append_ledger(conn, head, drafts, iso(dt.datetime.now(dt.UTC)))
        log.info("%d message(s) stored before content at rest brought under it", len(drafts))

    def close(self) -> None:
        """Commit what is pending and release the database."""
        self.committer.close()
        self.db.dispose()

    # --- identity --------------------------------------------------------------------------------

    def actor_for(self, fingerprint: str) -> Actor | None:
        """The registered local system holding the certificate with this fingerprint, if any.

        Raises:
            DatabaseUnavailable: the registration had to be read and the database is unreachable.
        """
        row = self.clients.lookup(fingerprint, dt.datetime.now(dt.UTC))
        return rows.actor_from_row(self.agreement, self.party, row) if row else None

    def held_actor_for(self, fingerprint: str) -> Actor | Unread | None:
        """:meth:`actor_for` without reading the database: ``UNREAD`` when it would have to."""
        row = self.clients.held(fingerprint, dt.datetime.now(dt.UTC))
        if row is UNREAD:
            return UNREAD
        held = self.agreements.in_force(read=False).agreement  # on the event loop: no database read
        return rows.actor_from_row(held, self.party, row) if row else None

    # --- outbound --------------------------------------------------------------------------------

    def submit(
        self,
        actor: Actor,
        submission: MessageSubmission,
        now: dt.datetime,
        on_write: Callable[[Connection, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Accept a local system's message: parse, decide, apply the floors, seal and queue it in one
        transaction.

        ``on_write(conn, answer)`` runs inside that transaction with the answer this returns (an
        idempotency key is stored with its message and answer); if it raises, nothing is written.

        Raises:
            InvalidInput: naming every invalid field (payload, vocabulary, marking, times).
            MessageTooLarge: the sealed envelope would exceed the agreement's limit.
            PolicyRefusal: naming every rule that refused and what would satisfy it (ledgered).
        """
        keys, now = self.keys_at(now)  # one key set version for the message, in force at its time
        terms = self.agreements.in_force(now)  # one version for the whole message
        agreement = terms.agreement
        replied: dict[str, Any] | None = None
        thread: list[dict[str, Any]] = []
        if submission.in_reply_to or submission.thread_id:
            with self.db.read() as conn:  # the message answered, or the thread it continues
                replied = repo.get_message(conn, submission.in_reply_to) if submission.in_reply_to else None
                if submission.thread_id and not submission.in_reply_to:
                    thread = repo.messages_in_thread(conn, submission.thread_id)
        draft = draft_from_submission(
            submission,
            agreement=agreement,
            catalogue=terms.catalogue,
            sender=self.party,
            origin=Origin(agency=actor.agency, unit=actor.unit),
            now=now,
            checkpoint=self._checkpoint_note(),
        )
        unattributed = [
            pointer(v.path)
            for v in draft.protected
            if v.category not in NON_PERSONAL_CATEGORIES and v.subject not in draft.roles
        ]
        if unattributed:  # a misspelt subject would hide whose data it is: the sender must say
            raise InvalidInput(
                "personal data that belongs to no listed data subject",
                [
                    FieldError(p, "name a pseudonym listed in data_subjects in this object's subject")
                    for p in unattributed
                ],
            )
        if replied is not None and submission.thread_id is None:
            draft = replace(draft, thread_id=replied["thread_id"])
        decision = decide(
            "submit",
            agreement=agreement,
            message=draft,
            actor=actor,
            reply=self._reply_context(actor, draft, replied, thread, now),
            now=now,
        )
        metrics.decided("submit", decision)
        if not decision.allowed:
            self.ledger(
                now,
                EntryDraft(
                    event=LedgerEvent.SUBMISSION_REFUSED,
                    actor=actor.client_id,
                    decision="deny",
                    rules=decision.evaluated,
                    case_ref=draft.case_ref,
                    data={"type": draft.type, **decision.ledger_data()},
                ),
            )
            raise decision.refusal()
        message = self._protected(terms, draft, decision)
        signed_json = message.signed_json()
        signed = envelope.sign(signed_json, signing_key=keys.signing)
        sealed = envelope.seal_signed(signed, signed_json, recipient_key=self.partner.encryption)
        envelope.check_envelope_size(sealed, agreement.max_envelope_bytes)
        digest = envelope.envelope_digest(sealed)
        assert message.marking is not None
        stored = rows.message_row(
            message,
            direction="out",
            decision=decision,
            local_level=message.marking.level,
            status="queued",
            envelope=sealed,
            envelope_sha256=digest,
            submitted_by=actor.client_id,
            now=iso(now),
        )
        stored.update(
            destroy_after=destroy_after(agreement, message.type, now),
            signer_kid=keys.signing_kid,
        )

        partner_scheme = agreement.parties[self.partner_party].scheme
        answer: dict[str, Any] = {
            "id": message.id,
            "status": "queued",
            "thread_id": message.thread_id,
            "classification": {
                "scheme": message.marking.scheme,
                "level": message.marking.level,
                "common": message.marking.common,
                "partner_equivalent": {
                    "scheme": partner_scheme,
                    "level": national_equivalent(agreement, message.marking.common, partner_scheme),
                },
            },
            "tlp": message.tlp,
            "handling_codes": list(message.handling_codes),
            "raised": [
                {
                    "rule": c.rule_id,
                    "version": c.rule,
                    "kind": c.kind,
                    "from": c.before,
                    "to": c.after,
                    "reason": c.reason,
                }
                for c in decision.changes
            ],
            "replaced": [{"path": r.pointer, "rule": r.rule} for r in decision.redactions],
            "envelope_sha256": digest,
        }

        def write(conn: Connection, head: repo.LedgerHead) -> repo.LedgerHead:
            # the live KEK, judged under the ledger head: a destruction moves the head, so a unit
            # that sealed under a KEK retired meanwhile is not committed, and runs again
            stored.update(self.content.seal(stored, signed, conn))
            repo.insert_message(conn, stored)
            repo.enqueue(conn, message.id, now.timestamp())
            if on_write is not None:
                on_write(conn, answer)
            return repo.append_ledger(
                conn,
                head,
                [
                    EntryDraft(
                        event=LedgerEvent.SUBMITTED,
                        message_id=message.id,
                        actor=actor.client_id,
                        decision=decision.decision,
                        rules=decision.evaluated,
                        case_ref=message.case_ref,
                        data={
                            "type": message.type,
                            "envelope_sha256": digest,
                            "signer_kid": keys.signing_kid,
                            "signed_at": iso(message.created_at),
                            **decision.ledger_data(),
                        },
                    )
                ],
                iso(now),
            )

        self.committer.run(write, appends_only=True)
        return answer

    def _protected(self, terms: Terms, draft: Message, decision: Decision) -> Message:
        """The draft as it is sealed: the decided level (in our scheme, mapped up), TLP, handling
        codes, and the replacements (an informant's identity by the handler reference)."""
        assert draft.marking is not None
        assert decision.level is not None
        agreement = terms.agreement
        own = agreement.parties[self.party].scheme
        level = national_equivalent(agreement, decision.level, own)
        marking = Marking(own, level, agreement.schemes[own].levels[level])
        return with_payload(
            draft,
            redacted_payload(draft, decision),
            catalogue=terms.catalogue,
            child_age=agreement.child_age,
            marking=marking,
            tlp=decision.tlp,
            handling_codes=decision.handling_codes,
        )

    def _reply_context(
        self,
        actor: Actor,
        draft: Message,
        replied: dict[str, Any] | None,
        thread: list[dict[str, Any]],
        now: dt.datetime,
    ) -> ReplyContext:
        if replied is None:
            return ReplyContext(thread_visible=any(self.may_see(actor, row, now) for row in thread))
        visible = self.may_see(actor, replied, now)
        same_thread = draft.thread_id == replied["thread_id"]
        return ReplyContext(
            exists=True,
            received=replied["direction"] == "in",
            visible=visible,
            same_case=draft.case_ref == replied["case_ref"],
            same_thread=same_thread,
            type=replied["type"],
            thread_visible=visible and same_thread,
        )

    # --- inbound ---------------------------------------------------------------------------------

    def receive(self, envelopes: Sequence[str], now: dt.datetime) -> list[PeerResult]:
        """Verify, de-duplicate, store and receipt a batch of envelopes from the partner node.

        An admitted message's inbox position is 1 + the ledger sequence of its ``envelope.received``
        entry: assigned under the ledger lock (or after a head assumed, which the commit checks),
        so positions grow in commit order.

        Crypto runs before the ledger lock is taken; the batch's state changes and ledger entries
        commit in one transaction: each table's rows in one statement when no envelope of the batch
        reads what another writes (no id twice, no control message), after the head this process
        last committed without locking it first where one is known (PostgreSQL, ADR 4; again
        holding the lock if the head moved), else, and whenever that fails, with one savepoint
        per envelope so that one's failure rejects it alone. A
        redelivered envelope gets its original receipt and stores nothing twice. A rejection tells
        the peer nothing but "rejected"; the reason goes to the log and the ledger.
        """
        opened: list[Admitted | EnvelopeError] = []
        # an envelope under a signing key not known here whose key sets cannot be fetched raises
        # PartnerKeysUnavailable for the whole batch (502): nothing stored, the partner sends again
        for compact in envelopes:
            try:
                opened.append(self._open(compact, now))
            except EnvelopeError as exc:
                log.warning("rejected envelope %s: %s", envelope.envelope_digest(compact)[:16], exc)
                opened.append(exc)
        admitted = [i for i in opened if isinstance(i, Admitted)]
        plain = len({i.message.id for i in admitted}) == len(admitted) and not any(
            i.terms.agreement.message_types[i.message.type].kind == "control" for i in admitted
        )
        stored: tuple[list[PeerResult], list[Callable[[], None]]] | None = None
        unlocked = self.committer.unlocked
        # no envelope reads back what another of the batch writes: no savepoints, after the head this
        # process last committed (locked only at commit, ADR 4) or, if it moved, holding the lock
        attempts: list[repo.LedgerHead | None] = []
        if plain:
            known = unlocked.head()
            attempts = [known, None] if known is not None else [None]
        for assumed in attempts:
            try:
                stored = self._store(envelopes, opened, now, careful=False, assumed=assumed)
            except (DatabaseUnavailable, TransactionConflict):  # nothing written: 503; sent again
                raise
            except Exception as exc:
                if assumed is not None:
                    unlocked.failed(f"a received batch of {len(envelopes)} envelope(s)", exc, assumed)
                    if repo.head_moved(exc):
                        continue
                log.warning(  # an envelope failed: again, each in its own savepoint
                    "a received batch of %d envelopes is stored again one savepoint per envelope",
                    len(envelopes),
                    exc_info=True,
                )
                break
            if assumed is not None:
                unlocked.committed()
            break
        if stored is None:
            try:
                stored = self._store(envelopes, opened, now, careful=True)
            except RewrapFailed:  # (a content of the period that does not open): each destruction
                log.warning(  # re-wraps in its envelope's savepoint, and fails alone
                    "a received batch of %d envelopes is stored again, each destruction on its own",
                    len(envelopes),
                    exc_info=True,
                )
                stored = self._store(envelopes, opened, now, careful=True, batched=False)
        results, after = stored
        for item in opened:  # counted once the batch committed (a batch sent again is not counted twice)
            if isinstance(item, EnvelopeError):
                metrics.envelope_rejected(item.reason)
        for act in after:  # once, for what was committed: logs, counts, KEKs, answers to send
            act()
        return results

    def _store(
        self,
        envelopes: Sequence[str],
        opened: Sequence[Admitted | EnvelopeError],
        now: dt.datetime,
        *,
        careful: bool,
        assumed: repo.LedgerHead | None = None,
        batched: bool = True,
    ) -> tuple[list[PeerResult], list[Callable[[], None]]]:
        """Admit the opened envelopes of a batch and ledger them, in one transaction; returns the
        results and what to do once it committed (see :meth:`_admit`).

        ``careful``: each envelope in its own savepoint, so that one's failure rejects it alone, and
        each row written at once (an envelope may read what an earlier one of the batch wrote).
        Otherwise no savepoint, and every row inserted just before the commit
        (:func:`exchange.db.engine.defer_inserts`): any failure raises, and nothing is written.
        ``assumed`` (not careful): append after this head without locking it first; the commit
        fails if it is no longer the stored head (``repo.assume_ledger_head``). ``batched``: the
        destructions the batch's control messages make re-wrap each period once, at its end
        (``ContentStore.batch``); otherwise each in its envelope's savepoint.
        """
        results: list[PeerResult] = []
        after: list[Callable[[], None]] = []
        drafts: list[EntryDraft] = []
        with self.db.transaction(lock_free=assumed is not None) as conn:
            if assumed is not None:
                repo.assume_ledger_head(conn, assumed)
            if not careful:
                defer_inserts(conn)
            head = repo.lock_ledger_head(conn)  # (the assumed head, if one is)
            # one query for the batch's ids already stored; an id seen earlier in this batch is
            # looked up again (its earlier envelope may just have stored it)
            stored = repo.get_messages(conn, [i.message.id for i in opened if isinstance(i, Admitted)])
            seen: set[str] = set()
            judged: dict[Any, Any] = {}  # the checkpoints the batch carries, judged once each
            unopened: dict[str, list[str]] = {}  # the digests of those that did not open, by reason
            with self.content.batch(conn) if batched else nullcontext():  # (each period re-wrapped once)
                for compact, item in zip(envelopes, opened, strict=True):
                    if isinstance(item, EnvelopeError):
                        unopened.setdefault(item.reason, []).append(envelope.envelope_digest(compact))
                        results.append(PeerResult(False))
                        continue
                    then: list[Callable[[], None]] = []  # kept only if this envelope's savepoint commits
                    mid = item.message.id
                    prefetched = (mid not in seen, stored.get(mid))
                    seen.add(mid)
                    inbox_seq = head.size + len(drafts) + 1
                    if not careful:
                        result, new = self._admit(conn, item, now, inbox_seq, prefetched, judged, then)
                    else:
                        try:
                            with conn.begin_nested():  # one envelope's failure rejects that envelope alone
                                result, new = self._admit(
                                    conn, item, now, inbox_seq, prefetched, judged, then
                                )
                        except Exception as exc:
                            if is_conflict(exc) or is_unavailable(exc):  # not the envelope's fault: the
                                raise  # batch fails (503) and the partner sends it again
                            log.exception("envelope for message %s could not be admitted", mid)
                            result, new = (
                                PeerResult(False),
                                [self._rejection(item.opened.digest, "internal", mid)],
                            )
                            then = []
                    after.extend(then)
                    drafts.extend(new)
                    results.append(result)
            drafts.extend(self._unopened(unopened))
            repo.append_ledger(conn, head, drafts, iso(now))
        return results, after

    def _unopened(self, unopened: dict[str, list[str]]) -> list[EntryDraft]:
        """The ledger entries of a batch's envelopes that did not open or verify (nothing ties them
        to the partner): one per reason, naming the first envelope's digest, and how many there were
        with the digest of all their digests. Junk sent by the thousand cannot grow the ledger (kept
        for good) by an entry each; each envelope is still logged and answered "rejected"."""
        drafts = []
        for reason, digests in unopened.items():
            draft = self._rejection(digests[0], reason, None)
            if len(digests) > 1:
                data = {
                    **draft.data,
                    "envelopes": len(digests),
                    "envelopes_sha256": sha256_hex("\n".join(digests)),
                }
                draft = replace(draft, data=data)
            drafts.append(draft)
        return drafts

    def _open(self, compact: str, now: dt.datetime) -> Admitted:
        """Open, verify and parse one envelope; the partner's newer key sets are fetched (at most
        once per interval) when its signing key, or the key of the checkpoint it carries, is not
        known here.

        Raises:
            EnvelopeError: ``malformed`` for a signed message that is not a valid message of the
                agreement, or why it could not be opened or verified.
            PartnerKeysUnavailable: those key sets had to be fetched and could not be.
        """

        held = self.agreements.history()  # one view of the versions for the whole envelope

        def open_it() -> envelope.OpenedEnvelope:
            return envelope.open_envelope(
                compact,
                decryption_keys=self.keys.decryption,
                verification_keys=self.partner.verification,
                expected_sender=self.partner_party,
                expected_recipient=self.party,
                accepted_agreements=held.accepted,
                now=now,
                clock_skew=self.settings.clock_skew,
                replay_window=self.settings.replay_window,
                max_envelope_bytes=held.newest.agreement.max_envelope_bytes,  # the same in every version
            )

        try:
            opened = open_it()
        except EnvelopeError as exc:
            if exc.reason == "unknown-agreement":  # (its signature verified: only the partner gets here)
                before, held = held, self.agreements.refresh()
                if held is before:
                    raise  # not installed here since: the partner sends under a version we do not hold
            elif not self._learnt_keys_for(exc, now):
                raise
            opened = open_it()  # a key or an agreement version this process had not read yet
        version = str(opened.message["agreement"]["version"])
        terms = held.held(version)
        assert terms is not None  # open_envelope admits only a version held, with its digest
        try:
            message = parse_signed(opened.message, agreement=terms.agreement, catalogue=terms.catalogue)
        except MalformedMessage as exc:
            raise EnvelopeError("malformed", str(exc)) from exc
        if not held.was_in_force(version, message.created_at, self.settings.clock_skew):
            raise EnvelopeError(
                "agreement-not-in-force",
                f"version {version!r} was not in force at {iso(message.created_at)}, when it was signed",
            )
        superseded = held.superseded_at(version)  # a signing time backdated past the switch:
        if self.settings.waited_out(superseded, now):
            raise EnvelopeError(
                "agreement-superseded",
                f"version {version!r} was superseded at {iso(superseded)}, longer ago than a message waits",
            )
        self.check_partner_signature(opened.signer_kid, message.created_at, now)
        if message.checkpoint is not None and signed_by_unknown_key(
            str(message.checkpoint),
            origin=self.partner.ledger_origin,
            keys=self.partner.checkpoint_keys(message.created_at),
        ):  # a checkpoint key published since: looked up here, before the ledger lock is taken
            self.learn_partner_keys(now)
        self.registry.note_encryption_key_used(opened.recipient_kid, now)
        return Admitted(opened, message, terms)

    def _checkpoint_note(self) -> str | None:
        """Our latest signed checkpoint, which every message carries (the partner judges it: a
        rollback or a split view is an incident). Read at most once per
        ``checkpoint_note_cache_seconds``, and never older than half the clock skew the partner
        allows, so a message never carries a checkpoint older than one the partner had witnessed
        before the message was sealed."""
        ttl = min(self.settings.checkpoint_note_cache_seconds, self.settings.clock_skew_seconds / 2)
        read_at, note = self._latest_note
        if time.monotonic() - read_at < ttl:
            return note
        with self.db.read() as conn:
            latest = repo.latest_checkpoint(conn)
        note = str(latest["note"]) if latest else None
        self._latest_note = (time.monotonic(), note)
        return note

    def _learnt_keys_for(self, error: EnvelopeError, now: dt.datetime) -> bool:
        """Whether a key set newer than the one that could not open an envelope is now known: the
        partner's, fetched from it, for a signing key it announced while we were away; our own,
        read again, for an encryption key another process (or an emergency revocation) made
        active less than ``key_refresh_seconds`` ago.

        Raises:
            PartnerKeysUnavailable: the partner's key sets had to be fetched and could not be.
        """
        if error.reason == "unknown-signing-key":  # a failed fetch raises: judged neither way yet
            return self.learn_partner_keys(now)
        if error.reason == "unknown-recipient-key":
            before = self.keys.version
            self.registry.refresh()
            return self.keys.version != before
        return False

    def _rejection(
        self, digest: str, reason: str, message_id: str | None, rules: tuple[str, ...] = ()
    ) -> EntryDraft:
        return EntryDraft(
            event=LedgerEvent.REJECTED,
            message_id=message_id,
            actor=self.partner_party,
            decision="deny",
            rules=rules,
            data={"envelope_sha256": digest, "reason": reason},
        )

    def _admit(
        self,
        conn: Any,
        admitted: Admitted,
        now: dt.datetime,
        inbox_seq: int,
        prefetched: tuple[bool, dict[str, Any] | None],
        judged: dict[Any, Any],
        after: list[Callable[[], None]],
    ) -> tuple[PeerResult, list[EntryDraft]]:
        """Admit one verified envelope inside the batch's transaction. What is to happen once the
        transaction committed goes to ``after``: what to log and count, the KEKs a control
        message retires to destroy, and waking the delivery loop for an answer it queued (an
        attempt undone does and says nothing). ``prefetched`` is
        (True, the stored row or None) when the caller already looked the id up in this
        transaction; ``judged`` is the batch's memo of checkpoint judgements (and of the messages
        whose redelivery is ledgered already)."""
        opened, message, agreement = admitted.opened, admitted.message, admitted.terms.agreement
        mid = message.id
        looked_up, existing = prefetched
        if not looked_up:
            existing = repo.get_message(conn, mid)
        if existing is not None:
            if existing["direction"] == "in" and existing["envelope_sha256"] == opened.digest:
                # ledgered once per message (in this batch, or before): a partner replaying one
                # envelope a thousand times cannot grow the ledger, which is kept for good
                seen = ("redelivered", mid)
                if seen not in judged:
                    judged[seen] = bool(
                        repo.latest_entries_of(conn, (LedgerEvent.REDELIVERED,), self.partner_party, [mid])
                    )
                first, judged[seen] = not judged[seen], True
                redelivered = EntryDraft(
                    event=LedgerEvent.REDELIVERED,
                    message_id=mid,
                    actor=self.partner_party,
                    decision="allow",
                    data={"envelope_sha256": opened.digest},
                )
                return PeerResult(True, existing["receipt"]), [redelivered] if first else []
            after.append(
                partial(log.warning, "rejected envelope for message %s: id reused with other content", mid)
            )
            return PeerResult(False), [self._rejection(opened.digest, "duplicate-id", mid)]
        decision = decide("receive", agreement=agreement, message=message, now=now)
        after.append(partial(metrics.decided, "receive", decision))
        if not decision.allowed:
            refused = tuple(r.rule for r in decision.refusals)
            after.append(
                partial(
                    log.warning,
                    "rejected envelope for message %s by policy: %s",
                    mid,
                    ", ".join(refused),
                    extra=logs.fields(
                        logs.Event.ENVELOPE_REJECTED,
                        message_id=mid,
                        rule_ids=[r.rule_id for r in decision.refusals],
                    ),
                )
            )
            return PeerResult(False), [self._rejection(opened.digest, "policy", mid, decision.evaluated)]
        assert decision.level is not None
        keys, signed_at = self.keys_at(now)
        receipt = envelope.sign_receipt(
            message_id=mid,
            envelope_sha256=opened.digest,
            receiver=self.party,
            sender=self.partner_party,
            received_at=signed_at,
            signing_key=keys.signing,
        )
        row = rows.message_row(
            message,
            direction="in",
            decision=decision,
            local_level=rows.local_marking(agreement, self.party, decision.level),
            status="received",
            envelope=None,  # the transport JWE is not kept: its digest is, and the receipt names it
            envelope_sha256=opened.digest,
            submitted_by=None,
            now=iso(now),
        )
        answered = repo.get_message(conn, message.in_reply_to) if message.in_reply_to else None
        if answered is not None and answered["direction"] == "out" and answered["submitted_by"]:
            # a reply goes to the unit that asked, narrowed (never widened) by the partner's addressing
            asker = repo.get_client(conn, answered["submitted_by"])
            units = [asker["unit"]] if asker else []
            if message.addressed_to:
                units = [u for u in units if u in message.addressed_to]
                if not units:
                    log.warning(
                        "reply %s is addressed by the partner to units other than the one that asked:"
                        " released to none here",
                        message.id,
                    )
            row["addressed_to"] = units or ["(no such unit)"]
        row.update(
            receipt=receipt,
            receipt_at=iso(now),
            inbox_seq=inbox_seq,
            signer_kid=opened.signer_kid,
            destroy_after=destroy_after(agreement, message.type, message.created_at),
        )
        control = agreement.message_types[message.type].kind == "control"
        if control:
            row.update(kind="control", inbox_seq=None)  # handled here, never released to an inbox
        row.update(self.content.seal(row, opened.signed, conn))
        repo.insert_message(conn, row)
        data = {
            "type": message.type,
            "envelope_sha256": opened.digest,
            "signer_kid": opened.signer_kid,
            "signed_at": iso(message.created_at),
        }
        drafts = [
            EntryDraft(
                event=LedgerEvent.RECEIVED,
                message_id=mid,
                case_ref=message.case_ref,
                actor=self.partner_party,
                decision=decision.decision,
                rules=decision.evaluated,
                data={**data, **decision.ledger_data()},
            ),
            EntryDraft(
                event=LedgerEvent.RECEIPT_ISSUED,
                message_id=mid,
                case_ref=message.case_ref,
                actor=self.party,
                data={"receipt_sha256": envelope.envelope_digest(receipt)},
            ),
        ]
        unreplaced = any(r.handler for r in decision.redactions)  # an informant's identity arrived
        if decision.changes or unreplaced:  # marked below its floor, or an identity not replaced
            after.append(
                partial(
                    log.warning,
                    "POLICY INCIDENT: message %s arrived below its floor or with an identity",
                    mid,
                    extra=logs.fields(logs.Event.POLICY_INCIDENT, message_id=mid),
                )
            )
            drafts.append(
                EntryDraft(
                    event=LedgerEvent.POLICY_INCIDENT,
                    message_id=mid,
                    case_ref=message.case_ref,
                    actor=self.partner_party,
                    decision="under-classified",
                    rules=tuple(
                        dict.fromkeys(
                            [
                                *(c.rule for c in decision.changes),
                                *(r.rule for r in decision.redactions if r.handler),
                            ]
                        )
                    ),
                    data={
                        "changes": decision.ledger_data().get("changes", []),
                        "unreplaced_identities": [r.pointer for r in decision.redactions if r.handler],
                    },
                )
            )
        if control:
            effects = self.lifecycle.apply_control(conn, message, now)
            drafts.extend(effects.drafts)
            after.append(partial(self.content.retire, effects.retired_keks, self.db))
            if effects.wake:  # an answer (a destruction certificate) goes out at once
                after.append(self.wake_delivery)
        incident = self._judge_checkpoint(conn, message, judged)
        if incident is not None:
            after.append(
                partial(
                    logs.security_incident,
                    log,
                    "checkpoint",
                    "message %s carries a partner checkpoint that %s",
                    mid,
                    incident,
                    message_id=mid,
                )
            )
            drafts.append(
                EntryDraft(
                    event="checkpoint.incident",
                    message_id=mid,
                    actor=self.partner_party,
                    decision="deny",
                    data={
                        "reason": incident.split(":")[0],
                        "note_sha256": sha256_hex(str(message.checkpoint)),
                    },
                )
            )
        return PeerResult(True, receipt), drafts

    def _judge_checkpoint(self, conn: Any, message: Message, judged: dict[Any, Any]) -> str | None:
        """What is wrong with the sender's checkpoint carried in a verified message, if anything.

        A split view: a checkpoint of a size already witnessed, with another root. A rollback: a
        checkpoint smaller than one witnessed before the message was sealed (an honest sender's
        larger checkpoint is signed, and so witnessed, only after it sealed the message).

        Messages mostly carry the note of the last few seconds: each note's verification with one
        set of keys is kept by the node (it cannot change), and ``judged`` keeps, for the batch's
        transaction, what was witnessed at and above each size, read once.
        """
        note = message.checkpoint
        if note is None:
            return None
        keys = self.partner.checkpoint_keys(message.created_at)
        checkpoint = self._verified_note(str(note), keys)
        if isinstance(checkpoint, str):
            return checkpoint
        witnessed = ("size", checkpoint.size)
        if witnessed not in judged:
            judged[witnessed] = repo.witnessed_around(conn, checkpoint.size)
        same, earlier = judged[witnessed]
        if same is not None and not constant_time_equal(same, checkpoint.root):
            return f"split view: a second root for size {checkpoint.size}"
        sealed = message.created_at
        skew = self.settings.clock_skew
        if earlier is not None and dt.datetime.fromisoformat(earlier) + skew < sealed:
            return f"rollback: size {checkpoint.size} sealed after a larger one was witnessed at {earlier}"
        return None

    def _verified_note(self, note: str, keys: Sequence[OKPKey]) -> Checkpoint | str:
        """The partner's checkpoint ``note`` verified with ``keys``, or why it is invalid; the
        answer is kept for the last NOTES_KEPT notes and sets of keys (it cannot change: a key id
        names one key for ever)."""
        key = (self.partner.ledger_origin, note, tuple(str(k.kid) for k in keys))
        with self._notes_lock:
            found = self._verified_notes.get(key)
        if found is not None:
            return found
        answer: Checkpoint | str
        try:
            answer = verify_checkpoint_any(note, origin=self.partner.ledger_origin, keys=keys)
        except CheckpointError as exc:
            answer = f"invalid: {exc}"
        except Exception as exc:  # whatever a hostile note makes a parser do: an incident
            answer = f"invalid: unparsable note ({type(exc).__name__})"
        with self._notes_lock:
            self._verified_notes[key] = answer
            while len(self._verified_notes) > NOTES_KEPT:
                del self._verified_notes[next(iter(self._verified_notes))]
        return answer

    # --- ledger ----------------------------------------------------------------------------------

    def ledger(self, now: dt.datetime, *drafts: EntryDraft) -> None:
        self.committer.run(
            lambda conn, head: repo.append_ledger(conn, head, list(drafts), iso(now)), appends_only=True
        )


__all__ = ["InboxPage", "KeyId", "MessageId", "Node", "NotFound", "PeerResult"]
