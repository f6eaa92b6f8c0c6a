"""The database schema as typed SQLAlchemy models; Alembic migrations in ``migrations/`` own
every change to it."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONData = JSON().with_variant(JSONB(), "postgresql")
# SQLite only makes INTEGER PRIMARY KEY an alias of its rowid (auto-increment).
BigID = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONData,
    }


def utcnow() -> datetime:
    return datetime.now(UTC)


class MessageState(enum.StrEnum):
    """Where a stored message is in its life. ``received`` is the durable promise behind our
    ``250``; a message leaves it only by being processed or by failing with a recorded error."""

    RECEIVED = "received"
    PROCESSING = "processing"
    # Waiting on DNS: evaluated again at ``next_attempt_at``.
    DEFERRED = "deferred"
    PROCESSED = "processed"
    FAILED = "failed"


class Message(Base):
    """One message as it arrived: the exact bytes, the SMTP envelope and where it came from."""

    __tablename__ = "message"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    state: Mapped[MessageState] = mapped_column(
        Enum(
            MessageState,
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
            validate_strings=True,
            create_constraint=True,
            name="message_state",
        )
    )
    received_at: Mapped[datetime]
    protocol: Mapped[str] = mapped_column(String(16))
    peer_ip: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int | None]
    helo: Mapped[str | None] = mapped_column(String(255))
    # The original client: the peer itself, or what a trusted proxy said with XFORWARD.
    client_ip: Mapped[str | None] = mapped_column(String(64))
    client_name: Mapped[str | None] = mapped_column(String(255))
    client_helo: Mapped[str | None] = mapped_column(String(255))
    client_protocol: Mapped[str | None] = mapped_column(String(64))
    xforward: Mapped[dict[str, Any] | None]
    mail_from: Mapped[str] = mapped_column(Text)
    rcpt_tos: Mapped[list[str]] = mapped_column(JSONData)
    tls: Mapped[dict[str, Any] | None]
    size: Mapped[int]
    sha256: Mapped[str] = mapped_column(String(64))
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    # When retention replaced ``raw`` by its header block (``size`` and ``sha256`` still
    # describe the message as received).
    raw_purged_at: Mapped[datetime | None]
    # Wire-level findings (bare CR/LF, NUL, smuggling sequences); never "fixed" in ``raw``.
    intake_flags: Mapped[list[str]] = mapped_column(JSONData)
    parsed: Mapped[dict[str, Any] | None]
    verdict: Mapped[dict[str, Any] | None]
    authenticated: Mapped[bool | None]
    auth_strength: Mapped[str | None] = mapped_column(String(8))
    # What the rules made of it: the account match, the rule, the action and what came of it.
    decision: Mapped[dict[str, Any] | None]
    attempts: Mapped[int] = mapped_column(default=0)
    deferrals: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    processed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]

    __table_args__ = (Index("ix_message_state_id", "state", "id"),)


class ReplayKey(Base):
    """A DKIM signature or Message-ID already seen: the same again is a replay."""

    __tablename__ = "replay_key"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    message_id: Mapped[int] = mapped_column(BigID, ForeignKey("message.id", ondelete="CASCADE"))
    seen_at: Mapped[datetime]


class OutboxState(enum.StrEnum):
    """Where an outgoing reply is. ``pending`` waits for its (next) attempt; ``suppressed`` was
    never to be sent (loop and backscatter rules, rate limit) and says why."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    SUPPRESSED = "suppressed"


class OutboxEntry(Base):
    """One reply to send, written in the same transaction as the change that caused it; the
    sender delivers it through the relay, retrying, and never again once it was accepted."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    state: Mapped[OutboxState] = mapped_column(
        Enum(
            OutboxState,
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
            validate_strings=True,
            create_constraint=True,
            name="outbox_state",
        )
    )
    template: Mapped[str] = mapped_column(String(64))
    locale: Mapped[str] = mapped_column(String(16))
    recipient: Mapped[str] = mapped_column(String(320))
    subject: Mapped[str] = mapped_column(Text)
    # Our Message-ID for the reply (without angle brackets): the same on every attempt.
    message_id_header: Mapped[str] = mapped_column(String(255), unique=True)
    # The composed message, unsigned (a DKIM signature is added at each attempt).
    content: Mapped[bytes] = mapped_column(LargeBinary)
    source_message_id: Mapped[int | None] = mapped_column(
        BigID, ForeignKey("message.id", ondelete="SET NULL")
    )
    suppressed_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    relay_reply: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_outbox_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_outbox_recipient_created_at", "recipient", "created_at"),
    )


class RequestState(enum.StrEnum):
    """A reset request's life: ``pending`` until an agent decides; ``approved`` until the reset
    is executed (``completed``) or its execution fails for good (``failed``)."""

    PENDING = "pending"
    APPROVED = "approved"
    COMPLETED = "completed"
    DENIED = "denied"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    FAILED = "failed"


OPEN_REQUEST_STATES = (RequestState.PENDING, RequestState.APPROVED)


class ResetRequest(Base):
    """A verified request to reset an account's security question, waiting for an agent."""

    __tablename__ = "reset_request"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    reference: Mapped[str] = mapped_column(String(32), unique=True)
    state: Mapped[RequestState] = mapped_column(
        Enum(
            RequestState,
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
            validate_strings=True,
            create_constraint=True,
            name="request_state",
        )
    )
    account_id: Mapped[str] = mapped_column(String(255))
    email: Mapped[str] = mapped_column(String(320))
    account_name: Mapped[str | None] = mapped_column(Text)
    locale: Mapped[str | None] = mapped_column(String(35))
    # The message that opened the request; later ones that joined it are in request_message.
    message_id: Mapped[int | None] = mapped_column(
        BigID, ForeignKey("message.id", ondelete="SET NULL")
    )
    auth_strength: Mapped[str] = mapped_column(String(8))
    verdict: Mapped[dict[str, Any]]
    decision: Mapped[dict[str, Any]]
    risk_flags: Mapped[list[str]] = mapped_column(JSONData)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    decided_at: Mapped[datetime | None]
    # The agents whose approval (or denial, or cancel) decided it, comma-separated, and the
    # note (approval) or reason (denial, cancel, failure) that goes with it.
    decided_by: Mapped[str | None] = mapped_column(String(300))
    decision_note: Mapped[str | None] = mapped_column(Text)
    completed_at: Mapped[datetime | None]
    # The agent working on it now (the console's claim), so that two do not.
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_reset_request_state_created_at", "state", "created_at"),
        Index("ix_reset_request_account_id_created_at", "account_id", "created_at"),
        # At most one open request per account, whatever races between workers.
        Index(
            "uq_reset_request_open_account",
            "account_id",
            unique=True,
            sqlite_where=text("state IN ('pending', 'approved')"),
            postgresql_where=text("state IN ('pending', 'approved')"),
        ),
    )


class RequestMessage(Base):
    """Every message that asked for a request: the one that opened it and those that joined."""

    __tablename__ = "request_message"

    message_id: Mapped[int] = mapped_column(
        BigID, ForeignKey("message.id", ondelete="CASCADE"), primary_key=True
    )
    request_id: Mapped[int] = mapped_column(
        BigID, ForeignKey("reset_request.id", ondelete="CASCADE"), index=True
    )
    joined_at: Mapped[datetime]


class AuditEvent(Base):
    """One thing that happened (a message decided, a request created, joined, decided,
    executed, ...): who, when, from which state to which, and why. Written in the transaction of
    the change itself, and chained: each carries the hash of the one before it, so a row changed
    or removed afterwards is found by ``mailproc audit verify``."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    # Plain foreign keys: the log is append-only, so nothing may delete or rewrite its rows.
    request_id: Mapped[int | None] = mapped_column(
        BigID, ForeignKey("reset_request.id"), index=True
    )
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None]
    message_id: Mapped[int | None] = mapped_column(BigID, ForeignKey("message.id"))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class Sighting(Base):
    """An address seen imitating a registered one (homoglyphs, mixed scripts): later requests
    for the imitated account carry the risk flag ``lookalike_seen``."""

    __tablename__ = "lookalike_sighting"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    resembles: Mapped[str] = mapped_column(String(320), index=True)
    address: Mapped[str] = mapped_column(String(320))
    message_id: Mapped[int | None] = mapped_column(
        BigID, ForeignKey("message.id", ondelete="SET NULL")
    )
    seen_at: Mapped[datetime]


class AgentRole(enum.StrEnum):
    """``agent``: approves and denies. ``admin``: also cancels, retries failed resets and
    manages agents."""

    AGENT = "agent"
    ADMIN = "admin"


class Agent(Base):
    """A person who decides requests. Never deleted (the audit log names them): disabled."""

    __tablename__ = "agent"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[AgentRole] = mapped_column(
        Enum(
            AgentRole,
            native_enum=False,
            length=16,
            values_callable=lambda roles: [r.value for r in roles],
            validate_strings=True,
            create_constraint=True,
            name="agent_role",
        )
    )
    # argon2id, in the PHC string format.
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    disabled_at: Mapped[datetime | None]
    # The console's second factor (RFC 6238 TOTP): the shared secret once enrolled, and the
    # last time step accepted, so that no code is accepted twice.
    totp_secret: Mapped[str | None] = mapped_column(String(64))
    mfa_enrolled_at: Mapped[datetime | None]
    totp_last_step: Mapped[int | None] = mapped_column(BigInteger)
    # Failed sign-ins in a row, and until when the agent is locked out.
    failed_logins: Mapped[int] = mapped_column(default=0, server_default="0")
    locked_until: Mapped[datetime | None]


class ApprovalVote(Base):
    """One agent's approval of a request that needs two (four-eyes): the first is recorded
    here, the second, by a different agent, carries the request to ``approved``."""

    __tablename__ = "approval_vote"

    request_id: Mapped[int] = mapped_column(BigID, ForeignKey("reset_request.id"), primary_key=True)
    agent_id: Mapped[int] = mapped_column(BigID, ForeignKey("agent.id"), primary_key=True)
    note: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime]


class ExecutionState(enum.StrEnum):
    """Where carrying out an approved reset is: ``pending`` waits for its (next) attempt,
    ``running`` is held by one instance, ``manual`` waits for an agent to do it by hand."""

    PENDING = "pending"
    RUNNING = "running"
    MANUAL = "manual"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ResetExecution(Base):
    """Carrying out one approved reset, with retries: at most one per request (the request id
    is the idempotency key the application sees), and never run again once it succeeded."""

    __tablename__ = "reset_execution"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    request_id: Mapped[int] = mapped_column(BigID, ForeignKey("reset_request.id"), unique=True)
    method: Mapped[str] = mapped_column(String(16))
    state: Mapped[ExecutionState] = mapped_column(
        Enum(
            ExecutionState,
            native_enum=False,
            length=16,
            values_callable=lambda states: [s.value for s in states],
            validate_strings=True,
            create_constraint=True,
            name="execution_state",
        )
    )
    # What the application receives: the same bytes on every attempt.
    payload: Mapped[dict[str, Any]]
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    # The application's answer to the last attempt (status and the start of the body).
    response: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_reset_execution_state_next_attempt_at", "state", "next_attempt_at"),
    )


class WebSession(Base):
    """A signed-in console session. The cookie holds a random token; only its SHA-256 is
    stored. ``mfa_passed`` is false between the password and the second factor."""

    __tablename__ = "web_session"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[int] = mapped_column(BigID, ForeignKey("agent.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    mfa_passed: Mapped[bool] = mapped_column(default=False)
    # A TOTP secret offered at enrolment, until the agent confirms it with a code.
    pending_totp: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class ApiToken(Base):
    """A bearer token for the JSON API, acting as one agent. Only its SHA-256 is stored."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    agent_id: Mapped[int] = mapped_column(BigID, ForeignKey("agent.id"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class StoredSecret(Base):
    """A key mailproc generated for itself (the cancel links' signing key when
    ``[web] secret_key`` is not set), shared by every instance on the database."""

    __tablename__ = "stored_secret"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime]
