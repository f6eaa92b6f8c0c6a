"""Agents and decisions on both databases: approve (four-eyes for flagged requests), deny,
cancel, complete by hand, retry; the reset executor's webhook and SQL methods against real
receivers; and the audit events and replies each one writes."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Iterator
from datetime import timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update

from mailproc import db
from mailproc.accounts import Account
from mailproc.actions import ResetExecutor, signature
from mailproc.agents import AgentError, AgentService
from mailproc.decisions import DecisionService
from mailproc.errors import InvalidState, NotFound
from mailproc.models import (
    Agent,
    AgentRole,
    ExecutionState,
    OutboxEntry,
    RequestState,
    ResetExecution,
    ResetRequest,
    utcnow,
)
from mailproc.requests import RequestService, open_or_join, verify_chain
from tests.support import settings_for, wait_for
from tests.test_requests import messages
from tests.webhook import Receiver

SECRET = "s3cret-" + "x" * 40
PASSWORD = "correct horse battery"
ALICE = Account("42", "alice@example.org", "Alice", "de")


@pytest.fixture
def database(database_url: str) -> Iterator[db.Database]:
    database = db.Database(database_url)
    db.upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def agents(database: db.Database) -> AgentService:
    service = AgentService(database)
    service.add("alice", PASSWORD)
    service.add("bob", PASSWORD)
    service.add("root", PASSWORD, AgentRole.ADMIN)
    return service


def request(
    database: db.Database,
    database_url: str,
    flags: list[str] | None = None,
    account: Account = ALICE,
    expire_after: timedelta = timedelta(days=7),
) -> int:
    [message_id] = messages(database, database_url, 1)
    with database.writing_connection() as connection:
        return open_or_join(
            connection,
            account=account,
            message_id=message_id,
            verdict={},
            decision={"rule": "test"},
            strength="strong",
            flags=flags or [],
            now=utcnow(),
            expire_after=expire_after,
        ).request_id


def service(
    database: db.Database, database_url: str, **sections: dict[str, Any]
) -> DecisionService:
    return DecisionService(settings_for(database_url, **sections), database)


def actions(database: db.Database, request_id: int) -> list[tuple[str, str, str | None]]:
    detail = RequestService(database).get(request_id)
    return [(e.actor, e.action, e.to_state) for e in detail.events]


def replies(database: db.Database, template: str) -> list[OutboxEntry]:
    with database.reading() as session:
        return list(session.scalars(select(OutboxEntry).where(OutboxEntry.template == template)))


def text_of(entry: OutboxEntry) -> str:
    parsed = email.message_from_bytes(entry.content, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    part = parsed.get_body(("plain",))
    assert part is not None
    return str(part.get_content())


# -- agents ---------------------------------------------------------------------------------


def test_agents_are_stored_with_argon2id_and_authenticate(
    database: db.Database, agents: AgentService
) -> None:
    with database.reading() as session:
        stored = session.scalars(select(Agent).where(Agent.name == "alice")).one()
    assert stored.password_hash.startswith("$argon2id$")
    assert PASSWORD not in stored.password_hash
    assert agents.authenticate("alice", PASSWORD) is not None
    assert agents.authenticate("alice", PASSWORD + "!") is None
    assert agents.authenticate("nobody", PASSWORD) is None
    agents.disable("alice")
    assert agents.authenticate("alice", PASSWORD) is None
    with pytest.raises(InvalidState, match="disabled already"):
        agents.disable("alice")
    agents.enable("alice")
    assert agents.authenticate("alice", PASSWORD) is not None
    with pytest.raises(InvalidState, match="exists already"):
        agents.add("alice", PASSWORD)
    with pytest.raises(AgentError, match="at least 12"):
        agents.add("carol", "short")
    with pytest.raises(AgentError, match="invalid agent name"):
        agents.add("Carol Smith", PASSWORD)
    assert [(a.name, a.role.value, a.active) for a in agents.list()] == [
        ("alice", "agent", True),
        ("bob", "agent", True),
        ("root", "admin", True),
    ]
    events = RequestService(database).events()
    assert [e.action for e in events] == [
        "agent_added",
        "agent_added",
        "agent_added",
        "agent_disabled",
        "agent_enabled",
    ]
    assert verify_chain(database).broken_at is None


# -- decisions ------------------------------------------------------------------------------


def test_an_unflagged_request_is_approved_by_one_agent_and_cannot_be_decided_again(
    database: db.Database, database_url: str, agents: AgentService
) -> None:
    decisions = service(database, database_url)
    request_id = request(database, database_url)
    outcome = decisions.approve(request_id, "alice", "  called back on the number on file ")
    assert outcome.request.state == RequestState.APPROVED
    assert "requests complete" in outcome.summary  # the default method is manual
    detail = RequestService(database).get(request_id)
    assert detail.request.decided_by == "alice"
    assert detail.request.decision_note == "called back on the number on file"
    assert [v.agent for v in detail.votes] == ["alice"]
    assert detail.execution is not None
    assert detail.execution.state == ExecutionState.MANUAL
    assert actions(database, request_id)[-1] == ("alice", "approved", "approved")
    for decide in (
        lambda: decisions.approve(request_id, "bob", "again"),
        lambda: decisions.deny(request_id, "bob", "no"),
    ):
        with pytest.raises(
            InvalidState, match=r"is approved by alice at .* cannot be decided again"
        ):
            decide()


def test_four_eyes_one_agent_cannot_approve_a_flagged_request_alone_nor_twice(
    database: db.Database, database_url: str, agents: AgentService
) -> None:
    decisions = service(
        database,
        database_url,
        reset={"method": "webhook", "webhook_url": "http://127.0.0.1:1/", "webhook_secret": SECRET},
    )
    request_id = request(database, database_url, flags=["first_contact"])
    first = decisions.approve(request_id, "alice", "checked the account's phone number")
    assert first.request.state == RequestState.PENDING
    assert "second, different agent" in first.summary
    with pytest.raises(InvalidState, match=r"alice approved request .* already"):
        decisions.approve(request_id, "alice", "really sure")
    detail = RequestService(database).get(request_id)
    assert detail.request.state == RequestState.PENDING
    assert detail.execution is None
    assert [v.agent for v in detail.votes] == ["alice"]
    second = decisions.approve(request_id, "bob", "second look: matches")
    assert second.request.state == RequestState.APPROVED
    detail = RequestService(database).get(request_id)
    assert detail.request.decided_by == "alice,bob"
    assert detail.execution is not None
    assert detail.execution.state == ExecutionState.PENDING
    assert detail.execution.payload["approved_by"] == ["alice", "bob"]
    assert [a for _, a, _ in actions(database, request_id)][-2:] == ["vote", "approved"]
    # The vote of an agent disabled since does not count: two active agents are needed.
    third = request(
        database,
        database_url,
        flags=["first_contact"],
        account=Account("44", "carol@example.org", None, None),
    )
    decisions.approve(third, "alice", "checked")
    agents.disable("alice")
    outcome = decisions.approve(third, "bob", "checked too")
    assert outcome.request.state == RequestState.PENDING
    assert "second, different agent" in outcome.summary
    agents.add("carol", PASSWORD)
    assert decisions.approve(third, "carol", "checked").request.state == RequestState.APPROVED
    assert RequestService(database).get(third).request.decided_by == "bob,carol"
    # With four-eyes off, one approval is enough even for a flagged request.
    solo = service(database, database_url, approval={"four_eyes_for_flagged": False})
    other = request(
        database,
        database_url,
        flags=["weak_authentication"],
        account=Account("43", "bob@example.net", None, None),
    )
    assert solo.approve(other, "bob", "verified").request.state == RequestState.APPROVED


def test_who_may_decide(database: db.Database, database_url: str, agents: AgentService) -> None:
    decisions = service(database, database_url)
    request_id = request(database, database_url)
    agents.disable("bob")
    with pytest.raises(InvalidState, match="bob is disabled"):
        decisions.approve(request_id, "bob", "verified")
    with pytest.raises(InvalidState, match="bob is disabled"):
        decisions.deny(request_id, "bob", "no")
    with pytest.raises(NotFound, match="no agent named 'mallory'"):
        decisions.approve(request_id, "mallory", "verified")
    with pytest.raises(InvalidState, match="alice is not an admin"):
        decisions.cancel(request_id, "alice")
    with pytest.raises(InvalidState, match=r"verification note .* is required"):
        decisions.approve(request_id, "alice", "   ")
    with pytest.raises(InvalidState, match=r"reason .* is required"):
        decisions.deny(request_id, "alice", "")
    with pytest.raises(NotFound, match="request 999 not found"):
        decisions.approve(999, "alice", "verified")
    assert RequestService(database).get(request_id).request.state == RequestState.PENDING
    assert [a for _, a, _ in actions(database, request_id)] == ["created"]


def test_deny_tells_the_owner_why_and_cancel_closes_without_a_reset(
    database: db.Database, database_url: str, agents: AgentService
) -> None:
    decisions = service(database, database_url)
    denied = request(database, database_url)
    decisions.deny(denied, "alice", "We could not reach you on the number on file.")
    [reply] = replies(database, "request_denied")
    assert reply.recipient == ALICE.email
    assert reply.locale == "de"
    assert "We could not reach you on the number on file." in text_of(reply)
    assert actions(database, denied)[-1] == ("alice", "denied", "denied")

    cancelled = request(database, database_url)  # the account's next request
    decisions.approve(cancelled, "alice", "verified")  # manual: waiting for the agent
    outcome = decisions.cancel(cancelled, "root", "duplicate of an older ticket")
    assert outcome.request.state == RequestState.CANCELLED
    detail = RequestService(database).get(cancelled)
    assert detail.execution is not None
    assert detail.execution.state == ExecutionState.CANCELLED
    assert len(replies(database, "request_cancelled")) == 1
    with pytest.raises(InvalidState, match="is cancelled; only an approved request can be"):
        decisions.complete(cancelled, "alice")

    by_owner = request(database, database_url)
    assert decisions.cancel_by_owner(by_owner).request.state == RequestState.CANCELLED
    assert actions(database, by_owner)[-1] == ("owner", "cancelled", "cancelled")
    owner_reply = replies(database, "request_cancelled")[-1]
    assert "auf Ihren Wunsch" in text_of(owner_reply)  # Alice reads German
    with pytest.raises(InvalidState, match="cannot be decided again"):
        decisions.cancel_by_owner(by_owner)


def test_a_running_reset_cannot_be_cancelled_and_an_expired_request_not_approved(
    database: db.Database, database_url: str, agents: AgentService
) -> None:
    decisions = service(database, database_url)
    request_id = request(database, database_url)
    decisions.approve(request_id, "alice", "verified")
    with database.writing() as session:
        session.execute(update(ResetExecution).values(state=ExecutionState.RUNNING))
    with pytest.raises(InvalidState, match="being carried out right now"):
        decisions.cancel(request_id, "root")
    stale = request(
        database,
        database_url,
        account=Account("43", "bob@example.net", None, None),
        expire_after=timedelta(seconds=-1),
    )
    with pytest.raises(InvalidState, match=r"expired at .* can no longer be approved"):
        decisions.approve(stale, "alice", "verified")


def test_a_manual_reset_is_completed_by_the_agent(
    database: db.Database, database_url: str, agents: AgentService
) -> None:
    decisions = service(database, database_url)
    request_id = request(database, database_url)
    with pytest.raises(InvalidState, match="only an approved request can be completed"):
        decisions.complete(request_id, "alice")
    decisions.approve(request_id, "alice", "verified")
    outcome = decisions.complete(request_id, "bob", "reset in the admin tool")
    assert outcome.request.state == RequestState.COMPLETED
    assert outcome.request.completed_at is not None
    assert len(replies(database, "request_completed")) == 1
    assert actions(database, request_id)[-1] == ("bob", "completed", "completed")
    assert verify_chain(database).broken_at is None


# -- execution ------------------------------------------------------------------------------


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver(SECRET).start()
    yield running
    running.stop()


def webhook(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {
        "method": "webhook",
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
        "timeout_seconds": 1.0,
        "lease_seconds": 4.0,
        "retry_base_seconds": 0.05,
        **extra,
    }


def run(executor: ResetExecutor) -> int:
    return asyncio.run(executor.run_once())


def executor_for(
    database: db.Database, database_url: str, **sections: dict[str, Any]
) -> ResetExecutor:
    return ResetExecutor(settings_for(database_url, **sections), database, "test-executor")


def test_webhook_retries_until_success_and_never_calls_again(
    database: db.Database, database_url: str, agents: AgentService, receiver: Receiver
) -> None:
    sections: dict[str, Any] = {"reset": webhook(receiver, max_attempts=5)}
    decisions = service(database, database_url, **sections)
    executor = executor_for(database, database_url, **sections)
    request_id = request(database, database_url)
    decisions.approve(request_id, "alice", "verified")
    receiver.script = [503, 500, "hang"]
    for _ in range(40):
        run(executor)
        if RequestService(database).get(request_id).request.state == RequestState.COMPLETED:
            break
        asyncio.run(asyncio.sleep(0.1))
    wait_for(lambda: len(receiver.calls) == 4)  # the slow answer comes in last
    assert all(call.genuine for call in receiver.calls)
    assert sorted(call.status for call in receiver.calls) == [200, 200, 500, 503]
    # The third call was answered after mailproc had given up waiting: a timeout, retried. The
    # application sees the same Idempotency-Key again and answers that it is done.
    assert {call.headers["Idempotency-Key"] for call in receiver.calls} == {str(request_id)}
    assert len({call.body for call in receiver.calls}) == 1
    payload = receiver.calls[0].payload
    assert payload["request_id"] == request_id
    assert (payload["account_id"], payload["email"]) == ("42", ALICE.email)
    assert payload["approved_by"] == ["alice"]
    detail = RequestService(database).get(request_id)
    assert detail.request.state == RequestState.COMPLETED
    assert detail.execution is not None
    assert (detail.execution.state, detail.execution.attempts) == (ExecutionState.SUCCEEDED, 4)
    attempts = [e for e in detail.events if e.action == "execution_attempt"]
    assert len(attempts) == 4
    assert "HTTP 503" in (attempts[0].reason or "")
    assert "ReadTimeout" in (attempts[2].reason or "")
    assert attempts[3].reason == 'HTTP 200: {"ok": true}'
    assert receiver.successes == {str(request_id): 2}
    assert len(replies(database, "request_completed")) == 1
    # Succeeded: never again, whatever the clock says.
    with database.writing() as session:
        session.execute(update(ResetExecution).values(next_attempt_at=utcnow() - timedelta(days=1)))
    assert run(executor) == 0
    assert len(receiver.calls) == 4


def test_webhook_gives_up_after_max_attempts_and_an_admin_retries(
    database: db.Database, database_url: str, agents: AgentService, receiver: Receiver
) -> None:
    sections: dict[str, Any] = {"reset": webhook(receiver, max_attempts=2)}
    decisions = service(database, database_url, **sections)
    executor = executor_for(database, database_url, **sections)
    request_id = request(database, database_url)
    decisions.approve(request_id, "alice", "verified")
    receiver.then = 502
    for _ in range(20):
        run(executor)
        if RequestService(database).get(request_id).request.state == RequestState.FAILED:
            break
        asyncio.run(asyncio.sleep(0.06))
    detail = RequestService(database).get(request_id)
    assert detail.request.state == RequestState.FAILED
    assert detail.execution is not None
    assert "gave up after 2 attempts: webhook answered HTTP 502" in (
        detail.execution.last_error or ""
    )
    assert [r.id for r in RequestService(database).list(RequestState.FAILED)] == [request_id]
    assert actions(database, request_id)[-1] == ("mailproc", "failed", "failed")
    with pytest.raises(InvalidState, match="not an admin"):
        decisions.retry(request_id, "alice")
    receiver.then = 204
    decisions.retry(request_id, "root")
    run(executor)
    assert RequestService(database).get(request_id).request.state == RequestState.COMPLETED
    assert receiver.successes == {str(request_id): 1}
    assert verify_chain(database).broken_at is None


def test_a_forged_or_stale_signature_is_refused_by_the_readme_verifier(receiver: Receiver) -> None:
    import time

    body = b'{"request_id": 1}'
    now = str(int(time.time()))
    good = {"Mailproc-Timestamp": now, "Mailproc-Signature": signature(SECRET, now, body)}
    assert receiver.verify(SECRET.encode(), good, body)
    assert not receiver.verify(b"another secret", good, body)
    assert not receiver.verify(SECRET.encode(), good, body + b" ")
    old = str(int(time.time()) - 3600)
    stale = {"Mailproc-Timestamp": old, "Mailproc-Signature": signature(SECRET, old, body)}
    assert not receiver.verify(SECRET.encode(), stale, body)
    assert not receiver.verify(SECRET.encode(), {}, body)


@pytest.fixture
def app_db(tmp_path: Path, database_url: str) -> str:
    """The company's accounts database, with the column a reset clears: a SQLite file, or on
    PostgreSQL a table beside mailproc's own (the same server, as often in production)."""
    url = f"sqlite:///{tmp_path / 'app.db'}" if database_url.startswith("sqlite") else database_url
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT, security_question TEXT)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO accounts VALUES (42, 'alice@example.org', 'first pet?'), "
                "(43, 'bob@example.net', 'first car?')"
            )
        )
    engine.dispose()
    return url


def questions(app_db: str) -> dict[int, str | None]:
    engine = create_engine(app_db)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, security_question FROM accounts"))
            return {row.id: row.security_question for row in rows}
    finally:
        engine.dispose()


def test_sql_reset_updates_exactly_one_row_or_fails_with_the_reason(
    database: db.Database, database_url: str, agents: AgentService, app_db: str
) -> None:
    sections: dict[str, Any] = {
        "accounts": {"url": app_db, "query": "SELECT id, email FROM accounts WHERE email = :email"},
        "reset": {
            "method": "sql",
            "sql": "UPDATE accounts SET security_question = NULL WHERE id = :account_id",
        },
    }
    decisions = service(database, database_url, **sections)
    executor = executor_for(database, database_url, **sections)
    try:
        sql_reset(database, database_url, decisions, executor, app_db)
    finally:
        executor.close()


def sql_reset(
    database: db.Database,
    database_url: str,
    decisions: DecisionService,
    executor: ResetExecutor,
    app_db: str,
) -> None:
    ok = request(database, database_url)
    decisions.approve(ok, "alice", "verified")
    assert run(executor) == 1
    assert questions(app_db) == {42: None, 43: "first car?"}
    assert RequestService(database).get(ok).request.state == RequestState.COMPLETED

    gone = request(database, database_url, account=Account("99", "gone@example.org", None, None))
    decisions.approve(gone, "alice", "verified")
    assert run(executor) == 1
    detail = RequestService(database).get(gone)
    assert detail.request.state == RequestState.FAILED  # at once: no use trying again
    assert detail.execution is not None
    assert detail.execution.attempts == 1
    assert "affected 0 rows for account 99, not exactly one; rolled back" in (
        detail.execution.last_error or ""
    )
    assert questions(app_db) == {42: None, 43: "first car?"}


def test_a_claim_held_by_a_dead_instance_is_taken_over_after_its_lease(
    database: db.Database, database_url: str, agents: AgentService, receiver: Receiver
) -> None:
    sections: dict[str, Any] = {"reset": webhook(receiver)}
    service(database, database_url, **sections).approve(
        request(database, database_url), "alice", "verified"
    )
    dead = executor_for(database, database_url, **sections)
    [job] = dead.claim_due()
    live = executor_for(database, database_url, **sections)
    live.worker_id = "live"
    assert live.claim_due() == []  # held
    with database.writing() as session:
        session.execute(update(ResetExecution).values(lease_expires_at=utcnow() - timedelta(1)))
    assert run(live) == 1
    assert receiver.successes == {str(job.request_id): 1}
    # The dead instance's late outcome finds its claim gone and changes nothing.
    assert dead.record(job, "HTTP 200") is None
    with database.reading() as session:
        execution = session.scalars(select(ResetExecution)).one()
        assert (execution.state, execution.attempts) == (ExecutionState.SUCCEEDED, 2)
        assert session.scalars(select(ResetRequest.state)).one() == RequestState.COMPLETED


def test_pending_requests_past_their_expiry_expire_with_the_owners_reply(
    database: db.Database, database_url: str, agents: AgentService
) -> None:
    decisions = service(database, database_url)
    stale = request(database, database_url, expire_after=timedelta(seconds=-1))
    fresh = request(database, database_url, account=Account("43", "bob@example.net", None, None))
    approved = request(
        database, database_url, account=Account("44", "carol@example.org", None, None)
    )
    decisions.approve(approved, "alice", "verified")  # approved, waiting to be done by hand
    with database.writing() as session:
        session.execute(
            update(ResetRequest)
            .where(ResetRequest.id == approved)
            .values(expires_at=utcnow() - timedelta(days=1))
        )
    assert decisions.expire_due() == 1
    assert decisions.expire_due() == 0
    # The clock moves on past the others' expiry: the pending one expires, the approved not.
    assert decisions.expire_due(now=utcnow() + timedelta(days=8)) == 1
    assert RequestService(database).get(fresh).request.state == RequestState.EXPIRED
    states = {r.id: r.state for r in RequestService(database).list()}
    assert states[approved] == RequestState.APPROVED
    assert actions(database, stale)[-1] == ("mailproc", "expired", "expired")
    assert sorted(r.recipient for r in replies(database, "request_expired")) == [
        ALICE.email,
        "bob@example.net",
    ]
    with pytest.raises(InvalidState, match="is expired by mailproc"):
        decisions.approve(stale, "alice", "verified")


def test_staff_get_a_digest_of_requests_waiting_too_long(
    database: db.Database, database_url: str, agents: AgentService
) -> None:
    staff = {"queue": {"staff_addresses": ["team@example.com"], "remind_after_hours": 24}}
    decisions = service(database, database_url, **staff)
    assert service(database, database_url).remind_staff() == 0  # no staff addresses: nothing
    old = request(database, database_url, flags=["first_contact"])
    young = request(database, database_url, account=Account("43", "bob@example.net", None, None))
    with database.writing() as session:
        session.execute(
            update(ResetRequest)
            .where(ResetRequest.id == old)
            .values(created_at=utcnow() - timedelta(hours=30))
        )
    now = utcnow()
    assert decisions.remind_staff(now) == 1
    [digest] = replies(database, "staff_reminder")
    assert digest.recipient == "team@example.com"
    text = text_of(digest)
    detail = RequestService(database).get(old).request
    assert detail.reference in text
    assert f"/requests/{old}" in text
    assert "first_contact" in text
    assert RequestService(database).get(young).request.reference not in text
    assert decisions.remind_staff(now + timedelta(hours=1)) == 0  # once every remind_every_hours
    assert decisions.remind_staff(now + timedelta(hours=25)) == 1
    decisions.deny(old, "alice", "no")
    decisions.deny(young, "alice", "no")
    assert decisions.remind_staff(now + timedelta(hours=50)) == 0  # nothing waits
