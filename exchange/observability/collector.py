"""Gauges a scrape reads from the database and the key directory, with a bounded cost.

:class:`NodeCollector` answers every scrape from one snapshot taken at most once per
``metrics_cache_seconds`` by this process, so the cost of scraping does not grow with the scrape
rate; every snapshot query is bounded (:mod:`exchange.db.gauges`). Being read from the shared
database, these values are the same whichever process of a node answers the scrape.

If the database is unavailable, the snapshot says so (``exchange_database_up 0``) and carries the
key and certificate expiry only, which it reads from files.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exchange.db import gauges, repo
from exchange.errors import DatabaseUnavailable, ExchangeError
from exchange.keys.inventory import KeyLine, key_inventory
from exchange.ledger.events import LedgerEvent
from exchange.node import Node

log = logging.getLogger("exchange.metrics")

#: ledger events that are incidents: a checkpoint that forks or rolls back, an incident the partner
#: notified, a message that arrived below its floor
INCIDENT_EVENTS = (
    "checkpoint.incident",
    LedgerEvent.INCIDENT_NOTIFIED.value,
    LedgerEvent.POLICY_INCIDENT.value,
)


@dataclass(frozen=True)
class Snapshot:
    """What one scrape reports, taken at ``taken`` (epoch seconds)."""

    taken: float
    database_up: bool
    keys: list[KeyLine] = field(default_factory=list)
    messages: list[tuple[str, str, str, int]] = field(default_factory=list)
    outbox: gauges.OutboxGauges | None = None
    ledger_size: int = 0
    checkpoints: gauges.CheckpointGauges | None = None
    incidents: dict[str, int] = field(default_factory=dict)
    overdue_requests: int = 0


def _epoch(rfc3339: str | None) -> float | None:
    return dt.datetime.fromisoformat(rfc3339).timestamp() if rfc3339 else None


class NodeCollector(Collector):
    """The node's database- and file-derived gauges (see the module docstring)."""

    def __init__(self, node: Node, *, clock: Callable[[], float] = time.time) -> None:
        self.node = node
        self.clock = clock
        self.cache_seconds = node.settings.metrics_cache_seconds
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None

    def snapshot(self) -> Snapshot:
        """The cached snapshot, or a new one if it is older than ``metrics_cache_seconds``."""
        with self._lock:
            now = self.clock()
            if self._snapshot is None or now - self._snapshot.taken >= self.cache_seconds:
                self._snapshot = self._take(now)
            return self._snapshot

    def _take(self, now: float) -> Snapshot:
        node = self.node
        try:
            registry = node.registry
            keys = key_inventory(
                key_dir=node.settings.key_dir,
                tls_dir=node.settings.tls_dir,
                agreement=node.agreement,
                own=registry.history(node.party),
                partner=registry.history(node.partner_party),
                acknowledged={r["version"]: r["acknowledged_at"] for r in registry.own_rows()},
                now=dt.datetime.fromtimestamp(now, dt.UTC),
                warn_days=node.settings.expiry_warning_days,
            )
        except ExchangeError as exc:
            log.warning("key inventory unreadable for metrics: %s", exc)
            keys = []
        try:
            with node.db.read() as conn:
                messages = gauges.message_counts(conn)
                outbox = gauges.outbox_gauges(conn)
                size = repo.read_ledger_head(conn).size
                checkpoints = gauges.checkpoint_gauges(conn)
                incidents = gauges.event_counts(conn, INCIDENT_EVENTS)
            overdue = len(
                node.deadlines.open_requests(dt.datetime.fromtimestamp(now, dt.UTC), overdue_only=True)
            )
        except DatabaseUnavailable:
            return Snapshot(now, False, keys)
        return Snapshot(now, True, keys, messages, outbox, size, checkpoints, incidents, overdue)

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot()
        now = self.clock()
        yield GaugeMetricFamily(
            "exchange_database_up", "1 if the last snapshot could read the database", value=int(s.database_up)
        )
        yield from self._expiry(s, now)
        yield from self._agreements(now)
        if not s.database_up or s.outbox is None or s.checkpoints is None:
            return
        messages = GaugeMetricFamily(
            "exchange_messages",
            "Messages stored, by direction (out, in), type and status",
            labels=["direction", "type", "status"],
        )
        for direction, message_type, status, count in s.messages:
            messages.add_metric([direction, message_type, status], count)
        yield messages
        yield GaugeMetricFamily(
            "exchange_outbox_messages", "Messages waiting for delivery to the partner", value=s.outbox.depth
        )
        yield GaugeMetricFamily(
            "exchange_outbox_retrying_messages",
            "Messages waiting after a failed delivery attempt (the partner unreachable or failing)",
            value=s.outbox.retrying,
        )
        oldest = s.outbox.oldest_enqueued_at
        yield GaugeMetricFamily(
            "exchange_outbox_oldest_age_seconds",
            "Age of the oldest message waiting for delivery (0 when none waits)",
            value=max(0.0, now - oldest) if oldest is not None else 0.0,
        )
        yield GaugeMetricFamily("exchange_ledger_entries", "Entries in the audit ledger", value=s.ledger_size)
        cp = s.checkpoints
        yield GaugeMetricFamily(
            "exchange_checkpoint_signed_size",
            "Ledger size of the latest signed checkpoint",
            value=cp.signed_size,
        )
        yield GaugeMetricFamily(
            "exchange_checkpoint_cosigned_size",
            "Ledger size of the latest checkpoint the partner cosigned",
            value=cp.cosigned_size,
        )
        yield GaugeMetricFamily(
            "exchange_checkpoint_uncosigned_entries",
            "Ledger entries not yet covered by a checkpoint the partner cosigned",
            value=max(0, s.ledger_size - cp.cosigned_size),
        )
        cosigned_at = _epoch(cp.cosigned_at)
        age = now - cosigned_at if cosigned_at is not None else (math.inf if s.ledger_size else 0.0)
        yield GaugeMetricFamily(
            "exchange_checkpoint_cosigned_age_seconds",
            "Seconds since the partner last cosigned a checkpoint (+Inf if it never did)",
            value=max(0.0, age),
        )
        yield GaugeMetricFamily(
            "exchange_requests_overdue",
            "Requests to the partner past their response deadline and not answered",
            value=s.overdue_requests,
        )
        incidents = CounterMetricFamily(
            "exchange_ledger_incidents",
            "Incidents recorded in the audit ledger, by event (checkpoint.incident and incident.notified"
            " are security incidents)",
            labels=["event"],
        )
        for event, count in s.incidents.items():
            incidents.add_metric([event], count)
        yield incidents

    def _agreements(self, now: float) -> Iterator[Metric]:
        """The agreement versions this process holds and when the next one takes effect (what it
        held last if the database cannot be read)."""
        try:
            history = self.node.agreements.history()
        except DatabaseUnavailable:
            history = self.node.agreements.history(read=False)
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        current = history.in_force(moment)
        versions = GaugeMetricFamily(
            "exchange_agreement_versions",
            "Agreement versions the node holds, by version and state (superseded, in_force, upcoming)",
            labels=["version", "state"],
        )
        state = "superseded"
        for terms in history.versions:
            if terms is current:
                state = "in_force"
            versions.add_metric([terms.version, state], 1)
            if terms is current:
                state = "upcoming"
        yield versions
        upcoming = history.switches_after(moment)
        yield GaugeMetricFamily(
            "exchange_agreement_next_effective_timestamp_seconds",
            "When the next agreement version held takes effect (Unix time; 0: none is held)",
            value=upcoming.timestamp() if upcoming is not None else 0.0,
        )

    def _expiry(self, s: Snapshot, now: float) -> Iterator[Metric]:
        certificates = GaugeMetricFamily(
            "exchange_certificate_expiry_seconds",
            "Seconds until a TLS certificate of the node is no longer valid (not-after)",
            labels=["owner", "certificate", "subject"],
        )
        keys = GaugeMetricFamily(
            "exchange_key_expiry_seconds",
            "Seconds until a message key expires, for keys that carry an expiry",
            labels=["owner", "kind", "kid"],
        )
        states = GaugeMetricFamily(
            "exchange_keys",
            "Keys and certificates the node holds, by owner, kind and state",
            labels=["owner", "kind", "state"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        for line in s.keys:
            counts[(line.owner, line.kind, line.state)] = (
                counts.get((line.owner, line.kind, line.state), 0) + 1
            )
            if line.expires is None:
                continue
            left = line.expires.timestamp() - now
            if line.kind.startswith("TLS "):
                certificates.add_metric([line.owner, line.kind.removeprefix("TLS "), line.ident], left)
            else:
                keys.add_metric([line.owner, line.kind, line.ident], left)
        for labels, n in counts.items():
            states.add_metric(list(labels), n)
        yield certificates
        yield keys
        yield states
