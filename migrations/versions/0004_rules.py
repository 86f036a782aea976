"""The rules: what release decisions need without decrypting (addressing, named recipients, subject
roles and data categories of a message), and the cases a client is restricted to.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("addressed_to", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("recipients", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("subject_roles", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("categories", sa.JSON, nullable=False, server_default="[]"))
        batch.add_column(sa.Column("mla_reference", sa.String(128)))
    op.create_index("ix_messages_case_ref", "messages", ["case_ref"])
    op.create_index("ix_messages_thread_id", "messages", ["thread_id"])
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("cases", sa.JSON, nullable=False, server_default='["ALL"]'))


def downgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("cases")
    op.drop_index("ix_messages_thread_id", "messages")
    op.drop_index("ix_messages_case_ref", "messages")
    with op.batch_alter_table("messages") as batch:
        for name in ("mla_reference", "categories", "subject_roles", "recipients", "addressed_to"):
            batch.drop_column(name)
