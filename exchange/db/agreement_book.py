"""The agreement versions one process of a node holds: the agreement file (the node's first version)
and every version installed since in the database (``exchange agreement install``).

Guarantees:

- the installed versions are read at most ``ttl`` seconds before use; on PostgreSQL an install by
  any process notifies every process of the node (NOTIFY ``exchange_agreement``), which reads them
  again at its next use (a read that raced the notification is not trusted for ``ttl``);
- every version held follows the one before it (:func:`exchange.agreement_history.successor_problems`)
  and its stored document still has its digest; at the first read a version that does not (a row
  edited, a file replaced by another document), or a version the ledger says was installed and the
  table lacks, refuses the start; later, the process keeps what it held and logs a security incident;
- an install is ledgered (``agreement.installed``, with version, digest and ``effective_from``) in
  the transaction that stores it, under the ledger lock, so installs happen one at a time;
- :meth:`AgreementBook.in_force` costs a clock read while neither the versions nor the version in
  force changed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import threading
import time
from collections.abc import Callable

from sqlalchemy.engine import Connection

from exchange.agreement import Agreement, parse_agreement
from exchange.agreement_history import AgreementHistory, Terms
from exchange.canonical import canonical_json
from exchange.db import repo
from exchange.db.engine import Database
from exchange.errors import ConfigurationError
from exchange.ledger import EntryDraft, LedgerEntry
from exchange.ledger.events import LedgerEvent
from exchange.observability import logs

log = logging.getLogger("exchange.agreement")


class AgreementBook:
    """A per-process view of the node's agreement versions (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        first: Agreement,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.first = first
        self.ttl = ttl
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._reading = threading.Lock()  # one reload at a time: a slow one never overwrites a newer
        self._installed: dict[str, Agreement] = {}  # digest -> installed version
        self._history = AgreementHistory.of([first])
        self._read_at = -math.inf
        self._generation = 0
        self._trusted = False  # a read succeeded: a later refusal keeps what is held
        self._refused: set[str] = set()  # why a later read was refused, each logged once
        # (history, terms in force, from, until): the answer of in_force() between two switches
        self._current: tuple[AgreementHistory, Terms, float, float] | None = None

    def history(self, *, read: bool = True) -> AgreementHistory:
        """Every version held, read from the database at most ``ttl`` seconds ago; with ``read``
        False, what is held without reading (for the event loop, which must not wait on the
        database). One thread reads at a time; the others meanwhile take what is held.

        Raises:
            ConfigurationError: at this process's first read, a version that does not follow the
                one before it, whose document lost its digest, or that the ledger does not record.
            DatabaseUnavailable: the versions had to be read and the database is unreachable.
        """
        due = read and self.clock() - self._read_at >= self.ttl
        if due and self._reading.acquire(blocking=not self._trusted):  # the first read: all wait
            try:
                if self.clock() - self._read_at >= self.ttl:  # not read meanwhile by another
                    self._reload()
            finally:
                self._reading.release()
        return self._history

    def in_force(self, at: dt.datetime | None = None, *, read: bool = True) -> Terms:
        """The version in force at ``at`` (default: now). Raises as :meth:`history`."""
        history = self.history(read=read)
        if at is not None:
            return history.in_force(at)
        now = self.wall()
        current = self._current
        if current is not None and current[0] is history and current[2] <= now < current[3]:
            return current[1]
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        terms = history.in_force(moment)
        start = terms.agreement.effective_from if terms is not history.versions[0] else None
        until = history.switches_after(moment)
        self._current = (
            history,
            terms,
            start.timestamp() if start is not None else -math.inf,
            until.timestamp() if until is not None else math.inf,
        )
        return terms

    def refresh(self) -> AgreementHistory:
        """The versions read now, after any read under way: for a version named by a verified
        message or a stored row that this process does not hold (installed since it last read).

        Raises:
            DatabaseUnavailable: the database is unreachable.
        """
        with self._reading:
            self._reload()
        return self._history

    def forget(self) -> None:
        """Read the versions again at the next use: one was installed, or may have been."""
        with self._lock:
            self._generation += 1
            self._read_at = -math.inf

    def install(self, agreement: Agreement, now: dt.datetime, *, late: bool = False) -> bool:
        """Install ``agreement`` as the node's newest version, ledgered; False if it is held already
        (the same version and digest). ``late``: its ``effective_from`` may have passed (a node
        catching up with its partner: what either sent under the old version since is rejected).

        Raises:
            ConfigurationError: naming every reason it cannot follow the newest version held,
                another document held under its version, or an ``effective_from`` not in the
                future without ``late``.
        """
        with self.db.transaction() as conn:
            head = repo.lock_ledger_head(conn)  # one install at a time, ledgered with its row
            history = self._read(conn, dict(self._installed))
            held = history.held(agreement.version)
            if held is not None and held.agreement.digest == agreement.digest:
                return False
            if held is not None:
                raise ConfigurationError(
                    f"agreement version {agreement.version!r} is installed already with another document"
                    f" (sha256 {held.agreement.digest}): give the new one a new version"
                )
            history.followed_by(agreement)
            assert agreement.effective_from is not None  # followed_by requires it
            if agreement.effective_from <= now and not late:
                raise ConfigurationError(
                    f"effective_from {agreement.effective_from.isoformat()} has passed: messages signed since"
                    " under the version before would be rejected; give a later effective_from, agreed"
                    " with the partner, or --late to catch up with a partner already under it"
                )
            effective_from = agreement.effective_from.astimezone(dt.UTC).isoformat()
            repo.insert_agreement(
                conn,
                {
                    "version": agreement.version,
                    "digest": agreement.digest,
                    "document": canonical_json(agreement.document).decode(),  # effective_from in it
                    "installed_at": now.isoformat(),
                },
            )
            repo.append_ledger(
                conn,
                head,
                [
                    EntryDraft(
                        event=LedgerEvent.AGREEMENT_INSTALLED,
                        decision="allow",
                        data={
                            "version": agreement.version,
                            "sha256": agreement.digest,
                            "effective_from": effective_from,
                            **({"late": True} if agreement.effective_from <= now else {}),
                        },
                    )
                ],
                now.isoformat(),
            )
        self.forget()
        log.info("agreement version %s installed, in force from %s", agreement.version, effective_from)
        return True

    def _reload(self) -> None:
        with self._lock:
            generation = self._generation
            installed = dict(self._installed)
        read_at = self.clock()
        try:
            with self.db.read() as conn:
                # the ledger before the table: an install stores and ledgers in one transaction
                recorded = (
                    repo.entries_of(conn, [LedgerEvent.AGREEMENT_INSTALLED]) if not self._trusted else []
                )
                history = self._read(conn, installed, self._history)
            if not self._trusted:
                self._check_against_ledger(history, recorded)
        except ConfigurationError as exc:
            if not self._trusted:
                raise
            if str(exc) not in self._refused:
                self._refused.add(str(exc))
                logs.security_incident(
                    log, "agreement", "the installed agreement versions are refused: %s", exc
                )
            history = self._history
        with self._lock:
            self._installed = installed
            self._history = history
            self._trusted = True
            if self._generation == generation:
                self._read_at = read_at

    @staticmethod
    def _check_against_ledger(history: AgreementHistory, recorded: list[LedgerEntry]) -> None:
        """Refuse a history without a version the ledger says was installed, or with another
        document under it: rows deleted or replaced, or restored apart from the ledger.

        Raises:
            ConfigurationError: naming the entry and the version.
        """
        digests = history.accepted
        for entry in recorded:
            version, digest = str(entry.data.get("version")), entry.data.get("sha256")
            if digests.get(version) != digest:
                raise ConfigurationError(
                    f"ledger entry {entry.seq} records agreement {version!r} (sha256 {digest}) as installed,"
                    " but the agreements table does not hold it; restore the agreements table from a backup"
                )

    def _read(
        self, conn: Connection, installed: dict[str, Agreement], held: AgreementHistory | None = None
    ) -> AgreementHistory:
        """The history of the file's version and every installed one; ``installed`` (digest ->
        version, updated here) spares parsing the documents already read, and ``held`` is returned
        as it is when no other document is stored (its versions keep their catalogues).

        Raises:
            ConfigurationError: a stored document that lost its digest or is invalid, or a version
                that does not follow the one before it.
        """
        new: dict[str, Agreement] = {}
        for digest, document in repo.agreement_documents(conn, installed):
            agreement = parse_agreement(json.loads(document), source=f"installed agreement {digest[:16]}…")
            if agreement.digest != digest:
                raise ConfigurationError(
                    f"installed agreement {agreement.version!r}: its stored document no longer has its"
                    f" digest {digest}; restore the agreements table from a backup"
                )
            new[digest] = agreement
        if not new and held is not None:
            return held
        history = AgreementHistory.of([self.first, *installed.values(), *new.values()])
        if new:  # the table before the ledger: an install stores and ledgers in one transaction
            recorded = {
                (str(e.data.get("version")), e.data.get("sha256"))
                for e in repo.entries_of(conn, [LedgerEvent.AGREEMENT_INSTALLED])
            }
            for digest, agreement in new.items():
                if (agreement.version, digest) not in recorded:
                    raise ConfigurationError(
                        f"installed agreement {agreement.version!r} (sha256 {digest}) has no"
                        " agreement.installed ledger entry: it was not installed with `exchange agreement"
                        " install`; remove the row"
                    )
        installed.update(new)
        return history
