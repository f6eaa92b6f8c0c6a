"""End to end: from the ``250`` a client received to the decision stored in the database, through
a real ``mailproc serve`` (SQLite, its worker processes, built-in defaults) with DKIM keys and
SPF records on a DNS server on loopback (warm cache).

Three parts, each printing a table:

1. **end to end**: a stream at a fixed offered rate mixing DKIM-signed reset requests from the
   registered address with spoofs (unsigned, signed with the wrong key, signed for another
   domain); the latency from each ``250`` to its decision becoming visible in the database,
   and the evaluation rate. Then a burst taken as fast as intake takes it, the rate at which
   the workers decide it, beside a bare ``dkim.verify`` loop over the same messages with as
   many processes as mailproc has workers.
2. **scaling**: the same stream with 1,000, 10,000 and 100,000 messages already stored.
3. **memory**: the peak RSS of serve and its worker processes with 200 SMTP sessions open,
   each sending a message.

Every signed request must be decided authenticated, every spoof not, and every ``250`` must
reach a decision: otherwise the command exits 1. A target not met is reported only.

Usage: ``python -m bench.endtoend [--rate 50] [--duration 20] [--quick]``; ``run(args)``
returns the results for a combined runner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import dkim

from bench.console import fill
from bench.intake import (
    HOST,
    SESSION_ERRORS,
    STEP_TIMEOUT,
    SUPPORT,
    Child,
    Client,
    Rejected,
    exit_on_signal,
    machine_cpu_seconds,
    machine_info,
    mailproc_revision,
    process_cpu_seconds,
)
from mailproc import db
from mailproc.config import load_settings
from mailproc.requests import GENESIS, _event_fields, _event_hash
from mailproc.worker import INTAKE_ACTIVE_SECONDS
from tests.dkimkeys import DkimKey, build_message, publish, rsa_key, sign
from tests.dnsserver import ZoneServer

RESULTS = Path(__file__).resolve().parent / "endtoend.json"
ALICE = "alice@example.org"  # the registered address
ACCOUNT_ID = "42"
SUBJECT = "Reset my security question"
TARGET_EVALUATION_RATIO = 0.70
TARGET_P99_MS = 250.0
TARGET_RSS_MB = 200.0
DECIDED = ("processed", "failed")
DECIDE_TIMEOUT = 180.0  # at most this long for a phase's messages to be decided
STALL_TIMEOUT = 45.0  # ... and never this long without one more decided
SETTLE_SECONDS = 1.0
RSS_SAMPLE_SECONDS = 0.01
NOISY_CPUS = 0.10
RETENTION_DAYS = load_settings(None, env={}).retention.raw_message_days
MIN_DRAIN_MESSAGES = 100  # fewer left after a burst: the drain rate is not reported

SIGNED = "signed"
UNSIGNED = "unsigned"
WRONG_KEY = "wrong key"
OTHER_DOMAIN = "other domain"
SPOOFS = (UNSIGNED, WRONG_KEY, OTHER_DOMAIN)

_BODY = (
    "Hello support team,\n\nI can no longer sign in to my account because I do not remember the "
    "answer to my\nsecurity question. Could you please reset it so that I can choose a new one?"
    "\n\nI am writing from the address registered on the account.\n\nKind regards,\nAlice\n"
)


# -- the mail -------------------------------------------------------------------------------


class Corpus:
    """Reset requests in the registered owner's name: correctly signed ones, and spoofs that
    must not be authenticated (no signature; a signature by a key that is not the published
    one; a valid signature of another domain, which does not align with From).

    The loopback address the load comes from is outside example.org's SPF record, so SPF
    fails for all of them and DKIM alone decides, as for mail relayed by a third party."""

    def __init__(self, signed_share: float) -> None:
        self.signed_share = signed_share
        self.key = rsa_key(2048, selector="s2048")
        # Same selector and domain as the published key, another private key.
        self.forger = dataclasses.replace(rsa_key(2048), selector="s2048")
        self.other = rsa_key(2048, selector="s2048", domain="example.net")
        self.records = {f"{key.dns_name}.": key.record.encode() for key in (self.key, self.other)}
        self._spoofs = 0

    def publish(self, server: ZoneServer) -> None:
        for key in (self.key, self.other):
            publish(server, key)
        for domain in ("example.org", "example.net"):
            server.add_txt(domain, "v=spf1 ip4:192.0.2.0/24 -all")
            server.add_txt(f"_dmarc.{domain}", "v=DMARC1; p=reject")

    def message(self, kind: str) -> bytes:
        raw = build_message(from_header=f"Alice <{ALICE}>", subject=SUBJECT, body=_BODY)
        signer: DkimKey | None = {
            SIGNED: self.key,
            WRONG_KEY: self.forger,
            OTHER_DOMAIN: self.other,
        }.get(kind)
        return raw if signer is None else sign(raw, signer)

    def batch(self, count: int) -> list[Mail]:
        """``count`` messages, ``signed_share`` of them signed, spread evenly; the spoofs take
        turns among the three kinds."""
        mails = []
        for n in range(count):
            signed = int((n + 1) * self.signed_share) > int(n * self.signed_share)
            if signed:
                kind = SIGNED
            else:
                kind = SPOOFS[self._spoofs % len(SPOOFS)]
                self._spoofs += 1
            mails.append(Mail(kind, self.message(kind)))
        return mails


@dataclass
class Mail:
    """One message, and what became of it."""

    kind: str
    raw: bytes
    message_id: int | None = None
    started: float | None = None  # time.monotonic() when MAIL FROM was sent
    accepted: float | None = None  # time.monotonic() when the 250 arrived
    accepted_wall: float | None = None  # time.time() at the same moment
    error: str | None = None

    @property
    def payload(self) -> bytes:
        """The DATA payload: dot-stuffed, with the final ``.`` line."""
        return re.sub(rb"(?m)^\.", b"..", self.raw) + b".\r\n"

    def stored(self, reply: bytes) -> None:
        self.accepted = time.monotonic()
        self.accepted_wall = time.time()
        last = reply.rsplit(b" ", 1)[-1]
        self.message_id = int(last) if last.isdigit() else None
        if self.message_id is None:
            self.error = "250 without a message id"

    def failed(self, exc: BaseException) -> None:
        self.error = f"{exc.step} {exc.code}" if isinstance(exc, Rejected) else type(exc).__name__


# -- load -----------------------------------------------------------------------------------


async def deliver(port: int, mail: Mail) -> None:
    """One message on its own connection, as an MX hands a message on."""
    client: Client | None = None
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            client = await Client.connect(port)
            mail.started = time.monotonic()
            mail.stored(await client.send(mail.payload))
            await client.quit()
    except (Rejected, *SESSION_ERRORS) as exc:
        mail.failed(exc)
    finally:
        if client is not None:
            client.close()


async def paced(port: int, mails: Sequence[Mail], rate: float) -> None:
    """Open loop: message n starts at n / rate seconds, whatever became of the ones before."""
    start = time.monotonic()
    tasks = []
    for n, mail in enumerate(mails):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(deliver(port, mail)))
    await asyncio.gather(*tasks)


async def burst(port: int, mails: Sequence[Mail], sessions: int) -> None:
    """``sessions`` persistent sessions sending the messages back to back, as fast as intake
    answers."""
    queue = iter(mails)

    async def session() -> None:
        client: Client | None = None
        try:
            for mail in queue:
                try:
                    async with asyncio.timeout(STEP_TIMEOUT):
                        if client is None:
                            client = await Client.connect(port)
                        mail.stored(await client.send(mail.payload))
                except (Rejected, *SESSION_ERRORS) as exc:
                    mail.failed(exc)
                    if client is not None:
                        client.close()
                    client = None
            if client is not None:
                with contextlib.suppress(Rejected, *SESSION_ERRORS):
                    async with asyncio.timeout(STEP_TIMEOUT):
                        await client.quit()
        finally:
            if client is not None:
                client.close()

    await asyncio.gather(*(session() for _ in range(sessions)))


async def held_sessions(port: int, mails: Sequence[Mail]) -> int:
    """Open one session per message and keep them all open; once every one is open, each sends
    its message; then all quit. Returns how many were open at once."""

    async def connect(mail: Mail) -> Client | None:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                return await Client.connect(port)
        except (Rejected, *SESSION_ERRORS) as exc:
            mail.failed(exc)
            return None

    clients = await asyncio.gather(*(connect(mail) for mail in mails))
    opened = sum(client is not None for client in clients)

    async def send(client: Client | None, mail: Mail) -> None:
        if client is None:
            return
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                mail.stored(await client.send(mail.payload))
        except (Rejected, *SESSION_ERRORS) as exc:
            mail.failed(exc)

    async def quit_(client: Client | None) -> None:
        if client is None:
            return
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                await client.quit()
        except (Rejected, *SESSION_ERRORS):
            client.close()

    try:
        await asyncio.gather(*(send(c, m) for c, m in zip(clients, mails, strict=True)))
        await asyncio.gather(*(quit_(c) for c in clients))
    finally:
        for client in clients:
            if client is not None:
                client.close()
    return opened


# -- watching the database ------------------------------------------------------------------


@dataclass(frozen=True)
class Decided:
    seen: float  # time.monotonic() of the poll that first saw the stored decision
    state: str
    authenticated: bool | None
    strength: str | None
    rule: str | None
    action: str | None
    processed_at: float | None  # epoch seconds: when the worker began evaluating it
    updated_at: float | None  # epoch seconds: when the worker began writing its result


def _epoch(value: str | None) -> float | None:
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()


class Watcher(threading.Thread):
    """Polls the message table (read-only, its own connection) every ``interval`` seconds and
    notes when each message's decision first became visible, i.e. committed.

    mailproc stores ``processed_at`` when the worker *begins* evaluating a message and
    ``updated_at`` when it begins writing the result; neither is the commit, after which the
    decision exists for anyone else. So the end of the latency is this poll's clock: it lags
    the commit by at most one interval plus a query. Both timestamps are kept for the
    breakdown (microsecond resolution, CLOCK_REALTIME like this process's ``time.time()``)."""

    QUERY = (
        "SELECT id, state, authenticated, auth_strength, json_extract(decision, '$.rule'), "
        "json_extract(decision, '$.action'), processed_at, updated_at FROM message "
        "WHERE state IN ('processed', 'failed') AND id >= ?"
    )

    def __init__(self, database: Path, after_id: int, interval: float) -> None:
        super().__init__(name="decision-watcher", daemon=True)
        self.database = database
        self.interval = interval
        self.seen: dict[int, Decided] = {}
        self.polls = 0
        self._low = after_id + 1  # every id below this one has been seen
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None

    def run(self) -> None:
        uri = f"file:{self.database}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as connection:
                while not self._stopping.is_set():
                    self._poll(connection)
                    self._stopping.wait(self.interval)
        except BaseException as exc:
            self.error = exc
            raise

    def _poll(self, connection: sqlite3.Connection) -> None:
        rows = connection.execute(self.QUERY, (self._low,)).fetchall()
        now = time.monotonic()
        with self._lock:
            self.polls += 1
            for row in rows:
                if row[0] in self.seen:
                    continue
                self.seen[row[0]] = Decided(
                    now,
                    row[1],
                    None if row[2] is None else bool(row[2]),
                    row[3],
                    row[4],
                    row[5],
                    _epoch(row[6]),
                    _epoch(row[7]),
                )
            while self._low in self.seen:
                self._low += 1

    def decided(self, ids: Sequence[int]) -> int:
        with self._lock:
            return sum(i in self.seen for i in ids)

    def wait(self, ids: Sequence[int], timeout: float = DECIDE_TIMEOUT) -> bool:
        """Wait until every id is decided; False when that took too long or stalled."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            done = self.decided(ids)
            if done == len(ids):
                return True
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                return False
            if self.error is not None:
                raise RuntimeError(f"the watcher failed: {self.error}")
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self._stopping.set()
        self.join()


# -- processes ------------------------------------------------------------------------------


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def status_kb(pid: int, name: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM); 0 if the process is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return 0


def pss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return ""


class RssSampler(threading.Thread):
    """Sums VmRSS over a process tree every few milliseconds; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.peak_kb = 0
        self.peak_by_process: dict[str, int] = {}
        self.max_by_pid: Counter[int] = Counter()
        self.samples = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            rss = {pid: status_kb(pid, "VmRSS") for pid in tree_pids(self.pid)}
            total = sum(rss.values())
            self.samples += 1
            for pid, kb in rss.items():
                self.max_by_pid[pid] = max(self.max_by_pid[pid], kb)
            if total > self.peak_kb:
                self.peak_kb = total
                self.peak_by_process = {role(self.pid, pid): kb for pid, kb in rss.items()}
            self._stopping.wait(RSS_SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def role(root: int, pid: int) -> str:
    if pid == root:
        return f"serve ({pid})"
    line = cmdline(pid)
    if "spawn_main" in line:
        return f"worker ({pid})"
    if "resource_tracker" in line:
        return f"multiprocessing resource tracker ({pid})"
    return f"other ({pid})"


def worker_pids(root: int) -> list[int]:
    return [pid for pid in tree_pids(root) if pid != root and "spawn_main" in cmdline(pid)]


def cpu_of(pids: Sequence[int]) -> float:
    return sum(process_cpu_seconds(pid) or 0.0 for pid in pids)


def write_config(
    directory: Path, nameserver: str, relay_port: int, accounts: Path, max_sessions: int | None
) -> tuple[Path, Path]:
    """mailproc's defaults apart from: a free loopback port (SMTP and console), a database in
    ``directory``, DNS answered on loopback, the registered accounts from a CSV file, replies
    relayed to a sink, and (for the memory part) room for the sessions held open."""
    database = directory / "mailproc.db"
    config = directory / "mailproc.toml"
    smtp_extra = "" if max_sessions is None else f"max_sessions = {max_sessions}\n"
    config.write_text(
        "[smtp]\n"
        f'listen = "{HOST}:0"\n'
        f'support_addresses = ["{SUPPORT}"]\n'
        f"{smtp_extra}"
        "\n[database]\n"
        f'url = "sqlite:///{database}"\n'
        "\n[dns]\n"
        f'nameservers = ["{nameserver}"]\n'
        "\n[accounts]\n"
        f'csv_file = "{accounts}"\n'
        "\n[outbound]\n"
        f'relay = "{HOST}:{relay_port}"\n'
        "\n[web]\n"
        f'listen = "{HOST}:0"\n' + os.environ.get("BENCH_EXTRA_CONFIG", "").replace("\\n", "\n")
    )
    return config, database


def max_id(database: Path) -> int:
    if not database.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        try:
            value = connection.execute("SELECT max(id) FROM message").fetchone()[0]
        except sqlite3.OperationalError:  # not migrated yet
            return 0
    return int(value or 0)


class Instance:
    """One ``mailproc serve`` child process on its own database, with a watcher on it."""

    def __init__(
        self,
        directory: Path,
        dns: ZoneServer,
        relay_port: int,
        accounts: Path,
        poll_interval: float,
        max_sessions: int | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.config, self.database = write_config(
            directory, dns.address, relay_port, accounts, max_sessions
        )
        self.settings = load_settings(self.config, env={})
        self.child = Child(
            "mailproc",
            [sys.executable, "-m", "mailproc", "--config", str(self.config), "serve"],
            directory / "mailproc.log",
        )
        self.watcher: Watcher | None = None
        self.exit_code: int | None = None
        self._poll_interval = poll_interval

    def __enter__(self) -> Self:
        try:
            self.child.wait_listening()
            self.watcher = Watcher(self.database, max_id(self.database), self._poll_interval)
            self.watcher.start()
        except BaseException:
            self.child.stop(grace=5.0)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.exit_code = self.child.stop(grace=45.0 if exc is None else 5.0)

    @property
    def port(self) -> int:
        return self.child.port

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def workers(self) -> int:
        return self.settings.worker.processes

    @property
    def watch(self) -> Watcher:
        assert self.watcher is not None
        return self.watcher

    def log_counts(self) -> dict[str, int]:
        text = self.child.log_path.read_text(errors="replace")
        return {
            "errors": len(re.findall(r" (?:ERROR|CRITICAL) ", text)),
            "warnings": len(re.findall(r" WARNING ", text)),
        }


# -- figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    return {
        "p50_ms": _ms(percentile(values, 0.50)),
        "p95_ms": _ms(percentile(values, 0.95)),
        "p99_ms": _ms(percentile(values, 0.99)),
        "max_ms": _ms(max(values) if values else None),
    }


@dataclass
class Outcome:
    """Whether every message was stored, decided, and decided right."""

    sent: int = 0
    accepted: int = 0
    not_accepted: Counter[str] = field(default_factory=Counter)
    undecided: Counter[str] = field(default_factory=Counter)  # by the state it was left in
    wrong: list[str] = field(default_factory=list)
    by_kind: Counter[str] = field(default_factory=Counter)
    rules: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.not_accepted and not self.undecided and not self.wrong

    def add(self, other: Outcome) -> None:
        self.sent += other.sent
        self.accepted += other.accepted
        self.not_accepted.update(other.not_accepted)
        self.undecided.update(other.undecided)
        self.wrong.extend(other.wrong)
        self.by_kind.update(other.by_kind)
        self.rules.update(other.rules)

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "accepted_250": self.accepted,
            "not_accepted": dict(self.not_accepted),
            "not_decided_by_state": dict(self.undecided),
            "wrong_decisions": len(self.wrong),
            "wrong_examples": self.wrong[:10],
            "by_kind": dict(self.by_kind),
            "rules": dict(self.rules),
            "ok": self.ok,
        }


def judge(mails: Sequence[Mail], instance: Instance) -> Outcome:
    """Every message accepted, decided, signed ones authenticated (strong) and no spoof."""
    outcome = Outcome(sent=len(mails))
    seen = instance.watch.seen
    missing = []
    for mail in mails:
        outcome.by_kind[mail.kind] += 1
        if mail.message_id is None:
            outcome.not_accepted[mail.error or "no reply"] += 1
            continue
        outcome.accepted += 1
        decided = seen.get(mail.message_id)
        if decided is None:
            missing.append(mail.message_id)
            continue
        outcome.rules[decided.rule or decided.state] += 1
        if mail.kind == SIGNED:
            right = (
                decided.state == "processed"
                and decided.authenticated is True
                and decided.strength == "strong"
                and decided.action == "queue_reset"
            )
        else:
            right = (
                decided.state == "processed"
                and decided.authenticated is False
                and decided.action != "queue_reset"
            )
        if not right:
            outcome.wrong.append(
                f"message {mail.message_id} ({mail.kind}): {decided.state}, authenticated "
                f"{decided.authenticated}, {decided.strength}, rule {decided.rule}"
            )
    if missing:
        marks = ",".join("?" * len(missing))
        uri = f"file:{instance.database}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as connection:
            rows = connection.execute(
                f"SELECT id, state FROM message WHERE id IN ({marks})",
                missing,
            ).fetchall()
        states = dict(rows)
        for message_id in missing:
            outcome.undecided[states.get(message_id, "not stored")] += 1
    return outcome


def latencies(mails: Sequence[Mail], watcher: Watcher) -> dict[str, list[float]]:
    """Seconds from each 250 to: evaluation begun (DB), result write begun (DB), decision seen
    committed (poll)."""
    figures: dict[str, list[float]] = {
        "visible": [],
        "evaluation_began": [],
        "write_began": [],
        "smtp_transaction": [
            m.accepted - m.started for m in mails if m.accepted is not None and m.started
        ],
    }
    for mail in mails:
        if mail.message_id is None or mail.accepted is None or mail.accepted_wall is None:
            continue
        decided = watcher.seen.get(mail.message_id)
        if decided is None:
            continue
        figures["visible"].append(decided.seen - mail.accepted)
        if decided.processed_at is not None:
            figures["evaluation_began"].append(decided.processed_at - mail.accepted_wall)
        if decided.updated_at is not None:
            figures["write_began"].append(decided.updated_at - mail.accepted_wall)
    return figures


def warm_up(instance: Instance, corpus: Corpus, count: int, rate: float) -> None:
    """Fill the workers' DNS caches and open the owner's request; wait until all is decided."""
    mails = corpus.batch(count)
    asyncio.run(paced(instance.port, mails, rate))
    ids = [m.message_id for m in mails if m.message_id is not None]
    if len(ids) != len(mails) or not instance.watch.wait(ids):
        raise RuntimeError(f"warm-up failed: {judge(mails, instance).summary()}")
    time.sleep(SETTLE_SECONDS)


class CpuWindow:
    """CPUs kept busy between ``__init__`` and ``end()`` (1.0 is one core): by mailproc's
    process tree, by this benchmark process, by anything else on the machine, and taken by the
    hypervisor (steal). Another program busy on the machine makes every figure noisy."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.wall = time.monotonic()
        self.mailproc = cpu_of(self.pids)
        self.own = time.process_time()
        self.machine = machine_cpu_seconds()

    def end(self) -> dict[str, float | None]:
        wall = time.monotonic() - self.wall
        mailproc = (cpu_of(self.pids) - self.mailproc) / wall
        own = (time.process_time() - self.own) / wall
        machine = machine_cpu_seconds()
        other = steal = None
        if machine is not None and self.machine is not None:
            busy = (machine[0] - self.machine[0]) / wall
            other = max(0.0, busy - mailproc - own)
            steal = (machine[1] - self.machine[1]) / wall
        return {
            "mailproc_cpus": round(mailproc, 2),
            "benchmark_cpus": round(own, 2),
            "other_processes_cpus": _round(other, 2),
            "steal_cpus": _round(steal, 2),
        }


def stream(instance: Instance, corpus: Corpus, rate: float, duration: float) -> dict[str, Any]:
    """The sustained stream at ``rate`` for ``duration`` seconds."""
    mails = corpus.batch(max(1, round(rate * duration)))
    cpu = CpuWindow(tree_pids(instance.pid))
    asyncio.run(paced(instance.port, mails, rate))
    ids = [m.message_id for m in mails if m.message_id is not None]
    instance.watch.wait(ids)
    cpus = cpu.end()
    outcome = judge(mails, instance)
    figures = latencies(mails, instance.watch)
    accepted = [m.accepted for m in mails if m.accepted is not None]
    seen = [instance.watch.seen[i].seen for i in ids if i in instance.watch.seen]
    evaluated = len(seen) / (max(seen) - min(accepted)) if seen and accepted else 0.0
    offered = (len(accepted) - 1) / (max(accepted) - min(accepted)) if len(accepted) > 1 else 0.0
    return {
        "offered_msgs_per_s": rate,
        "achieved_offered_msgs_per_s": round(offered, 1),
        "duration_s": duration,
        "messages": len(mails),
        "evaluated_msgs_per_s": round(evaluated, 1),
        # Not yet decided when the last 250 arrived: 0 or a few when the workers keep up.
        "backlog_when_sending_ended": sum(t > max(accepted) for t in seen) if accepted else 0,
        "latency_250_to_decision_visible": spread(figures["visible"]),
        "latency_250_to_evaluation_began_db": spread(figures["evaluation_began"]),
        "latency_250_to_result_write_began_db": spread(figures["write_began"]),
        "latency_mail_from_to_250": spread(figures["smtp_transaction"]),
        **cpus,
        "correctness": outcome.summary(),
        "_outcome": outcome,
    }


def drain_rate(
    seen_times: list[float], intake_idle: float
) -> tuple[float | None, int, float | None]:
    """Decisions per second once intake was idle: from the first batch that became visible
    after ``intake_idle`` to the last (both batch boundaries, so whole batches are counted)."""
    after = sorted(t for t in seen_times if t > intake_idle)
    if len(after) < MIN_DRAIN_MESSAGES:
        return None, len(after), None
    first = after[0]
    counted = [t for t in after if t > first]
    span = after[-1] - first
    return (len(counted) / span if span > 0 else None), len(counted), span


def burst_part(instance: Instance, corpus: Corpus, count: int, sessions: int) -> dict[str, Any]:
    mails = corpus.batch(count)
    workers = worker_pids(instance.pid)
    started = time.monotonic()
    asyncio.run(burst(instance.port, mails, sessions))
    accepted = [m.accepted for m in mails if m.accepted is not None]
    intake_end = max(accepted) if accepted else time.monotonic()
    intake_idle = intake_end + INTAKE_ACTIVE_SECONDS
    # Worker CPU from the moment the workers stop giving way to intake.
    time.sleep(max(0.0, intake_idle - time.monotonic()))
    left = len(accepted) - instance.watch.decided([m.message_id for m in mails if m.message_id])
    worker_cpu_before = cpu_of(workers)
    drain_cpu = CpuWindow(tree_pids(instance.pid))
    ids = [m.message_id for m in mails if m.message_id is not None]
    instance.watch.wait(ids)
    worker_cpu = cpu_of(workers) - worker_cpu_before
    drain_cpus = drain_cpu.end()
    outcome = judge(mails, instance)
    seen = [instance.watch.seen[i].seen for i in ids if i in instance.watch.seen]
    overall = len(seen) / (max(seen) - started) if seen else 0.0
    drain, counted, span = drain_rate(seen, intake_idle)
    return {
        "messages": count,
        "sessions": sessions,
        "intake_msgs_per_s": round(len(accepted) / (intake_end - started), 1),
        "intake_seconds": round(intake_end - started, 2),
        "left_when_intake_went_idle": left,
        "evaluated_overall_msgs_per_s": round(overall, 1),
        "evaluated_after_intake_idle_msgs_per_s": _round(drain),
        "drain_messages_counted": counted,
        "drain_seconds": _round(span, 2),
        "worker_cpu_seconds_during_drain": round(worker_cpu, 2),
        "decided_per_worker_cpu_second": _round(left / worker_cpu if worker_cpu else None),
        "drain": drain_cpus,
        "correctness": outcome.summary(),
        "_outcome": outcome,
        "_mails": mails,
    }


def _verify_all(raws: Sequence[bytes], records: dict[str, bytes]) -> int:
    def txt(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode())

    return sum(bool(dkim.verify(raw, dnsfunc=txt)) for raw in raws)


def bare_dkim(
    raws: Sequence[bytes], records: dict[str, bytes], processes: int, seconds: float
) -> dict[str, Any]:
    """``dkim.verify`` over the messages, keys from a dict (no DNS at all), in ``processes``
    processes (one: in this one), repeated for at least ``seconds``."""
    done = passes = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    if processes <= 1:
        while passes == 0 or time.perf_counter() - start < seconds:
            verified = _verify_all(raws, records)
            done += len(raws)
            passes += 1
    else:
        size = max(1, len(raws) // (processes * 4))
        chunks = [raws[i : i + size] for i in range(0, len(raws), size)]
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(_verify_all, chunks[:processes], [records] * processes))  # start up
            start = time.perf_counter()
            while passes == 0 or time.perf_counter() - start < seconds:
                verified = sum(pool.map(_verify_all, chunks, [records] * len(chunks)))
                done += len(raws)
                passes += 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start if processes <= 1 else None
    return {
        "msgs_per_s": round(done / elapsed, 1),
        # Counts only this process's CPU, so only for the loop run here.
        "msgs_per_cpu_second": _round(done / cpu if cpu else None),
        "processes": processes,
        "messages": len(raws),
        "passes": passes,
        "verified_per_pass": verified,
    }


def memory_part(instance: Instance, corpus: Corpus, sessions: int) -> dict[str, Any]:
    """Peak memory of the process tree while ``sessions`` sessions are open and their messages
    are stored and decided. A process's peak in that window is its VmHWM if the window raised
    it (exact), else the highest VmRSS sampled; their sum bounds the tree's peak from above."""
    before = {p: (status_kb(p, "VmRSS"), status_kb(p, "VmHWM")) for p in tree_pids(instance.pid)}
    mails = corpus.batch(sessions)
    sampler = RssSampler(instance.pid)
    sampler.start()
    try:
        opened = asyncio.run(held_sessions(instance.port, mails))
        ids = [m.message_id for m in mails if m.message_id is not None]
        instance.watch.wait(ids)
        time.sleep(SETTLE_SECONDS)
    finally:
        sampler.stop()
    pids = tree_pids(instance.pid)
    hwm = {p: status_kb(p, "VmHWM") for p in pids}
    window = {
        p: hwm[p] if hwm[p] > before.get(p, (0, 0))[1] else sampler.max_by_pid[p] for p in pids
    }
    pss = {p: pss_kb(p) for p in pids}
    outcome = judge(mails, instance)

    def by_process(values: dict[int, int]) -> dict[str, float]:
        return {role(instance.pid, p): round(kb / 1024, 1) for p, kb in values.items()}

    return {
        "sessions": sessions,
        "max_sessions_setting": instance.settings.smtp.max_sessions,
        "open_at_once": opened,
        "idle_rss_mb": round(sum(rss for rss, _ in before.values()) / 1024, 1),
        "peak_in_window_mb": round(sum(window.values()) / 1024, 1),
        "peak_in_window_by_process_mb": by_process(window),
        "peak_rss_sampled_sum_mb": round(sampler.peak_kb / 1024, 1),
        "rss_samples": sampler.samples,
        "vmhwm_raised_in_window": [role(instance.pid, p) for p in pids if window[p] == hwm[p]],
        "vmhwm_sum_lifetime_mb": round(sum(hwm.values()) / 1024, 1),
        "vmhwm_lifetime_by_process_mb": by_process(hwm),
        "pss_after_mb": round(sum(pss.values()) / 1024, 1),
        "correctness": outcome.summary(),
        "_outcome": outcome,
    }


# -- history --------------------------------------------------------------------------------

_REPLY = (
    b"From: Example Support <support@example.com>\r\nTo: owner@example.org\r\n"
    b"Subject: Your request to reset your security question\r\nAuto-Submitted: auto-replied\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    + b"We received your request and a member of our team will look at it shortly.\r\n"
    * 12
)


def seed_history(database_path: Path, count: int) -> float:
    """Store ``count`` processed messages as a live instance leaves them, directly: each with
    its verdict and decision, its reset request (bench.console's ``fill``: one in ten still
    open, one a minute back in time), the raw bytes of those older than the retention period
    already replaced by their headers, the request's message link, a sent acknowledgement in
    the outbox, its replay keys and its two audit events, chained like mailproc's own.
    Returns the seconds it took."""
    started = time.perf_counter()
    database = db.Database(f"sqlite:///{database_path}")
    try:
        db.upgrade(database)
        audited = set(fill(database, count))
    finally:
        database.dispose()
    with contextlib.closing(sqlite3.connect(database_path)) as connection, connection:
        connection.execute(
            "UPDATE message SET verdict = r.verdict, authenticated = 1, auth_strength = 'strong', "
            "received_at = r.created_at, processed_at = r.created_at, "
            "updated_at = r.created_at, "
            "decision = json_object('rule', 'reset-security-question', 'rule_action', "
            "'queue_reset', 'action', 'queue_reset', 'trace', json_extract(r.decision, "
            "'$.trace'), 'outcome', 'request opened', 'request_id', r.id, 'reference', "
            "r.reference) FROM reset_request AS r WHERE r.message_id = message.id"
        )
        # A live instance has replaced the raw bytes of older messages by their headers
        # ([retention] raw_message_days); leaving them would measure a one-off purge backlog.
        cutoff = datetime.now(UTC) - timedelta(days=RETENTION_DAYS)
        connection.execute(
            "UPDATE message SET raw = substr(raw, 1, instr(raw, X'0D0A0D0A') + 3), "
            "raw_purged_at = processed_at WHERE received_at < ?",
            (cutoff.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds"),),
        )
        connection.execute(
            "INSERT INTO request_message (message_id, request_id, joined_at) "
            "SELECT message_id, id, created_at FROM reset_request"
        )
        connection.execute(
            "INSERT INTO outbox (state, template, locale, recipient, subject, "
            "message_id_header, content, source_message_id, attempts, relay_reply, "
            "created_at, updated_at, sent_at) "
            "SELECT 'sent', 'request_received', 'en', email, "
            "'Your request ' || reference, 'bench-' || id || '@example.com', ?, message_id, 1, "
            "'250 2.0.0 Ok: queued', created_at, created_at, created_at FROM reset_request",
            (_REPLY,),
        )
        requests = connection.execute(
            "SELECT id, message_id, email, created_at FROM reset_request ORDER BY id"
        ).fetchall()
        connection.executemany(
            "INSERT INTO replay_key (key, kind, message_id, seen_at) VALUES (?, ?, ?, ?)",
            (
                (hashlib.sha256(f"{kind}:{message_id}".encode()).hexdigest(), kind, message_id, at)
                for _, message_id, _, at in requests
                for kind in ("dkim", "message-id")
            ),
        )
        last = connection.execute("SELECT hash FROM audit_event ORDER BY id DESC LIMIT 1")
        connection.executemany(
            "INSERT INTO audit_event (request_id, at, actor, action, from_state, to_state, "
            "reason, details, message_id, prev_hash, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _audit_rows(
                [r for r in requests if r[0] not in audited], (last.fetchone() or [GENESIS])[0]
            ),
        )
    return time.perf_counter() - started


def _audit_rows(
    requests: Sequence[tuple[int, int, str, str]], prev_hash: str
) -> Iterator[tuple[Any, ...]]:
    """Each request's ``created`` and ``message_decided`` events, hashed as ``audit`` does."""
    for request_id, message_id, email, at_text in requests:
        at = datetime.fromisoformat(at_text).replace(tzinfo=UTC)
        for action, to_state, reason, details in (
            ("created", "pending", "rule reset-security-question", {"risk_flags": []}),
            (
                "message_decided",
                None,
                "rule reset-security-question: queue_reset (request opened)",
                {"strength": "strong", "author": email},
            ),
        ):
            fields = _event_fields(
                request_id, at, "mailproc", action, None, to_state, reason, details, message_id
            )
            digest = _event_hash(prev_hash, fields)
            yield (
                request_id,
                at_text,
                "mailproc",
                action,
                None,
                to_state,
                reason,
                json.dumps(details),
                message_id,
                prev_hash,
                digest,
            )
            prev_hash = digest


# -- the run --------------------------------------------------------------------------------


def write_accounts(directory: Path) -> Path:
    path = directory / "accounts.csv"
    path.write_text(f"id,email,name,locale\n{ACCOUNT_ID},{ALICE},Alice Example,en\n")
    return path


def _strip(value: Any) -> Any:
    """Results without the private (``_``) entries, for JSON."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    dns: ZoneServer
    relay: Child
    accounts: Path
    corpus: Corpus
    outcome: Outcome = field(default_factory=Outcome)
    instances: list[dict[str, Any]] = field(default_factory=list)

    def instance(self, name: str, max_sessions: int | None = None) -> Instance:
        return Instance(
            self.workdir / name,
            self.dns,
            self.relay.port,
            self.accounts,
            self.args.poll_ms / 1000,
            max_sessions,
        )

    def finished(self, name: str, instance: Instance) -> None:
        self.instances.append(
            {"name": name, "exit_code": instance.exit_code, "log": instance.log_counts()}
        )
        if not self.args.keep:
            shutil.rmtree(instance.directory, ignore_errors=True)

    def check(self, part: dict[str, Any]) -> None:
        self.outcome.add(part["_outcome"])


def part_end_to_end(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    print(
        f"\n[1/3] end to end: {args.rate:g} msg/s for {args.duration:g} s, then a burst of "
        f"{args.burst}",
        flush=True,
    )
    with ctx.instance("end-to-end") as instance:
        warm_up(instance, ctx.corpus, args.warmup, args.rate)
        stream_result = stream(instance, ctx.corpus, args.rate, args.duration)
        ctx.check(stream_result)
        time.sleep(SETTLE_SECONDS)
        burst_result = burst_part(instance, ctx.corpus, args.burst, args.burst_sessions)
        ctx.check(burst_result)
        workers = instance.workers
        raws = [m.raw for m in burst_result.pop("_mails")]
        bare = bare_dkim(raws, ctx.corpus.records, max(1, workers), args.bare_seconds)
    ctx.finished("end-to-end", instance)
    mailproc_rate = burst_result["evaluated_after_intake_idle_msgs_per_s"]
    basis = "after intake went idle"
    if mailproc_rate is None:
        mailproc_rate, basis = burst_result["evaluated_overall_msgs_per_s"], "overall"
    ratio = mailproc_rate / bare["msgs_per_s"] if bare["msgs_per_s"] else 0.0
    bare["why_this_many_processes"] = (
        f"mailproc evaluates with [worker] processes = {workers}; the bare loop gets the same "
        "number of processes, so the ratio compares the work per message, not parallelism"
    )
    per_cpu = burst_result["decided_per_worker_cpu_second"]
    bare_per_cpu = bare["msgs_per_cpu_second"]
    result = {
        "stream": stream_result,
        "burst": burst_result,
        "bare_dkim_verify": bare,
        "evaluation_ratio": round(ratio, 3),
        "evaluation_ratio_basis": basis,
        # The same ratio per CPU second: hardly moved by other programs taking CPU.
        "evaluation_ratio_per_cpu_second": (
            round(per_cpu / bare_per_cpu, 3) if per_cpu and bare_per_cpu else None
        ),
        "worker_processes": workers,
    }
    print_end_to_end(result)
    return result


def part_scaling(ctx: Context, baseline: dict[str, Any] | None) -> dict[str, Any]:
    args = ctx.args
    print(
        f"\n[2/3] scaling: {', '.join(f'{s:,}' for s in args.scales)} messages stored", flush=True
    )
    rows = []
    if baseline is not None:
        rows.append({"stored": 0, "seed_seconds": 0.0, **_scale_row(baseline)})
    for stored in args.scales:
        name = f"scale-{stored}"
        (ctx.workdir / name).mkdir(parents=True, exist_ok=True)
        seconds = seed_history(ctx.workdir / name / "mailproc.db", stored)
        print(f"  seeded {stored:,} messages in {seconds:.1f} s", flush=True)
        with ctx.instance(name) as instance:
            warm_up(instance, ctx.corpus, args.warmup, args.rate)
            result = stream(instance, ctx.corpus, args.rate, args.duration)
            ctx.check(result)
        ctx.finished(name, instance)
        rows.append({"stored": stored, "seed_seconds": round(seconds, 1), **_scale_row(result)})
        print(
            f"  {stored:,} stored: p50 {rows[-1]['p50_ms']} ms, p99 {rows[-1]['p99_ms']} ms",
            flush=True,
        )
    result = {"rows": rows}
    print_scaling(rows, args.rate)
    return result


def _scale_row(result: dict[str, Any]) -> dict[str, Any]:
    visible = result["latency_250_to_decision_visible"]
    return {
        "evaluated_msgs_per_s": result["evaluated_msgs_per_s"],
        "p50_ms": visible["p50_ms"],
        "p95_ms": visible["p95_ms"],
        "p99_ms": visible["p99_ms"],
        "mailproc_cpus": result["mailproc_cpus"],
        "other_processes_cpus": result["other_processes_cpus"],
        "correct": result["correctness"]["ok"],
    }


def part_memory(ctx: Context) -> dict[str, Any]:
    args = ctx.args
    print(f"\n[3/3] memory: {args.sessions} SMTP sessions open at once", flush=True)
    default_cap = load_settings(None, env={}).smtp.max_sessions
    cap = max(default_cap, args.sessions + 10)
    with ctx.instance("memory", max_sessions=cap if cap != default_cap else None) as instance:
        warm_up(instance, ctx.corpus, args.warmup, args.rate)
        result = memory_part(instance, ctx.corpus, args.sessions)
        ctx.check(result)
    ctx.finished("memory", instance)
    result["default_max_sessions"] = default_cap
    print_memory(result)
    return result


def print_end_to_end(result: dict[str, Any]) -> None:
    s, b, bare = result["stream"], result["burst"], result["bare_dkim_verify"]
    visible = s["latency_250_to_decision_visible"]
    began = s["latency_250_to_evaluation_began_db"]
    write = s["latency_250_to_result_write_began_db"]
    print()
    print(
        f"{'end to end (250 -> decision)':<44} {'msgs/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8}"
    )
    print("-" * 89)
    print(
        f"{'stream ' + str(s['offered_msgs_per_s']) + ' msg/s offered: decision visible':<44} "
        f"{s['evaluated_msgs_per_s']:>8} {visible['p50_ms']:>8} {visible['p95_ms']:>8} "
        f"{visible['p99_ms']:>8} {visible['max_ms']:>8}"
    )
    print(
        f"{'  of which: 250 -> evaluation began (DB)':<44} {'':>8} {began['p50_ms']:>8} "
        f"{began['p95_ms']:>8} {began['p99_ms']:>8} {began['max_ms']:>8}"
    )
    print(
        f"{'  of which: 250 -> result write began (DB)':<44} {'':>8} {write['p50_ms']:>8} "
        f"{write['p95_ms']:>8} {write['p99_ms']:>8} {write['max_ms']:>8}"
    )
    smtp = s["latency_mail_from_to_250"]
    print(
        f"{'intake: MAIL FROM -> 250 (for comparison)':<44} {'':>8} {smtp['p50_ms']:>8} "
        f"{smtp['p95_ms']:>8} {smtp['p99_ms']:>8} {smtp['max_ms']:>8}"
    )
    print()
    print(f"{'evaluation rate':<52} {'msgs/s':>8}")
    print("-" * 61)
    print(
        f"{'burst intake (' + str(b['messages']) + ' messages, 250s)':<52} "
        f"{b['intake_msgs_per_s']:>8}"
    )
    print(f"{'burst decided, overall':<52} {b['evaluated_overall_msgs_per_s']:>8}")
    print(
        f"{'burst decided, after intake went idle':<52} "
        f"{b['evaluated_after_intake_idle_msgs_per_s'] or 'n/a':>8}"
    )
    print(
        f"{'bare dkim.verify loop, ' + str(bare['processes']) + ' process(es)':<52} "
        f"{bare['msgs_per_s']:>8}"
    )
    print(
        f"{'ratio (decided after intake idle / bare loop)':<52} "
        f"{result['evaluation_ratio']:>8.2f}   target >= {TARGET_EVALUATION_RATIO:.2f}"
    )
    print(
        f"{'the same per CPU second (worker / bare loop)':<52} "
        f"{b['decided_per_worker_cpu_second'] or 'n/a':>8} / {bare['msgs_per_cpu_second'] or 'n/a'}"
        f" = {result['evaluation_ratio_per_cpu_second'] or 'n/a'}"
    )
    print(
        f"  ({b['left_when_intake_went_idle']} of {b['messages']} waiting when intake went "
        f"idle; mailproc used {s['mailproc_cpus']} CPUs during the stream, other programs "
        f"{s['other_processes_cpus']})"
    )


def print_scaling(rows: list[dict[str, Any]], rate: float) -> None:
    print()
    print(
        f"{'messages stored':>16} {'seeded in s':>12} {'msgs/s':>8} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'p99 ms':>8} {'CPUs':>6} {'other':>6}  (offered {rate:g} msg/s)"
    )
    print("-" * 82)
    for row in rows:
        print(
            f"{row['stored']:>16,} {row['seed_seconds']:>12} {row['evaluated_msgs_per_s']:>8} "
            f"{row['p50_ms']:>8} {row['p95_ms']:>8} {row['p99_ms']:>8} "
            f"{row['mailproc_cpus']:>6} {row['other_processes_cpus']:>6}"
        )


def print_memory(result: dict[str, Any]) -> None:
    print()
    print(f"{'memory (serve + worker processes), RSS':<52} {'MB':>8}")
    print("-" * 61)
    rows = [
        ("idle, before the sessions", result["idle_rss_mb"], ""),
        (
            "peak with the sessions (sum of per-process peaks)",
            result["peak_in_window_mb"],
            f"   target < {TARGET_RSS_MB:g}",
        ),
        ("peak with the sessions (highest sampled sum)", result["peak_rss_sampled_sum_mb"], ""),
        ("sum of VmHWM over each process's whole life", result["vmhwm_sum_lifetime_mb"], ""),
        ("PSS afterwards (shared pages counted once)", result["pss_after_mb"], ""),
    ]
    for label, value, note in rows:
        print(f"{label:<52} {value:>8}{note}")
    print(
        f"  ({result['open_at_once']} of {result['sessions']} sessions open at once, "
        f"[smtp] max_sessions = {result['max_sessions_setting']}, default "
        f"{result['default_max_sessions']})"
    )
    lifetime = result["vmhwm_lifetime_by_process_mb"]
    for name, mb in result["peak_in_window_by_process_mb"].items():
        print(f"    {name}: {mb} MB with the sessions, VmHWM {lifetime.get(name)} MB")


def targets(results: dict[str, Any], rate: float) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    end = results.get("end_to_end")
    if end is not None:
        ratio = end["evaluation_ratio"]
        found[f"evaluation >= {TARGET_EVALUATION_RATIO:.2f} of bare DKIM"] = {
            "value": ratio,
            "met": ratio >= TARGET_EVALUATION_RATIO,
        }
        p99 = end["stream"]["latency_250_to_decision_visible"]["p99_ms"]
        found[f"p99 end-to-end < {TARGET_P99_MS:g} ms at {rate:g} msg/s"] = {
            "value_ms": p99,
            "met": p99 is not None and p99 < TARGET_P99_MS,
        }
    memory = results.get("memory")
    if memory is not None:
        peak = memory["peak_in_window_mb"]
        found[f"< {TARGET_RSS_MB:g} MB RSS at {memory['sessions']} sessions"] = {
            "value_mb": peak,
            "met": peak < TARGET_RSS_MB,
        }
    return found


def _noise(results: dict[str, Any]) -> Iterator[float]:
    """Every measured window's CPUs taken by other programs."""
    end = results.get("end_to_end")
    windows = [] if end is None else [end["stream"], end["burst"]["drain"]]
    windows += results.get("scaling", {}).get("rows", [])
    for window in windows:
        if window.get("other_processes_cpus") is not None:
            yield window["other_processes_cpus"]


def run(argv: list[str] | argparse.Namespace | None = None) -> dict[str, Any]:
    """The whole benchmark in this process, for a combined runner: ``argv`` as on the command
    line (``None`` means the defaults, not ``sys.argv``) or already parsed; prints the tables,
    writes ``--output`` and returns the same results (``valid`` false when a message was lost
    or decided wrongly, or a mailproc did not stop cleanly). Bad arguments raise
    ``SystemExit`` (argparse)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv or [])
    started = time.monotonic()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="mailproc-endtoend-"))
    results: dict[str, Any] = {}
    print(f"end-to-end benchmark: preparing keys (work directory {workdir})", flush=True)
    corpus = Corpus(args.signed_share)
    dns = ZoneServer(ttl=3600, negative_ttl=3600).start()
    relay: Child | None = None
    try:
        corpus.publish(dns)
        relay = Child(
            "relay", [sys.executable, "-m", "bench.intake", "--sink"], workdir / "relay.log"
        )
        relay.wait_listening()
        ctx = Context(args, workdir, dns, relay, write_accounts(workdir), corpus)
        results["end_to_end"] = part_end_to_end(ctx)
        if not args.skip_scaling:
            results["scaling"] = part_scaling(ctx, results["end_to_end"]["stream"])
        if not args.skip_memory:
            results["memory"] = part_memory(ctx)
    finally:
        if relay is not None:
            relay.stop(grace=5.0)
        dns.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    clean = all(i["exit_code"] == 0 for i in ctx.instances)
    valid = ctx.outcome.ok and clean
    found = targets(results, args.rate)
    summary = {
        "benchmark": "bench.endtoend",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "run_seconds": round(time.monotonic() - started, 1),
        "mailproc_revision": mailproc_revision(),
        "machine": machine_info(),
        "load_average_before": [round(v, 2) for v in load_before],
        "parameters": {
            "rate_msgs_per_s": args.rate,
            "duration_s": args.duration,
            "signed_share": args.signed_share,
            "spoofs": list(SPOOFS),
            "warmup_messages": args.warmup,
            "burst_messages": args.burst,
            "burst_sessions": args.burst_sessions,
            "scales": [] if args.skip_scaling else args.scales,
            "memory_sessions": None if args.skip_memory else args.sessions,
            "bare_seconds": args.bare_seconds,
            "decision_poll_ms": args.poll_ms,
            "dkim_key": "RSA-2048, relaxed/simple, from:to:subject:date:message-id",
            "mailproc_settings": (
                "defaults apart from ports, database path, DNS server, [accounts] csv_file, "
                "[outbound] relay (a sink) and, for the memory part, [smtp] max_sessions"
            ),
            "latency_definition": (
                "time.monotonic() when the client read the 250, to the first poll of the "
                f"message table (every {args.poll_ms:g} ms) that saw the decision committed"
            ),
        },
        **_strip(results),
        "targets": found,
        "correctness": ctx.outcome.summary(),
        "instances": ctx.instances,
        "valid": valid,
    }
    print()
    for name, target in found.items():
        value = next(v for k, v in target.items() if k.startswith("value"))
        print(f"target {name}: {value} -> {'met' if target['met'] else 'NOT met'}")
    o = ctx.outcome
    print(
        f"correctness: {o.accepted} of {o.sent} accepted, "
        f"{sum(o.undecided.values())} not decided, {len(o.wrong)} decided wrongly "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(o.by_kind.items()))}); "
        f"mailproc exit codes {[i['exit_code'] for i in ctx.instances]}, "
        f"log errors {sum(i['log']['errors'] for i in ctx.instances)}"
    )
    for example in o.wrong[:5]:
        print(f"  wrong: {example}")
    noise = max(_noise(results), default=0.0)
    summary["other_processes_cpus_max"] = noise
    if noise > NOISY_CPUS:
        print(
            f"warning: other programs kept up to {noise:.2f} CPUs busy during a measurement "
            f"(of {os.cpu_count()}); the figures are noisy"
        )
    print(f"run time {summary['run_seconds']} s; {'VALID' if valid else 'INVALID'}")
    output = Path(args.output)
    output.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results written to {output}")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.endtoend", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--rate", type=float, default=50.0, help="offered messages per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the stream")
    parser.add_argument("--signed-share", type=float, default=0.5, help="signed fraction")
    parser.add_argument("--warmup", type=int, default=40, help="warm-up messages per instance")
    parser.add_argument("--burst", type=int, default=1000, help="messages in the burst")
    parser.add_argument("--burst-sessions", type=int, default=20, help="sessions in the burst")
    parser.add_argument("--bare-seconds", type=float, default=3.0, help="bare loop seconds")
    parser.add_argument(
        "--scales",
        type=lambda text: [int(v.replace("_", "")) for v in text.split(",") if v.strip()],
        default=[1_000, 10_000, 100_000],
        help="messages already stored, comma-separated (1000,10000,100000)",
    )
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--sessions", type=int, default=200, help="sessions held open (memory)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="decision poll interval")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--output", default=str(RESULTS), help="JSON results file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 4.0)
        args.burst = min(args.burst, 300)
        args.scales = args.scales[:1]
        args.bare_seconds = min(args.bare_seconds, 1.0)
        args.warmup = min(args.warmup, 20)
    if args.rate <= 0 or args.duration <= 0 or not 0 <= args.signed_share <= 1:
        parser.error("--rate and --duration must be > 0, --signed-share between 0 and 1")
    if min(args.burst, args.burst_sessions, args.sessions, args.warmup) < 1:
        parser.error("--burst, --burst-sessions, --sessions and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_signal)
    return 0 if run(args)["valid"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
