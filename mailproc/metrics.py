"""Prometheus metrics. What lives in the database (messages, verdicts, requests, the outbox,
resets) is read at each scrape, so every instance on one database reports the same totals and
nothing is lost when an instance restarts; what lives in one process (its open SMTP sessions)
is that instance's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from mailproc.db import Database
from mailproc.models import (
    ExecutionState,
    Message,
    MessageState,
    OutboxEntry,
    OutboxState,
    RequestState,
    ResetExecution,
    ResetRequest,
    utcnow,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# This process's own counters (the listener's), kept for the life of the process.
PROCESS = CollectorRegistry(auto_describe=True)
SMTP_MESSAGES = Counter(
    "mailproc_smtp_messages",
    "Messages offered over SMTP/LMTP by outcome: stored (250), temporary_failure (451, our "
    "fault, the sender retries), shutting_down (421).",
    ["outcome"],
    registry=PROCESS,
)
SMTP_RECIPIENTS_REFUSED = Counter(
    "mailproc_smtp_recipients_refused",
    "RCPT TO refused (550): not one of [smtp] support_addresses, or bad syntax.",
    registry=PROCESS,
)
SMTP_SESSIONS = Counter(
    "mailproc_smtp_sessions",
    "SMTP/LMTP connections by result: accepted, or refused (too many, shutting down).",
    ["result"],
    registry=PROCESS,
)
# Bound once: the listener counts every message and session without a label lookup.
STORED = SMTP_MESSAGES.labels("stored")
TEMPORARY_FAILURE = SMTP_MESSAGES.labels("temporary_failure")
SHUTTING_DOWN = SMTP_MESSAGES.labels("shutting_down")
SESSION_ACCEPTED = SMTP_SESSIONS.labels("accepted")
SESSION_REFUSED = SMTP_SESSIONS.labels("refused")
_WEEK = timedelta(days=7)
# The verdict's reasons are a short, fixed vocabulary (codes such as from_comment, or "no
# aligned DKIM pass, ..."), so they make bounded label values.
_REASONS = {
    "postgresql": text(
        "SELECT r, count(*) FROM message, jsonb_array_elements_text(verdict->'reasons') AS r "
        "WHERE authenticated IS false GROUP BY r"
    ),
    "sqlite": text(
        "SELECT j.value, count(*) FROM message, json_each(message.verdict, '$.reasons') AS j "
        "WHERE message.authenticated = 0 GROUP BY j.value"
    ),
}


def _counts(session: Any, column: Any) -> dict[str, int]:
    """Rows per value of ``column``, keyed by the value's text."""
    rows = session.execute(select(column, func.count()).group_by(column)).all()
    return {str(getattr(row[0], "value", row[0])): row[1] for row in rows}


class DatabaseCollector(Collector):
    def __init__(self, database: Database) -> None:
        self.db = database

    def collect(self) -> Iterator[Metric]:
        now = utcnow()
        with self.db.reading() as session:
            messages = GaugeMetricFamily(
                "mailproc_messages", "Stored messages by processing state.", labels=["state"]
            )
            counts = _counts(session, Message.state)
            for state in MessageState:
                messages.add_metric([state.value], counts.get(state.value, 0))
            yield messages

            verdicts = GaugeMetricFamily(
                "mailproc_verdicts",
                "Processed messages by authentication strength (strong, weak, none).",
                labels=["strength"],
            )
            for strength, count in session.execute(
                select(Message.auth_strength, func.count())
                .where(Message.auth_strength.is_not(None))
                .group_by(Message.auth_strength)
            ):
                verdicts.add_metric([str(strength)], count)
            yield verdicts

            reasons = GaugeMetricFamily(
                "mailproc_unauthenticated_reasons",
                "Why processed messages were not authenticated, by reason (a message may have "
                "several).",
                labels=["reason"],
            )
            for reason, count in session.execute(_REASONS[session.get_bind().dialect.name]):
                reasons.add_metric([str(reason)], count)
            yield reasons

            requests = GaugeMetricFamily(
                "mailproc_requests", "Reset requests by state.", labels=["state"]
            )
            counts = _counts(session, ResetRequest.state)
            for request_state in RequestState:
                requests.add_metric([request_state.value], counts.get(request_state.value, 0))
            yield requests

            oldest = session.execute(
                select(func.min(ResetRequest.created_at)).where(
                    ResetRequest.state == RequestState.PENDING
                )
            ).scalar_one_or_none()
            age = GaugeMetricFamily(
                "mailproc_queue_oldest_pending_seconds",
                "Age of the oldest request waiting for a decision (0 when none waits).",
            )
            age.add_metric([], (now - oldest).total_seconds() if oldest is not None else 0.0)
            yield age

            latency = GaugeMetricFamily(
                "mailproc_approval_latency_seconds",
                "Mean time from a request's creation to its decision, over the last 7 days.",
            )
            decided = session.execute(
                select(ResetRequest.created_at, ResetRequest.decided_at).where(
                    ResetRequest.decided_at.is_not(None),
                    ResetRequest.decided_at > now - _WEEK,
                )
            ).all()
            spans = [(d - c).total_seconds() for c, d in decided if c is not None and d is not None]
            latency.add_metric([], sum(spans) / len(spans) if spans else 0.0)
            yield latency

            outbox = GaugeMetricFamily(
                "mailproc_outbox", "Replies in the outbox by state.", labels=["state"]
            )
            counts = _counts(session, OutboxEntry.state)
            for outbox_state in OutboxState:
                outbox.add_metric([outbox_state.value], counts.get(outbox_state.value, 0))
            yield outbox

            deferrals = GaugeMetricFamily(
                "mailproc_message_deferrals",
                "Times messages had to wait on DNS or the account directory (temporary errors).",
            )
            total = session.execute(
                select(func.coalesce(func.sum(Message.deferrals), 0))
            ).scalar_one()
            deferrals.add_metric([], float(total))
            yield deferrals

            resets = GaugeMetricFamily(
                "mailproc_reset_executions",
                "Executions of approved resets by state.",
                labels=["state"],
            )
            counts = _counts(session, ResetExecution.state)
            for run_state in ExecutionState:
                resets.add_metric([run_state.value], counts.get(run_state.value, 0))
            yield resets


class ProcessCollector(Collector):
    """This instance's own figures."""

    def __init__(self, open_sessions: Callable[[], int]) -> None:
        self.open_sessions = open_sessions

    def collect(self) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "mailproc_smtp_sessions_open", "SMTP/LMTP sessions open on this instance."
        )
        sessions.add_metric([], self.open_sessions())
        yield sessions


class Metrics:
    def __init__(self, database: Database, open_sessions: Callable[[], int] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DatabaseCollector(database))
        if open_sessions is not None:
            self.registry.register(ProcessCollector(open_sessions))

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry) + generate_latest(PROCESS)
        return data
