"""verdicts, deferred state and replay keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
OLD_STATES = ("received", "processing", "processed", "failed")
NEW_STATES = ("received", "processing", "deferred", "processed", "failed")


def _state(states: tuple[str, ...]) -> sa.Enum:
    return sa.Enum(
        *states, name="message_state", native_enum=False, create_constraint=True, length=16
    )


def upgrade() -> None:
    with op.batch_alter_table("message") as batch:
        batch.alter_column("state", existing_type=_state(OLD_STATES), type_=_state(NEW_STATES))
        batch.add_column(sa.Column("verdict", JSON, nullable=True))
        batch.add_column(sa.Column("authenticated", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("auth_strength", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("deferrals", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("message") as batch:
        batch.alter_column("deferrals", server_default=None)
    op.create_table(
        "replay_key",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column(
            "message_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["message.id"],
            name=op.f("fk_replay_key_message_id_message"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_replay_key")),
    )


def downgrade() -> None:
    op.drop_table("replay_key")
    op.execute("UPDATE message SET state = 'received' WHERE state = 'deferred'")
    with op.batch_alter_table("message") as batch:
        batch.drop_column("next_attempt_at")
        batch.drop_column("deferrals")
        batch.drop_column("auth_strength")
        batch.drop_column("authenticated")
        batch.drop_column("verdict")
        batch.alter_column("state", existing_type=_state(NEW_STATES), type_=_state(OLD_STATES))
