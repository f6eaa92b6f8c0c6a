"""The console's HTTP server: uvicorn in serve's own event loop, beside the SMTP listener."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp


class EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: serve's handlers stop everything in order."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class WebServer:
    def __init__(self, app: ASGIApp, sock: socket.socket) -> None:
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=True,
            timeout_graceful_shutdown=5,
        )
        self.server = EmbeddedServer(config)
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def bind(cls, app: ASGIApp, host: str, port: int) -> WebServer:
        """Bind now, so that an address in use stops serve at start with a clear error."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not left to the default 0: asyncio sets TCP_NODELAY only on
        # sockets that say they are TCP, and without it every answer on a kept-alive
        # connection after the first waits ~40 ms (Nagle's algorithm and delayed ACKs).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.setblocking(False)
        return cls(app, sock)

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                return
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        await self._task
        self._task = None
        self.sock.close()
