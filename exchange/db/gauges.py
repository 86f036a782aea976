"""The queries behind the metrics a scrape reads from the database (``/metrics``).

Each is bounded: the outbox is as long as the delivery backlog, the incident events are found
through the event index, the ledger size and the latest checkpoints are single rows. The one
full scan, messages counted by direction, type and status, is cached by the caller
(:class:`exchange.observability.metrics.NodeCollector`). Read-only; no commit happens here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from exchange.db import repo
from exchange.db.schema import ledger_entries, messages, outbox


@dataclass(frozen=True)
class OutboxGauges:
    depth: int  # messages waiting for delivery (leased ones included)
    oldest_enqueued_at: float | None  # epoch seconds
    retrying: int  # waiting after at least one failed attempt (the partner unreachable)


@dataclass(frozen=True)
class CheckpointGauges:
    signed_size: int
    signed_at: str | None  # RFC 3339
    cosigned_size: int
    cosigned_at: str | None


def message_counts(conn: Connection) -> list[tuple[str, str, str, int]]:
    """(direction, type, status, count) of every stored message."""
    rows = conn.execute(
        sa.select(messages.c.direction, messages.c.type, messages.c.status, sa.func.count()).group_by(
            messages.c.direction, messages.c.type, messages.c.status
        )
    )
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in rows]


def outbox_gauges(conn: Connection) -> OutboxGauges:
    row = conn.execute(
        sa.select(
            sa.func.count(),
            sa.func.min(outbox.c.enqueued_at),
            sa.func.count(outbox.c.last_error),
        )
    ).one()
    return OutboxGauges(int(row[0]), float(row[1]) if row[1] is not None else None, int(row[2]))


def checkpoint_gauges(conn: Connection) -> CheckpointGauges:
    signed = repo.latest_checkpoint(conn)
    cosigned = repo.latest_checkpoint(conn, cosigned=True)
    return CheckpointGauges(
        int(signed["size"]) if signed else 0,
        str(signed["created_at"]) if signed else None,
        int(cosigned["size"]) if cosigned else 0,
        str(cosigned["cosigned_at"]) if cosigned and cosigned["cosigned_at"] else None,
    )


def event_counts(conn: Connection, events: Sequence[str]) -> dict[str, int]:
    """How many ledger entries record each of ``events`` (through the event index)."""
    rows = conn.execute(
        sa.select(ledger_entries.c.event, sa.func.count())
        .where(ledger_entries.c.event.in_(list(events)))
        .group_by(ledger_entries.c.event)
    )
    found = {str(r[0]): int(r[1]) for r in rows}
    return {event: found.get(event, 0) for event in events}
