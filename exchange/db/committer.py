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

On PostgreSQL a batch of units that only read, insert and append (``run(..., appends_only=True)``:
submissions, decisions) does not lock the ledger head first: it appends after the head its process
last committed (:attr:`Database.known_ledger_head`), and the head is locked and written first at
commit, only if it is still that head (:func:`repo.assume_ledger_head`). That saves the lock's round
trip. If another writer moved the head meanwhile (another process, or a transaction of this one
outside the committer that had not finished), the commit fails, and the batch runs again holding
the lock, as every batch does for the next ``LOCK_AFTER_MOVED_SECONDS``; so does a batch whose
unit or commit failed otherwise. A unit may thus run three times (the batch unlocked, the batch
locked, alone). A transaction the database aborts in a conflict with another (a deadlock:
:class:`~exchange.errors.TransactionConflict`) is not the unit's fault: a batch it aborts runs
again as any failed batch does, and a unit alone runs again, up to ``CONFLICT_RETRIES`` more
times, before its caller gets the conflict.

Guarantee: :meth:`GroupCommitter.run` returns only after the unit is committed, and raises if it
was not. Appends stay serialised by the database (the head row lock / SQLite's write lock), so
several processes may each run a committer against one database.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from sqlalchemy.engine import Connection

from exchange.db import repo
from exchange.db.engine import Database, defer_inserts
from exchange.errors import DatabaseUnavailable, TransactionConflict

log = logging.getLogger("exchange.committer")

Unit = Callable[[Connection, repo.LedgerHead], repo.LedgerHead]

#: after the head moved under an unlocked batch, batches lock it first for this long
LOCK_AFTER_MOVED_SECONDS = 1.0

#: how many times a unit alone runs again after the database aborted it in a conflict, and the
#: longest pause before each (jittered: two units that deadlocked do not meet again in step)
CONFLICT_RETRIES = 3
CONFLICT_PAUSE_SECONDS = 0.05

_Item = tuple[Unit, Future[None], bool]  # the unit, its caller's future, whether it only appends


class UnlockedAppends:
    """Whether a transaction of this process may append after the ledger head the process last
    committed without locking the head first (PostgreSQL, ``repo.assume_ledger_head``), and what
    a failed attempt means for the next ones. Shared by the group committer and the receiver."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._locking_until = 0.0  # (monotonic) attempts lock the head first until then
        self._lock = threading.Lock()
        #: attempts committed, and attempts that went again holding the lock
        self.commits = 0
        self.retried = 0

    def head(self) -> repo.LedgerHead | None:
        """The head to assume, or None to lock it first: on SQLite (a writer holds the lock from
        its ``BEGIN``), before this process committed a head, and for ``LOCK_AFTER_MOVED_SECONDS``
        after the head moved under an attempt."""
        known = self.db.known_ledger_head
        if (
            isinstance(known, repo.LedgerHead)
            and self.db.dialect == "postgresql"
            and time.monotonic() >= self._locking_until
        ):
            return known
        return None

    def committed(self) -> None:
        with self._lock:
            self.commits += 1

    def failed(self, what: str, exc: BaseException, assumed: repo.LedgerHead) -> None:
        """An attempt after ``assumed`` failed with ``exc`` (nothing of it was written) and goes
        again holding the lock. If another process moved the head, so do the attempts of the next
        ``LOCK_AFTER_MOVED_SECONDS``; not if a transaction of this process did (the next attempt
        assumes the head it committed), nor for a unit's own error."""
        elsewhere = repo.head_moved(exc) and self.db.known_ledger_head is assumed
        with self._lock:
            self.retried += 1
            if elsewhere:
                self._locking_until = time.monotonic() + LOCK_AFTER_MOVED_SECONDS
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[:1]  # (no parameters)
        log.log(
            # a row lock refused in a lock-free transaction is a bug of the unit (it then goes
            # again, locked, and works): said loudly, not at the level of the expected refusals
            logging.ERROR if isinstance(exc, RuntimeError) else logging.DEBUG,
            "%s goes again holding the ledger lock (%s: %s)",
            what,
            type(exc).__name__,
            reason[0] if reason else "",
        )


class GroupCommitter:
    """One background thread committing batches of units for one Database."""

    def __init__(self, db: Database, max_batch: int = 256) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.unlocked = UnlockedAppends(db)

    def run(self, unit: Unit, *, appends_only: bool = False) -> None:
        """Commit ``unit``; block until it is durable. Re-raises the unit's or the commit's error.

        ``appends_only``: the unit reads, inserts and appends to the ledger, and updates, deletes
        or locks no row (a statement that would raises RuntimeError in an unlocked batch, which
        then runs again holding the lock): its batch may go without locking the head first."""
        self._ensure_started()
        future: Future[None] = Future()
        self._queue.put((unit, future, appends_only))
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

    def _commit(self, batch: list[_Item]) -> None:
        known = self.unlocked.head() if all(appends_only for _, _, appends_only in batch) else None
        if known is not None:
            try:
                self._in_one_transaction(batch, known)
            except DatabaseUnavailable as exc:  # a condition, logged once by the Database
                _answer(batch, exc)
                return
            except Exception as exc:  # the head moved, or a unit or the commit failed: nothing written
                self.unlocked.failed(f"an unlocked batch of {len(batch)} unit(s)", exc, known)
            else:
                self.unlocked.committed()
                _answer(batch, None)
                return
        if len(batch) == 1:
            self._commit_alone(*batch[0][:2])
            return
        try:
            self._in_one_transaction(batch, None)
        except DatabaseUnavailable as exc:  # a condition, logged once by the Database
            _answer(batch, exc)
            return
        except Exception:  # a unit failed, or the commit: nothing of the batch is written
            for unit, future, _ in batch:  # each again alone, so a failure is its own caller's only
                self._commit_alone(unit, future)
            return
        _answer(batch, None)

    def _in_one_transaction(self, batch: list[_Item], assumed: repo.LedgerHead | None) -> None:
        """The batch's units in one transaction with no savepoint, each table's rows of the whole
        batch inserted in one statement, after the head locked now, or ``assumed`` (locked at
        commit, if it is still the head). Raises what a unit or the commit raised."""
        with self.db.transaction(lock_free=assumed is not None) as conn:
            if assumed is not None:
                repo.assume_ledger_head(conn, assumed)
            defer_inserts(conn)
            head = repo.lock_ledger_head(conn)  # (the assumed head, if one is)
            for unit, _, _ in batch:
                head = unit(conn, head)

    def _commit_alone(self, unit: Unit, future: Future[None]) -> None:
        """One unit in its own transaction: if it fails, rolling the transaction back is rolling
        back that unit alone, and its caller gets the error (an insert's included: the rows are
        deferred to just before the commit, as in a batch, so a lone unit too writes them in one
        round trip)."""
        for attempt in range(1 + CONFLICT_RETRIES):
            ran = False
            try:
                with self.db.transaction() as conn:
                    defer_inserts(conn)
                    unit(conn, repo.lock_ledger_head(conn))
                    ran = True
            except TransactionConflict as exc:  # nothing written: it may run again
                if attempt < CONFLICT_RETRIES:
                    log.warning("%s; the unit runs again", exc)
                    time.sleep(random.uniform(0, CONFLICT_PAUSE_SECONDS))  # noqa: S311 (not a secret)
                    continue
                future.set_exception(exc)
                return
            except DatabaseUnavailable as exc:  # a condition, logged once by the Database
                future.set_exception(exc)
                return
            except Exception as exc:  # the unit's error (rolled back), or the commit's
                if ran:
                    log.exception("group commit of 1 unit failed")
                future.set_exception(exc)
                return
            future.set_result(None)
            return


def _answer(batch: list[_Item], error: BaseException | None) -> None:
    """Tell every caller of the batch: committed (None), or the error."""
    for _, future, _ in batch:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
