"""Agreement versions installed on a running node (``exchange agreement install``), each in force
from its ``effective_from``; the agreement file stays the node's first version.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agreements",
        sa.Column("version", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(64), nullable=False, unique=True),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("installed_at", sa.String(40), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("agreements")
