"""Deciding requests: approve (with four-eyes for flagged requests), deny, cancel, complete by
hand, retry a failed reset. One service for every interface (CLI, console, API); each change
is one transaction with its audit event and the owner's reply."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailproc.agents import active_agent
from mailproc.config import Settings
from mailproc.db import Database
from mailproc.errors import InvalidState, NotFound
from mailproc.models import (
    Agent,
    ApprovalVote,
    ExecutionState,
    Message,
    OutboxEntry,
    RequestState,
    ResetExecution,
    ResetRequest,
    utcnow,
)
from mailproc.outbox import Outbox, Source
from mailproc.requests import MAX_ID, SYSTEM, audit, lock_audit_log

NOTE_MAX_LENGTH = 2000


@dataclass(frozen=True)
class Outcome:
    request: ResetRequest
    # What happened, in a few words: "approved; the reset will be carried out by webhook".
    summary: str


def _text(value: str | None, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise InvalidState(f"{what} is required")
    if len(text) > NOTE_MAX_LENGTH:
        raise InvalidState(
            f"{what} is too long ({len(text)} characters; at most {NOTE_MAX_LENGTH})"
        )
    return text


def webhook_payload(request: ResetRequest, approvers: list[str], at: datetime) -> dict[str, Any]:
    """What the application receives for an approved reset (the webhook's JSON body)."""
    return {
        "event": "reset_security_question",
        "request_id": request.id,
        "reference": request.reference,
        "account_id": request.account_id,
        "email": request.email,
        "approved_by": approvers,
        "approved_at": at.isoformat(timespec="seconds"),
    }


class DecisionService:
    def __init__(self, settings: Settings, database: Database, outbox: Outbox | None = None):
        self.settings = settings
        self.db = database
        self.outbox = outbox if outbox is not None else Outbox.from_settings(settings)

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _request(session: Session, request_id: int) -> ResetRequest:
        if not 0 < request_id < MAX_ID:
            raise NotFound(f"request {request_id} not found")
        lock_audit_log(session.connection())
        request = session.get(ResetRequest, request_id, with_for_update=True)
        if request is None:
            raise NotFound(f"request {request_id} not found")
        return request

    @staticmethod
    def _decided(request: ResetRequest) -> InvalidState:
        by = f" by {request.decided_by}" if request.decided_by else ""
        when = f" at {request.decided_at:%Y-%m-%d %H:%M} UTC" if request.decided_at else ""
        return InvalidState(
            f"request {request.id} is {request.state.value}{by}{when}; it cannot be decided again"
        )

    @staticmethod
    def _execution(session: Session, request_id: int) -> ResetExecution | None:
        return session.scalars(
            select(ResetExecution).where(ResetExecution.request_id == request_id).with_for_update()
        ).first()

    def _reply(
        self, session: Session, request: ResetRequest, template: str, **context: Any
    ) -> None:
        """The owner's reply about their request, to the registered address, in the thread of
        the message that asked."""
        source = None
        if request.message_id is not None:
            message = session.get(Message, request.message_id)
            if message is not None and message.raw:
                source = Source.of(message)
        self.outbox.reply(
            session,
            template=template,
            to=request.email,
            locale=request.locale,
            context={"reference": request.reference, **context},
            source=source,
        )

    def _close(
        self,
        session: Session,
        request: ResetRequest,
        to: RequestState,
        *,
        actor: str,
        action: str,
        reason: str,
        now: datetime,
    ) -> None:
        before = request.state
        request.state = to
        request.updated_at = now
        request.decided_at = request.decided_at or now
        request.decided_by = request.decided_by or actor
        request.decision_note = reason
        request.claimed_by = None
        request.claimed_at = None
        audit(
            session.connection(),
            request.id,
            action=action,
            at=now,
            actor=actor,
            from_state=before,
            to_state=to,
            reason=reason,
        )

    # -- decisions --------------------------------------------------------------------------

    def needs_two(self, request: ResetRequest) -> bool:
        return self.settings.approval.four_eyes_for_flagged and bool(request.risk_flags)

    def approve(self, request_id: int, agent_name: str, note: str) -> Outcome:
        """Approve a pending request. A flagged request (four-eyes) needs a second, different
        agent: the first approval is recorded as a vote, the second approves."""
        note = _text(note, "a verification note (how the owner was verified)")
        now = utcnow()
        with self.db.writing() as session:
            agent = active_agent(session, agent_name)
            request = self._request(session, request_id)
            if request.state != RequestState.PENDING:
                raise self._decided(request)
            if request.expires_at <= now:
                raise InvalidState(
                    f"request {request_id} expired at {request.expires_at:%Y-%m-%d %H:%M} UTC; "
                    "it can no longer be approved"
                )
            voters = list(
                session.execute(
                    select(Agent.id, Agent.name, Agent.disabled_at)
                    .join(ApprovalVote, ApprovalVote.agent_id == Agent.id)
                    .where(ApprovalVote.request_id == request_id)
                    .order_by(ApprovalVote.at)
                )
            )
            if any(voter.id == agent.id for voter in voters):
                raise InvalidState(
                    f"{agent.name} approved request {request_id} already; a second, different "
                    "agent must approve it"
                )
            session.execute(
                insert(ApprovalVote).values(
                    request_id=request_id, agent_id=agent.id, note=note, at=now
                )
            )
            # The vote of an agent disabled since does not count towards four-eyes.
            approvers = [voter.name for voter in voters if voter.disabled_at is None]
            approvers.append(agent.name)
            if self.needs_two(request) and len(approvers) < 2:
                request.updated_at = now
                audit(
                    session.connection(),
                    request_id,
                    action="vote",
                    at=now,
                    actor=agent.name,
                    reason=note,
                    details={"risk_flags": request.risk_flags, "votes": 1, "needed": 2},
                )
                return Outcome(
                    request,
                    f"approval by {agent.name} recorded; flagged ({', '.join(request.risk_flags)})"
                    ": a second, different agent must approve",
                )
            request.state = RequestState.APPROVED
            request.updated_at = now
            request.decided_at = now
            request.decided_by = ",".join(approvers)
            request.decision_note = note
            audit(
                session.connection(),
                request_id,
                action="approved",
                at=now,
                actor=agent.name,
                from_state=RequestState.PENDING,
                to_state=RequestState.APPROVED,
                reason=note,
                details={"approved_by": approvers},
            )
            method = self.settings.reset.method
            session.add(
                ResetExecution(
                    request_id=request_id,
                    method=method,
                    state=ExecutionState.MANUAL if method == "manual" else ExecutionState.PENDING,
                    payload=webhook_payload(request, approvers, now),
                    attempts=0,
                    next_attempt_at=None if method == "manual" else now,
                    created_at=now,
                    updated_at=now,
                )
            )
            summary = (
                "approved; reset the security question in the application, then run: "
                f"mailproc requests complete {request_id} --agent NAME"
                if method == "manual"
                else f"approved; the reset will be carried out by {method}"
            )
            return Outcome(request, summary)

    def deny(self, request_id: int, agent_name: str, reason: str) -> Outcome:
        """Deny a pending request; the reason goes into the owner's reply."""
        reason = _text(reason, "a reason (it is sent to the owner)")
        now = utcnow()
        with self.db.writing() as session:
            agent = active_agent(session, agent_name)
            request = self._request(session, request_id)
            if request.state != RequestState.PENDING:
                raise self._decided(request)
            self._close(
                session,
                request,
                RequestState.DENIED,
                actor=agent.name,
                action="denied",
                reason=reason,
                now=now,
            )
            request.decided_by = agent.name
            self._reply(session, request, "request_denied", reason=reason)
            return Outcome(request, "denied; the owner is told why")

    def deny_many(
        self, request_ids: list[int], agent_name: str, reason: str
    ) -> tuple[list[Outcome], dict[int, str]]:
        """Deny several pending requests (obvious abuse), each on its own with its reply;
        returns the outcomes and, per request that could not be denied, why."""
        _text(reason, "a reason (it is sent to the owner)")
        done: list[Outcome] = []
        refused: dict[int, str] = {}
        for request_id in dict.fromkeys(request_ids):
            try:
                done.append(self.deny(request_id, agent_name, reason))
            except (InvalidState, NotFound) as exc:
                refused[request_id] = str(exc)
        return done, refused

    def cancel(self, request_id: int, agent_name: str, reason: str | None = None) -> Outcome:
        """Close a request without a reset (an admin's decision), while nothing is running."""
        now = utcnow()
        with self.db.writing() as session:
            agent = active_agent(session, agent_name, admin=True)
            request = self._request(session, request_id)
            self._cancel(
                session,
                request,
                actor=agent.name,
                reason=(reason or "").strip() or f"cancelled by {agent.name}",
                cancelled_by="support",
                now=now,
            )
            return Outcome(request, "cancelled; the owner is told")

    def cancel_by_owner(
        self, request_id: int, reason: str = "the owner says they did not ask for it"
    ) -> Outcome:
        """The account owner's cancel (the "this wasn't me" link): closes the request without
        a reset, unless its reset is running."""
        now = utcnow()
        with self.db.writing() as session:
            request = self._request(session, request_id)
            self._cancel(
                session, request, actor="owner", reason=reason, cancelled_by="owner", now=now
            )
            return Outcome(request, "cancelled by the owner")

    def _cancel(
        self,
        session: Session,
        request: ResetRequest,
        *,
        actor: str,
        reason: str,
        cancelled_by: str,
        now: datetime,
    ) -> None:
        cancellable = (RequestState.PENDING, RequestState.APPROVED, RequestState.FAILED)
        if request.state not in cancellable:
            raise self._decided(request)
        execution = self._execution(session, request.id)
        if execution is not None:
            if execution.state == ExecutionState.RUNNING:
                raise InvalidState(
                    f"request {request.id}'s reset is being carried out right now; it cannot be "
                    "cancelled"
                )
            execution.state = ExecutionState.CANCELLED
            execution.next_attempt_at = None
            execution.updated_at = now
        self._close(
            session,
            request,
            RequestState.CANCELLED,
            actor=actor,
            action="cancelled",
            reason=reason,
            now=now,
        )
        self._reply(session, request, "request_cancelled", cancelled_by=cancelled_by)

    def complete(self, request_id: int, agent_name: str, note: str | None = None) -> Outcome:
        """Mark an approved request done by hand (``[reset] method = "manual"``)."""
        now = utcnow()
        with self.db.writing() as session:
            agent = active_agent(session, agent_name)
            request = self._request(session, request_id)
            execution = self._execution(session, request_id)
            if request.state != RequestState.APPROVED or execution is None:
                raise InvalidState(
                    f"request {request_id} is {request.state.value}; only an approved request "
                    "can be completed"
                )
            if execution.state != ExecutionState.MANUAL:
                raise InvalidState(
                    f"request {request_id} is carried out by {execution.method}; it completes "
                    "by itself (or fails, and mailproc requests retry tries again)"
                )
            execution.state = ExecutionState.SUCCEEDED
            execution.finished_at = now
            execution.updated_at = now
            execution.response = f"done by hand by {agent.name}"
            self.mark_completed(
                session,
                request,
                actor=agent.name,
                reason=(note or "").strip() or "reset done by hand in the application",
                now=now,
            )
            return Outcome(request, "completed; the owner is told")

    def retry(self, request_id: int, agent_name: str) -> Outcome:
        """Carry out a failed reset again, from its first attempt (an admin's decision)."""
        now = utcnow()
        try:
            with self.db.writing() as session:
                agent = active_agent(session, agent_name, admin=True)
                request = self._request(session, request_id)
                execution = self._execution(session, request_id)
                if request.state != RequestState.FAILED or execution is None:
                    raise InvalidState(
                        f"request {request_id} is {request.state.value}; only a failed request "
                        "can be retried"
                    )
                execution.state = ExecutionState.PENDING
                execution.attempts = 0
                execution.next_attempt_at = now
                execution.updated_at = now
                request.state = RequestState.APPROVED
                request.updated_at = now
                session.flush()
                audit(
                    session.connection(),
                    request_id,
                    action="retry",
                    at=now,
                    actor=agent.name,
                    from_state=RequestState.FAILED,
                    to_state=RequestState.APPROVED,
                    reason=f"after: {execution.last_error}",
                )
                return Outcome(
                    request, f"approved again; the reset will be carried out by {execution.method}"
                )
        except IntegrityError:
            raise InvalidState(
                f"the account of request {request_id} has another open request; decide that one"
            ) from None

    # -- what the executor reports ------------------------------------------------------------

    def mark_completed(
        self,
        session: Session,
        request: ResetRequest,
        *,
        actor: str,
        reason: str,
        now: datetime,
        details: dict[str, Any] | None = None,
    ) -> None:
        """An approved request's reset is done: completed, on record, and the owner told."""
        request.state = RequestState.COMPLETED
        request.updated_at = now
        request.completed_at = now
        audit(
            session.connection(),
            request.id,
            action="completed",
            at=now,
            actor=actor,
            from_state=RequestState.APPROVED,
            to_state=RequestState.COMPLETED,
            reason=reason,
            details=details,
        )
        self._reply(session, request, "request_completed")

    def mark_failed(
        self,
        session: Session,
        request: ResetRequest,
        *,
        reason: str,
        now: datetime,
        details: dict[str, Any] | None = None,
    ) -> None:
        """An approved request's reset failed for good: ``failed``, for an admin to retry."""
        request.state = RequestState.FAILED
        request.updated_at = now
        audit(
            session.connection(),
            request.id,
            action="failed",
            at=now,
            from_state=RequestState.APPROVED,
            to_state=RequestState.FAILED,
            reason=reason,
            details=details,
        )

    # -- what the scheduler does -------------------------------------------------------------

    def expire_due(self, limit: int = 100, now: datetime | None = None) -> int:
        """Expire pending requests past their expiry, each with its audit event and the
        owner's reply; returns how many. Safe on several instances at once (``SKIP LOCKED``)."""
        now = now or utcnow()
        expired = 0
        with self.db.writing() as session:
            lock_audit_log(session.connection())
            due = session.scalars(
                select(ResetRequest)
                .where(
                    ResetRequest.state == RequestState.PENDING,
                    ResetRequest.expires_at <= now,
                )
                .order_by(ResetRequest.expires_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            for request in due:
                days = round((request.expires_at - request.created_at) / timedelta(days=1))
                self._close(
                    session,
                    request,
                    RequestState.EXPIRED,
                    actor=SYSTEM,
                    action="expired",
                    reason=f"no decision within {days} days",
                    now=now,
                )
                self._reply(session, request, "request_expired", expire_days=days)
                expired += 1
        return expired

    def remind_staff(self, now: datetime | None = None, shown: int = 50) -> int:
        """Send ``[queue] staff_addresses`` a digest of the requests waiting longer than
        ``remind_after_hours``, unless one went out in the last ``remind_every_hours``; returns
        how many digests were queued. One instance at a time decides (a lock per database)."""
        queue = self.settings.queue
        if not queue.staff_addresses:
            return 0
        now = now or utcnow()
        older = now - timedelta(hours=queue.remind_after_hours)
        base = self.settings.web.base_url.rstrip("/")
        sent = 0
        with self.db.writing() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(text("SELECT pg_advisory_xact_lock(hashtext('mailproc-remind'))"))
            waiting = (
                select(ResetRequest)
                .where(ResetRequest.state == RequestState.PENDING, ResetRequest.created_at < older)
                .order_by(ResetRequest.created_at)
            )
            count = session.execute(
                select(func.count()).select_from(waiting.subquery())
            ).scalar_one()
            if not count:
                return 0
            votes = dict(
                session.execute(
                    select(ApprovalVote.request_id, func.count()).group_by(ApprovalVote.request_id)
                ).all()
            )
            rows = [
                {
                    "reference": r.reference,
                    "email": r.email,
                    "waiting_hours": int((now - r.created_at).total_seconds() // 3600),
                    "risk_flags": list(r.risk_flags),
                    "votes": votes.get(r.id, 0),
                    "url": f"{base}/requests/{r.id}",
                }
                for r in session.scalars(waiting.limit(shown))
            ]
            for address in queue.staff_addresses:
                recent = session.execute(
                    select(func.count())
                    .select_from(OutboxEntry)
                    .where(
                        OutboxEntry.template == "staff_reminder",
                        OutboxEntry.recipient == address,
                        OutboxEntry.created_at > now - timedelta(hours=queue.remind_every_hours),
                    )
                ).scalar_one()
                if recent:
                    continue
                self.outbox.reply(
                    session,
                    template="staff_reminder",
                    to=address,
                    context={
                        "requests": rows,
                        "count": count,
                        "older_than_hours": round(queue.remind_after_hours),
                        "console_url": f"{base}/",
                    },
                )
                sent += 1
        return sent
