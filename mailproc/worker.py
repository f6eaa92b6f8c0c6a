"""The in-process worker: claims stored messages and processes them, one at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid

from mailproc.services import MessageService

log = logging.getLogger(__name__)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    def __init__(self, service: MessageService, poll_interval: float, worker_id: str | None = None):
        self.service = service
        self.poll_interval = poll_interval
        self.worker_id = worker_id or new_worker_id()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="worker")

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Finish the message in hand, then stop."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                busy = await asyncio.to_thread(self.service.process_next, self.worker_id)
            except Exception:
                # The database is away or something failed outside one message: the message
                # stays claimed until its lease runs out, then any worker takes it again.
                log.exception("worker %s: could not process; retrying shortly", self.worker_id)
                busy = False
            if busy:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=self.poll_interval)
