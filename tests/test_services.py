"""Message processing on the real databases: claims, leases, failures and replay."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select

from mailproc import db
from mailproc.intake import Arrival
from mailproc.models import Message, MessageState, utcnow
from mailproc.services import InvalidState, MessageService, NotFound
from tests.dkimkeys import build_message, publish, rsa_key, sign
from tests.dnsserver import ZoneServer
from tests.support import (
    SUPPORT,
    AppThread,
    make_message,
    send,
    settings_for,
    stored_id,
    wait_for,
    wire,
)


@pytest.fixture
def service(database_url: str) -> Iterator[MessageService]:
    database = db.Database(database_url)
    db.upgrade(database)
    settings = settings_for(database_url, worker={"lease_seconds": 60, "max_attempts": 3})
    yield MessageService.from_settings(database, settings)
    database.dispose()


def arrival(raw: bytes | None = None) -> Arrival:
    return Arrival(
        received_at=utcnow(),
        protocol="smtp",
        peer_ip="127.0.0.1",
        peer_port=40000,
        helo="client.example.org",
        client_ip="127.0.0.1",
        client_name=None,
        client_helo="client.example.org",
        client_protocol="ESMTP",
        xforward=None,
        mail_from="alice@example.org",
        rcpt_tos=(SUPPORT,),
        tls=None,
        raw=raw if raw is not None else wire(make_message()),
    )


def test_stored_batch_keeps_order_and_bytes(service: MessageService) -> None:
    raws = [wire(make_message(subject=f"n{i}")) for i in range(5)]
    ids = service.store_batch([arrival(raw) for raw in raws])
    assert ids == sorted(ids)
    stored = [service.get(i) for i in ids]
    assert [m.raw for m in stored] == raws
    assert [m.size for m in stored] == [len(raw) for raw in raws]
    assert all(m.state == MessageState.RECEIVED and m.attempts == 0 for m in stored)


def test_sqlite_fast_insert_stores_what_a_core_insert_stores(service: MessageService) -> None:
    if service.db.dialect != "sqlite":
        pytest.skip("the DBAPI insert path is SQLite's")
    forwarded = arrival(b"Subject: x\r\n\r\nbare\nLF\r\n")
    forwarded = dataclasses.replace(
        forwarded, xforward={"ADDR": "192.0.2.7", "NAME": None}, tls={"version": "TLSv1.3"}
    )
    (fast,) = service.store_batch([forwarded])
    core = MessageService(service.db, service.authenticator)
    core._sqlite_insert = None
    (slow,) = core.store_batch([forwarded])
    with service.db.engine.connect() as connection:
        result = connection.exec_driver_sql(
            "SELECT * FROM message WHERE id IN (?, ?)", (fast, slow)
        )
        columns = list(result.keys())
        rows = {row.id: tuple(row) for row in result}
    differing = [
        (name, a, b)
        for name, a, b in zip(columns, rows[fast], rows[slow], strict=True)
        if a != b and name not in {"id", "received_at", "updated_at", "next_attempt_at"}
    ]
    assert differing == []
    # Columns left out of the INSERT are SQL NULL, not JSON null.
    assert dict(zip(columns, rows[fast], strict=True))["verdict"] is None
    assert dict(zip(columns, rows[fast], strict=True))["parsed"] is None
    assert service.get(fast).xforward == {"ADDR": "192.0.2.7", "NAME": None}
    assert service.get(fast).intake_flags == ["bare_lf"]


def test_claims_go_oldest_first_and_never_twice(service: MessageService) -> None:
    first, second = service.store_batch([arrival(), arrival()])
    a = service.claim_next("worker-a")
    b = service.claim_next("worker-b")
    assert a is not None
    assert b is not None
    assert (a.message_id, b.message_id) == (first, second)
    assert service.claim_next("worker-c") is None


def test_concurrent_workers_never_claim_the_same_message(service: MessageService) -> None:
    service.store_batch([arrival() for _ in range(40)])
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (claim := service.claim_next(name)) is not None:
            with lock:
                claimed.append(claim.message_id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed) == sorted(set(claimed))
    assert len(claimed) == 40


def test_store_now_writes_when_the_lock_is_free_and_nothing_while_it_is_held(
    service: MessageService,
) -> None:
    if service.db.dialect != "sqlite":
        # PostgreSQL has no such path: the listener always commits from its thread.
        assert service.store_batch_now([arrival()]) is None
        assert service.counts() == {}
        return
    [first] = service.store_batch_now([arrival()]) or []
    assert service.get(first).state == MessageState.RECEIVED
    with service.db.writing() as session:  # another writer holds SQLite's write lock
        session.execute(select(Message.id).limit(1))
        started = time.monotonic()
        assert service.store_batch_now([arrival(), arrival()]) is None
        assert time.monotonic() - started < 1.0  # answered at once, not after the busy timeout
    assert service.counts() == {"received": 1}
    [second] = service.store_batch_now([arrival()]) or []
    assert second > first


def test_store_now_that_fails_half_way_writes_nothing_and_stays_usable(
    service: MessageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    if service.db.dialect != "sqlite":
        pytest.skip("the no-wait path is SQLite's")
    insert = service._sqlite_insert
    assert insert is not None

    def fails_after_one_row(cursor: object, rows: list[dict[str, object]]) -> list[int]:
        insert(cursor, rows[:1])
        raise OSError("disk I/O error")

    monkeypatch.setattr(service, "_sqlite_insert", fails_after_one_row)
    with pytest.raises(OSError):
        service.store_batch_now([arrival(), arrival()])
    monkeypatch.undo()
    assert service.counts() == {}
    ids = service.store_batch_now([arrival()])
    assert ids is not None
    assert service.counts() == {"received": 1}


def test_a_batch_claim_takes_the_oldest_waiting_messages_once(service: MessageService) -> None:
    ids = service.store_batch([arrival() for _ in range(7)])
    first = service.claim_batch("a", 5)
    second = service.claim_batch("b", 5)
    assert [c.message_id for c in first] == ids[:5]
    assert [c.message_id for c in second] == ids[5:]
    assert service.claim_batch("c", 5) == []
    states = service.process_batch(first + second)
    assert states == [MessageState.PROCESSED] * 7
    assert service.counts() == {"processed": 7}


def test_a_message_left_by_a_dead_worker_is_retried_alone(service: MessageService) -> None:
    ids = service.store_batch([arrival() for _ in range(4)])
    service.lease = timedelta(milliseconds=1)
    died = service.claim_batch("died", 4)
    assert len(died) == 4
    time.sleep(0.05)
    service.lease = timedelta(seconds=60)
    # One at a time: a message that kills its worker cannot use up its neighbours' attempts.
    for message_id in ids:
        [claim] = service.claim_batch("next", 10)
        assert (claim.message_id, claim.attempts) == (message_id, 2)
        assert service.process(claim) == MessageState.PROCESSED


def test_a_long_batch_writes_results_as_it_goes_and_renews_the_rest(
    service: MessageService,
) -> None:
    ids = service.store_batch([arrival() for _ in range(3)])
    claims = service.claim_batch("w", 3)
    leases: list[list[object]] = []

    def lease_of_rest() -> bool:
        with service.db.reading() as session:
            leases.append(
                [
                    (m.state, m.lease_expires_at)
                    for m in session.scalars(select(Message).where(Message.id.in_(ids)))
                ]
            )
        return False

    # flush_seconds=0: every message's result is written before the next one starts.
    assert (
        service.process_batch(claims, flush_seconds=0, stop=lease_of_rest)
        == [MessageState.PROCESSED] * 3
    )
    # Before the second message: the first is finished, the other two still held, renewed.
    (first, _), (second, renewed), (third, _) = leases[0]
    assert first == MessageState.PROCESSED
    assert second == third == MessageState.PROCESSING
    assert renewed is not None
    assert renewed > utcnow() + timedelta(seconds=50)


def test_stop_in_a_batch_writes_what_is_done_and_gives_back_the_rest(
    service: MessageService,
) -> None:
    ids = service.store_batch([arrival() for _ in range(4)])
    claims = service.claim_batch("w", 4)
    checks = iter([False, True])
    states = service.process_batch(claims, stop=lambda: next(checks))
    assert states == [MessageState.PROCESSED, MessageState.PROCESSED, None, None]
    given_back = [service.get(i) for i in ids[2:]]
    assert [m.state for m in given_back] == [MessageState.RECEIVED] * 2
    assert [m.attempts for m in given_back] == [0, 0]
    assert all(m.claimed_by is None for m in given_back)
    # Taken at once by the next worker, without waiting for a lease to run out.
    assert [c.message_id for c in service.claim_batch("next", 4)] == ids[2:]


def test_expired_lease_is_taken_over_and_the_late_result_dropped(
    service: MessageService,
) -> None:
    [message_id] = service.store_batch([arrival()])
    service.lease = timedelta(milliseconds=1)
    slow = service.claim_next("slow-worker")
    assert slow is not None
    time.sleep(0.05)
    fast = service.claim_next("fast-worker")
    assert fast is not None
    assert fast.message_id == message_id
    assert fast.attempts == 2
    assert service.process(slow) is None  # the claim was lost: its result is not written
    assert service.get(message_id).state == MessageState.PROCESSING
    assert service.process(fast) == MessageState.PROCESSED
    assert service.get(message_id).state == MessageState.PROCESSED


def test_message_whose_processing_keeps_dying_fails_after_max_attempts(
    service: MessageService,
) -> None:
    [message_id] = service.store_batch([arrival()])
    service.lease = timedelta(milliseconds=1)
    for _ in range(3):
        assert service.claim_next("dies") is not None  # and never finishes
        time.sleep(0.01)
    assert service.claim_next("dies") is None
    failed = service.get(message_id)
    assert failed.state == MessageState.FAILED
    assert failed.error is not None
    assert "3 attempts" in failed.error


def test_processing_error_is_recorded_and_retry_replays_it(
    service: MessageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    [message_id] = service.store_batch([arrival()])

    def broken(raw: bytes) -> None:
        raise RuntimeError("parser exploded")

    monkeypatch.setattr("mailproc.services.parse_message", broken)
    assert service.process_next("w") is True
    failed = service.get(message_id)
    assert failed.state == MessageState.FAILED
    assert failed.error == "RuntimeError: parser exploded"
    assert failed.raw  # nothing dropped

    monkeypatch.undo()
    retried = service.retry(message_id)
    assert retried.state == MessageState.RECEIVED
    assert service.process_next("w") is True
    done = service.get(message_id)
    assert done.state == MessageState.PROCESSED
    assert done.error is None


def test_retry_refuses_messages_that_did_not_fail(service: MessageService) -> None:
    [message_id] = service.store_batch([arrival()])
    with pytest.raises(InvalidState, match="only failed messages"):
        service.retry(message_id)
    with pytest.raises(NotFound):
        service.retry(message_id + 1000)


def test_worker_process_processes_what_smtp_stored_and_replays_on_retry(
    database_url: str,
) -> None:
    with AppThread.running(database_url) as app:
        assert app.app.worker.alive == 1
        service = app.app.messages
        message_id = stored_id(send(app.port, make_message()))
        assert wait_for(lambda: service.get(message_id).state == MessageState.PROCESSED)
        # As if processing had failed: retry hands it to the worker process again.
        with service.db.writing() as session:
            stored = session.get(Message, message_id)
            assert stored is not None
            stored.state = MessageState.FAILED
            stored.error = "RuntimeError: simulated"
        service.retry(message_id)
        app.app.worker.wake()
        done = wait_for(
            lambda: (m := service.get(message_id)).state == MessageState.PROCESSED and m
        )
        assert done.error is None


def test_a_worker_process_that_dies_is_restarted(database_url: str) -> None:
    with AppThread.running(database_url) as app:
        workers = app.app.worker
        [process] = workers._processes
        process.kill()
        wait_for(lambda: workers.restarts == 1 and workers.alive == 1, timeout=20)
        message_id = stored_id(send(app.port, make_message()))
        assert wait_for(lambda: app.app.messages.get(message_id).state == MessageState.PROCESSED)


def test_replayed_signature_is_caught_on_every_backend(database_url: str, zone: ZoneServer) -> None:
    key = rsa_key(1024, selector="replay")
    publish(zone, key)
    database = db.Database(database_url)
    db.upgrade(database)
    try:
        service = MessageService.from_settings(database, settings_for(database_url))
        raw = sign(build_message(), key)
        first, second = service.store_batch([arrival(raw), arrival(raw)])
        while service.process_next("w"):
            pass
        original, replay = service.get(first), service.get(second)
        assert original.authenticated is True
        assert original.auth_strength == "strong"
        assert replay.authenticated is False
        assert replay.verdict is not None
        assert f"replay: dkim already seen in message {first}" in replay.verdict["reasons"]
    finally:
        database.dispose()


def test_replay_within_one_batch_is_caught_and_the_older_copy_keeps_the_key(
    database_url: str, zone: ZoneServer
) -> None:
    key = rsa_key(1024, selector="batchreplay")
    publish(zone, key)
    database = db.Database(database_url)
    db.upgrade(database)
    try:
        service = MessageService.from_settings(database, settings_for(database_url))
        raw = sign(build_message(), key)
        first, second, third = service.store_batch([arrival(raw), arrival(raw), arrival(raw)])
        claims = service.claim_batch("w", 10)
        assert len(claims) == 3
        service.process_batch(claims)
        original = service.get(first)
        assert original.authenticated is True
        for copy in (second, third):
            replay = service.get(copy)
            assert replay.authenticated is False
            assert replay.auth_strength == "none"
            assert replay.verdict is not None
            assert f"replay: dkim already seen in message {first}" in replay.verdict["reasons"]
    finally:
        database.dispose()


def test_dns_outage_defers_with_backoff_on_every_backend(
    database_url: str, zone: ZoneServer
) -> None:
    key = rsa_key(1024, selector="outage")
    publish(zone, key)
    zone.set_down(True)
    database = db.Database(database_url)
    db.upgrade(database)
    try:
        service = MessageService.from_settings(database, settings_for(database_url))
        [message_id] = service.store_batch([arrival(sign(build_message(), key))])
        assert service.process_next("w") is True
        deferred = service.get(message_id)
        assert deferred.state == MessageState.DEFERRED
        assert deferred.deferrals == 1
        assert deferred.next_attempt_at is not None
        assert deferred.next_attempt_at > utcnow()
        # Not due yet: nothing to claim.
        assert service.claim_next("w") is None
    finally:
        database.dispose()
