"""Test helpers: writing configs, running the service, building and sending real mail."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from sqlalchemy import select

from mailproc.app import App
from mailproc.config import Settings, parse_settings
from mailproc.db import Database
from mailproc.models import Message, MessageState

SUPPORT = "support@example.com"
# The suite's DNS server on loopback (set by the session fixture in conftest): every config a
# test writes resolves through it, so nothing is ever asked of the real DNS.
TEST_DNS: list[str] = []


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(value)


def config_text(database_url: str, port: int = 0, **sections: dict[str, Any]) -> str:
    smtp = {"listen": f"127.0.0.1:{port}", "support_addresses": [SUPPORT]}
    smtp.update(sections.pop("smtp", {}))
    data: dict[str, dict[str, Any]] = {
        "smtp": smtp,
        "database": {"url": database_url, **sections.pop("database", {})},
        "worker": {"poll_interval_seconds": 0.2, **sections.pop("worker", {})},
        "dns": {"nameservers": list(TEST_DNS), "timeout_seconds": 0.5, **sections.pop("dns", {})},
        # The console on a free port, so that tests never collide on the default one.
        "web": {"listen": "127.0.0.1:0", **sections.pop("web", {})},
        **sections,
    }
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def write_config(path: Path, database_url: str, port: int = 0, **sections: dict[str, Any]) -> Path:
    path.write_text(config_text(database_url, port, **sections))
    return path


def settings_for(database_url: str, **sections: dict[str, Any]) -> Settings:
    import tomllib

    return parse_settings(tomllib.loads(config_text(database_url, **sections)), "test", env={})


def make_message(
    subject: str = "Reset my security question",
    sender: str = "alice@example.org",
    body: str = "Please reset it.\n",
    message_id: str | None = None,
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = sender
    message["To"] = SUPPORT
    message["Subject"] = subject
    message["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@example.org>"
    message.set_content(body)
    return message


def wire(message: EmailMessage) -> bytes:
    """The message as it goes over SMTP: CRLF line ends (smtplib sends bytes untouched)."""
    return message.as_bytes(policy=policy.SMTP)


def send(port: int, message: EmailMessage, mail_from: str = "alice@example.org") -> str:
    """Send over a real SMTP session; returns the server's reply text to the DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail(mail_from)
        code, reply = client.rcpt(SUPPORT)
        assert code == 250, reply
        code, reply = client.data(wire(message))
        assert code == 250, (code, reply)
        return reply.decode()


def send_raw(port: int, raw: bytes, mail_from: str = "alice@example.org") -> str:
    """Send exact bytes to the support address; returns the final reply's text."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail(mail_from)
        code, _ = client.rcpt(SUPPORT)
        assert code == 250, code
        code, reply = client.data(raw)
        assert code == 250, (code, reply)
        return str(reply.decode())


def stored_id(reply: str) -> int:
    """The message id from our ``250 2.0.0 Stored as message N`` reply."""
    return int(reply.rsplit(" ", 1)[-1])


def messages(database_url: str) -> list[Message]:
    database = Database(database_url)
    try:
        with database.reading() as session:
            return list(session.scalars(select(Message).order_by(Message.id)))
    finally:
        database.dispose()


def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


def wait_processed(database_url: str, count: int, timeout: float = 15.0) -> list[Message]:
    def done() -> list[Message] | None:
        rows = messages(database_url)
        finished = [m for m in rows if m.state in (MessageState.PROCESSED, MessageState.FAILED)]
        return rows if len(rows) >= count and len(finished) == len(rows) else None

    result: list[Message] = wait_for(done, timeout)
    return result


class AppThread:
    """The real service, started in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = App(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        assert self.app.smtp_port is not None
        return self.app.smtp_port

    @property
    def database_url(self) -> str:
        return self.settings.database.url

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self.call(self.app.start())

    def stop(self) -> None:
        try:
            self.call(self.app.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    @classmethod
    def from_sections(cls, database_url: str, **sections: dict[str, Any]) -> AppThread:
        return cls(settings_for(database_url, **sections))

    @classmethod
    @contextmanager
    def running(cls, database_url: str, **sections: dict[str, Any]) -> Iterator[AppThread]:
        running = cls.from_sections(database_url, **sections)
        running.start()
        try:
            yield running
        finally:
            running.stop()


class ServerProcess:
    """``python -m mailproc serve`` as a child process."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILPROC_")}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailproc", "--config", str(self.config), "serve"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"server did not listen in {timeout}s:\n{self.log_path.read_text()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
