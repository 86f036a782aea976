"""Cosignatures of this node's checkpoints by the further witnesses the agreement names (C2SP
tlog-witness); the partner node's cosignature stays in ``checkpoints.cosignature``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "witness_cosignatures",
        sa.Column("size", sa.BigInteger, sa.ForeignKey("checkpoints.size"), primary_key=True),
        sa.Column("witness", sa.String(255), primary_key=True),
        sa.Column("cosignature", sa.Text, nullable=False),
        sa.Column("cosigned_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_witness_cosignatures_witness_size", "witness_cosignatures", ["witness", "size"])


def downgrade() -> None:
    op.drop_index("ix_witness_cosignatures_witness_size", "witness_cosignatures")
    op.drop_table("witness_cosignatures")
