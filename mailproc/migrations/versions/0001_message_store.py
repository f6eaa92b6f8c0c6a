"""message store

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "message",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "received",
                "processing",
                "processed",
                "failed",
                name="message_state",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("received_at", UTC_DATETIME, nullable=False),
        sa.Column("protocol", sa.String(length=16), nullable=False),
        sa.Column("peer_ip", sa.String(length=64), nullable=False),
        sa.Column("peer_port", sa.Integer(), nullable=True),
        sa.Column("helo", sa.String(length=255), nullable=True),
        sa.Column("client_ip", sa.String(length=64), nullable=True),
        sa.Column("client_name", sa.String(length=255), nullable=True),
        sa.Column("client_helo", sa.String(length=255), nullable=True),
        sa.Column("client_protocol", sa.String(length=64), nullable=True),
        sa.Column("xforward", JSON, nullable=True),
        sa.Column("mail_from", sa.Text(), nullable=False),
        sa.Column("rcpt_tos", JSON, nullable=False),
        sa.Column("tls", JSON, nullable=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("intake_flags", JSON, nullable=False),
        sa.Column("parsed", JSON, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", UTC_DATETIME, nullable=True),
        sa.Column("processed_at", UTC_DATETIME, nullable=True),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message")),
    )
    op.create_index("ix_message_state_id", "message", ["state", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_message_state_id", table_name="message")
    op.drop_table("message")
