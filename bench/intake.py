"""Intake throughput: how many messages per second ``mailproc serve`` answers ``250`` (each one
committed to SQLite with fsync before the reply) compared with a bare aiosmtpd sink that stores
nothing, under the same concurrent SMTP load from Postfix's ``smtp-source`` (when installed) or
from the project's asyncio load generator.

Two scenarios run against both targets, repeated in alternating order; medians are reported:

* one message per connection, from N concurrent clients;
* N persistent sessions, each sending messages back to back.

Only ``250`` replies count. Afterwards the rows in mailproc's ``message`` table must equal the
messages it accepted, and (asyncio generator only: smtp-source does not show reply texts) the
ids in its replies must be exactly the stored ids. The table goes to stdout, the figures and
machine facts to ``bench/intake.json``; ``run()`` returns them to a combined runner.

Usage: ``python -m bench.intake [--load-generator auto] [--clients 20] [--sessions 20]
[--duration 6] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from tests.dnsserver import ZoneServer

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = Path(__file__).resolve().parent / "intake.json"
HOST = "127.0.0.1"
SUPPORT = "support@example.com"
SENDER = "alice.customer@example.org"
TARGET_RATIO = 0.80
STEP_TIMEOUT = 30.0
START_TIMEOUT = 60.0
STOP_GRACE = 45.0
IDLE_TIMEOUT = 300.0
SETTLE_SECONDS = 1.0
IDLE_PROBE_SECONDS = 0.5
IDLE_PROBES = 4
IDLE_CPUS = 0.05
RETRY_PAUSE = 0.05
NOISY_CPUS = 0.10
LISTENING = re.compile(r"listening on \S+:(\d+)")
ID_PLACEHOLDER = "BENCHMSGID"

CLIENT_NAME = "client.bench.example.org"
EHLO = f"EHLO {CLIENT_NAME}\r\n".encode()
MAIL = f"MAIL FROM:<{SENDER}>\r\n".encode()
RCPT = f"RCPT TO:<{SUPPORT}>\r\n".encode()
QUIT = b"QUIT\r\n"

SINK = "sink"
MAILPROC = "mailproc"
PER_CONNECTION = "per-connection"
PERSISTENT = "persistent"

AUTO = "auto"
ASYNCIO = "asyncio"
SMTP_SOURCE = "smtp-source"
SMTP_SOURCE_FALLBACK = Path("/usr/sbin/smtp-source")
# One smtp-source run (a few seconds when healthy) is stopped after this long.
SOURCE_TIMEOUT = 300.0
# Messages per session in the short run against the sink that sizes smtp-source's runs.
CALIBRATION_PER_SESSION = 20

_TEXT_BODY = """\
Hello support team,

I can no longer sign in to my account (customer number 48213) because I
do not remember the answer to my security question. I set it up years
ago when I opened the account, and I have changed my phone since, so the
recovery code is not reaching me either.

Could you please reset the security question so that I can choose a new
one? I can confirm the following details, which should match what you
have on file:

  - Full name: Alice Customer
  - Date of birth: 14 March 1986
  - Postcode on the account: 10115
  - Last invoice number: INV-2024-00917, paid on 2 November

I am writing from the address registered on the account. If you need
anything else from me, for example a copy of my ID, just reply to this
message and I will send it the same day.

Thank you very much for your help.

Kind regards,
Alice Customer
"""

_HTML_BODY = """\
<html><head><meta charset="utf-8"></head><body>
<p>Hello support team,</p>
<p>I can no longer sign in to my account (customer number 48213) because
I do not remember the answer to my security question. I set it up years
ago when I opened the account, and I have changed my phone since, so the
recovery code is not reaching me either.</p>
<p>Could you please reset the security question so that I can choose a
new one? I can confirm the following details, which should match what
you have on file:</p>
<ul>
<li>Full name: Alice Customer</li>
<li>Date of birth: 14 March 1986</li>
<li>Postcode on the account: 10115</li>
<li>Last invoice number: INV-2024-00917, paid on 2 November</li>
</ul>
<p>I am writing from the address registered on the account. If you need
anything else from me, for example a copy of my ID, just reply to this
message and I will send it the same day.</p>
<p>Thank you very much for your help.</p>
<p>Kind regards,<br>Alice Customer</p>
</body></html>
"""


def build_message() -> tuple[bytes, bytes]:
    """A support request of about 3.5 KB as it arrives from a relay: trace and authentication
    headers, a DKIM signature and a multipart/alternative body. Returned as the DATA payload
    (dot-stuffed, with the final ``.`` line) split around a per-message unique Message-ID part."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = f'"Alice Customer" <{SENDER}>'
    message["To"] = f"Example Support <{SUPPORT}>"
    message["Subject"] = "Please reset my security question (customer 48213)"
    message["Date"] = format_datetime(datetime(2024, 11, 12, 9, 14, 27, tzinfo=UTC))
    message["Message-ID"] = f"<{ID_PLACEHOLDER}@mail.example.org>"
    message["X-Mailer"] = "Example Mail 8.4 (build 2291)"
    message.set_content(_TEXT_BODY)
    message.add_alternative(_HTML_BODY, subtype="html")
    message.set_boundary("=_b9f1c7a2e4d84a0f9d3c_=")
    signature = base64.b64encode(hashlib.sha512(b"bench").digest() * 4).decode()
    body_hash = base64.b64encode(hashlib.sha256(b"body").digest()).decode()
    signature_lines = "\r\n\t  ".join(signature[i : i + 70] for i in range(0, len(signature), 70))
    trace = (
        "Received: from mail-out.example.org (mail-out.example.org [192.0.2.25])\r\n"
        "\tby mx1.example.com (Postfix) with ESMTPS id 4XyZ1k2Qbcz9sT\r\n"
        f"\tfor <{SUPPORT}>; Tue, 12 Nov 2024 09:14:28 +0000 (UTC)\r\n"
        "Received: from [198.51.100.7] (dyn-7.example.net [198.51.100.7])\r\n"
        "\tby mail-out.example.org (Postfix) with ESMTPSA id 8C1F2A0147\r\n"
        f"\tfor <{SUPPORT}>; Tue, 12 Nov 2024 09:14:27 +0000 (UTC)\r\n"
        "Authentication-Results: mx1.example.com; dkim=pass header.d=example.org;\r\n"
        "\tspf=pass smtp.mailfrom=example.org; dmarc=pass header.from=example.org\r\n"
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org;\r\n"
        "\ts=s2024; t=1731402867;\r\n"
        "\th=from:to:subject:date:message-id:mime-version:content-type;\r\n"
        f"\tbh={body_hash};\r\n"
        f"\tb={signature_lines}\r\n"
    )
    raw = trace.encode() + message.as_bytes()
    raw = re.sub(rb"(?m)^\.", b"..", raw)
    if not raw.endswith(b"\r\n"):
        raw += b"\r\n"
    prefix, suffix = (raw + b".\r\n").split(ID_PLACEHOLDER.encode())
    return prefix, suffix


class Messages:
    """DATA payloads with unique Message-IDs."""

    def __init__(self) -> None:
        self.prefix, self.suffix = build_message()
        self._counter = itertools.count(1)
        self.tag = f"{os.getpid()}.{int(time.time())}".encode()
        self.size = len(self._payload(1)) - len(b".\r\n")

    def _payload(self, number: int) -> bytes:
        return b"%s%s.%d%s" % (self.prefix, self.tag, number, self.suffix)

    def next(self) -> bytes:
        return self._payload(next(self._counter))


# -- load generator ---------------------------------------------------------------------------


class Rejected(Exception):
    """The server answered a step with an unexpected code."""

    def __init__(self, step: str, code: int, text: bytes) -> None:
        super().__init__(f"{step}: {code} {text.decode(errors='replace')}")
        self.step = step
        self.code = code


SESSION_ERRORS = (
    OSError,
    TimeoutError,
    EOFError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ValueError,
)


@dataclass
class Tally:
    """Outcomes of one run; the window is the measured part after the warm-up."""

    window_start: float
    window_end: float
    ok_total: int = 0
    ok_window: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    ids: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    # False when a failed smtp-source run left the number of accepted messages uncertain.
    exact: bool = True

    def accepted(self, reply: bytes, started: float) -> None:
        now = time.monotonic()
        self.ok_total += 1
        if self.window_start <= now < self.window_end:
            self.ok_window += 1
            self.latencies.append(now - started)
        last = reply.rsplit(b" ", 1)[-1]
        if last.isdigit():
            self.ids.append(int(last))

    def rejection(self, exc: Rejected) -> None:
        self.rejected[f"{exc.step} {exc.code}"] += 1

    def error(self, exc: BaseException) -> None:
        self.errors[type(exc).__name__] += 1


class Client:
    """One SMTP session in lock-step (no pipelining), over raw asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port)
        client = cls(reader, writer)
        try:
            await client.expect("greeting", 220)
            await client.expect("EHLO", 250, EHLO)
        except BaseException:
            client.close()
            raise
        return client

    async def reply(self) -> tuple[int, bytes]:
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line[3:4] != b"-":
                return int(line[:3]), line[4:].rstrip()

    async def expect(self, step: str, code: int, data: bytes = b"") -> bytes:
        if data:
            self.writer.write(data)
        got, text = await self.reply()
        if got != code:
            raise Rejected(step, got, text)
        return text

    async def send(self, payload: bytes) -> bytes:
        """One mail transaction; returns the text of the final ``250``."""
        await self.expect("MAIL", 250, MAIL)
        await self.expect("RCPT", 250, RCPT)
        await self.expect("DATA", 354, b"DATA\r\n")
        return await self.expect("message", 250, payload)

    async def quit(self) -> None:
        try:
            await self.expect("QUIT", 221, QUIT)
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


async def one_per_connection(port: int, tally: Tally, messages: Messages, end: float) -> None:
    while time.monotonic() < end:
        client: Client | None = None
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                client = await Client.connect(port)
                started = time.monotonic()
                reply = await client.send(messages.next())
                tally.accepted(reply, started)
                await client.quit()
        except Rejected as exc:
            tally.rejection(exc)
            await asyncio.sleep(RETRY_PAUSE)
        except SESSION_ERRORS as exc:
            tally.error(exc)
            await asyncio.sleep(RETRY_PAUSE)
        finally:
            if client is not None:
                client.close()


async def persistent_session(port: int, tally: Tally, messages: Messages, end: float) -> None:
    client: Client | None = None
    try:
        while time.monotonic() < end:
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    if client is None:
                        client = await Client.connect(port)
                    started = time.monotonic()
                    reply = await client.send(messages.next())
                    tally.accepted(reply, started)
            except (Rejected, *SESSION_ERRORS) as exc:
                if isinstance(exc, Rejected):
                    tally.rejection(exc)
                else:
                    tally.error(exc)
                if client is not None:
                    client.close()
                client = None
                await asyncio.sleep(RETRY_PAUSE)
        if client is not None:
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await client.quit()
            except Rejected as exc:
                tally.rejection(exc)
            except SESSION_ERRORS as exc:
                tally.error(exc)
    finally:
        if client is not None:
            client.close()


Session = Callable[[int, Tally, Messages, float], Coroutine[Any, Any, None]]
SESSIONS: dict[str, Session] = {
    PER_CONNECTION: one_per_connection,
    PERSISTENT: persistent_session,
}


def machine_cpu_seconds() -> tuple[float, float] | None:
    """CPU time spent by everything on this machine, and taken from it by the hypervisor
    (steal), summed over CPUs (Linux /proc)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def process_cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process and all its threads (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float | None:
    """CPU time of a process and of its living children (mailproc's worker processes)."""
    own = process_cpu_seconds(pid)
    if own is None:
        return None
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        child_pids = [int(child) for child in children.read_text().split()]
    except OSError:
        child_pids = []
    return own + sum(process_cpu_seconds(child) or 0.0 for child in child_pids)


@dataclass(frozen=True)
class CpuSample:
    wall: float
    server: float | None
    loadgen: float
    machine: tuple[float, float] | None

    @classmethod
    def take(cls, server_pid: int, *, children: bool = False) -> CpuSample:
        """``children`` adds the CPU time of this process's waited-for children to the load
        generator's: smtp-source, once it has exited."""
        loadgen = time.process_time()
        if children:
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            loadgen += usage.ru_utime + usage.ru_stime
        return cls(
            time.monotonic(), process_cpu_seconds(server_pid), loadgen, machine_cpu_seconds()
        )


@dataclass(frozen=True)
class CpuUse:
    """CPUs kept busy during the measured window (1.0 is one core): by the server, by this load
    generator, by anything else on the machine, and taken by the hypervisor (steal)."""

    server: float | None
    loadgen: float
    other: float | None
    steal: float | None

    @classmethod
    def between(cls, before: CpuSample, after: CpuSample) -> CpuUse:
        wall = after.wall - before.wall
        server = (
            None
            if before.server is None or after.server is None
            else (after.server - before.server) / wall
        )
        loadgen = (after.loadgen - before.loadgen) / wall
        if server is None or before.machine is None or after.machine is None:
            return cls(server, loadgen, None, None)
        busy = (after.machine[0] - before.machine[0]) / wall
        steal = (after.machine[1] - before.machine[1]) / wall
        return cls(server, loadgen, max(0.0, busy - server - loadgen), steal)


@dataclass
class Run:
    target: str
    scenario: str
    repeat: int
    concurrency: int
    duration: float
    tally: Tally
    cpu: CpuUse
    backlog_at_start: int = 0
    catch_up_seconds: float | None = None

    @property
    def rate(self) -> float:
        return self.tally.ok_window / self.duration

    def percentile_ms(self, q: float) -> float | None:
        values = sorted(self.tally.latencies)
        if not values:
            return None
        return 1000 * values[min(len(values) - 1, int(q * len(values)))]

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "scenario": self.scenario,
            "repeat": self.repeat,
            "concurrency": self.concurrency,
            "measured_seconds": self.duration,
            "msgs_per_s": round(self.rate, 1),
            "accepted_in_window": self.tally.ok_window,
            "accepted_total": self.tally.ok_total,
            "non_250_replies": dict(self.tally.rejected),
            "errors": dict(self.tally.errors),
            "latency_ms_p50": _round(self.percentile_ms(0.50), 2),
            "latency_ms_p99": _round(self.percentile_ms(0.99), 2),
            "server_cpus": _round(self.cpu.server, 3),
            "loadgen_cpus": round(self.cpu.loadgen, 3),
            "other_processes_cpus": _round(self.cpu.other, 3),
            "steal_cpus": _round(self.cpu.steal, 3),
            "worker_backlog_at_start": self.backlog_at_start,
            "worker_catch_up_seconds": _round(self.catch_up_seconds, 2),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


async def drive(
    port: int,
    server_pid: int,
    scenario: str,
    concurrency: int,
    warmup: float,
    duration: float,
    messages: Messages,
) -> tuple[Tally, CpuUse]:
    """Run ``concurrency`` sessions for ``warmup + duration`` seconds; returns the tally and the
    CPU use during the measured window."""
    start = time.monotonic()
    tally = Tally(start + warmup, start + warmup + duration)
    session = SESSIONS[scenario]
    tasks = [
        asyncio.create_task(session(port, tally, messages, tally.window_end))
        for _ in range(concurrency)
    ]
    try:
        await asyncio.sleep(max(0.0, tally.window_start - time.monotonic()))
        before = CpuSample.take(server_pid)
        await asyncio.sleep(max(0.0, tally.window_end - time.monotonic()))
        after = CpuSample.take(server_pid)
        async with asyncio.timeout(2 * STEP_TIMEOUT):
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return tally, CpuUse.between(before, after)


# -- Postfix's smtp-source as the load generator ---------------------------------------------

SOURCE_FATAL = re.compile(r"fatal: (.*)")
SOURCE_REJECTED = re.compile(r"(?:(.+?) rejected|rejected at server (banner)): (\d{3})")
SOURCE_STEPS = {
    "sender": "MAIL",
    "recipient": "RCPT",
    "end of data": "message",
    "banner": "greeting",
}


def find_smtp_source() -> str | None:
    found = shutil.which(SMTP_SOURCE)
    if found is None and os.access(SMTP_SOURCE_FALLBACK, os.X_OK):
        found = str(SMTP_SOURCE_FALLBACK)
    return found


@dataclass(frozen=True)
class SmtpSource:
    """Postfix's smtp-source sending copies of the benchmark message from a file (``-F``: the
    asyncio generator's bytes, but one Message-ID for all copies and a blank line smtp-source
    adds at the end) over parallel sessions: a new connection per message, or back to back on
    one connection per session (``-d``). It greets with HELO, stops at the first reply that is
    not 2xx and never shows the text of a ``250``; ``-c`` makes it count the messages it sent."""

    path: str
    message_file: Path

    @classmethod
    def prepare(cls, path: str, directory: Path, messages: Messages) -> SmtpSource:
        # smtp-source dot-stuffs and ends each line with CRLF itself: write plain LF lines.
        payload = messages.prefix + messages.tag + b".smtp-source" + messages.suffix
        payload = payload.removesuffix(b".\r\n")
        payload = re.sub(rb"(?m)^\.\.", b".", payload).replace(b"\r\n", b"\n")
        message_file = directory / "message.eml"
        message_file.write_bytes(payload)
        return cls(path, message_file)

    def command(self, port: int, scenario: str, sessions: int, count: int) -> list[str]:
        options = {
            "-s": str(sessions),
            "-m": str(count),
            "-F": str(self.message_file),
            "-M": CLIENT_NAME,
            "-f": SENDER,
            "-t": SUPPORT,
        }
        argv = [self.path, "-c", *itertools.chain.from_iterable(options.items())]
        if scenario == PERSISTENT:
            argv.append("-d")
        return [*argv, f"{HOST}:{port}"]

    def describe(self, scenario: str, sessions: int, count: int) -> str:
        """The command line as run, with the target's port left out (each target has its own)."""
        return shlex.join(self.command(0, scenario, sessions, count)).replace(
            f"{HOST}:0", f"{HOST}:PORT"
        )

    def drive(
        self, port: int, server_pid: int, scenario: str, sessions: int, count: int
    ) -> tuple[Tally, CpuUse]:
        """One smtp-source run, timed from start to exit; the tally's window is that time."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            before = CpuSample.take(server_pid, children=True)
            process = subprocess.Popen(
                self.command(port, scenario, sessions, count),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            try:
                returncode: int | None = process.wait(SOURCE_TIMEOUT)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            after = CpuSample.take(server_pid, children=True)
            out.seek(0)
            err.seek(0)
            counter = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
        tally = Tally(before.wall, after.wall)
        sent = int(counter.split()[-1]) if counter.split() else 0
        fatal = SOURCE_FATAL.search(stderr)
        if returncode == 0 and fatal is None and sent == count:
            tally.ok_total = tally.ok_window = count
        else:
            # smtp-source counts a message when its body is sent, before the reply: after a
            # failure some of those may have been refused or never answered.
            tally.ok_total = tally.ok_window = sent
            tally.exact = False
            rejected = SOURCE_REJECTED.search(fatal.group(1)) if fatal else None
            if rejected:
                step = rejected.group(1) or rejected.group(2)
                tally.rejected[f"{SOURCE_STEPS.get(step, step)} {rejected.group(3)}"] += 1
            elif fatal:
                tally.errors[f"smtp-source: {fatal.group(1).strip()[:120]}"] += 1
            elif returncode is None:
                tally.errors[f"smtp-source still running after {SOURCE_TIMEOUT:.0f}s"] += 1
            elif returncode != 0:
                tally.errors[f"smtp-source exit {returncode}"] += 1
            else:
                tally.errors[f"smtp-source sent {sent} of {count} messages"] += 1
        return tally, CpuUse.between(before, after)


# -- the two servers --------------------------------------------------------------------------


class SinkHandler:
    """Accepts every message and keeps nothing."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"


async def _serve_sink() -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    handler = SinkHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, ident="bench-sink"), HOST, 0
    )
    port = server.sockets[0].getsockname()[1]
    print(f"sink listening on {HOST}:{port}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the benchmark process dies without cleaning up."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Child:
    """A server process whose output goes to a log file; announces its port in that log."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.port = 0
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={k: v for k, v in os.environ.items() if not k.startswith("MAILPROC_")},
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def wait_listening(self, timeout: float = START_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log_path.read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return self.port
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start listening in {timeout:.0f}s")

    def stop(self, grace: float = STOP_GRACE) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def write_config(directory: Path, nameserver: str) -> tuple[Path, Path]:
    """mailproc's own defaults apart from a free port, a database in ``directory`` and DNS
    answered on loopback (so the workers' lookups never leave the machine)."""
    database = directory / "mailproc.db"
    config = directory / "mailproc.toml"
    config.write_text(
        "[smtp]\n"
        f'listen = "{HOST}:0"\n'
        f'support_addresses = ["{SUPPORT}"]\n'
        "\n[database]\n"
        f'url = "sqlite:///{database}"\n'
        "\n[dns]\n"
        f'nameservers = ["{nameserver}"]\n'
        + os.environ.get("BENCH_EXTRA_CONFIG", "").replace("\\n", "\n")
    )
    return config, database


def _query(database: Path, sql: str) -> list[tuple[Any, ...]]:
    uri = f"file:{database}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as connection:
        return connection.execute(sql).fetchall()


@dataclass(frozen=True)
class WorkerIdle:
    waited: float
    backlog: int


def wait_worker_idle(database: Path, pid: int, timeout: float = IDLE_TIMEOUT) -> WorkerIdle:
    """Wait until mailproc's worker has processed every stored message, or has gone idle with
    messages left waiting for something else (a retry time); returns the wait and what is left.
    Idle means ``pid`` and its worker processes together use almost no CPU."""
    start = time.monotonic()
    quiet = 0
    last_waiting = -1
    while True:
        waiting: int = _query(
            database,
            "SELECT count(*) FROM message WHERE state IN ('received', 'processing')",
        )[0][0]
        if not waiting:
            return WorkerIdle(time.monotonic() - start, 0)
        before = tree_cpu_seconds(pid)
        time.sleep(IDLE_PROBE_SECONDS)
        after = tree_cpu_seconds(pid)
        idle = (
            before is not None
            and after is not None
            and (after - before) / IDLE_PROBE_SECONDS < IDLE_CPUS
        )
        # Several quiet probes in a row with nothing taken meanwhile: one quiet probe may be
        # a worker resting between batches (it gives way to intake after a long batch).
        quiet = quiet + 1 if idle and waiting == last_waiting else 0
        last_waiting = waiting
        if quiet >= IDLE_PROBES:
            return WorkerIdle(time.monotonic() - start, waiting)
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"mailproc's worker still has {waiting} messages after {timeout}s")


# -- orchestration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    concurrency: int


def mailproc_revision() -> str | None:
    """The git commit of the checkout being measured, with ``+dirty`` for local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "mailproc"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity) if affinity is not None else None,
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "aiosmtpd": metadata.version("aiosmtpd"),
        "sqlalchemy": metadata.version("SQLAlchemy"),
    }


@dataclass(frozen=True)
class Load:
    """How the targets are driven: the asyncio generator for a fixed window, or smtp-source
    with a fixed number of messages per scenario (``counts``)."""

    generator: str
    source: SmtpSource | None = None
    counts: dict[str, int] = field(default_factory=dict)


def run_once(
    target: str,
    targets: dict[str, Child],
    scenario: Scenario,
    repeat: int,
    args: argparse.Namespace,
    messages: Messages,
    database: Path,
    load: Load,
) -> Run:
    child, mailproc = targets[target], targets[MAILPROC]
    idle = wait_worker_idle(database, mailproc.pid)
    time.sleep(SETTLE_SECONDS)
    if load.source is None:
        tally, cpu = asyncio.run(
            drive(
                child.port,
                child.pid,
                scenario.name,
                scenario.concurrency,
                args.warmup,
                args.duration,
                messages,
            )
        )
        duration = args.duration
    else:
        count = load.counts[scenario.name]
        tally, cpu = load.source.drive(
            child.port, child.pid, scenario.name, scenario.concurrency, count
        )
        duration = tally.window_end - tally.window_start
    run = Run(target, scenario.name, repeat, scenario.concurrency, duration, tally, cpu)
    if load.source is None:
        shape = (
            f"p50 {run.percentile_ms(0.5) or 0:6.1f} ms  p99 {run.percentile_ms(0.99) or 0:6.1f} ms"
        )
    else:
        shape = f"{tally.ok_total:5d} of {load.counts[scenario.name]} msgs in {duration:5.2f} s"
    run.backlog_at_start = idle.backlog
    if target == MAILPROC:
        run.catch_up_seconds = wait_worker_idle(database, mailproc.pid).waited
    problems = sum(tally.rejected.values()) + sum(tally.errors.values())
    print(
        f"  [{repeat + 1}/{args.repeats}] {scenario.name:<14} {target:<8} "
        f"{run.rate:7.1f} msg/s  {shape}  cpus: server {_cpus(cpu.server)} "
        f"loadgen {_cpus(cpu.loadgen)} other {_cpus(cpu.other)} steal {_cpus(cpu.steal)}"
        + (f"  worker backlog at start {idle.backlog}" if idle.backlog else "")
        + (f"  PROBLEMS {problems}" if problems else ""),
        flush=True,
    )
    return run


def _cpus(value: float | None) -> str:
    return " n/a" if value is None else f"{value:4.2f}"


def durability(database: Path, runs: list[Run]) -> dict[str, Any]:
    """The ``message`` table against the ``250`` replies mailproc gave (for smtp-source, the
    messages it reports sent; not exact after a failed run, so then not compared)."""
    mine = [r for r in runs if r.target == MAILPROC]
    replies = sum(r.tally.ok_total for r in mine)
    exact = all(r.tally.exact for r in mine)
    reply_ids = [i for r in mine for i in r.tally.ids]
    stored_ids = [row[0] for row in _query(database, "SELECT id FROM message")]
    states = dict(_query(database, "SELECT state, count(*) FROM message GROUP BY state"))
    # Only comparable when every 250 named its message ("250 2.0.0 Stored as message N").
    ids_match = sorted(reply_ids) == sorted(stored_ids) if len(reply_ids) == replies else None
    return {
        "replies_250": replies,
        "replies_250_exact": exact,
        "rows_in_message_table": len(stored_ids),
        "rows_match_replies": len(stored_ids) == replies if exact else None,
        "reply_ids_match_rows": ids_match,
        "states": states,
    }


IDS_VERDICT = {
    True: "are exactly the stored ids",
    False: "are NOT the stored ids",
    None: "could not be compared (not every reply named its id)",
}
ROWS_VERDICT = {True: "match", False: "MISMATCH", None: "not comparable"}


def print_table(rows: list[dict[str, Any]]) -> None:
    width = max(len("scenario"), *(len(row["title"]) for row in rows))
    header = (
        f"{'scenario':<{width}}  {'sink msgs/s':>11}  {'mailproc msgs/s':>15}  {'ratio':>5}  "
        f"target (ratio >= {TARGET_RATIO:.2f})"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['title']:<{width}}  {row['sink_msgs_per_s']:>11.1f}  "
            f"{row['mailproc_msgs_per_s']:>15.1f}  {row['ratio']:>5.2f}  "
            f"{'met' if row['target_met'] else 'NOT met'}"
        )


@dataclass
class Measurement:
    runs: list[Run]
    database: Path
    mailproc_exit: int
    sink_exit: int
    mailproc_log: str
    load: Load
    calibration: dict[str, dict[str, Any]]


def size_runs(
    source: SmtpSource, sink: Child, scenarios: list[Scenario], args: argparse.Namespace
) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Messages per smtp-source run for each scenario: ``--messages``, or as many as the sink
    takes in about ``--duration`` seconds, judged from a short run against it."""
    counts: dict[str, int] = {}
    calibration: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        if args.messages:
            counts[scenario.name] = args.messages
            continue
        sample = CALIBRATION_PER_SESSION * scenario.concurrency
        tally, _ = source.drive(sink.port, sink.pid, scenario.name, scenario.concurrency, sample)
        elapsed = tally.window_end - tally.window_start
        rate = tally.ok_total / elapsed if elapsed > 0 else 0.0
        counts[scenario.name] = max(sample, round(rate * args.duration / 100) * 100)
        calibration[scenario.name] = {
            "messages": sample,
            "sink_msgs_per_s": round(rate, 1),
            "non_250_replies": dict(tally.rejected),
            "errors": dict(tally.errors),
        }
    return counts, calibration


def measure(
    args: argparse.Namespace, workdir: Path, scenarios: list[Scenario], messages: Messages
) -> Measurement:
    """Start both servers, run every scenario against each in alternating order, stop them."""
    dns = ZoneServer(ttl=3600, negative_ttl=3600).start()
    for domain in ("example.org", "example.com", "example.net"):
        dns.add_txt(domain, "v=spf1 ip4:127.0.0.0/8 -all")
    config, database = write_config(workdir, dns.address)
    python = sys.executable
    children: list[Child] = []
    try:
        mailproc = Child(
            MAILPROC,
            [python, "-m", "mailproc", "--config", str(config), "serve"],
            workdir / "mailproc.log",
        )
        children.append(mailproc)
        sink = Child(SINK, [python, "-m", "bench.intake", "--sink"], workdir / "sink.log")
        children.append(sink)
        mailproc.wait_listening()
        sink.wait_listening()
        print(f"mailproc on port {mailproc.port} (database {database}), sink on port {sink.port}")
        targets = {SINK: sink, MAILPROC: mailproc}
        load = Load(ASYNCIO)
        calibration: dict[str, dict[str, Any]] = {}
        if args.load_generator == SMTP_SOURCE:
            source = SmtpSource.prepare(args.smtp_source, workdir, messages)
            counts, calibration = size_runs(source, sink, scenarios, args)
            load = Load(SMTP_SOURCE, source, counts)
            print(
                f"smtp-source ({source.path}): "
                + ", ".join(f"{count} messages per {name} run" for name, count in counts.items())
                + (
                    f" (the sink's rate in a short run times {args.duration:g}s)"
                    if calibration
                    else ""
                ),
                flush=True,
            )
        runs: list[Run] = []
        for repeat in range(args.repeats):
            for index, scenario in enumerate(scenarios):
                order = [SINK, MAILPROC] if (repeat + index) % 2 == 0 else [MAILPROC, SINK]
                for target in order:
                    runs.append(
                        run_once(target, targets, scenario, repeat, args, messages, database, load)
                    )
        sink_exit = sink.stop()
        mailproc_exit = mailproc.stop()
        mailproc_log = mailproc.log_path.read_text(errors="replace")
    finally:
        for child in children:
            child.stop(grace=5.0)
        dns.stop()
    return Measurement(runs, database, mailproc_exit, sink_exit, mailproc_log, load, calibration)


def summarize(scenarios: list[Scenario], runs: list[Run]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for scenario in scenarios:
        mine = [r for r in runs if r.scenario == scenario.name]
        sink_rates = [r.rate for r in mine if r.target == SINK]
        mailproc_rates = [r.rate for r in mine if r.target == MAILPROC]
        sink_median = statistics.median(sink_rates)
        mailproc_median = statistics.median(mailproc_rates)
        ratio = mailproc_median / sink_median if sink_median else 0.0
        rows.append(
            {
                "scenario": scenario.name,
                "title": scenario.title,
                "concurrency": scenario.concurrency,
                "sink_msgs_per_s": round(sink_median, 1),
                "mailproc_msgs_per_s": round(mailproc_median, 1),
                "ratio": round(ratio, 3),
                "ratio_per_repeat": [
                    round(m / s, 3) if s else None
                    for s, m in zip(sink_rates, mailproc_rates, strict=True)
                ],
                "target_ratio": TARGET_RATIO,
                "target_met": ratio >= TARGET_RATIO,
                "runs": [r.summary() for r in mine],
            }
        )
    return rows


LOAD_GENERATORS = {
    ASYNCIO: "asyncio streams, lock-step SMTP (no pipelining), EHLO, fixed measured window",
    SMTP_SOURCE: "Postfix smtp-source (no pipelining), HELO, fixed message count timed from "
    "start to exit",
}


def benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One whole benchmark; prints the table, writes ``args.output`` and returns the results."""
    scenarios = [
        Scenario(
            PER_CONNECTION, f"one message per connection ({args.clients} clients)", args.clients
        ),
        Scenario(PERSISTENT, f"{args.sessions} persistent sessions", args.sessions),
    ]
    messages = Messages()
    revision = mailproc_revision()
    load_before = os.getloadavg()
    timing = (
        f"warm-up {args.warmup:g}s, measured {args.duration:g}s"
        if args.load_generator == ASYNCIO
        else f"runs of about {args.duration:g}s"
    )
    print(
        f"intake benchmark ({args.load_generator}): {messages.size}-byte message, {timing}, "
        f"{args.repeats} repeats per target and scenario (load average {load_before[0]:.2f})",
        flush=True,
    )
    measurement = measure(args, workdir, scenarios, messages)
    runs = measurement.runs
    load = measurement.load
    checked = durability(measurement.database, runs)
    checked["mailproc_exit_code"] = measurement.mailproc_exit
    checked["mailproc_log_errors"] = len(
        re.findall(r" (?:ERROR|CRITICAL) ", measurement.mailproc_log)
    )
    checked["mailproc_log_warnings"] = len(re.findall(r" WARNING ", measurement.mailproc_log))
    rows = summarize(scenarios, runs)
    calibrations = measurement.calibration.values()
    rejected = sum(sum(r.tally.rejected.values()) for r in runs) + sum(
        sum(c["non_250_replies"].values()) for c in calibrations
    )
    errors = sum(sum(r.tally.errors.values()) for r in runs) + sum(
        sum(c["errors"].values()) for c in calibrations
    )
    others = [r.cpu.other for r in runs if r.cpu.other is not None]
    other_cpus = statistics.median(others) if others else None
    steals = [r.cpu.steal for r in runs if r.cpu.steal is not None]
    steal_cpus = statistics.median(steals) if steals else None
    valid = (
        rejected == 0
        and errors == 0
        and checked["rows_match_replies"]
        and checked["reply_ids_match_rows"] is not False
        and measurement.mailproc_exit == 0
    )

    print()
    print_table(rows)
    print()
    print(
        f"non-250 replies: {rejected}   errors: {errors}   "
        f"mailproc exit code: {measurement.mailproc_exit}   "
        f"sink exit code: {measurement.sink_exit}"
    )
    if load.generator == ASYNCIO:
        accepted = f"{checked['replies_250']} 250 replies from mailproc"
        ids = f"the ids in the replies {IDS_VERDICT[checked['reply_ids_match_rows']]}"
    else:
        accepted = f"{checked['replies_250']} messages mailproc accepted by smtp-source's count" + (
            "" if checked["replies_250_exact"] else " (not exact: a run failed)"
        )
        ids = "ids not checked (smtp-source does not show the text of a 250)"
    print(
        f"durability: {checked['rows_in_message_table']} rows in the message table, "
        f"{accepted}: {ROWS_VERDICT[checked['rows_match_replies']]}; {ids}; "
        f"{checked['mailproc_log_errors']} error lines in mailproc's log"
    )
    if (other_cpus or 0.0) > NOISY_CPUS or (steal_cpus or 0.0) > NOISY_CPUS:
        print(
            f"warning: other processes kept {other_cpus or 0.0:.2f} CPUs busy and the hypervisor "
            f"took {steal_cpus or 0.0:.2f} CPUs during the runs (medians); the figures are noisy"
        )

    results: dict[str, Any] = {
        "benchmark": "bench.intake",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mailproc_revision": revision,
        "machine": machine_info(),
        "noise": {
            "load_average_before": [round(v, 2) for v in load_before],
            "other_processes_cpus_median": _round(other_cpus, 3),
            "steal_cpus_median": _round(steal_cpus, 3),
        },
        "parameters": {
            "clients": args.clients,
            "sessions": args.sessions,
            "warmup_seconds": args.warmup,
            "measured_seconds": args.duration,
            "repeats": args.repeats,
            "message_bytes": messages.size,
            "load_generator": load.generator,
            "load_generator_detail": LOAD_GENERATORS[load.generator],
            "mailproc_settings": "defaults (SQLite WAL, synchronous=FULL, logging info)",
        },
        "scenarios": rows,
        "non_250_replies": rejected,
        "errors": errors,
        "durability": checked,
        "valid": valid,
    }
    if load.source is not None:
        results["parameters"]["smtp_source"] = {
            "path": load.source.path,
            "messages_per_run": load.counts,
            "calibration": measurement.calibration or None,
            "command_lines": {
                scenario.name: load.source.describe(
                    scenario.name, scenario.concurrency, load.counts[scenario.name]
                )
                for scenario in scenarios
            },
        }
    output = Path(args.output)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {output}")
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.intake", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--clients", type=int, default=20, help="clients, one message each")
    parser.add_argument("--sessions", type=int, default=20, help="persistent sessions")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per target and scenario")
    parser.add_argument(
        "--load-generator",
        choices=[AUTO, SMTP_SOURCE, ASYNCIO],
        default=AUTO,
        help="auto: Postfix's smtp-source when on PATH or in /usr/sbin, else asyncio",
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=0,
        help="messages per smtp-source run (default: about --duration seconds' worth)",
    )
    parser.add_argument("--output", default=str(OUTPUT), help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.clients, args.sessions, args.repeats) < 1 or args.duration <= 0:
        parser.error("--clients, --sessions and --repeats must be >= 1, --duration > 0")
    if args.messages < 0:
        parser.error("--messages must be >= 0")
    args.smtp_source = find_smtp_source() if args.load_generator != ASYNCIO else None
    if args.load_generator == AUTO:
        args.load_generator = ASYNCIO if args.smtp_source is None else SMTP_SOURCE
    elif args.load_generator == SMTP_SOURCE and args.smtp_source is None:
        parser.error(
            f"smtp-source is neither on PATH nor at {SMTP_SOURCE_FALLBACK}; install Postfix "
            "(it ships smtp-source) or use --load-generator asyncio"
        )
    return args


def exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM handler of every benchmark: unwind, so servers are stopped and files removed."""
    raise SystemExit(128 + signum)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """The whole benchmark in this process, for a combined runner: ``argv`` as on the command
    line (``None`` means the defaults, not ``sys.argv``); returns what it writes to
    ``--output``. Bad arguments raise ``SystemExit`` (argparse)."""
    args = parse_args([] if argv is None else argv)
    if args.sink:
        raise ValueError("--sink serves the sink; it is not a benchmark run")
    return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="mailproc-bench-"))
    try:
        return benchmark(args, workdir)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sink:
        asyncio.run(_serve_sink())
        return 0
    signal.signal(signal.SIGTERM, exit_on_signal)
    return 0 if _run(args)["valid"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
