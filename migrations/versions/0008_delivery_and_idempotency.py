"""Delivery hardening: who holds an outbox lease (a restarted node takes its own back at once), and
the idempotency keys of submissions (a retried submission returns the original answer).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("leased_by", sa.String(200)))
    op.create_index("ix_outbox_enqueued_at", "outbox", ["enqueued_at"])
    op.create_table(
        "idempotency_keys",
        sa.Column("client_id", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(64), sa.ForeignKey("messages.id"), nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_index("ix_outbox_enqueued_at", "outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("leased_by")
