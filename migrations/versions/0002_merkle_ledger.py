"""The ledger becomes an RFC 6962 Merkle log: leaves with their hashes, complete subtrees of level 1
and up, a head with root and frontier;
ledger rows become append-only in the database itself.

Existing first-ledger entries are re-encoded as leaves (same content, ``case_ref`` lifted out of
``data``) in their original order, so no recorded event is lost.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import hashlib
import json

import rfc8785
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

APPEND_ONLY = ("ledger_entries", "ledger_subtrees")


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def upgrade() -> None:
    bind = op.get_bind()
    old = bind.execute(
        sa.text(
            "select seq, at, event, message_id, actor, decision, rules, data from ledger_entries order by seq"
        )
    ).all()
    op.drop_index("ix_ledger_entries_message_id", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_table("ledger_head")
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("frontier", sa.Text, nullable=False),
    )
    entries = op.create_table(
        "ledger_entries",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("at", sa.String(40), nullable=False),
        sa.Column("event", sa.String(48), nullable=False),
        sa.Column("message_id", sa.String(64)),
        sa.Column("case_ref", sa.String(64)),
        sa.Column("actor", sa.String(64)),
        sa.Column("decision", sa.String(16)),
        sa.Column("rules", sa.Text, nullable=False),
        sa.Column("leaf", sa.Text, nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
    )
    op.create_index("ix_ledger_entries_message_id", "ledger_entries", ["message_id"])
    op.create_index("ix_ledger_entries_case_ref", "ledger_entries", ["case_ref"])
    op.create_index("ix_ledger_entries_event", "ledger_entries", ["event"])
    subtrees = op.create_table(
        "ledger_subtrees",
        sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
    )

    frontier: list[tuple[int, bytes]] = []
    rows, nodes = [], []
    for position, row in enumerate(old):
        rules = row.rules if isinstance(row.rules, list) else json.loads(row.rules)
        data = dict(row.data if isinstance(row.data, dict) else json.loads(row.data))
        case_ref = data.pop("case_ref", None)
        leaf = rfc8785.dumps(
            {
                "format": "exchange-ledger-entry/2",
                "seq": position,
                "at": row.at,
                "event": row.event,
                "message_id": row.message_id,
                "case_ref": case_ref,
                "actor": row.actor,
                "decision": row.decision,
                "rules": rules,
                "data": data,
            }
        )
        rows.append(
            {
                "seq": position,
                "at": row.at,
                "event": row.event,
                "message_id": row.message_id,
                "case_ref": case_ref,
                "actor": row.actor,
                "decision": row.decision,
                "rules": " " + " ".join(rules) + " " if rules else "",
                "leaf": leaf.decode(),
                "leaf_hash": hashlib.sha256(b"\x00" + leaf).digest(),
            }
        )
        frontier.append((0, rows[-1]["leaf_hash"]))
        while len(frontier) >= 2 and frontier[-1][0] == frontier[-2][0]:
            (level, right), (_, left) = frontier.pop(), frontier.pop()
            frontier.append((level + 1, _node(left, right)))
            nodes.append({"level": level + 1, "idx": position >> (level + 1), "hash": frontier[-1][1]})
    root = hashlib.sha256(b"").digest()
    if frontier:
        root = frontier[-1][1]
        for _, h in reversed(frontier[:-1]):
            root = _node(h, root)
    if rows:
        op.bulk_insert(entries, rows)
    if nodes:
        op.bulk_insert(subtrees, nodes)
    op.bulk_insert(
        head,
        [
            {
                "id": 1,
                "size": len(rows),
                "root_hash": root,
                "frontier": json.dumps([[lv, h.hex()] for lv, h in frontier]),
            }
        ],
    )

    if bind.dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION exchange_append_only() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$"
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table}"
                " FOR EACH STATEMENT EXECUTE FUNCTION exchange_append_only()"
            )
    else:
        for table in APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table}"
                    f" BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )


def downgrade() -> None:
    raise NotImplementedError("the Merkle ledger cannot be downgraded without rewriting its history")
