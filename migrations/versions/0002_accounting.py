"""Accounting: report times and online seconds, round receipts and their members, verification failures.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 23:30:36.363279
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("uploaded_by", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_rounds_run_id_runs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["uploaded_by"], ["users.id"], name=op.f("fk_rounds_uploaded_by_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rounds")),
        sa.UniqueConstraint("round_id", name=op.f("uq_rounds_round_id")),
    )
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rounds_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_rounds_run_id"), ["run_id"], unique=False)

    op.create_table(
        "verification_failures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("peer_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.String(length=500), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_verification_failures_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_verification_failures_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verification_failures")),
    )
    with op.batch_alter_table("verification_failures", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_verification_failures_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_verification_failures_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_verification_failures_user_id"), ["user_id"], unique=False)

    op.create_table(
        "round_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_pk", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("peer_id", sa.String(length=32), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["round_pk"], ["rounds.id"], name=op.f("fk_round_members_round_pk_rounds"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_round_members_run_id_runs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_round_members_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_round_members")),
        sa.UniqueConstraint("round_pk", "peer_id", name=op.f("uq_round_members_round_pk")),
    )
    with op.batch_alter_table("round_members", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_round_members_peer_id"), ["peer_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_round_members_round_pk"), ["round_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_round_members_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_round_members_user_id"), ["user_id"], unique=False)

    # Reports written before this revision take their arrival time as their report time.
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("reported_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("online_seconds", sa.Float(), nullable=False, server_default="0"))
    op.execute("UPDATE reports SET reported_at = created_at")
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.alter_column("reported_at", existing_type=sa.DateTime(), nullable=False)
        batch_op.alter_column("online_seconds", existing_type=sa.Float(), server_default=None)
        batch_op.create_index(batch_op.f("ix_reports_reported_at"), ["reported_at"], unique=False)
        batch_op.create_index("ix_reports_run_peer_time", ["run_id", "peer_id", "reported_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reports", schema=None) as batch_op:
        batch_op.drop_index("ix_reports_run_peer_time")
        batch_op.drop_index(batch_op.f("ix_reports_reported_at"))
        batch_op.drop_column("online_seconds")
        batch_op.drop_column("reported_at")

    with op.batch_alter_table("round_members", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_round_members_user_id"))
        batch_op.drop_index(batch_op.f("ix_round_members_run_id"))
        batch_op.drop_index(batch_op.f("ix_round_members_round_pk"))
        batch_op.drop_index(batch_op.f("ix_round_members_peer_id"))

    op.drop_table("round_members")
    with op.batch_alter_table("verification_failures", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_verification_failures_user_id"))
        batch_op.drop_index(batch_op.f("ix_verification_failures_run_id"))
        batch_op.drop_index(batch_op.f("ix_verification_failures_created_at"))

    op.drop_table("verification_failures")
    with op.batch_alter_table("rounds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rounds_run_id"))
        batch_op.drop_index(batch_op.f("ix_rounds_created_at"))

    op.drop_table("rounds")
