"""Repository of submission idempotency keys: (client, key) -> request digest, message, answer.

Each function takes a Connection inside a unit of work and never commits. A key is inserted in the
transaction that writes the message it names, so a key exists if and only if its message does.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from exchange.db import engine
from exchange.db.schema import idempotency_keys

_INSERT = idempotency_keys.insert()


@dataclass(frozen=True)
class KeyRow:
    client_id: str
    key: str
    request_sha256: str
    message_id: str
    response: str  # the original answer, JSON


def get(conn: Connection, client_id: str, key: str) -> KeyRow | None:
    row = conn.execute(
        sa.select(idempotency_keys).where(
            idempotency_keys.c.client_id == client_id, idempotency_keys.c.key == key
        )
    ).first()
    if row is None:
        return None
    return KeyRow(row.client_id, row.key, row.request_sha256, row.message_id, row.response)


def insert(
    conn: Connection,
    *,
    client_id: str,
    key: str,
    request_sha256: str,
    message_id: str,
    response: str,
    at: str,
) -> None:
    """Store a key with its message (deferred to the commit in a transaction that defers its
    inserts: the message's row goes first)."""
    engine.insert(
        conn,
        _INSERT,
        [
            {
                "client_id": client_id,
                "key": key,
                "request_sha256": request_sha256,
                "message_id": message_id,
                "response": response,
                "created_at": at,
            }
        ],
    )
