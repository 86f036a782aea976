"""Free text stays sealed, and a message records the unit that originated it.

- A consent request's justification and a decision's conditions, and a reclassification's reason,
  are kept only in the sealed control messages that carried them (``request_control_id``,
  ``decision_control_id``, ``control_id``): the columns that held them in clear become nullable and
  are emptied at the node's next start (``Node._seal_legacy_words``, which needs the node's keys to
  find the control message of each row).
- ``messages.origin_agency`` and ``origin_unit``: the originating agency and unit as signed, so
  that only a decider of the originating unit acts for the originator. Rows stored before are read
  from their sealed content when needed.

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


def downgrade() -> None:
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
