"""Retention and deadlines: the node's background duties over time.

:class:`RetentionService` destroys the content of every message past its destroy date (idempotent:
run it as often as you like, from the node's loop or ``exchange retention run``), and destroys one
message early on the originator's request. The ledger keeps that each message existed, its digests,
and when and why it was destroyed.

:class:`DeadlineService` lists requests with a response due and no answer, and ledgers each one once
when it becomes overdue.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exchange.agreement import Agreement
from exchange.content import ContentStore
from exchange.db import repo
from exchange.db.committer import GroupCommitter
from exchange.db.engine import Database
from exchange.ledger import EntryDraft
from exchange.ledger.events import LedgerEvent
from exchange.types import PartyId

log = logging.getLogger("exchange.retention")

RETENTION_EXPIRED = "retention period expired"


def iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).isoformat(timespec="microseconds")


class RetentionService:
    """Destroys content whose retention has passed, or on request (see the module docstring)."""

    def __init__(self, db: Database, content: ContentStore, party: PartyId, *, batch: int = 500) -> None:
        self.db = db
        self.content = content
        self.party = party
        self.batch = batch

    def run(self, now: dt.datetime) -> int:
        """Destroy every message past its destroy date; returns how many were destroyed."""
        total = 0
        while True:
            with self.db.read() as conn:
                due = repo.due_for_destruction(conn, iso(now), self.batch)
            if not due:
                break
            total += len(self.destroy([r["id"] for r in due], RETENTION_EXPIRED, now))
            if len(due) < self.batch:
                break
        with self.db.read() as conn:
            leftovers = self.content.sweep(conn)
        self.content.retire(leftovers, self.db)
        return total

    def destroy(self, message_ids: list[str], reason: str, now: dt.datetime) -> list[dict[str, Any]]:
        """Destroy these messages' content now (each at most once); returns the rows destroyed, as
        they were before. Runs under the ledger lock; the retired KEKs are destroyed after commit."""
        at = iso(now)
        with self.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)
            rows = [
                r for mid in message_ids if (r := repo.get_message(conn, mid)) and r["destroyed_at"] is None
            ]
            drafts, retired = self.content.destroy(conn, rows, reason=reason, at=at, actor=self.party)
            repo.append_ledger(conn, head, drafts, at)
        self.content.retire(retired, self.db)
        if rows:
            log.info("destroyed the content of %d message(s): %s", len(rows), reason)
        return rows


@dataclass(frozen=True)
class OverdueRequest:
    """A request with a response due and no answer yet."""

    row: dict[str, Any]
    due: dt.datetime

    def view(self, now: dt.datetime) -> dict[str, Any]:
        return {
            "id": self.row["id"],
            "type": self.row["type"],
            "direction": self.row["direction"],
            "case_ref": self.row["case_ref"],
            "response_due": self.row["response_due"],
            "overdue": self.due <= now,
            "overdue_seconds": max(0, int((now - self.due).total_seconds())),
            "age_seconds": int((now - dt.datetime.fromisoformat(self.row["created_at"])).total_seconds()),
        }


class DeadlineService:
    """Requests awaiting an answer, and the overdue ones ledgered once."""

    def __init__(
        self, db: Database, agreement: Callable[[], Agreement], committer: GroupCommitter, party: PartyId
    ) -> None:
        self.db = db
        self.agreement = agreement  # the version in force now
        self.committer = committer
        self.party = party

    @property
    def request_types(self) -> list[str]:
        """The message types some type of the agreement in force answers."""
        return sorted({t for spec in self.agreement().message_types.values() for t in spec.replies_to})

    def open_requests(self, now: dt.datetime, *, overdue_only: bool = False) -> list[OverdueRequest]:
        with self.db.read() as conn:
            found = repo.open_requests(conn, self.request_types)
        requests = [OverdueRequest(r, dt.datetime.fromisoformat(r["response_due"])) for r in found]
        return [r for r in requests if r.due <= now] if overdue_only else requests

    def run(self, now: dt.datetime) -> int:
        """Ledger every request that became overdue since the last run; returns how many."""
        fresh = [r for r in self.open_requests(now, overdue_only=True) if r.row["overdue_at"] is None]
        if not fresh:
            return 0
        at = iso(now)

        def write(conn: Any, head: repo.LedgerHead) -> repo.LedgerHead:
            drafts = []
            for request in fresh:
                repo.update_message(conn, request.row["id"], overdue_at=at)
                drafts.append(
                    EntryDraft(
                        event=LedgerEvent.REQUEST_OVERDUE,
                        message_id=request.row["id"],
                        case_ref=request.row["case_ref"],
                        actor=self.party,
                        data={
                            "response_due": request.row["response_due"],
                            "direction": request.row["direction"],
                        },
                    )
                )
            return repo.append_ledger(conn, head, drafts, at)

        self.committer.run(write)
        log.warning("%d request(s) became overdue", len(fresh))
        return len(fresh)


class PeriodicLoop:
    """Runs ``step(now)`` every ``interval`` seconds (a :class:`exchange.loops.Loop`)."""

    def __init__(self, name: str, step: Callable[[dt.datetime], int], interval: float) -> None:
        self.name = name
        self._step = step
        self.interval = interval

    def run_once(self) -> int:
        return self._step(dt.datetime.now(dt.UTC))

    def lead(self) -> None:
        """Nothing to recover: each run starts from what the database holds."""

    def step(self) -> float:
        self.run_once()
        return self.interval
