"""Workers: processes that claim stored messages a batch at a time and process them.

They run apart from the SMTP listener's process so that parsing and authentication never take
the listener's interpreter lock: ``serve`` starts ``[worker] processes`` of them and restarts
any that die; ``mailproc worker`` runs one in the foreground for scaling out. Workers share
nothing but the database (claims with leases), so any number may run on any machine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import time
import uuid
from multiprocessing.context import SpawnProcess
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event

from mailproc.config import Settings
from mailproc.db import Database
from mailproc.logs import setup_logging
from mailproc.pipeline import Pipeline
from mailproc.services import MessageService

log = logging.getLogger(__name__)

SPAWN = multiprocessing.get_context("spawn")
# Results of a long batch are written at least this often, renewing the leases of the rest.
FLUSH_SECONDS = 1.0
# The listener counts as busy for this long after a commit (see ``pause_for_intake``).
INTAKE_ACTIVE_SECONDS = 0.5


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def work(
    settings: Settings,
    wake: Event,
    stop: Event,
    parent_pid: int | None = None,
    last_commit: Synchronized[float] | None = None,
) -> None:
    """The worker loop: process messages until ``stop`` is set (finishing the one in hand), or
    until the parent process is gone."""
    # A lost verdict is re-derived (the claim's lease runs out); only intake must wait for disk.
    database = Database(settings.database.url, durable=False)
    service = MessageService.from_settings(
        database, settings, Pipeline.from_settings(settings, database)
    )
    worker_id = new_worker_id()
    # Without a parent to wake us, look again at least every second for a parent that died.
    pause = min(settings.worker.poll_interval_seconds, 1.0)
    log.info("worker %s started", worker_id)
    try:
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                log.warning("worker %s: the serving process is gone; stopping", worker_id)
                break
            wake.clear()
            try:
                claims = service.claim_batch(worker_id, settings.worker.batch_size)
                busy = bool(claims)
                if busy:
                    started = time.monotonic()
                    service.process_batch(claims, flush_seconds=FLUSH_SECONDS, stop=stop.is_set)
                    pause_for_intake(settings, last_commit, stop, time.monotonic() - started)
            except Exception:
                # The database is away or something failed outside one message: the message
                # stays claimed until its lease runs out, then any worker takes it again.
                log.exception("worker %s: could not process; retrying shortly", worker_id)
                busy = False
                stop.wait(1.0)
            if not busy:
                wake.wait(pause)
    finally:
        database.dispose()
        log.info("worker %s stopped", worker_id)


def pause_for_intake(
    settings: Settings, last_commit: Synchronized[float] | None, stop: Event, worked: float
) -> None:
    """Intake first: while the listener is storing mail, rest ``intake_yield`` times as long
    as the last batch took, leaving the CPU and SQLite's write lock to the sessions waiting for
    their ``250``. Stored mail waits safely; a backlog is worked off as soon as intake calms."""
    if not settings.worker.intake_yield or last_commit is None:
        return
    if time.monotonic() - last_commit.value < INTAKE_ACTIVE_SECONDS:
        stop.wait(worked * settings.worker.intake_yield)


def _child(
    settings: Settings,
    wake: Event,
    stop: Event,
    parent_pid: int,
    last_commit: Synchronized[float] | None = None,
) -> None:
    setup_logging(settings.logging.level, settings.logging.format)
    # When CPU is short, the SMTP sessions waiting for their 250 go first; stored mail waits.
    if settings.worker.nice:
        os.nice(settings.worker.nice)
    # The parent decides when we stop; a Ctrl-C in the terminal reaches us too, so ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    work(settings, wake, stop, parent_pid, last_commit)


class WorkerProcesses:
    """The worker processes of one ``serve``: started, woken, restarted and stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.count = settings.worker.processes
        self._wake = SPAWN.Event()
        self._stop = SPAWN.Event()
        # When the listener last committed (CLOCK_MONOTONIC, shared by every process).
        self._last_commit: Synchronized[float] = SPAWN.Value("d", 0.0)
        self._processes: list[SpawnProcess] = []
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0

    def _spawn(self) -> SpawnProcess:
        process = SPAWN.Process(
            target=_child,
            args=(self.settings, self._wake, self._stop, os.getpid(), self._last_commit),
            name="mailproc-worker",
            daemon=False,
        )
        process.start()
        return process

    def start(self) -> None:
        self._processes = [self._spawn() for _ in range(self.count)]
        self._supervisor = asyncio.create_task(self._supervise(), name="worker-supervisor")

    def wake(self) -> None:
        """Called after every intake commit: there is new mail, and intake is busy."""
        self._last_commit.value = time.monotonic()
        self._wake.set()

    @property
    def alive(self) -> int:
        return sum(process.is_alive() for process in self._processes)

    async def _supervise(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            await asyncio.sleep(delay)
            for index, process in enumerate(self._processes):
                if process.is_alive() or self._stop.is_set():
                    continue
                log.error(
                    "worker process %s exited with %s; restarting", process.pid, process.exitcode
                )
                process.close()
                self._processes[index] = self._spawn()
                self.restarts += 1

    async def stop(self, grace_seconds: float = 30.0) -> None:
        """Let each worker finish the message in hand, then stop; kill those that do not."""
        self._stop.set()
        self._wake.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        deadline = time.monotonic() + grace_seconds
        for process in self._processes:
            await asyncio.to_thread(process.join, max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker process %s did not stop in time; killing it", process.pid)
                process.kill()
                await asyncio.to_thread(process.join, 5)
            process.close()
        self._processes = []
