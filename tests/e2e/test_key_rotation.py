"""Key rotation under continuous traffic between two real nodes: each node rotates its signing,
encryption and checkpoint keys with the CLI while both send to each other; every message is
delivered, none refused, every stored message stays readable, and both ledgers verify."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from exchange import crypto
from exchange.client import ExchangeClient
from exchange.demo import exchange_cli
from exchange.errors import ExchangeError
from exchange.keys.announcement import unverified_key_set
from exchange.transport.peer import client_ssl_context
from tests.e2e.harness import Running, start_nodes
from tests.e2e.test_reliability import statuses
from tests.support import PASSPHRASE, rfi

pytestmark = pytest.mark.e2e

FROM_MY = {"classification": {"scheme": "ARAHAN", "level": "SULIT"}}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Running]]:
    yield from start_nodes(
        tmp_path_factory,
        options={
            "key_refresh_seconds": 0.2,
            "key_destroy_grace_seconds": 0.5,  # old encryption keys destroyed during the test
            "key_maintenance_interval_seconds": 0.3,
        },
    )


class Traffic(threading.Thread):
    """Submits a message every few milliseconds until stopped; keeps every id and every error."""

    def __init__(self, api: ExchangeClient, body: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.api, self.body = api, body
        self.ids: list[str] = []
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.ids.append(self.api.submit(self.body)["id"])
            except (ExchangeError, OSError) as exc:
                self.errors.append(str(exc))
            time.sleep(0.02)


def cli(run: Running, *args: str) -> str:
    return exchange_cli(*args, "--dir", str(run.node.path), env=run.process.env)


def settle(run: Running, ids: list[str], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        found = statuses(run, ids)
        if all(found.get(i) not in (None, "queued", "sent") for i in ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def reasons(run: Running, ids: list[str]) -> dict[str, str]:
    """Each id's status and the reason the node gives for it."""
    engine = run.db()
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text("select id, status, status_reason from messages where id in :ids").bindparams(
                sa.bindparam("ids", expanding=True)
            ),
            {"ids": ids},
        ).all()
    engine.dispose()
    return {str(r.id): f"{r.status}: {r.status_reason}" for r in rows}


def test_rotating_every_key_of_both_nodes_under_traffic_loses_and_refuses_nothing(
    nodes: tuple[Running, Running],
) -> None:
    polri, pdrm = nodes
    with (
        polri.client() as id_api,
        pdrm.client() as my_api,
        polri.client() as id_reader,
        pdrm.client() as my_reader,
    ):
        senders = [Traffic(id_api, rfi()), Traffic(my_api, rfi(**FROM_MY))]
        for t in senders:
            t.start()
        old = {run.node.path.name: cli(run, "keys", "list") for run in nodes}
        for purpose in ("signing", "encryption", "checkpoint"):
            for run in nodes:
                rotated = cli(run, "keys", "rotate", "--purpose", purpose, "--wait", "20")
                assert "acknowledged by" in rotated, rotated
                time.sleep(0.3)
                activated = cli(run, "keys", "activate", "--purpose", purpose, "--wait", "20")
                assert "acknowledged by" in activated, activated
                time.sleep(0.3)
        time.sleep(1.5)  # traffic under the new keys, old encryption keys retired meanwhile
        for t in senders:
            t.halt.set()
            t.join()
        assert [t.errors for t in senders] == [[], []]
        sent = {"ID": senders[0].ids, "MY": senders[1].ids}
        assert len(sent["ID"]) > 50
        assert len(sent["MY"]) > 50
        for run, ids in ((polri, sent["ID"]), (pdrm, sent["MY"])):
            found = settle(run, ids)
            assert {s for s in found.values()} == {"delivered"}, reasons(
                run, [i for i, s in found.items() if s != "delivered"]
            )
        # every stored message stays readable at the receiver, under whatever keys it came
        for reader, ids in ((my_reader, sent["ID"]), (id_reader, sent["MY"])):
            for mid in ids:
                response = reader.request("GET", f"/v1/messages/{mid}/content")
                assert response.status_code == 200, (mid, response.text)
        for run, name in ((polri, "MY"), (pdrm, "ID")):
            engine = run.db()
            with engine.connect() as conn:
                rejected = conn.execute(
                    sa.text("select count(*) from ledger_entries where event = 'envelope.rejected'")
                ).scalar_one()
            engine.dispose()
            assert rejected == 0, f"{run.node.path.name} refused envelopes from {name}"
        for api in (id_reader, my_reader):
            health = api.health()["key_sets"]
            assert health["version"] >= 7
            assert health["partner_version"] >= 7
    for run in nodes:
        listed = cli(run, "keys", "list")
        versions = [int(v) for v in re.findall(r"key set\tversion (\d+)", listed)]
        assert versions[0] >= 7
        assert "NOT YET ACKNOWLEDGED" not in listed
        assert listed != old[run.node.path.name]
        assert "retiring" in listed or "retired" in listed
        out = cli(run, "audit", "verify")
        assert "ledger verified" in out, out


def test_the_node_to_node_key_is_replaced_while_both_nodes_run(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    polri, pdrm = nodes
    node_cert = polri.node.path / "tls" / "node.pem"
    old_pin = crypto.public_key_sha256(node_cert.read_bytes())
    old_files = tmp_path / "old-node.pem", tmp_path / "old-node-key.pem"  # what a thief would hold
    old_files[0].write_bytes(node_cert.read_bytes())
    old_files[1].write_bytes((polri.node.path / "tls" / "node-key.pem").read_bytes())
    assert as_partner(pdrm, old_files) == 200  # the key in use: admitted
    with pytest.raises(ExchangeError, match="no new node key is announced"):
        cli(polri, "keys", "activate", "--purpose", "tls", "--wait", "0")
    rotated = cli(polri, "keys", "rotate", "--purpose", "tls", "--wait", "20")
    assert "acknowledged by MY" in rotated, rotated
    assert crypto.public_key_sha256(node_cert.read_bytes()) == old_pin  # staged, not in use yet
    activated = cli(polri, "keys", "activate", "--purpose", "tls", "--wait", "20")
    assert "acknowledged by MY" in activated, activated
    new_pin = crypto.public_key_sha256(node_cert.read_bytes())
    assert new_pin != old_pin
    with polri.client() as api:  # the partner link has reloaded the certificate: deliveries go on
        ids = [api.submit(rfi())["id"] for _ in range(5)]
        for mid in ids:
            assert api.wait_for_status(mid, "delivered", timeout=30)["status"] == "delivered"
    deadline = time.monotonic() + 30
    while partner_view_of_pins(pdrm) != (new_pin,):  # the old pin dropped after the grace
        assert time.monotonic() < deadline, partner_view_of_pins(pdrm)
        time.sleep(0.3)
    with polri.client() as api:  # and deliveries go on under it
        mid = api.submit(rfi())["id"]
        assert api.wait_for_status(mid, "delivered", timeout=30)["status"] == "delivered"
    new_files = node_cert, polri.node.path / "tls" / "node-key.pem"
    assert as_partner(pdrm, new_files) == 200
    deadline = time.monotonic() + 10  # every process of MY reads the key set within a second
    while (status := as_partner(pdrm, old_files)) != 403:
        assert time.monotonic() < deadline, status
        time.sleep(0.3)


def as_partner(run: Running, files: tuple[Path, Path]) -> int:
    """The status ``run`` answers a partner-node request made with this certificate and key."""
    ctx = client_ssl_context(
        ca_file=run.node.ca, cert_file=files[0], key_file=files[1], key_password=PASSPHRASE
    )
    with httpx.Client(verify=ctx, timeout=10) as client:
        return client.get(f"{run.node.url}/v1/peer/key-sets", params={"after": 0}).status_code


def partner_view_of_pins(run: Running) -> tuple[str, ...]:
    """The node-to-node pins of ID's newest key set, as ``run`` (MY) has stored it."""
    engine = run.db()
    with engine.connect() as conn:
        newest = conn.execute(
            sa.text("select announcement from key_sets where party = 'ID' order by version desc limit 1")
        ).scalar_one()
    engine.dispose()
    return unverified_key_set(newest).tls_pins
