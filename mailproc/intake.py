"""Durable intake: what arrived over SMTP, its wire-level flags, and the group commit that makes
each message durable before its ``250`` while sessions share the cost of a commit."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrival:
    """One message as received: exact bytes, envelope and connection facts."""

    received_at: datetime
    protocol: str
    peer_ip: str
    peer_port: int | None
    helo: str | None
    client_ip: str | None
    client_name: str | None
    client_helo: str | None
    client_protocol: str | None
    xforward: dict[str, Any] | None
    mail_from: str
    rcpt_tos: tuple[str, ...]
    tls: dict[str, Any] | None
    raw: bytes


_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")
# A lone "." line where one of the line breaks around it is not CRLF: a receiver that accepts
# bare LF or CR as line ends would see the end of DATA here (SMTP smuggling).
_SMUGGLING = re.compile(rb"(?:^|[\r\n])\.(?:\n|\r(?!\n))|(?:(?<!\r)\n|\r(?!\n))\.\r\n")


def wire_flags(raw: bytes) -> list[str]:
    """Names of the wire-level irregularities in ``raw``; the bytes are kept exactly as sent."""
    flags = []
    if b"\x00" in raw:
        flags.append("nul_byte")
    # Fast path: when every CR and LF belongs to a CRLF there is no bare line end and hence no
    # smuggling sequence; the regexes below cost far more per message than this count.
    crlf = raw.count(b"\r\n")
    if raw.count(b"\n") == crlf and raw.count(b"\r") == crlf:
        return flags
    if _BARE_LF.search(raw):
        flags.append("bare_lf")
    if _BARE_CR.search(raw):
        flags.append("bare_cr")
    if _SMUGGLING.search(raw):
        flags.append("smuggling_sequence")
    return flags


class IntakeClosed(Exception):
    """The service is shutting down and stores nothing more."""


StoreBatch = Callable[[Sequence[Arrival]], list[int]]
StoreBatchNow = Callable[[Sequence[Arrival]], "list[int] | None"]


class GroupCommitter:
    """Commits waiting arrivals together: while one commit is on its way to disk, the next
    arrivals gather and go in the next single transaction. Each caller's ``store`` returns only
    once its own row is committed, and raises if it was not.

    ``store_batch`` runs on a thread and may wait for the database. ``store_now``, when given,
    is tried first on the event loop's own thread and must return None at once, having
    written nothing, when it would have to wait (SQLite's write lock held by a worker): a local
    SQLite commit costs less than the hand-over to a thread and back, and the fsync it waits
    for is short beside that; a wait for a lock is not, so that goes to the thread."""

    def __init__(
        self,
        store_batch: StoreBatch,
        on_commit: Callable[[], None] = lambda: None,
        max_batch: int = 256,
        max_batch_bytes: int = 32 << 20,
        store_now: StoreBatchNow | None = None,
    ) -> None:
        self._store_batch = store_batch
        self._store_now = store_now
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._pending: list[tuple[Arrival, asyncio.Future[int]]] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def store(self, arrival: Arrival) -> int:
        if self._closing or self._task is None or self._task.done():
            raise IntakeClosed("intake is not running")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        # Marks the outcome as seen even when the session has gone away before it.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._pending.append((arrival, future))
        self._wakeup.set()
        # A session that goes away mid-commit must not cancel the commit for the others.
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Commit what is pending, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    def _take_batch(self) -> list[tuple[Arrival, asyncio.Future[int]]]:
        size = 0
        count = 0
        for arrival, _ in self._pending:
            if count and (
                count >= self._max_batch or size + len(arrival.raw) > self._max_batch_bytes
            ):
                break
            size += len(arrival.raw)
            count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                await self._commit(self._take_batch())
            if self._closing:
                return

    async def _commit(self, batch: list[tuple[Arrival, asyncio.Future[int]]]) -> None:
        arrivals = [arrival for arrival, _ in batch]
        try:
            ids = self._store_now(arrivals) if self._store_now is not None else None
            if ids is None:
                ids = await asyncio.to_thread(self._store_batch, arrivals)
        except (IntegrityError, DataError) as exc:
            if len(batch) == 1:
                self._fail(batch, exc)
                return
            # One bad row must not turn away the rest of the batch: store them one by one.
            log.warning("batch of %d failed (%s); storing one by one", len(batch), exc)
            for item in batch:
                await self._commit([item])
            return
        except Exception as exc:
            self._fail(batch, exc)
            return
        self.batches += 1
        self._on_commit()
        for (_, future), message_id in zip(batch, ids, strict=True):
            if not future.done():
                future.set_result(message_id)

    @staticmethod
    def _fail(batch: list[tuple[Arrival, asyncio.Future[int]]], exc: Exception) -> None:
        log.error("could not store %d message(s): %s", len(batch), exc)
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)
