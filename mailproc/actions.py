"""Carrying out approved resets in the company's application: a signed webhook, or one SQL
statement against the accounts database. Executions are claimed with a lease like replies, so
several instances share them and one held by a dead instance is taken over; retried with
backoff; and never run again once one succeeded.

The webhook (``[reset] method = "webhook"``) is an HTTP POST of a JSON body::

    {"event": "reset_security_question", "request_id": 42, "reference": "R-7KQ2M9XD",
     "account_id": "1042", "email": "owner@example.org", "approved_by": ["alice", "bob"],
     "approved_at": "2026-11-28T09:15:02+00:00"}

with the headers ``Idempotency-Key`` (the request id: the same on every attempt),
``Mailproc-Timestamp`` (Unix seconds of this attempt) and ``Mailproc-Signature``:
``v1=`` and the hex HMAC-SHA256, keyed with the webhook secret, of the timestamp, a ``.``, and
the body's bytes. Any 2xx answer completes the request."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import Engine, Update, create_engine, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from mailproc import __version__
from mailproc.config import Settings
from mailproc.db import Database
from mailproc.decisions import DecisionService
from mailproc.models import (
    ExecutionState,
    RequestState,
    ResetExecution,
    ResetRequest,
    utcnow,
)
from mailproc.requests import audit, lock_audit_log

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Mailproc-Signature"
TIMESTAMP_HEADER = "Mailproc-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# How much of the application's answer is kept on record.
_RESPONSE_KEPT = 300


class TemporaryFailure(Exception):
    """Worth another attempt later (timeouts, 5xx, a database that is away)."""


class PermanentFailure(Exception):
    """No use trying again as it stands (the statement did not affect exactly one row)."""


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The webhook body: canonical JSON, so every attempt sends the same bytes."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


@dataclass(frozen=True)
class Job:
    execution_id: int
    request_id: int
    account_id: str
    method: str
    payload: dict[str, Any]
    attempts: int


class ResetExecutor:
    def __init__(
        self,
        settings: Settings,
        database: Database,
        worker_id: str,
        decisions: DecisionService | None = None,
    ) -> None:
        self.settings = settings
        self.reset = settings.reset
        self.db = database
        self.worker_id = worker_id
        self.decisions = decisions or DecisionService(settings, database)
        self.lease = timedelta(seconds=self.reset.lease_seconds)
        self._accounts: Engine | None = None

    # database side (blocking; run on a thread) --------------------------------------------

    def claim_due(self, limit: int = 10) -> list[Job]:
        now = utcnow()
        due = (
            select(ResetExecution.id)
            .where(
                (
                    (ResetExecution.state == ExecutionState.PENDING)
                    & (ResetExecution.next_attempt_at <= now)
                )
                | (
                    (ResetExecution.state == ExecutionState.RUNNING)
                    & (ResetExecution.lease_expires_at < now)
                )
            )
            .order_by(ResetExecution.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        with self.db.writing() as session:
            ids = list(session.scalars(due))
            if not ids:
                return []
            rows = session.execute(
                update(ResetExecution)
                .where(ResetExecution.id.in_(ids))
                .values(
                    state=ExecutionState.RUNNING,
                    claimed_by=self.worker_id,
                    lease_expires_at=now + self.lease,
                    attempts=ResetExecution.attempts + 1,
                    updated_at=now,
                )
                .returning(
                    ResetExecution.id,
                    ResetExecution.request_id,
                    ResetExecution.method,
                    ResetExecution.payload,
                    ResetExecution.attempts,
                )
            ).all()
            accounts: dict[int, str] = {
                row.id: row.account_id
                for row in session.execute(
                    select(ResetRequest.id, ResetRequest.account_id).where(
                        ResetRequest.id.in_([row.request_id for row in rows])
                    )
                )
            }
        return sorted(
            (
                Job(
                    row.id,
                    row.request_id,
                    accounts[row.request_id],
                    row.method,
                    row.payload,
                    row.attempts,
                )
                for row in rows
            ),
            key=lambda job: job.execution_id,
        )

    def _held(self, job: Job) -> Update:
        """An UPDATE of the execution that matches only while this executor's claim holds."""
        return update(ResetExecution).where(
            ResetExecution.id == job.execution_id,
            ResetExecution.state == ExecutionState.RUNNING,
            ResetExecution.claimed_by == self.worker_id,
            ResetExecution.attempts == job.attempts,
        )

    def release(self, jobs: Sequence[Job]) -> None:
        """Give back claimed executions not attempted (on stop), due again at once."""
        now = utcnow()
        with self.db.writing() as session:
            for job in jobs:
                session.execute(
                    self._held(job).values(
                        state=ExecutionState.PENDING,
                        attempts=ResetExecution.attempts - 1,
                        claimed_by=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                )

    def record(self, job: Job, outcome: Exception | str) -> ExecutionState | None:
        """Write what one attempt did, with its audit event: success completes the request
        (and queues the owner's reply); a failure is retried later, or fails the request after
        ``max_attempts``. None if the claim was lost meanwhile."""
        now = utcnow()
        values: dict[str, Any] = {"claimed_by": None, "lease_expires_at": None, "updated_at": now}
        retry_at = None
        if isinstance(outcome, str):
            state = ExecutionState.SUCCEEDED
            values |= {"response": outcome, "finished_at": now, "last_error": None}
        elif isinstance(outcome, TemporaryFailure) and job.attempts < self.reset.max_attempts:
            state = ExecutionState.PENDING
            delay = min(
                self.reset.retry_max_seconds,
                self.reset.retry_base_seconds * 2 ** (job.attempts - 1),
            )
            retry_at = now + timedelta(seconds=delay)
            values |= {"next_attempt_at": retry_at, "last_error": str(outcome)}
        else:
            state = ExecutionState.FAILED
            error = str(outcome)
            if isinstance(outcome, TemporaryFailure):
                error = f"gave up after {job.attempts} attempts: {error}"
            values |= {"next_attempt_at": None, "last_error": error, "finished_at": now}
        with self.db.writing() as session:
            lock_audit_log(session.connection())  # before any row lock (see lock_audit_log)
            result = session.execute(self._held(job).values(state=state, **values))
            if result.rowcount != 1:  # type: ignore[attr-defined]
                log.warning(
                    "reset of request %d: claim lost before its outcome was recorded",
                    job.request_id,
                )
                return None
            request = session.get(ResetRequest, job.request_id, with_for_update=True)
            assert request is not None
            attempt = {"method": job.method, "attempt": job.attempts}
            audit(
                session.connection(),
                job.request_id,
                action="execution_attempt",
                at=now,
                reason=outcome if isinstance(outcome, str) else f"failed: {outcome}",
                details=attempt | ({"retry_at": retry_at.isoformat()} if retry_at else {}),
            )
            if request.state != RequestState.APPROVED:
                # Cancel refuses a running reset, so this is only a safety net.
                log.error(
                    "reset of request %d finished while the request is %s",
                    job.request_id,
                    request.state.value,
                )
            elif state == ExecutionState.SUCCEEDED:
                self.decisions.mark_completed(
                    session,
                    request,
                    actor="mailproc",
                    reason=f"reset carried out by {job.method}",
                    now=now,
                    details=attempt,
                )
            elif state == ExecutionState.FAILED:
                self.decisions.mark_failed(
                    session, request, reason=values["last_error"], now=now, details=attempt
                )
        if state == ExecutionState.SUCCEEDED:
            log.info("reset of request %d carried out by %s", job.request_id, job.method)
        elif state == ExecutionState.PENDING:
            assert retry_at is not None
            log.warning(
                "reset of request %d: %s; retrying at %s",
                job.request_id,
                outcome,
                retry_at.isoformat(timespec="seconds"),
            )
        else:
            log.error("reset of request %d failed: %s", job.request_id, values["last_error"])
        return state

    # application side ---------------------------------------------------------------------

    async def execute(self, job: Job) -> str:
        """One attempt; returns what the application answered, or raises Temporary- or
        PermanentFailure."""
        # Approved under an earlier configuration, say: the method must still be set up.
        if job.method == "webhook":
            if not self.reset.webhook_url or not self.reset.webhook_secret:
                raise TemporaryFailure("[reset] webhook_url and webhook_secret are not set")
            return await self._webhook(job)
        if job.method == "sql":
            if not self.reset.sql or not self.settings.accounts.url:
                raise TemporaryFailure("[reset] sql and [accounts] url are not set")
            return await asyncio.to_thread(self._sql, job)
        raise PermanentFailure(f"unknown reset method {job.method!r}")

    async def _webhook(self, job: Job) -> str:
        body = body_bytes(job.payload)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"mailproc/{__version__}",
            IDEMPOTENCY_HEADER: str(job.request_id),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(self.reset.webhook_secret, timestamp, body),
        }
        url = self.reset.webhook_url
        try:
            async with httpx.AsyncClient(
                timeout=self.reset.timeout_seconds, follow_redirects=False, trust_env=False
            ) as client:
                response = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TemporaryFailure(
                f"webhook {url}: {type(exc).__name__}: {exc or 'no answer'}"
            ) from None
        answer = f"HTTP {response.status_code}"
        if response.text.strip():
            answer += f": {response.text.strip()[:_RESPONSE_KEPT]}"
        if not response.is_success:
            raise TemporaryFailure(f"webhook answered {answer}")
        return answer

    def _engine(self) -> Engine:
        if self._accounts is None:
            url = self.settings.accounts.url
            connect_args: dict[str, Any] = {}
            if url.startswith("sqlite"):
                connect_args["timeout"] = self.reset.timeout_seconds
            elif url.startswith("postgresql"):
                milliseconds = int(self.reset.timeout_seconds * 1000)
                connect_args["connect_timeout"] = max(1, int(self.reset.timeout_seconds))
                connect_args["options"] = f"-c statement_timeout={milliseconds}"
            self._accounts = create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        return self._accounts

    def _sql(self, job: Job) -> str:
        try:
            with self._engine().begin() as connection:
                result = connection.execute(text(self.reset.sql), {"account_id": job.account_id})
                if result.rowcount != 1:
                    # Raised inside the transaction: nothing it did is kept.
                    raise PermanentFailure(
                        f"the statement affected {result.rowcount} rows for account "
                        f"{job.account_id}, not exactly one; rolled back"
                    )
        except OperationalError as exc:
            raise TemporaryFailure(f"accounts database: {_first_line(exc)}") from None
        except (DBAPIError, SQLAlchemyError) as exc:
            raise PermanentFailure(f"the statement failed: {_first_line(exc)}") from None
        return f"1 row updated for account {job.account_id}"

    async def run_once(self, stop: Callable[[], bool] = lambda: False) -> int:
        """Carry out every reset due now, until ``stop()`` turns true; returns how many
        attempts were made."""
        attempts = 0
        while not stop():
            jobs = await asyncio.to_thread(self.claim_due)
            if not jobs:
                break
            # As for replies: only while half the lease is left, so that no claim runs out
            # under a slow application and another instance carries out the same reset.
            start_by = time.monotonic() + self.lease.total_seconds() / 2
            for index, job in enumerate(jobs):
                if stop() or time.monotonic() > start_by:
                    await asyncio.to_thread(self.release, jobs[index:])
                    break
                outcome: Exception | str
                try:
                    outcome = await self.execute(job)
                except (TemporaryFailure, PermanentFailure) as exc:
                    outcome = exc
                await asyncio.to_thread(self.record, job, outcome)
                attempts += 1
        return attempts

    def close(self) -> None:
        if self._accounts is not None:
            self._accounts.dispose()
            self._accounts = None


def _first_line(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    return (str(original).strip().splitlines() or [type(original).__name__])[0]
