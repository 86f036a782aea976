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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Connection

from exchange.agreement import Agreement
from exchange.canonical import sha256_hex
from exchange.db import repo
from exchange.db.engine import Database, inserts_deferred, transaction_memo
from exchange.envelope.at_rest import metadata_digest, open_at_rest, rewrap, seal_at_rest
from exchange.errors import ContentDestroyed, ContentUnavailable, KeyManagementError
from exchange.keys.kek import KekStore, period_of
from exchange.ledger import EntryDraft
from exchange.ledger.events import LedgerEvent

log = logging.getLogger("exchange.content")
_BATCHED = "content.batched"  # the periods a ContentStore.batch re-wraps at its end


def destroy_after(agreement: Agreement, message_type: str, created_at: dt.datetime) -> str:
    """When a message's content must be destroyed: its creation plus its type's retention."""
    days = agreement.message_types[message_type].retention_days
    return (created_at.astimezone(dt.UTC) + dt.timedelta(days=days)).isoformat(timespec="seconds")


class RewrapFailed(Exception):
    """The re-wrap at the end of a :meth:`ContentStore.batch` failed (a content of the period that
    does not open, a KEK that could not be written): nothing of the transaction is committed."""


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
        lock): these forget their content, and the other messages of their periods are re-wrapped
        under a new KEK (at once, or at the end of a :meth:`batch`). Returns the ledger entries and
        the KEK ids to :meth:`retire` after commit."""
        if inserts_deferred(conn):  # rows sealed in the transaction would miss the re-wrap
            raise RuntimeError("a destruction in a transaction that defers its inserts")
        doomed = {r["id"] for r in rows if r["destroyed_at"] is None}
        periods = {period_of(r["destroy_after"]) for r in rows if r["id"] in doomed and r["content_kid"]}
        old_kids = {period: self.keks.kids(period) for period in sorted(periods)}
        retired = [k for kids in old_kids.values() for k in kids]
        repo.lock_queued(conn, under=retired, message_ids=sorted(doomed))
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
        memo = transaction_memo(conn)
        batched = memo.get(_BATCHED) if memo is not None else None
        if batched is not None:
            batched.update(periods)
        else:
            for period in sorted(periods):
                self._rewrap(period, conn)
        return drafts, retired

    @contextmanager
    def batch(self, conn: Connection) -> Iterator[None]:
        """Within the block, :meth:`destroy` leaves the re-wrap of each period to the block's end:
        once per period however many destructions the block makes (a batch of return-or-destroy
        requests re-wraps a period once, not once per request). Nothing is re-wrapped if the block
        raises (the transaction does not commit). Only in :meth:`Database.transaction`."""
        memo = transaction_memo(conn)
        if memo is None:
            yield
            return
        periods: set[str] = set()
        memo[_BATCHED] = periods
        try:
            yield
        finally:
            del memo[_BATCHED]
        for period in sorted(periods):  # (a destruction rolled back with its savepoint: re-wrapped anyway)
            try:
                self._rewrap(period, conn)
            except (ContentUnavailable, KeyManagementError, OSError) as exc:
                raise RewrapFailed(
                    f"the period {period} could not be re-wrapped: {type(exc).__name__}"
                ) from exc

    def _rewrap(self, period: str, conn: Connection) -> None:
        """Re-wrap every content of ``period`` still kept under a new KEK, which becomes the live
        one (always created: so no old KEK of the period stays live)."""
        memo = transaction_memo(conn)
        if memo is not None:  # a later seal in this transaction takes the new KEK
            memo.pop(("live_kek", period), None)
        old = self.keks.kids(period)
        repo.lock_queued(conn, under=old, message_ids=[])  # (before the rows: the claim's order)
        new = self.keks.create(period)
        for row in repo.contents_under(conn, old):
            meta = metadata_digest(row)
            content = rewrap(row["content"], message_id=row["id"], meta=meta, old=self.keks.get, new=new)
            repo.update_message(conn, row["id"], content=content, content_kid=new.kid)

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
