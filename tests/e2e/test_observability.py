"""Metrics and logs of two real nodes over mutual TLS: ``/metrics`` parses with the Prometheus
client's parser and moves as messages flow; only a monitoring client reads it; the node logs JSON
lines with request ids and never a message's content."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exchange.cli import app
from exchange.client import ExchangeClient
from exchange.errors import InvalidInput
from exchange.observability import metrics
from tests.e2e.harness import Running, start_nodes
from tests.support import RUNNER, ClientFiles, NodeDir, cli, register_client, rfi

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MARKER = "Siti-Nurhaliza-canary-7f3a"  # a victim's name and content that must never reach a log


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Running]]:
    yield from start_nodes(tmp_path_factory, options={"metrics_cache_seconds": 0})


def add_monitoring(node: NodeDir, name: str = "prometheus") -> ClientFiles:
    """Issue a client certificate and register it as a monitoring client."""
    cli("pki", "issue-client", "--dir", str(node.path), "--name", name, "--out", str(node.path / "clients"))
    files = node.client(name)
    cli("clients", "add-monitoring", "--dir", str(node.path), "--id", name, "--cert", str(files.cert))
    return files


@pytest.fixture(scope="module")
def monitors(nodes: tuple[Running, Running]) -> Iterator[tuple[ExchangeClient, ExchangeClient]]:
    clients = [run.client(add_monitoring(run.node)) for run in nodes]
    yield clients[0], clients[1]
    for client in clients:
        client.close()


def scrape(monitor: ExchangeClient) -> Samples:
    r = monitor.request("GET", "/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def test_metrics_parse_and_move_as_messages_flow(
    nodes: tuple[Running, Running], monitors: tuple[ExchangeClient, ExchangeClient]
) -> None:
    polri, pdrm = nodes
    id_monitor, my_monitor = monitors
    before, before_in = scrape(id_monitor), scrape(my_monitor)
    rfi_out = {"direction": "out", "type": "REQUEST_FOR_INFORMATION"}
    with polri.client() as api:
        ids = [api.submit(rfi())["id"] for _ in range(3)]
        refused = api.request("POST", "/v1/messages", json=rfi(tlp="RED"))
        assert refused.status_code == 403
        for mid in ids:
            api.wait_for_status(mid, "delivered")
    deadline = time.monotonic() + 20
    while True:  # the checkpointer has the partner cosign a checkpoint covering the new entries
        after = scrape(id_monitor)
        if value(after, "exchange_checkpoint_uncosigned_entries") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    after_in = scrape(my_monitor)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        assert value(after, name, **labels) - value(before, name, **labels) >= by, (name, labels)

    grew("exchange_messages", 3, status="delivered", **rfi_out)
    grew("exchange_delivery_attempts_total", 3, outcome="answered")
    grew("exchange_deliveries_total", 3, outcome="delivered")
    grew("exchange_delivery_latency_seconds_count", 3)
    grew("exchange_delivery_request_seconds_count", 1)
    grew("exchange_policy_refusals_total", 1, action="submit", rule="R-TLP-RED-RECIPIENTS")
    grew("exchange_http_request_seconds_count", 3, method="POST", route="/v1/messages", status="202")
    grew("exchange_ledger_entries", 3 * 3)  # submitted, sent, receipt verified
    assert value(after, "exchange_outbox_messages") == 0
    assert value(after, "exchange_outbox_oldest_age_seconds") == 0
    assert value(after, "exchange_checkpoint_cosigned_size") > value(
        before, "exchange_checkpoint_cosigned_size"
    )
    assert value(after, "exchange_checkpoint_uncosigned_entries") == 0
    assert 0 <= value(after, "exchange_checkpoint_cosigned_age_seconds") < 60
    assert value(after, "exchange_database_up") == 1
    assert value(after, "exchange_requests_overdue") == 0
    assert value(after, "exchange_ledger_incidents_total", event="checkpoint.incident") == 0
    for certificate in ("server.pem", "node.pem", "ca.pem"):
        left = value(after, "exchange_certificate_expiry_seconds", owner="ID", certificate=certificate)
        assert 86400 < left < 40 * 366 * 86400, certificate
    assert value(after, "exchange_keys", owner="ID", state="active") >= 2
    grown_in = value(after_in, "exchange_messages", direction="in", type="REQUEST_FOR_INFORMATION") - value(
        before_in, "exchange_messages", direction="in", type="REQUEST_FOR_INFORMATION"
    )
    assert grown_in == 3
    assert value(after_in, "exchange_http_request_seconds_count", route="/v1/peer/envelopes") >= 1
    del pdrm


def test_only_a_monitoring_client_reads_metrics_and_it_reads_nothing_else(
    nodes: tuple[Running, Running], monitors: tuple[ExchangeClient, ExchangeClient]
) -> None:
    polri, _ = nodes
    auditor = register_client(polri.node, "obs-auditor", "RAHASIA", "--role", "AUDITOR")
    for files in (polri.client_files, auditor):
        with polri.client(files) as other:
            r = other.request("GET", "/metrics")
            assert r.status_code == 403, files.name
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["status"] == 403
    id_monitor, _ = monitors
    for method, path in (
        ("GET", "/v1/inbox"),
        ("GET", "/v1/messages/x"),
        ("POST", "/v1/messages"),
        ("GET", "/v1/audit/entries"),
        ("GET", "/audit"),
        ("POST", "/v1/peer/envelopes"),
    ):
        r = id_monitor.request(method, path, json=rfi() if method == "POST" else None)
        assert r.status_code == 403, (method, path, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    reserved = cli_refusal(polri.node)
    assert "add-monitoring" in reserved


def cli_refusal(node: NodeDir) -> str:
    """``clients add --role MONITORING``: refused, the role is reserved for add-monitoring."""
    result = RUNNER.invoke(
        app,
        [
            "clients",
            "add",
            "--dir",
            str(node.path),
            "--id",
            "sneaky",
            "--cert",
            str(node.client("polri-cms").cert),
            "--agency",
            "Polri",
            "--unit",
            "TPPO",
            "--clearance",
            "RAHASIA",
            "--type",
            "ALL",
            "--purpose",
            "ALL",
            "--role",
            "MONITORING",
        ],
    )
    assert isinstance(result.exception, InvalidInput)
    return str(result.exception)


def test_logs_are_json_lines_with_request_ids_and_never_content(nodes: tuple[Running, Running]) -> None:
    polri, pdrm = nodes
    submission = rfi(
        case_ref="ID-MY/2026/0777",
        payload={"summary": f"Victim {MARKER} seen in Batam", "questions": [f"Where is {MARKER}?"]},
    )
    with polri.client() as api:
        r = api.request("POST", "/v1/messages", json=submission, headers={"X-Request-ID": "obs-req-0001"})
        assert r.status_code == 202, r.text
        assert r.headers["x-request-id"] == "obs-req-0001"
        message_id = r.json()["id"]
        api.wait_for_status(message_id, "delivered")
        refused = api.request("POST", "/v1/messages", json={**submission, "tlp": "RED"})
        assert refused.status_code == 403
        generated = refused.headers["x-request-id"]
        for bad in ("has space", "x" * 200, 'quote"d', ""):
            r = api.request("GET", "/healthz", headers={"X-Request-ID": bad})
            assert r.headers["x-request-id"] != bad
            assert len(r.headers["x-request-id"]) == 32
    with pdrm.client() as api:
        assert any(i["id"] == message_id for i in api.inbox(limit=1000)["items"])
    time.sleep(0.5)  # let the servers flush their last lines
    for run in (polri, pdrm):
        text = (run.node.path / "node.log").read_text()
        assert MARKER not in text
        assert "Batam" not in text
        records = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
        for record in records:
            assert {"time", "level", "logger", "event", "msg"} <= set(record), record
            assert record["time"].endswith("Z")
        assert any(r["event"] == "http.request" and "client_id" in r for r in records)
    records = [json.loads(line) for line in (polri.node.path / "node.log").read_text().splitlines() if line]
    accepted = [r for r in records if r["event"] == "message.accepted" and r.get("message_id") == message_id]
    assert accepted
    assert accepted[0]["request_id"] == "obs-req-0001"
    assert accepted[0]["client_id"] == "polri-cms"
    request_lines = [
        r for r in records if r["event"] == "http.request" and r.get("request_id") == "obs-req-0001"
    ]
    assert request_lines[0]["route"] == "/v1/messages"
    assert request_lines[0]["status"] == 202
    refusal = [r for r in records if r["event"] == "policy.refused" and r.get("request_id") == generated]
    assert refusal
    assert refusal[0]["rule_ids"] == ["R-TLP-RED-RECIPIENTS"]


def test_a_node_in_multiprocess_mode_counts_in_the_shared_folder(
    nodes: tuple[Running, Running], tmp_path: Path
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR, `exchange serve` empties the folder (values of a previous run
    are not added) and every process's counters are read from it."""
    polri, _ = nodes
    folder = tmp_path / "prometheus"
    folder.mkdir()
    stale = folder / "counter_999999.db"
    stale.write_bytes(b"left by a previous run")
    assert polri.process.stop()
    polri.process.env = {**polri.process.env, metrics.MULTIPROC_ENV: str(folder)}
    polri.process.start()
    polri.process.wait_ready()
    assert not stale.exists()
    with polri.client() as api:
        for mid in [api.submit(rfi())["id"] for _ in range(2)]:
            api.wait_for_status(mid, "delivered")
    files = add_monitoring(polri.node, "prometheus-2")
    with polri.client(files) as monitor:
        found = scrape(monitor)
    assert value(found, "exchange_deliveries_total", outcome="delivered") == 2
    assert value(found, "exchange_http_request_seconds_count", route="/v1/messages", status="202") == 2
    assert list(folder.glob("counter_*.db"))


PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
#: what PromQL names that is not a metric: operators, keywords, functions used in alerts.yml
PROMQL_WORDS = {"and", "or", "unless", "on", "ignoring", "by", "without", "group_left", "group_right", "bool"}
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself for every target


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers outside strings, label matchers and
    ranges that are neither a function call nor a PromQL keyword."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(?:on|ignoring|by|without|group_left|group_right)\s*\([^)]*\)", "", bare)
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", bare):
        name = match.group(0)
        after = bare[match.end() :].lstrip()
        if name in PROMQL_WORDS or after.startswith("("):
            continue
        found.add(name)
    return found


def exported_names(monitor: ExchangeClient) -> set[str]:
    text = monitor.request("GET", "/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {s.name for s in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return names


def test_the_alert_rules_read_only_metrics_the_node_exports(
    monitors: tuple[ExchangeClient, ExchangeClient],
) -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert (job["scheme"], job["metrics_path"]) == ("https", "/metrics")
    assert {"ca_file", "cert_file", "key_file"} <= set(job["tls_config"])
    exported = exported_names(monitors[0]) | PROMETHEUS_OWN
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert {
        "ExchangePartnerUnreachable",
        "ExchangeOutboxGrowing",
        "ExchangeCheckpointNotCosigned",
        "ExchangeCertificateExpiring",
        "ExchangeSecurityIncident",
    } <= set(alerts)
    for name, rule in alerts.items():
        used = metric_names_in(rule["expr"])
        assert used, name
        assert used <= exported, (name, used - exported)
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_promtool_accepts_the_configuration_and_the_alerts_fire_when_they_should() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        message = "promtool is not installed (Debian package prometheus: .ci/system-deps)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: this test must run)")
        pytest.skip(message)
    for args in (
        ("check", "config", "--syntax-only", "prometheus.yml"),
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts.test.yml"),
    ):
        done = subprocess.run([promtool, *args], cwd=PROMETHEUS, capture_output=True, text=True, check=False)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
