"""Group commit: many small write units share one transaction, one ledger lock and one fsync.

Request threads prepare their rows (all CPU work: validation, policy, sealing) and hand the
committer a unit of work, a function ``apply(conn, head) -> head`` that writes its rows and ledger
entries after the given ledger head. The committer thread takes whatever units are pending, runs
them in one transaction with no savepoint (two round trips fewer per unit), each table's rows of
the whole batch inserted in one statement just before the commit (:func:`defer_inserts`: a unit
must not read back what it inserts), commits once, then releases every caller. If a unit fails,
nothing of the batch is written and every unit of it runs again alone, in its own transaction (its
inserts, deferred the same way, still its own): the failing one's caller gets its exception, the
others commit. A unit may
therefore run twice; it must have no effect outside the transaction but what is safe to repeat
(the content store's live KEK is such).

Guarantee: :meth:`GroupCommitter.run` returns only after the unit is committed, and raises if it
was not. Appends stay serialised by the database (the head row lock / SQLite's write lock), so
several processes may each run a committer against one database.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from sqlalchemy.engine import Connection

from exchange.db import repo
from exchange.db.engine import Database, defer_inserts
from exchange.errors import DatabaseUnavailable

log = logging.getLogger("exchange.committer")

Unit = Callable[[Connection, repo.LedgerHead], repo.LedgerHead]


class GroupCommitter:
    """One background thread committing batches of units for one Database."""

    def __init__(self, db: Database, max_batch: int = 256) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: queue.Queue[tuple[Unit, Future[None]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def run(self, unit: Unit) -> None:
        """Commit ``unit``; block until it is durable. Re-raises the unit's or the commit's error."""
        self._ensure_started()
        future: Future[None] = Future()
        self._queue.put((unit, future))
        future.result()

    def close(self) -> None:
        """Finish the pending units and stop the thread."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=30)
                self._thread = None

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Unit, Future[None]]]) -> None:
        if len(batch) == 1:
            self._commit_alone(*batch[0])
            return
        try:
            with self.db.transaction() as conn:
                defer_inserts(conn)  # each table's rows of the whole batch in one statement
                head = repo.lock_ledger_head(conn)
                for unit, _ in batch:
                    head = unit(conn, head)
        except DatabaseUnavailable as exc:  # a condition, logged once by the Database
            for _, future in batch:
                future.set_exception(exc)
            return
        except Exception:  # a unit failed, or the commit: nothing of the batch is written
            for unit, future in batch:  # each again alone, so a failure is its own caller's only
                self._commit_alone(unit, future)
            return
        for _, future in batch:
            future.set_result(None)

    def _commit_alone(self, unit: Unit, future: Future[None]) -> None:
        """One unit in its own transaction: if it fails, rolling the transaction back is rolling
        back that unit alone, and its caller gets the error (an insert's included: the rows are
        deferred to just before the commit, as in a batch, so a lone unit too writes them in one
        round trip)."""
        ran = False
        try:
            with self.db.transaction() as conn:
                defer_inserts(conn)
                unit(conn, repo.lock_ledger_head(conn))
                ran = True
        except DatabaseUnavailable as exc:  # a condition, logged once by the Database
            future.set_exception(exc)
            return
        except Exception as exc:  # the unit's error (rolled back), or the commit's
            if ran:
                log.exception("group commit of 1 unit failed")
            future.set_exception(exc)
            return
        future.set_result(None)
