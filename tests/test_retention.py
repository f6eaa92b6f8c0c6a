"""Retention on both databases: raw messages past their age become their header block, with
everything decided about them kept; a controllable clock says when; the CLI shows what goes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from mailproc import db
from mailproc.cli import main
from mailproc.models import AuditEvent, Message, MessageState, utcnow
from mailproc.requests import verify_chain
from mailproc.retention import Retention, header_block
from mailproc.services import MessageService
from tests.support import settings_for, write_config
from tests.test_services import arrival


@pytest.fixture
def database(database_url: str) -> Iterator[db.Database]:
    database = db.Database(database_url)
    db.upgrade(database)
    yield database
    database.dispose()


def stored(database: db.Database, database_url: str, days_old: float, state: MessageState) -> int:
    service = MessageService.from_settings(database, settings_for(database_url))
    [message_id] = service.store_batch([arrival()])
    with database.writing() as session:
        session.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(
                received_at=utcnow() - timedelta(days=days_old),
                state=state,
                verdict={"strength": "strong"},
            )
        )
    return message_id


def message(database: db.Database, message_id: int) -> Message:
    with database.reading() as session:
        found = session.get(Message, message_id)
        assert found is not None
        return found


def test_old_processed_messages_keep_only_their_headers(
    database: db.Database, database_url: str
) -> None:
    old = stored(database, database_url, 31, MessageState.PROCESSED)
    old_failed = stored(database, database_url, 40, MessageState.FAILED)
    young = stored(database, database_url, 29, MessageState.PROCESSED)
    waiting = stored(database, database_url, 60, MessageState.DEFERRED)  # still to be read
    raw = message(database, old).raw
    retention = Retention(database, 30)

    preview = retention.purge(dry_run=True)
    assert preview.messages == 2
    assert preview.bytes_before == len(raw) + len(message(database, old_failed).raw)
    assert message(database, old).raw == raw  # a dry run changes nothing

    report = retention.purge()
    assert report.messages == 2
    assert report.bytes_after < report.bytes_before
    purged = message(database, old)
    assert purged.raw == header_block(raw)
    assert purged.raw.endswith(b"\r\n\r\n")
    assert b"Subject:" in purged.raw
    assert raw.split(b"\r\n\r\n", 1)[1] not in purged.raw  # the body is gone
    assert purged.raw_purged_at is not None
    assert (purged.size, purged.verdict) == (len(raw), {"strength": "strong"})
    for kept in (young, waiting):
        assert message(database, kept).raw_purged_at is None
    assert retention.purge().messages == 0  # once only
    assert verify_chain(database).broken_at is None

    # The clock moves on: the young one's turn comes.
    later = retention.purge(now=utcnow() + timedelta(days=2))
    assert later.messages == 1
    assert message(database, young).raw_purged_at is not None
    assert Retention(database, 0).purge().messages == 0  # 0 keeps everything


def test_a_large_purge_goes_in_batches_each_message_once(
    database: db.Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches by count and by bytes, each from where the last one ended, with the write lock
    given up between them: every message due is purged once, one audit event a batch."""
    ids = [stored(database, database_url, 31, MessageState.PROCESSED) for _ in range(7)]
    young = stored(database, database_url, 1, MessageState.PROCESSED)
    size = message(database, ids[0]).size
    monkeypatch.setattr("mailproc.retention.BATCH_BYTES", size * 2)  # two messages a batch
    writes: list[int] = []
    original = database.writing

    def counted() -> Any:
        writes.append(1)
        return original()

    monkeypatch.setattr(database, "writing", counted)
    report = Retention(database, 30).purge(batch=3)
    assert report.messages == 7
    assert len(writes) == 4  # 2 + 2 + 2 + 1: each batch its own transaction
    assert all(message(database, i).raw_purged_at is not None for i in ids)
    assert message(database, young).raw_purged_at is None
    with database.reading() as session:
        events = session.scalars(
            select(AuditEvent.reason).where(AuditEvent.action == "raw_messages_purged")
        ).all()
    assert [e.split(" ", 1)[0] for e in events] == ["2", "2", "2", "1"]
    assert verify_chain(database).broken_at is None


def test_purge_command(database: db.Database, database_url: str, tmp_path: Path) -> None:
    stored(database, database_url, 45, MessageState.PROCESSED)
    config = write_config(
        tmp_path / "mailproc.toml", database_url, retention={"raw_message_days": 30}
    )
    runner = CliRunner()
    dry = runner.invoke(main, ["--config", str(config), "purge", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.output.startswith("would replace the raw bytes of 1 messages received before ")
    done = runner.invoke(main, ["--config", str(config), "purge", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["messages"] == 1
    again = runner.invoke(main, ["--config", str(config), "purge", "--dry-run", "--json"])
    assert json.loads(again.output)["messages"] == 0


def test_header_block() -> None:
    assert header_block(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == b"A: 1\r\nB: 2\r\n\r\n"
    assert header_block(b"A: 1\n\nbody\n") == b"A: 1\n\n"
    assert header_block(b"A: 1\r\n") == b"A: 1\r\n"
