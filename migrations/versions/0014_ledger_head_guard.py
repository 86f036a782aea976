"""The ledger head's guard on PostgreSQL: ``ledger_head_is(size, root, expected_size,
expected_root)`` is true when the stored head is the one a transaction appended after (its size
and its root: a database restored and grown back to the same size has another root), and raises
otherwise. A batch of the
group committer that did not lock the head first (it appended after the head its process last
committed, docs/adr/0004) writes the new head only where the guard holds: if another writer moved
the head meanwhile, the write fails and nothing of the transaction is committed. SQLite needs no
function: a writer holds the database's write lock from its first statement.

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION ledger_head_is(
            stored_size bigint, stored_root bytea, expected_size bigint, expected_root bytea
        ) RETURNS boolean
        LANGUAGE plpgsql AS $$
        BEGIN
            IF stored_size IS DISTINCT FROM expected_size OR stored_root IS DISTINCT FROM expected_root THEN
                RAISE EXCEPTION 'the ledger head moved: it holds % entries, the head of % was expected',
                    stored_size, expected_size
                    USING HINT = 'another writer appended meanwhile: append again after the head';
            END IF;
            RETURN true;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS ledger_head_is(bigint, bytea, bigint, bytea)")
