"""Metrics across the processes of one node, on SQLite and PostgreSQL: the database-derived gauges
read the same from any process and cost one snapshot per cache period; the in-process counters of
several processes add up in multi-process mode (PROMETHEUS_MULTIPROC_DIR). Through both nodes' apps
in this process (the verified client certificate given as uvicorn's TLS extension gives it):
``/metrics`` never carries content, identities, case references, client names or request ids, and
a monitoring client reads nothing of a real message."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from exchange.api.app import create_app
from exchange.config import load_settings
from exchange.db import repo
from exchange.messages import MessageSubmission
from exchange.node import Node
from exchange.observability import metrics
from exchange.observability.collector import NodeCollector
from exchange.transport.peer import HttpsPeerTransport
from exchange.transport.worker import DeliveryWorker
from tests.integration.test_node_flow import Loopback, actor, now
from tests.support import ClientFiles, NodeDir, cli, make_pair, register_client, rfi


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition.decode())
        for s in family.samples
    }


def test_database_gauges_are_the_same_from_every_process_of_a_node(
    tmp_path: Path, db_urls: tuple[str | None, str | None]
) -> None:
    id_dir, my_dir = make_pair(tmp_path, db_urls)
    first, second = Node(load_settings(id_dir.path)), Node(load_settings(id_dir.path))  # two processes
    partner = Node(load_settings(my_dir.path))
    try:
        polri = actor(first, id_dir, "polri-cms")
        for _ in range(2):
            first.submit(polri, MessageSubmission.model_validate(rfi()), now())
        second.submit(polri, MessageSubmission.model_validate(rfi()), now())
        at = now().timestamp()
        seen = [samples(metrics.render(NodeCollector(n, clock=lambda: at))) for n in (first, second)]
        assert seen[0] == seen[1]  # the same scrape whichever process answers it
        queued = (
            "exchange_messages",
            (("direction", "out"), ("status", "queued"), ("type", "REQUEST_FOR_INFORMATION")),
        )
        assert seen[0][queued] == seen[1][queued] == 3
        assert seen[1][("exchange_outbox_messages", ())] == 3
        assert seen[1][("exchange_outbox_oldest_age_seconds", ())] >= 0
        DeliveryWorker(second, Loopback(partner)).run_once()
        after = samples(metrics.render(NodeCollector(first)))
        delivered = (
            "exchange_messages",
            (("direction", "out"), ("status", "delivered"), ("type", "REQUEST_FOR_INFORMATION")),
        )
        assert after[delivered] == 3
        assert after[("exchange_outbox_messages", ())] == 0
        assert after[("exchange_ledger_entries", ())] > seen[0][("exchange_ledger_entries", ())]
    finally:
        for node in (first, second, partner):
            node.close()


def test_a_snapshot_is_taken_at_most_once_per_cache_period(tmp_path: Path) -> None:
    id_dir, _ = make_pair(tmp_path)
    node = Node(load_settings(id_dir.path, metrics_cache_seconds=30))
    clock = [1000.0]
    try:
        collector = NodeCollector(node, clock=lambda: clock[0])
        taken = collector.snapshot()
        clock[0] += 29
        assert collector.snapshot() is taken
        clock[0] += 1
        assert collector.snapshot() is not taken
    finally:
        node.close()


COUNT = """
from exchange.observability import metrics
metrics.delivery_round(answered={n}, refused=0, unreachable=1, seconds=0.05)
metrics.settled(delivered_enqueued_at=[0.0] * {n}, failed=0, now=2.0)
"""


def test_counters_of_several_processes_add_up_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    env = {**os.environ, metrics.MULTIPROC_ENV: str(folder)}
    for n in (2, 5):  # two processes of one node, each counting its own deliveries
        subprocess.run([sys.executable, "-c", COUNT.format(n=n)], env=env, check=True)
    assert len(list(folder.glob("*.db"))) >= 2
    found = samples(metrics.render(multiproc=folder))
    assert found[("exchange_delivery_attempts_total", (("outcome", "answered"),))] == 7
    assert found[("exchange_delivery_attempts_total", (("outcome", "unreachable"),))] == 2
    assert found[("exchange_deliveries_total", (("outcome", "delivered"),))] == 7
    assert found[("exchange_delivery_latency_seconds_count", ())] == 7
    assert found[("exchange_delivery_request_seconds_count", ())] == 2
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(folder))
    metrics.reset_multiprocess_dir()  # what `exchange serve` does before its processes count
    assert not list(folder.glob("*.db"))
    assert ("exchange_delivery_attempts_total", (("outcome", "answered"),)) not in samples(metrics.render())


# --- /metrics through the API, in this process ---------------------------------------------------


def as_holder(app: ASGIApp, certificate: Path) -> ASGIApp:
    """``app`` as the holder of ``certificate`` calls it: the TLS extension uvicorn fills from the
    verified handshake (tests/integration/test_tls_extension.py), so the real client checks run."""
    tls = {"client_cert_chain": [certificate.read_text()], "tls_version": 0x0304}

    async def call(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "extensions": {**scope.get("extensions", {}), "tls": tls}}
        await app(scope, receive, send)

    return call


class Caller(httpx.BaseTransport):
    """A sync transport into an ASGI app (the delivery worker's peer client is sync)."""

    def __init__(self, app: ASGIApp) -> None:
        self.asgi = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def call() -> httpx.Response:
            response = await self.asgi.handle_async_request(request)
            return httpx.Response(
                response.status_code, headers=response.headers, content=await response.aread()
            )

        return asyncio.run(call())


def caller(app: ASGIApp, certificate: Path, base_url: str) -> httpx.Client:
    """A client calling ``app`` as the holder of ``certificate``."""
    return httpx.Client(transport=Caller(as_holder(app, certificate)), base_url=base_url)


@dataclass
class Api:
    """Both nodes' apps (no background loops), a client per registered caller, the request ids the
    nodes answered with, and ID's delivery worker posting to MY's peer endpoint."""

    id_node: Node
    my_node: Node
    callers: dict[str, httpx.Client]
    worker: DeliveryWorker
    request_ids: list[str]

    def call(self, caller: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.callers[caller].request(method, path, **kwargs)
        self.request_ids.append(response.headers["x-request-id"])
        return response

    def scrape(self, monitor: str) -> str:
        r = self.call(monitor, "GET", "/metrics")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        return r.text


TOKEN = uuid.uuid4().hex[:12].upper()  # in every canary of this module
CMS, PROMETHEUS = f"cms-canary-{TOKEN.lower()}", f"prom-canary-{TOKEN.lower()}"


@pytest.fixture
def api(tmp_path: Path, db_urls: tuple[str | None, str | None]) -> Iterator[Api]:
    id_dir, my_dir = make_pair(tmp_path, db_urls)
    register_client(id_dir, CMS, "RAHASIA")  # its id and certificate subject are canaries too
    monitors = {"ID": add_monitoring(id_dir, PROMETHEUS), "MY": add_monitoring(my_dir, PROMETHEUS)}
    id_node = Node(load_settings(id_dir.path, metrics_cache_seconds=0))
    my_node = Node(load_settings(my_dir.path, metrics_cache_seconds=0))
    id_app, my_app = create_app(id_node, run_worker=False), create_app(my_node, run_worker=False)
    callers = {
        "cms": caller(id_app, id_dir.client(CMS).cert, "https://id-node"),
        "pdrm-d7": caller(my_app, my_dir.client("pdrm-d7").cert, "https://my-node"),
        "id-monitor": caller(id_app, monitors["ID"].cert, "https://id-node"),
        "my-monitor": caller(my_app, monitors["MY"].cert, "https://my-node"),
    }
    peer = HttpsPeerTransport("https://my-node", ssl.create_default_context(), 10)
    node_certificate = id_dir.path / "tls" / "node.pem"  # ID's node-to-node certificate
    peer._client = caller(my_app, node_certificate, "https://my-node")
    yield Api(id_node, my_node, callers, DeliveryWorker(id_node, peer), [])
    peer.close()
    for client in callers.values():
        client.close()
    id_node.close()
    my_node.close()


def add_monitoring(node: NodeDir, name: str) -> ClientFiles:
    """Issue a client certificate and register it with ``exchange clients add-monitoring``."""
    cli("pki", "issue-client", "--dir", str(node.path), "--name", name, "--out", str(node.path / "clients"))
    files = node.client(name)
    cli("clients", "add-monitoring", "--dir", str(node.path), "--id", name, "--cert", str(files.cert))
    return files


def canary_submission(n: int, **overrides: object) -> dict[str, object]:
    """An RFI carrying the canary in every free field a local system fills: the case reference,
    the data subjects' pseudonyms and a victim's legal status, the legal basis and MLA reference
    (its handling), and the payload (summary, questions, a person's name and address)."""
    canary = f"CANARY-{TOKEN}-{n}"
    return rfi(
        case_ref=f"ID-MY/{canary}",
        legal_basis=[f"basis {canary}"],
        mla_reference=f"MLA/{canary}",
        data_subjects=[
            {"pseudonym": f"SUS-{TOKEN}-{n}", "role": "SUSPECT"},
            {
                "pseudonym": f"VCT-{TOKEN}-{n}",
                "role": "VICTIM_ADULT",
                "status": {"ID": f"VICTIM-{canary}", "MY": f"MIGRANT-{canary}"},
                "age": {"years": 24, "basis": "CLAIMED"},
            },
        ],
        payload={
            "summary": f"Recruiter {canary} moving workers via Batam",
            "questions": [f"Is {canary} known to PDRM?"],
            "persons": [
                {"subject": f"SUS-{TOKEN}-{n}", "names": [f"Budi {canary}"], "address": f"Jl. {canary} 7"}
            ],
        },
        **overrides,
    )


def test_metrics_never_carry_content_identities_case_refs_client_names_or_request_ids(api: Api) -> None:
    """A message with a canary in every field goes out, is refused once, is delivered through the
    partner's peer endpoint and read there; ids and canaries are in every path and header a scrape
    could pick up. Neither node's /metrics carries any of them, while its metrics moved."""
    before = {m: samples(api.scrape(m).encode()) for m in ("id-monitor", "my-monitor")}
    headers = {"X-Request-ID": f"req-canary-{TOKEN}"}
    r = api.call("cms", "POST", "/v1/messages", json=canary_submission(1), headers=headers)
    assert r.status_code == 202, r.text
    message = r.json()
    refused = api.call("cms", "POST", "/v1/messages", json=canary_submission(2, tlp="RED"))
    assert refused.status_code == 403, refused.text
    invalid = api.call("cms", "POST", "/v1/messages", json=canary_submission(3, tlp=f"CANARY-{TOKEN}-3"))
    assert invalid.status_code == 422, invalid.text
    for path in (
        f"/v1/messages/{message['id']}",
        f"/v1/cases/{canary_submission(1)['case_ref']}",
        f"/v1/messages/CANARY-{TOKEN}-4",
        f"/CANARY-{TOKEN}-5",
    ):
        api.call("cms", "GET", path)
    assert api.worker.run_once() == 1
    assert api.call("cms", "GET", f"/v1/messages/{message['id']}").json()["status"] == "delivered"
    inbox = api.call("pdrm-d7", "GET", "/v1/inbox").json()["items"]
    assert [i["id"] for i in inbox] == [message["id"]]
    assert f"CANARY-{TOKEN}-1" in json.dumps(inbox[0])  # the partner read the content
    assert api.call("pdrm-d7", "GET", f"/v1/messages/{message['id']}/content").status_code == 200
    received = {m: api.scrape(m) for m in ("id-monitor", "my-monitor")}
    never = [TOKEN, TOKEN.lower(), message["id"], message["thread_id"], *api.request_ids, "Batam"]
    for monitor, body in received.items():
        for secret in never:
            assert secret not in body, (monitor, secret)
        assert "polri-cms" not in body, monitor
        assert "pdrm-d7" not in body, monitor
    after = {m: samples(body.encode()) for m, body in received.items()}

    def grew(monitor: str, name: str, labels: dict[str, str], by: float = 1) -> None:
        key = (name, tuple(sorted(labels.items())))
        assert after[monitor].get(key, 0) - before[monitor].get(key, 0) >= by, (monitor, key)

    rfi_type = {"type": "REQUEST_FOR_INFORMATION"}
    grew("id-monitor", "exchange_messages", {"direction": "out", "status": "delivered", **rfi_type})
    grew("my-monitor", "exchange_messages", {"direction": "in", "status": "received", **rfi_type})
    grew("id-monitor", "exchange_policy_refusals_total", {"action": "submit", "rule": "R-TLP-RED-RECIPIENTS"})
    grew("id-monitor", "exchange_deliveries_total", {"outcome": "delivered"})
    for route, status in (  # both apps count into this process's one registry
        ("/v1/messages", "202"),
        ("/v1/messages", "403"),
        ("/v1/messages", "422"),
        ("/v1/messages/{message_id}", "200"),
        ("/v1/messages/{message_id}", "404"),
        ("(unmatched)", "404"),
        ("/v1/peer/envelopes", "200"),
        ("/v1/inbox", "200"),
    ):
        labels = {"method": "POST" if route in ("/v1/messages", "/v1/peer/envelopes") else "GET"}
        grew(
            "id-monitor", "exchange_http_request_seconds_count", {**labels, "route": route, "status": status}
        )


def ledger_size(node: Node) -> int:
    with node.db.read() as conn:
        return repo.read_ledger_head(conn).size


def test_a_monitoring_client_reads_metrics_and_nothing_of_a_real_message(api: Api) -> None:
    """A client registered with ``clients add-monitoring`` is refused (403 problem JSON) on a real
    message at both ends (status, content, case), on an inbox holding it and on submitting; the
    refusal is the same as for an id that does not exist, says nothing of the message, and neither
    node records a release, a submission or anything else for it."""
    r = api.call("cms", "POST", "/v1/messages", json=canary_submission(1))
    assert r.status_code == 202, r.text
    mid, case_ref = r.json()["id"], str(canary_submission(1)["case_ref"])
    assert api.worker.run_once() == 1
    ledgers = ledger_size(api.id_node), ledger_size(api.my_node)
    unknown = f"{TOKEN[::-1]}-not-a-message"
    for monitor in ("id-monitor", "my-monitor"):
        for method, path, body in (
            ("GET", f"/v1/messages/{mid}", None),
            ("GET", f"/v1/messages/{mid}/content", None),
            ("GET", f"/v1/cases/{case_ref}", None),
            ("GET", "/v1/inbox", None),
            ("POST", "/v1/messages", canary_submission(2)),
        ):
            r = api.call(monitor, method, path, json=body)
            assert r.status_code == 403, (monitor, path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith("/forbidden")
            for secret in (mid, TOKEN, "Batam", "delivered", "received", "queued"):
                assert secret not in r.text, (monitor, path, secret)
            blind = api.call(
                monitor, method, path.replace(mid, unknown).replace(case_ref, unknown), json=body
            )
            assert (blind.status_code, blind.content) == (r.status_code, r.content), (monitor, path)
        assert api.scrape(monitor)
    assert (ledger_size(api.id_node), ledger_size(api.my_node)) == ledgers
    inbox = api.call("pdrm-d7", "GET", "/v1/inbox").json()["items"]
    assert [i["id"] for i in inbox] == [mid]  # it was there all along, for the local system
