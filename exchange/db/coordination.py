"""How the processes of one node coordinate: who leads each singleton loop, and who is woken when.

Nothing of ours coordinates processes; PostgreSQL does (design §15, docs/adr/0011):

- **Leadership.** Each singleton loop (delivery, checkpointer, retention, deadlines, ...) is led by
  the one process holding a session-level advisory lock named after it, on a dedicated connection
  (:class:`PostgresCoordination`). The lock lives exactly as long as that connection: a process
  that dies, or whose connection breaks, loses every lock it held, and a standby takes the lock at
  its next attempt (every ``retry_seconds``). A leader checks its connection at the same rhythm and
  drops its leadership the moment the connection fails, before another process can take over.
- **Wake-ups.** A transaction that queues an envelope or appends to the ledger sends a
  ``NOTIFY`` (:func:`notify`), delivered on commit to every process that listens on the same
  dedicated connection; each wakes the loops subscribed to that channel. A notification is a hint,
  never the only trigger: every loop still polls as a fallback, and after a reconnection every
  subscriber is woken once, since notifications sent meanwhile are lost.

On SQLite a node is one process (``exchange serve --workers`` > 1 is refused): :class:`SoleProcess`
leads every loop, and the wake-ups stay in process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable
from typing import Protocol

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from exchange.db.engine import Database, before_commit, normalise_url, pending

log = logging.getLogger("exchange.coordination")

#: NOTIFY channels: the outbox got an envelope to send; the ledger grew; the registered clients changed;
#: an agreement version was installed
OUTBOX_CHANNEL = "exchange_outbox"
LEDGER_CHANNEL = "exchange_ledger"
CLIENTS_CHANNEL = "exchange_clients"
AGREEMENT_CHANNEL = "exchange_agreement"
CHANNELS = (OUTBOX_CHANNEL, LEDGER_CHANNEL, CLIENTS_CHANNEL, AGREEMENT_CHANNEL)

#: the first key of every advisory lock of this project ("exch"), so that other software sharing
#: the database does not collide with our locks
LOCK_NAMESPACE = 0x65786368


def lock_key(name: str) -> int:
    """The second advisory-lock key of loop ``name``: stable across processes and versions."""
    value = zlib.crc32(f"exchange loop {name}".encode())
    return value - (1 << 32) if value >= 1 << 31 else value


class _Notifications:
    """The NOTIFY channels one transaction asked for, sent in one statement."""

    def __init__(self) -> None:
        self.channels: set[str] = set()

    def __call__(self, conn: Connection) -> None:
        channels = sorted(self.channels)
        calls = ", ".join(f"pg_notify(:c{i}, '')" for i in range(len(channels)))
        conn.execute(sa.text(f"SELECT {calls}"), {f"c{i}": c for i, c in enumerate(channels)})


def notify(conn: Connection, channel: str) -> None:
    """Wake the listeners of ``channel`` when ``conn``'s transaction commits (PostgreSQL; a no-op
    elsewhere). The notifications of one transaction go in one statement, just before it commits
    (:func:`~exchange.db.engine.before_commit`; at once outside :meth:`Database.transaction`), and
    several of one channel arrive as one."""
    if conn.dialect.name != "postgresql":
        return
    notifications = pending(conn, "notify")
    if not isinstance(notifications, _Notifications):
        notifications = _Notifications()
        if not before_commit(conn, "notify", notifications):
            notifications.channels.add(channel)
            notifications(conn)
            return
    notifications.channels.add(channel)


class Coordination(Protocol):
    """Leadership and wake-ups for the loops of one process."""

    retry_seconds: float

    def want(self, name: str) -> None:
        """Compete for the leadership of ``name`` from now on."""

    def leads(self, name: str) -> bool:
        """True while this process leads ``name``."""

    def subscribe(self, channel: str, wake: Callable[[], None]) -> None:
        """Call ``wake`` when another unit of work (in any process) notifies ``channel``."""

    def start(self) -> None: ...

    def close(self) -> None:
        """Give up every leadership at once (a successor need not wait) and stop listening."""


class SoleProcess:
    """The only process of a node (SQLite): it leads every loop; wake-ups stay in process."""

    retry_seconds = 1.0

    def want(self, name: str) -> None:
        pass

    def leads(self, name: str) -> bool:
        return True

    def subscribe(self, channel: str, wake: Callable[[], None]) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


def coordination_for(db: Database, retry_seconds: float, label: str) -> Coordination:
    """The coordination of a node's processes on ``db``: advisory locks and LISTEN/NOTIFY on
    PostgreSQL, the sole process on SQLite."""
    if db.dialect == "postgresql":
        return PostgresCoordination(db.url, retry_seconds=retry_seconds, label=label)
    return SoleProcess()


def libpq_url(url: str) -> str:
    """The libpq form of a SQLAlchemy PostgreSQL URL (``postgresql+psycopg://`` -> ``postgresql://``)."""
    parsed = sa.engine.make_url(normalise_url(url))
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresCoordination:
    """Advisory-lock leadership and LISTEN/NOTIFY wake-ups over one dedicated connection, owned by
    one thread (see the module docstring for what is guaranteed)."""

    def __init__(self, url: str, *, retry_seconds: float = 1.0, label: str = "exchange") -> None:
        self.url = libpq_url(url)
        self.retry_seconds = retry_seconds
        self.label = label
        self._wanted: set[str] = set()
        self._held: set[str] = set()
        self._subscribers: dict[str, list[Callable[[], None]]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        self._down = False
        self._thread: threading.Thread | None = None

    # --- what the loops call ---------------------------------------------------------------------

    def want(self, name: str) -> None:
        with self._lock:
            self._wanted.add(name)

    def leads(self, name: str) -> bool:
        with self._lock:
            return name in self._held

    def subscribe(self, channel: str, wake: Callable[[], None]) -> None:
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        with self._lock:
            self._subscribers[channel].append(wake)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="coordination", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=self.retry_seconds + 10)
        self._disconnect()

    # --- the coordination thread -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._connect()
                self._elect()
                conn = self._conn
                assert conn is not None
                for note in conn.notifies(timeout=self.retry_seconds):
                    self._wake(note.channel)
            except psycopg.Error as exc:
                self._lost(exc)
                self._stop.wait(self.retry_seconds)
        with self._lock:
            self._held.clear()

    def _connect(self) -> None:
        conn = psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=max(2, int(self.retry_seconds * 5)),
            application_name=f"{self.label} pid {os.getpid()}"[:63],
            # a partitioned leader's server session ends within ~11 s, releasing its locks
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
        )
        for channel in CHANNELS:
            conn.execute(f"LISTEN {channel}")  # channel names are our constants, never input
        self._conn = conn
        if self._down:
            log.warning("coordination connection back")
        self._down = False
        for channel in CHANNELS:  # notifications sent while we were away are lost: look once
            self._wake(channel)

    def _elect(self) -> None:
        """Check the connection if this process leads anything, then try for each wanted loop it does
        not lead yet. Raises psycopg.Error if the connection is gone."""
        conn = self._conn
        assert conn is not None
        with self._lock:
            wanted, held = set(self._wanted), set(self._held)
        if held:
            conn.execute("SELECT 1")
        gained = []
        for name in sorted(wanted - held):
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (LOCK_NAMESPACE, lock_key(name))
            ).fetchone()
            if row is not None and row[0] is True:
                gained.append(name)
        if gained:
            with self._lock:
                self._held.update(gained)
            log.info("this process (pid %d) now leads: %s", os.getpid(), ", ".join(gained))

    def _wake(self, channel: str) -> None:
        with self._lock:
            subscribers = list(self._subscribers.get(channel, ()))
        for wake in subscribers:
            wake()

    def _lost(self, exc: BaseException) -> None:
        with self._lock:
            lost, self._held = sorted(self._held), set()
        if lost:
            log.warning(
                "coordination connection lost (%s): no longer leading %s", type(exc).__name__, ", ".join(lost)
            )
        elif not self._down:
            log.warning("coordination connection lost (%s); retrying", type(exc).__name__)
        self._down = True
        self._disconnect()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()  # ends the session: its advisory locks are released at once
