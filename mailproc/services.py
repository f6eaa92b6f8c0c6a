"""Use cases on stored messages, shared by the SMTP edge, the worker and the CLI."""

from __future__ import annotations

import hashlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Dialect,
    Select,
    Table,
    Update,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import defer

from mailproc.accounts import DirectoryError
from mailproc.addresses import AddressError, normalize_address
from mailproc.auth import Authenticator, Envelope, Strength, Verdict
from mailproc.config import Settings
from mailproc.db import Database, LockBusy
from mailproc.errors import InvalidState, NotFound
from mailproc.intake import Arrival, wire_flags
from mailproc.message import parse_message
from mailproc.models import Base, Message, MessageState, ReplayKey, utcnow
from mailproc.outbox import Source

if TYPE_CHECKING:
    from mailproc.pipeline import Evaluation, Pipeline

log = logging.getLogger(__name__)

__all__ = ["Claim", "InvalidState", "MessageService", "NotFound"]


@dataclass(frozen=True)
class Claim:
    message_id: int
    worker_id: str
    attempts: int


_MESSAGE = Base.metadata.tables["message"]


@dataclass(frozen=True)
class _Input:
    raw: bytes
    envelope: Envelope
    deferrals: int
    rcpt_tos: tuple[str, ...] = ()
    intake_flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Result:
    claim: Claim
    values: dict[str, Any]
    verdict: Verdict | None
    now: datetime
    evaluation: Evaluation | None = None
    raw: bytes = b""
    mail_from: str = ""


class RawInsert:
    """Inserts rows through the DBAPI cursor, one ``execute`` and ``lastrowid`` per row, for
    SQLite's intake path: SQLAlchemy's per-statement work costs more than SQLite's own for a
    small batch, and the listener pays it before every ``250``. The statement is compiled by
    SQLAlchemy for the columns given and the values converted by the column types' own bind
    processors, so what is stored is exactly what a Core INSERT of the same rows stores."""

    def __init__(self, table: Table, dialect: Dialect) -> None:
        self.table = table
        self.dialect = dialect
        self._statements: dict[tuple[str, ...], tuple[str, list[Any]]] = {}

    def _statement(self, keys: tuple[str, ...]) -> tuple[str, list[Any]]:
        statement = self._statements.get(keys)
        if statement is None:
            compiled = insert(self.table).compile(dialect=self.dialect, column_keys=list(keys))
            assert compiled.positiontup is not None  # SQLite's paramstyle is positional
            processors = [
                (
                    name,
                    self.table.c[name].type.dialect_impl(self.dialect).bind_processor(self.dialect),
                )
                for name in compiled.positiontup
            ]
            statement = self._statements[keys] = (str(compiled), processors)
        return statement

    def __call__(self, cursor: Any, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert ``rows`` with ``cursor``, a DBAPI cursor inside a write transaction."""
        ids = []
        for row in rows:
            sql, processors = self._statement(tuple(row))
            values = [
                row[name] if process is None else process(row[name]) for name, process in processors
            ]
            cursor.execute(sql, values)
            ids.append(cursor.lastrowid)
        return ids


# A worker's results, executed with one parameter set per message (its id as ``_id``).
_FINISH = update(_MESSAGE).where(_MESSAGE.c.id == bindparam("_id"))


def _replay_keys(result: _Result) -> dict[str, str]:
    """The keys that make a later copy of this message a replay: each DKIM signature that
    passed, and the Message-ID of an authenticated message."""
    verdict = result.verdict
    if verdict is None or result.values["state"] != MessageState.PROCESSED:
        return {}
    keys = {
        hashlib.sha256(f"dkim:{d.signature_hash}".encode()).hexdigest(): "dkim"
        for d in verdict.dkim
        if d.result == "pass" and d.signature_hash
    }
    if verdict.authenticated and verdict.message_id:
        value = f"message-id:{verdict.message_id.strip().lower()}"
        keys[hashlib.sha256(value.encode()).hexdigest()] = "message-id"
    return keys


def _recipients(rcpt_tos: Sequence[str]) -> tuple[str, ...]:
    normalized = []
    for address in rcpt_tos:
        try:
            normalized.append(normalize_address(address))
        except AddressError:
            continue
    return tuple(normalized)


class MessageService:
    def __init__(
        self,
        database: Database,
        authenticator: Authenticator,
        lease_seconds: float = 60,
        max_attempts: int = 5,
        retry_max_minutes: float = 60,
        pipeline: Pipeline | None = None,
    ):
        self.db = database
        self.authenticator = authenticator
        # Without one (tests of storage and authentication alone) nothing is decided.
        self.pipeline = pipeline
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_base = timedelta(minutes=1)
        self.retry_max = timedelta(minutes=retry_max_minutes)
        self._sqlite_insert = (
            RawInsert(_MESSAGE, database.engine.dialect) if database.dialect == "sqlite" else None
        )

    @classmethod
    def from_settings(
        cls, database: Database, settings: Settings, pipeline: Pipeline | None = None
    ) -> MessageService:
        return cls(
            database,
            Authenticator(settings.auth, settings.dns),
            lease_seconds=settings.worker.lease_seconds,
            max_attempts=settings.worker.max_attempts,
            retry_max_minutes=settings.auth.retry_max_minutes,
            pipeline=pipeline,
        )

    # -- intake ---------------------------------------------------------------------------

    def store_batch(self, arrivals: Sequence[Arrival]) -> list[int]:
        """Store arrivals in one transaction; returns their ids once committed."""
        rows = self._intake_rows(arrivals)
        with self.db.writing_connection() as connection:
            if self._sqlite_insert is not None:
                cursor = connection.connection.cursor()
                try:
                    return self._sqlite_insert(cursor, rows)
                finally:
                    cursor.close()
            # One Core INSERT ... RETURNING for the whole batch: no ORM bookkeeping per row.
            statement = insert(_MESSAGE).returning(_MESSAGE.c.id, sort_by_parameter_order=True)
            return list(connection.execute(statement, rows).scalars())

    def store_batch_now(self, arrivals: Sequence[Arrival]) -> list[int] | None:
        """SQLite: store arrivals in one transaction on the calling thread if the write lock
        is free at once; None, having written nothing, if it is not (or on PostgreSQL), so the
        caller can use ``store_batch`` on a thread that may wait."""
        if self._sqlite_insert is None:
            return None
        rows = self._intake_rows(arrivals)
        try:
            with self.db.writing_cursor_nowait() as cursor:
                return self._sqlite_insert(cursor, rows)
        except LockBusy:
            return None

    @staticmethod
    def _intake_rows(arrivals: Sequence[Arrival]) -> list[dict[str, Any]]:
        now = utcnow()
        return [
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

    # -- processing -----------------------------------------------------------------------

    def claim_next(self, worker_id: str) -> Claim | None:
        """Take the oldest message that is waiting, or whose last claim's lease ran out."""
        claims = self.claim_batch(worker_id, 1)
        return claims[0] if claims else None

    def claim_batch(self, worker_id: str, limit: int) -> list[Claim]:
        """Take up to ``limit`` of the oldest waiting messages (received, due for a retry, or
        left behind by a worker whose lease ran out) in one transaction, oldest first."""
        while True:
            claims, exhausted = self._claim(worker_id, limit)
            if claims or not exhausted:
                return claims

    def _claim(self, worker_id: str, limit: int) -> tuple[list[Claim], bool]:
        now = utcnow()
        # A message left behind by a worker whose lease ran out may be what killed it: it is
        # taken alone, so that it cannot use up the attempts of the messages around it.
        abandoned = (
            select(Message.id)
            .where(Message.state == MessageState.PROCESSING, Message.lease_expires_at < now)
            .order_by(Message.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )

        def oldest(*where: Any) -> Select[Any]:
            return (
                select(Message.id)
                .where(*where)
                .order_by(Message.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )

        # Two index range scans (state, id), not one OR that sorts every waiting message.
        received = oldest(Message.state == MessageState.RECEIVED)
        due = oldest(Message.state == MessageState.DEFERRED, Message.next_attempt_at <= now)
        with self.db.writing() as session:
            ids = list(session.scalars(abandoned))
            if not ids:
                waiting = list(session.scalars(received)) + list(session.scalars(due))
                ids = sorted(waiting)[:limit]
            if not ids:
                return [], False
            rows = session.execute(
                update(Message)
                .where(Message.id.in_(ids))
                .values(
                    state=MessageState.PROCESSING,
                    claimed_by=worker_id,
                    lease_expires_at=now + self.lease,
                    attempts=Message.attempts + 1,
                    updated_at=now,
                )
                .returning(Message.id, Message.attempts)
            ).all()
            claims = [
                Claim(row.id, worker_id, row.attempts)
                for row in rows
                if row.attempts <= self.max_attempts
            ]
            # Claimed so often without finishing that processing itself keeps dying.
            exhausted = sorted(row.id for row in rows if row.attempts > self.max_attempts)
            if exhausted:
                session.execute(
                    update(Message)
                    .where(Message.id.in_(exhausted))
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
                for message_id in exhausted:
                    log.error("message %d failed: too many unfinished attempts", message_id)
        return sorted(claims, key=lambda claim: claim.message_id), bool(exhausted)

    def process(self, claim: Claim) -> MessageState | None:
        """Parse and authenticate a claimed message; returns its new state, or None if the
        claim was lost."""
        return self.process_batch([claim])[0]

    def process_batch(
        self,
        claims: Sequence[Claim],
        flush_seconds: float = 1.0,
        stop: Callable[[], bool] = lambda: False,
    ) -> list[MessageState | None]:
        """Process claimed messages in order and write their results together: one write
        transaction for the batch, or more when it takes longer than ``flush_seconds`` (each
        such write also renews the leases of the claims still in hand). When ``stop()`` turns
        true, the results so far are written and the claims not yet begun are given back.
        Returns each message's new state, or None where the claim was lost."""
        states: list[MessageState | None] = []
        inputs = self._load(claims)
        done: list[_Result] = []
        last_flush = time.monotonic()
        for index, claim in enumerate(claims):
            if index and stop():
                states += self._finish(done, release=claims[index:])
                return states + [None] * (len(claims) - index)
            done.append(self._evaluate(claim, inputs.get(claim.message_id)))
            rest = claims[index + 1 :]
            if rest and time.monotonic() - last_flush >= flush_seconds:
                states += self._finish(done, renew=rest)
                done = []
                last_flush = time.monotonic()
        return states + self._finish(done)

    def _load(self, claims: Sequence[Claim]) -> dict[int, _Input]:
        ids = [claim.message_id for claim in claims]
        with self.db.reading() as session:
            rows = session.execute(
                select(
                    Message.id,
                    Message.raw,
                    Message.client_ip,
                    Message.mail_from,
                    Message.client_helo,
                    Message.deferrals,
                    Message.rcpt_tos,
                    Message.intake_flags,
                ).where(Message.id.in_(ids))
            ).all()
        return {
            row.id: _Input(
                row.raw,
                Envelope(row.client_ip, row.mail_from, row.client_helo),
                row.deferrals,
                tuple(row.rcpt_tos or ()),
                tuple(row.intake_flags or ()),
            )
            for row in rows
        }

    def _evaluate(self, claim: Claim, data: _Input | None) -> _Result:
        """Parse and authenticate one message: CPU and DNS only, no database."""
        now = utcnow()
        values: dict[str, Any]
        verdict: Verdict | None = None
        if data is None:  # deleted meanwhile: there is nothing left to finish
            return _Result(claim, {"state": MessageState.FAILED}, None, now)
        evaluation: Evaluation | None = None
        waiting_on: str | None = None
        try:
            parsed = parse_message(data.raw)
            verdict = self.authenticator.evaluate(data.raw, data.envelope, now, parsed)
            if self.pipeline is not None and not verdict.temporary:
                try:
                    evaluation = self.pipeline.evaluate(
                        verdict,
                        parsed.subject,
                        parsed.text_body,
                        _recipients(data.rcpt_tos),
                        data.intake_flags,
                    )
                except DirectoryError as exc:
                    waiting_on = f"account directory: {exc}"
                    log.warning("message %d waits: %s", claim.message_id, waiting_on)
        except Exception as exc:
            log.exception("message %d failed in processing", claim.message_id)
            summary = "".join(traceback.format_exception_only(exc)).strip()
            values = {"state": MessageState.FAILED, "error": summary}
        else:
            values = {"parsed": parsed.summary(), "error": waiting_on}
            if verdict.temporary or waiting_on is not None:
                delay = min(self.retry_max, self.retry_base * (2**data.deferrals))
                values |= {
                    "state": MessageState.DEFERRED,
                    "deferrals": data.deferrals + 1,
                    "next_attempt_at": now + delay,
                    "attempts": 0,
                }
            else:
                values |= {
                    "state": MessageState.PROCESSED,
                    "processed_at": now,
                    "next_attempt_at": None,
                }
        return _Result(
            claim, values, verdict, now, evaluation, data.raw, data.envelope.mail_from or ""
        )

    def _finish(
        self,
        results: Sequence[_Result],
        renew: Sequence[Claim] = (),
        release: Sequence[Claim] = (),
    ) -> list[MessageState | None]:
        """Write results in one transaction; renew or give back the claims not yet processed.

        Everything that can be worked out beforehand is, so the transaction (which on SQLite
        holds the one write lock the listener also needs) is a few statements per batch: the
        claims still held, the replay keys, and one UPDATE per kind of result."""
        if not results and not renew and not release:
            return []
        now = utcnow()
        keys = {result.claim.message_id: _replay_keys(result) for result in results}
        with self.db.writing_connection() as connection:
            held = self._still_held(connection, [result.claim for result in results])
            for result in results:
                if result.claim.message_id not in held:
                    log.warning(
                        "message %d: claim lost before it was finished", result.claim.message_id
                    )
            mine = [result for result in results if result.claim.message_id in held]
            self._record_replays(
                connection,
                {r.claim.message_id: keys[r.claim.message_id] for r in mine},
                {r.claim.message_id: r for r in mine},
                now,
            )
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for result in mine:
                row = self._result_row(result, now) | self._decide(connection, result, now)
                groups.setdefault(tuple(row), []).append(row)
            for group in groups.values():
                connection.execute(_FINISH, group)
            for claim in renew:
                connection.execute(
                    self._held(claim).values(lease_expires_at=now + self.lease, updated_at=now)
                )
            for claim in release:
                connection.execute(
                    self._held(claim).values(
                        state=MessageState.RECEIVED,
                        attempts=Message.attempts - 1,
                        claimed_by=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                )
        states: list[MessageState | None] = []
        for result in results:
            if result.claim.message_id not in held:
                states.append(None)
                continue
            state = MessageState(result.values["state"])
            states.append(state)
            verdict = result.verdict
            log.info(
                "message %d %s (attempt %d)%s",
                result.claim.message_id,
                state.value,
                result.claim.attempts,
                f": {verdict.strength.value}" if verdict is not None else "",
            )
        return states

    def _decide(self, connection: Connection, result: _Result, now: datetime) -> dict[str, Any]:
        """Carry out the message's decision in this transaction (request, audit, replies);
        what is stored with the message. A failure here fails this message alone."""
        if (
            self.pipeline is None
            or result.evaluation is None
            or result.verdict is None
            or result.values["state"] != MessageState.PROCESSED
        ):
            return {}
        message_id = result.claim.message_id
        source = Source(
            message_id,
            result.mail_from,
            BytesHeaderParser(policy=compat32).parsebytes(result.raw),
        )
        try:
            with connection.begin_nested():
                decision = self.pipeline.apply(
                    connection,
                    message_id=message_id,
                    evaluation=result.evaluation,
                    verdict=result.verdict,
                    source=source,
                    now=now,
                )
        except Exception as exc:
            log.exception("message %d: carrying out its decision failed", message_id)
            summary = "".join(traceback.format_exception_only(exc)).strip()
            return {
                "state": MessageState.FAILED,
                "error": f"decision not carried out: {summary}",
                "processed_at": None,
            }
        log.info(
            "message %d: rule %s, %s%s",
            message_id,
            decision["rule"],
            decision["action"],
            f" ({decision['outcome']})" if decision.get("outcome") else "",
        )
        return {"decision": decision}

    def _still_held(self, connection: Connection, claims: Sequence[Claim]) -> set[int]:
        """Ids of the claims that still hold (locked until the end of the transaction): after
        a lease ran out and another worker took a message over, the late result is dropped."""
        if not claims:
            return set()
        rows = connection.execute(
            select(Message.id, Message.state, Message.claimed_by, Message.attempts)
            .where(Message.id.in_([claim.message_id for claim in claims]))
            .with_for_update()
        ).all()
        current = {row.id: row for row in rows}
        held = set()
        for claim in claims:
            row = current.get(claim.message_id)
            if (
                row is not None
                and row.state == MessageState.PROCESSING
                and row.claimed_by == claim.worker_id
                and row.attempts == claim.attempts
            ):
                held.add(claim.message_id)
        return held

    @staticmethod
    def _record_replays(
        connection: Connection,
        keys: dict[int, dict[str, str]],
        results: dict[int, _Result],
        now: datetime,
    ) -> None:
        """Record each message's DKIM signatures and Message-ID; a message with one already
        seen in another message is a replay and not authenticated. Within a batch the older
        message keeps the key."""
        rows = [
            {"key": key, "kind": kind, "message_id": message_id, "seen_at": now}
            for message_id, message_keys in sorted(keys.items())
            for key, kind in message_keys.items()
        ]
        if not rows:
            return
        dialect = connection.dialect.name
        insert_ = sqlite_insert if dialect == "sqlite" else pg_insert
        connection.execute(insert_(ReplayKey).on_conflict_do_nothing(index_elements=["key"]), rows)
        owners = {
            row.key: (row.kind, row.message_id)
            for row in connection.execute(
                select(ReplayKey.key, ReplayKey.kind, ReplayKey.message_id).where(
                    ReplayKey.key.in_({row["key"] for row in rows})
                )
            )
        }
        for message_id, message_keys in keys.items():
            verdict = results[message_id].verdict
            assert verdict is not None
            earlier = [
                owners[key]
                for key in message_keys
                if owners.get(key, (None, message_id))[1] != message_id
            ]
            for kind, other in earlier:
                verdict.reasons.append(f"replay: {kind} already seen in message {other}")
            if earlier:
                verdict.authenticated = False
                verdict.strength = Strength.NONE

    @staticmethod
    def _result_row(result: _Result, now: datetime) -> dict[str, Any]:
        row = {"_id": result.claim.message_id, **result.values}
        verdict = result.verdict
        if verdict is not None:
            row |= {
                "verdict": verdict.to_dict(),
                "authenticated": verdict.authenticated,
                "auth_strength": verdict.strength.value,
            }
        row |= {"claimed_by": None, "lease_expires_at": None, "updated_at": now}
        return row

    @staticmethod
    def _held(claim: Claim) -> Update:
        """An UPDATE of the claimed message, which matches only while the claim still holds."""
        return update(Message).where(
            Message.id == claim.message_id,
            Message.state == MessageState.PROCESSING,
            Message.claimed_by == claim.worker_id,
            Message.attempts == claim.attempts,
        )

    def process_next(self, worker_id: str, batch_size: int = 1) -> bool:
        """Claim and process up to ``batch_size`` waiting messages; False if none waited."""
        claims = self.claim_batch(worker_id, batch_size)
        if not claims:
            return False
        self.process_batch(claims)
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
