"""Two real `mailproc serve` instances on one PostgreSQL database: mail goes to both, one is
killed (SIGKILL, with its worker processes) mid-run, and every message is still processed
exactly once and every reply sent exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from mailproc.db import Database
from mailproc.models import AuditEvent, Message, MessageState, OutboxEntry, OutboxState
from mailproc.requests import verify_chain
from tests import test_pipeline
from tests.conftest import PostgresCluster, create_pg_database, drop_pg_database, free_port
from tests.dkimkeys import DkimKey, publish, rsa_key
from tests.dnsserver import ZoneServer
from tests.support import SUPPORT, ServerProcess, stored_id, wait_for, write_config
from tests.test_outbox import Relay
from tests.test_pipeline import ALICE, sections, signed

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

accounts_url = test_pipeline.accounts_url
key = test_pipeline.key

BOB = "bob@example.net"  # registered (account 43), signs with a key of his own domain

MESSAGES = 40
SENDERS = 4


@dataclass(frozen=True)
class Mail:
    """One message to send, and the one reply it must get."""

    message_id: str  # its Message-ID header, which the reply's In-Reply-To names
    sender: str
    raw: bytes
    template: str


def mails(
    key: DkimKey, bob_key: DkimKey, count: int = MESSAGES, tag: str = "instances"
) -> list[Mail]:
    """``count`` signed messages, each of which gets exactly one reply, each to another address
    (so the per-recipient daily limit never suppresses one): Alice's reset request (an
    acknowledgement), a password question from Bob, who is registered too (help), and from
    authenticated strangers password questions (help) and reset requests (use the registered
    address). ``tag`` keeps the Message-IDs and strangers of one test apart."""
    result = []
    for index in range(count):
        message_id = f"<{tag}-{index:03d}-{os.urandom(6).hex()}@example.org>"
        signing = key
        if index == 0:
            sender, template, subject = ALICE, "request_received", "Reset my security question"
        elif index == 1:
            sender, template, subject = BOB, "password_help", "I forgot my password"
            signing = bob_key
        elif index % 2:
            sender = f"{tag}-stranger{index:03d}@example.org"
            template, subject = "password_help", "I forgot my password"
        else:
            sender = f"{tag}-stranger{index:03d}@example.org"
            template, subject = "use_registered_address", "Reset my security question"
        body = "I forgot my password.\n" if template == "password_help" else "Please reset it.\n"
        raw = signed(signing, sender, subject=subject, message_id=message_id, body=body)
        result.append(Mail(message_id, sender, raw, template))
    return result


class SlowRelay(Relay):
    """A relay that takes a moment over each message, so that a sender is caught mid-send."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def relay() -> Iterator[Relay]:
    running = SlowRelay().start()
    yield running
    running.stop()


@pytest.fixture
def bob_key(zone: ZoneServer) -> DkimKey:
    signing = rsa_key(1024, selector="instances", domain="example.net")
    publish(zone, signing)
    return signing


def send_once(port: int, mail: Mail, timeout: float = 10) -> int:
    """One SMTP session; the stored id from our 250, or an exception if there was none."""
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as client:
        client.ehlo("client.example.org")
        client.mail(mail.sender)
        code, reply = client.rcpt(SUPPORT)
        if code != 250:
            raise smtplib.SMTPResponseException(code, reply)
        code, reply = client.data(mail.raw)
        if code != 250:
            raise smtplib.SMTPResponseException(code, reply)
        return stored_id(reply.decode())


def descendants(pid: int) -> list[int]:
    """The process ids below ``pid`` (its worker processes and their helpers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_instance(server: ServerProcess) -> None:
    """SIGKILL the serving process and every process it started, as a crash of the machine
    would: nothing gets to finish, give back or record anything."""
    if server.process is None or server.process.poll() is not None:
        return
    below = descendants(server.process.pid)
    server.signal(signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.wait(10)


@dataclass
class Traffic:
    """Mail sent from a few client threads, alternating between the two instances, at a pace
    that keeps it flowing while the workers process it; slower from half the mail until A is
    killed, so that there is mail left to send when that happens. A message that did not get a
    250 is sent again, to B, as a sending MTA would."""

    a: ServerProcess
    b: ServerProcess
    mails: list[Mail]
    acked: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    unacked: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    half: threading.Event = field(default_factory=threading.Event)
    killed: threading.Event = field(default_factory=threading.Event)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self) -> int:
        with self._lock:
            return sum(len(acks) for acks in self.acked.values())

    def take(self) -> tuple[int, Mail] | None:
        with self._lock:
            if self._next >= len(self.mails):
                return None
            index = self._next
            self._next += 1
            return index, self.mails[index]

    def run(self) -> None:
        while (taken := self.take()) is not None:
            index, mail = taken
            targets = [("A", self.a), ("B", self.b)] if index % 2 == 0 else [("B", self.b)]
            for attempt in range(5):
                name, server = targets[min(attempt, len(targets) - 1)]
                try:
                    stored = send_once(server.port, mail)
                except (OSError, smtplib.SMTPException) as exc:
                    with self._lock:
                        self.unacked.append((name, f"{mail.message_id}: {exc!r}"))
                    time.sleep(0.05)
                    continue
                with self._lock:
                    self.acked.setdefault(mail.message_id, []).append((name, stored))
                    if sum(len(v) for v in self.acked.values()) >= MESSAGES // 2:
                        self.half.set()
                break
            else:
                with self._lock:
                    self.errors.append(f"{mail.message_id} never got a 250")
            time.sleep(0.6 if self.half.is_set() and not self.killed.is_set() else 0.05)


def worker_ids(server: ServerProcess, count: int) -> list[str]:
    """The ids of the instance's worker processes, once they have all started."""

    def started() -> list[str]:
        ids = re.findall(r"worker (\S+) started", server.log())
        return ids if len(ids) >= count else []

    found: list[str] = wait_for(started, timeout=20, interval=0.05)
    return found


@pytest.fixture
def pg_url(postgres: PostgresCluster) -> Iterator[str]:
    name = create_pg_database(postgres)
    try:
        yield postgres.url(name)
    finally:
        gc.collect()
        drop_pg_database(postgres, name)


def instance(tmp_path: Path, name: str, url: str, accounts_url: str, relay: Relay) -> ServerProcess:
    port = free_port()
    settings: dict[str, Any] = sections(accounts_url, relay)
    # Short leases, so that what the killed instance held is taken over in seconds.
    settings["outbound"] |= {
        "timeout_seconds": 1.0,
        "lease_seconds": 4.0,
        "retry_max_seconds": 1.0,
    }
    settings["worker"] = {
        "processes": 2,
        "lease_seconds": 3.0,
        "poll_interval_seconds": 0.2,
        "batch_size": 5,
    }
    config = write_config(tmp_path / f"{name}.toml", url, port=port, **settings)
    return ServerProcess(config, port, log_path=tmp_path / f"{name}.log")


def in_reply_to(raw: bytes) -> str | None:
    value = BytesHeaderParser(policy=compat32).parsebytes(raw).get("In-Reply-To")
    return None if value is None else str(value).strip()


def header_message_id(raw: bytes) -> str:
    return str(BytesHeaderParser(policy=compat32).parsebytes(raw)["Message-ID"]).strip()


def test_two_instances_one_killed_process_every_message_and_send_every_reply_once(
    tmp_path: Path,
    pg_url: str,
    accounts_url: str,
    key: DkimKey,
    bob_key: DkimKey,
    relay: Relay,
) -> None:
    a = instance(tmp_path, "a", pg_url, accounts_url, relay)
    b = instance(tmp_path, "b", pg_url, accounts_url, relay)
    database = Database(pg_url)
    started = time.monotonic()
    try:
        # One after the other: A migrates the new database, B finds it migrated (two
        # instances migrating one database at the same moment collide).
        a.start()
        b.start()
        assert a.process is not None
        a_workers = worker_ids(a, 2)
        worker_ids(b, 2)
        traffic = Traffic(a, b, mails(key, bob_key))
        threads = [threading.Thread(target=traffic.run, daemon=True) for _ in range(SENDERS)]
        for thread in threads:
            thread.start()

        # Once half the mail is in, kill A at a moment its workers hold claimed messages and
        # its sender replies it has claimed (or, failing that, claimed messages only, or after
        # 2.5 s whatever it holds), while the other sessions are still under way.
        a_sender = f":{a.process.pid}:"  # the sender's id: host:pid:random, pid of serve

        def held_by_a() -> tuple[bool, bool]:
            with database.reading() as session:
                messages = session.scalar(
                    select(func.count()).where(
                        Message.state == MessageState.PROCESSING,
                        Message.claimed_by.in_(a_workers),
                    )
                )
                replies = session.scalar(
                    select(func.count()).where(
                        OutboxEntry.state == OutboxState.SENDING,
                        OutboxEntry.claimed_by.contains(a_sender),
                    )
                )
            return bool(messages), bool(replies)

        assert traffic.half.wait(30), traffic.unacked
        half_at = time.monotonic()
        while time.monotonic() - half_at < 2.5:
            messages, replies = held_by_a()
            if messages and (replies or time.monotonic() - half_at > 1.5):
                break
            time.sleep(0.005)
        kill_instance(a)
        traffic.killed.set()
        assert a.process.poll() == -signal.SIGKILL
        acked_at_kill = traffic.count()
        waited = time.monotonic() - half_at
        time.sleep(0.3)  # a commit already on its way to the server lands

        # What the dead instance left behind, for B to take over when the leases run out.
        with database.reading() as session:
            at_kill = Counter(session.scalars(select(Message.state)))
            abandoned = dict(
                session.execute(
                    select(Message.id, Message.attempts).where(
                        Message.state == MessageState.PROCESSING,
                        Message.claimed_by.in_(a_workers),
                    )
                ).all()
            )
            in_flight = dict(
                session.execute(
                    select(OutboxEntry.message_id_header, OutboxEntry.id).where(
                        OutboxEntry.state == OutboxState.SENDING,
                        OutboxEntry.claimed_by.contains(a_sender),
                    )
                ).all()
            )
        for thread in threads:
            thread.join(30)
            assert not thread.is_alive()
        assert not traffic.errors, traffic.errors
        # Informative (shown with -s, or on failure): where the kill found the work.
        print(
            f"killed A {waited:.2f}s after half the mail, {acked_at_kill} of {MESSAGES} 250s; "
            "messages then: "
            f"{ {str(k): v for k, v in at_kill.items()} }, held by A's workers: {abandoned}, "
            f"replies A was sending: {len(in_flight)}; sessions without a 250: {traffic.unacked}"
        )

        def settled() -> bool:
            with database.reading() as session:
                states = Counter(session.scalars(select(Message.state)))
                outbox = Counter(session.scalars(select(OutboxEntry.state)))
            waiting = {MessageState.RECEIVED, MessageState.PROCESSING, MessageState.DEFERRED}
            return (
                sum(states.values()) >= MESSAGES
                and not waiting & set(states)
                and not {OutboxState.PENDING, OutboxState.SENDING} & set(outbox)
            )

        try:
            wait_for(settled, timeout=40, interval=0.2)
        except AssertionError:
            logs = f"A:\n{a.log()[-4000:]}\nB:\n{b.log()[-4000:]}"
            raise AssertionError(f"messages or replies still waiting:\n{logs}") from None
        time.sleep(1.0)  # and nothing more arrives at the relay
        b.signal(signal.SIGTERM)
        assert b.wait() == 0, b.log()[-4000:]

        with database.reading() as session:
            rows = list(session.scalars(select(Message).order_by(Message.id)))
            outbox = list(session.scalars(select(OutboxEntry).order_by(OutboxEntry.id)))
            decided = Counter(
                session.scalars(
                    select(AuditEvent.message_id).where(AuditEvent.action == "message_decided")
                )
            )
        chain = verify_chain(database)
    finally:
        kill_instance(a)
        kill_instance(b)
        database.dispose()
    elapsed = time.monotonic() - started

    expected = {mail.message_id: mail for mail in traffic.mails}
    by_id = {row.id: row for row in rows}
    # Every message got a 250 (from A before the kill, or from B); every 250 named its own row.
    assert set(traffic.acked) == set(expected)
    acked_ids = [stored for acks in traffic.acked.values() for _, stored in acks]
    assert len(acked_ids) == len(set(acked_ids)) == MESSAGES
    for message_id, acks in traffic.acked.items():
        for _, stored in acks:
            assert header_message_id(by_id[stored].raw) == message_id
    assert {name for acks in traffic.acked.values() for name, _ in acks} == {"A", "B"}
    # A row beyond those is a message A stored just as it died, before its 250 was out: its
    # client sent it again to B. Only such a message may have a second row.
    copies = Counter(header_message_id(row.raw) for row in rows)
    assert set(copies) == set(expected)
    assert all(count <= 2 for count in copies.values()), copies
    assert sum(copies.values()) - MESSAGES <= SENDERS

    # Every row processed, none failed, stuck or deferred, each decided exactly once.
    assert Counter(row.state for row in rows) == {MessageState.PROCESSED: len(rows)}, [
        (row.id, row.state, row.error) for row in rows if row.state != MessageState.PROCESSED
    ]
    assert decided == dict.fromkeys((row.id for row in rows), 1)
    # Mail was still coming in when A died, and what A's workers held then was taken over.
    assert MESSAGES // 2 <= acked_at_kill < MESSAGES
    for message, attempts in abandoned.items():
        assert by_id[message].attempts > attempts

    # The outbox: one reply per message (per Message-ID, a second copy being a replay), of
    # the template its kind calls for, each sent once and never duplicated.
    assert [entry.state for entry in outbox] == [OutboxState.SENT] * len(outbox), [
        (entry.id, entry.state, entry.last_error) for entry in outbox
    ]
    answered = Counter(header_message_id(by_id[e.source_message_id].raw) for e in outbox)
    assert answered == dict.fromkeys(expected, 1)
    for entry in outbox:
        mail = expected[header_message_id(by_id[entry.source_message_id].raw)]
        assert (entry.template, entry.recipient) == (mail.template, mail.sender)
    assert len({entry.message_id_header for entry in outbox}) == len(outbox)
    assert all(entry.attempts >= 2 for entry in outbox if entry.message_id_header in in_flight)

    # At the relay: exactly one reply per message, threaded to it. Only a crash between the
    # relay's 250 and the sent mark may repeat a reply (README, "Delivered once"): at most the
    # one the dead instance was sending at that moment, and with the same Message-ID.
    received = relay.received
    replies = Counter(in_reply_to(raw) for _, _, raw in received)
    repeated = {mid: n for mid, n in replies.items() if n > 1}
    reply_ids = Counter(header_message_id(raw) for _, _, raw in received)
    assert set(replies) == set(expected)
    if repeated:
        [count] = repeated.values()
        [(reply_id, reply_count)] = [(i, n) for i, n in reply_ids.items() if n > 1]
        assert count == reply_count == 2
        assert reply_id.strip("<>") in in_flight, (reply_id, in_flight)
    assert len(received) == len(expected) + len(repeated)
    for mail_from, rcpts, raw in received:
        assert mail_from == "<>"  # aiosmtpd's null reverse path
        assert rcpts == [expected[str(in_reply_to(raw))].sender]

    # The chained audit log, written by both instances, is whole.
    assert chain.broken_at is None, chain
    assert chain.events >= len(rows)
    print(f"{len(rows)} rows, {len(received)} replies at the relay in {elapsed:.1f}s")
    assert elapsed < 60
