"""Reset requests: opened (or joined) in the transaction that records the message's decision,
each change written with its audit event; read by the CLI, and by the console and API later."""

from __future__ import annotations

import builtins
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    bindparam,
    event,
    exists,
    func,
    insert,
    or_,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError

from mailproc.accounts import Account
from mailproc.db import Database
from mailproc.errors import InvalidState, NotFound
from mailproc.models import (
    OPEN_REQUEST_STATES,
    Agent,
    ApprovalVote,
    AuditEvent,
    Base,
    RequestMessage,
    RequestState,
    ResetExecution,
    ResetRequest,
    utcnow,
)

# References are read out over the phone and typed by people: no 0/O, 1/I/L.
_REFERENCE_ALPHABET = "23456789ABCDEFGHJKMNPQRSTUVWXYZ"
RISK_WINDOW = timedelta(days=30)
SYSTEM = "mailproc"


def new_reference() -> str:
    return "R-" + "".join(secrets.choice(_REFERENCE_ALPHABET) for _ in range(8))


@dataclass(frozen=True)
class Opened:
    request_id: int
    reference: str
    joined: bool  # True: the message joined a request that was already open
    expires_at: datetime


GENESIS = "0" * 64


def _event_hash(prev_hash: str, event: dict[str, Any]) -> str:
    """The hash of one audit event: its fields (canonical JSON) after the previous hash."""
    body = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def _event_fields(
    request_id: int | None,
    at: datetime,
    actor: str,
    action: str,
    from_state: str | None,
    to_state: str | None,
    reason: str | None,
    details: dict[str, Any] | None,
    message_id: int | None,
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": actor,
        "action": action,
        "from_state": from_state,
        "to_state": to_state,
        "reason": reason,
        "details": details,
        "message_id": message_id,
    }


# Statements of the worker's hot path, built once (SQLAlchemy then only looks them up).
_TABLES = Base.metadata.tables
_LOCK_AUDIT_LOG = text("SELECT pg_advisory_xact_lock(hashtext('mailproc-audit'))")
_LAST_HASH = (
    select(_TABLES["audit_event"].c.hash).order_by(_TABLES["audit_event"].c.id.desc()).limit(1)
)
_INSERT_EVENT = insert(_TABLES["audit_event"])
# The hash of the last event this transaction appended, with the transaction it belongs to:
# while it holds the append lock nobody else appends, so the next event follows that one.
_TAIL = "mailproc.audit_tail"


def _forget_tail(connection: Connection) -> None:
    # An invalidated or closed connection's transaction is over anyway, and a tail is only
    # used within the transaction that wrote it (``audit`` checks).
    if not connection.closed and not connection.invalidated:
        connection.info.pop(_TAIL, None)


@event.listens_for(Engine, "commit")
def _on_commit(connection: Connection) -> None:
    _forget_tail(connection)


@event.listens_for(Engine, "rollback")
def _on_rollback(connection: Connection) -> None:
    _forget_tail(connection)


@event.listens_for(Engine, "rollback_savepoint")
def _on_rollback_savepoint(connection: Connection, name: str, context: Any) -> None:
    # The events appended since the savepoint are gone (and on PostgreSQL maybe the lock too).
    _forget_tail(connection)


def lock_audit_log(connection: Connection) -> None:
    """Take the audit log's append lock now (PostgreSQL; held to the end of the transaction).
    A transaction that will lock request or execution rows and then write an audit event
    takes it first: the workers hold it while they lock request rows, so the other order
    could make two transactions wait on each other."""
    if connection.dialect.name == "postgresql":
        connection.execute(_LOCK_AUDIT_LOG)


def audit(
    connection: Connection,
    request_id: int | None,
    *,
    action: str,
    at: datetime,
    actor: str = SYSTEM,
    from_state: RequestState | None = None,
    to_state: RequestState | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    message_id: int | None = None,
) -> None:
    """Append one event to the chained audit log, in the caller's transaction."""
    transaction = connection.get_transaction()
    tail = connection.info.get(_TAIL)
    if tail is not None and transaction is not None and tail[0] is transaction:
        # This transaction appended last and still holds the lock: no need to read it back.
        prev_hash = tail[1]
    else:
        # One appender at a time, so that every event follows exactly the one before it.
        lock_audit_log(connection)
        prev_hash = connection.execute(_LAST_HASH).scalar_one_or_none() or GENESIS
        transaction = connection.get_transaction()
    fields = _event_fields(
        request_id,
        at,
        actor,
        action,
        from_state.value if from_state else None,
        to_state.value if to_state else None,
        reason,
        details,
        message_id,
    )
    event_hash = _event_hash(prev_hash, fields)
    connection.execute(
        _INSERT_EVENT,
        {
            "request_id": request_id,
            "at": at,
            "actor": actor,
            "action": action,
            "from_state": fields["from_state"],
            "to_state": fields["to_state"],
            "reason": reason,
            "details": details,
            "message_id": message_id,
            "prev_hash": prev_hash,
            "hash": event_hash,
        },
    )
    if transaction is not None:
        connection.info[_TAIL] = (transaction, event_hash)


@dataclass(frozen=True)
class ChainReport:
    events: int
    broken_at: int | None  # the id of the first event that does not fit
    problem: str | None


def verify_chain(database: Database, batch: int = 1000) -> ChainReport:
    """Walk the audit log in order and check every link: each event's stored hash must be the
    hash of its own fields after the previous event's hash."""
    expected_prev = GENESIS
    count = 0
    last_id = 0
    with database.reading() as session:
        while True:
            rows = list(
                session.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.id > last_id)
                    .order_by(AuditEvent.id)
                    .limit(batch)
                )
            )
            if not rows:
                return ChainReport(count, None, None)
            for event in rows:
                fields = _event_fields(
                    event.request_id,
                    event.at,
                    event.actor,
                    event.action,
                    event.from_state,
                    event.to_state,
                    event.reason,
                    event.details,
                    event.message_id,
                )
                if event.prev_hash != expected_prev:
                    return ChainReport(
                        count,
                        event.id,
                        "it does not follow the event before it (an event was removed or inserted)",
                    )
                if _event_hash(event.prev_hash, fields) != event.hash:
                    return ChainReport(
                        count, event.id, "its content was changed after it was written"
                    )
                expected_prev = event.hash
                count += 1
                last_id = event.id


_REQUESTS = _TABLES["reset_request"]
_REQUEST_MESSAGES = _TABLES["request_message"]
_SIGHTINGS = _TABLES["lookalike_sighting"]
_OUTBOX = _TABLES["outbox"]
# What risk_flags asks, in one round trip: a lookalike seen lately, the account's requests
# (ever, and lately), and whether anything was ever written to the address before now.
_RISK = select(
    exists()
    .where(
        _SIGHTINGS.c.resembles == bindparam("email"),
        _SIGHTINGS.c.seen_at > bindparam("sighting_since"),
    )
    .label("lookalike_seen"),
    select(func.count())
    .where(_REQUESTS.c.account_id == bindparam("account_id"))
    .scalar_subquery()
    .label("earlier"),
    select(func.count())
    .where(
        _REQUESTS.c.account_id == bindparam("account_id"),
        _REQUESTS.c.created_at > bindparam("request_since"),
    )
    .scalar_subquery()
    .label("recent"),
    exists()
    .where(_OUTBOX.c.recipient == bindparam("email"), _OUTBOX.c.created_at < bindparam("now"))
    .label("replied_before"),
)
_OPEN_REQUEST = (
    select(_REQUESTS.c.id, _REQUESTS.c.reference, _REQUESTS.c.expires_at)
    .where(
        _REQUESTS.c.account_id == bindparam("account_id"),
        # IN spelled out: a constant list would be expanded anew at every execution.
        or_(*(_REQUESTS.c.state == state for state in OPEN_REQUEST_STATES)),
    )
    .with_for_update()
)
_INSERT_REQUEST = insert(_REQUESTS).returning(_REQUESTS.c.id)
_MESSAGE_JOINED = select(_REQUEST_MESSAGES.c.request_id).where(
    _REQUEST_MESSAGES.c.message_id == bindparam("message_id")
)
_INSERT_REQUEST_MESSAGE = insert(_REQUEST_MESSAGES)
_INSERT_SIGHTING = insert(_SIGHTINGS)


def risk_flags(connection: Connection, account: Account, strength: str, now: datetime) -> list[str]:
    """What an agent should look at twice before approving."""
    flags = []
    if strength != "strong":
        flags.append("weak_authentication")
    if account.email_changed_at is not None and now - account.email_changed_at < RISK_WINDOW:
        flags.append("email_changed_recently")
    seen = connection.execute(
        _RISK,
        {
            "email": account.email,
            "account_id": account.id,
            "sighting_since": now - RISK_WINDOW,
            "request_since": now - RISK_WINDOW,
            "now": now,
        },
    ).one()
    if seen.lookalike_seen:
        flags.append("lookalike_seen")
    # Replied before: anything but this moment's replies was written to the address.
    if not seen.earlier and not seen.replied_before:
        flags.append("first_contact")
    if seen.recent >= 2:
        flags.append("repeated_requests")
    return flags


def open_or_join(
    connection: Connection,
    *,
    account: Account,
    message_id: int,
    verdict: dict[str, Any],
    decision: dict[str, Any],
    strength: str,
    flags: list[str],
    now: datetime,
    expire_after: timedelta,
) -> Opened:
    """Open a pending request for ``account``, or join the message to the one already open
    (at most one open request per account: a unique index holds that even between workers)."""
    for _ in range(3):
        current = _open_request(connection, account.id)
        if current is not None:
            request_id, reference, expires_at = current
            _add_message(connection, request_id, message_id, now)
            audit(
                connection,
                request_id,
                action="joined",
                at=now,
                reason="another verified request for the same account",
                message_id=message_id,
            )
            return Opened(request_id, reference, joined=True, expires_at=expires_at)
        reference = new_reference()
        try:
            with connection.begin_nested():
                request_id = connection.execute(
                    _INSERT_REQUEST,
                    {
                        "reference": reference,
                        "state": RequestState.PENDING,
                        "account_id": account.id,
                        "email": account.email,
                        "account_name": account.name,
                        "locale": account.locale,
                        "message_id": message_id,
                        "auth_strength": strength,
                        "verdict": verdict,
                        "decision": decision,
                        "risk_flags": flags,
                        "created_at": now,
                        "updated_at": now,
                        "expires_at": now + expire_after,
                    },
                ).scalar_one()
        except IntegrityError:
            continue  # another worker opened one meanwhile (or the reference was taken): join
        _add_message(connection, request_id, message_id, now)
        audit(
            connection,
            request_id,
            action="created",
            at=now,
            to_state=RequestState.PENDING,
            reason=f"rule {decision.get('rule')}",
            details={"risk_flags": flags},
            message_id=message_id,
        )
        return Opened(request_id, reference, joined=False, expires_at=now + expire_after)
    raise RuntimeError(f"could not open or join a request for account {account.id}")


def _open_request(connection: Connection, account_id: str) -> tuple[int, str, datetime] | None:
    row = connection.execute(_OPEN_REQUEST, {"account_id": account_id}).one_or_none()
    return (row.id, row.reference, row.expires_at) if row is not None else None


def _add_message(connection: Connection, request_id: int, message_id: int, now: datetime) -> None:
    joined = connection.execute(_MESSAGE_JOINED, {"message_id": message_id}).one_or_none()
    if joined is None:
        connection.execute(
            _INSERT_REQUEST_MESSAGE,
            {"message_id": message_id, "request_id": request_id, "joined_at": now},
        )


def record_sighting(
    connection: Connection, *, address: str, resembles: str, message_id: int, now: datetime
) -> None:
    connection.execute(
        _INSERT_SIGHTING,
        {"address": address, "resembles": resembles, "message_id": message_id, "seen_at": now},
    )


# -- reading --------------------------------------------------------------------------------

CLAIM_STALE = timedelta(hours=1)
# Ids are 64-bit: anything larger cannot name a request (and would overflow the driver).
MAX_ID = 2**63


@dataclass(frozen=True)
class QueueRow:
    request: ResetRequest
    votes: int


@dataclass(frozen=True)
class Vote:
    agent: str
    note: str
    at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"agent": self.agent, "note": self.note, "at": self.at.isoformat()}


@dataclass(frozen=True)
class RequestDetail:
    request: ResetRequest
    events: list[AuditEvent]
    message_ids: list[int]
    votes: list[Vote]
    execution: ResetExecution | None


class RequestService:
    def __init__(self, database: Database) -> None:
        self.db = database

    def list(
        self, state: RequestState | None = None, limit: int = 50, email: str | None = None
    ) -> list[ResetRequest]:
        query = select(ResetRequest).order_by(ResetRequest.id.desc()).limit(limit)
        if state is not None:
            query = query.where(ResetRequest.state == state)
        if email is not None:
            query = query.where(ResetRequest.email == email)
        with self.db.reading() as session:
            return list(session.scalars(query))

    def get(self, request_id: int) -> RequestDetail:
        if not 0 < request_id < MAX_ID:
            raise NotFound(f"request {request_id} not found")
        with self.db.reading() as session:
            request = session.get(ResetRequest, request_id)
            if request is None:
                raise NotFound(f"request {request_id} not found")
            events = list(
                session.scalars(
                    select(AuditEvent)
                    .where(AuditEvent.request_id == request_id)
                    .order_by(AuditEvent.id)
                )
            )
            message_ids = list(
                session.scalars(
                    select(RequestMessage.message_id)
                    .where(RequestMessage.request_id == request_id)
                    .order_by(RequestMessage.message_id)
                )
            )
            votes = [
                Vote(name, note, at)
                for name, note, at in session.execute(
                    select(Agent.name, ApprovalVote.note, ApprovalVote.at)
                    .join(Agent, Agent.id == ApprovalVote.agent_id)
                    .where(ApprovalVote.request_id == request_id)
                    .order_by(ApprovalVote.at)
                )
            ]
            execution = session.scalars(
                select(ResetExecution).where(ResetExecution.request_id == request_id)
            ).first()
            return RequestDetail(request, events, message_ids, votes, execution)

    def queue(
        self,
        state: RequestState | None = None,
        search: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[builtins.list[QueueRow], int]:
        """Requests for the console's queue: open ones (or those in ``state``), oldest first,
        optionally only those whose address or reference contains ``search``; with the
        total count for paging."""
        states = [state] if state is not None else list(OPEN_REQUEST_STATES)
        where: builtins.list[ColumnElement[bool]] = [ResetRequest.state.in_(states)]
        if search:
            needle = search.strip().lower()
            pattern = (
                "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            )
            where.append(
                ResetRequest.email.like(pattern, escape="\\")
                | (func.lower(ResetRequest.reference) == needle)
                | (func.lower(ResetRequest.account_id) == needle)
            )
        votes = (
            select(func.count())
            .select_from(ApprovalVote)
            .where(ApprovalVote.request_id == ResetRequest.id)
            .scalar_subquery()
        )
        with self.db.reading() as session:
            total = session.execute(
                select(func.count()).select_from(ResetRequest).where(*where)
            ).scalar_one()
            rows = session.execute(
                select(ResetRequest, votes)
                .where(*where)
                .order_by(ResetRequest.created_at, ResetRequest.id)
                .limit(limit)
                .offset(offset)
            ).all()
            return [QueueRow(request, count) for request, count in rows], total

    def history(self, account_id: str, exclude: int | None = None) -> builtins.list[ResetRequest]:
        """The account's other requests, newest first."""
        query = (
            select(ResetRequest)
            .where(ResetRequest.account_id == account_id)
            .order_by(ResetRequest.id.desc())
            .limit(50)
        )
        if exclude is not None:
            query = query.where(ResetRequest.id != exclude)
        with self.db.reading() as session:
            return list(session.scalars(query))

    def claim(self, request_id: int, agent: str, *, release: bool = False) -> ResetRequest:
        """Mark an open request as being worked on by ``agent`` (or release the claim), so
        that two agents do not verify the same owner at once. A claim older than an hour
        is stale and may be taken over."""
        now = utcnow()
        if not 0 < request_id < MAX_ID:
            raise NotFound(f"request {request_id} not found")
        with self.db.writing() as session:
            request = session.get(ResetRequest, request_id, with_for_update=True)
            if request is None:
                raise NotFound(f"request {request_id} not found")
            if release:
                if request.claimed_by == agent:
                    request.claimed_by = None
                    request.claimed_at = None
                return request
            if request.state not in OPEN_REQUEST_STATES:
                raise InvalidState(f"request {request_id} is {request.state.value}")
            fresh = request.claimed_at is not None and now - request.claimed_at < CLAIM_STALE
            if request.claimed_by not in (None, agent) and fresh:
                raise InvalidState(
                    f"request {request_id} is being worked on by {request.claimed_by}"
                )
            request.claimed_by = agent
            request.claimed_at = now
            return request

    def events(self, request_id: int | None = None, limit: int = 100) -> builtins.list[AuditEvent]:
        """The latest ``limit`` audit events (of one request), oldest first."""
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if request_id is not None:
            query = query.where(AuditEvent.request_id == request_id)
        with self.db.reading() as session:
            return list(reversed(list(session.scalars(query))))

    def counts(self) -> dict[str, int]:
        with self.db.reading() as session:
            rows = session.execute(
                select(ResetRequest.state, func.count()).group_by(ResetRequest.state)
            )
            return {state.value: count for state, count in rows}


def request_dict(request: ResetRequest) -> dict[str, Any]:
    return {
        "id": request.id,
        "reference": request.reference,
        "state": request.state.value,
        "account_id": request.account_id,
        "email": request.email,
        "account_name": request.account_name,
        "locale": request.locale,
        "message_id": request.message_id,
        "auth_strength": request.auth_strength,
        "risk_flags": request.risk_flags,
        "created_at": request.created_at.isoformat(),
        "updated_at": request.updated_at.isoformat(),
        "expires_at": request.expires_at.isoformat(),
        "decided_at": request.decided_at.isoformat() if request.decided_at else None,
        "decided_by": request.decided_by.split(",") if request.decided_by else [],
        "claimed_by": request.claimed_by,
        "decision_note": request.decision_note,
        "completed_at": request.completed_at.isoformat() if request.completed_at else None,
    }


def execution_dict(execution: ResetExecution) -> dict[str, Any]:
    return {
        "method": execution.method,
        "state": execution.state.value,
        "attempts": execution.attempts,
        "next_attempt_at": (
            execution.next_attempt_at.isoformat() if execution.next_attempt_at else None
        ),
        "last_error": execution.last_error,
        "response": execution.response,
        "finished_at": execution.finished_at.isoformat() if execution.finished_at else None,
    }


def event_dict(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "request_id": event.request_id,
        "at": event.at.isoformat(),
        "actor": event.actor,
        "action": event.action,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "reason": event.reason,
        "details": event.details,
        "message_id": event.message_id,
        "hash": event.hash,
    }
