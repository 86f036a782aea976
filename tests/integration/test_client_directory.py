"""The registered clients as every request looks them up: read at most ``ttl`` before use, never
kept when unknown, the overlap of a replaced certificate judged at each use, forgotten on a change
(NOTIFY from another process on PostgreSQL), and never brought back by a read that raced a change."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa

from exchange import crypto
from exchange.config import load_settings
from exchange.db import repo
from exchange.db.client_directory import UNREAD, ClientDirectory
from exchange.db.coordination import CLIENTS_CHANNEL, PostgresCoordination
from exchange.db.engine import Database
from exchange.node import Node
from exchange.policy import Actor
from tests.integration.conftest import Pair
from tests.integration.test_processes import eventually
from tests.support import make_pair

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _fingerprint(nodes: Pair) -> str:
    id_dir = nodes[0]
    return crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint


def _selects(db: Database) -> list[str]:
    """The statements reading the clients table from now on (SQLite reads on its own engine)."""
    statements: list[str] = []
    for engine in {db.engine, db.reader}:
        sa.event.listen(
            engine,
            "before_cursor_execute",
            lambda *a: (
                statements.append(a[2])
                if a[2].lower().startswith("select") and "from clients" in a[2].lower()
                else None
            ),
        )
    return statements


def test_a_registration_is_read_once_within_the_ttl_and_again_after_it(nodes: Pair) -> None:
    node, fingerprint, clock = nodes[2], _fingerprint(nodes), Clock()
    directory = ClientDirectory(node.db, ttl=1.0, clock=clock)
    reads = _selects(node.db)
    first = directory.lookup(fingerprint, NOW)
    assert first is not None
    assert first["id"] == "polri-cms"
    clock.t += 0.9
    assert directory.lookup(fingerprint, NOW) == first
    assert len(reads) == 1
    with node.db.transaction() as conn:
        repo.delete_client(conn, "polri-cms")
    assert directory.lookup(fingerprint, NOW) is not None  # within the ttl (SQLite: no notification)
    clock.t += 0.2
    assert directory.lookup(fingerprint, NOW) is None  # read again: removed
    assert len(reads) == 2


def test_held_answers_as_a_lookup_would_without_reading_or_unread_when_it_must_read(nodes: Pair) -> None:
    """What the API's event loop asks first (the registration is read in a worker thread only when
    this answers UNREAD): never a read, never a registration older than the ttl or forgotten."""
    node, fingerprint, clock = nodes[2], _fingerprint(nodes), Clock()
    directory = ClientDirectory(node.db, ttl=1.0, clock=clock)
    reads = _selects(node.db)
    assert directory.held(fingerprint, NOW) is UNREAD
    looked_up = directory.lookup(fingerprint, NOW)
    assert directory.held(fingerprint, NOW) == looked_up
    assert directory.held(fingerprint, NOW + dt.timedelta(days=1)) == looked_up
    assert directory.held("00" * 32, NOW) is UNREAD  # an unknown certificate is never kept
    clock.t += 1.0
    assert directory.held(fingerprint, NOW) is UNREAD  # as old as the ttl: read again
    directory.lookup(fingerprint, NOW)
    directory.forget()
    assert directory.held(fingerprint, NOW) is UNREAD
    assert len(reads) == 2
    assert ClientDirectory(node.db, ttl=0).held(fingerprint, NOW) is UNREAD  # SQLite's: always read


def test_a_ttl_of_zero_reads_on_every_request(nodes: Pair) -> None:
    node, fingerprint = nodes[2], _fingerprint(nodes)
    directory = ClientDirectory(node.db, ttl=0)
    reads = _selects(node.db)
    for _ in range(3):
        assert directory.lookup(fingerprint, NOW) is not None
    assert len(reads) == 3


def test_an_unknown_certificate_is_not_kept_so_a_new_registration_is_admitted_at_once(nodes: Pair) -> None:
    node, fingerprint = nodes[2], _fingerprint(nodes)
    with node.db.read() as conn:
        row = repo.get_client(conn, "polri-cms")
    assert row is not None
    with node.db.transaction() as conn:
        repo.delete_client(conn, "polri-cms")
    directory = ClientDirectory(node.db, ttl=60)
    assert directory.lookup(fingerprint, NOW) is None
    with node.db.transaction() as conn:
        repo.insert_client(conn, row)
    assert directory.lookup(fingerprint, NOW) is not None


def test_a_replaced_certificate_is_refused_when_its_overlap_ends_though_its_row_is_kept(
    nodes: Pair,
) -> None:
    node, old = nodes[2], _fingerprint(nodes)
    until = NOW + dt.timedelta(minutes=5)
    with node.db.transaction() as conn:
        repo.renew_client_certificate(
            conn, "polri-cms", "ab" * 32, "2027-11-24T00:00:00+00:00", until.isoformat()
        )
    directory = ClientDirectory(node.db, ttl=3600)
    reads = _selects(node.db)
    assert directory.lookup(old, NOW) is not None  # in the overlap
    assert directory.lookup(old, until + dt.timedelta(seconds=1)) is None  # past it, no re-read
    assert directory.held(old, NOW) is not None  # the API's event loop judges it the same way
    assert directory.held(old, until + dt.timedelta(seconds=1)) is None
    assert len(reads) == 1


def test_a_read_that_raced_a_change_is_not_kept(nodes: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notification of a removal arrives while a lookup is reading the row from before it: the
    lookup answers what it read, but the next lookup reads again."""
    node, fingerprint = nodes[2], _fingerprint(nodes)
    directory = ClientDirectory(node.db, ttl=3600)
    reads = _selects(node.db)
    read = node.db.read

    @contextmanager
    def racing_read() -> Iterator[sa.Connection]:
        with read() as conn:
            yield conn
        directory.forget()  # the change's notification, between the read and the keeping

    monkeypatch.setattr(node.db, "read", racing_read)
    assert directory.lookup(fingerprint, NOW) is not None
    monkeypatch.setattr(node.db, "read", read)
    with node.db.transaction() as conn:
        repo.delete_client(conn, "polri-cms")
    assert directory.lookup(fingerprint, NOW) is None
    assert len(reads) == 2


def test_the_node_admits_by_the_directory_which_keeps_nothing_on_sqlite(nodes: Pair) -> None:
    """On SQLite no other process can tell the node of the CLI's changes: it reads every time."""
    node, fingerprint = nodes[2], _fingerprint(nodes)
    assert node.clients.ttl == (node.settings.client_cache_seconds if node.db.dialect == "postgresql" else 0)
    assert node.settings.client_cache_seconds > 0
    assert node.held_actor_for(fingerprint) is UNREAD  # nothing kept: the API reads in a thread
    actor = node.actor_for(fingerprint)
    assert actor is not None
    assert actor.client_id == "polri-cms"
    assert node.actor_for("00" * 32) is None


@pytest.mark.postgres
def test_a_removal_in_another_process_reaches_every_process_at_once_on_postgres(
    tmp_path: Path, make_pg_database: Callable[[], str]
) -> None:
    """Two processes of one node (two Nodes, each with its coordination connection), a registration
    kept for an hour: the CLI's removal (a third connection) is refused by both within moments."""
    url = make_pg_database()
    id_dir, _ = make_pair(tmp_path, (url, None))
    settings = load_settings(id_dir.path).model_copy(update={"client_cache_seconds": 3600.0})
    processes = [Node(settings) for _ in range(2)]
    coordinations = []
    fingerprint = crypto.certificate_info(id_dir.client("polri-cms").cert.read_bytes()).fingerprint
    try:
        for node in processes:
            coordination = PostgresCoordination(url, retry_seconds=0.2, label="exchange test")
            coordination.subscribe(CLIENTS_CHANNEL, node.clients.forget)
            coordination.start()
            coordinations.append(coordination)
            actor = node.actor_for(fingerprint)
            assert actor is not None

            def kept(node: Node = node, actor: Actor = actor) -> bool:
                """Held for the API's event loop after a lookup (the coordination connection forgets
                what its process holds when it connects: a notification may have been missed)."""
                node.actor_for(fingerprint)
                return node.held_actor_for(fingerprint) == actor

            eventually(kept, timeout=3)
        cli = Database(url)
        with cli.transaction() as conn:
            repo.delete_client(conn, "polri-cms")
        cli.dispose()
        for node in processes:
            eventually(lambda node=node: node.held_actor_for(fingerprint) is UNREAD, timeout=3)  # type: ignore[misc]
            assert node.actor_for(fingerprint) is None
    finally:
        for coordination in coordinations:
            coordination.close()
        for node in processes:
            node.close()
