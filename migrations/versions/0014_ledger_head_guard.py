"""The ledger head's guard on PostgreSQL: ``ledger_head_is(stored, expected)`` is true when the
stored head's size is the one a transaction appended after, and raises otherwise. A batch of the
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
        CREATE OR REPLACE FUNCTION ledger_head_is(stored bigint, expected bigint) RETURNS boolean
        LANGUAGE plpgsql AS $$
        BEGIN
            IF stored IS DISTINCT FROM expected THEN
                RAISE EXCEPTION 'the ledger head moved: it holds % entries, % were expected', stored, expected
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
    op.execute("DROP FUNCTION IF EXISTS ledger_head_is(bigint, bigint)")
