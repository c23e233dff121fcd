"""Runs: diloco's parameters, inner_steps (local steps between averaging rounds) and overlap, set by the run.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 03:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Server defaults fill the rows that exist with what `hivewire join` used before the run decided: H=500, overlap.
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("inner_steps", sa.Integer(), server_default="500", nullable=False))
        batch_op.add_column(sa.Column("overlap", sa.Boolean(), server_default=sa.true(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("overlap")
        batch_op.drop_column("inner_steps")
