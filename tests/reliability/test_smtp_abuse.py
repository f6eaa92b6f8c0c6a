"""SMTP abuse against the real listener (with its worker): slow and stalled clients, more
sessions than the cap, overlong command and data lines, oversized messages, and garbage on the
wire. Every abuse is answered with a clear code or a closed connection, nothing half-received
is stored, and right after it a well-behaved client gets its message stored (250) and
processed."""

from __future__ import annotations

import random
import smtplib
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mailproc.models import Message, MessageState
from tests.reliability.counts import Counts
from tests.support import SUPPORT, AppThread, make_message, messages, wait_for, wire

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

Report = Callable[..., Counts]
ALICE = "alice@example.org"


class Wire:
    """A raw SMTP client socket: exact bytes out, reply lines in."""

    def __init__(self, port: int, greet: bool = True, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.greeting = self.replies(1)[0] if greet else ""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str | bytes, replies: int = 1) -> list[str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.replies(replies)

    def replies(self, count: int) -> list[str]:
        """The next ``count`` complete replies (the last line of each); fewer if the server
        closes the connection first."""
        found: list[str] = []
        while len(found) < count:
            line = self._line()
            if line is None:
                break
            if line[3:4] != "-":
                found.append(line)
        return found

    def _line(self) -> str | None:
        while b"\r\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode(errors="replace")

    def closed_by_server(self, within: float) -> bool:
        """Whether the server closes the connection within ``within`` seconds (what it says
        meanwhile is read and dropped)."""
        self.sock.settimeout(within)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def close(self) -> None:
        self.sock.close()


def envelope(client: Wire, helo: str = "client.example.org") -> None:
    assert client.command(f"EHLO {helo}")[0].startswith("250 ")
    assert client.command(f"MAIL FROM:<{ALICE}>")[0].startswith("250 ")
    assert client.command(f"RCPT TO:<{SUPPORT}>")[0].startswith("250 ")


def fresh_message(subject: str = "Reset my security question") -> bytes:
    return wire(make_message(subject=subject, message_id=f"<{uuid.uuid4().hex}@example.org>"))


@dataclass
class Tally:
    """What one test sent and what the service said, checked against the database at the end."""

    app: AppThread
    sent: int = 0
    accepted: dict[int, str] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)

    def accept(self, reply: str, label: str) -> int:
        """Note a ``250 ... Stored as message N`` reply (or the text after the code)."""
        message_id = int(reply.rsplit(" ", 1)[-1])
        assert message_id not in self.accepted, (label, message_id)
        self.accepted[message_id] = label
        return message_id

    def refused(self, reply: str) -> None:
        self.codes[f"refused_{reply[:3]}"] += 1

    def send_normal(self, label: str = "well-behaved", timeout: float = 30) -> float:
        """A well-behaved client delivers one message; returns how long it took."""
        started = time.monotonic()
        self.sent += 1
        with smtplib.SMTP("127.0.0.1", self.app.port, timeout=timeout) as client:
            client.ehlo("client.example.org")
            assert client.mail(ALICE)[0] == 250
            assert client.rcpt(SUPPORT)[0] == 250
            code, reply = client.data(fresh_message())
            assert code == 250, (label, code, reply)
        self.accept(reply.decode(), label)
        return time.monotonic() - started

    def finish(self, report: Report, **extra: int) -> Counts:
        """Every accepted message processed, nothing else stored; the service still up."""
        assert self.app.app.listening()
        assert self.app.app.worker.alive == self.app.settings.worker.processes
        assert self.app.app.worker.restarts == 0
        url = self.app.database_url
        done = (MessageState.PROCESSED, MessageState.FAILED)

        def settled() -> list[Message] | None:
            rows = messages(url)
            mine = [r for r in rows if r.id in self.accepted and r.state in done]
            return rows if len(mine) == len(self.accepted) else None

        try:
            rows: list[Message] = wait_for(settled, timeout=30, interval=0.1)
        except AssertionError:
            rows = messages(url)
        by_id = {row.id: row for row in rows}
        stuck = [i for i in self.accepted if i not in by_id or by_id[i].state not in done]
        ours = [by_id[i] for i in self.accepted if i in by_id]
        stray = [row.id for row in rows if row.id not in self.accepted]
        decided = sum(r.state == MessageState.PROCESSED and r.decision is not None for r in ours)
        counts = report(
            sent=self.sent,
            accepted=len(self.accepted),
            decided=decided,
            lost=len(stuck),
            duplicated=len(ours) - len({row.sha256 for row in ours}),
            stray=len(stray),
            **dict(sorted(self.codes.items())),
            **extra,
        )
        assert counts.lost == 0, stuck
        assert counts.duplicated == 0
        assert stray == [], "stored without a 250 to anyone"
        assert decided == len(self.accepted)
        return counts


@pytest.fixture
def running(sqlite_url: str, request: pytest.FixtureRequest) -> Iterator[AppThread]:
    """The service on SQLite with one worker; a test's ``smtp`` settings come from
    ``@pytest.mark.parametrize("running", [{...}], indirect=True)``."""
    smtp: dict[str, Any] = getattr(request, "param", {})
    sections: dict[str, dict[str, Any]] = {
        "smtp": smtp,
        "outbound": {"poll_interval_seconds": 3600.0},
    }
    with AppThread.running(sqlite_url, **sections) as app:
        yield app


# -- slow and stalled clients ---------------------------------------------------------------


def _slow_sender(port: int, raw: bytes, delay: float, result: dict[str, Any]) -> None:
    """DATA at one byte per ``delay`` seconds."""
    client = Wire(port)
    try:
        envelope(client, "slow.example.org")
        assert client.command("DATA")[0].startswith("354")
        started = time.monotonic()
        for byte in raw + b".\r\n":
            client.send(bytes([byte]))
            time.sleep(delay)
        result["seconds"] = time.monotonic() - started
        result["reply"] = client.replies(1)
    except Exception as exc:  # reported by the test, not lost in the thread
        result["error"] = repr(exc)
    finally:
        client.close()


@pytest.mark.parametrize("running", [{"command_timeout_seconds": 4.0}], indirect=True, ids=["4s"])
def test_slow_and_stalled_clients_do_not_hold_up_the_others(
    running: AppThread, report: Report
) -> None:
    tally = Tally(running)
    # Short lines, each well inside the command timeout; the whole DATA takes longer than it.
    slow_message = (
        b"From: alice@example.org\r\nTo: support@example.com\r\n"
        b"Subject: slow\r\nMessage-ID: <slow@example.org>\r\n\r\n"
        b"one byte\r\nat a time\r\nfrom a\r\nslow link\r\n"
    )
    result: dict[str, Any] = {}
    slow = threading.Thread(target=_slow_sender, args=(running.port, slow_message, 0.05, result))
    tally.sent += 1
    slow.start()

    stalled = Wire(running.port)
    stalled.command("EHLO stalled.example.org")
    stalled.send(b"MAIL FROM:<alice@exa")  # ... and nothing more
    stalled_at = time.monotonic()
    stalled_in_data = Wire(running.port)
    envelope(stalled_in_data, "stalled.example.org")
    assert stalled_in_data.command("DATA")[0].startswith("354")
    tally.sent += 1
    stalled_in_data.send(fresh_message("stalled")[:100])  # ... and nothing more

    durations = [tally.send_normal(f"meanwhile-{n}") for n in range(10)]
    assert max(durations) < 2.0, durations

    # The stalled sessions are closed by the command timeout; the trickling one is not.
    assert stalled.closed_by_server(within=10)
    stalled_for = time.monotonic() - stalled_at
    assert stalled_in_data.closed_by_server(within=10)
    stalled.close()
    stalled_in_data.close()
    slow.join(30)
    assert "error" not in result, result
    assert result["seconds"] > 4.0  # longer than the command timeout, and still served
    [reply] = result["reply"]
    assert reply.startswith("250 "), reply
    tally.accept(reply, "slow")
    tally.send_normal("after")
    tally.finish(
        report,
        prompt_ms_max=round(max(durations) * 1000),
        slow_data_ms=round(result["seconds"] * 1000),
        stalled_closed_after_ms=round(stalled_for * 1000),
    )


# -- more sessions than the cap -----------------------------------------------------------------


@pytest.mark.parametrize("running", [{"max_sessions": 5}], indirect=True, ids=["cap-5"])
def test_sessions_over_the_cap_get_421_and_well_behaved_ones_are_served_after(
    running: AppThread, report: Report
) -> None:
    tally = Tally(running)
    hogs = [Wire(running.port) for _ in range(5)]
    assert all(hog.greeting.startswith("220 ") for hog in hogs)
    for _ in range(20):
        extra = Wire(running.port)
        assert extra.greeting.startswith("421 4.3.2"), extra.greeting
        assert extra.closed_by_server(within=5)
        extra.close()
        tally.refused(extra.greeting)
    # A hog in the middle of a transaction is still served normally.
    envelope(hogs[0])
    assert hogs[0].command("DATA")[0].startswith("354")
    hogs[0].send(fresh_message("from a hog") + b".\r\n")
    [reply] = hogs[0].replies(1)
    assert reply.startswith("250 "), reply
    tally.sent += 1
    tally.accept(reply, "hog")
    for hog in hogs:
        hog.close()
    wait_for(lambda: running.app.open_sessions() == 0, timeout=10)
    for n in range(10):
        tally.send_normal(f"after-{n}")
    tally.finish(report)


# -- overlong lines and oversized messages -------------------------------------------------------


@pytest.mark.parametrize("running", [{"max_message_bytes": 100_000}], indirect=True, ids=["100kb"])
def test_overlong_lines_and_oversized_messages_are_refused_and_not_stored(
    running: AppThread, report: Report
) -> None:
    tally = Tally(running)
    client = Wire(running.port)
    try:
        assert client.command("EHLO client.example.org")[0].startswith("250 ")
        for line in (
            b"NOOP " + b"x" * 2000,  # over the 512 of a command line
            b"NOOP " + b"x" * 200_000,  # over the stream's line buffer too
            b"MAIL FROM:<" + b"a" * 1000 + b"@example.org>",
            b"X" * 100_000,
        ):
            [reply] = client.command(line)
            assert reply.startswith("500 "), reply
            tally.refused(reply)
        # The same session goes on, and a data line over 1000 bytes fails its message.
        envelope_replies = [
            client.command(f"MAIL FROM:<{ALICE}>")[0],
            client.command(f"RCPT TO:<{SUPPORT}>")[0],
        ]
        assert all(r.startswith("250 ") for r in envelope_replies), envelope_replies
        assert client.command("DATA")[0].startswith("354")
        tally.sent += 1
        client.send(fresh_message()[:-2] + b"y" * 5000 + b"\r\n.\r\n")
        [reply] = client.replies(1)
        assert reply.startswith("500 5.5.2"), reply
        tally.refused(reply)
        # A message over the size limit: 552, after the whole of it was read.
        client.command(f"MAIL FROM:<{ALICE}>")
        client.command(f"RCPT TO:<{SUPPORT}>")
        assert client.command("DATA")[0].startswith("354")
        tally.sent += 1
        client.send(fresh_message() + (b"z" * 998 + b"\r\n") * 150 + b".\r\n")
        [reply] = client.replies(1)
        assert reply.startswith("552 5.3.4"), reply
        tally.refused(reply)
        # Declared too big up front: refused at MAIL FROM.
        [reply] = client.command(f"MAIL FROM:<{ALICE}> SIZE=1000000000")
        assert reply.startswith("552"), reply
        tally.refused(reply)
        # And then a normal message in the very same session.
        envelope_replies = [
            client.command("RSET")[0],
            client.command(f"MAIL FROM:<{ALICE}>")[0],
            client.command(f"RCPT TO:<{SUPPORT}>")[0],
            client.command("DATA")[0],
        ]
        assert [r[:3] for r in envelope_replies] == ["250", "250", "250", "354"]
        tally.sent += 1
        client.send(fresh_message().replace(b"\r\n.", b"\r\n..") + b".\r\n")
        [reply] = client.replies(1)
        assert reply.startswith("250 "), reply
        tally.accept(reply, "same-session")
    finally:
        client.close()
    tally.send_normal("after")
    tally.finish(report)


# -- garbage on the wire --------------------------------------------------------------------------


def _garbage_sessions(port: int, tally: Tally) -> dict[str, int]:
    """Each kind of garbage on its own connection; returns how many sessions the server closed
    on its own."""
    closed = Counter[str]()
    rng = random.Random(5321)

    # Random bytes, with line ends now and then.
    client = Wire(port)
    client.send(rng.randbytes(64 * 1024) + b"\r\nQUIT\r\n")
    assert client.closed_by_server(within=10)
    client.close()

    # Random printable commands: each one refused, then the session is ended for them.
    client = Wire(port)
    for _ in range(10):
        line = bytes(rng.randrange(0x21, 0x7F) for _ in range(rng.randrange(1, 60)))
        replies = client.command(line)
        if not replies:
            break
        assert replies[0][:1] == "5", replies
        tally.refused(replies[0])
    closed["random-commands"] += client.closed_by_server(within=5)
    client.close()

    # Commands before the greeting, all in one write, with the message right after DATA.
    client = Wire(port, greet=False)
    tally.sent += 1
    client.send(
        b"EHLO early.example.org\r\n"
        + f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{SUPPORT}>\r\nDATA\r\n".encode()
        + fresh_message("early talker")
        + b".\r\nQUIT\r\n"
    )
    replies = client.replies(7)
    assert replies[0].startswith("220 "), replies
    final = replies[-2]  # the reply to the message, before QUIT's
    if final.startswith("250 "):  # taken like a pipelining client's: stored and answered
        tally.accept(final, "early-talker")
    else:
        tally.refused(final)
    client.close()

    # The content of a message without DATA: every line is a bad command.
    client = Wire(port)
    envelope(client)
    for line in fresh_message("no DATA").split(b"\r\n")[:8]:
        replies = client.command(line)
        if not replies:
            break
        assert replies[0][:1] == "5", replies
        tally.refused(replies[0])
    client.close()

    # BDAT (CHUNKING, not offered): refused, and the chunk is read as (bad) commands.
    client = Wire(port)
    envelope(client)
    chunk = fresh_message("chunked")
    client.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    replies = client.replies(1)
    assert replies[0].startswith("500 "), replies
    tally.refused(replies[0])
    closed["bdat"] += client.closed_by_server(within=5)
    client.close()

    # NUL bytes in commands.
    client = Wire(port)
    for line, code in (
        (b"EH\x00LO x", "5"),
        (b"EHLO nul.example.org", "2"),
        (b"MAIL FROM:<al\x00ice@example.org>", "5"),
        (b"MAIL FROM:<alice@example.org>", "2"),
        (b"RCPT TO:<support@example.com\x00>", "5"),
        (b"\x00\x00\x00", "5"),
        (b"DATA", "5"),  # no recipient was accepted
    ):
        [reply] = client.command(line)
        assert reply[:1] == code, (line, reply)
        if code == "5":
            tally.refused(reply)
    client.close()

    # Many recipients: the same one again and again, and then too many.
    client = Wire(port)
    assert client.command("EHLO many.example.org")[0].startswith("250 ")
    assert client.command(f"MAIL FROM:<{ALICE}>")[0].startswith("250 ")
    rcpt_codes = Counter(client.command(f"RCPT TO:<{SUPPORT}>")[0][:3] for _ in range(120))
    assert set(rcpt_codes) <= {"250", "452"}, rcpt_codes
    tally.codes["refused_452"] += rcpt_codes["452"]
    assert client.command("DATA")[0].startswith("354")
    tally.sent += 1
    client.send(fresh_message("many recipients") + b".\r\n")
    [reply] = client.replies(1)
    assert reply.startswith("250 "), reply  # one message stored once, not once per RCPT
    tally.accept(reply, "many-recipients")
    client.close()

    # Gone in the middle of DATA, before the end of the message: nothing is stored.
    for cut in (0, 10, 200):
        client = Wire(port)
        envelope(client)
        assert client.command("DATA")[0].startswith("354")
        tally.sent += 1
        client.send(fresh_message("cut short")[:cut])
        client.close()
    return dict(closed)


def test_garbage_on_the_wire_stores_nothing_and_the_next_client_is_served(
    running: AppThread, report: Report
) -> None:
    tally = Tally(running)
    closed = _garbage_sessions(running.port, tally)
    # The half-sent messages' sessions are gone before we look.
    wait_for(lambda: running.app.open_sessions() == 0, timeout=10)
    for n in range(3):
        tally.send_normal(f"after-{n}")
    tally.finish(report, **{f"closed_{k}": v for k, v in closed.items()})
