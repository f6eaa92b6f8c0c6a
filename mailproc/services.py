"""Use cases on stored messages, shared by the SMTP edge, the worker and the CLI."""

from __future__ import annotations

import hashlib
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, defer

from mailproc.auth import Authenticator, Envelope, Strength, Verdict
from mailproc.config import Settings
from mailproc.db import Database
from mailproc.intake import Arrival, wire_flags
from mailproc.message import parse_message
from mailproc.models import Base, Message, MessageState, ReplayKey, utcnow

log = logging.getLogger(__name__)


class NotFound(LookupError):
    """No such record."""


class InvalidState(ValueError):
    """The record is not in a state that allows the operation."""


@dataclass(frozen=True)
class Claim:
    message_id: int
    worker_id: str
    attempts: int


class MessageService:
    def __init__(
        self,
        database: Database,
        authenticator: Authenticator,
        lease_seconds: float = 60,
        max_attempts: int = 5,
        retry_max_minutes: float = 60,
    ):
        self.db = database
        self.authenticator = authenticator
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_base = timedelta(minutes=1)
        self.retry_max = timedelta(minutes=retry_max_minutes)

    @classmethod
    def from_settings(cls, database: Database, settings: Settings) -> MessageService:
        return cls(
            database,
            Authenticator(settings.auth, settings.dns),
            lease_seconds=settings.worker.lease_seconds,
            max_attempts=settings.worker.max_attempts,
            retry_max_minutes=settings.auth.retry_max_minutes,
        )

    # -- intake ---------------------------------------------------------------------------

    def store_batch(self, arrivals: Sequence[Arrival]) -> list[int]:
        """Store arrivals in one transaction; returns their ids once committed."""
        now = utcnow()
        rows = [
            {
                "state": MessageState.RECEIVED,
                "received_at": a.received_at,
                "protocol": a.protocol,
                "peer_ip": a.peer_ip,
                "peer_port": a.peer_port,
                "helo": a.helo,
                "client_ip": a.client_ip,
                "client_name": a.client_name,
                "client_helo": a.client_helo,
                "client_protocol": a.client_protocol,
                "xforward": a.xforward,
                "mail_from": a.mail_from,
                "rcpt_tos": list(a.rcpt_tos),
                "tls": a.tls,
                "size": len(a.raw),
                "sha256": hashlib.sha256(a.raw).hexdigest(),
                "raw": a.raw,
                "intake_flags": wire_flags(a.raw),
                "attempts": 0,
                "deferrals": 0,
                "updated_at": now,
            }
            for a in arrivals
        ]
        # One Core INSERT ... RETURNING for the whole batch: no ORM bookkeeping per row.
        table = Base.metadata.tables["message"]
        statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        with self.db.writing_connection() as connection:
            return list(connection.execute(statement, rows).scalars())

    # -- processing -----------------------------------------------------------------------

    def claim_next(self, worker_id: str) -> Claim | None:
        """Take the oldest message that is waiting, or whose last claim's lease ran out."""
        while True:
            claim, exhausted = self._claim_one(worker_id)
            if not exhausted:
                return claim

    def _claim_one(self, worker_id: str) -> tuple[Claim | None, bool]:
        now = utcnow()
        waiting = (
            select(Message.id)
            .where(
                or_(
                    Message.state == MessageState.RECEIVED,
                    and_(
                        Message.state == MessageState.PROCESSING,
                        Message.lease_expires_at < now,
                    ),
                    and_(
                        Message.state == MessageState.DEFERRED,
                        Message.next_attempt_at <= now,
                    ),
                )
            )
            .order_by(Message.id)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self.db.writing() as session:
            row = session.execute(
                update(Message)
                .where(Message.id == waiting)
                .values(
                    state=MessageState.PROCESSING,
                    claimed_by=worker_id,
                    lease_expires_at=now + self.lease,
                    attempts=Message.attempts + 1,
                    updated_at=now,
                )
                .returning(Message.id, Message.attempts)
            ).one_or_none()
            if row is None:
                return None, False
            if row.attempts <= self.max_attempts:
                return Claim(row.id, worker_id, row.attempts), False
            # Claimed so often without finishing that processing itself keeps dying.
            session.execute(
                update(Message)
                .where(Message.id == row.id)
                .values(
                    state=MessageState.FAILED,
                    error=(
                        f"processing did not finish in {self.max_attempts} attempts "
                        "(the worker died or its lease ran out each time)"
                    ),
                    claimed_by=None,
                    lease_expires_at=None,
                )
            )
            log.error("message %d failed: too many unfinished attempts", row.id)
            return None, True

    def process(self, claim: Claim) -> MessageState | None:
        """Parse and authenticate a claimed message; returns its new state, or None if the
        claim was lost."""
        with self.db.reading() as session:
            message = session.get(Message, claim.message_id)
            if message is None:
                raise NotFound(f"message {claim.message_id} not found")
            raw = message.raw
            envelope = Envelope(message.client_ip, message.mail_from, message.client_helo)
            deferrals = message.deferrals
        now = utcnow()
        values: dict[str, Any]
        verdict: Verdict | None = None
        try:
            parsed = parse_message(raw)
            verdict = self.authenticator.evaluate(raw, envelope, now, parsed)
        except Exception as exc:
            log.exception("message %d failed in processing", claim.message_id)
            summary = "".join(traceback.format_exception_only(exc)).strip()
            values = {"state": MessageState.FAILED, "error": summary}
        else:
            values = {"parsed": parsed.summary(), "error": None}
            if verdict.temporary:
                delay = min(self.retry_max, self.retry_base * (2**deferrals))
                values |= {
                    "state": MessageState.DEFERRED,
                    "deferrals": deferrals + 1,
                    "next_attempt_at": now + delay,
                    "attempts": 0,
                }
            else:
                values |= {
                    "state": MessageState.PROCESSED,
                    "processed_at": now,
                    "next_attempt_at": None,
                }
        with self.db.writing() as session:
            row = session.get(Message, claim.message_id, with_for_update=True)
            # Only the holder of the claim may finish it: after a lease ran out and another
            # worker took the message over, the late one's result is dropped, not doubled.
            if (
                row is None
                or row.state != MessageState.PROCESSING
                or row.claimed_by != claim.worker_id
                or row.attempts != claim.attempts
            ):
                log.warning("message %d: claim lost before it was finished", claim.message_id)
                return None
            if verdict is not None and values["state"] == MessageState.PROCESSED:
                self._check_replays(session, row.id, verdict, now)
            if verdict is not None:
                values |= {
                    "verdict": verdict.to_dict(),
                    "authenticated": verdict.authenticated,
                    "auth_strength": verdict.strength.value,
                }
            for key, value in values.items():
                setattr(row, key, value)
            row.claimed_by = None
            row.lease_expires_at = None
            row.updated_at = utcnow()
        state = MessageState(values["state"])
        log.info(
            "message %d %s (attempt %d)%s",
            claim.message_id,
            state.value,
            claim.attempts,
            f": {verdict.strength.value}" if verdict is not None else "",
        )
        return state

    @staticmethod
    def _check_replays(session: Session, message_id: int, verdict: Verdict, now: datetime) -> None:
        """Record this message's DKIM signatures and Message-ID; if one was seen in another
        message before, this one is a replay and not authenticated."""
        keys = {
            hashlib.sha256(f"dkim:{d.signature_hash}".encode()).hexdigest(): "dkim"
            for d in verdict.dkim
            if d.result == "pass" and d.signature_hash
        }
        if verdict.authenticated and verdict.message_id:
            value = f"message-id:{verdict.message_id.strip().lower()}"
            keys[hashlib.sha256(value.encode()).hexdigest()] = "message-id"
        if not keys:
            return
        insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else pg_insert
        session.execute(
            insert(ReplayKey)
            .values(
                [
                    {"key": key, "kind": kind, "message_id": message_id, "seen_at": now}
                    for key, kind in keys.items()
                ]
            )
            .on_conflict_do_nothing(index_elements=["key"])
        )
        earlier = session.execute(
            select(ReplayKey.kind, ReplayKey.message_id).where(
                ReplayKey.key.in_(keys), ReplayKey.message_id != message_id
            )
        ).all()
        for kind, other in earlier:
            verdict.reasons.append(f"replay: {kind} already seen in message {other}")
        if earlier:
            verdict.authenticated = False
            verdict.strength = Strength.NONE

    def process_next(self, worker_id: str) -> bool:
        claim = self.claim_next(worker_id)
        if claim is None:
            return False
        self.process(claim)
        return True

    # -- operations -----------------------------------------------------------------------

    def retry(self, message_id: int) -> Message:
        """Put a failed message back in the queue to be processed again."""
        with self.db.writing() as session:
            message = session.get(Message, message_id, with_for_update=True)
            if message is None:
                raise NotFound(f"message {message_id} not found")
            if message.state != MessageState.FAILED:
                raise InvalidState(
                    f"message {message_id} is {message.state.value}; only failed messages can be "
                    "retried"
                )
            message.state = MessageState.RECEIVED
            message.attempts = 0
            message.claimed_by = None
            message.lease_expires_at = None
            message.updated_at = utcnow()
            return message

    def get(self, message_id: int) -> Message:
        with self.db.reading() as session:
            message = session.get(Message, message_id)
            if message is None:
                raise NotFound(f"message {message_id} not found")
            return message

    def list(
        self, state: MessageState | None = None, limit: int = 50, before_id: int | None = None
    ) -> list[Message]:
        query = select(Message).options(defer(Message.raw)).order_by(Message.id.desc()).limit(limit)
        if state is not None:
            query = query.where(Message.state == state)
        if before_id is not None:
            query = query.where(Message.id < before_id)
        with self.db.reading() as session:
            return list(session.scalars(query))

    def counts(self) -> dict[str, int]:
        with self.db.reading() as session:
            rows = session.execute(select(Message.state, func.count()).group_by(Message.state))
            return {state.value: count for state, count in rows}
