"""Free text stays sealed, and a message records the unit that originated it.

- A consent request's justification and a decision's conditions, and a reclassification's reason,
  are kept only in the sealed control messages that carried them (``request_control_id``,
  ``decision_control_id``, ``control_id``): the columns that held them in clear become nullable and
  are emptied at the node's next start (``Lifecycle.seal_legacy_rows``, which needs the node's keys
  to find the control message of each row). A downgrade leaves them empty: the older code shows
  ``''`` where the words were (they stay in the sealed control messages).
- ``messages.origin_agency`` and ``origin_unit``: the originating agency and unit as signed, so
  that only a decider of the originating unit acts for the originator: filled here from the
  submitting client's registration, or at the node's next start from the sealed content if that
  client was removed.

Stop every process of the node before migrating: one still on the older code would write words in
clear again.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("consent_requests") as batch:
        batch.add_column(sa.Column("request_control_id", sa.String(64)))
        batch.add_column(sa.Column("decision_control_id", sa.String(64)))
        batch.alter_column("justification", existing_type=sa.Text, nullable=True)
    with op.batch_alter_table("reclassifications") as batch:
        batch.add_column(sa.Column("control_id", sa.String(64)))
        batch.alter_column("reason", existing_type=sa.Text, nullable=True)
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("origin_agency", sa.String(128)))
        batch.add_column(sa.Column("origin_unit", sa.String(128)))
    # a sent message's origin is its submitting client's agency and unit (a registration never
    # changes them); the node reads the origin of those whose client was removed from their content
    op.execute(
        """
        UPDATE messages SET
            origin_agency = (SELECT agency FROM clients WHERE clients.id = messages.submitted_by),
            origin_unit = (SELECT unit FROM clients WHERE clients.id = messages.submitted_by)
        WHERE direction = 'out' AND kind = 'information' AND submitted_by IN (SELECT id FROM clients)
        """
    )
    unknown = sa.text("origin_unit IS NULL")
    op.create_index(
        "ix_messages_origin_unknown", "messages", ["id"], postgresql_where=unknown, sqlite_where=unknown
    )


def downgrade() -> None:
    op.drop_index("ix_messages_origin_unknown", table_name="messages")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("origin_unit")
        batch.drop_column("origin_agency")
    op.execute("UPDATE reclassifications SET reason = '' WHERE reason IS NULL")  # (the words are sealed)
    with op.batch_alter_table("reclassifications") as batch:
        batch.alter_column("reason", existing_type=sa.Text, nullable=False)
        batch.drop_column("control_id")
    op.execute("UPDATE consent_requests SET justification = '' WHERE justification IS NULL")
    with op.batch_alter_table("consent_requests") as batch:
        batch.alter_column("justification", existing_type=sa.Text, nullable=False)
        batch.drop_column("decision_control_id")
        batch.drop_column("request_control_id")
