"""Outages of what mailproc depends on, while mail arrives: DNS stops answering, the relay and
the company's webhook fail, the database goes away. Mail is stored (or refused with a 451,
never a 5xx and never a 250 that was not kept), nothing is decided on the outage, and once
things recover every message is decided once and every reply and reset delivered once."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import socket
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from mailproc.agents import AgentService
from mailproc.db import Database
from mailproc.decisions import DecisionService
from mailproc.models import (
    AuditEvent,
    Message,
    MessageState,
    OutboxEntry,
    OutboxState,
    RequestMessage,
    RequestState,
    ResetRequest,
)
from mailproc.requests import RequestService
from tests import test_instances, test_pipeline, test_reset_flow
from tests.conftest import PostgresCluster, create_pg_database, drop_pg_database, free_port
from tests.dkimkeys import DkimKey
from tests.dnsserver import ZoneServer
from tests.reliability.counts import Counts
from tests.reliability.test_crash import (
    Load,
    Outcome,
    fast_sections,
    outcome,
    settled,
    tally,
)
from tests.support import AppThread, wait_for
from tests.test_instances import Mail, header_message_id
from tests.test_instances import mails as reply_mails
from tests.test_outbox import Relay
from tests.test_pipeline import ALICE
from tests.test_reset_flow import SECRET
from tests.webhook import Receiver

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

accounts_url = test_pipeline.accounts_url
key = test_pipeline.key
relay = test_pipeline.relay
bob_key = test_instances.bob_key
receiver = test_reset_flow.receiver


def rows(database: Database) -> list[Message]:
    with database.reading() as session:
        return list(session.scalars(select(Message).order_by(Message.id)))


def count(database: Database, *where: Any, of: Any = Message.id) -> int:
    with database.reading() as session:
        return int(session.scalar(select(func.count(of)).where(*where)) or 0)


def half_written(database: Database) -> list[str]:
    """Rows a failed or cut-off write may have left incomplete: a message whose stored bytes
    are not the ones it describes, or a row pointing at a message that is not there."""
    problems = []
    with database.reading() as session:
        for row in session.scalars(select(Message)):
            if not row.raw or row.size != len(row.raw):
                problems.append(f"message {row.id}: {len(row.raw or b'')} of {row.size} bytes")
            elif row.sha256 != hashlib.sha256(row.raw).hexdigest():
                problems.append(f"message {row.id}: bytes do not match their digest")
        ids = set(session.scalars(select(Message.id)))
        pointers = [
            ("outbox", select(OutboxEntry.source_message_id)),
            ("audit", select(AuditEvent.message_id)),
            ("request", select(ResetRequest.message_id)),
            ("request link", select(RequestMessage.message_id)),
        ]
        for what, query in pointers:
            for message_id in session.scalars(query):
                if message_id is not None and message_id not in ids:
                    problems.append(f"{what} row points at missing message {message_id}")
    return problems


def finish(load: Load, threads: list[threading.Thread]) -> None:
    load.allow(len(load.mails))
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()
    assert not load.errors, load.errors


def report_tally(
    report: Callable[..., Counts],
    mails: list[Mail],
    load: Load,
    result: Outcome,
    replies_per_mail: Callable[[Mail], int] = lambda _: 1,
    **extra: int,
) -> tuple[list[str], list[str]]:
    counted = tally(mails, load.acked, result, replies_per_mail=replies_per_mail)
    report(
        sent=len(mails),
        accepted=counted.accepted,
        decided=counted.decided,
        lost=len(counted.lost),
        duplicated=len(counted.duplicated),
        rows=len(result.rows),
        replies=len(result.received),
        **extra,
    )
    assert result.chain_broken_at is None
    assert counted.accepted == len(mails)
    assert counted.decided == len(result.rows)
    return counted.lost, counted.duplicated


# -- DNS --------------------------------------------------------------------------------------


def test_dns_outage_defers_every_message_and_decides_each_once_dns_returns(
    database_url: str,
    accounts_url: str,
    key: DkimKey,
    bob_key: DkimKey,
    relay: Relay,
    zone: ZoneServer,
    report: Callable[..., Counts],
) -> None:
    mails = reply_mails(key, bob_key, 4, "dns")
    settings = fast_sections(
        accounts_url,
        relay,
        dns={"timeout_seconds": 0.1},
        # Deferred mail is looked at again after about a second, not a minute.
        auth={"retry_max_minutes": 0.02},
    )
    with AppThread.running(database_url, **settings) as app:
        database = app.app.database
        zone.set_down(True)
        try:
            load = Load(app.port, mails)
            finish(load, load.start(2))
            # Every message stored at once; each evaluated at least twice on the outage, and
            # never decided: no verdict, no request, no reply, no decision in the audit log.
            assert len(load.acked) == len(mails)
            assert not load.refused
            assert not load.cut_off
            wait_for(
                lambda: count(database, Message.deferrals >= 2) == len(mails),
                timeout=40,
                interval=0.1,
            )
            during = rows(database)
            decided_during = count(
                database, AuditEvent.action == "message_decided", of=AuditEvent.id
            )
            requests_during = count(database, of=ResetRequest.id)
            replies_during = count(database, of=OutboxEntry.id)
        finally:
            zone.set_down(False)
        wait_for(settled(database, len(mails)), timeout=40, interval=0.2)
        time.sleep(0.5)  # and nothing more reaches the relay
        result = outcome(database, relay)
        [request] = RequestService(database).list()

    waiting = {MessageState.DEFERRED, MessageState.PROCESSING}  # the latter: tried again
    assert {row.state for row in during} <= waiting
    for row in during:
        assert row.decision is None
        assert not row.authenticated
        assert row.processed_at is None
        assert row.verdict is not None
        assert row.verdict["temporary_errors"], row.verdict
    assert (decided_during, requests_during, replies_during) == (0, 0, 0)

    # Afterwards, decided as if there had been no outage: all strongly authenticated, Alice's
    # request queued, each message answered with the reply its kind calls for.
    lost, duplicated = report_tally(
        report,
        mails,
        load,
        result,
        deferred_on_outage=len(during),
        decided_on_outage=decided_during,
        min_deferrals=min(row.deferrals for row in result.rows),
    )
    assert lost == []
    assert duplicated == []
    assert {row.auth_strength for row in result.rows} == {"strong"}
    assert all(row.deferrals >= 2 for row in result.rows)
    assert (request.state, request.email, request.account_id) == (RequestState.PENDING, ALICE, "42")
    expected = {mail.message_id: mail for mail in mails}
    by_id = {row.id: row for row in result.rows}
    for entry in result.outbox:
        assert entry.source_message_id is not None
        mail = expected[header_message_id(by_id[entry.source_message_id].raw)]
        assert (entry.template, entry.recipient) == (mail.template, mail.sender)


# -- relay and webhook ------------------------------------------------------------------------


def test_relay_and_webhook_outages_are_retried_and_each_delivered_once(
    database_url: str,
    accounts_url: str,
    key: DkimKey,
    bob_key: DkimKey,
    relay: Relay,
    receiver: Receiver,
    report: Callable[..., Counts],
) -> None:
    mails = reply_mails(key, bob_key, 8, "relay")
    settings = fast_sections(
        accounts_url,
        relay,
        reset={
            "method": "webhook",
            "webhook_url": receiver.url,
            "webhook_secret": SECRET,
            "poll_interval_seconds": 0.2,
            "retry_base_seconds": 0.2,
            "retry_max_seconds": 0.5,
            "max_attempts": 100,
            "timeout_seconds": 1.0,
            "lease_seconds": 4.0,
        },
        approval={"four_eyes_for_flagged": False},
    )
    relay.stop()  # down: connections refused
    receiver.then = 503  # the application fails
    with AppThread.running(database_url, **settings) as app:
        database = app.app.database
        load = Load(app.port, mails)
        finish(load, load.start(2))

        def replies_retried(times: int, error: str) -> bool:
            with database.reading() as session:
                entries = list(session.scalars(select(OutboxEntry)))
            return len(entries) == len(mails) and all(
                e.state == OutboxState.PENDING
                and e.attempts >= times
                and error in (e.last_error or "")
                for e in entries
            )

        # The relay is down, then up but refusing with a 4xx: every reply waits and is tried
        # again, none is given up.
        wait_for(lambda: replies_retried(2, "relay"), timeout=30, interval=0.1)
        relay.answer = "451 4.3.0 try later"
        relay.start()
        wait_for(lambda: replies_retried(3, "451"), timeout=30, interval=0.1)

        # Alice's request approved while the application answers 503: tried again and again.
        [request] = RequestService(database).list()
        AgentService(database).add("alice", test_reset_flow.PASSWORD)
        DecisionService(app.app.settings, database).approve(
            request.id, "alice", "called back on the recovery phone"
        )
        wait_for(lambda: len(receiver.calls) >= 3, timeout=30, interval=0.1)
        state_on_outage = RequestService(database).get(request.id).request.state

        # Everything recovers: each reply and the reset delivered once.
        relay.answer = None
        receiver.then = 200
        wait_for(
            lambda: (
                RequestService(database).get(request.id).request.state == RequestState.COMPLETED
            ),
            timeout=30,
            interval=0.1,
        )
        wait_for(settled(database, len(mails)), timeout=30, interval=0.2)
        time.sleep(1.0)  # and no second call, no second reply comes
        result = outcome(database, relay)
        execution = RequestService(database).get(request.id).execution

    def replies(mail: Mail) -> int:
        return 2 if mail.sender == ALICE else 1  # Alice: acknowledged, then told it is done

    failed_calls = [call for call in receiver.calls if call.status >= 300]
    lost, duplicated = report_tally(
        report,
        mails,
        load,
        result,
        replies_per_mail=replies,
        webhook_calls=len(receiver.calls),
        webhook_failed=len(failed_calls),
        webhook_resets=sum(receiver.successes.values()),
        min_reply_attempts=min(
            e.attempts for e in result.outbox if e.template != "request_completed"
        ),
    )
    assert lost == []
    assert duplicated == []
    assert state_on_outage == RequestState.APPROVED
    assert receiver.successes == {str(request.id): 1}
    assert [call.status for call in receiver.calls] == [503] * len(failed_calls) + [200]
    assert all(call.genuine for call in receiver.calls)
    assert len({call.body for call in receiver.calls}) == 1  # the same reset each time
    assert execution is not None
    assert execution.attempts == len(receiver.calls)
    assert {entry.state for entry in result.outbox} == {OutboxState.SENT}
    assert len(result.received) == len(mails) + 1


# -- the database -----------------------------------------------------------------------------


class Proxy:
    """A TCP proxy on loopback between mailproc and PostgreSQL that can be cut (every open
    connection closed, new ones refused) and restored on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._pumps: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.connections = 0

    def start(self) -> Proxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                self._open |= {client, server}
                for source, sink in ((client, server), (server, client)):
                    pump = threading.Thread(target=self._pump, args=(source, sink), daemon=True)
                    self._pumps.append(pump)
                    pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and break every open one, as a database that went away."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join(5)
        with self._lock:
            sockets, self._open = self._open, set()
            pumps, self._pumps = self._pumps, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for pump in pumps:
            pump.join(5)
        for sock in sockets:
            sock.close()

    def restore(self) -> None:
        self.start()

    def stop(self) -> None:
        self.cut()


@pytest.fixture
def pg_behind_proxy(postgres: PostgresCluster) -> Iterator[tuple[str, Proxy]]:
    """A fresh database on the throwaway cluster, and its URL through a proxy."""
    name = create_pg_database(postgres)
    proxy = Proxy(postgres.port).start()
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/{name}", proxy
    finally:
        proxy.stop()
        gc.collect()  # as the database_url fixture does: connections left behind warn here
        drop_pg_database(postgres, name)


@pytest.mark.postgres
def test_postgres_cut_off_answers_451_and_the_same_mail_is_taken_once_it_is_back(
    pg_behind_proxy: tuple[str, Proxy],
    accounts_url: str,
    key: DkimKey,
    bob_key: DkimKey,
    relay: Relay,
    report: Callable[..., Counts],
) -> None:
    url, proxy = pg_behind_proxy
    mails = reply_mails(key, bob_key, 12, "pgcut")
    with AppThread.running(url, **fast_sections(accounts_url, relay)) as app:
        database = Database(url)
        load = Load(app.port, mails, pace=0.05)
        try:
            threads = load.start(1)
            load.allow(4)
            wait_for(lambda: len(load.acked) >= 4, timeout=30, interval=0.01)
            # Cut while the client goes on sending: it is told 451 and tries again.
            load.allow(8)
            time.sleep(0.05)
            proxy.cut()
            cut_at = time.monotonic()
            wait_for(lambda: load.refused[451] >= 4, timeout=30, interval=0.05)
            restored_at = time.monotonic()
            proxy.restore()
            finish(load, threads)
            wait_for(settled(database, len(mails)), timeout=40, interval=0.2)
            time.sleep(0.5)  # and nothing more reaches the relay
            result = outcome(database, relay)
            problems = half_written(database)
        finally:
            load.stop()
            database.dispose()

    on_outage = [a for a in load.attempts if cut_at < a.began and a.ended < restored_at]
    lost, duplicated = report_tally(
        report,
        mails,
        load,
        result,
        answered_451=load.refused[451],
        accepted_on_outage=sum(1 for a in on_outage if a.code == 250),
        extra_rows=len(result.rows) - len(mails),
        half_written=len(problems),
    )
    assert lost == []
    assert duplicated == []
    assert problems == []
    # Only 451 while the database was away: never a 250, never a 5xx, never a broken session.
    assert set(load.refused) == {451}
    assert on_outage
    assert {a.code for a in on_outage} == {451}
    assert load.cut_off == 0
    # A commit cut off on its way may have landed without its 250: that message, sent again,
    # is stored a second time, and decided as the replay it is (no second reply).
    assert len(result.rows) - len(mails) <= 1


def test_sqlite_lock_held_past_the_busy_timeout_answers_451_then_250(
    sqlite_url: str,
    tmp_path: Path,
    accounts_url: str,
    key: DkimKey,
    bob_key: DkimKey,
    relay: Relay,
    report: Callable[..., Counts],
) -> None:
    """mailproc waits up to its busy timeout (10 s, mailproc/db.py) for SQLite's write lock.
    Held longer, the message in hand is answered 451; a message that waited less is stored
    once the lock is free, and the refused one is taken when its client sends it again."""
    mails = reply_mails(key, bob_key, 2, "lock")
    path = tmp_path / "mailproc.db"
    refused = Load(0, mails[:1], timeout=60)  # sent while the lock is taken: 451, then 250
    waiting = Load(0, mails[1:], timeout=60)  # sent a second later: waits, then 250
    with AppThread.running(sqlite_url, **fast_sections(accounts_url, relay)) as app:
        database = app.app.database
        refused.port = waiting.port = app.port
        holder = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            refused_threads = refused.start(1)
            refused.allow(1)
            time.sleep(1.0)
            waiting_threads = waiting.start(1)
            waiting.allow(1)
            wait_for(lambda: refused.attempts, timeout=30, interval=0.05)
            refused_after = refused.attempts[0].ended - locked_at
        finally:
            holder.rollback()
            holder.close()
        try:
            finish(refused, refused_threads)
            finish(waiting, waiting_threads)
        finally:
            refused.stop()
            waiting.stop()
        wait_for(settled(database, len(mails)), timeout=30, interval=0.2)
        time.sleep(0.5)
        result = outcome(database, relay)
        problems = half_written(database)

    load = Load(0, mails)  # the two clients' 250s together
    load.acked = refused.acked | waiting.acked
    lost, duplicated = report_tally(
        report,
        mails,
        load,
        result,
        answered_451=refused.refused[451],
        seconds_to_451=round(refused_after),
        waited_then_250=len(waiting.acked),
        half_written=len(problems),
    )
    assert lost == []
    assert duplicated == []
    assert problems == []
    assert [a.code for a in refused.attempts] == [451, 250]
    assert 9 < refused_after < 20  # the busy timeout, not at once and not for ever
    assert [a.code for a in waiting.attempts] == [250]
    assert len(result.rows) == len(mails)
    assert Counter(row.state for row in result.rows) == {MessageState.PROCESSED: len(mails)}
