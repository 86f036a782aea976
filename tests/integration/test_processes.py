"""Several processes of one node on one database, in one test process: leadership by advisory lock
(exclusive, handed over on close, lost with the connection), wake-ups by NOTIFY, checkpoints that
two signers cannot duplicate nor a deposed one send out of order, the bounded ledger verification,
and ``serve --workers`` refused on SQLite."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from exchange.auditing import AuditService
from exchange.checkpoints import CheckpointService, WitnessRequest
from exchange.db import engine as engine_module
from exchange.db import repo
from exchange.db.coordination import LEDGER_CHANNEL, OUTBOX_CHANNEL, PostgresCoordination, notify
from exchange.db.engine import Database, before_commit, normalise_url
from exchange.errors import Busy, DatabaseUnavailable
from exchange.node import Node
from exchange.transport.checkpointer import Checkpointer
from exchange.transport.peer import WitnessAnswer
from tests.integration.test_node_flow import Loopback
from tests.integration.test_witnessing import grow, incidents
from tests.support import make_pair

RETRY = 0.2


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> float:
    """Seconds until ``check()`` holds; fails the test after ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
def pg_url(make_pg_database: Callable[[], str]) -> str:
    return make_pg_database()


@pytest.fixture
def two(pg_url: str) -> Iterator[tuple[PostgresCoordination, PostgresCoordination]]:
    a = PostgresCoordination(pg_url, retry_seconds=RETRY, label="exchange test")
    b = PostgresCoordination(pg_url, retry_seconds=RETRY, label="exchange test")
    for c in (a, b):
        c.want("delivery")
        c.want("checkpointer")
    a.start()
    eventually(lambda: a.leads("delivery") and a.leads("checkpointer"))
    b.start()
    yield a, b
    for c in (a, b):
        c.close()


@pytest.mark.postgres
def test_one_process_leads_each_loop_and_a_successor_takes_over_when_it_closes(
    two: tuple[PostgresCoordination, PostgresCoordination],
) -> None:
    a, b = two
    time.sleep(RETRY * 3)  # b tried several times
    assert not b.leads("delivery")
    assert not b.leads("checkpointer")
    a.close()
    took = eventually(lambda: b.leads("delivery") and b.leads("checkpointer"))
    assert took < RETRY * 5


@pytest.mark.postgres
def test_a_leader_whose_connection_is_killed_loses_the_leadership_and_another_takes_it(
    two: tuple[PostgresCoordination, PostgresCoordination], pg_url: str
) -> None:
    a, b = two
    engine = sa.create_engine(normalise_url(pg_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:  # what a network cut or a server-side kill does to the session
        conn.execute(
            sa.text(
                "select pg_terminate_backend(pid) from pg_stat_activity"
                " where application_name = :name"
                " and pid in (select pid from pg_locks where locktype = 'advisory')"
            ),
            {"name": f"exchange test pid {os.getpid()}"},
        )
    engine.dispose()
    eventually(lambda: not a.leads("delivery") or b.leads("delivery"))
    eventually(lambda: b.leads("delivery") != a.leads("delivery"))  # exactly one leads again
    time.sleep(RETRY * 3)
    assert a.leads("delivery") != b.leads("delivery")


@pytest.mark.postgres
def test_a_notification_wakes_the_subscribers_of_its_channel_in_every_process(
    two: tuple[PostgresCoordination, PostgresCoordination], pg_url: str
) -> None:
    a, b = two
    woken: list[tuple[str, str]] = []
    for name, c in (("a", a), ("b", b)):
        c.subscribe(OUTBOX_CHANNEL, lambda n=name: woken.append((n, "outbox")))  # type: ignore[misc]
        c.subscribe(LEDGER_CHANNEL, lambda n=name: woken.append((n, "ledger")))  # type: ignore[misc]
    time.sleep(RETRY * 2)
    woken.clear()
    db = Database(pg_url)
    with db.transaction() as conn:
        notify(conn, OUTBOX_CHANNEL)
        notify(conn, OUTBOX_CHANNEL)
        time.sleep(RETRY * 2)
        assert woken == []  # delivered on commit, not before
    took = eventually(lambda: {("a", "outbox"), ("b", "outbox")} <= set(woken), timeout=2)
    assert ("a", "ledger") not in woken
    assert took < 0.5  # a wake-up, not a poll
    woken.clear()
    with contextlib.suppress(RuntimeError), db.transaction() as conn:
        notify(conn, LEDGER_CHANNEL)
        raise RuntimeError("rolled back")
    with db.transaction() as conn:  # the same pooled connection: nothing of the rollback is left
        notify(conn, OUTBOX_CHANNEL)
    eventually(lambda: {("a", "outbox"), ("b", "outbox")} <= set(woken), timeout=2)
    time.sleep(RETRY * 2)
    assert ("a", "ledger") not in woken
    with db.transaction() as conn:  # two channels in one transaction: both woken
        notify(conn, LEDGER_CHANNEL)
        notify(conn, OUTBOX_CHANNEL)
    eventually(lambda: {("a", "ledger"), ("b", "ledger")} <= set(woken), timeout=2)
    db.dispose()


@pytest.mark.postgres
def test_a_pooled_connection_is_pinged_only_after_idling_and_a_dead_one_replaced(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load a pooled connection goes back to work unpinged (no extra round trip); after
    idling it is pinged first, so one the server dropped meanwhile is replaced, not failed on."""
    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 0.3)
    db = Database(pg_url)
    pings: list[object] = []
    ping = db.engine.dialect.do_ping

    def counted(dbapi_conn: Any) -> bool:
        pings.append(dbapi_conn)
        return ping(dbapi_conn)

    monkeypatch.setattr(db.engine.dialect, "do_ping", counted)

    def backend() -> int:
        with db.read() as conn:
            return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())

    first = backend()
    assert backend() == first  # the same connection back from the pool at once...
    assert pings == []  # ...not pinged
    admin = sa.create_engine(normalise_url(pg_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    admin.dispose()
    time.sleep(0.5)
    second = backend()  # pinged after idling, found dead, replaced: no error
    assert second != first
    assert len(pings) == 1
    db.dispose()


@pytest.mark.postgres
def test_a_connection_lost_inside_a_transaction_is_unavailability_and_the_next_one_works(
    pg_url: str,
) -> None:
    """A restart or a dropped connection in the middle of a unit of work raises DatabaseUnavailable
    (answered 503, logged once), never another error raised while cleaning up after it."""
    db = Database(pg_url)
    admin = sa.create_engine(normalise_url(pg_url), isolation_level="AUTOCOMMIT")

    def lost_midway() -> None:
        with db.transaction() as conn:
            notify(conn, OUTBOX_CHANNEL)  # something asked for before the commit
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
            with admin.connect() as other:
                other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            conn.execute(sa.text("SELECT 1"))

    with pytest.raises(DatabaseUnavailable):
        lost_midway()
    admin.dispose()
    with db.transaction() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    db.dispose()


@pytest.mark.postgres
def test_a_connection_lost_just_before_the_commit_is_unavailability_and_the_next_one_works(
    pg_url: str,
) -> None:
    """What a transaction does just before it commits goes in one round trip (psycopg's pipeline
    mode), whose errors arise outside SQLAlchemy's execute: a connection lost there is still
    DatabaseUnavailable, and the pool hands out a sound connection next."""
    db = Database(pg_url)
    admin = sa.create_engine(normalise_url(pg_url), isolation_level="AUTOCOMMIT")

    def terminate_self(conn: sa.Connection) -> None:
        conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))

    def lost_before_commit(sent: bool) -> None:
        with db.transaction() as conn:
            notify(conn, OUTBOX_CHANNEL)  # pipelined, after the connection is gone
            if sent:  # the server goes while the pipelined statements are in flight
                before_commit(conn, "zz", terminate_self)
            else:  # the server went before they were sent
                pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
                with admin.connect() as other:
                    other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})

    def pooled() -> set[int]:  # the backends of two connections, back in the pool afterwards
        with db.engine.connect() as one, db.engine.connect() as two:
            return {int(c.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()) for c in (one, two)}

    for sent in (True, False, True):
        before = pooled()
        with pytest.raises(DatabaseUnavailable):
            lost_before_commit(sent)
        assert not before & pooled()  # the pool replaced all its connections, not only the lost one
        with db.transaction() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    admin.dispose()
    db.dispose()


def test_concurrent_signers_sign_each_size_once(node_pair: tuple[Node, Node]) -> None:
    id_node, _ = node_pair
    second = Node(id_node.settings)  # another process of the node: its own engine and committer
    errors: list[BaseException] = []
    stop = threading.Event()

    def sign(node: Node) -> None:
        service = CheckpointService(node)
        while not stop.is_set():
            try:
                service.sign_latest(dt.datetime.now(dt.UTC))
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=sign, args=(n,)) for n in (id_node, second, id_node, second)]
    for t in threads:
        t.start()
    try:
        for _ in range(40):
            grow(id_node, 1)
            time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join()
        second.close()
    assert errors == []  # no duplicate key
    with id_node.db.read() as conn:
        sizes = [int(r["size"]) for r in repo.all_checkpoints(conn)]
    assert sizes == sorted(set(sizes))
    assert sizes[-1] == 40


class Overtaken(CheckpointService):
    """A checkpointer's service in a process that is overtaken between choosing its checkpoint and
    sending it: another process signs a larger one and has it cosigned in between."""

    def __init__(self, node: Node, other: Checkpointer) -> None:
        super().__init__(node)
        self.other = other

    def to_witness(self, from_size: int | None = None, witness: str | None = None) -> WitnessRequest | None:
        request = super().to_witness(from_size, witness)
        grow(self.node, 3)
        assert self.other.run_once() is not None  # cosigned: a larger size than ``request``
        return request


class Counting(Loopback):
    def __init__(self, partner: Node) -> None:
        super().__init__(partner)
        self.witnessed: list[int] = []

    def witness(self, request: WitnessRequest) -> WitnessAnswer:
        self.witnessed.append(request.size)
        return super().witness(request)


def test_a_checkpoint_overtaken_before_it_is_sent_is_not_sent(node_pair: tuple[Node, Node]) -> None:
    id_node, my_node = node_pair
    grow(id_node, 5)
    other = Checkpointer(CheckpointService(id_node), Loopback(my_node), 1)
    transport = Counting(my_node)
    overtaken = Checkpointer(Overtaken(id_node, other), transport, 1)
    assert overtaken.run_once() is None
    assert transport.witnessed == []  # the smaller checkpoint never left
    assert incidents(my_node) == []  # so the partner saw no rollback
    assert incidents(id_node) == []


def test_the_apis_ledger_verification_is_bounded_and_answers_busy_when_saturated(
    node_pair: tuple[Node, Node],
) -> None:
    id_node, _ = node_pair
    grow(id_node, 3)
    service = AuditService(id_node.db, id_node.agreement, id_node.party, concurrent=1, workers=2)
    try:
        assert service.verify().entries == 3
        assert service._slots is not None
        service._slots.acquire()  # a verification in progress
        with pytest.raises(Busy):
            service.verify()
        service._slots.release()
        assert service.verify().entries == 3
    finally:
        service.close()


def test_several_workers_are_refused_on_sqlite_in_one_line(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "exchange", "serve", "--workers", "2", "--dir", str(id_dir.path)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --workers 2 needs PostgreSQL")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_worker_whose_supervisor_is_already_gone_does_not_start() -> None:
    """The supervisor may die between spawning a worker and the worker's PR_SET_PDEATHSIG: the
    worker then finds another parent than the supervisor it was given, and refuses to start."""
    script = (
        "import os, sys\n"
        "from exchange.api.server import SUPERVISOR_VARIABLE, stop_with_supervisor\n"
        "from exchange.errors import ConfigurationError\n"
        "os.environ[SUPERVISOR_VARIABLE] = sys.argv[1]\n"
        "try:\n"
        "    stop_with_supervisor()\n"
        "except ConfigurationError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('started')\n"
    )
    here = os.getpid()  # the child's real parent
    for supervisor, expected in ((here, "started"), (here + 1_000_000, "refused: the supervisor")):
        out = subprocess.run(
            [sys.executable, "-c", script, str(supervisor)], capture_output=True, text=True, check=True
        ).stdout
        assert out.startswith(expected), out
