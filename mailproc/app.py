"""The running service: database, durable intake, SMTP/LMTP listener and worker in one event
loop, with a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from mailproc import db
from mailproc.actions import ResetExecutor
from mailproc.config import Settings
from mailproc.intake import GroupCommitter
from mailproc.outbox import OutboxSender
from mailproc.pipeline import check_directory
from mailproc.rendering import Templates
from mailproc.retention import Retention
from mailproc.rules import RuleSet
from mailproc.services import MessageService
from mailproc.smtp import Connections, protocol_factory
from mailproc.worker import WorkerProcesses, new_worker_id

log = logging.getLogger(__name__)
T = TypeVar("T")
# How often serve looks whether a staff reminder is due ([queue] remind_every_hours says how
# often one goes out).
REMIND_CHECK_SECONDS = 300


class ListenError(Exception):
    """The listener could not be opened (address in use, no permission, ...)."""


class App:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = db.Database(settings.database.url)
        self.messages = MessageService.from_settings(self.database, settings)
        self.worker = WorkerProcesses(settings)
        self.intake = GroupCommitter(
            self.messages.store_batch,
            on_commit=self.worker.wake,
            store_now=self.messages.store_batch_now,
        )
        self.connections = Connections(limit=settings.smtp.max_sessions)
        self.server: asyncio.Server | None = None
        self.smtp_port: int | None = None
        # Bad templates, rules or directory settings, or an unusable DKIM key, stop us here,
        # not at the first message.
        Templates.from_settings(settings.templates).check()
        RuleSet.from_settings(settings.rules)
        check_directory(settings)
        instance = new_worker_id()
        self.sender = OutboxSender(settings, self.database, instance)
        self.executor = ResetExecutor(settings, self.database, instance)
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        # One lock per scheduled job: a run still going when the next is due makes that one
        # return at once, and stop() waits for the run in hand.
        self._job_locks: dict[str, asyncio.Lock] = {}
        self.retention = Retention(self.database, settings.retention.raw_message_days)
        self._stopping = False
        self.web: Any = None
        self.web_port: int | None = None

    async def start(self) -> None:
        if self.settings.database.migrate_on_start:
            await asyncio.to_thread(db.upgrade, self.database)
        self.intake.start()
        listen = self.settings.smtp.listen
        try:
            self.server = await asyncio.get_running_loop().create_server(
                protocol_factory(self.settings.smtp, self.intake, self.connections),
                host=listen.host,
                port=listen.port,
            )
        except OSError as exc:
            await self.intake.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"cannot listen on {listen}: {reason.lower()}") from exc
        self.smtp_port = self.server.sockets[0].getsockname()[1]
        web = self.settings.web
        if web.listen is not None:
            from mailproc.web.app import create_app
            from mailproc.web.server import WebServer

            try:
                self.web = WebServer.bind(
                    create_app(self.settings, self.database, self),
                    web.listen.host,
                    web.listen.port,
                )
            except OSError as exc:
                self.server.close()
                await self.intake.close()
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(
                    f"cannot listen on {web.listen} ([web] listen): {reason.lower()}"
                ) from exc
            await self.web.start()
            self.web_port = self.web.port
        if self.worker.count:
            self.worker.start()
        settings = self.settings
        self._every(settings.outbound.poll_interval_seconds, "outbox", self.deliver_outbox)
        self._every(settings.reset.poll_interval_seconds, "reset", self.execute_resets)
        self._every(settings.queue.expire_check_seconds, "expire", self.expire_requests)
        if settings.queue.staff_addresses:
            self._every(REMIND_CHECK_SECONDS, "remind", self.remind_staff)
        if settings.retention.raw_message_days > 0:
            self._every(
                settings.retention.check_interval_seconds, "retention", self.purge_raw_messages
            )
        self.scheduler.start()
        if self.web_port is not None:
            log.info("console on %s (listening on port %d)", web.base_url, self.web_port)
        log.info(
            "mailproc %s listening on %s:%d (database %s)",
            self.settings.smtp.protocol.upper(),
            listen.host,
            self.smtp_port,
            self.database.engine.url.render_as_string(hide_password=True),
        )

    async def stop(self) -> None:
        """Stop accepting, let open transactions finish, commit what is pending, finish the
        message in hand."""
        log.info("stopping: no new connections; finishing open sessions")
        if self.server is not None:
            self.server.close()
        await self.connections.drain(self.settings.smtp.shutdown_grace_seconds)
        if self.web is not None:
            await self.web.stop()  # answers under way are finished
        await self.intake.close()
        await self.worker.stop(self.settings.smtp.shutdown_grace_seconds)
        # Jobs that start from now on return at once; those running finish the attempt in
        # hand. Only then the scheduler stops: its shutdown cancels running jobs, and a job
        # cancelled while its database work goes on in a thread would leave that work (and its
        # connection) behind.
        self._stopping = True
        for lock in self._job_locks.values():
            async with lock:
                pass  # the attempt in hand is finished and recorded
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        self.executor.close()
        self.database.dispose()
        log.info("stopped")

    # What /readyz and /metrics ask of serve.

    def listening(self) -> bool:
        return self.server is not None and self.server.is_serving() and not self._stopping

    def scheduling(self) -> bool:
        return bool(self.scheduler.running) and not self._stopping

    def open_sessions(self) -> int:
        return len(self.connections.open)

    def _every(self, seconds: float, job_id: str, job: Callable[[], Awaitable[None]]) -> None:
        self._job_locks[job_id] = asyncio.Lock()
        self.scheduler.add_job(
            job,
            "interval",
            seconds=seconds,
            next_run_time=datetime.now(UTC),
            id=job_id,
            # A run still going when the next is due: that one returns at once (see _guarded),
            # rather than APScheduler warning about it at every interval.
            max_instances=2,
            coalesce=True,
            misfire_grace_time=None,
        )

    async def _guarded(self, job_id: str, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """Run one job's work unless we are stopping or its last run is still going. A failure
        (the database is away, say) loses nothing: it is logged and the next run tries again."""
        lock = self._job_locks[job_id]
        if self._stopping or lock.locked():
            return None
        async with lock:
            try:
                return await call()
            except Exception:
                log.exception("%s failed; trying again at the next run", what)
                return None

    async def deliver_outbox(self) -> None:
        """The scheduler's outbox job: deliver every reply that is due."""
        await self._guarded(
            "outbox", "outbox delivery", lambda: self.sender.run_once(stop=lambda: self._stopping)
        )

    async def execute_resets(self) -> None:
        """The scheduler's reset job: carry out every approved reset that is due."""
        await self._guarded(
            "reset",
            "carrying out resets",
            lambda: self.executor.run_once(stop=lambda: self._stopping),
        )

    async def expire_requests(self) -> None:
        """The scheduler's expiry job: pending requests past their expiry become expired."""
        decisions = self.executor.decisions
        expired = await self._guarded(
            "expire", "expiring requests", lambda: asyncio.to_thread(decisions.expire_due)
        )
        if expired:
            log.info("%d pending request(s) expired", expired)

    async def remind_staff(self) -> None:
        """The scheduler's reminder job: the staff digest of requests waiting too long."""
        decisions = self.executor.decisions
        sent = await self._guarded(
            "remind", "reminding the staff", lambda: asyncio.to_thread(decisions.remind_staff)
        )
        if sent:
            log.info("reminder of waiting requests queued for %d staff address(es)", sent)

    async def purge_raw_messages(self) -> None:
        """The scheduler's retention job: raw messages past their age become headers only."""
        report = await self._guarded(
            "retention", "retention", lambda: asyncio.to_thread(self.retention.purge)
        )
        if report is not None and report.messages:
            log.info(
                "retention: raw bytes of %d messages replaced by their headers (%d -> %d bytes)",
                report.messages,
                report.bytes_before,
                report.bytes_after,
            )

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()
