"""Reset requests on both databases: one open request per account, joins, audit events and
risk flags."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, update

from mailproc import db
from mailproc.accounts import Account
from mailproc.models import AuditEvent, RequestState, ResetRequest, utcnow
from mailproc.requests import (
    ChainReport,
    Opened,
    RequestService,
    open_or_join,
    record_sighting,
    risk_flags,
    verify_chain,
)
from mailproc.services import MessageService
from tests.support import settings_for
from tests.test_services import arrival

ALICE = Account("42", "alice@example.org", "Alice", "de")


@pytest.fixture
def database(database_url: str) -> Iterator[db.Database]:
    database = db.Database(database_url)
    db.upgrade(database)
    yield database
    database.dispose()


def messages(database: db.Database, database_url: str, count: int) -> list[int]:
    service = MessageService.from_settings(database, settings_for(database_url))
    return service.store_batch([arrival() for _ in range(count)])


def opened(database: db.Database, message_id: int, account: Account = ALICE) -> Opened:
    now = utcnow()
    with database.writing_connection() as connection:
        flags = risk_flags(connection, account, "strong", now)
        return open_or_join(
            connection,
            account=account,
            message_id=message_id,
            verdict={},
            decision={"rule": "test"},
            strength="strong",
            flags=flags,
            now=now,
            expire_after=timedelta(days=7),
        )


def test_one_open_request_per_account_and_later_ones_join_it(
    database: db.Database, database_url: str
) -> None:
    first, second, third = messages(database, database_url, 3)
    a = opened(database, first)
    b = opened(database, second)
    assert b.joined
    assert not a.joined
    assert a.request_id == b.request_id
    detail = RequestService(database).get(a.request_id)
    assert detail.message_ids == [first, second]
    assert [(e.action, e.to_state) for e in detail.events] == [
        ("created", "pending"),
        ("joined", None),
    ]
    # Once decided, the next request opens a new one.
    with database.writing() as session:
        session.execute(
            update(ResetRequest)
            .where(ResetRequest.id == a.request_id)
            .values(state=RequestState.DENIED)
        )
    c = opened(database, third)
    assert not c.joined
    assert c.request_id != a.request_id
    assert "repeated_requests" not in RequestService(database).list()[0].risk_flags


def test_risk_flags(database: db.Database, database_url: str) -> None:
    now = utcnow()
    changed = Account("7", "carol@example.org", email_changed_at=now - timedelta(days=3))
    ids = messages(database, database_url, 4)
    with database.writing_connection() as connection:
        assert risk_flags(connection, changed, "weak", now) == [
            "weak_authentication",
            "email_changed_recently",
            "first_contact",
        ]
        record_sighting(
            connection,
            address="\u0441\u0430rol@example.org",  # Cyrillic es and a
            resembles=changed.email,
            message_id=ids[0],
            now=now,
        )
        assert "lookalike_seen" in risk_flags(connection, changed, "strong", now)
    for message_id in ids[1:3]:
        request = opened(database, message_id, changed)
        with database.writing() as session:
            session.execute(
                update(ResetRequest)
                .where(ResetRequest.id == request.request_id)
                .values(state=RequestState.EXPIRED)
            )
    with database.writing_connection() as connection:
        flags = risk_flags(connection, changed, "strong", utcnow())
    assert "repeated_requests" in flags
    assert "first_contact" not in flags


def test_audit_chain_verifies_and_finds_a_changed_or_removed_event(
    database: db.Database, database_url: str, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from mailproc.cli import main
    from tests.support import write_config

    first, second, third = messages(database, database_url, 3)
    opened(database, first)
    opened(database, second)
    opened(database, third, Account("7", "carol@example.org"))
    config = write_config(tmp_path / "mailproc.toml", database_url)

    def cli(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, ["--config", str(config), *args])
        return result.exit_code, result.output

    assert verify_chain(database) == ChainReport(3, None, None)
    assert cli("audit", "verify") == (0, "audit log intact (3 events)\n")
    code, shown = cli("audit", "show", "--request", "1", "--json")
    assert [e["action"] for e in json.loads(shown)] == ["created", "joined"]

    with database.engine.begin() as connection:
        connection.execute(
            update(AuditEvent).where(AuditEvent.id == 2).values(reason="nothing to see here")
        )
    report = verify_chain(database)
    assert (report.events, report.broken_at) == (1, 2)
    code, output = cli("audit", "verify")
    assert code == 1
    assert output == (
        "Error: audit log broken at event 2: its content was changed after it was written "
        "(1 events before it are intact)\n"
    )

    with database.engine.begin() as connection:
        connection.execute(
            update(AuditEvent)
            .where(AuditEvent.id == 2)
            .values(reason="another verified request for the same account")
        )
    assert verify_chain(database).broken_at is None
    with database.engine.begin() as connection:
        connection.execute(delete(AuditEvent).where(AuditEvent.id == 2))
    report = verify_chain(database)
    assert report.broken_at == 3
    assert report.problem is not None
    assert "removed or inserted" in report.problem
