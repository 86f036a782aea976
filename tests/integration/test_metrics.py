"""Metrics across the processes of one node, on SQLite and PostgreSQL: the database-derived gauges
read the same from any process and cost one snapshot per cache period; the in-process counters of
several processes add up in multi-process mode (PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exchange.config import load_settings
from exchange.messages import MessageSubmission
from exchange.node import Node
from exchange.observability import metrics
from exchange.observability.collector import NodeCollector
from exchange.transport.worker import DeliveryWorker
from tests.integration.test_node_flow import Loopback, actor, now
from tests.support import make_pair, rfi


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
