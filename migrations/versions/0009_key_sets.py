"""Key sets: every key-set announcement after the agreement's initial version, of this node and of
its partner, with the partner's signed receipt of ours; and when the partner was first seen using each
of our encryption keys (an old one is destroyed a grace period after).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_sets",
        sa.Column("party", sa.String(2), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("announcement", sa.Text, nullable=False),
        sa.Column("issued_at", sa.String(40), nullable=False),
        sa.Column("recorded_at", sa.String(40), nullable=False),
        sa.Column("acknowledged_at", sa.String(40)),
        sa.Column("receipt", sa.Text),
    )
    op.create_table(
        "key_usage",
        sa.Column("kid", sa.String(128), primary_key=True),
        sa.Column("first_seen_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("key_usage")
    op.drop_table("key_sets")
