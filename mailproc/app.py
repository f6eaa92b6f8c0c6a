"""The running service: database, durable intake, SMTP/LMTP listener and worker in one event
loop, with a graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from datetime import UTC, datetime
from typing import Any

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
        self._delivering = asyncio.Lock()
        self._executing = asyncio.Lock()
        self._expiring = asyncio.Lock()
        self._purging = asyncio.Lock()
        self._reminding = asyncio.Lock()
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
        self.scheduler.add_job(
            self.deliver_outbox,
            "interval",
            seconds=self.settings.outbound.poll_interval_seconds,
            next_run_time=datetime.now(UTC),
            id="outbox",
            # A run still sending when the next is due: that one returns at once (see
            # deliver_outbox), rather than APScheduler warning about it at every interval.
            max_instances=2,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self.execute_resets,
            "interval",
            seconds=self.settings.reset.poll_interval_seconds,
            next_run_time=datetime.now(UTC),
            id="reset",
            max_instances=2,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self.expire_requests,
            "interval",
            seconds=self.settings.queue.expire_check_seconds,
            next_run_time=datetime.now(UTC),
            id="expire",
            max_instances=2,
            coalesce=True,
            misfire_grace_time=None,
        )
        if self.settings.queue.staff_addresses:
            self.scheduler.add_job(
                self.remind_staff,
                "interval",
                seconds=REMIND_CHECK_SECONDS,
                next_run_time=datetime.now(UTC),
                id="remind",
                max_instances=2,
                coalesce=True,
                misfire_grace_time=None,
            )
        if self.settings.retention.raw_message_days > 0:
            self.scheduler.add_job(
                self.purge_raw_messages,
                "interval",
                seconds=self.settings.retention.check_interval_seconds,
                next_run_time=datetime.now(UTC),
                id="retention",
                max_instances=2,
                coalesce=True,
                misfire_grace_time=None,
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
        async with (
            self._delivering,
            self._executing,
            self._expiring,
            self._purging,
            self._reminding,
        ):
            pass  # the attempts in hand are finished and recorded
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

    async def deliver_outbox(self) -> None:
        """The scheduler's outbox job: deliver every reply that is due."""
        if self._stopping or self._delivering.locked():
            return
        async with self._delivering:
            try:
                await self.sender.run_once(stop=lambda: self._stopping)
            except Exception:
                # The database is away, say: nothing is lost, the next run tries again.
                log.exception("outbox delivery failed; trying again at the next run")

    async def execute_resets(self) -> None:
        """The scheduler's reset job: carry out every approved reset that is due."""
        if self._stopping or self._executing.locked():
            return
        async with self._executing:
            try:
                await self.executor.run_once(stop=lambda: self._stopping)
            except Exception:
                log.exception("carrying out resets failed; trying again at the next run")

    async def expire_requests(self) -> None:
        """The scheduler's expiry job: pending requests past their expiry become expired."""
        if self._stopping or self._expiring.locked():
            return
        async with self._expiring:
            try:
                expired = await asyncio.to_thread(self.executor.decisions.expire_due)
            except Exception:
                log.exception("expiring requests failed; trying again at the next run")
                return
        if expired:
            log.info("%d pending request(s) expired", expired)

    async def remind_staff(self) -> None:
        """The scheduler's reminder job: the staff digest of requests waiting too long."""
        if self._stopping or self._reminding.locked():
            return
        async with self._reminding:
            try:
                sent = await asyncio.to_thread(self.executor.decisions.remind_staff)
            except Exception:
                log.exception("reminding the staff failed; trying again at the next run")
                return
        if sent:
            log.info("reminder of waiting requests queued for %d staff address(es)", sent)

    async def purge_raw_messages(self) -> None:
        """The scheduler's retention job: raw messages past their age become headers only."""
        if self._stopping or self._purging.locked():
            return
        async with self._purging:
            try:
                report = await asyncio.to_thread(self.retention.purge)
            except Exception:
                log.exception("retention failed; trying again at the next run")
                return
        if report.messages:
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
