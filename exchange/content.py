"""Messages' content at rest: sealed under a fresh data key wrapped by the retention period's KEK,
opened for releases and for the sender, destroyed so that no backup can bring it back.

Content is sealed in a transaction that appends to the ledger (submit, receive), and a
destruction changes a period's live KEK holding the ledger lock and moves the head, so no content
sealed under a KEK that a destruction retires is ever committed: its transaction held the lock, or
assumed a head that the destruction moved and is refused at commit (``repo.assume_ledger_head``).
Destroying messages re-wraps the other messages of their period under a new KEK in the
same transaction; the old KEK files are destroyed after the commit (:meth:`ContentStore.retire`),
and :meth:`ContentStore.sweep` destroys any KEK no stored content needs (after a crash in between).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection

from exchange.agreement import Agreement
from exchange.canonical import sha256_hex
from exchange.db import repo
from exchange.db.engine import Database, transaction_memo
from exchange.envelope.at_rest import metadata_digest, open_at_rest, rewrap, seal_at_rest
from exchange.errors import ContentDestroyed
from exchange.keys.kek import KekStore, period_of
from exchange.ledger import EntryDraft
from exchange.ledger.events import LedgerEvent

log = logging.getLogger("exchange.content")


def destroy_after(agreement: Agreement, message_type: str, created_at: dt.datetime) -> str:
    """When a message's content must be destroyed: its creation plus its type's retention."""
    days = agreement.message_types[message_type].retention_days
    return (created_at.astimezone(dt.UTC) + dt.timedelta(days=days)).isoformat(timespec="seconds")


class ContentStore:
    """Seal, open and destroy content at rest (see the module docstring)."""

    def __init__(self, keks: KekStore) -> None:
        self.keks = keks

    def seal(self, row: dict[str, Any], signed: str, conn: Connection | None = None) -> dict[str, Any]:
        """The content columns of ``row`` (which has its metadata and ``destroy_after``) for the
        signed JWS. Call inside a transaction holding the ledger lock, or assuming the head
        (``repo.assume_ledger_head``): a destruction moves the head, so such a transaction that
        sealed under a KEK the destruction retired is not committed. With ``conn`` (that
        transaction's), the period's live KEK is looked up once per transaction, not once per
        message: no destruction commits inside one that holds the lock, and one that assumed the
        head is refused if any did."""
        period = period_of(row["destroy_after"])
        memo = transaction_memo(conn) if conn is not None else None
        kek = memo.get(("live_kek", period)) if memo is not None else None
        if kek is None:
            kek = self.keks.live(period)
            if memo is not None:
                memo[("live_kek", period)] = kek
        content = seal_at_rest(signed, message_id=row["id"], meta=metadata_digest(row), kek=kek)
        return {"content": content, "content_kid": kek.kid, "content_sha256": sha256_hex(signed)}

    def open(self, row: dict[str, Any]) -> str:
        """The signed JWS of a stored message.

        Raises:
            ContentDestroyed: it was destroyed (when and why).
            ContentUnavailable: its KEK is gone or the content is not this message's.
        """
        if row["destroyed_at"] is not None or row["content"] is None:
            raise ContentDestroyed(row["id"], str(row["destroyed_at"]), str(row["destroyed_reason"]))
        return open_at_rest(
            row["content"], message_id=row["id"], meta=metadata_digest(row), kek=self.keks.get
        )

    def destroy(
        self, conn: Connection, rows: Sequence[dict[str, Any]], *, reason: str, at: str, actor: str
    ) -> tuple[list[EntryDraft], list[str]]:
        """Destroy the content of ``rows`` inside the caller's transaction (which holds the ledger
        lock): the other messages of their periods are re-wrapped under a new KEK, these forget
        their content. Returns the ledger entries and the KEK ids to :meth:`retire` after commit."""
        doomed = {r["id"] for r in rows if r["destroyed_at"] is None}
        periods = {period_of(r["destroy_after"]) for r in rows if r["id"] in doomed and r["content_kid"]}
        memo = transaction_memo(conn)
        if memo is not None:  # a later seal in this transaction takes the new KEK
            for period in periods:
                memo.pop(("live_kek", period), None)
        retired: list[str] = []
        old_kids = {period: self.keks.kids(period) for period in sorted(periods)}
        repo.lock_queued(
            conn, under=[k for kids in old_kids.values() for k in kids], message_ids=sorted(doomed)
        )
        for period, old in old_kids.items():
            keep = [r for r in repo.contents_under(conn, old) if r["id"] not in doomed]
            new = self.keks.create(period)  # always: so no old KEK of the period is its live one
            if keep:
                for row in keep:
                    meta = metadata_digest(row)
                    content = rewrap(
                        row["content"], message_id=row["id"], meta=meta, old=self.keks.get, new=new
                    )
                    repo.update_message(conn, row["id"], content=content, content_kid=new.kid)
            retired.extend(old)
        drafts = []
        for row in rows:
            if row["id"] not in doomed:
                continue
            repo.mark_destroyed(conn, row["id"], at=at, reason=reason)
            drafts.append(
                EntryDraft(
                    event=LedgerEvent.DESTROYED,
                    message_id=row["id"],
                    case_ref=row["case_ref"],
                    actor=actor,
                    decision="destroyed",
                    data={
                        "reason": reason,
                        "envelope_sha256": row["envelope_sha256"],
                        "content_sha256": row["content_sha256"],
                        "keys_retired": sorted(
                            k for k in retired if period_of_kid(k) == period_of(row["destroy_after"])
                        ),
                    },
                )
            )
        return drafts, retired

    def retire(self, kids: Sequence[str], db: Database) -> None:
        """Destroy KEK files after the transaction that stopped needing them committed; a KEK some
        committed content still names is kept (and logged: a bug, never a loss)."""
        if not kids:
            return
        with db.read() as conn:
            needed = repo.referenced_kids(conn)
        for kid in kids:
            if kid in needed:
                log.error("key-encryption key %s is still needed by stored content: kept", kid)
            elif self.keks.destroy(kid):
                log.info("key-encryption key %s destroyed", kid)

    def sweep(self, conn: Connection) -> list[str]:
        """The KEKs no stored content needs, except each period's live one (to :meth:`retire`)."""
        needed = repo.referenced_kids(conn)
        by_period: dict[str, list[str]] = {}
        for kid in self.keks.kids():
            by_period.setdefault(period_of_kid(kid), []).append(kid)
        return [kid for kids in by_period.values() for kid in kids[:-1] if kid not in needed]


def period_of_kid(kid: str) -> str:
    """The period of a KEK id (``kek-2031-11-3`` -> ``2031-11``)."""
    return kid[4:11]
