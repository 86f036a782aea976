"""Signed checkpoints of this node's ledger (with the partner's cosignatures) and the partner
checkpoints this node witnessed (with the consistency proofs it checked).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoints",
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("cosignature", sa.Text),
        sa.Column("cosigned_at", sa.String(40)),
    )
    op.create_table(
        "witnessed",
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("previous_size", sa.BigInteger, nullable=False),
        sa.Column("proof", sa.Text, nullable=False),
        sa.Column("cosignature", sa.Text, nullable=False),
        sa.Column("witnessed_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("witnessed")
    op.drop_table("checkpoints")
