"""One node as several processes on one PostgreSQL, for real: each background loop led by exactly one
process (advisory locks), leadership moving within seconds when the leader is SIGKILLed, submissions
delivered at once in and across processes (LISTEN/NOTIFY) with the poll set to 30 s, and a kill
mid-stream that loses, duplicates and forks nothing."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import tomli_w

from exchange.client import ExchangeClient
from exchange.db.coordination import LOCK_NAMESPACE, lock_key
from exchange.demo import NodeProcess
from exchange.errors import TransportError
from tests.conftest import PG_ADMIN_URL
from tests.e2e.harness import Running, start_nodes
from tests.e2e.test_reliability import inbound_order, ledger_verifies, statuses, wait_all_delivered
from tests.support import cli, register_client, rfi

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

POLL = 30.0  # the fallback poll: any delivery faster than this was woken, not polled
LOOPS = ("delivery", "checkpointer", "retention", "deadlines")


@dataclass
class Node:
    """One node of the test: its first process (the harness's) and a second one on another port."""

    run: Running
    second: NodeProcess
    second_port: int

    def processes(self) -> dict[int, NodeProcess]:
        found = {p.process.pid: p for p in (self.run.process, self.second) if p.process is not None}
        return {pid: p for pid, p in found.items() if p.process is not None and p.process.poll() is None}

    def port_of(self, process: NodeProcess) -> int:
        return self.second_port if process is self.second else self.run.node.port


def pg_databases(postgres_admin: sa.Engine, n: int) -> list[str]:
    names = [f"exchange_test_{uuid.uuid4().hex[:12]}" for _ in range(n)]
    with postgres_admin.connect() as conn:
        for name in names:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    return names


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, postgres_admin: sa.Engine) -> Iterator[tuple[Node, Node]]:
    names = pg_databases(postgres_admin, 2)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    both = start_nodes(
        tmp_path_factory,
        options={
            "delivery_poll_seconds": POLL,
            "checkpoint_interval_seconds": 0.05,  # the interval at which processes used to race
            "delivery_lease_seconds": 60.0,
            "client_cache_seconds": 3600.0,  # a change must reach the processes by NOTIFY
            "agreement_refresh_seconds": 3600.0,  # an installed agreement version, likewise
        },
        db_urls=(f"{base}/{names[0]}", f"{base}/{names[1]}"),
    )
    try:
        polri, pdrm = next(both)
        seconds = [run.start_process("second") for run in (polri, pdrm)]
        try:
            yield Node(polri, *seconds[0]), Node(pdrm, *seconds[1])
        finally:
            for process, _port in seconds:
                process.stop()
    finally:
        both.close()
        with postgres_admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def leaders(run: Running) -> dict[str, int]:
    """Loop name -> pid of the process holding its advisory lock (from the lock's session name)."""
    engine = run.db()
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "select l.objid, a.application_name from pg_locks l join pg_stat_activity a on a.pid = l.pid"
                " where l.locktype = 'advisory' and l.granted and l.classid = :ns"
                " and l.database = (select oid from pg_database where datname = current_database())"
            ),
            {"ns": LOCK_NAMESPACE},
        ).all()
    engine.dispose()
    by_key = {int(r.objid): int(str(r.application_name).rsplit(" ", 1)[1]) for r in rows}
    return {name: by_key[key] for name in LOOPS if (key := lock_key(name) & 0xFFFFFFFF) in by_key}


def wait_for_leaders(node: Node, timeout: float) -> dict[str, int]:
    """Every loop led by a live process of the node; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = leaders(node.run)
        if set(found) == set(LOOPS) and set(found.values()) <= set(node.processes()):
            return found
        assert time.monotonic() < deadline, f"loops not all led by live processes: {found}"
        time.sleep(0.05)


def delivered_within(run: Running, message_id: str, timeout: float) -> float:
    start = time.monotonic()
    while statuses(run, [message_id]).get(message_id) != "delivered":
        assert time.monotonic() - start < timeout, f"not delivered within {timeout}s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_each_loop_is_led_by_exactly_one_process(nodes: tuple[Node, Node]) -> None:
    for node in nodes:
        found = wait_for_leaders(node, 10)
        assert len(set(found.values())) == 1  # the first process to start took them all


@pytest.mark.parametrize("where", ["the leader", "the other process"])
def test_a_submission_is_delivered_at_once_not_at_the_next_poll(nodes: tuple[Node, Node], where: str) -> None:
    polri, _ = nodes
    leader = wait_for_leaders(polri, 10)["delivery"]
    process = next(p for pid, p in polri.processes().items() if (pid == leader) == (where == "the leader"))
    with polri.run.client(port=polri.port_of(process)) as api:
        delivered_within(polri.run, api.submit(rfi())["id"], POLL / 3)  # warm connections
        took = [delivered_within(polri.run, api.submit(rfi())["id"], POLL / 3) for _ in range(5)]
    print(f"\n[latency, submitted to {where}] submit to receipt (ms): {[round(t * 1000) for t in took]}")
    assert max(took) < 1.0  # woken in process, or by NOTIFY across processes; the poll is 30 s


def test_a_removed_client_is_refused_by_every_process_within_moments(nodes: tuple[Node, Node]) -> None:
    """Each process keeps a registration it read (client_cache_seconds: an hour in this module); the
    CLI's removal notifies both processes, which refuse the client within moments, on the
    connections already open too."""
    polri, _ = nodes
    files = register_client(polri.run.node, "short-lived", "TERBATAS")
    apis = [polri.run.client(files, port=polri.port_of(p)) for p in polri.processes().values()]
    assert len(apis) == 2
    try:
        for api in apis:
            assert api.request("GET", "/v1/inbox").status_code == 200  # read and kept
        cli("clients", "remove", "--dir", str(polri.run.node.path), "--id", "short-lived")
        removed = time.monotonic()
        for api in apis:
            while (refused := api.request("GET", "/v1/inbox")).status_code == 200:
                assert time.monotonic() - removed < 1.0, "a process still admits a removed client"
                time.sleep(0.005)
            assert refused.status_code == 403
            assert refused.headers["content-type"] == "application/problem+json"
        print(
            f"\n[client removal] refused by both processes after {1000 * (time.monotonic() - removed):.0f} ms"
        )
    finally:
        for api in apis:
            api.close()


def test_an_installed_agreement_version_reaches_every_process_of_both_nodes_without_a_restart(
    nodes: tuple[Node, Node], tmp_path: Path
) -> None:
    """``exchange agreement install`` on each node while both run as two processes: every process
    holds the new version within moments (NOTIFY: the poll is an hour here), sends under it from its
    effective_from, and a purpose only it defines is accepted through either process and delivered."""
    polri, pdrm = nodes
    data = tomllib.loads((polri.run.node.path / "agreement.toml").read_text())
    first, version = data["version"], f"v-{uuid.uuid4().hex[:8]}"
    effective = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=8)  # the held check has 2 s of these
    data.update(version=version, effective_from=effective.isoformat())
    data["purposes"]["VICTIM_SUPPORT"] = "support of an identified victim"
    data["message_types"]["REQUEST_FOR_INFORMATION"]["purposes"].append("VICTIM_SUPPORT")
    path = tmp_path / "agreement-next.toml"
    path.write_text(tomli_w.dumps(data))
    for node in nodes:
        cli("agreement", "install", "--dir", str(node.run.node.path), str(path))
    installed = time.monotonic()
    apis = [
        (node, node.run.client(port=node.port_of(p)))
        for node in (polri, pdrm)
        for p in node.processes().values()
    ]
    assert len(apis) == 4
    try:
        for _node, api in apis:
            while version not in (seen := api.health()["agreement"])["held"]:
                assert time.monotonic() - installed < 2.0, "a process does not hold the installed version"
                time.sleep(0.01)
            assert seen["version"] == first  # held, not yet in force
        took = 1000 * (time.monotonic() - installed)
        print(f"\n[agreement install] held by all four processes after {took:.0f} ms")
        time.sleep(max(0.0, (effective - dt.datetime.now(dt.UTC)).total_seconds()))
        for node, api in apis:
            assert api.health()["agreement"]["version"] == version
            if node is polri:
                sent = api.submit(rfi(purposes=["VICTIM_SUPPORT"]))["id"]
                api.wait_for_status(sent, "delivered", 30)
    finally:
        for _node, api in apis:
            api.close()
    for node in nodes:
        assert node.run.log_problems() == []


@dataclass
class Stream:
    """A local system submitting to both processes in turn; each message has its Idempotency-Key
    and is retried with it on the other process when the connection fails, as behind a balancer."""

    clients: list[ExchangeClient]
    total: int
    accepted: dict[str, str] = field(default_factory=dict)  # key -> message id
    retried: int = 0
    unexpected: list[str] = field(default_factory=list)

    def run(self) -> None:
        turn = 0
        for _ in range(self.total):
            key = str(uuid.uuid4())
            for _attempt in range(20):
                turn += 1
                api = self.clients[turn % len(self.clients)]
                try:
                    r = api.request("POST", "/v1/messages", json=rfi(), headers={"Idempotency-Key": key})
                except httpx.HTTPError:
                    self.retried += 1
                    continue
                if r.status_code == 202:
                    self.accepted[key] = r.json()["id"]
                else:
                    self.unexpected.append(f"HTTP {r.status_code}: {r.text[:200]}")
                break
            time.sleep(0.01)


def inbox_ids(node: Node) -> list[str]:
    """Every id in the local system's inbox, pulled page by page from both processes in turn."""
    ports = [node.run.node.port, node.second_port]
    ids: list[str] = []
    cursor, turn = 0, 0
    while True:
        with node.run.client(port=ports[turn % 2]) as api:
            page = api.inbox(after=cursor, limit=37)["items"]
        turn += 1
        if not page:
            return ids
        ids += [str(i["id"]) for i in page]
        cursor = page[-1]["cursor"]


def ledger_events(run: Running, event: str) -> list[str | None]:
    engine = run.db()
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select message_id from ledger_entries where event = :e"), {"e": event}
        ).all()
    engine.dispose()
    return [r.message_id for r in rows]


def test_leadership_moves_within_seconds_when_the_leader_is_killed(nodes: tuple[Node, Node]) -> None:
    polri, _ = nodes
    old = wait_for_leaders(polri, 10)["delivery"]
    victim = polri.processes()[old]
    victim.kill()
    killed = time.monotonic()
    found = wait_for_leaders(polri, 10)
    took = time.monotonic() - killed
    print(f"\n[failover] every loop led again {took:.2f}s after the leader was killed")
    assert old not in found.values()
    assert took < 5.0
    with polri.run.client(port=polri.second_port if victim is polri.run.process else None) as api:
        assert delivered_within(polri.run, api.submit(rfi())["id"], 5) < 1.0  # the new leader delivers
    victim.start()
    victim.wait_ready()


def test_a_process_killed_mid_stream_loses_duplicates_and_forks_nothing(nodes: tuple[Node, Node]) -> None:
    polri, pdrm = nodes
    leader = wait_for_leaders(polri, 10)["delivery"]
    victim = polri.processes()[leader]
    clients = [polri.run.client(), polri.run.client(port=polri.second_port)]
    stream = Stream(clients, total=160)
    thread = threading.Thread(target=stream.run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(stream.accepted) < 50:  # kill mid-stream, while deliveries are flowing
            assert time.monotonic() < deadline, "the stream stalled"
            assert thread.is_alive()
            time.sleep(0.01)
        victim.kill()
        thread.join(timeout=120)
    finally:
        for c in clients:
            c.close()
    assert not thread.is_alive()
    assert stream.unexpected == []
    ids = list(stream.accepted.values())
    assert len(ids) == len(set(ids)) == 160  # one message per key, retries included
    victim.start()  # as systemd would; the partner's deliveries to this port resume
    victim.wait_ready()
    wait_all_delivered(polri.run, ids, timeout=60)
    assert sorted(inbound_order(pdrm.run, ids)) == sorted(ids)  # each stored exactly once
    wanted = set(ids)
    assert sorted(i for i in inbox_ids(pdrm) if i in wanted) == sorted(ids)  # each in the inbox exactly once
    sent = ledger_events(polri.run, "message.sent")
    assert all(sent.count(i) == 1 for i in ids)  # ledgered as sent once, whoever delivered it
    for node in nodes:
        assert ledger_events(node.run, "checkpoint.incident") == []  # no false rollback
        ledger_verifies(node.run)  # no gap, no fork: tree, checkpoints, cosignatures
        assert node.run.log_problems() == []
    print(f"\n[kill mid-stream] 160 accepted ({stream.retried} retried elsewhere), each delivered once")


def children(pid: int) -> set[int]:
    """The worker processes of the uvicorn supervisor ``pid`` (not multiprocessing's helpers)."""
    found = set()
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(int(child))
    return found


@pytest.fixture(scope="module")
def workers(
    tmp_path_factory: pytest.TempPathFactory, postgres_admin: sa.Engine
) -> Iterator[tuple[Running, Running]]:
    names = pg_databases(postgres_admin, 2)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    both = start_nodes(
        tmp_path_factory,
        options={"delivery_poll_seconds": POLL},
        db_urls=(f"{base}/{names[0]}", f"{base}/{names[1]}"),
        serve_args=("--workers", "2"),
    )
    try:
        yield next(both)
    finally:
        both.close()
        with postgres_admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_serve_with_two_workers_replaces_a_killed_worker_and_its_leadership(
    workers: tuple[Running, Running],
) -> None:
    """``exchange serve --workers 2`` on PostgreSQL, both nodes."""
    polri, pdrm = workers
    assert polri.process.process is not None
    parent = polri.process.process.pid
    node = Node(polri, polri.process, polri.node.port)
    deadline = time.monotonic() + 30
    while len(children(parent)) < 2 or set(leaders(polri)) != set(LOOPS):
        assert time.monotonic() < deadline, "two workers did not start, or a loop is not led"
        time.sleep(0.1)
    found = leaders(polri)
    assert set(found.values()) <= children(parent)
    with polri.client() as api:
        assert delivered_within(polri, api.submit(rfi())["id"], 10) < POLL / 3
        os.kill(found["delivery"], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while found["delivery"] in leaders(polri).values() or set(leaders(polri)) != set(LOOPS):
            assert time.monotonic() < deadline, "leadership did not move"
            time.sleep(0.05)
        ids = []
        for _ in range(10):  # one of the two connections may have been to the killed worker
            with contextlib.suppress(TransportError, httpx.HTTPError):
                ids.append(api.submit(rfi())["id"])
        wait_all_delivered(polri, ids, timeout=10)
    deadline = time.monotonic() + 30
    while len(children(parent)) < 2:  # uvicorn replaced the dead worker
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(0.1)
    assert sorted(inbound_order(pdrm, ids)) == sorted(ids)
    assert node.run.log_problems() == []


def test_an_agreement_change_reaches_every_worker_on_sighup_without_stopping_the_node(
    workers: tuple[Running, Running],
) -> None:
    """``systemctl reload`` (SIGHUP): uvicorn replaces each worker in turn, the new one serving before
    the old one retires; each new worker loads the changed agreement file."""
    version = f"test-{uuid.uuid4().hex[:8]}"
    for run in workers:
        path = run.node.path / "agreement.toml"
        path.write_text(tomli_w.dumps({**tomllib.loads(path.read_text()), "version": version}))
    for run in workers:
        assert run.process.process is not None
        parent = run.process.process.pid
        old = children(parent)
        os.kill(parent, signal.SIGHUP)
        deadline = time.monotonic() + 90
        while len(now := children(parent)) != 2 or now & old:
            assert time.monotonic() < deadline, "the workers were not all replaced"
            time.sleep(0.1)
        with run.client() as api:
            assert api.health()["agreement"]["version"] == version
    polri, _ = workers
    with polri.client() as api:
        sent = api.submit(rfi())["id"]
        api.wait_for_status(sent, "delivered", 30)  # both nodes hold the changed agreement
    for run in workers:
        assert run.log_problems() == []


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, is not running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_the_workers_stop_when_their_supervisor_is_killed(
    tmp_path_factory: pytest.TempPathFactory, postgres_admin: sa.Engine
) -> None:
    """SIGKILL leaves uvicorn's supervisor no chance to stop its workers: the kernel does
    (PR_SET_PDEATHSIG), so none is left serving the port, leading a loop or holding connections."""
    names = pg_databases(postgres_admin, 2)
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    both = start_nodes(
        tmp_path_factory, db_urls=(f"{base}/{names[0]}", f"{base}/{names[1]}"), serve_args=("--workers", "2")
    )
    found: set[int] = set()
    try:
        polri, _ = next(both)
        assert polri.process.process is not None
        supervisor = polri.process.process.pid
        deadline = time.monotonic() + 30
        while len(found := children(supervisor)) < 2 or set(leaders(polri)) != set(LOOPS):
            assert time.monotonic() < deadline, "two workers did not start, or a loop is not led"
            time.sleep(0.1)
        os.kill(supervisor, signal.SIGKILL)
        polri.process.process.wait()
        deadline = time.monotonic() + 30
        while alive := {pid for pid in found if _alive(pid)}:
            assert time.monotonic() < deadline, f"workers {alive} outlived their supervisor"
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while leaders(polri):  # their leaderships went with them
            assert time.monotonic() < deadline, "a loop is still led"
            time.sleep(0.1)
    finally:
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        both.close()
        with postgres_admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
