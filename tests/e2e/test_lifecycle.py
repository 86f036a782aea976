"""After delivery, between two real nodes over mutual TLS through the public API: the consent round
trip (refused, asked, granted, released, refused for another recipient, revoked), reclassification,
and return-or-destroy answered 410 with its certificate ledgered by the originator."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from joserfc.jwk import OctKey

from exchange.client import ExchangeClient
from exchange.envelope.at_rest import metadata_digest, open_at_rest
from exchange.errors import ContentUnavailable
from exchange.keys.kek import KekStore
from tests.e2e.harness import Running
from tests.support import PASSPHRASE, register_client, rfi

pytestmark = pytest.mark.e2e


def until(check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def events(node: Running) -> list[str]:
    engine = node.db()
    with engine.connect() as conn:
        found = [r[0] for r in conn.execute(sa.text("select event from ledger_entries order by seq"))]
    engine.dispose()
    return found


def delivered(api: ExchangeClient, message: dict[str, Any]) -> dict[str, Any]:
    return api.wait_for_status(message["id"], "delivered")


def _grant(decider: ExchangeClient, request_id: str, expires: dt.datetime) -> None:
    granted = decider.request(
        "POST",
        f"/v1/consent-requests/{request_id}/decision",
        json={"decision": "GRANTED", "expires_at": expires.isoformat(), "conditions": "red notice only"},
    )
    assert granted.status_code == 200, granted.text


def _ask(reader: ExchangeClient, message_id: str, release: dict[str, Any]) -> str:
    asked = reader.request(
        "POST",
        f"/v1/messages/{message_id}/consent-requests",
        json={**release, "justification": "an Interpol red notice for the recruiter"},
    )
    assert asked.status_code == 201, asked.text
    return str(asked.json()["id"])


@pytest.mark.parametrize("originator", ["ID", "MY"])
def test_consent_round_trip_both_ways(nodes: tuple[Running, Running], originator: str) -> None:
    polri, pdrm = nodes
    origin, receiver = (polri, pdrm) if originator == "ID" else (pdrm, polri)
    clearance = "RAHASIA" if originator == "ID" else "RAHSIA"
    boss = register_client(origin.node, f"{originator.lower()}-supervisor", clearance, "--role", "SUPERVISOR")
    body = rfi(handling_codes=["H2"], case_ref=f"ID-MY/2026/09{originator}")
    if originator == "MY":
        body["classification"] = {"scheme": "ARAHAN", "level": "SULIT"}
    with origin.client() as sender:
        original = sender.submit(body)
        delivered(sender, original)
    release = {"recipient": "INTERPOL", "purposes": ["TIP_INVESTIGATION"]}
    path = f"/v1/messages/{original['id']}/releases"
    with receiver.client() as reader:
        refused = reader.request("POST", path, json=release)
        assert refused.status_code == 403
        assert {"R-H2-ONWARD", "R-ONWARD-CONSENT"} <= {v["rule"] for v in refused.json()["violations"]}
        short = _ask(reader, original["id"], release)
    with origin.client(boss) as decider:
        pending = until(
            lambda: decider.request("GET", "/v1/consent-requests", params={"status": "pending"}).json()[
                "items"
            ]
        )
        assert [(p["id"], p["recipient"]) for p in pending] == [(short, "INTERPOL")]
        _grant(decider, short, dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3))
    with receiver.client() as reader:
        ok = until(lambda: (r := reader.request("POST", path, json=release)).status_code == 200 and r)
        assert ok.json()["released_to"] == "INTERPOL"
        other = reader.request("POST", path, json={**release, "recipient": "ASEANAPOL"})
        assert other.status_code == 403  # a recipient the consent does not name
        until(lambda: reader.request("POST", path, json=release).status_code == 403)  # expired
        lasting = _ask(reader, original["id"], release)
    with origin.client(boss) as decider:
        until(
            lambda: decider.request("GET", "/v1/consent-requests", params={"status": "pending"}).json()[
                "items"
            ]
        )
        _grant(decider, lasting, dt.datetime.now(dt.UTC) + dt.timedelta(days=7))
    with receiver.client() as reader:
        until(lambda: reader.request("POST", path, json=release).status_code == 200)
    with origin.client(boss) as decider:
        assert decider.request("POST", f"/v1/consent-requests/{lasting}/revocation").status_code == 200
    with receiver.client() as reader:
        until(lambda: reader.request("POST", path, json=release).status_code == 403)  # revoked
    until(lambda: "message.released_onward" in events(origin))
    assert {"consent.requested", "consent.decided"} <= set(events(origin)) & set(events(receiver))


def test_reclassification_and_return_or_destroy(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    with polri.client() as sender:
        message = sender.submit(rfi(case_ref="ID-MY/2026/0902"))
        delivered(sender, message)
        lowered = sender.request(
            "POST",
            f"/v1/messages/{message['id']}/reclassification",
            json={"level": "TERBATAS", "reason": "the operation ended"},
        )
        assert lowered.status_code == 200
    with pdrm.client() as reader:
        until(lambda: reader.status(message["id"])["classification"]["level"] == "TERBATAS")
        assert reader.request("GET", f"/v1/messages/{message['id']}/content").status_code == 200
    with polri.client() as sender:
        asked = sender.request(
            "POST",
            f"/v1/messages/{message['id']}/return-or-destroy",
            json={"reason": "the source withdrew consent"},
        )
        assert asked.status_code == 202
    with pdrm.client() as reader:
        gone = until(
            lambda: (
                (r := reader.request("GET", f"/v1/messages/{message['id']}/content")).status_code == 410 and r
            )
        )
        problem = gone.json()
        assert problem["type"].endswith("/destroyed")
        assert problem["reason"].startswith(
            "destroyed at the originator's request (RETURN_OR_DESTROY_REQUEST "
        )
        assert "withdrew" not in problem["reason"]  # the request's words stay sealed in the request
        assert problem["destroyed_at"]
    until(lambda: "destruction.certified" in events(polri))
    with polri.client() as sender:  # the sender still reads what it sent
        assert sender.request("GET", f"/v1/messages/{message['id']}/content").status_code == 200


def _only(keys: KekStore, kid: str) -> Callable[[str], OctKey]:
    """A KEK lookup that tries one particular key of the directory, whatever the content names."""
    return lambda _named: keys.get(kid)


def test_a_backup_taken_before_a_destruction_cannot_be_read_with_the_keys_left(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    polri, pdrm = nodes
    with polri.client() as sender:
        message = sender.submit(rfi(case_ref="ID-MY/2026/0903"))
        delivered(sender, message)
    with sqlite3.connect(pdrm.node.path / "node.db") as live, sqlite3.connect(tmp_path / "backup.db") as copy:
        live.backup(copy)  # the backup an operator takes of the running node
    with polri.client() as sender:
        sender.request(
            "POST", f"/v1/messages/{message['id']}/return-or-destroy", json={"reason": "withdrawn"}
        )
    with pdrm.client() as reader:
        until(lambda: reader.request("GET", f"/v1/messages/{message['id']}/content").status_code == 410)
    with sqlite3.connect(tmp_path / "backup.db") as copy:
        copy.row_factory = sqlite3.Row
        row = dict(copy.execute("select * from messages where id = ?", (message["id"],)).fetchone())
    assert row["content"]  # the backup still holds the sealed content...
    keys = KekStore(pdrm.node.path / "keys" / "kek", PASSPHRASE)
    until(lambda: row["content_kid"] not in keys.kids())  # (its KEK goes just after the commit)
    for kid in [row["content_kid"], *keys.kids()]:  # ...and no key left in the key directory opens it
        with pytest.raises(ContentUnavailable):
            open_at_rest(
                row["content"],
                message_id=row["id"],
                meta=metadata_digest(row),
                kek=_only(keys, kid),
            )


def test_an_overdue_request_is_listed_with_its_age_and_flagged_on_health(
    nodes: tuple[Running, Running],
) -> None:
    polri, pdrm = nodes
    due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)
    with polri.client() as sender:
        request = sender.submit(
            rfi(case_ref="ID-MY/2026/0904", priority="URGENT", response_due=due.isoformat())
        )
        delivered(sender, request)
    with pdrm.client() as reader:
        found = until(
            lambda: [
                r
                for r in reader.request("GET", "/v1/requests", params={"overdue": "true"}).json()["items"]
                if r["id"] == request["id"]
            ]
        )
        assert found[0]["overdue"] is True
        assert found[0]["age_seconds"] >= 1
        assert reader.health()["overdue_requests"] >= 1
