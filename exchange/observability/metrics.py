"""The node's in-process metrics: counters and histograms of what its processes did.

They are counted where the work happens (the delivery loop, the API edge, the rule refusals) and
never read the database. What the database already knows (messages by status, the outbox, the
ledger, checkpoints, overdue requests, incidents) is read at scrape time instead, by
:class:`exchange.observability.collector.NodeCollector`: correct from any process of a node.

Several processes: with ``PROMETHEUS_MULTIPROC_DIR`` set (to an empty folder owned by the node, before
any process starts), prometheus_client keeps these values in memory-mapped files there, and
:func:`render` adds up every process's, so a scrape answered by any process reports the whole node
(docs/adr/0014). Without it each process reports its own, which is exact for one process.

Invariant: no label holds content or an identity: labels are outcomes, rule ids, route templates,
HTTP methods and statuses, incident kinds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from exchange.policy import Decision

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: the exposition format served (Prometheus text format 0.0.4)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: this module's counters and histograms (not prometheus_client's global registry)
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

DELIVERY_ATTEMPTS = Counter(
    "exchange_delivery_attempts",
    "Envelopes sent to the partner node, by outcome: answered (a receipt or a rejection came back),"
    " refused (the partner refused the request by HTTP status), unreachable (no answer)",
    ["outcome"],
    registry=REGISTRY,
)
DELIVERY_REQUEST_SECONDS = Histogram(
    "exchange_delivery_request_seconds",
    "Duration of one delivery round trip to the partner node (a batch of envelopes)",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
DELIVERY_LATENCY_SECONDS = Histogram(
    "exchange_delivery_latency_seconds",
    "From a message's acceptance (queued) to the partner's verified receipt",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "exchange_deliveries",
    "Outbound messages that left the outbox, by outcome (delivered, failed)",
    ["outcome"],
    registry=REGISTRY,
)
POLICY_REFUSALS = Counter(
    "exchange_policy_refusals",
    "Refusals by the agreement's rules, by action (submit, receive, release, onward) and rule id",
    ["action", "rule"],
    registry=REGISTRY,
)
SECURITY_INCIDENTS = Counter(
    "exchange_security_incidents",
    "Security incidents this process logged, by kind (the ledger keeps them all:"
    " exchange_ledger_incidents_total)",
    ["kind"],
    registry=REGISTRY,
)
HTTP_REQUEST_SECONDS = Histogram(
    "exchange_http_request_seconds",
    "API requests served, by method, route template and status",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
ENVELOPES_REJECTED = Counter(
    "exchange_envelopes_rejected",
    "Envelopes from the partner node this process could not open or admit before the rules, by reason"
    " (unknown-agreement and agreement-not-in-force: the nodes do not hold the same agreement versions;"
    " agreement-superseded: a message under a version superseded longer ago than a message waits)",
    ["reason"],
    registry=REGISTRY,
)

#: incident kinds this node logs (exchange.observability.logs.security_incident)
INCIDENT_KINDS = (
    "checkpoint",
    "partner-notified",
    "onward-without-consent",
    "key-receipt",
    "key-sets",
    "agreement",
)
#: the reasons an alert watches (every other reason is counted from its first occurrence)
AGREEMENT_REJECTIONS = ("unknown-agreement", "agreement-not-in-force")

# every known label value starts at 0, so that a first occurrence is an increase Prometheus sees
for _outcome in ("answered", "refused", "unreachable"):
    DELIVERY_ATTEMPTS.labels(_outcome)
for _outcome in ("delivered", "failed"):
    DELIVERIES.labels(_outcome)
for _kind in INCIDENT_KINDS:
    SECURITY_INCIDENTS.labels(_kind)
for _reason in AGREEMENT_REJECTIONS:
    ENVELOPES_REJECTED.labels(_reason)


def delivery_round(*, answered: int, refused: int, unreachable: int, seconds: float) -> None:
    """Count one delivery round: envelopes by outcome, and its duration."""
    for outcome, n in (("answered", answered), ("refused", refused), ("unreachable", unreachable)):
        if n:
            DELIVERY_ATTEMPTS.labels(outcome).inc(n)
    DELIVERY_REQUEST_SECONDS.observe(seconds)


def settled(*, delivered_enqueued_at: Iterable[float], failed: int, now: float) -> None:
    """Count messages that left the outbox: delivered ones with their latency since acceptance."""
    waits = [max(0.0, now - t) for t in delivered_enqueued_at]
    for wait in waits:
        DELIVERY_LATENCY_SECONDS.observe(wait)
    if waits:
        DELIVERIES.labels("delivered").inc(len(waits))
    if failed:
        DELIVERIES.labels("failed").inc(failed)


def decided(action: str, decision: Decision) -> None:
    """Count a decision of the rules on ``action``: one per rule that refused, nothing if allowed."""
    for refusal in decision.refusals:
        POLICY_REFUSALS.labels(action, refusal.rule_id).inc()


def envelope_rejected(reason: str) -> None:
    """Count an envelope from the partner that could not be opened or admitted (its reason code)."""
    ENVELOPES_REJECTED.labels(reason).inc()


def security_incident(kind: str) -> None:
    SECURITY_INCIDENTS.labels(kind).inc()


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    HTTP_REQUEST_SECONDS.labels(method, route, str(status)).observe(seconds)


def multiprocess_dir() -> Path | None:
    """The folder of the multi-process values, if this node runs in that mode."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def reset_multiprocess_dir() -> None:
    """Remove the values of earlier processes from the multi-process folder before a node's
    processes start (they would otherwise be added to this run's). The calling process's own file
    stays (it is already open); should an earlier run have had the same process id, its counts go
    on from where they were, which a counter may. Does nothing without ``PROMETHEUS_MULTIPROC_DIR``.
    Call it once, in the process that starts the others, before any of them counts."""
    folder = multiprocess_dir()
    if folder is None:
        return
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    mine = f"_{os.getpid()}"
    for stale in folder.glob("*.db"):
        if not stale.stem.endswith(mine):
            stale.unlink()


def render(*collectors: Collector, multiproc: Path | None = None) -> bytes:
    """The exposition (text format 0.0.4): this node's counters (every process's, in multi-process
    mode) followed by what ``collectors`` read at scrape time."""
    folder = multiproc if multiproc is not None else multiprocess_dir()
    if folder is not None:
        counted = CollectorRegistry()
        MultiProcessCollector(counted, path=str(folder))  # type: ignore[no-untyped-call]
        out = generate_latest(counted)
    else:
        out = generate_latest(REGISTRY)
    for collector in collectors:
        out += generate_latest(collector)
    return out
