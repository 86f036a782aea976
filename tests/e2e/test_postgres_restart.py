"""PostgreSQL restarted under load: the sender node runs on its own throwaway PostgreSQL cluster
(Debian's ``initdb``/``pg_ctl``, in a temporary directory on a free port; the machine's shared
server is never touched), which the test stops and starts again while a local system submits."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from exchange.client import ExchangeClient
from exchange.demo import free_port
from tests.e2e.harness import Running, start_nodes
from tests.e2e.test_reliability import inbound_order, ledger_verifies, wait_all_delivered
from tests.support import rfi

pytestmark = pytest.mark.e2e


@dataclass
class Cluster:
    """A PostgreSQL cluster of our own: ``stop`` and ``start`` are the fault."""

    bin: Path
    data: Path
    port: int
    log: Path
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), *args], check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self) -> None:
        self.ctl("-D", str(self.data), "-m", "fast", "-w", "stop")


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail(
            "initdb not found under /usr/lib/postgresql/*/bin: apt-get install postgresql (.ci/run does)"
        )
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    bindir = postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="exchange-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pg = Cluster(bindir, root / "data", free_port(), root / "postgres.log", as_user)
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(pg.data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    pg.start()
    try:
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg.ctl("-D", str(pg.data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, cluster: Cluster) -> Iterator[tuple[Running, Running]]:
    yield from start_nodes(
        tmp_path_factory,
        options={"checkpoint_interval_seconds": 1.0, "unavailable_retry_after_seconds": 2},
        db_urls=(cluster.url, None),
    )


@dataclass
class Load:
    """A local system submitting without pause; each message has its Idempotency-Key and is retried
    with it after a 503 or a dropped connection, as an integrator would."""

    client: ExchangeClient
    accepted: dict[str, str] = field(default_factory=dict)  # key -> message id
    unavailable: list[httpx.Response] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            key = str(uuid.uuid4())
            while True:
                try:
                    r = self.client.request(
                        "POST", "/v1/messages", json=rfi(), headers={"Idempotency-Key": key}
                    )
                except httpx.HTTPError as exc:
                    self.unexpected.append(f"{type(exc).__name__}: {exc}")
                    time.sleep(0.1)
                    continue
                if r.status_code == 202:
                    self.accepted[key] = r.json()["id"]
                    break
                if r.status_code == 503:
                    self.unavailable.append(r)
                    time.sleep(0.2)
                    continue
                self.unexpected.append(f"HTTP {r.status_code}: {r.text[:200]}")
                return


def test_a_postgresql_restart_under_load_answers_503_loses_nothing_and_recovers_by_itself(
    nodes: tuple[Running, Running], cluster: Cluster
) -> None:
    polri, pdrm = nodes
    with polri.client() as api:
        load = Load(api)
        thread = threading.Thread(target=load.run)
        thread.start()
        try:
            time.sleep(1.5)
            before = len(load.accepted)
            log_offset = len((polri.node.path / "node.log").read_text())
            cluster.stop()
            time.sleep(3.0)
            during = len(load.accepted) - before
            cluster.start()
            restarted = time.monotonic()
            while len(load.accepted) < before + during + 20:  # submissions flow again, unaided
                assert time.monotonic() - restarted < 20, "the node did not recover by itself"
                time.sleep(0.05)
            recovered = time.monotonic() - restarted
        finally:
            load.stop.set()
            thread.join(timeout=30)
    assert load.unexpected == []
    assert before > 0
    assert load.unavailable, "no submission met the outage"
    for r in load.unavailable:
        assert r.headers["content-type"] == "application/problem+json"
        assert r.headers["retry-after"] == "2"
        assert r.json()["status"] == 503
        assert r.json()["type"].endswith("/database-unavailable")
    ids = list(load.accepted.values())
    assert len(set(ids)) == len(ids)  # one message per key, retries included
    wait_all_delivered(polri, ids, timeout=60)
    assert sorted(inbound_order(pdrm, ids)) == sorted(ids)  # each delivered exactly once
    log = (polri.node.path / "node.log").read_text()[log_offset:]
    assert "Traceback" not in log
    conditions = [line for line in log.splitlines() if "database" in line and "unavailable (" in line]
    assert 1 <= len(conditions) <= 2  # the condition, not a line per request
    print(
        f"\n[postgres restart] {len(ids)} accepted, {len(load.unavailable)} answers 503 during a 3 s"
        f" outage; submissions flowing {recovered:.1f}s after PostgreSQL started"
    )
    for run in (polri, pdrm):
        ledger_verifies(run)
