"""Runs: max_peers (how many peers may be live at once) and status (open or closed).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 01:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Server defaults fill the rows that exist: existing runs stay open and unlimited.
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_peers", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("status", sa.String(length=16), server_default="open", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("status")
        batch_op.drop_column("max_peers")
