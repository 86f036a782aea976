"""Engines and units of work.

SQLite runs in WAL mode with ``synchronous=FULL``; every write transaction begins ``IMMEDIATE``,
so writers are serialised by the database from their first statement (no stale-snapshot upgrade
failures), while read transactions (:meth:`Database.read`) begin deferred and never wait for a
writer. PostgreSQL serialises ledger appends on the locked ``ledger_head`` row. Commit and rollback
happen only in :meth:`Database.transaction` and :meth:`Database.read`.

On PostgreSQL the connections are in autocommit mode and a transaction sends its own ``BEGIN`` and
``COMMIT``, each in the round trip of a statement it sends anyway: its ``BEGIN`` with the ledger
head's lock when that is its first statement (:func:`begin_with`), else with its first statement
(one pipeline); its ``COMMIT`` at the end of the pipeline of what it does before it commits (below). A
read (:meth:`Database.read`) sends neither: under READ COMMITTED each of its statements saw its own
snapshot inside a transaction too, so only the two round trips go (a server-side cursor, which
needs a transaction, begins one: :func:`begin_now`). Two round trips fewer for a write, two for a
read, on the path of every message.

On PostgreSQL a pooled connection is pinged before use only when it has been idle for
``PING_AFTER_IDLE_SECONDS`` (a server restart or a dropped idle connection is caught there, and
the pool tries a fresh one); under load, connections come back within milliseconds and are not
pinged. What a transaction asks to do just before it commits (:func:`before_commit`) runs once:
the notifications it asked for (:func:`exchange.db.coordination.notify`) go in one statement, the
rows it deferred (:func:`defer_inserts`) in one statement per table, and
the ledger head is written once, whatever the number of units of work and appends it holds; on
PostgreSQL those statements go in one round trip (psycopg's pipeline mode), their errors raised
as any statement's.

An unreachable database (server down or restarting, connection lost, pool exhausted) or one that
cannot write (disk full) raises :class:`~exchange.errors.DatabaseUnavailable` from both, which the
API answers 503 with ``Retry-After``. The condition is logged once when it starts and once when
it ends, not once per request. A transaction PostgreSQL aborts in a conflict with another (a
deadlock, a serialization failure) raises
:class:`~exchange.errors.TransactionConflict` instead: the database is up, nothing of the
transaction was written, and its caller may run it again (the group committer does).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from exchange.errors import ConfigurationError, DatabaseNotMigrated, DatabaseUnavailable, TransactionConflict
from exchange.files import create_private

log = logging.getLogger("exchange.db")

#: What SQLAlchemy raises when the database is down, restarting, unreachable, out of connections or
#: out of disk (PostgreSQL's class 53 and SQLite's SQLITE_FULL are OperationalError). Integrity and
#: programming errors are bugs or bad data, not unavailability, and are not in this list.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    sa.exc.DisconnectionError,
    sa.exc.TimeoutError,
)


#: SQLite primary result codes of unavailability: BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL,
#: CANTOPEN. SQLite raises OperationalError for a missing table or a syntax error too: not these.
SQLITE_UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14})


#: PostgreSQL's SQLSTATEs of a transaction that lost a conflict with another, which running it
#: again resolves: deadlock_detected, serialization_failure. (A lock wait past ``lock_timeout``,
#: 55P03, stays unavailability: whoever holds the lock may hold it for long.)
CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})


def is_conflict(exc: BaseException) -> bool:
    """True if the database aborted ``exc``'s transaction in a conflict with another transaction:
    nothing of it was written, and it may run again."""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in CONFLICT_SQLSTATES


def is_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` says the database is unavailable rather than the statement being wrong (or
    the transaction losing a conflict: :func:`is_conflict`)."""
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if not isinstance(exc, UNAVAILABLE_ERRORS) or is_conflict(exc):
        return False
    code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
    return code is None or (int(code) & 0xFF) in SQLITE_UNAVAILABLE_CODES


class Availability:
    """The database's availability as a condition: logged when it changes, not per failure."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.available = True
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            changed, self.available = self.available, False
        if changed:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0:1]
            log.error(
                "database %s unavailable (%s): %s; answering 503 until it is back",
                self.name,
                type(exc).__name__,
                reason[0] if reason else "",
            )

    def succeeded(self) -> None:
        if self.available:
            return
        with self._lock:
            changed, self.available = not self.available, True
        if changed:
            log.warning("database %s available again", self.name)


#: a pooled PostgreSQL connection idle this long is pinged before it is used again
PING_AFTER_IDLE_SECONDS = 5.0

#: what each transaction opened by :meth:`Database.transaction` does just before it commits (see
#: :func:`before_commit`), by its Connection object. Kept here, not in ``Connection.info``: that
#: belongs to the pooled DB-API connection, and cannot be read once a lost connection is invalid.
_BEFORE_COMMIT: dict[Connection, dict[str, Callable[[Connection], None]]] = {}


#: what each transaction opened by :meth:`Database.transaction` remembers until it ends (see
#: :func:`transaction_memo`), by its Connection object
_MEMOS: dict[Connection, dict[Any, Any]] = {}


#: the transactions opened by :meth:`Database.transaction` on PostgreSQL that have not sent their
#: ``BEGIN`` yet (see the module docstring): their first statement sends it
_UNBEGUN: set[Connection] = set()

#: the connections of :meth:`Database.read` units: a write there is refused (on PostgreSQL it would
#: commit at once, out of any transaction)
_READING: set[Connection] = set()

#: the transactions of ``Database.transaction(lock_free=True)`` until their actions before commit:
#: anything but a plain read is refused there, and a read sends no BEGIN (see
#: :meth:`Database.transaction`)
_LOCK_FREE: set[Connection] = set()

#: a plain read (what a lock-free transaction may send before its commit), and what makes a read lock
_PLAIN_READ = re.compile(r"^\s*SELECT\b", re.IGNORECASE)
_LOCKING_READ = re.compile(r"\bFOR\s+(?:NO\s+KEY\s+|KEY\s+)?(?:UPDATE|SHARE)\b|\bpg_advisory", re.IGNORECASE)


def _guard_units_of_work(engine: Engine) -> None:
    """Before each statement sent through SQLAlchemy: refuse a write in a read, and send a
    PostgreSQL transaction's ``BEGIN`` with its first statement (in one round trip where it can,
    :func:`_one_statement_to_pipeline`; else just before it). A statement sent on the
    driver's own cursor passes neither: the repository sends only reads there, and
    :func:`begin_with` its ``BEGIN``."""

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Connection, cursor: Any, sql: str, _params: Any, context: Any, _many: bool) -> None:
        writes = context is not None and (context.isinsert or context.isupdate or context.isdelete)
        if writes and conn in _READING:
            raise RuntimeError("a write inside Database.read(): write in Database.transaction()")
        if conn in _LOCK_FREE:  # before its commit: plain reads only, which need no BEGIN yet
            if writes or not _PLAIN_READ.match(sql) or _LOCKING_READ.search(sql):
                raise RuntimeError(
                    "a row lock in a lock-free transaction before its commit (only plain reads may go"
                    " there, its writes deferred to the commit): lock the ledger head first instead"
                )
            return  # (READ COMMITTED: it sees what it would inside the transaction, which wrote nothing yet)
        if conn in _UNBEGUN:
            _UNBEGUN.discard(conn)
            driver = cursor.connection
            if _one_statement_to_pipeline(conn, context, _params, _many):
                context.begin_first = True  # sent with the statement, in one round trip (below)
            else:
                driver.execute("BEGIN")  # (in a pipeline already: queued, in the same round trip)

    if engine.dialect.name != "postgresql":
        return

    def _execute(cursor: Any, sql: str, params: Any, context: Any) -> bool:
        """Send a transaction's ``BEGIN`` and its first statement in one round trip (psycopg's
        pipeline mode; its results are read once the pipeline synced, its error raised there)."""
        if not getattr(context, "begin_first", False):
            return False  # SQLAlchemy executes it
        driver = cursor.connection
        with driver.pipeline():
            driver.execute("BEGIN")
            cursor.execute(sql, params)
        return True

    sa.event.listen(engine, "do_execute", _execute)


def _one_statement_to_pipeline(conn: Connection, context: Any, params: Any, many: bool) -> bool:
    """Whether a transaction's first statement may go in one pipeline with its ``BEGIN``: a
    statement with parameters (text without them may hold several statements, which a pipeline
    refuses), executed once, on a client-side cursor (a server-side one cannot be pipelined), on a
    connection not in a pipeline already, whose driver pipelines."""
    driver: Any = conn.connection.driver_connection
    return (
        context is not None
        and not many
        and bool(params)
        and not context.execution_options.get("stream_results", False)
        and not driver.pgconn.pipeline_status
        and _pipelines(conn)
    )


def _pipelines(conn: Connection) -> bool:
    """Whether ``conn``'s driver sends several statements in one round trip (psycopg's pipeline
    mode, with a libpq that has it)."""
    return conn.dialect.driver == "psycopg" and bool(conn.dialect.loaded_dbapi.Pipeline.is_supported())


def _never_pooled_inside_a_transaction(engine: Engine) -> None:
    """Roll back what a PostgreSQL connection left open when it returns to the pool (SQLAlchemy's
    reset on return does it too, unless configured not to on an autocommit engine): an open
    transaction there could hold the ledger head's lock for good."""
    status = engine.dialect.loaded_dbapi.pq.TransactionStatus
    open_states = {status.INTRANS, status.INERROR}

    @sa.event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, _record: Any) -> None:
        if dbapi_conn is not None and dbapi_conn.info.transaction_status in open_states:
            dbapi_conn.rollback()


def begin_with(conn: Connection, statement: str) -> Any:
    """Run ``statement``, a constant statement without parameters, and return its first row (a
    named tuple, or a Row): as the transaction's first statement with its ``BEGIN`` in the same
    round trip on PostgreSQL (one simple query), as any statement otherwise.

    Raises:
        sqlalchemy.exc.DBAPIError: as a statement's error is raised (lost connection included).
    """
    if conn not in _UNBEGUN:
        return conn.exec_driver_sql(statement).first()
    _UNBEGUN.discard(conn)
    driver: Any = conn.connection.driver_connection  # not in a pipeline: a simple query is needed
    try:  # (the driver's own cursor: SQLAlchemy's hooks and echo do not see this statement)
        with driver.cursor(row_factory=conn.dialect.loaded_dbapi.rows.namedtuple_row) as cursor:
            cursor.execute("BEGIN; " + statement)
            cursor.nextset()
            return cursor.fetchone()
    except conn.dialect.loaded_dbapi.Error as exc:  # raw cursor: translated as SQLAlchemy does
        conn._handle_dbapi_exception(exc, statement, None, None, None)  # private; _pipelined's too
        raise  # (not reached: the call above raises)


def begin_now(conn: Connection) -> None:
    """Have ``conn`` inside a database transaction from here (a PostgreSQL server-side cursor needs
    one), ended by its unit of work's commit: a no-op where one is open already, and on SQLite."""
    if conn.dialect.name != "postgresql":
        return
    _UNBEGUN.discard(conn)
    driver: Any = conn.connection.driver_connection
    if driver.info.transaction_status == conn.dialect.loaded_dbapi.pq.TransactionStatus.IDLE:
        conn.exec_driver_sql("BEGIN")


def before_commit(
    conn: Connection, key: str, action: Callable[[Connection], None], *, first: bool = False
) -> bool:
    """Have ``action(conn)`` run once, just before ``conn``'s transaction commits; a later action
    under the same ``key`` replaces an earlier one in its place. The actions run in the order
    their keys were first registered, except that ``first`` puts this key before every other.
    Only in a transaction opened by :meth:`Database.transaction`: returns False elsewhere, and the
    caller must act at once."""
    actions = _BEFORE_COMMIT.get(conn)
    if actions is None:
        return False
    if first:
        others = [(k, a) for k, a in actions.items() if k != key]
        actions.clear()
        actions.update([(key, action), *others])
    else:
        actions[key] = action
    return True


def transaction_memo(conn: Connection) -> dict[Any, Any] | None:
    """A dict that lives as long as ``conn``'s transaction (opened by :meth:`Database.transaction`;
    None elsewhere): for what its units of work may look up once instead of once each."""
    return _MEMOS.get(conn)


def pending(conn: Connection, key: str) -> object | None:
    """The action registered under ``key`` for ``conn``'s transaction to run before it commits."""
    return _BEFORE_COMMIT.get(conn, {}).get(key)


class _Inserts:
    """The rows one transaction inserts just before it commits: one executemany per statement and
    set of columns, statements in the order they were first used (a row that references another
    table's row, used after it, comes after it)."""

    def __init__(self) -> None:
        self.rows: dict[Any, dict[frozenset[str], list[dict[str, Any]]]] = {}

    def __call__(self, conn: Connection) -> None:
        for statement, by_columns in self.rows.items():
            for rows in by_columns.values():
                conn.execute(statement, rows)


def defer_inserts(conn: Connection) -> bool:
    """Have every :func:`insert` of ``conn``'s transaction wait until just before it commits and go
    in with the others of its statement, before any other action registered later. For a
    transaction that does not read back what it inserts; an insert's error then arises at commit,
    failing the whole transaction. Only in :meth:`Database.transaction` (returns False elsewhere)."""
    return before_commit(conn, "inserts", _Inserts())


def inserts_deferred(conn: Connection) -> bool:
    """Whether ``conn``'s transaction defers its inserts to its commit (:func:`defer_inserts`)."""
    return isinstance(pending(conn, "inserts"), _Inserts)


def insert(conn: Connection, statement: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert ``rows`` with ``statement`` (an ``INSERT`` of a table): at once, or just before the
    transaction commits if it defers its inserts (:func:`defer_inserts`)."""
    if not rows:
        return
    deferred = pending(conn, "inserts")
    if not isinstance(deferred, _Inserts):
        conn.execute(statement, [dict(r) for r in rows] if len(rows) > 1 else dict(rows[0]))
        return
    by_columns = deferred.rows.setdefault(statement, {})
    for row in rows:
        by_columns.setdefault(frozenset(row), []).append(dict(row))


class _Statements:
    """The statements one transaction runs just before it commits (:func:`at_commit`), in the
    order they were queued."""

    def __init__(self) -> None:
        self.queued: list[tuple[Any, Any]] = []

    def __call__(self, conn: Connection) -> None:
        for statement, params in self.queued:
            conn.execute(statement, params)


def at_commit(
    conn: Connection, statement: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> None:
    """Run ``statement`` (an ``UPDATE`` or ``DELETE`` whose result is not read) with ``params``
    just before ``conn``'s transaction commits: after the actions registered before the first
    such statement (a committer's or a receiver's deferred inserts, the head's guarded write),
    in the commit's single round trip on PostgreSQL. At once outside :meth:`Database.transaction`.

    The one way a lock-free transaction updates or deletes (ADR 4): there the head row is locked
    first, at commit, and these rows after it, as every other writer locks them.

    Raises:
        RuntimeError: called inside a savepoint (its rollback would not take the statement back).
    """
    if conn.in_nested_transaction():
        raise RuntimeError("a statement for the commit inside a savepoint: queue it after the savepoint")
    queued = pending(conn, "statements")
    if not isinstance(queued, _Statements):
        queued = _Statements()
        if not before_commit(conn, "statements", queued):
            conn.execute(statement, params)
            return
    queued.queued.append((statement, params))


@contextmanager
def _pipelined(conn: Connection, *, commit: bool = False) -> Iterator[None]:
    """The statements run inside in one round trip to the server (psycopg's pipeline mode), not one
    each: for the actions just before a commit, which write and read nothing back. An error is
    raised as SQLAlchemy raises a statement's (translated; on a lost connection this one and the
    pool's others invalidated, so reported as unavailable); elsewhere than on psycopg with a libpq
    that pipelines, the statements run one by one. With ``commit``, the transaction's ``COMMIT``
    goes last in the same round trip (where statements run one by one, the unit of work commits)."""
    dbapi = conn.dialect.loaded_dbapi
    if not _pipelines(conn):
        yield
        return
    driver: Any = conn.connection.driver_connection
    try:
        with driver.pipeline():
            yield
            if commit and conn not in _UNBEGUN:  # (a transaction that sent nothing has nothing to commit)
                driver.execute("COMMIT")  # the unit of work's own commit then finds nothing open
    except dbapi.Error as exc:  # raised by the pipeline's last sync, outside SQLAlchemy's execute
        # SQLAlchemy's own handling of a statement's error (also with no cursor or context)
        conn._handle_dbapi_exception(exc, "(the statements pipelined before commit)", None, None, None)
        raise  # (not reached: the call above raises)


def _ping_when_idle(engine: Engine) -> None:
    """Ping a pooled connection at checkout only after ``PING_AFTER_IDLE_SECONDS`` of idleness;
    a dead one makes the pool discard it and connect afresh."""

    @sa.event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:
            raise sa.exc.DisconnectionError(f"a pooled connection is dead: {exc}") from exc


def normalise_url(url: str) -> str:
    """Use the psycopg 3 driver for ``postgresql://`` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str, *, writer: bool = True, pool_size: int = 5) -> Engine:
    """An engine for ``url`` configured as the module docstring says (``writer``: BEGIN IMMEDIATE).
    On PostgreSQL the pool keeps ``pool_size`` connections open and opens as many more under a
    burst (each closed when it comes back): a pool smaller than the threads that use it at once
    would connect and disconnect at every request.

    Raises:
        ConfigurationError: the URL is not a usable SQLAlchemy URL.
    """
    try:
        engine = sa.create_engine(
            normalise_url(url),
            # an error's text never carries a statement's values (a message's case reference and
            # markings, a client's registration): tracebacks are logged, values must not be
            hide_parameters=True,
            **(
                {"connect_args": {"check_same_thread": False, "timeout": 30}}
                if url.startswith("sqlite")
                else {"pool_size": pool_size, "max_overflow": pool_size, "isolation_level": "AUTOCOMMIT"}
            ),
        )
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigurationError(f"invalid database URL: {exc}") from exc
    if engine.dialect.name == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's begin event emit BEGIN
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA secure_delete=ON")  # what a row no longer holds is overwritten in the file
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    else:
        _ping_when_idle(engine)
        _never_pooled_inside_a_transaction(engine)
    _guard_units_of_work(engine)
    return engine


def alembic_config(url: str) -> Config:
    """An Alembic configuration for this project's ``migrations/`` folder and ``url``."""
    from exchange.messages import data_dir

    cfg = Config()
    cfg.set_main_option("script_location", str(data_dir("migrations")))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None for another database or an in-memory one)."""
    parsed = sa.engine.make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def current_revision(url: str) -> str | None:
    """The database's migration revision, None when it has none. A SQLite file that does not
    exist is not created.

    Raises:
        ConfigurationError: the database cannot be opened.
    """
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    engine = make_engine(url, writer=False)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except sa.exc.OperationalError as exc:
        raise ConfigurationError(f"cannot open the database: {exc.orig}") from exc
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> str | None:
    """Run the migrations up to ``revision``; returns the revision reached. A new SQLite file is
    created owner-only (its WAL and shared-memory files take the same mode)."""
    from alembic import command

    path = sqlite_path(url)
    if path is not None:
        create_private(path)
    command.upgrade(alembic_config(url), revision)
    return current_revision(url)


class Database:
    """An engine plus the unit of work. One per process."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        path = sqlite_path(url)
        if path is not None and path.exists():
            create_private(path)  # owner-only, also for a file made before this rule
        self.engine = make_engine(url, pool_size=pool_size)
        self.reader = make_engine(url, writer=False) if self.engine.dialect.name == "sqlite" else self.engine
        self.availability = Availability(self.engine.url.render_as_string(hide_password=True))
        #: the ledger head (``repo.LedgerHead``) that this process's last transaction to write one
        #: committed, or None: the group committer appends after it without locking it first
        #: (``repo.assume_ledger_head``). Another process's append makes it stale, which the
        #: head's guard then refuses at commit.
        self.known_ledger_head: Any = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self, *, lock_free: bool = False) -> Iterator[Connection]:
        """A connection in a transaction, committed on success and rolled back on error. Once it
        committed, each action it ran before the commit that has a ``committed(db)`` method is
        told so.

        ``lock_free``: before the actions at commit, only plain reads may be sent (anything else,
        a write not deferred to the commit or a locking read, raises RuntimeError: it could lock
        a row), and they send no ``BEGIN``: it goes with the actions, in their pipeline. For a
        transaction that locks the ledger head only at commit (``repo.assume_ledger_head``):
        every other writer locks the head first, so a row locked before it could deadlock.

        Raises:
            DatabaseUnavailable: the database could not be reached or could not write.
            TransactionConflict: the database aborted the transaction in a conflict with another.
        """
        actions: dict[str, Callable[[Connection], None]] = {}
        with self._available(), self.engine.begin() as conn:
            _BEFORE_COMMIT[conn] = actions
            _MEMOS[conn] = {}
            if self.dialect == "postgresql":
                _UNBEGUN.add(conn)
            if lock_free:
                _LOCK_FREE.add(conn)
            try:
                yield conn
                _LOCK_FREE.discard(conn)
                if actions:
                    with _pipelined(conn, commit=True):
                        for action in actions.values():
                            action(conn)
            finally:
                del _BEFORE_COMMIT[conn]
                del _MEMOS[conn]
                _UNBEGUN.discard(conn)
                _LOCK_FREE.discard(conn)
        for action in actions.values():
            committed = getattr(action, "committed", None)
            if committed is not None:
                committed(self)

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection in a read-only unit of work (on SQLite it never waits for a writer).

        Raises:
            DatabaseUnavailable: the database could not be reached.
        """
        with self._available(write=False), self.reader.begin() as conn:
            _READING.add(conn)
            try:
                yield conn
            finally:
                _READING.discard(conn)

    def compact(self, tables: Sequence[str]) -> bool:
        """Rewrite ``tables`` (PostgreSQL: ``VACUUM FULL``, waiting at most 5 s for their lock) or
        the whole file (SQLite: ``VACUUM``, then the WAL truncated), so that the values just emptied
        from them leave the database's files. Backups taken before, and PostgreSQL's WAL archive,
        keep them until they expire. Outside any transaction. Never raises: returns whether it was
        done; what stops it is logged with what to run instead."""
        instead = "VACUUM FULL " + ", ".join(tables) if self.dialect == "postgresql" else "VACUUM"
        raw = self.engine.raw_connection()
        try:
            driver: Any = raw.driver_connection
            if self.dialect == "postgresql":
                driver.autocommit = True
                driver.execute("SET lock_timeout = '5s'")
                driver.execute(instead)
                driver.execute("RESET lock_timeout")
                return True
            driver.execute("VACUUM")
            busy = driver.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy and busy[0]:  # a reader kept the WAL's older frames: they go at a later checkpoint
                log.warning("the WAL was not truncated after VACUUM (a reader held it): run it again later")
                return False
            return True
        except Exception as exc:  # (a start must not fail on it: the data is right, only the files lag)
            log.error(
                "the database could not be compacted (%s): run `%s` when the node is quiet",
                type(exc).__name__,
                instead,
            )
            raw.invalidate()  # (its session settings are not left to a later user of the pool)
            return False
        finally:
            raw.close()

    @contextmanager
    def _available(self, *, write: bool = True) -> Iterator[None]:
        """Convert unavailability to DatabaseUnavailable, a lost conflict to TransactionConflict
        (not a condition of the database). Only a committed write ends the condition: with a full
        disk, reads still succeed while every write fails."""
        try:
            yield
        except sa.exc.SQLAlchemyError as exc:
            if is_conflict(exc):
                lost = type(getattr(exc, "orig", exc)).__name__
                raise TransactionConflict(f"the transaction lost a conflict with another: {lost}") from exc
            if not is_unavailable(exc):
                raise
            self.availability.failed(exc)
            raise DatabaseUnavailable(f"the database is unavailable: {type(exc).__name__}") from exc
        if write:
            self.availability.succeeded()

    def check_migrated(self) -> None:
        """Raise DatabaseNotMigrated unless the schema is at the migrations' head (a SQLite file
        that does not exist yet is left uncreated)."""
        head = ScriptDirectory.from_config(alembic_config(self.url)).get_current_head()
        current = current_revision(self.url)
        if current != head:
            raise DatabaseNotMigrated(
                f"the database is at revision {current or '(empty)'} but this code needs {head}:"
                " run `exchange db upgrade --dir <node dir>`"
            )

    def dispose(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.dispose()
