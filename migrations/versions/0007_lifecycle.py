"""Content at rest under per-message data keys, retention and destruction, control messages:
consent requests, reclassifications; response deadlines.

The transport envelope becomes optional (kept only until delivery); ``content`` is the signed JWS
encrypted under its own data key, wrapped by a key-encryption key that lives in the key directory.

Revision ID: 0007
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("envelope", existing_type=sa.Text, nullable=True)
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="information"))
        batch.add_column(sa.Column("content", sa.Text))
        batch.add_column(sa.Column("content_kid", sa.String(32)))
        batch.add_column(sa.Column("content_sha256", sa.String(64)))
        batch.add_column(sa.Column("signer_kid", sa.String(128)))
        batch.add_column(sa.Column("destroy_after", sa.String(40)))
        batch.add_column(sa.Column("destroyed_at", sa.String(40)))
        batch.add_column(sa.Column("destroyed_reason", sa.Text))
        batch.add_column(sa.Column("response_due", sa.String(40)))
        batch.add_column(sa.Column("overdue_at", sa.String(40)))
    op.create_index("ix_messages_destroy_after", "messages", ["destroy_after"])
    op.create_index("ix_messages_content_kid", "messages", ["content_kid"])
    op.create_index("ix_messages_in_reply_to", "messages", ["in_reply_to"])
    op.create_table(
        "consent_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("message_id", sa.String(64), nullable=False, index=True),
        sa.Column("direction", sa.String(3), nullable=False),  # out: we asked; in: asked of us
        sa.Column("requested_by", sa.String(64)),
        sa.Column("recipient", sa.String(64)),  # a third party, or NULL for the receiving police's own use
        sa.Column("purposes", sa.JSON, nullable=False),
        sa.Column("justification", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("requested_at", sa.String(40), nullable=False),
        sa.Column("decided_by", sa.String(64)),
        sa.Column("decided_at", sa.String(40)),
        sa.Column("conditions", sa.Text),
        sa.Column("expires_at", sa.String(40)),
        sa.Column("revoked_at", sa.String(40)),
    )
    op.create_table(
        "reclassifications",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(64), nullable=False, index=True),
        sa.Column("scheme", sa.String(32), nullable=False),
        sa.Column("from_level", sa.String(64), nullable=False),
        sa.Column("to_level", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("notice_id", sa.String(64), nullable=False),
        sa.Column("at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reclassifications")
    op.drop_table("consent_requests")
    op.drop_index("ix_messages_in_reply_to", "messages")
    op.drop_index("ix_messages_content_kid", "messages")
    op.drop_index("ix_messages_destroy_after", "messages")
    with op.batch_alter_table("messages") as batch:
        for name in (
            "overdue_at",
            "response_due",
            "destroyed_reason",
            "destroyed_at",
            "destroy_after",
            "signer_kid",
            "content_sha256",
            "content_kid",
            "content",
            "kind",
        ):
            batch.drop_column(name)
        batch.alter_column("envelope", existing_type=sa.Text, nullable=False)
