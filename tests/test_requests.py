"""Reset requests on both databases: one open request per account, joins, audit events and
risk flags."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from mailproc import db
from mailproc.accounts import Account
from mailproc.models import RequestState, ResetRequest, utcnow
from mailproc.requests import Opened, RequestService, open_or_join, record_sighting, risk_flags
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
