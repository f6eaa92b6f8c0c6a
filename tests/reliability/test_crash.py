"""Crashes under sustained load: one `mailproc serve` (with its worker processes) is killed with
SIGKILL several times while client threads keep sending signed mail, and restarted each time.
Every message that got a 250 is stored and decided exactly once, every reply reaches the relay
once, and the audit chain stays whole."""

from __future__ import annotations

import signal
import smtplib
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from mailproc.db import Database
from mailproc.models import AuditEvent, Message, MessageState, OutboxEntry, OutboxState
from mailproc.requests import verify_chain
from tests import test_instances, test_pipeline
from tests.conftest import free_port
from tests.dkimkeys import DkimKey
from tests.reliability.counts import Counts
from tests.support import ServerProcess, wait_for, write_config
from tests.test_instances import (
    Mail,
    header_message_id,
    in_reply_to,
    kill_instance,
    send_once,
    worker_ids,
)
from tests.test_instances import mails as reply_mails
from tests.test_outbox import Relay
from tests.test_pipeline import sections

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

# The fixtures this suite shares with the pipeline and two-instance tests: the accounts
# directory, Alice's DKIM key, Bob's key (his own domain) and a relay that takes a moment
# over each message, so that a kill can find a reply on its way.
accounts_url = test_pipeline.accounts_url
key = test_pipeline.key
bob_key = test_instances.bob_key
relay = test_instances.relay

MESSAGES = 60
SENDERS = 4
KILLS = 3
WORKERS = 2
# A sender that did not get a 250 tries again until then, as an MTA keeps a message queued.
SEND_DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class Attempt:
    """One SMTP session of the load: when it began and ended, and how (0: no SMTP answer)."""

    message_id: str
    began: float
    ended: float
    code: int


@dataclass
class Load:
    """Mail sent from a few client threads, each message until it gets a 250, as a sending MTA
    would: a refused connection, a session cut off or a 4xx is tried again a moment later. A
    5xx is our fault answered as the sender's, and is recorded as an error. The test lets the
    mail out in shares (``allow``), so that each crash finds some of it still to send."""

    port: int
    mails: list[Mail]
    pace: float = 0.1  # seconds between one sender's messages
    timeout: float = 10.0  # a client's SMTP timeout
    acked: dict[str, list[int]] = field(default_factory=dict)  # Message-ID -> stored ids
    refused: Counter[int] = field(default_factory=Counter)  # SMTP code -> times answered
    cut_off: int = 0  # sessions refused or broken off by a dead server
    errors: list[str] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    _next: int = 0
    _allowed: int = 0
    _stopped: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _more: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self._more = threading.Condition(self._lock)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def allow(self, count: int) -> None:
        """Let the first ``count`` messages be sent."""
        with self._lock:
            self._allowed = max(self._allowed, min(count, len(self.mails)))
            self._more.notify_all()

    def stop(self) -> None:
        """Give up: the senders stop after the session in hand (a test that failed)."""
        with self._lock:
            self._stopped = True
            self._more.notify_all()

    def take(self) -> Mail | None:
        with self._lock:
            while self._next >= self._allowed and self._next < len(self.mails):
                if self._stopped:
                    return None
                self._more.wait(1.0)
            if self._next >= len(self.mails) or self._stopped:
                return None
            self._next += 1
            return self.mails[self._next - 1]

    def deliver(self, mail: Mail) -> None:
        deadline = time.monotonic() + SEND_DEADLINE_SECONDS
        while time.monotonic() < deadline and not self._stopped:
            began = time.monotonic()
            try:
                stored = send_once(self.port, mail, self.timeout)
            except smtplib.SMTPResponseException as exc:
                with self._lock:
                    self.attempts.append(
                        Attempt(mail.message_id, began, time.monotonic(), exc.smtp_code)
                    )
                    self.refused[exc.smtp_code] += 1
                    if exc.smtp_code >= 500:
                        self.errors.append(f"{mail.message_id}: {exc.smtp_code} {exc.smtp_error!r}")
                        return
            except (OSError, smtplib.SMTPException):
                with self._lock:
                    self.attempts.append(Attempt(mail.message_id, began, time.monotonic(), 0))
                    self.cut_off += 1
            else:
                with self._lock:
                    self.attempts.append(Attempt(mail.message_id, began, time.monotonic(), 250))
                    self.acked.setdefault(mail.message_id, []).append(stored)
                return
            time.sleep(0.1)
        with self._lock:
            self.errors.append(f"{mail.message_id} never got a 250")

    def run(self) -> None:
        while (mail := self.take()) is not None:
            self.deliver(mail)
            time.sleep(self.pace)

    def start(self, senders: int) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.run, daemon=True) for _ in range(senders)]
        for thread in threads:
            thread.start()
        return threads


def fast_sections(accounts_url: str, relay: Relay, **extra: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's settings with short leases, polls and backoffs, so that what a dead
    process held is taken over, and what failed is retried, within a second or two."""
    settings: dict[str, Any] = sections(accounts_url, relay, **extra)
    settings["outbound"] |= {
        "timeout_seconds": 0.5,
        "lease_seconds": 2.0,
        "retry_base_seconds": 0.2,
        "retry_max_seconds": 0.5,
        "poll_interval_seconds": 0.2,
        "max_attempts": 100,
    }
    settings["worker"] = {
        "processes": WORKERS,
        "lease_seconds": 2.0,
        "poll_interval_seconds": 0.2,
        "batch_size": 5,
        "max_attempts": 10,
    }
    return settings


@dataclass(frozen=True)
class Outcome:
    """What the database and the relay hold once everything settled."""

    rows: list[Message]
    outbox: list[OutboxEntry]
    decided: Counter[int | None]  # message id -> its message_decided audit events
    chain_broken_at: int | None
    chain_events: int
    received: list[tuple[str, list[str], bytes]]


def outcome(database: Database, relay: Relay) -> Outcome:
    with database.reading() as session:
        rows = list(session.scalars(select(Message).order_by(Message.id)))
        outbox = list(session.scalars(select(OutboxEntry).order_by(OutboxEntry.id)))
        decided = Counter(
            session.scalars(
                select(AuditEvent.message_id).where(
                    AuditEvent.action == "message_decided", AuditEvent.message_id.is_not(None)
                )
            )
        )
    chain = verify_chain(database)
    return Outcome(rows, outbox, decided, chain.broken_at, chain.events, list(relay.received))


def settled(database: Database, messages: int) -> Callable[[], bool]:
    """True once at least ``messages`` rows are stored and nothing waits: no message received,
    in processing or deferred, no reply pending or being sent."""

    def check() -> bool:
        with database.reading() as session:
            states = Counter(session.scalars(select(Message.state)))
            outbox = Counter(session.scalars(select(OutboxEntry.state)))
        waiting = {MessageState.RECEIVED, MessageState.PROCESSING, MessageState.DEFERRED}
        return (
            sum(states.values()) >= messages
            and not waiting & set(states)
            and not {OutboxState.PENDING, OutboxState.SENDING} & set(outbox)
        )

    return check


@dataclass
class Tally:
    """The exactly-once bookkeeping of one run, from the database and the relay."""

    accepted: int
    decided: int
    lost: list[str]
    duplicated: list[str]
    resent: list[str]  # replies the relay got twice under one Message-ID (crash window)
    extra_rows: int  # second copies of a message whose first 250 never reached its sender


def tally(
    mails: list[Mail],
    acked: dict[str, list[int]],
    result: Outcome,
    may_resend: Collection[str] = (),
    replies_per_mail: Callable[[Mail], int] = lambda _: 1,
) -> Tally:
    """Count what was lost and what was duplicated, end to end: a 250 without its row, a row
    not decided, decided twice or stuck, a reply missing or duplicated in the outbox or at the
    relay. A reply may reach the relay twice only under one Message-ID, and only one that was
    being sent when its process died (the README's "Delivered once")."""
    expected = {mail.message_id: mail for mail in mails}
    by_id = {row.id: row for row in result.rows}
    lost: list[str] = []
    duplicated: list[str] = []

    for mail in mails:
        stored = acked.get(mail.message_id, [])
        if not stored:
            lost.append(f"{mail.message_id}: no 250")
        if len(stored) > 1:
            duplicated.append(f"{mail.message_id}: 250 for {stored}")
        for message_id in stored:
            row = by_id.get(message_id)
            if row is None or header_message_id(row.raw) != mail.message_id:
                lost.append(f"{mail.message_id}: the 250 named row {message_id}, not holding it")
    for row in result.rows:
        count = result.decided.get(row.id, 0)
        if row.state != MessageState.PROCESSED or count == 0:
            lost.append(f"row {row.id}: {row.state.value}, decided {count} times ({row.error})")
        elif count > 1:
            duplicated.append(f"row {row.id}: decided {count} times")
    copies = Counter(header_message_id(row.raw) for row in result.rows)
    unexpected = set(copies) - set(expected)
    duplicated += [f"row for unknown {mid}" for mid in sorted(unexpected)]

    # The outbox: the replies each message called for, all sent.
    answered: Counter[str] = Counter()
    for entry in result.outbox:
        source = by_id.get(entry.source_message_id or 0)
        mid = header_message_id(source.raw) if source is not None else f"outbox {entry.id}"
        answered[mid] += 1
        if entry.state != OutboxState.SENT:
            lost.append(f"reply {entry.id} to {mid}: {entry.state.value} ({entry.last_error})")
    for mid, mail in expected.items():
        want = replies_per_mail(mail)
        if answered[mid] < want:
            lost.append(f"{mid}: {answered[mid]} of {want} replies queued")
        elif answered[mid] > want:
            duplicated.append(f"{mid}: {answered[mid]} replies queued, {want} expected")

    # The relay: each reply once; a second copy only under the same Message-ID, in flight.
    copies_at_relay = Counter(header_message_id(raw) for _, _, raw in result.received)
    threads_of = {header_message_id(raw): in_reply_to(raw) for _, _, raw in result.received}
    resent = sorted(
        mid for mid, n in copies_at_relay.items() if n == 2 and mid.strip("<>") in may_resend
    )
    duplicated += [
        f"reply {mid} reached the relay {n} times"
        for mid, n in copies_at_relay.items()
        if n > 1 and mid not in resent
    ]
    distinct = Counter(threads_of.values())
    for mid, mail in expected.items():
        want = replies_per_mail(mail)
        if distinct[mid] < want:
            lost.append(f"{mid}: {distinct[mid]} of {want} replies at the relay")
        elif distinct[mid] > want:
            duplicated.append(f"{mid}: {distinct[mid]} replies at the relay, {want} expected")
    duplicated += [
        f"reply to unknown {mid}" for mid in sorted(map(str, set(distinct) - set(expected)))
    ]

    decided = sum(
        1
        for row in result.rows
        if row.state == MessageState.PROCESSED and result.decided.get(row.id, 0) == 1
    )
    return Tally(
        accepted=sum(1 for stored in acked.values() if stored),
        decided=decided,
        lost=lost,
        duplicated=duplicated,
        resent=resent,
        extra_rows=sum(copies.values()) - len(copies),
    )


def serve(tmp_path: Path, url: str, accounts_url: str, relay: Relay) -> ServerProcess:
    port = free_port()
    config = write_config(
        tmp_path / "mailproc.toml", url, port=port, **fast_sections(accounts_url, relay)
    )
    return ServerProcess(config, port, log_path=tmp_path / "serve.log")


def test_repeated_sigkill_under_load_loses_and_duplicates_nothing(
    tmp_path: Path,
    database_url: str,
    accounts_url: str,
    key: DkimKey,
    bob_key: DkimKey,
    relay: Relay,
    report: Callable[..., Counts],
) -> None:
    server = serve(tmp_path, database_url, accounts_url, relay)
    mails = reply_mails(key, bob_key, MESSAGES, "crash")
    database = Database(database_url)
    load = Load(server.port, mails, pace=0.05)
    abandoned: dict[int, int] = {}  # message id -> attempts when its worker was killed
    in_flight: set[str] = set()  # Message-IDs of replies being sent at a kill
    acked_at_kills: list[int] = []
    started = time.monotonic()
    try:
        server.start()
        threads = load.start(SENDERS)

        def holding() -> tuple[int, int]:
            with database.reading() as session:
                claimed = session.scalar(
                    select(func.count()).where(Message.state == MessageState.PROCESSING)
                )
                sending = session.scalar(
                    select(func.count()).where(OutboxEntry.state == OutboxState.SENDING)
                )
            return int(claimed or 0), int(sending or 0)

        share = MESSAGES // (KILLS + 1)
        for cycle in range(KILLS):
            # Once this run's workers are up, let half the next share of the mail go; when it
            # got its 250s, wait for a moment a worker holds claimed messages and the sender a
            # reply (claimed messages will do after 0.8 s, anything after 1.5 s), let the rest
            # of the share go and kill while those sessions are under way.
            worker_ids(server, WORKERS * (cycle + 1))
            half = cycle * share + share // 2
            load.allow(half)
            wait_for(lambda half=half: load.count() >= half, timeout=30, interval=0.005)
            waited_from = time.monotonic()
            while time.monotonic() - waited_from < 1.5:
                claimed, sending = holding()
                if claimed and (sending or time.monotonic() - waited_from > 0.8):
                    break
                time.sleep(0.005)
            load.allow((cycle + 1) * share)
            time.sleep(0.03)
            kill_instance(server)
            assert server.process is not None
            assert server.process.poll() == -signal.SIGKILL
            acked_at_kills.append(load.count())
            time.sleep(0.3)  # a commit already on its way to the server lands
            with database.reading() as session:
                for message_id, attempts in session.execute(
                    select(Message.id, Message.attempts).where(
                        Message.state == MessageState.PROCESSING
                    )
                ):
                    abandoned.setdefault(message_id, attempts)
                in_flight.update(
                    session.scalars(
                        select(OutboxEntry.message_id_header).where(
                            OutboxEntry.state == OutboxState.SENDING
                        )
                    )
                )
            server.start()
        worker_ids(server, WORKERS * (KILLS + 1))
        load.allow(MESSAGES)

        for thread in threads:
            thread.join(SEND_DEADLINE_SECONDS)
            assert not thread.is_alive()
        assert not load.errors, load.errors
        try:
            wait_for(settled(database, MESSAGES), timeout=40, interval=0.2)
        except AssertionError:
            raise AssertionError(f"still waiting:\n{server.log()[-6000:]}") from None
        time.sleep(1.0)  # and nothing more arrives at the relay
        server.signal(signal.SIGTERM)
        assert server.wait() == 0, server.log()[-4000:]
        result = outcome(database, relay)
    finally:
        load.stop()
        kill_instance(server)
        database.dispose()
    elapsed = time.monotonic() - started

    counted = tally(mails, load.acked, result, may_resend=in_flight)
    by_id = {row.id: row for row in result.rows}
    taken_over = sum(1 for mid, n in abandoned.items() if by_id[mid].attempts > n)
    report(
        sent=len(mails),
        accepted=counted.accepted,
        decided=counted.decided,
        lost=len(counted.lost),
        duplicated=len(counted.duplicated),
        kills=KILLS,
        rows=len(result.rows),
        extra_rows=counted.extra_rows,
        refused_4xx=sum(n for code, n in load.refused.items() if 400 <= code < 500),
        cut_off=load.cut_off,
        abandoned=len(abandoned),
        taken_over=taken_over,
        replies=len(result.received),
        resent=len(counted.resent),
        seconds=round(elapsed),
    )
    print(f"250s before each kill: {acked_at_kills}; in flight at kills: {len(in_flight)}")
    assert counted.lost == []
    assert counted.duplicated == []
    assert counted.accepted == len(mails)
    assert counted.decided == len(result.rows)
    # The kills came while mail was still arriving, and the load met the dead server.
    assert acked_at_kills == sorted(acked_at_kills)
    assert acked_at_kills[-1] < len(mails)
    assert load.cut_off > 0
    # Never a 5xx for our own trouble (the errors above), and only a message whose first copy
    # was stored just as the server died, its 250 never sent, has a second row.
    assert set(load.refused) <= {421, 451}, load.refused
    assert counted.extra_rows <= SENDERS * KILLS
    # What a killed worker held was taken over and finished.
    assert taken_over == len(abandoned)
    assert result.chain_broken_at is None
    assert result.chain_events >= len(result.rows)
