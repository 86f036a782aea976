"""Client certificate renewal: each registered client's certificate expiry, and the certificate it
replaced, still accepted until a stated time (the overlap of ``exchange clients renew``).

Revision ID: 0012
Revises: 0009
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.add_column(sa.Column("cert_not_after", sa.String(40)))
        batch.add_column(sa.Column("previous_fingerprint", sa.String(64)))
        batch.add_column(sa.Column("previous_until", sa.String(40)))


def downgrade() -> None:
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("previous_until")
        batch.drop_column("previous_fingerprint")
        batch.drop_column("cert_not_after")
