"""The registered local systems by certificate fingerprint, as every API request asks for them.

Guarantees:

- a registration is read from the database at most ``ttl`` seconds before it is used (``ttl`` 0:
  read on every request); the overlap of a replaced certificate (``previous_until``) is judged at
  each use;
- on PostgreSQL, a change to the clients table committed by any process (``exchange clients add``,
  ``remove``, ``renew``) notifies every process of the node (NOTIFY ``exchange_clients``); each
  forgets every registration it holds when the notification arrives, and when its coordination
  connection comes back (a notification may have been missed meanwhile);
- a lookup that read the table before such a notification arrived is not kept (a generation
  counter), so a read that raced a removal never brings the removed client back;
- an unknown fingerprint is never kept: a system registered a moment ago is admitted at once.

So a removed or replaced certificate is refused within milliseconds on PostgreSQL, and within
``ttl`` on SQLite (one process per node, which the CLI cannot notify).
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import time
from collections.abc import Callable
from typing import Any

from exchange.db import repo
from exchange.db.engine import Database


class Unread(enum.Enum):
    """:meth:`ClientDirectory.held`'s answer when the registration must be read."""

    UNREAD = "unread"


UNREAD = Unread.UNREAD


class ClientDirectory:
    """A per-process cache of ``repo.client_by_fingerprint`` (see the module docstring)."""

    def __init__(self, db: Database, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._generation = 0
        self._rows: dict[str, tuple[float, list[dict[str, Any]]]] = {}  # fingerprint -> (read at, rows)

    def held(self, fingerprint: str, now: dt.datetime) -> dict[str, Any] | Unread | None:
        """What :meth:`lookup` would answer, without reading the database: ``UNREAD`` when the
        registration is not held (or is older than ``ttl``) and must be read."""
        with self._lock:
            cached = self._rows.get(fingerprint)
        if cached is not None and self.clock() - cached[0] < self.ttl:
            return repo.holder_at(cached[1], fingerprint, now)
        return UNREAD

    def lookup(self, fingerprint: str, now: dt.datetime) -> dict[str, Any] | None:
        """The client holding this certificate at ``now`` (``repo.client_by_fingerprint``).

        Raises:
            DatabaseUnavailable: the registration had to be read and the database is unreachable.
        """
        with self._lock:
            cached = self._rows.get(fingerprint)
            generation = self._generation
        read_at = self.clock()
        if cached is not None and read_at - cached[0] < self.ttl:
            return repo.holder_at(cached[1], fingerprint, now)
        with self.db.read() as conn:
            rows = repo.clients_by_fingerprint(conn, fingerprint)
        if rows and self.ttl > 0:
            with self._lock:
                if self._generation == generation:
                    self._rows[fingerprint] = (read_at, rows)
        return repo.holder_at(rows, fingerprint, now)

    def forget(self) -> None:
        """Drop every registration held: the clients table changed, or may have."""
        with self._lock:
            self._generation += 1
            self._rows.clear()
